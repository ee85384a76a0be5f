"""Tell what a tensor file holds from its key names and shapes alone (no tensors are read).

Plain LoRA formats (those in :mod:`loralib.formats.table`) are read by lorareg, for every model
family (SD1.x/SD2.x/SDXL, Flux.1, SD3/SD3.5): each key counts for the first format spelling it
matches, and a format that reads every key wins. Other adapter kinds (LyCORIS LoHa/LoKr/DoRA/…,
Flux Control LoRAs), textual inversions and full model weights are recognised and named, so
that an operation which needs plain LoRA factors can say exactly what it was given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from .base import Format, Kind
from .table import FORMATS

_LYCORIS = [  # (tensor-name pattern, kind); the first that matches any key wins
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), Kind("lycoris-loha", "LyCORIS LoHa", False)),
    (re.compile(r"\.lokr_w[12](_[ab])?$"), Kind("lycoris-lokr", "LyCORIS LoKr", False)),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R)$"), Kind("lycoris-oft", "LyCORIS OFT/BOFT", False)),
    (re.compile(r"\.[ab][12]\.weight$"), Kind("lycoris-glora", "LyCORIS GLoRA", False)),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.\w+)?(\.weight)?)$"), Kind("lycoris-dora", "DoRA (weight-decomposed LoRA)", False)),
    (re.compile(r"\.(diff|diff_b)$"), Kind("lycoris-full", "LyCORIS full-rank difference", False)),
    (re.compile(r"\.(w_norm|b_norm)$"), Kind("lycoris-norm", "LyCORIS norm-layer adapter", False)),
    (re.compile(r"\.on_input$"), Kind("lycoris-ia3", "(IA)³ adapter", False)),
]
# Adapters that are not LoRA factors alone: a Flux Control LoRA (BFL) also trains biases and norm scales.
_OTHER_KINDS = [
    (re.compile(r"(\.lora_B\.bias|_norm\.scale)$"), Kind("flux-control", "Flux Control LoRA (BFL: with biases and norm scales)", False)),
]
_CHECKPOINT = re.compile(r"^(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders|"
                         r"model_ema|text_encoders?\.\w+\.transformer)\.")
_MODEL_WEIGHTS = re.compile(r"^(down_blocks|up_blocks|mid_block|encoder\.down_blocks|decoder\.up_blocks|"
                            r"text_model\.encoder|encoder\.layers|encoder\.block|(model\.diffusion_model\.)?(double_blocks|"
                            r"single_blocks|joint_blocks)|transformer_blocks|single_transformer_blocks)\.[\w.]+\.(weight|bias|scale)$")
_TI_NAMES = {"emb_params", "string_to_param", "string_to_param.*", "clip_l", "clip_g", "*"}
_LORA_HINT = re.compile(r"lora|\.alpha$|:(up|down)$|hada_|lokr_|dora_|oft_")

_LYCORIS_ANY = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _LYCORIS))


def identify(names: list[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> Kind | None:
    """Name what a file with these tensors holds; None when nothing matches.

    ``names`` are tensor names, ``shapes`` their shapes, ``metadata`` the file's string metadata.
    A format whose spellings cover every key wins over anything else, so an adapter is never
    taken for a checkpoint; among formats, see :func:`best_format`.
    """
    if not names:
        return None
    lycoris = None
    if any(_LYCORIS_ANY.search(n) for n in names):
        lycoris = next(kind for pattern, kind in _LYCORIS for n in names if pattern.search(n))
    match = best_format(names)
    if match is not None and match.complete:
        return match.kind
    if lycoris is not None:
        return lycoris
    other = next((kind for pattern, kind in _OTHER_KINDS for n in names if pattern.search(n)), None)
    if other is not None:
        return other
    if any(_CHECKPOINT.match(n) for n in names):
        return Kind("checkpoint", "full model checkpoint (not an adapter)", False)
    if match is not None:
        return match.kind
    if _is_textual_inversion(names, shapes):
        return Kind("textual-inversion", "textual-inversion embedding (not a LoRA)", False)
    if all(_MODEL_WEIGHTS.match(n) for n in names):
        return Kind("checkpoint", "model weights (not an adapter)", False)
    return None


@dataclass(frozen=True)
class FormatMatch:
    """The format that reads most of a file's keys, the kind of file it makes of them, and whether
    it reads every key."""

    format: Format
    kind: Kind
    keys: int
    complete: bool


def best_format(names: list[str]) -> FormatMatch | None:
    """The table format that reads a file with these tensor names best, or None if none reads any.

    A format reads a key when one of its spellings matches it. A format that reads every key wins
    (the first in table order, so PEFT before diffusers, whose spelling also matches PEFT keys);
    otherwise the one that reads the most. Its kind is the spelling that matched most keys.
    """
    best: FormatMatch | None = None
    for fmt in FORMATS:
        per_kind: Counter[Kind] = Counter()
        for name in names:
            kind = next((kind for kind, pattern in fmt.spellings if pattern.match(name)), None)
            if kind is not None:
                per_kind[kind] += 1
        read = sum(per_kind.values())
        if not read:
            continue
        match = FormatMatch(fmt, per_kind.most_common(1)[0][0], read, read == len(names))
        if match.complete:
            return match
        if best is None or read > best.keys:
            best = match
    return best


def _is_textual_inversion(names: list[str], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    if len(names) > 16 or any(_LORA_HINT.search(n) for n in names):
        return False
    return all(n in _TI_NAMES or n.startswith("string_to_param.")
               or ("." not in n and len(shapes[n]) in (1, 2) and shapes[n][-1] in (768, 1024, 1280)) for n in names)


def looks_like_broken_lora(names: list[str]) -> list[str]:
    """Keys that look LoRA-like but match no known spelling (for a precise error message)."""
    return [n for n in names if _LORA_HINT.search(n)]
