"""Tell what a tensor file holds from its key names and shapes alone (no tensors are read).

The formats of :mod:`loralib.formats.table` are read by lorareg, for every model family
(SD1.x/SD2.x/SDXL, Flux.1, SD3/SD3.5): plain LoRA in every spelling, and LyCORIS/DoRA in kohya
names (SD1.x/SD2.x/SDXL; Flux.1 and SD3/SD3.5 in kohya names or their original BFL / MMDiT paths).
Each key counts for the first format spelling it matches, and a format that reads every key wins.
Adapter kinds lorareg does not apply (LyCORIS OFT/BOFT, GLoRA, (IA)³, Flux/SD3 LyCORIS in other
spellings, Flux Control LoRAs), textual inversions and full model weights are
recognised and named, so that an operation can say exactly what it was given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from ..architectures import FLUX_FAMILY, SD3_FAMILY
from ..naming.kohya import family_of_names
from . import lycoris
from .base import Format, Kind
from .table import FORMATS

# Adapter kinds recognised but not applied: (tensor-name pattern, kind); the first that matches any key wins.
_UNSUPPORTED = [
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R)$"), Kind("lycoris-oft", "LyCORIS OFT/BOFT adapter", False)),
    (re.compile(r"\.[ab][12]\.weight$"), Kind("lycoris-glora", "LyCORIS GLoRA adapter", False)),
    (re.compile(r"\.on_input$"), Kind("lycoris-ia3", "(IA)³ adapter", False)),
]
# What names an adapter kind in any spelling: LyCORIS suffixes, then the above.
_SUFFIX_KINDS = [
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), lycoris.LOHA),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t2)$"), lycoris.LOKR),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.\w+)?(\.weight)?)$"), lycoris.DORA),
    (re.compile(r"\.(diff|diff_b)$"), lycoris.FULL),
    (re.compile(r"\.(w_norm|b_norm)$"), lycoris.NORM),
    *_UNSUPPORTED,
]
# Adapters that are not LoRA factors alone: a Flux Control LoRA (BFL) also trains biases and norm scales.
_OTHER_KINDS = [
    (re.compile(r"(\.lora_B\.bias|_norm\.scale)$"), Kind("flux-control", "Flux Control LoRA (BFL: with biases and norm scales)", False)),
]
_FAMILY_TITLES = {FLUX_FAMILY: "Flux.1", SD3_FAMILY: "Stable Diffusion 3"}
_FLUX_WORDS = ("double_blocks", "single_blocks", "single_transformer_blocks")
# Every kind detection names besides the formats lorareg reads (what the catalog may record as a format).
FOREIGN_KINDS: tuple[str, ...] = (*(kind.format for _, kind in _UNSUPPORTED), *(kind.format for _, kind in _OTHER_KINDS),
                                  *(f"{family}-lycoris" for family in _FAMILY_TITLES))
_CHECKPOINT = re.compile(r"^(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders|"
                         r"model_ema|text_encoders?\.\w+\.transformer)\.")
_MODEL_WEIGHTS = re.compile(r"^(down_blocks|up_blocks|mid_block|encoder\.down_blocks|decoder\.up_blocks|"
                            r"text_model\.encoder|encoder\.layers|encoder\.block|(model\.diffusion_model\.)?(double_blocks|"
                            r"single_blocks|joint_blocks)|transformer_blocks|single_transformer_blocks)\.[\w.]+\.(weight|bias|scale)$")
_TI_NAMES = {"emb_params", "string_to_param", "string_to_param.*", "clip_l", "clip_g", "*"}
SAMPLE_KEYS = 50_000  # keys examined to tell what a file holds (every key of any real adapter)
_LORA_HINT = re.compile(r"lora|\.alpha$|:(up|down)$|hada_|lokr_|dora_|oft_")

_KIND_ANY = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _SUFFIX_KINDS))
# The same tests over all names joined by newlines: one search instead of one per name.
_KIND_IN_TEXT = re.compile(_KIND_ANY.pattern, re.MULTILINE)
_CHECKPOINT_IN_TEXT = re.compile(_CHECKPOINT.pattern, re.MULTILINE)


def name_family(names: list[str]) -> str | None:
    """``flux`` or ``sd3`` when the names are those of a Flux.1 or SD3 model's modules, else None."""
    family = family_of_names(names)
    if family is None:
        text = "\n".join(names)
        family = FLUX_FAMILY if any(w in text for w in _FLUX_WORDS) else SD3_FAMILY if "joint_blocks" in text else None
    return family


def identify(names: list[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> Kind | None:
    """Name what a file with these tensors holds; None when nothing matches.

    ``names`` are tensor names, ``shapes`` their shapes, ``metadata`` the file's string metadata.
    A format whose spellings cover every key wins over anything else, so an adapter is never
    taken for a checkpoint; among formats, see :func:`best_format`.
    """
    if not names:
        return None
    # A real adapter has a few thousand keys, all examined; a crafted header may list hundreds of
    # thousands, of which an even sample is (the reader then checks every key of the format chosen).
    names = names[::max(1, len(names) // SAMPLE_KEYS)]
    text = "\n".join(names)
    special = None
    if _KIND_IN_TEXT.search(text):
        special = next(kind for pattern, kind in _SUFFIX_KINDS for n in names if pattern.search(n))
    match = best_format(names)
    if special is not None and (match is None or not match.complete or match.format is lycoris.FORMAT):
        family = name_family(names)
        read = match is not None and match.complete  # LyCORIS reads Flux.1's and SD3's kohya and original names
        if family is not None and not read:  # other spellings are not read
            return Kind(f"{family}-lycoris", f"{_FAMILY_TITLES[family]} {special.title}", False)
    if match is not None and match.complete:  # a key of a named kind (LoKr, DoRA, …) names the file
        return special if special in match.format.kinds else match.kind
    unsupported = (special and next((kind for pattern, kind in _UNSUPPORTED for n in names if pattern.search(n)), None)) \
        or next((kind for pattern, kind in _OTHER_KINDS for n in names if pattern.search(n)), None)
    if unsupported is not None:
        return unsupported
    if _CHECKPOINT_IN_TEXT.search(text):
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
