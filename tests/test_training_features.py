"""The trainer features users compare trainers on: validation loss, EMA, optimizers (Prodigy,
Adafactor with the fused backward pass, LoRA+), loss options (masks, Huber, debiased estimation,
multires noise), block-wise ranks and learning rates, DoRA, fp8 base weights, gradient
checkpointing and the disk cache. Each runs a few steps on the tiny pipelines; the oracles are
the formulas sd-scripts documents, peft's own loader, and runs without the feature.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import loralib
from loralib.training import Trainer, load_config, train
from tests.helpers.training import quick_settings, small_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def _trainer(base, data, out, **settings) -> Trainer:
    trainer = Trainer(load_config(None, quick_settings(base, data, out, **settings)))
    trainer.setup()
    return trainer


# --- validation and EMA ----------------------------------------------------------------------------------


def test_validation_loss_is_held_out_fixed_and_logged_and_ema_is_saved(tiny_sd1, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = small_dataset(tmp_path / "data", 4)
    trainer = _trainer(tiny_sd1, data, tmp_path / "out", max_train_steps=4, validation_split=0.25,
                       validate_every_n_steps=2, ema_decay=0.5, ema_on_cpu=True, learning_rate=1e-2,
                       tensorboard=True)
    held = {r.path for r in trainer.validation.records}
    assert len(held) == 1 and not held & {r.path for r in trainer.dataset.records}  # never trained on
    before = trainer.validation_loss()
    assert trainer.validation_loss() == before  # fixed timesteps and noise: the same weights, the same number
    result = trainer.run()
    assert [step for step, _ in result.validation_losses] == [2, 4]
    assert result.validation_losses[-1][1] == trainer.validation_loss() != before
    report = result.to_dict()  # what lorareg train --json prints
    assert report["validation_loss"] == result.validation_losses[-1][1] and len(report["validation_losses"]) == 2
    events = EventAccumulator(str(tmp_path / "out" / "runs" / "t")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [
        (step, pytest.approx(loss)) for step, loss in result.validation_losses]
    meta = loralib.inspect(result.save.path).metadata
    assert meta["ss_num_train_images"] == "3" and meta["ss_num_validation_images"] == "1"
    assert meta["ss_validation_split"] == "0.25" and meta["ss_validate_every_n_steps"] == "2"

    # save_ema: the adapter holds the moving average, the checkpoint both the average and the raw weights
    ema = load_file(result.checkpoint / "ema.safetensors")
    raw = load_file(result.checkpoint / "trainable.safetensors")
    adapter = loralib.load(result.save.path)
    for key, module in adapter.modules.items():
        assert torch.equal(module.down, ema[f"{key}.lora_A.default.weight"]), key
        assert torch.equal(module.up, ema[f"{key}.lora_B.default.weight"]), key
    assert any(not torch.equal(ema[name], raw[name]) for name in raw)
    assert all(torch.equal(raw[name], p.detach()) for name, p in trainer.trainable.items())  # live weights restored


def test_ema_follows_its_formula():
    from loralib.training.ema import EMA

    parameter = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"p": parameter}, decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 40):
        with torch.no_grad():
            parameter.add_(1.0)
        ema.update(step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * parameter.detach()
        torch.testing.assert_close(ema.shadow["p"], expected)
    with ema.swapped_in():
        assert torch.equal(parameter.detach(), ema.shadow["p"])
    assert torch.equal(parameter.detach(), torch.full((3,), 39.0))


# --- optimizers ------------------------------------------------------------------------------------------


def test_fused_backward_pass_makes_the_same_updates_as_a_plain_step(tiny_sd1, tmp_path):
    data = small_dataset(tmp_path / "data", 2)
    common = dict(max_train_steps=3, optimizer="adafactor", learning_rate=1e-2, max_grad_norm=None, dropout=0.1)
    plain = train(load_config(None, quick_settings(tiny_sd1, data, tmp_path / "plain", **common)))
    fused = train(load_config(None, quick_settings(tiny_sd1, data, tmp_path / "fused", fused_backward_pass=True,
                                                   **common)))
    a, b = load_file(plain.save.path), load_file(fused.save.path)
    assert a.keys() == b.keys() and any(t.abs().max() > 0 for n, t in a.items() if "lora_up" in n)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert plain.losses == fused.losses
    optimizer = loralib.inspect(fused.save.path).metadata["ss_optimizer"]
    assert optimizer.startswith("transformers.optimization.Adafactor(") and "relative_step=False" in optimizer


def test_prodigy_trains_with_its_arguments(tiny_sd1, tmp_path):
    data = small_dataset(tmp_path / "data", 2)
    trainer = _trainer(tiny_sd1, data, tmp_path / "out", max_train_steps=3, optimizer="prodigy", learning_rate=1.0,
                       optimizer_args=["d_coef=2", "safeguard_warmup=true"])
    group = trainer.optimizer.param_groups[0]
    assert group["d_coef"] == 2 and group["safeguard_warmup"] is True
    result = trainer.run()
    adapter = loralib.load(result.save.path)
    assert all(m.up.abs().max() > 0 for m in adapter.modules.values())
    assert adapter.metadata["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy(weight_decay=0.01, d_coef=2")

    from loralib.training.optimizers import build_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in (1.0, 16.0)]  # LoRA+ groups
    with pytest.raises(loralib.errors.InvalidArgumentError, match="prodigy takes one learning rate for every layer"):
        build_optimizer(groups, load_config(None, {"optimizer": "prodigy"}))
    with pytest.raises(loralib.errors.InvalidArgumentError, match="optimizer adamw has no argument 'd_coef'"):
        build_optimizer(groups, load_config(None, {"optimizer_args": ["d_coef=2"]}))


# --- block-wise ranks and learning rates, LoRA+ -----------------------------------------------------------------


def test_block_numbers_follow_kohyas_sgm_layout():
    """kohya numbers blocks by the SGM UNet: SD1 input block n is block n, SDXL's is n + 1; the middle block is
    12 (SD1) or 10-12 (SDXL); output block m is 13 + m. Checked on every layer of the full-size UNets."""
    from loralib.base_model import full_size_layers
    from loralib.naming.sgm import UNetLayout, diffusers_to_sgm
    from loralib.training.blocks import LAYOUTS, preset_weights

    sgm_layouts = {"sd1": UNetLayout(2, (True, True, True, False), (False, True, True, True)),
                   "sdxl": UNetLayout(2, (False, True, True), (True, True, False))}
    for architecture, sgm_layout in sgm_layouts.items():
        layout, checked = LAYOUTS[architecture], 0
        for key in (k for k in full_size_layers(architecture) if k.startswith("unet.")):
            parts = diffusers_to_sgm(key.removeprefix("unet."), sgm_layout).split(".")
            number = int(parts[1]) if parts[0] in ("input_blocks", "middle_block", "output_blocks") else None
            if parts[0] == "input_blocks" and number > 0:
                expected = number + (1 if architecture == "sdxl" else 0)
            elif parts[0] == "middle_block":
                expected = 10 + number if architecture == "sdxl" else 12
            elif parts[0] == "output_blocks":
                expected = 13 + number
            else:  # conv_in, time and label embeddings, the output layers: outside kohya's numbered blocks
                expected = None
            assert layout.block(key) == expected, (architecture, key)
            checked += expected is not None
        assert checked > 250
    assert preset_weights("linear", 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert preset_weights("cosine+0.5", 3) == pytest.approx([1.5, 0.5 + math.sin(math.pi / 4), 0.5])


def test_block_dims_lr_weights_and_loraplus(tiny_sd1, tmp_path):
    data = small_dataset(tmp_path / "data", 1)
    dims = [0] * 25
    dims[1], dims[12], dims[17] = 2, 3, 4  # down 0 (first part), the middle, up 1 (second part)
    alphas = [1.0] * 25
    alphas[17] = 8.0
    up_weights = [1.0] * 12
    up_weights[4] = 0.0  # block 17's factor 0: kohya leaves such a block out
    trainer = _trainer(tiny_sd1, data, tmp_path / "out", block_dims=dims, block_alphas=alphas,
                       down_lr_weight="0,0.5", up_lr_weight=up_weights, loraplus_lr_ratio=16, learning_rate=1e-3)
    adapter = trainer.adapter()
    blocks = {trainer.blocks.layout.block(k) for k in adapter.modules}
    assert blocks == {1, 12}  # block 17 had rank 4 but learning-rate factor 0
    for key, module in adapter.modules.items():
        block = trainer.blocks.layout.block(key)
        assert (module.rank, module.alpha) == ((2, 1.0) if block == 1 else (3, 1.0)), key
    args = json.loads(adapter.metadata["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["loraplus_lr_ratio"] == "16.0"
    assert args["down_lr_weight"] == "0,0.5"
    learning_rates = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            learning_rates[id(parameter)] = group["lr"]
    for name, parameter in trainer.trainable.items():
        key = name.split(".lora_")[0]
        factor = 0.5 if trainer.blocks.layout.block(key) == 1 else 1.0  # block 1 is down_lr_weight's second value
        expected = 1e-3 * factor * (16 if ".lora_B." in name else 1)
        assert learning_rates[id(parameter)] == pytest.approx(expected), name


# --- loss options ----------------------------------------------------------------------------------------------


def test_huber_schedules_and_losses_follow_sd_scripts():
    from diffusers import DDPMScheduler

    from loralib.training.config import TrainConfig
    from loralib.training.objective import Objective

    objective = Objective.__new__(Objective)
    objective.noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 250, 999])
    alphas = objective.noise_scheduler.alphas_cumprod[t]
    sigmas = ((1 - alphas) / alphas).sqrt()
    for schedule, expected in (("constant", torch.full((3,), 0.2 * 3.0)),
                               ("exponential", 3.0 * torch.exp(math.log(0.2) / 1000 * t.float())),
                               ("snr", 0.8 / (1 + sigmas) ** 2 + 0.2)):
        objective.config = TrainConfig.model_validate({"training": {"huber_c": 0.2, "huber_scale": 3.0,
                                                                    "huber_schedule": schedule, "loss_type": "huber"}})
        torch.testing.assert_close(objective.huber_threshold(t), expected.float())
    objective.config = TrainConfig.model_validate({"training": {"huber_c": 0.5, "huber_schedule": "constant",
                                                                "loss_type": "huber"}})
    prediction, target = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, -1.0]])
    huber = objective._elementwise(prediction, target, torch.tensor([10]))
    torch.testing.assert_close(huber, torch.tensor([[0.0, 2 * 0.5 * (math.sqrt(16 + 0.25) - 0.5)]]))
    objective.config.training.loss_type = "smooth_l1"
    torch.testing.assert_close(objective._elementwise(prediction, target, torch.tensor([10])), huber / 0.5)


def test_pyramid_noise_is_unit_variance_and_reproducible():
    from loralib.training.objective import pyramid_noise

    base = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    a = pyramid_noise(base, torch.Generator().manual_seed(2), iterations=6, discount=0.8)
    b = pyramid_noise(base, torch.Generator().manual_seed(2), iterations=6, discount=0.8)
    assert torch.equal(a, b) and a.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(a, base / base.std())  # the coarser levels changed it
    low = torch.nn.functional.avg_pool2d(a, 8).std() / torch.nn.functional.avg_pool2d(base / base.std(), 8).std()
    assert low > 2  # much more energy at low frequencies than white noise


def test_masked_loss_and_debiased_estimation(tiny_sd1, tmp_path):
    from PIL import Image

    data = small_dataset(tmp_path / "data", 2)
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in (data / "images").iterdir():
        Image.new("L", (64, 64), 255).save(masks / image.name)
    timestep = (600,)
    plain = _trainer(tiny_sd1, data, tmp_path / "plain")
    expected = plain.evaluation_loss(timesteps=timestep)
    white = _trainer(tiny_sd1, data, tmp_path / "white", masked_loss=True, mask_dir=masks)
    assert white.evaluation_loss(timesteps=timestep) == pytest.approx(expected, rel=1e-6)
    for image in (data / "images").iterdir():
        Image.new("L", (64, 64), 0).save(masks / image.name)
    # no latent cache (random flip): the masks are loaded with their images at every step
    black = _trainer(tiny_sd1, data, tmp_path / "black", masked_loss=True, mask_dir=masks, random_flip=True)
    assert black.evaluation_loss(timesteps=timestep) == 0.0
    # debiased estimation divides each sample's loss by sqrt(SNR(t))
    from diffusers.training_utils import compute_snr

    snr = compute_snr(plain.objective.noise_scheduler, torch.tensor(timestep)).item()
    plain.config.training.debiased_estimation = True
    assert plain.evaluation_loss(timesteps=timestep) == pytest.approx(expected / math.sqrt(snr), rel=1e-5)


# --- DoRA, fp8 base weights, gradient checkpointing, the disk cache -----------------------------------------------


def test_dora_is_saved_as_dora_modules_that_peft_and_lorareg_read_exactly(tiny_sd1, tmp_path):
    """A DoRA run saves DoRA modules: the PEFT folder loads into peft exactly, and a kohya file (LyCORIS'
    dora_scale) read back by lorareg gives every layer the weight of the live peft layer."""
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from loralib.files.header import read_header
    from loralib.training import network

    data = small_dataset(tmp_path / "data", 1)
    trainer = _trainer(tiny_sd1, data, tmp_path / "out", network_type="dora", output_format="peft",
                       target_modules="locon", max_train_steps=2, learning_rate=1e-2)
    result = trainer.run()
    folder = result.save.path.parent
    assert folder.name == "t_peft" and json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    tensors = load_file(folder / "adapter_model.safetensors")
    assert any(name.endswith(".lora_magnitude_vector") for name in tensors)
    assert json.loads(read_header(folder / "adapter_model.safetensors").metadata["ss_network_args"])["dora_wd"] == "True"
    fresh = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet"), folder)
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 77, 768, generator=generator)
    live = trainer.base.unet.eval()
    with torch.no_grad():
        expected = live(sample, torch.tensor([500]), hidden).sample
        got = fresh.eval()(sample, torch.tensor([500]), hidden).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        base_only = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")(sample, torch.tensor([500]),
                                                                                      hidden).sample
    assert not torch.allclose(base_only, expected)  # the DoRA layers changed the output

    # the same modules in kohya format, read back by lorareg, against each live peft layer
    kohya = loralib.save(result.adapter, tmp_path / "dora.safetensors", format="kohya", dtype=torch.float32).path
    adapter = loralib.load(kohya)
    layers = network.lora_layers(live, trainer.targets["unet"][1])
    assert set(adapter.modules) == set(layers) and {m.kind for m in adapter.modules.values()} == {"dora"}
    assert {m.is_conv for m in adapter.modules.values()} == {True, False}  # locon: linear and conv layers
    for key, layer in layers.items():
        base = layer.get_base_layer()
        weight = base.weight.detach() + adapter.modules[key].delta(base=base.weight.detach())
        x = torch.randn(2, *((base.in_channels, 6, 6) if isinstance(base, torch.nn.Conv2d) else (base.in_features,)),
                        generator=generator)
        with torch.no_grad():
            want = layer(x)
            if isinstance(base, torch.nn.Conv2d):
                have = F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
            else:
                have = F.linear(x, weight, base.bias)
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5, msg=key)


def test_fp8_base_weights_need_a_gpu_and_compute_like_rounded_weights(tiny_sd1, tmp_path, lorareg):
    from loralib.training.fp8 import store_in_fp8

    data = small_dataset(tmp_path / "data", 1)
    res = lorareg("train", "--base", tiny_sd1, "--data", data, "-o", tmp_path / "out", "--base-weights-dtype",
                  "fp8_e4m3fn", "--max-train-steps", "1", "--no-tensorboard")
    assert res.code == 1 and "base_weights_dtype = fp8_e4m3fn needs a CUDA GPU; this run is on cpu" in res.err
    assert "Traceback" not in res.err

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, stride=2), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 4 * 4, 6)).requires_grad_(False)
    rounded = {name: t.to(torch.float8_e4m3fn).float() for name, t in model.state_dict().items() if "weight" in name}
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1, stride=2), torch.nn.Flatten(),
                                    torch.nn.Linear(5 * 4 * 4, 6))
    reference.load_state_dict({**model.state_dict(), **rounded})
    assert store_in_fp8(model, torch.float8_e4m3fn, torch.float32) == 2
    assert model[0].weight.dtype == torch.float8_e4m3fn and model[2].weight.dtype == torch.float8_e4m3fn
    x = torch.randn(2, 3, 8, 8)
    scale = [torch.ones(1, 3, 1, 1, requires_grad=True) for _ in range(2)]
    got, expected = model(x * scale[0]), reference(x * scale[1])
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(scale[0].grad, scale[1].grad, rtol=1e-5, atol=1e-5)

    # the whole tiny UNet with LoRA layers: stored in fp8, it computes what the rounded float32 UNet computes
    from diffusers import UNet2DConditionModel

    from loralib.training import network

    unets = [UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet") for _ in range(2)]
    for unet in unets:
        targets = network.target_layers("unet", unet, "locon")
        torch.manual_seed(1)
        network.add_lora(unet, network.layer_settings(unet, targets, rank=2, alpha=2, conv_rank=2, conv_alpha=2),
                         dropout=0.0)
        for name, parameter in unet.named_parameters():
            if name.endswith("lora_B.default.weight"):
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    converted = store_in_fp8(unets[0], torch.float8_e4m3fn, torch.float32)
    assert converted > 20
    with torch.no_grad():
        for module in unets[1].modules():
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and not module.weight.requires_grad:
                module.weight.copy_(module.weight.to(torch.float8_e4m3fn).float())
    generator = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 4, 4, generator=generator), torch.randn(1, 77, 768, generator=generator)
    outputs = [unet(sample, torch.tensor([300]), hidden).sample for unet in unets]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    for output in outputs:
        output.square().mean().backward()
    grads = [{n: p.grad for n, p in unet.named_parameters() if p.requires_grad} for unet in unets]
    assert grads[0].keys() == grads[1].keys() and all(g is not None and g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5)


def test_gradient_checkpointing_trains_the_same_sdxl_adapter(tiny_sdxl, tmp_path):
    data = small_dataset(tmp_path / "data", 1)
    common = dict(max_train_steps=2, learning_rate=1e-2, train_text_encoder=True, target_modules="attention")
    plain = train(load_config(None, quick_settings(tiny_sdxl, data, tmp_path / "plain", **common)))
    checkpointed = train(load_config(None, quick_settings(tiny_sdxl, data, tmp_path / "gc", gradient_checkpointing=True,
                                                          **common)))
    a, b = load_file(plain.save.path), load_file(checkpointed.save.path)
    assert a.keys() == b.keys() and any(n.startswith("lora_te2_") for n in a)
    for name in a:  # every LoRA layer, text encoders included, got the same gradients
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert any(a[name].abs().max() > 0 for name in a if name.startswith("lora_te") and ".lora_up." in name)


def test_disk_cache_is_reused_and_keyed_by_what_it_depends_on(tiny_sd1, tmp_path):
    data = small_dataset(tmp_path / "data", 2)
    cache = tmp_path / "cache"

    def run(name: str, **settings):
        phases: dict[str, int] = {}

        def on_phase(description: str, done: int, total: int) -> None:
            if description.startswith("caching"):
                phases[description] = total

        config = load_config(None, quick_settings(tiny_sd1, data, tmp_path / name, max_train_steps=2, **settings))
        return Trainer(config, on_phase=on_phase).run(), phases

    memory, _ = run("memory")
    first, phases = run("disk1", cache_to_disk=True, cache_dir=cache)
    assert phases == {"caching latents": 2, "caching captions": 3}  # 2 images; 2 captions and the empty one
    assert len(list(cache.rglob("*.safetensors"))) == 5
    assert all(torch.equal(a, b) for a, b in zip(load_file(memory.save.path).values(),
                                                 load_file(first.save.path).values(), strict=True))
    image = next((data / "images").iterdir())
    image.write_bytes(image.read_bytes())  # a new modification time: this image's latent is computed again
    caption = next((data / "texts").iterdir())
    caption.write_text(caption.read_text() + ", new tag")
    again, phases = run("disk2", cache_to_disk=True, cache_dir=cache)
    assert phases == {"caching latents": 1, "caching captions": 1}
    unchanged, phases = run("disk3", cache_to_disk=True, cache_dir=cache)
    assert phases == {"caching latents": 0, "caching captions": 0}
    assert all(torch.equal(a, b) for a, b in zip(load_file(again.save.path).values(),
                                                 load_file(unchanged.save.path).values(), strict=True))
    _, phases = run("disk4", cache_to_disk=True, cache_dir=cache, resolution=48)
    assert phases["caching latents"] == 2  # another training size: new entries
