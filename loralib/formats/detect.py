"""Tell what a tensor file holds from its key names and shapes alone (no tensors are read).

Plain LoRA formats (kohya, PEFT, diffusers in its three generations, cloneofsimo) are read by
lorareg. Other adapter kinds (LyCORIS LoHa/LoKr/DoRA/…), adapters for other model families
(Flux, SD3), textual inversions and full checkpoints are recognised and named, so that an
operation which needs plain LoRA factors can say exactly what it was given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """What a file holds."""

    format: str
    title: str
    plain_lora: bool
    family: str | None = None  # "flux" or "sd3" for adapters of other model families

    @property
    def is_adapter(self) -> bool:
        """True for any kind of adapter (plain LoRA or not); False for embeddings and checkpoints."""
        return self.format not in ("textual-inversion", "checkpoint")


KOHYA = Kind("kohya", "kohya-ss LoRA", True)
PEFT = Kind("peft", "PEFT LoRA", True)
DIFFUSERS = Kind("diffusers", "diffusers LoRA", True)
DIFFUSERS_OLD = Kind("diffusers-old", "diffusers 0.21-era LoRA (lora.down/lora.up)", True)
ATTN_PROCS = Kind("diffusers-attnprocs", "diffusers attention-processor LoRA (to_q_lora)", True)
CLONEOFSIMO = Kind("cloneofsimo", "cloneofsimo lora_diffusion LoRA", True)

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
_LORA_HINT = re.compile(r"lora|\.alpha$|:(up|down)$|hada_|lokr_|dora_|oft_")

KOHYA_KEY = re.compile(r"^(lora_(?:unet|te|te1|te2)_\w+)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)$")
PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
DIFFUSERS_KEY = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.lora_([AB])(?:\.default(?:_\d+)?)?\.weight$")
DIFFUSERS_OLD_KEY = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
ATTN_PROC_KEY = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)\.(?:processor\.)?"
                           r"(to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\.(down|up)\.weight$")
CLONEOFSIMO_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
# The key spellings of the plain formats, most specific first (a PEFT key also reads as diffusers).
_SPELLINGS = {KOHYA: KOHYA_KEY, PEFT: PEFT_KEY, ATTN_PROCS: ATTN_PROC_KEY, DIFFUSERS_OLD: DIFFUSERS_OLD_KEY,
              DIFFUSERS: DIFFUSERS_KEY}


# Words without which none of the foreign-family patterns can match: a substring test over all
# names is a hundred times faster than the patterns, which then run only where one is present.
_FOREIGN_WORDS = ("double_blocks", "single_blocks", "single_transformer_blocks", "x_embedder", "guidance_in", "img_in",
                  "txt_in", "joint_blocks", "context_block", "x_block", "pos_embed", "lora_te3_", "lora_transformer_",
                  "add_q_proj", "add_k_proj", "add_v_proj", "ff_context", "norm1_context")
_LYCORIS_ANY = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _LYCORIS))


def _family(names: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    text = "\n".join(names)
    if not any(word in text for word in _FOREIGN_WORDS):
        return None
    if any(_FLUX.search(n) for n in names):
        return "flux"
    if any(_SD3.search(n) for n in names):
        return "sd3"
    if any(_MMDIT.search(n) for n in names):
        widths = {shapes[n][-1] for n in names if re.search(r"(lora_A|lora\.down|lora_down)\.weight$", n)}
        return "sd3" if widths and 3072 not in widths else "flux"
    return None


def identify(names: list[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> Kind | None:
    """Name what a file with these tensors holds; None when nothing matches.

    ``names`` are tensor names, ``shapes`` their shapes, ``metadata`` the file's string metadata.
    """
    if not names:
        return None
    family = _family(names, shapes)
    lycoris = None
    if any(_LYCORIS_ANY.search(n) for n in names):
        lycoris = next(kind for pattern, kind in _LYCORIS for n in names if pattern.search(n))
    if family is not None:
        title = {"flux": "Flux.1", "sd3": "Stable Diffusion 3"}[family]
        if any(_LORA_HINT.search(n) for n in names):
            what = lycoris.title if lycoris else "LoRA"
            return Kind(f"{family}-adapter", f"{title} {what}", False, family)
        return Kind("checkpoint", f"{title} model weights (not an adapter)", False, family)
    if lycoris is not None:
        return lycoris
    if any(_CHECKPOINT.match(n) for n in names):
        return Kind("checkpoint", "full Stable Diffusion checkpoint (not an adapter)", False)
    if all(CLONEOFSIMO_KEY.match(n) or metadata.get(n) == "<embed>" for n in names) and any(CLONEOFSIMO_KEY.match(n) for n in names):
        return CLONEOFSIMO
    counts = dict.fromkeys(_SPELLINGS, 0)
    for name in names:  # each key counts for the first spelling it matches, in the order of _SPELLINGS
        kind = next((kind for kind, pattern in _SPELLINGS.items() if pattern.match(name)), None)
        if kind is not None:
            counts[kind] += 1
    best = max(counts, key=counts.get)  # ties resolve in the order of _SPELLINGS
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
