"""Format and family detection from key names, on real adapters' key lists and hand-made cases."""

from __future__ import annotations

import json

import pytest

from loralib.architectures import detect_architecture
from loralib.formats.detect import identify

FLUX_LISTS = [
    "invokeai__flux_control_lora_format__state_dict_keys.json",
    "invokeai__flux_dora_onetrainer_format__state_dict_keys.json",
    "invokeai__flux_lokr_bfl_format__state_dict_keys.json",
    "invokeai__flux_lora_aitoolkit_format__state_dict_keys.json",
    "invokeai__flux_lora_diffusers_base_model_format__state_dict_keys.json",
    "invokeai__flux_lora_diffusers_dora_format__state_dict_keys.json",
    "invokeai__flux_lora_diffusers_format__state_dict_keys.json",
    "invokeai__flux_lora_diffusers_no_proj_mlp_format__state_dict_keys.json",
    "invokeai__flux_lora_diffusers_v2_format__state_dict_keys.json",
    "invokeai__flux_lora_diffusers_with_norm_out_format__state_dict_keys.json",
    "invokeai__flux_lora_kohya_format__state_dict_keys.json",
    "invokeai__flux_lora_kohya_with_te1_and_te3_format__state_dict_keys.json",
    "invokeai__flux_lora_kohya_with_te1_format__state_dict_keys.json",
    "invokeai__flux_lora_xlabs_format__state_dict_keys.json",
]


def _load(key_lists, name):
    data = json.loads((key_lists / name).read_text())
    # lists without shapes hold only 3072-wide attention projections
    shapes = data.get("keys_to_shapes") or {k: [4, 3072] if ".down." in k else [3072, 4] for k in data["keys"]}
    return list(shapes), {k: tuple(v) for k, v in shapes.items()}


# key list -> (kind, internal modules); plain LoRAs in every spelling and LyCORIS/DoRA in kohya names
# are read as Flux.1, the control LoRA is named precisely. (The BFL LoKr list's shapes are no Flux
# layer's — its qkv LoKr would be 1024×27648 — so it is read with real shapes in test_flux_lycoris.py.)
FLUX_EXPECTED = {
    "invokeai__flux_control_lora_format__state_dict_keys.json": ("flux-control", None),
    "invokeai__flux_dora_onetrainer_format__state_dict_keys.json": ("lycoris-dora", 506),
    "invokeai__flux_lokr_bfl_format__state_dict_keys.json": ("lycoris-lokr", None),
    "invokeai__flux_lora_aitoolkit_format__state_dict_keys.json": ("comfyui", 418),
    "invokeai__flux_lora_diffusers_base_model_format__state_dict_keys.json": ("peft", 381),
    "invokeai__flux_lora_diffusers_dora_format__state_dict_keys.json": ("lycoris-dora", 266),
    "invokeai__flux_lora_diffusers_format__state_dict_keys.json": ("diffusers", 494),
    "invokeai__flux_lora_diffusers_no_proj_mlp_format__state_dict_keys.json": ("diffusers", 342),
    "invokeai__flux_lora_diffusers_v2_format__state_dict_keys.json": ("diffusers-old", 190),
    "invokeai__flux_lora_diffusers_with_norm_out_format__state_dict_keys.json": ("diffusers", 504),
    "invokeai__flux_lora_kohya_format__state_dict_keys.json": ("kohya", 494),
    "invokeai__flux_lora_kohya_with_te1_and_te3_format__state_dict_keys.json": ("kohya", 734),
    "invokeai__flux_lora_kohya_with_te1_format__state_dict_keys.json": ("kohya", 566),
    "invokeai__flux_lora_xlabs_format__state_dict_keys.json": ("xlabs", 24),
}


