"""Tell what a tensor file holds from its key names and shapes alone (no tensors are read).

Plain LoRA formats (those in :mod:`loralib.formats.table`) are read by lorareg: each key counts
for the first format spelling it matches, and the most counted wins. Other adapter kinds
(LyCORIS LoHa/LoKr/DoRA/…), adapters for other model families (Flux, SD3), textual inversions
and full checkpoints are recognised and named, so that an operation which needs plain LoRA
factors can say exactly what it was given.
"""

from __future__ import annotations

import functools
import operator
import re
from collections import Counter
from collections.abc import Mapping

from .base import Kind
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
_FLUX = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|x_embedder|guidance_in|img_in|txt_in)[._]")
_SD3 = re.compile(r"(^|[._])(joint_blocks|context_block|x_block|pos_embed)[._]")
# Keys both MMDiT families share (Flux and SD3 differ in width: Flux is 3072 wide).
_MMDIT = re.compile(r"^lora_(te3|transformer)_|(^|\.)transformer_blocks\.\d+\.(attn\.add_[qkv]_proj|ff_context|norm1_context)")
_CHECKPOINT = re.compile(r"^(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders|"
                         r"model_ema|text_encoders?\.\w+\.transformer)\.")
_MODEL_WEIGHTS = re.compile(r"^(down_blocks|up_blocks|mid_block|encoder\.down_blocks|decoder\.up_blocks|"
                            r"text_model\.encoder|encoder\.layers)\.[\w.]+\.(weight|bias)$")
_TI_NAMES = {"emb_params", "string_to_param", "string_to_param.*", "clip_l", "clip_g", "*"}
SAMPLE_KEYS = 50_000  # keys examined to tell what a file holds (every key of any real adapter)
_LORA_HINT = re.compile(r"lora|\.alpha$|:(up|down)$|hada_|lokr_|dora_|oft_")

# Words without which none of the foreign-family patterns can match: a substring test over all
# names is a hundred times faster than the patterns, which then run only where one is present.
_FOREIGN_WORDS = ("double_blocks", "single_blocks", "single_transformer_blocks", "x_embedder", "guidance_in", "img_in",
                  "txt_in", "joint_blocks", "context_block", "x_block", "pos_embed", "lora_te3_", "lora_transformer_",
                  "add_q_proj", "add_k_proj", "add_v_proj", "ff_context", "norm1_context")
_LYCORIS_ANY = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _LYCORIS))
# The same tests over all names joined by newlines: one search instead of one per name.
_LYCORIS_IN_TEXT = re.compile(_LYCORIS_ANY.pattern, re.MULTILINE)
_CHECKPOINT_IN_TEXT = re.compile(r"^(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders|"
                                 r"model_ema|text_encoders?\.\w+\.transformer)\.", re.MULTILINE)


@functools.cache
def _spellings() -> tuple[dict[str, Kind], re.Pattern[str]]:
    """Every format's key spellings in table order, and one pattern matching any of them whose
    ``lastgroup`` names the first that matches."""
    spellings = [spelling for fmt in FORMATS for spelling in fmt.spellings]
    kinds = {f"s{i}": kind for i, (kind, _) in enumerate(spellings)}
    combined = re.compile("|".join(f"(?P<s{i}>{pattern.pattern})" for i, (_, pattern) in enumerate(spellings)))
    return kinds, combined


def _family(names: list[str], shapes: Mapping[str, tuple[int, ...]], text: str) -> str | None:
    if not any(word in text for word in _FOREIGN_WORDS):
        return None
    if any(_FLUX.search(n) for n in names):
        return "flux"
    if any(_SD3.search(n) for n in names):
        return "sd3"
    if any(_MMDIT.search(n) for n in names):
        widths = {shapes[n][-1] for n in names if shapes[n] and re.search(r"(lora_A|lora\.down|lora_down)\.weight$", n)}
        return "sd3" if widths and 3072 not in widths else "flux"
    return None


def identify(names: list[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> Kind | None:
    """Name what a file with these tensors holds; None when nothing matches.

    ``names`` are tensor names, ``shapes`` their shapes, ``metadata`` the file's string metadata.
    """
    if not names:
        return None
    # A real adapter has a few thousand keys, all examined; a crafted header may list hundreds of
    # thousands, of which an even sample is (the reader then checks every key of the format chosen).
    names = names[::max(1, len(names) // SAMPLE_KEYS)]
    text = "\n".join(names)
    family = _family(names, shapes, text)
    lycoris = None
    if _LYCORIS_IN_TEXT.search(text) and any(_LYCORIS_ANY.search(n) for n in names):
        lycoris = next(kind for pattern, kind in _LYCORIS for n in names if pattern.search(n))
    if family is not None:
        title = {"flux": "Flux.1", "sd3": "Stable Diffusion 3"}[family]
        if any(_LORA_HINT.search(n) for n in names):
            what = lycoris.title if lycoris else "LoRA"
            return Kind(f"{family}-adapter", f"{title} {what}", False, family)
        return Kind("checkpoint", f"{title} model weights (not an adapter)", False, family)
    if lycoris is not None:
        return lycoris
    if _CHECKPOINT_IN_TEXT.search(text) and any(_CHECKPOINT.match(n) for n in names):
        return Kind("checkpoint", "full Stable Diffusion checkpoint (not an adapter)", False)
    kinds, combined = _spellings()
    # Each key counts for the first spelling it matches, in table order: one alternation of all
    # spellings does that in a single match per key.
    found = Counter(map(operator.attrgetter("lastgroup"), filter(None, map(combined.match, names))))
    counts = {kind: 0 for kind in kinds.values()}
    for group, count in found.items():
        counts[kinds[group]] += count
    best = max(counts, key=counts.get)  # ties resolve in table order
    if counts[best]:
        return best
    if _is_textual_inversion(names, shapes):
        return Kind("textual-inversion", "textual-inversion embedding (not a LoRA)", False)
    if all(_MODEL_WEIGHTS.match(n) for n in names):
        return Kind("checkpoint", "model weights (not an adapter)", False)
    return None


def _is_textual_inversion(names: list[str], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    if len(names) > 16 or any(_LORA_HINT.search(n) for n in names):
        return False
    return all(n in _TI_NAMES or n.startswith("string_to_param.")
               or ("." not in n and len(shapes[n]) in (1, 2) and shapes[n][-1] in (768, 1024, 1280)) for n in names)


def looks_like_broken_lora(names: list[str]) -> list[str]:
    """Keys that look LoRA-like but match no known spelling (for a precise error message)."""
    return [n for n in names if _LORA_HINT.search(n)]
