"""Every spelling other tools write, built here from full-size module tables, reads back exactly.

For SD1.5 and SDXL (full-size models on the meta device) and Flux.1, a file is written by hand in
each spelling ComfyUI, OneTrainer (COMFY, LEGACY, INTERNAL, ORIGINAL), OMI and kohya use — key
names built from the module tables with Stability's SGM numbering (checked against diffusers'
LDM converter in test_naming.py) and BFL's names — and lorareg must read back exactly the
modules, factors and alphas that were written: never a module more, less or elsewhere.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

import loralib
from loralib.architectures import ARCHITECTURES
from loralib.base_model import full_size_layers
from loralib.errors import CorruptFileError
from loralib.naming.flux import FLUX_MAP
from loralib.naming.sgm import UNetLayout, diffusers_to_sgm

_LAYERS: dict[str, dict] = {}


def _layers(arch: str):
    if arch not in _LAYERS:
        _LAYERS[arch] = full_size_layers(arch)
    return _LAYERS[arch]


def _sample(arch: str, count: int = 24, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Random rank-2 factors on a sample of the model's Linear modules (UNet and every text encoder)."""
    layers = {k: s for k, s in _layers(arch).items() if not s.is_conv}
    rng = random.Random(seed)
    keys = sorted(k for k in layers if not k.startswith("text_"))
    texts = sorted(k for k in layers if k.startswith("text_"))
    chosen = rng.sample(keys, count) + rng.sample(texts, 6)
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(2, layers[k].in_features, generator=g), torch.randn(layers[k].out_features, 2, generator=g),
                float(rng.choice((1, 2, 3.5)))) for k in chosen}


def _sgm(arch: str, path: str) -> str:
    return diffusers_to_sgm(path, UNetLayout.from_config(ARCHITECTURES[arch].unet_config))


