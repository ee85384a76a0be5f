"""Training on the tiny Flux.1 and SD3 pipelines: flow matching lowers the loss, diffusers loads what was trained.

Oracles:
- the loss: the evaluation loss (every image, fixed noise levels and noise) after 12 steps is
  below the one before;
- diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same tiny pipeline must give the base
  weights plus lorareg's ``ΔW`` for every module of the saved file: the diffusers spelling for
  both families, and the default kohya spelling for Flux.1 (diffusers reads no SD3 kohya file;
  on the 32-wide tiny Flux it cannot split a single block's ``linear1``, see
  tests/test_families_oracle.py, so those modules are checked from the file's raw tensors there);
- the flow-matching objective itself against the formula written out (x_σ = (1−σ)·x0 + σ·ε,
  target ε − x0) with diffusers' own Flux packing.
"""

from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.base_model import pipeline_layers
from loralib.training import Trainer, load_config, train
from tests.helpers.diffusers_oracle import load_with_diffusers, pipeline_class
from tests.helpers.training import quick_settings, small_dataset, train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(max_train_steps=12, batch_size=2, learning_rate=2e-2, alpha=4)


_RUNS: dict[str, dict] = {}


def _run(arch: str, request, tmp_path_factory) -> dict:
    """12 steps on two images, the evaluation loss measured before and after (once per architecture)."""
    if arch not in _RUNS:
        base = request.getfixturevalue(f"tiny_{arch}")
        result = train_and_evaluate(tmp_path_factory.mktemp(f"{arch}-run"), base, 2, (200, 500, 800), **RUN)
        _RUNS[arch] = {**result, "arch": arch}
    return _RUNS[arch]


@pytest.fixture(scope="module", params=["flux", "sd3"])
def run(request, tmp_path_factory):
    return _run(request.param, request, tmp_path_factory)


@pytest.fixture(scope="module")
def flux_run(request, tmp_path_factory):
    return _run("flux", request, tmp_path_factory)


def test_flow_matching_training_lowers_the_loss(run):
    assert run["result"].steps == 12 and not run["result"].interrupted
    assert run["after"] < 0.97 * run["before"], (run["arch"], run["before"], run["after"])


def test_the_file_adapts_the_family_attention_and_feed_forward_layers(run):
    adapter = loralib.load(run["result"].save.path)
    assert adapter.architecture == run["arch"] and run["result"].save.format == "kohya"
    keys = set(adapter.modules)
    assert "transformer.proj_out" not in keys  # the output layer is not a LoRA target
    assert any(k.endswith("attn.add_q_proj") for k in keys) and any(k.endswith("ff_context.net.2") for k in keys)
    if run["arch"] == "flux":
        assert any(k.startswith("transformer.single_transformer_blocks.") and k.endswith("proj_mlp") for k in keys)
    # every layer learned, except the context queries of SD3's last (pre-only) block: its text output is discarded
    dead = {"transformer.transformer_blocks.1.attn.add_q_proj"} if run["arch"] == "sd3" else set()
    assert [k for k, m in adapter.modules.items() if not m.up.abs().max() > 0] == sorted(dead)
    meta = adapter.metadata
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "medium"}[run["arch"]]


def _check_fused(arch, base, path) -> int:
    adapter = loralib.load(path)
    fused, warnings, injected, _ = load_with_diffusers(arch, base, path)
    assert not [w for w in warnings if "unexpected" in w.lower() or "missing" in w.lower()], warnings
    assert injected == len(adapter.modules)  # diffusers placed a LoRA layer for every module of the file
    original = pipeline_layers(pipeline_class(arch).from_pretrained(base))
    fused_layers = pipeline_layers(fused)
    checked = 0
    for key, module in adapter.modules.items():
        expected = original[key].weight.detach() + module.delta()
        torch.testing.assert_close(fused_layers[key].weight.detach(), expected, rtol=1e-5, atol=2e-6)
        checked += 1
    return checked


