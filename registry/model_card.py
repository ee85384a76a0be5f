"""The README.md (model card) that ``push`` uploads with an adapter.

YAML front matter the Hub reads (``base_model``, ``library_name``, ``license``,
``instance_prompt``, ``tags``, ``widget``) and a body that says how to load the adapter in
diffusers, ComfyUI and AUTOMATIC1111, its trigger words, lineage, training settings and hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loralib.inspection import architecture_title, metadata_summary
from loralib.version import TOOL

from .records import Entry

BASE_MODELS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
               "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "flux": "black-forest-labs/FLUX.1-dev",
               "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
               "sd35-medium": "stabilityai/stable-diffusion-3.5-medium", "sd35-large": "stabilityai/stable-diffusion-3.5-large"}
# Flux.1 dev and SD3/SD3.5 have their own licenses, which the Hub lists as "other".
LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++", "flux": "other", "sd3": "other",
            "sd35-medium": "other", "sd35-large": "other"}
# The tags diffusers' own training scripts give each family's LoRAs.
ARCHITECTURE_TAGS = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl", "flux": "flux",
                     "sd3": "sd3", "sd35-medium": "sd3", "sd35-large": "sd3"}
# Consumers that load a kohya file of each family (A1111 has no Flux or SD3 support).
UIS = {"flux": "ComfyUI and Forge", "sd3": "ComfyUI and Forge", "sd35-medium": "ComfyUI and Forge",
       "sd35-large": "ComfyUI and Forge"}
STANDARD_TAGS = ("text-to-image", "diffusers", "lora", "template:sd-lora")


@dataclass
class CardInputs:
    """Everything a model card shows besides the catalog entry."""

    repo_id: str
    weight_name: str
    hashes: dict[str, str]
    lineage: list[str] = field(default_factory=list)
    widget: list[dict] = field(default_factory=list)
    extra_layouts: list[str] = field(default_factory=list)
    base_model: str | None = None
    license: str | None = None


def local_base(entry: Entry) -> str | None:
    """The local base model the training metadata names (a file or folder, not a Hub id), or None."""
    trained_on = entry.metadata.get("ss_sd_model_name", "").strip()
    if not trained_on or _hub_id(trained_on):
        return None
    return trained_on


def _hub_id(text: str) -> bool:
    from loralib.hub_ids import is_repo_ref

    return (is_repo_ref(text) and not text.endswith((".safetensors", ".ckpt")) and not text.startswith((".", "/", "~"))
            and "\\" not in text)


def base_model_for(entry: Entry, override: str | None = None) -> str | None:
    """The Hub id of the base model: the override, a Hub id in the training metadata, or — when the
    metadata names no base at all — the architecture's usual base. None when training used a local
    base model (a file or folder): the card then names it in its text instead of guessing a Hub id."""
    if override:
        return override
    trained_on = entry.metadata.get("ss_sd_model_name", "").strip()
    if trained_on:
        return trained_on if _hub_id(trained_on) else None
    return BASE_MODELS.get(entry.architecture or "")


def front_matter(entry: Entry, inputs: CardInputs) -> dict:
    """The YAML metadata block as a dictionary (keys without a value are left out)."""
    tags = [*STANDARD_TAGS]
    if entry.architecture in ARCHITECTURE_TAGS:
        tags.append(ARCHITECTURE_TAGS[entry.architecture])
    tags += [t for t in entry.tags if t not in tags]
    data = {
        "base_model": base_model_for(entry, inputs.base_model),
        "library_name": "diffusers",
        "license": inputs.license or LICENSES.get(entry.architecture or "", "other"),
        "instance_prompt": entry.triggers[0] if entry.triggers else None,
        "tags": tags,
        "widget": inputs.widget or None,
    }
    return {k: v for k, v in data.items() if v is not None}


def _yaml(data: dict) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**data).to_yaml()


def _code(text: str) -> str:
    """``text`` as inline code, safe whatever backticks it holds."""
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def model_card(entry: Entry, inputs: CardInputs) -> str:
    """The full README.md text."""
    meta = front_matter(entry, inputs)
    title = entry.title or entry.name
    stem = inputs.weight_name.rsplit(".", 1)[0]
    prompt = entry.triggers[0] if entry.triggers else "a photo"
    lines = ["---", _yaml(meta).rstrip(), "---", "", f"# {title}", ""]
    if entry.description:
        lines += [entry.description, ""]
    local = local_base(entry) if not meta.get("base_model") else None
    lines += [f"A LoRA adapter for {architecture_title(entry.architecture or 'unknown')}"
              + (f" (`{meta['base_model']}`)" if meta.get("base_model") else "")
              + (f", trained on a local base model, {_code(Path(local).name or local)}" if local else "") + ".", ""]
    if entry.triggers:
        lines += ["## Trigger words", "", "Use these words in the prompt:", ""]
        lines += [f"- {_code(t)}" for t in entry.triggers] + [""]
    lines += ["## Use it with diffusers", "", "```python", "import torch",
              "from diffusers import AutoPipelineForText2Image", "",
              f"pipe = AutoPipelineForText2Image.from_pretrained({meta.get('base_model', 'BASE_MODEL')!r}, "
              "torch_dtype=torch.float16).to(\"cuda\")",
              f"pipe.load_lora_weights({inputs.repo_id!r}, weight_name={inputs.weight_name!r})",
              f"image = pipe({prompt!r}).images[0]", "```", ""]
    uis = UIS.get(entry.architecture or "", "ComfyUI, AUTOMATIC1111 and Forge")
    webui = "Forge's" if "AUTOMATIC1111" not in uis else "the web UI's"
    lines += [f"## Use it in {uis}", "",
              f"Download [`{inputs.weight_name}`](./{inputs.weight_name}) (kohya format) into `ComfyUI/models/loras/` "
              f"and load it with a **LoraLoader** node, or into {webui} `models/Lora/` and write "
              f"{_code(f'<lora:{stem}:1>')} in the prompt.", ""]
    if inputs.extra_layouts:
        lines += ["## Other layouts", ""]
        if "diffusers" in inputs.extra_layouts:
            lines.append("- `diffusers/pytorch_lora_weights.safetensors`: diffusers key names "
                         f"(`pipe.load_lora_weights({inputs.repo_id!r}, subfolder=\"diffusers\")`).")
        if "peft" in inputs.extra_layouts:
            denoiser = "transformer" if entry.architecture in UIS else "unet"
            lines.append(f"- `peft/`: a PEFT `save_pretrained` folder ({denoiser} at the top, text encoders in subfolders), "
                         f"for `PeftModel.from_pretrained(pipe.{denoiser}, {inputs.repo_id!r}, subfolder=\"peft\")`.")
        if "comfyui" in inputs.extra_layouts:
            lines.append(f"- `comfyui/{inputs.weight_name}`: ComfyUI's own key names (`diffusion_model.…`, "
                         "`text_encoders.…`), as its Save LoRA node writes them.")
        lines.append("")
    lines += ["## Details", "", "| | |", "|---|---|",
              f"| architecture | {architecture_title(entry.architecture or 'unknown')} |",
              f"| modules | {entry.modules} ({', '.join(f'{k} {v}' for k, v in entry.components.items())}) |",
              f"| rank | {entry.rank_text} |",
              f"| alpha | {', '.join(entry.alphas) or '—'} |",
              f"| dtype | {entry.dtype or '—'} |", ""]
    training = {k: v for k, v in metadata_summary(entry.metadata).items() if k.startswith("ss_")}
    if training:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')[:200]} |" for k, v in training.items()] + [""]
    if len(inputs.lineage) > 1:
        lines += ["## Lineage", "", "How this adapter was made (newest first):", "", "```", *inputs.lineage, "```", ""]
    lines += [f"## Hashes of `{inputs.weight_name}`", "", "| hash | value |", "|---|---|"]
    labels = {"sha256": "SHA-256", "autov2": "AutoV2 (Civitai)", "tensor_sha256": "tensor SHA-256 (AutoV3, sshs_model_hash)",
              "a1111": "A1111 LoRA hash", "legacy": "legacy (AutoV1)"}
    lines += [f"| {label} | `{inputs.hashes[key]}` |" for key, label in labels.items() if inputs.hashes.get(key)]
    lines += ["", f"Published with {TOOL}.", ""]
    return "\n".join(lines)
