"""Random adapters and dense references for the composition tests."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loralib.adapter import LoraAdapter, LoraModule
from loralib.base_model import LayerShape
from loralib.synthetic import random_module

# Layer shapes of a small model: Linear layers, a 3×3 conv (LoCon) and a 1×1 conv projection.
SMALL_LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LayerShape(40, 32, None),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": LayerShape(32, 96, None),
    "unet.down_blocks.0.resnets.0.conv1": LayerShape(24, 16, (3, 3)),
    "unet.down_blocks.0.attentions.0.proj_in": LayerShape(32, 32, (1, 1)),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LayerShape(48, 48, None),
}
# Half the widths of SD1.5's first block (attention 320, feed-forward 320 -> 2560, a 3x3 conv).
MEDIUM_LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LayerShape(320, 320, None),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": LayerShape(2560, 320, None),
    "unet.down_blocks.1.resnets.0.conv1": LayerShape(320, 160, (3, 3)),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": LayerShape(1536, 384, None),
}


def adapter(layers: dict[str, LayerShape], rank: int, alpha: float, seed: int, *, mid_keys: tuple[str, ...] = (),
            skip: tuple[str, ...] = (), dtype: torch.dtype = torch.float32, decay: float = 0.8) -> LoraAdapter:
    """A random adapter over ``layers`` (minus ``skip``), CP-decomposed on ``mid_keys``."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key, shape in layers.items():
        if key in skip:
            continue
        modules[key] = random_module(shape, rank, alpha, decay=decay, mid=key in mid_keys, generator=generator,
                                     dtype=dtype)
    return LoraAdapter(modules, "unknown")


def dense(module: LoraModule) -> torch.Tensor:
    """``scale · up @ down`` in float64, as a matrix ``[out, in·kh·kw]``."""
    up, down = module.factors(torch.float64)
    return module.scale * (up @ down)


def weighted_sum(inputs: list[tuple[LoraAdapter, float]], key: str) -> torch.Tensor:
    """The dense ``Σ w_i ΔW_i`` of one module (inputs without it contribute nothing)."""
    return sum(weight * dense(a.modules[key]) for a, weight in inputs if key in a.modules)


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖value − reference‖_F / ‖reference‖_F``."""
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    """The error of the best rank-``rank`` approximation, from a dense SVD."""
    s = torch.linalg.svdvals(matrix.double())
    return float(s[rank:].norm())


def with_spectrum(singular_values: list[float], out: int, inp: int, seed: int = 0) -> LoraModule:
    """A Linear module whose ``ΔW`` has exactly these singular values (alpha = rank, scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    r = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, r, generator=generator, dtype=torch.float64))
    s = torch.tensor(singular_values, dtype=torch.float64)
    return LoraModule((v * s.sqrt()).T.contiguous(), (u * s.sqrt()).contiguous(), float(r))


def single_file_checkpoint(folder, target):
    """Write a diffusers pipeline folder as one checkpoint in Stability's original key layout.

    UNet under ``model.diffusion_model.`` with SGM names; CLIP text encoders under
    ``cond_stage_model.transformer.`` (SD1) or ``conditioner.embedders.0.transformer.`` (SDXL);
    SDXL's second encoder in OpenCLIP form (q, k, v stacked in ``in_proj_weight``). The tests
    check this layout against diffusers' own single-file converters.
    """
    import json

    from safetensors.torch import load_file, save_file

    from loralib.naming.sgm import UNetLayout, diffusers_to_sgm

    layout = UNetLayout.from_config(json.loads((folder / "unet" / "config.json").read_text()))
    out = {}
    for name, tensor in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        out["model.diffusion_model." + diffusers_to_sgm(name, layout)] = tensor
    sdxl = (folder / "text_encoder_2").is_dir()
    prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for name, tensor in load_file(folder / "text_encoder" / "model.safetensors").items():
        out[prefix + (name if name.startswith("text_model.") else "text_model." + name)] = tensor
    if sdxl:
        te2 = {k.removeprefix("text_model."): v
               for k, v in load_file(folder / "text_encoder_2" / "model.safetensors").items()}
        p = "conditioner.embedders.1.model."
        for i in sorted({int(k.split(".")[2]) for k in te2 if k.startswith("encoder.layers.")}):
            src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat([te2[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
                for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                     ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[dst + f"{theirs}.{kind}"] = te2[src + f"{ours}.{kind}"]
        out[p + "ln_final.weight"] = te2["final_layer_norm.weight"]
        out[p + "ln_final.bias"] = te2["final_layer_norm.bias"]
        out[p + "token_embedding.weight"] = te2["embeddings.token_embedding.weight"]
        out[p + "positional_embedding"] = te2["embeddings.position_embedding.weight"]
        out[p + "text_projection"] = te2["text_projection.weight"].T.contiguous()
    for name, tensor in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        out["first_stage_model." + name] = tensor  # carried along untouched
    save_file(out, target)
    return target


def ldm_vae_state_dict(diffusers_state: dict, up_blocks: int) -> dict:
    """A diffusers AutoencoderKL state dict in the original (LDM) names all-in-one checkpoints use:
    ``down.{i}.block.{j}``, ``mid.block_1``/``attn_1`` (1×1 convs), ``up`` counted from the output side."""
    out = {}
    for name, tensor in diffusers_state.items():
        new = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", new)
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"up.{up_blocks - 1 - int(m[1])}.block.{m[2]}", new)
        new = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        found = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", new)
        if found:
            new = f"{found[1]}mid.attn_1.{attention[found[2]]}.{found[3]}"
            if found[2] != "group_norm" and found[3] == "weight":
                tensor = tensor[:, :, None, None]  # LDM keeps them as 1×1 convolutions
        out[new] = tensor
    return out


def all_in_one_file(folder, transformer_file, target, parts=("vae", "clip_l", "clip_g", "t5xxl")) -> Path:
    """A ComfyUI-style all-in-one Flux.1/SD3 checkpoint: the transformer file's weights, the folder's
    VAE under ``vae.`` in LDM names and its text encoders under ``text_encoders.<part>.transformer.``
    in transformers' names (``clip_g`` and a T5 in ``text_encoder_3`` for SD3)."""
    import json

    from safetensors.torch import load_file, save_file

    out = dict(load_file(transformer_file))
    sd3 = (folder / "text_encoder_3").is_dir()
    encoders = {"clip_l": "text_encoder", "clip_g": "text_encoder_2" if sd3 else None,
                "t5xxl": "text_encoder_3" if sd3 else "text_encoder_2"}
    for part in parts:
        if part == "vae":
            config = json.loads((folder / "vae" / "config.json").read_text())
            vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
            out.update({"vae." + k: v for k, v in ldm_vae_state_dict(vae, len(config["up_block_types"])).items()})
        elif encoders.get(part):
            for name, tensor in load_file(folder / encoders[part] / "model.safetensors").items():
                if part != "t5xxl" and not name.startswith(("text_model.", "text_projection.")):
                    name = "text_model." + name  # as published files (and transformers before 5.6) name CLIP's
                out[f"text_encoders.{part}.transformer.{name}"] = tensor
    save_file(out, target)
    return Path(target)
