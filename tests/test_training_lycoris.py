"""LoHa and LoKr training (LyCORIS' algorithms). The oracle is the ``lycoris-lora`` package itself: its
modules built under the same seed hold the same initial factors, its kohya loader
(``lycoris.kohya.create_network_from_weights``) reads the saved file onto a fresh model that computes
what the trained model computes, and its ``factorization`` splits LoKr's sides as ours does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import loralib
from loralib.lycoris.shapes import factorization
from loralib.training import Trainer, load_config, train
from loralib.training.config import ConfigError
from loralib.training.lycoris_layers import TrainedLoha, TrainedLokr
from tests.helpers.training import quick_settings, small_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def test_lokr_factorization_is_lycoris_own():
    from lycoris.functional.general import factorization as theirs

    for dimension in range(1, 1400):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 30, 64):
            assert factorization(dimension, factor) == theirs(dimension, factor), (dimension, factor)


BASES = {"linear": lambda: nn.Linear(64, 96), "conv 3x3": lambda: nn.Conv2d(32, 64, 3, padding=1),
         "conv 1x1": lambda: nn.Conv2d(32, 64, 1)}
LOKR_SETTINGS = [(2, -1, False), (2, -1, True), (16, -1, False), (2, 4, True), (1, 8, True)]


@pytest.mark.parametrize("base", BASES)
def test_layers_start_exactly_as_lycoris_modules_start(base):
    """Same seed, same parameter names, shapes and values as LyCORIS' own LohaModule / LokrModule (every
    LoKr branch: W1 full or decomposed, W2 low-rank or full), and ΔW = 0 at the start."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    layer = BASES[base]()
    cases = [(LohaModule, {}, TrainedLoha, {}, 4)]
    cases += [(LokrModule, {"factor": f, "decompose_both": d}, TrainedLokr, {"factor": f, "decompose_both": d}, r)
              for r, f, d in LOKR_SETTINGS]
    forms = set()
    for reference_class, options, ours_class, our_options, rank in cases:
        torch.manual_seed(7)
        reference = reference_class("m", layer, 1.0, rank, 3.0, **options)
        torch.manual_seed(7)
        ours = ours_class(layer, rank, 3.0, **our_options)
        theirs = dict(reference.named_parameters())
        assert theirs.keys() == dict(ours.named_parameters()).keys()
        for name, parameter in ours.named_parameters():
            assert torch.equal(parameter, theirs[name]), name
        assert ours.alpha / ours.rank == pytest.approx(reference.scale)
        assert torch.count_nonzero(ours.delta()) == 0 and ours.delta().shape == layer.weight.shape
        forms.add(tuple(sorted(theirs)))
    assert len(forms) == 4  # LoHa and three LoKr layouts (W1 full or not, W2 full or not)


def _apply_with_lycoris(path, models: dict[str, nn.Module]) -> int:
    """Build LyCORIS' own module for every layer of a kohya-named file and hook it into ``models`` (what
    ``lycoris.kohya.create_network_from_weights`` does, without its default network, which trips on diffusers'
    UNet); returns how many modules were applied."""
    from lycoris.modules import get_module, make_module

    state = load_file(path)
    names = {name.split(".")[0] for name in state}
    applied = 0
    for prefix, model in models.items():
        for name, layer in model.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name in names:
                kind, params = get_module(state, lora_name)
                module = make_module(kind, params, lora_name, layer)
                module.multiplier = 1.0
                module.apply_to()
                applied += 1
    return applied


