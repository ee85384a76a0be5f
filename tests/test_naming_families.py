"""Module names of the full-size Flux.1 and SD3/SD3.5 models (built on the meta device).

The BFL and MMDiT maps are checked against diffusers' own single-file converters for every
parameter: a checkpoint in the original layout is built from our map, with each row of each
tensor holding a number that says which diffusers parameter and row it must end up in, and
``convert_flux_transformer_checkpoint_to_diffusers`` / ``convert_sd3_transformer_checkpoint_to_diffusers``
must put every one of them there. Every adaptable module's kohya name must resolve back to
itself and nothing else.
"""

from __future__ import annotations

import json

import pytest
import torch

from loralib.architectures import ARCHITECTURES
from loralib.base_model import full_size_layers
from loralib.naming.flux import FLUX_MAP
from loralib.naming.kohya import module_name, resolve_module_name
from loralib.naming.sd3 import SD3_MAP

# Parameters no LoRA adapts (norm scales, the position table) and their original names, which the
# converters need to find; everything else goes through the module map under test.
FLUX_EXTRA = {r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight": "double_blocks.{}.img_attn.norm.query_norm.scale",
              r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight": "double_blocks.{}.img_attn.norm.key_norm.scale",
              r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight": "double_blocks.{}.txt_attn.norm.query_norm.scale",
              r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight": "double_blocks.{}.txt_attn.norm.key_norm.scale",
              r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight": "single_blocks.{}.norm.query_norm.scale",
              r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight": "single_blocks.{}.norm.key_norm.scale"}
SD3_EXTRA = {r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight": "joint_blocks.{}.x_block.attn.ln_q.weight",
             r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight": "joint_blocks.{}.x_block.attn.ln_k.weight",
             r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight": "joint_blocks.{}.context_block.attn.ln_q.weight",
             r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight": "joint_blocks.{}.context_block.attn.ln_k.weight",
             r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight": "joint_blocks.{}.x_block.attn2.ln_q.weight",
             r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight": "joint_blocks.{}.x_block.attn2.ln_k.weight",
             r"pos_embed\.pos_embed": "pos_embed"}


def _meta_transformer(arch: str):
    import diffusers

    spec = ARCHITECTURES[arch]
    with torch.device("meta"):
        return getattr(diffusers, spec.denoiser_class)(**spec.denoiser_config)


def original_layout(model, native_map, extra, value_of) -> dict[str, torch.Tensor]:
    """The model's parameters in the original checkpoint layout, ``value_of(name, parameter)`` each:
    fused layers' rows concatenated in their order, swapped halves swapped."""
    import re

    modules = dict(model.named_modules())
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, parameter in model.state_dict().items():
        value = value_of(name, parameter)
        module_path, _, kind = name.rpartition(".")
        if isinstance(modules.get(module_path), (torch.nn.Linear, torch.nn.Conv2d)):
            found = native_map.to_native(module_path)
            assert found is not None, f"{module_path} has no original name"
            native, part, rule = found
            out, width = modules[module_path].weight.shape[:2]
            target = native_map.to_target(native, (sum(rule.units) * width if len(rule.parts) > 1 else out, width))
            assert target.keys[part] == f"transformer.{module_path}"
            fused.setdefault(f"{native}.{kind}", {})[part] = torch.cat(value.chunk(2)[::-1]) if target.swap else value
            continue
        for pattern, original in extra.items():
            if match := re.fullmatch(pattern, name):
                fused[original.format(*match.groups())] = {0: value}
                break
        else:
            raise AssertionError(f"{name} is neither an adaptable layer nor a known extra parameter")
    return {name: torch.cat([parts[i] for i in sorted(parts)]) for name, parts in fused.items()}


def _original_checkpoint(model, native_map, extra):
    """An original-layout checkpoint whose rows say where each must land: value = 100000·index + row."""
    index = {name: i for i, name in enumerate(model.state_dict())}
    expected = {}

    def encode(name, parameter):
        rows = parameter.shape[0] if parameter.ndim else 1
        expected[name] = torch.arange(rows, dtype=torch.float64) + 100000 * index[name]
        return expected[name]

    return original_layout(model, native_map, extra, encode), expected


@pytest.mark.parametrize("arch", ["flux", "sd3", "sd35-medium", "sd35-large"])
def test_original_names_agree_with_diffusers_single_file_converters(arch):
    from diffusers.loaders import single_file_utils as sfu

    model = _meta_transformer(arch)
    if arch == "flux":
        checkpoint, expected = _original_checkpoint(model, FLUX_MAP, FLUX_EXTRA)
        converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    else:
        checkpoint, expected = _original_checkpoint(model, SD3_MAP, SD3_EXTRA)
        converted = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert set(converted) == set(expected)
    wrong = [k for k in expected if not torch.equal(converted[k].reshape(-1), expected[k])]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("arch", ["flux", "sd3", "sd35-medium", "sd35-large"])
def test_every_module_has_one_kohya_name_that_resolves_back(arch):
    layers = full_size_layers(arch)
    spec = ARCHITECTURES[arch]
    assert set(spec.components) == {k.split(".", 1)[0] for k in layers}
    claimed: dict[str, str] = {}
    for key, shape in layers.items():
        name, part = module_name(key, family=spec.family, with_part=True)
        target = resolve_module_name(name, family=spec.family)
        assert target is not None, name
        assert target.keys[part] == key, (name, key)
        rows = target.rows(sum(target.units) * shape.in_features if target.fused else shape.out_features,
                           shape.in_features)
        assert rows is not None
        assert claimed.setdefault(f"{name}#{part}", key) == key
    names = {n.split("#")[0] for n in claimed}
    if arch == "flux":
        assert "lora_unet_double_blocks_18_img_attn_qkv" in names and "lora_unet_single_blocks_37_linear1" in names
        assert "lora_te1_text_model_encoder_layers_11_mlp_fc2" in names
        assert "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1" in names
        assert "lora_unet_final_layer_adaLN_modulation_1" in names
    else:
        assert "lora_unet_joint_blocks_0_context_block_attn_qkv" in names
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
        assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names
        assert ("lora_unet_joint_blocks_12_x_block_attn2_qkv" in names) == (arch == "sd35-medium")


def test_flux_kohya_names_from_real_files_all_resolve(key_lists):
    layers = full_size_layers("flux")
    for name in ("invokeai__flux_lora_kohya_format__state_dict_keys.json",
                 "invokeai__flux_lora_kohya_with_te1_and_te3_format__state_dict_keys.json"):
        data = json.loads((key_lists / name).read_text())
        modules = {k.split(".")[0] for k in data["keys_to_shapes"]}
        for module in modules:
            target = resolve_module_name(module, family="flux")
            assert target is not None and all(k in layers for k in target.keys), module