def _write(path, modules, name_of, suffixes=("lora_down.weight", "lora_up.weight", "alpha")):
    tensors = {}
    for key, (down, up, alpha) in modules.items():
        name = name_of(key)
        tensors[f"{name}.{suffixes[0]}"], tensors[f"{name}.{suffixes[1]}"] = down, up
        if suffixes[2]:
            tensors[f"{name}.{suffixes[2]}"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def _check(path, modules, fmt, arch, alphas=True):
    adapter = loralib.load(path)
    assert adapter.source_format == fmt
    assert adapter.architecture == arch
    assert set(adapter.modules) == set(modules)
    for key, (down, up, alpha) in modules.items():
        module = adapter.modules[key]
        assert torch.equal(module.down, down) and torch.equal(module.up, up), key
        assert module.alpha == (alpha if alphas else 2.0), key


TEXT = {"sd1": {"text_encoder": "clip_l"}, "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}
KOHYA_TEXT = {"sd1": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def _split(key):
    return key.split(".", 1)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_comfyui_and_onetrainer_comfy(arch, tmp_path):
    modules = _sample(arch)

    def name(key):
        component, path = _split(key)
        if component == "unet":
            return f"diffusion_model.{_sgm(arch, path)}"
        return f"text_encoders.{TEXT[arch][component]}.transformer.{path}"

    _check(_write(tmp_path / "a.safetensors", modules, name), modules, "comfyui", arch)
    # the same with PEFT factor names and no alpha (scale 1)
    _check(_write(tmp_path / "b.safetensors", modules, name, ("lora_A.weight", "lora_B.weight", None)), modules,
           "comfyui", arch, alphas=False)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_onetrainer_legacy_is_kohya_with_diffusers_names(arch, tmp_path):
    modules = _sample(arch, seed=1)

    def name(key):
        component, path = _split(key)
        prefix = "lora_unet" if component == "unet" else KOHYA_TEXT[arch][component]
        return f"{prefix}_{path.replace('.', '_')}"

    _check(_write(tmp_path / "legacy.safetensors", modules, name), modules, "kohya", arch)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_onetrainer_internal(arch, tmp_path):
    modules = _sample(arch, seed=2)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if arch == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}
    _check(_write(tmp_path / "a.safetensors", modules, lambda k: f"{prefixes[_split(k)[0]]}.{_split(k)[1]}"), modules,
           "onetrainer-internal", arch)
    # also spelled with the pipeline's component names
    _check(_write(tmp_path / "b.safetensors", modules, lambda k: k), modules, "onetrainer-internal", arch)


def test_onetrainer_original_sdxl_is_no_longer_misread_as_diffusers(tmp_path):
    modules = {k: v for k, v in _sample("sdxl", seed=3).items() if k.startswith("unet.")}
    path = _write(tmp_path / "original.safetensors", modules, lambda k: _sgm("sdxl", _split(k)[1]),
                  ("lora_A.weight", "lora_B.weight", None))
    _check(path, modules, "onetrainer-original", "sdxl", alphas=False)
    loralib.convert(path, tmp_path / "k.safetensors", "kohya")
    _check(tmp_path / "k.safetensors", modules, "kohya", "sdxl", alphas=False)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_omi(arch, tmp_path):
    modules = _sample(arch, seed=4)

    def name(key):
        component, path = _split(key)
        return f"unet.{_sgm(arch, path)}" if component == "unet" else f"{TEXT[arch][component]}.{path}"

    _check(_write(tmp_path / "omi.safetensors", modules, name), modules, "omi", arch)


def test_flux_omi_names_each_part_of_a_fused_layer(tmp_path):
    layers = _layers("flux")
    g = torch.Generator().manual_seed(5)
    keys = ["transformer.transformer_blocks.3.attn.to_k", "transformer.single_transformer_blocks.7.proj_mlp",
            "transformer.transformer_blocks.0.attn.add_v_proj", "transformer.x_embedder", "transformer.norm_out.linear",
            "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0"]
    modules = {k: (torch.randn(2, layers[k].in_features, generator=g), torch.randn(layers[k].out_features, 2, generator=g),
                   2.0) for k in keys}

    def name(key):
        component, path = _split(key)
        if component == "text_encoder_2":
            return f"t5.{path}"
        native, part, rule = FLUX_MAP.to_native(path)
        native = "img_in.proj" if native == "img_in" else native
        return f"transformer.{native}" + (f".{part}" if len(rule.parts) > 1 else "")

    tensors = {}
    for key, (down, up, alpha) in modules.items():
        if key.endswith("norm_out.linear"):  # OMI keeps BFL's shift/scale order
            up = torch.cat(up.chunk(2)[::-1])
        tensors[f"{name(key)}.lora_down.weight"], tensors[f"{name(key)}.lora_up.weight"] = down, up
        tensors[f"{name(key)}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "omi.safetensors")
    _check(tmp_path / "omi.safetensors", modules, "omi", "flux")


@pytest.mark.parametrize("name, problem", [
    ("diffusion_model.input_blocks.99.1.proj_in", "name no module"),  # an SGM block SDXL does not have
    ("unet.down_blocks.0.attentions.0.nonsense", None),  # not a diffusers module: no reader takes it
])
def test_a_key_no_reader_can_place_is_an_error_naming_it(tmp_path, name, problem):
    tensors = {f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2),
               "diffusion_model.input_blocks.4.1.proj_in.lora_down.weight": torch.zeros(2, 640),
               "diffusion_model.input_blocks.4.1.proj_in.lora_up.weight": torch.zeros(640, 2)}
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(CorruptFileError, match=problem or name.split(".")[0]):
        loralib.load(tmp_path / "x.safetensors")


def test_an_attention_only_sd35_large_diffusers_lora_converts_to_mmdit_names_and_back(tmp_path):
    layers = full_size_layers("sd35-large", ("transformer",))
    keys = [f"transformer.transformer_blocks.{b}.attn.{p}" for b in (0, 37) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    g = torch.Generator().manual_seed(7)
    modules = {k: (torch.randn(2, layers[k].in_features, generator=g), torch.randn(layers[k].out_features, 2, generator=g),
                   2.0) for k in keys}
    path = _write(tmp_path / "d.safetensors", modules, lambda k: k, ("lora_A.weight", "lora_B.weight", None))
    _check(path, modules, "diffusers", "sd35-large", alphas=False)
    loralib.convert(path, tmp_path / "k.safetensors", "kohya")
    from safetensors.torch import load_file

    names = {n.split(".")[0] for n in load_file(tmp_path / "k.safetensors")}
    assert names == {f"lora_unet_joint_blocks_{b}_x_block_attn_{p}" for b in (0, 37) for p in ("qkv", "proj")}
    _check(tmp_path / "k.safetensors", modules, "kohya", "sd35-large", alphas=False)
    report = loralib.inspect(tmp_path / "k.safetensors")
    assert not report.damaged and report.architecture == "sd35-large"