def _live_vs_file(layers, adapter, generator):
    """Each live trained layer (base + hook) against the base weight plus the saved module's ΔW."""
    checked = set()
    for key, base in layers.items():
        module = adapter.modules[key]
        weight = base.weight.detach() + module.delta().reshape(base.weight.shape)
        if isinstance(base, nn.Conv2d):
            x = torch.randn(2, base.in_channels, 6, 6, generator=generator)
            expected = F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
        else:
            x = torch.randn(3, base.in_features, generator=generator)
            expected = F.linear(x, weight, base.bias)
        with torch.no_grad():
            got = base(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        checked.add(isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1))
    return checked


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_training_lowers_the_loss_and_lycoris_reads_the_file_to_the_same_model(tiny_sd1, tmp_path, kind):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from loralib.files.header import read_header
    from loralib.training import network

    data = small_dataset(tmp_path / "data", 2)
    options = {"factor": 4, "decompose_both": True, "rank": 2} if kind == "lokr" else {}
    trainer = Trainer(load_config(None, quick_settings(tiny_sd1, data, tmp_path / "out", network_type=kind,
                                                       target_modules="locon", train_text_encoder=True,
                                                       max_train_steps=6, learning_rate=1e-2, **options)))
    trainer.setup()
    before = trainer.evaluation_loss(timesteps=(100, 500, 900))
    result = trainer.run()
    assert trainer.evaluation_loss(timesteps=(100, 500, 900)) < before

    header = read_header(result.save.path)
    assert header.metadata["ss_network_module"] == "lycoris.kohya"
    args = json.loads(header.metadata["ss_network_args"])
    assert args["algo"] == kind and args["conv_dim"] == str(options.get("rank", 4))
    assert (args.get("factor"), args.get("decompose_both")) == (("4", "True") if kind == "lokr" else (None, None))
    prefix = "hada_" if kind == "loha" else "lokr_"
    assert all(n.endswith(".alpha") or n.split(".")[-1].startswith(prefix) for n in header.tensors)
    assert any(n.startswith("lora_te_") for n in header.tensors) and any(n.startswith("lora_unet_") for n in header.tensors)

    # LyCORIS' own modules on a fresh UNet and text encoder compute what the trained ones compute (transformers 5's
    # CLIPTextModel has no text_model level: kohya's lora_te_text_model_ names its layers)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").eval()
    encoder = CLIPTextModel.from_pretrained(tiny_sd1, subfolder="text_encoder").eval()
    assert _apply_with_lycoris(result.save.path, {"lora_unet": unet, "lora_te_text_model": encoder}) == len(result.adapter.modules)
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 77, 768, generator=generator)
    tokens = torch.randint(0, 50, (1, 8), generator=generator)
    live_unet, live_encoder = trainer.base.unet.eval(), trainer.base.text_encoders[0].eval()
    with torch.no_grad():
        expected = live_unet(sample, torch.tensor([500]), hidden).sample
        torch.testing.assert_close(unet(sample, torch.tensor([500]), hidden).sample, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encoder(tokens).last_hidden_state, live_encoder(tokens).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
        plain = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").eval()
        assert not torch.allclose(plain(sample, torch.tensor([500]), hidden).sample, expected, atol=1e-4)
        plain_encoder = CLIPTextModel.from_pretrained(tiny_sd1, subfolder="text_encoder").eval()
        assert not torch.allclose(plain_encoder(tokens).last_hidden_state, live_encoder(tokens).last_hidden_state,
                                  atol=1e-4)

    # lorareg reads the file back to modules whose ΔW is each live layer's
    adapter = loralib.load(result.save.path)
    assert set(adapter.kinds) == {kind} and set(adapter.modules) == set(result.adapter.modules)
    layers = {}
    for model, targets in trainer.targets.values():
        assert set(network.trained_layers(model, targets)) == set(targets.values())
        modules = dict(model.named_modules())
        layers.update({key: modules[name] for name, key in targets.items()})
    assert _live_vs_file(layers, adapter, generator) == {True, False}  # 3x3 convs and the other layers


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_resume_is_bit_exact(tiny_sd1, tmp_path, kind):
    data = small_dataset(tmp_path / "data", 3)
    settings = dict(network_type=kind, target_modules="locon", max_train_steps=4, learning_rate=2e-3,
                    lr_scheduler="cosine", noise_offset=0.05, ema_decay=0.8, caption_dropout=0.3)
    straight = train(load_config(None, quick_settings(tiny_sd1, data, tmp_path / "straight", **settings)))
    config = load_config(None, quick_settings(tiny_sd1, data, tmp_path / "resumed", **settings))
    holder = {}
    holder["t"] = Trainer(config, on_step=lambda report: report.step == 2 and holder["t"].request_stop())
    assert holder["t"].run().steps == 2
    resumed = Trainer(config, resume="latest").run()
    assert resumed.steps == 4
    expected, got = load_file(straight.save.path), load_file(resumed.save.path)
    assert expected.keys() == got.keys() and any(".lokr_" in n or ".hada_" in n for n in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if kind == "lokr":  # another factor shapes other parameters: refused before anything loads
        from loralib.errors import MismatchError

        changed = load_config(None, quick_settings(tiny_sd1, data, tmp_path / "resumed", **{**settings, "factor": 2}))
        with pytest.raises(MismatchError, match=r"different factor \(-1 -> 2\)"):
            Trainer(changed, resume="latest").setup()


def test_formats_and_settings_that_cannot_hold_lycoris_are_refused(tmp_path, lorareg):
    for fmt in ("peft", "diffusers"):
        res = lorareg("train", "--network-type", "lokr", "--output-format", fmt, "--data", tmp_path)
        assert res.code != 0 and len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
        assert f'output_format = "{fmt}" cannot hold LoKr modules' in res.err
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"network_type": "loha", "dropout": 0.1, "loraplus_lr_ratio": 16})
    assert any("LoHa has no input dropout" in p for p in caught.value.problems)
    assert any("LoRA+ speeds up LoRA's up factors" in p for p in caught.value.problems)
    with pytest.raises(ConfigError, match="factor and decompose_both are LoKr settings"):
        load_config(None, {"network_type": "loha", "factor": 8})
    with pytest.raises(ConfigError, match="network.factor: must be -1"):
        load_config(None, {"network_type": "lokr", "factor": 0})
    config = load_config(None, {"network_type": "lokr", "factor": 8, "decompose_both": True})
    assert config.network.factor == 8 and config.network.decompose_both


def test_block_dims_and_lr_weights_reach_lycoris_layers(tiny_sd1, tmp_path):
    """kohya's block-wise ranks, alphas and learning-rate factors apply to LoHa layers as to LoRA ones."""
    from loralib.training import network

    dims = [0] * 25
    dims[1], dims[12] = 2, 3  # down 0 (first part) and the middle
    trainer = Trainer(load_config(None, quick_settings(tiny_sd1, small_dataset(tmp_path / "data", 1), tmp_path / "out",
                                                       network_type="loha", block_dims=dims, down_lr_weight="0,0.5")))
    trainer.setup()
    adapter = trainer.adapter()
    assert {trainer.blocks.layout.block(k) for k in adapter.modules} == {1, 12}
    assert all(m.kind == "loha" and m.rank == (2 if trainer.blocks.layout.block(k) == 1 else 3)
               for k, m in adapter.modules.items())
    learning_rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in trainer.trainable.items():
        key = network.layer_path(name)
        assert key != name and name.split(".")[-1].startswith("hada_w")
        factor = 0.5 if trainer.blocks.layout.block(key) == 1 else 1.0
        assert learning_rates[id(parameter)] == pytest.approx(1e-3 * factor), name
