"""Training on the tiny SD1 pipeline: the loss goes down, and diffusers loads exactly what was trained.

One short run (LoCon preset, so attention, feed-forward, projections and ResNet convs are all
trained) is shared by the tests. The oracle is diffusers' ``load_lora_weights``: it must inject a
LoRA layer for every module of the file, warn about nothing, and its fused weights must equal
the base weights plus lorareg's ``ΔW``.
"""

from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.base_model import pipeline_layers
from loralib.metadata import history
from tests.helpers.diffusers_oracle import load_with_diffusers, pipeline_class
from tests.helpers.training import train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


@pytest.fixture(scope="module")
def sd1_run(tiny_sd1, tmp_path_factory):
    """8 steps of LoCon training on two images; the evaluation loss is measured before and after."""
    return train_and_evaluate(
        tmp_path_factory.mktemp("sd1-run"), tiny_sd1, 2, (200, 600), max_train_steps=8, batch_size=2,
        learning_rate=1e-2, target_modules="locon", conv_rank=2, conv_alpha=1, alpha=2, trigger_word="pxl style",
        lr_scheduler="constant_with_warmup", lr_warmup_steps=1, snr_gamma=5.0, noise_offset=0.05)


def test_training_lowers_the_loss_on_the_images_it_sees(sd1_run):
    result = sd1_run["result"]
    assert result.steps == 8 and not result.interrupted
    assert sd1_run["after"] < 0.97 * sd1_run["before"], (sd1_run["before"], sd1_run["after"])


def test_the_file_is_kohya_with_the_trained_modules(sd1_run):
    path = sd1_run["result"].save.path
    assert path.name == "t.safetensors" and sd1_run["result"].save.format == "kohya"
    adapter = loralib.load(path)
    assert adapter.architecture == "sd1"
    convs = [k for k, m in adapter.modules.items() if m.is_conv and m.kernel_size == (3, 3)]
    linear = [k for k, m in adapter.modules.items() if not m.is_conv]
    assert convs and linear
    assert {adapter.modules[k].rank for k in convs} == {2} and {adapter.modules[k].alpha for k in convs} == {1.0}
    assert {adapter.modules[k].rank for k in linear} == {4} and {adapter.modules[k].alpha for k in linear} == {2.0}
    assert any(k.endswith("attn2.to_k") for k in linear) and any(k.endswith("ff.net.2") for k in linear)
    assert not any(k.startswith("text_encoder") for k in adapter.modules)  # text encoder not trained
    # the up factors started at zero and were trained
    assert all(m.up.abs().max() > 0 for m in adapter.modules.values())


def test_diffusers_loads_every_module_and_fuses_base_plus_delta(sd1_run):
    path, base = sd1_run["result"].save.path, sd1_run["base"]
    adapter = loralib.load(path)
    fused, warnings, injected, listed = load_with_diffusers("sd1", base, path)
    assert warnings == []
    assert injected == len(adapter.modules)
    assert listed == {"unet": ["trained"]}
    original = pipeline_class("sd1").from_pretrained(base)
    fused_layers, base_layers = pipeline_layers(fused), pipeline_layers(original)
    for key, module in adapter.modules.items():
        expected = base_layers[key].weight.detach() + module.delta()
        torch.testing.assert_close(fused_layers[key].weight.detach(), expected, rtol=1e-5, atol=1e-6)
    untouched = next(k for k in base_layers if k not in adapter.modules)
    assert torch.equal(fused_layers[untouched].weight, base_layers[untouched].weight)


def test_metadata_records_how_it_was_trained(sd1_run):
    meta = loralib.inspect(sd1_run["result"].save.path).metadata
    assert meta["ss_learning_rate"] == "0.01" and meta["ss_steps"] == "8" and meta["ss_max_train_steps"] == "8"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_resolution"] == "(32, 32)" and meta["modelspec.resolution"] == "32x32"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_num_train_images"] == "2"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["modelspec.trigger_phrase"] == "pxl style" and meta["modelspec.title"] == "t"
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags == {"data": {"pxl style": 2, "a red circle on a light background": 1,
                             "a blue square on a light background": 1}}
    assert meta["sshs_model_hash"] == loralib.inspect(sd1_run["result"].save.path).hashes["tensor_sha256"]
    record = history(meta)[-1]
    assert record["operation"] == "train" and record["params"]["rank"] == 4
    assert record["params"]["target_modules"] == "locon" and record["dataset"]["images"] == 2
    assert record["base_model"] == str(sd1_run["base"])


def test_a_checkpoint_is_left_for_extending_the_run(sd1_run):
    checkpoint = sd1_run["result"].checkpoint
    assert checkpoint.name == "step-00000008"
    assert (checkpoint / "trainable.safetensors").is_file() and (checkpoint / "training_state.pt").is_file()
