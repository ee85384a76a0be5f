"""Training on the tiny SDXL pipeline: both text encoders trained, size/crop time ids, SGM key names.

The file is checked the way SDXL users load it: diffusers' ``load_lora_weights`` must place every
module (UNet under Stability's SGM names, ``lora_te1``/``lora_te2`` text encoders) and fuse the
base weights plus lorareg's ``ΔW``.
"""

from __future__ import annotations

import pytest
import torch

import loralib
from loralib.base_model import pipeline_layers
from loralib.files.header import read_header
from tests.helpers.diffusers_oracle import load_with_diffusers, pipeline_class
from tests.helpers.training import train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, tmp_path_factory):
    """16 steps on two images, UNet and both text encoders trained; evaluation loss before and after."""
    return train_and_evaluate(
        tmp_path_factory.mktemp("sdxl-run"), tiny_sdxl, 2, (300, 700), max_train_steps=16, batch_size=2,
        learning_rate=1e-2, train_text_encoder=True, text_encoder_lr=1e-3, target_modules="transformer",
        save_dtype="fp16")


def test_sdxl_training_lowers_the_loss(sdxl_run):
    assert sdxl_run["result"].steps == 16
    assert sdxl_run["after"] < 0.98 * sdxl_run["before"], (sdxl_run["before"], sdxl_run["after"])


def test_sdxl_file_uses_sgm_names_and_both_text_encoders(sdxl_run):
    path = sdxl_run["result"].save.path
    names = list(read_header(path).tensors)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_1_self_attn_out_proj") for n in names)
    assert not any(n.startswith("lora_unet_down_blocks") for n in names)
    adapter = loralib.load(path)
    assert adapter.architecture == "sdxl" and adapter.components == ["unet", "text_encoder", "text_encoder_2"]
    assert adapter.dtype == torch.float16
    meta = adapter.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_text_encoder_lr"] == "0.001"
    assert meta["ss_network_train_unet_only"] == "False"


def test_diffusers_loads_the_sdxl_file_exactly(sdxl_run):
    path, base = sdxl_run["result"].save.path, sdxl_run["base"]
    adapter = loralib.load(path)
    fused, warnings, injected, listed = load_with_diffusers("sdxl", base, path)
    assert warnings == []
    assert injected == len(adapter.modules)
    assert listed == {"unet": ["trained"], "text_encoder": ["trained"], "text_encoder_2": ["trained"]}
    original = pipeline_class("sdxl").from_pretrained(base)
    fused_layers, base_layers = pipeline_layers(fused), pipeline_layers(original)
    for key, module in adapter.modules.items():
        expected = base_layers[key].weight.detach() + module.delta()
        torch.testing.assert_close(fused_layers[key].weight.detach(), expected, rtol=1e-5, atol=1e-6)