def _index(key_lists, name, metadata):
    from loralib.formats.base import Inputs
    from loralib.formats.source import TensorSource
    from loralib.formats.table import for_kind

    names, shapes = _load(key_lists, name)
    kind = identify(names, shapes, metadata)
    if FLUX_EXPECTED.get(name, (None, 0))[1] is None:
        return kind, None
    source = TensorSource(key_lists / name, shapes, dict.fromkeys(shapes, "F16"), metadata, tensors={})
    source.scalars = lambda wanted: dict.fromkeys(wanted, 4.0)  # alphas live in tensor data, absent here
    return kind, for_kind(kind).read(Inputs(source.path, [source]))


def test_flux_lists_cover_every_key_list(key_lists):
    assert set(FLUX_LISTS) == set(FLUX_EXPECTED)


@pytest.mark.parametrize("name", FLUX_LISTS)
def test_every_flux_key_list_is_read_as_flux_or_named(key_lists, name):
    kind, index = _index(key_lists, name, {"ss_base_model_version": "sd_1.5"})  # metadata lies; keys decide
    expected_kind, modules = FLUX_EXPECTED[name]
    assert kind.format == expected_kind
    if modules is None:
        assert not kind.plain_lora
        return
    assert kind.plain_lora or kind.format.startswith("lycoris-")
    assert len(index.modules) == modules
    assert index.architecture.name == "flux"
    layers = full_flux_layers()
    assert all(key in layers for key in index.modules)
    for entry in index.modules.values():  # every module's shape is the full-size layer's
        assert (entry.out_features, entry.in_features) == (layers[entry.key].out_features, layers[entry.key].in_features)


def full_flux_layers():
    from loralib.base_model import full_size_layers

    global _FLUX_LAYERS
    if _FLUX_LAYERS is None:
        _FLUX_LAYERS = full_size_layers("flux")
    return _FLUX_LAYERS


_FLUX_LAYERS = None


def test_flux_control_lora_and_lokr_and_dora_are_told_apart(key_lists):
    assert "LoKr" in identify(*_load(key_lists, "invokeai__flux_lokr_bfl_format__state_dict_keys.json"), {}).title
    assert "DoRA" in identify(*_load(key_lists, "invokeai__flux_dora_onetrainer_format__state_dict_keys.json"), {}).title
    assert "Control" in identify(*_load(key_lists, "invokeai__flux_control_lora_format__state_dict_keys.json"), {}).title


def test_kohya_sd15_key_list_is_kohya(key_lists):
    data = json.loads((key_lists / "kohya_sd15_lora_with_te__ppdiffusers_mapping.json").read_text())
    shapes = {k: (4, 768) if "lora_down" in k else (768, 4) if "lora_up" in k else () for k in data["keys"]}
    assert identify(list(shapes), shapes, {}).format == "kohya"


