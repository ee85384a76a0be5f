"""LyCORIS and DoRA adapter kinds: LoHa, LoKr, full-rank and norm/bias differences, DoRA.

Every kind is a class in :mod:`loralib.lycoris.kinds` with the small protocol it shares with
:class:`~loralib.adapter.LoraModule` (:class:`~loralib.adapter.AdapterModule`): its dense ``ΔW``
(``delta``), ``ΔW`` applied to vectors from the factors (``apply``), and an exact low-rank form
``coefficient · up @ down`` where one exists (``low_rank``), so merging, resizing and conversion to
plain LoRA never need a dense matrix for LoHa and LoKr. :func:`loralib.compose.plain.to_lora`
(``loralib.to_lora``) turns any adapter into a plain LoRA, optimally at a chosen rank; the spectra
behind it are in :mod:`loralib.compose.spectra`. :mod:`loralib.lycoris.synthetic` makes random
modules laid out as LyCORIS lays them out.

This package imports torch only in the modules that hold tensors; :mod:`loralib.formats.lycoris`
reads the files' headers without it.
"""

from __future__ import annotations

KIND_TITLES: dict[str, str] = {
    "lora": "LoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "full": "full-rank difference",
    "norm": "norm-layer difference",
    "bias": "bias difference",
    "dora": "DoRA",
}
"""Each module kind's name for people, by kind id (the ``kind`` of every module class)."""

__all__ = ["KIND_TITLES"]