def test_diffusers_fuses_the_flux_kohya_file_as_base_plus_delta(flux_run):
    path, base = flux_run["result"].save.path, flux_run["base"]
    # diffusers' converter splits linear1 at Flux.1's full widths and fails on the tiny model: the file's other
    # modules, rewritten by lorareg in the same kohya spelling, go through diffusers; linear1 is checked raw below
    single_fused = (".single_transformer_blocks.", ("to_q", "to_k", "to_v", "proj_mlp"))
    trained = loralib.load(path)
    trained.modules = {k: m for k, m in trained.modules.items()
                       if not (single_fused[0] in k and k.endswith(single_fused[1]))}
    subset = loralib.save(trained, path.parent / "without-linear1.safetensors", format="kohya").path
    assert _check_fused("flux", base, subset) == len(trained.modules) >= 20
    # the single blocks' fused linear1, from the file's own tensors: rows [q; k; v; mlp]
    from safetensors.torch import load_file

    raw = load_file(path)
    adapter = loralib.load(path)
    for block in (0, 1):
        name = f"lora_unet_single_blocks_{block}_linear1"
        down, up = raw[f"{name}.lora_down.weight"].double(), raw[f"{name}.lora_up.weight"].double()
        dense = up @ down * float(raw[f"{name}.alpha"]) / down.shape[0]
        prefix = f"transformer.single_transformer_blocks.{block}"
        ours = torch.cat([adapter.modules[f"{prefix}.{part}"].delta().double()
                          for part in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
        torch.testing.assert_close(dense, ours, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_diffusers_output_loads_every_module_exactly(arch, request, tmp_path):
    base = request.getfixturevalue(f"tiny_{arch}")
    data = small_dataset(tmp_path / "data", 1)
    result = train(load_config(None, quick_settings(base, data, tmp_path / "out", output_format="diffusers",
                                                    max_train_steps=2, learning_rate=1e-2)))
    adapter = loralib.load(result.save.path)
    assert _check_fused(arch, base, result.save.path) == len(adapter.modules) > 10


def test_resume_is_bit_exact_on_flux(tiny_flux, tmp_path):
    data = small_dataset(tmp_path / "data", 2)
    settings = dict(max_train_steps=4, batch_size=1, learning_rate=2e-3, caption_dropout=0.3, noise_offset=0.05,
                    weighting_scheme="logit_normal", save_every_n_steps=2)
    straight = train(load_config(None, quick_settings(tiny_flux, data, tmp_path / "a", **settings)))
    holder = {}
    trainer = Trainer(load_config(None, quick_settings(tiny_flux, data, tmp_path / "b", **settings)),
                      on_step=lambda report: report.step == 2 and holder["t"].request_stop())
    holder["t"] = trainer
    assert trainer.run().interrupted
    resumed = train(load_config(None, quick_settings(tiny_flux, data, tmp_path / "b", **settings)), resume="latest")
    assert resumed.steps == 4
    a, b = loralib.load(straight.save.path), loralib.load(resumed.save.path)
    for key in a.modules:
        assert torch.equal(a.modules[key].up, b.modules[key].up) and torch.equal(a.modules[key].down, b.modules[key].down)


def test_objective_is_rectified_flow_with_diffusers_packing(tiny_flux, tmp_path):
    """One loss at a fixed noise level, recomputed from the formula with the transformer called directly."""
    from diffusers import FluxPipeline

    data = small_dataset(tmp_path / "data", 1)
    trainer = Trainer(load_config(None, quick_settings(tiny_flux, data, tmp_path / "out", cache_latents=False)))
    trainer.setup()
    objective = trainer.objective
    batch = objective.evaluation_batch(trainer.dataset, trainer.plan, 0)
    with torch.no_grad():
        loss = objective.loss(batch, torch.Generator().manual_seed(3), torch.tensor([400]), dropout=False)
        draws = objective.draws(batch, torch.Generator().manual_seed(3))
        x0, _ = objective.latents(batch, draws["latent"])
        noise, sigma = draws["noise"], 0.4  # Flux trains on unshifted levels: timestep 400 is σ = 0.4
        noisy = (1 - sigma) * x0 + sigma * noise
        pipe = FluxPipeline.from_pretrained(tiny_flux)
        hidden, pooled, text_ids = pipe.encode_prompt(batch["captions"], None, max_sequence_length=77)
        b, c, h, w = noisy.shape
        prediction = pipe.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=torch.tensor([sigma]),
            guidance=torch.tensor([3.5]), pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False)[0]
        prediction = FluxPipeline._unpack_latents(prediction, h * 8, w * 8, 8)
        expected = ((prediction - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_noise_prediction_options_are_refused_for_flow_models(tiny_sd3, tmp_path):
    from loralib.errors import InvalidArgumentError

    data = small_dataset(tmp_path / "data", 1)
    trainer = Trainer(load_config(None, quick_settings(tiny_sd3, data, tmp_path / "out", snr_gamma=5.0)))
    with pytest.raises(InvalidArgumentError, match="snr_gamma applies to noise-prediction models"):
        trainer.setup()


def test_flux_block_presets_choose_double_and_single_blocks(tiny_flux, tmp_path):
    data = small_dataset(tmp_path / "data", 1)
    result = train(load_config(None, quick_settings(tiny_flux, data, tmp_path / "out", max_train_steps=1,
                                                    train_double_block_indices="1", train_single_block_indices="0")))
    adapter = loralib.load(result.save.path)
    blocks = {k.split(".")[1] + "." + k.split(".")[2] for k in adapter.modules}
    assert blocks == {"transformer_blocks.1", "single_transformer_blocks.0"}
    assert json.loads(adapter.metadata["ss_network_args"]) == {"train_double_block_indices": "1",
                                                               "train_single_block_indices": "0"}
    doubles = train(load_config(None, quick_settings(tiny_flux, data, tmp_path / "double", max_train_steps=1,
                                                     train_blocks="double")))
    keys = loralib.load(doubles.save.path).modules
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)


@pytest.mark.parametrize("arch, settings, message", [
    ("sd3", {"train_blocks": "single"}, "has no single blocks"),
    ("flux", {"block_dims": ",".join(["4"] * 25)}, "kohya's UNet block layout"),
    ("sd1", {"train_double_block_indices": "0-3"}, "choose Flux.1/SD3 transformer blocks"),
    # kohya names fuse Flux.1/SD3 layers: a DoRA, LoHa or LoKr network would train and then fail to save
    ("flux", {"network_type": "loha"}, "trained for SD1.x, SD2.x and SDXL only"),
    ("sd3", {"network_type": "lokr"}, "trained for SD1.x, SD2.x and SDXL only"),
    ("flux", {"network_type": "dora"}, "fused layers hold plain LoRA factors only"),
])
def test_settings_the_base_cannot_take_are_refused_before_training(arch, settings, message, request, tmp_path):
    from loralib.errors import InvalidArgumentError

    base = request.getfixturevalue(f"tiny_{arch}")
    data = small_dataset(tmp_path / "data", 1)
    trainer = Trainer(load_config(None, quick_settings(base, data, tmp_path / "out", **settings)))
    with pytest.raises(InvalidArgumentError, match=message):
        trainer.setup()
    assert not (tmp_path / "out" / "t.safetensors").exists()


# sd-scripts' per-kind ranks (networks/lora_flux.py, lora_sd3.py): the diffusers layers of each kind
_FLUX_KINDS = {"img_attn_dim": (2, r"^transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0)$"),
               "txt_attn_dim": (0, r"^transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out)$"),
               "img_mlp_dim": (3, r"^transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$"),
               "img_mod_dim": (5, r"^transformer_blocks\.\d+\.norm1\.linear$"),
               "single_dim": (6, r"^single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out)$")}
_SD3_KINDS = {"x_attn_dim": (2, r"^transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0)$"),
              "context_mlp_dim": (0, r"^transformer_blocks\.\d+\.ff_context\.net\.(0\.proj|2)$"),
              "context_mod_dim": (3, r"^transformer_blocks\.\d+\.norm1_context\.linear$")}


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_per_kind_ranks_are_the_files_ranks_and_diffusers_loads_them(arch, request, tmp_path):
    import re

    base = request.getfixturevalue(f"tiny_{arch}")
    kinds = _FLUX_KINDS if arch == "flux" else _SD3_KINDS
    data = small_dataset(tmp_path / "data", 1)
    result = train(load_config(None, quick_settings(base, data, tmp_path / "out", output_format="diffusers",
                                                    max_train_steps=2, learning_rate=1e-2,
                                                    **{k: r for k, (r, _) in kinds.items()})))
    adapter = loralib.load(result.save.path)
    layers = pipeline_layers(pipeline_class(arch).from_pretrained(base))
    expected = {}
    for key in layers:
        if not key.startswith("transformer.") or key == "transformer.proj_out":
            continue
        path = key.split(".", 1)[1]
        chosen = [r for r, pattern in kinds.values() if re.search(pattern, path)]
        if chosen:
            expected[key] = chosen[0]
        elif re.search(r"\.(attn2?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|"
                       r"proj_mlp|proj_out)$", path):
            expected[key] = 4  # every other default target keeps the rank
    expected = {k: r for k, r in expected.items() if r > 0}
    assert {k: m.rank for k, m in adapter.modules.items()} == expected
    meta = json.loads(adapter.metadata["ss_network_args"])
    assert meta == {k: str(r) for k, (r, _) in kinds.items()}
    assert _check_fused(arch, base, result.save.path) == len(adapter.modules)


def test_per_kind_ranks_of_the_other_family_are_refused(tiny_sd3, tmp_path):
    from loralib.errors import InvalidArgumentError

    data = small_dataset(tmp_path / "data", 1)
    with pytest.raises(InvalidArgumentError, match="img_attn_dim name Flux.1 layers"):
        train(load_config(None, quick_settings(tiny_sd3, data, tmp_path / "out", max_train_steps=1, img_attn_dim=2)))


def test_in_dims_train_the_flux_input_layers_at_their_ranks(tiny_flux, tmp_path):
    data = small_dataset(tmp_path / "data", 1)
    result = train(load_config(None, quick_settings(tiny_flux, data, tmp_path / "out", output_format="diffusers",
                                                    max_train_steps=2, learning_rate=1e-2, in_dims="[3,0,2,0,5]",
                                                    train_blocks="double", train_double_block_indices="0")))
    adapter = loralib.load(result.save.path)
    inputs = {k: m.rank for k, m in adapter.modules.items() if "blocks" not in k}
    assert inputs == {"transformer.x_embedder": 3, "transformer.time_text_embed.text_embedder.linear_1": 2,
                      "transformer.time_text_embed.text_embedder.linear_2": 2, "transformer.context_embedder": 5}
    assert json.loads(adapter.metadata["ss_network_args"])["in_dims"] == "[3,0,2,0,5]"
    assert _check_fused("flux", tiny_flux, result.save.path) == len(adapter.modules)
