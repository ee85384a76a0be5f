"""Module names: lorareg's internal keys, kohya's flattened names, SGM, BFL and MMDiT block names.

Inside lorareg every adapted module is keyed ``<component>.<module path>``, where the component
is the diffusers pipeline component (``unet``, ``transformer``, ``text_encoder``,
``text_encoder_2``, ``text_encoder_3``) and the path is the module's dotted path in the
diffusers/transformers model. CLIP text-encoder paths always start with ``text_model.`` (the
spelling every LoRA tool writes, whether or not the installed transformers nests its CLIP
model that way). T5 encoder paths are ``T5EncoderModel``'s own (``encoder.block.0.layer.0.
SelfAttention.q``): every tool writes them that way. Files that fuse several of these modules
into one (Flux's ``qkv``) are split on reading and fused on writing; see
:mod:`loralib.naming.flux` and :mod:`loralib.naming.sd3`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..architectures import TEXT_ENCODERS

TE_ROOT = "text_model"
# First segments of T5EncoderModel module paths; CLIP paths start otherwise.
T5_ROOTS = ("encoder.block.", "encoder.final_layer_norm", "encoder.embed_tokens", "shared")


def is_t5_path(path: str) -> bool:
    """True for a module path of a T5 encoder (``encoder.block.…``)."""
    return path.startswith(T5_ROOTS)


def internal_key(component: str, path: str) -> str:
    """The internal key of a component's module path: ``unet.<path>``, and for CLIP text encoders
    ``text_encoder.text_model.<path>`` whether or not ``path`` already starts with ``text_model.``."""
    if component in TEXT_ENCODERS and not path.startswith(TE_ROOT + ".") and path != "text_projection" \
            and not is_t5_path(path):
        path = f"{TE_ROOT}.{path}"
    return f"{component}.{path}"


@dataclass(frozen=True)
class Target:
    """What one module name in a file stands for: one or more internal modules.

    A file that fuses layers (Flux's ``img_attn.qkv``) names one module for several internal
    ones: ``keys`` in the order of their rows, ``units`` the row count of each as a multiple of
    the layer's input width (``(1, 1, 1)`` for q, k, v; ``(1, 1, 1, 4)`` when Flux's MLP input
    follows). ``swap`` says the file stores the rows with their two halves exchanged (the
    shift/scale order of BFL's and SAI's final modulation layers).
    """

    keys: tuple[str, ...]
    units: tuple[int, ...] = (1,)
    swap: bool = False

    @property
    def key(self) -> str | None:
        """The internal key when the name stands for exactly one module stored as it is, else None."""
        return self.keys[0] if len(self.keys) == 1 and not self.swap else None

    @property
    def fused(self) -> bool:
        """True when the name stands for several modules."""
        return len(self.keys) > 1

    def rows(self, out_features: int, in_features: int) -> list[tuple[int, int]] | None:
        """The row range of each key in a fused layer of this shape, or None if the shape does not fit."""
        if not self.fused:
            return [(0, out_features)]
        if out_features != sum(self.units) * in_features:
            return None
        ranges, start = [], 0
        for unit in self.units:
            ranges.append((start, start + unit * in_features))
            start += unit * in_features
        return ranges