def _excerpt_block(key_lists, marker: str) -> list[str]:
    text = (key_lists / "issue_excerpts_PARTIAL.md").read_text()
    block = text.split(marker, 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("marker, expected", [
    ("## LyCORIS LoHa, SD1.5", "lycoris-loha"),
    ("## LyCORIS LoHa with Tucker conv", "lycoris-loha"),
    ("## SDXL kohya LoRA, Stability/SGM block naming", "kohya"),
    ("## SDXL (Illustrious) kohya LoRA with lora_te1", "kohya"),
    ("## SD1.5 kohya LoRA with unusual", "lycoris-ia3"),
])
def test_quoted_key_fragments(key_lists, marker, expected):
    names = _excerpt_block(key_lists, marker)
    shapes = {n: (4, 4) for n in names}
    assert identify(names, shapes, {}).format == expected


def test_sdxl_lokr_fragment(key_lists):
    names = [n for n in _excerpt_block(key_lists, "## SDXL kohya LoRA, lora_te2 (turn 23)") if "lokr" in n]
    assert identify(names, {n: (4, 4) for n in names}, {}).format == "lycoris-lokr"


@pytest.mark.parametrize("names, expected", [
    (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "checkpoint"),
    (["down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.resnets.0.conv1.bias"], "checkpoint"),
    (["emb_params"], "textual-inversion"),
    (["clip_l", "clip_g"], "textual-inversion"),
    (["base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight",
      "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight"], "peft"),
    (["unet.mid_block.attentions.0.proj_in.lora_A.weight", "unet.mid_block.attentions.0.proj_in.lora_B.weight"], "diffusers"),
    (["text_encoder_2.text_model.encoder.layers.14.self_attn.v_proj.lora_linear_layer.up.weight"], "diffusers-old"),
    (["unet:0:down", "unet:0:up"], "cloneofsimo"),
    (["joint_blocks.0.x_block.attn.qkv.lora_down.weight"], "onetrainer-original"),
    (["input_blocks.4.1.proj_in.lora_A.weight", "input_blocks.4.1.proj_in.lora_B.weight"], "onetrainer-original"),
    (["diffusion_model.input_blocks.1.1.proj_in.lora_up.weight", "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight",
      "diffusion_model.input_blocks.1.1.proj_in.alpha"], "comfyui"),
    (["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
      "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"], "comfyui"),
    (["unet.input_blocks.4.1.proj_in.lora_down.weight", "clip_g.text_model.encoder.layers.0.mlp.fc1.lora_up.weight"], "omi"),
    (["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_down.weight"], "onetrainer-internal"),
    (["lora_unet.down_blocks.0.attentions.0.proj_in.lora_down.weight", "lora_unet.down_blocks.0.attentions.0.proj_in.alpha"],
     "onetrainer-internal"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "diffusers"),
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "checkpoint"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "checkpoint"),
])
def test_hand_made_key_sets(names, expected):
    shapes = {n: (4, 768) for n in names}
    assert identify(names, shapes, {}).format == expected


def test_nothing_recognisable():
    assert identify(["foo", "bar.baz"], {"foo": (3,), "bar.baz": (2, 2)}, {}) is None
    assert identify([], {}, {}) is None


@pytest.mark.parametrize("widths, expected", [
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 768}, "sd1"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 1024}, "sd2"),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2048}, "sdxl"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": 1280}, "sdxl"),
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 1024}, "sd2"),
    ({"unet.down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q": 1280}, "sdxl"),
    ({"unet.down_blocks.0.attentions.0.proj_in": 32}, "unknown"),
    ({"transformer.transformer_blocks.0.attn.to_q": 3072}, "flux"),
    ({"transformer.transformer_blocks.0.attn.to_q": 2432}, "sd35-large"),
    ({"transformer.transformer_blocks.0.attn.to_q": 1536}, "sd3"),
    ({"transformer.transformer_blocks.0.attn2.to_q": 1536}, "sd35-medium"),
    ({"transformer.single_transformer_blocks.0.proj_mlp": 64}, "flux"),  # structure, whatever the width
    ({"transformer.transformer_blocks.0.attn.to_q": 64}, "unknown"),
    ({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": 4096}, "flux"),  # T5 as the second encoder
    ({"text_encoder_3.encoder.block.0.layer.0.SelfAttention.q": 4096}, "sd3"),
])
def test_architecture_from_widths(widths, expected):
    assert detect_architecture(widths).name == expected


@pytest.mark.parametrize("widths, metadata, expected", [
    ({"transformer.transformer_blocks.0.attn.to_q": 1536}, {"modelspec.architecture": "stable-diffusion-3-5-medium/lora"},
     "sd35-medium"),  # a tie the tensors cannot break
    ({"transformer.transformer_blocks.0.attn.to_q": 64}, {"ss_base_model_version": "flux1"}, "flux"),
    ({"transformer.transformer_blocks.0.attn.to_q": 3072}, {"ss_base_model_version": "sd_v1"}, "flux"),  # never overridden
    ({"transformer.transformer_blocks.0.attn.to_q": 2432}, {"modelspec.architecture": "flux-1-dev/lora"}, "sd35-large"),
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 768}, {"ss_base_model_version": "flux1"}, "flux"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": 1280}, {"ss_base_model_version": "5-large"},
     "sd35-large"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": 1280}, {}, "sdxl"),
])
def test_metadata_breaks_ties_and_nothing_else(widths, metadata, expected):
    assert detect_architecture(widths, metadata).name == expected
