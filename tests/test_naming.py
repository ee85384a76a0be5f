"""Module names on the full-size SD1.5, SD2.1 and SDXL architectures (built on the meta device).

The SGM mapping is checked against diffusers' own LDM-checkpoint converter for every parameter,
and every adaptable module's kohya name must parse back to itself.
"""

from __future__ import annotations

import pytest
import torch

from loralib.architectures import ARCHITECTURES, SD1, SDXL
from loralib.base_model import full_size_layers
from loralib.naming.kohya import module_name, parse_module_name, unflatten
from loralib.naming.sgm import UNetLayout, diffusers_to_sgm, sgm_to_diffusers


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_sgm_names_agree_with_diffusers_ldm_converter(arch):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = ARCHITECTURES[arch].unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layout = UNetLayout.from_config(config)
    keys = list(unet.state_dict())
    ldm = {}
    for i, key in enumerate(keys):
        sgm = diffusers_to_sgm(key, layout)
        assert sgm is not None, key
        assert sgm_to_diffusers(sgm, layout) == key
        ldm[f"model.diffusion_model.{sgm}"] = torch.tensor([float(i)])
    # diffusers' converter is the outside oracle: it must put every value back where it came from
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(converted) == set(keys)
    assert all(int(converted[key].item()) == i for i, key in enumerate(keys))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_module_has_one_kohya_name_that_parses_back(arch):
    layers = full_size_layers(arch)
    spec = ARCHITECTURES[arch]
    layout = UNetLayout.from_config(spec.unet_config)
    sgm = layout if spec.uses_sgm_names else None
    names = {}
    for key in layers:
        name = module_name(key, sgm_layout=sgm, two_text_encoders=arch == "sdxl")
        assert parse_module_name(name, layout) == key, name
        names[name] = key
    assert len(names) == len(layers)  # no two modules share a name
    if arch == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
        assert "lora_unet_output_blocks_2_2_conv" in names  # the upsampler after attention
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert f"lora_te_text_model_encoder_layers_{spec.text_encoders['text_encoder']['num_hidden_layers'] - 1}_self_attn_q_proj" in names


def test_sd1_kohya_names_from_a_real_lora_all_parse(key_lists):
    import json

    data = json.loads((key_lists / "kohya_sd15_lora_with_te__ppdiffusers_mapping.json").read_text())
    layout = UNetLayout.from_config(SD1.unet_config)
    layers = full_size_layers("sd1")
    modules = {k.split(".")[0] for k in data["keys"]}
    assert len(modules) == 264  # 72 text-encoder and 192 UNet attention/feed-forward/projection modules
    assert sum(m.startswith("lora_te_") for m in modules) == 72
    for name in modules:
        assert parse_module_name(name, layout) in layers, name


def test_sgm_names_quoted_in_public_issues_parse(key_lists):
    text = (key_lists / "issue_excerpts_PARTIAL.md").read_text()
    layout = UNetLayout.from_config(SDXL.unet_config)
    layers = full_size_layers("sdxl")
    sgm = {line.split(".")[0] for line in text.splitlines() if line.startswith(("lora_unet_input_blocks", "lora_te2_", "lora_te1_"))}
    assert len(sgm) >= 8
    for name in sgm:
        assert parse_module_name(name, layout) in layers, name


@pytest.mark.parametrize("flat, expected", [
    ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("text_model_encoder_layers_11_self_attn_q_proj", "text_model.encoder.layers.11.self_attn.q_proj"),
    ("out_2", "out.2"),
    ("time_embedding_linear_1", "time_embedding.linear_1"),
    ("down_blocks_0_nonexistent_x", None),
    ("", None),
    ("_".join(["0"] * 5000), ".".join(["0"] * 5000)),  # long names parse without recursion
])
def test_unflatten(flat, expected):
    assert unflatten(flat) == expected


def test_unknown_kohya_prefix_is_not_parsed():
    layout = UNetLayout.from_config(SD1.unet_config)
    assert parse_module_name("lora_unet_unet_down_blocks_0_attentions_0_proj_in", layout) is None
    assert parse_module_name("lora_vae_decoder_conv_in", layout) is None


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_text_model_prefix_matches_the_installed_transformers(component):
    """The torch-free decision agrees with the CLIP model the installed transformers really builds."""
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loralib.naming.clip import nests_text_model, text_model_prefix

    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    config = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    with torch.device("meta"):
        model = cls(config)
    nested = hasattr(model, "text_model")
    assert nests_text_model(component, transformers.__version__) is nested
    assert text_model_prefix(component) == ("text_model." if nested else "")
    peft_paths = {name for name, _ in model.named_modules() if name.endswith("q_proj")}
    assert all(p.startswith(text_model_prefix(component) + "encoder.") for p in peft_paths)


@pytest.mark.parametrize(("version", "nested"), [("4.45.2", True), ("4.57.1.dev0", True), ("5.0.0", True),
                                                  ("5.5.3", True), ("5.6.0rc1", False), ("5.6.0", False),
                                                  ("5.23.0", False), ("6.0", False), (None, False)])
def test_clip_text_model_was_flattened_in_transformers_5_6(version, nested):
    from loralib.naming.clip import nests_text_model

    assert nests_text_model("text_encoder", version) is nested
    assert nests_text_model("text_encoder_2", version) is True  # WithProjection always keeps .text_model


def test_text_model_prefix_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys; from loralib.naming.clip import text_model_prefix; text_model_prefix('text_encoder'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("class_name", "version", "nested"), [("CLIPTextModelWithProjection", "5.23.0", True),
                                                               ("CLIPTextModel", "5.23.0", False),
                                                               ("CLIPTextModel", "5.5.0", True),
                                                               ("T5EncoderModel", "4.50.0", False)])
def test_the_prefix_follows_the_components_class(class_name, version, nested):
    """SD3's first text encoder has a projection (nested), Flux's and SD3's T5 has no text_model at all."""
    from loralib.naming.clip import nests_text_model

    assert nests_text_model("text_encoder", version, class_name) is nested
