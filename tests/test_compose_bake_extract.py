"""bake (LoRAs fused into a base model) and extract (a LoRA from two models), with outside oracles."""

from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.compose import bake, extract
from loralib.compose.model_weights import ModelWeights
from loralib.errors import CorruptFileError, InvalidArgumentError, MismatchError, NotALoraError, OutputExistsError
from loralib.files.header import read_header
from loralib.layers import select_layers
from loralib.metadata import history
from loralib.synthetic import random_adapter
from tests.helpers.compose_cases import optimal_error, relative, single_file_checkpoint

SUBSET = ("unet.down_blocks.0.", "unet.mid_block.", "unet.up_blocks.1.attentions.0.",
          "text_encoder.text_model.encoder.layers.1.", "text_encoder_2.text_model.encoder.layers.0.")


def _layers(base, conv=False, subset=SUBSET):
    with ModelWeights.open(base) as model:
        chosen = select_layers(model.shapes(), conv=conv)
    return {k: s for k, s in chosen.items() if k.startswith(subset)}


def _weights(model_path) -> dict[str, torch.Tensor]:
    with ModelWeights.open(model_path) as model:
        return {k: model.read(k) for k in model.slots}


@pytest.fixture(scope="module")
def sdxl_checkpoint(tiny_sdxl, tmp_path_factory):
    """The tiny SDXL pipeline as one original-layout checkpoint, checked against diffusers' converters."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    path = single_file_checkpoint(tiny_sdxl, tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors")
    checkpoint = load_file(path)
    unet = convert_ldm_unet_checkpoint(checkpoint, json.loads((tiny_sdxl / "unet" / "config.json").read_text()))
    assert _same(unet, load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors"))
    te1 = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    assert _same(te1, load_file(tiny_sdxl / "text_encoder" / "model.safetensors"))
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")
    te2 = convert_open_clip_checkpoint(encoder, checkpoint, prefix="conditioner.embedders.1.model.")
    assert _same(te2, load_file(tiny_sdxl / "text_encoder_2" / "model.safetensors"))
    return path


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_bake_folder_matches_diffusers_fuse(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    layers = _layers(tiny_sd1, conv=True)
    a = random_adapter(layers, 4, 2.0, seed=1, architecture="sd1")
    b = random_adapter(layers, 6, 6.0, seed=2, architecture="sd1", conv_rank=2)
    paths = [loralib.save(a, tmp_path / "a.safetensors").path, loralib.save(b, tmp_path / "b.safetensors").path]
    weights = [0.8, -0.4]
    result = bake(tiny_sd1, list(zip(paths, weights)), tmp_path / "baked")
    assert result.kind == "diffusers" and result.modules == len(layers) and result.layers == len(layers)
    assert (tmp_path / "baked" / "model_index.json").read_bytes() == (tiny_sd1 / "model_index.json").read_bytes()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    for path, name in zip(paths, ("a", "b")):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["a", "b"], weights)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked")  # the folder loads as a pipeline
    for component in ("unet", "text_encoder", "vae"):
        expected, actual = getattr(pipe, component).state_dict(), getattr(baked, component).state_dict()
        assert set(actual) == set(expected)
        for name, tensor in expected.items():
            assert torch.allclose(actual[name], tensor, atol=1e-6, rtol=0), name
    # and directly: W + Σ w·ΔW in float32
    before, after = _weights(tiny_sd1), _weights(tmp_path / "baked")
    for key in before:
        if key in layers:
            delta = 0.8 * a.modules[key].delta() - 0.4 * b.modules[key].delta()
            assert torch.allclose(after[key], before[key] + delta.reshape(before[key].shape), atol=1e-7, rtol=0), key
        else:
            assert torch.equal(after[key], before[key]), key
    record = history(read_header(tmp_path / "baked" / "unet" / "diffusion_pytorch_model.safetensors").metadata)[-1]
    assert record["operation"] == "bake" and [i["weight"] for i in record["inputs"]] == weights


def test_bake_single_file_matches_the_folder_bake(tiny_sdxl, sdxl_checkpoint, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    layers = _layers(tiny_sdxl, conv=True)
    assert any(k.endswith("self_attn.q_proj") and k.startswith("text_encoder_2.") for k in layers)
    lora = random_adapter(layers, 4, 8.0, seed=3, architecture="sdxl", conv_rank=2)
    folder = bake(tiny_sdxl, [(lora, 0.75)], tmp_path / "folder")
    single = bake(sdxl_checkpoint, [(lora, 0.75)], tmp_path / "single.safetensors")
    assert single.kind == "checkpoint" and single.modules == folder.modules
    # diffusers' converters read the baked checkpoint back into diffusers names: same weights as the folder bake
    checkpoint = load_file(tmp_path / "single.safetensors")
    unet = convert_ldm_unet_checkpoint(checkpoint, json.loads((tiny_sdxl / "unet" / "config.json").read_text()))
    assert _same(unet, load_file(tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors"))
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")
    te2 = convert_open_clip_checkpoint(encoder, checkpoint, prefix="conditioner.embedders.1.model.")
    assert _same(te2, load_file(tmp_path / "folder" / "text_encoder_2" / "model.safetensors"))
    original = load_file(sdxl_checkpoint)
    assert torch.equal(checkpoint["first_stage_model.decoder.conv_in.weight"],
                       original["first_stage_model.decoder.conv_in.weight"])


def test_bake_refuses_before_writing(tiny_sd1, tiny_sdxl, sdxl_checkpoint, tmp_path):
    sdxl_lora = random_adapter(_layers(tiny_sdxl), 2, 2.0, seed=4, architecture="sdxl")
    with pytest.raises(MismatchError, match="not in"):
        bake(tiny_sd1, [(sdxl_lora, 1.0)], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        bake(tiny_sdxl, [(sdxl_lora, 1.0)], existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(InvalidArgumentError, match="folder"):
        bake(tiny_sdxl, [(sdxl_lora, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(InvalidArgumentError, match=r"\.safetensors file"):
        bake(sdxl_checkpoint, [(sdxl_lora, 1.0)], tmp_path / "folder_out")
    lora_file = loralib.save(sdxl_lora, tmp_path / "l.safetensors").path
    with pytest.raises(NotALoraError, match="LoRA adapter, not a base model"):
        bake(lora_file, [(sdxl_lora, 1.0)], tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "l.safetensors"]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_extract_recovers_a_known_low_rank_difference(tiny_sd1, tmp_path, svd):
    layers = _layers(tiny_sd1)
    known = random_adapter(layers, 4, 64.0, seed=5, architecture="sd1")  # large ΔW: well above fp32 noise
    tuned = bake(tiny_sd1, [(known, 1.0)], tmp_path / "tuned").path
    result = extract(tiny_sd1, tuned, rank=4, svd=svd)
    assert set(result.adapter.modules) == set(known.modules)  # untouched layers are left out
    assert result.report.notes and "left out" in result.report.notes[0]
    for key, module in known.modules.items():
        extracted = result.adapter.modules[key]
        assert extracted.rank == 4 and extracted.weight_shape == module.weight_shape
        assert relative(extracted.delta(), module.delta()) <= 1e-4, key
        assert result.report.modules[key].retained > 0.9999
    assert result.adapter.architecture == "sd1"


def test_extract_from_single_files_with_convs(tiny_sdxl, sdxl_checkpoint, tmp_path):
    layers = _layers(tiny_sdxl, conv=True)
    known = random_adapter(layers, 3, 48.0, seed=6, architecture="sdxl")
    tuned = bake(sdxl_checkpoint, [(known, 1.0)], tmp_path / "tuned.safetensors").path
    result = extract(sdxl_checkpoint, tuned, rank=3, conv_rank=3)
    assert set(result.adapter.modules) == set(known.modules)
    for key, module in known.modules.items():
        assert relative(result.adapter.modules[key].delta(), module.delta()) <= 1e-4, key
    mixed = extract(tiny_sdxl, tuned, rank=3, components=["text_encoder_2"])  # a folder and a single file
    assert set(mixed.adapter.modules) == {k for k in known.modules if k.startswith("text_encoder_2.")}
    saved = result.save(tmp_path / "extracted.safetensors")
    record = history(read_header(saved.path).metadata)[-1]
    assert record["operation"] == "extract" and [i["role"] for i in record["inputs"]] == ["base", "tuned"]
    assert loralib.load(saved.path).architecture == "sdxl"


def test_extract_refuses_mismatched_or_identical_models(tiny_sd1, tiny_sdxl):
    with pytest.raises(MismatchError, match="shape"):
        extract(tiny_sd1, tiny_sdxl, rank=4)
    with pytest.raises(InvalidArgumentError, match="does not differ"):
        extract(tiny_sd1, tiny_sd1, rank=4, components=["text_encoder"])
    with pytest.raises(InvalidArgumentError, match="needs a rank"):
        extract(tiny_sd1, tiny_sd1)


def test_cli_bake_and_extract(lorareg, tiny_sd1, tmp_path):
    layers = _layers(tiny_sd1)
    lora = loralib.save(random_adapter(layers, 2, 32.0, seed=7, architecture="sd1"), tmp_path / "l.safetensors").path
    res = lorareg("bake", tiny_sd1, f"{lora}:0.5", "-o", tmp_path / "baked", "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["kind"] == "diffusers" and data["layers"] == len(layers)
    out = tmp_path / "x.safetensors"
    res = lorareg("extract", tiny_sd1, tmp_path / "baked", "--rank", "2", "-o", out)
    assert res.code == 0, res.err
    assert "retained energy" in res.out
    extracted = loralib.load(out)
    counts = ", ".join(f"{c} {sum(1 for k in extracted.modules if k.startswith(c + '.'))}" for c in extracted.components)
    assert f"{len(extracted.modules)} ({counts})" in res.out  # the summary, made before the output's tensors are let go
    original = loralib.load(lora)
    for key, module in original.modules.items():
        assert relative(extracted.modules[key].delta(), 0.5 * module.delta()) <= 1e-4, key
    res = lorareg("extract", tiny_sd1, tmp_path / "baked", "--rank", "1", "-o", out)
    assert res.code == 1 and "already exists" in res.err
    assert loralib.load(out).ranks == [2]
    res = lorareg("bake", tmp_path / "no_model", f"{lora}:0.5", "-o", tmp_path / "b2")
    assert res.code == 1 and "does not exist" in res.err and not (tmp_path / "b2").exists()


def _tuned_checkpoint(checkpoint, target, changes: dict[str, tuple[int, float]], noise: float):
    """``checkpoint`` with, on each named tensor, a rank-r change of Frobenius norm ``size`` (singular
    values decaying as 0.6^i) plus Gaussian noise of std ``noise`` on every 2-D weight; written in float32
    so the change is stored exactly as made."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(11)
    weights = load_file(checkpoint)
    for name, tensor in weights.items():
        if tensor.ndim == 2 and name.endswith("weight") and "embedding" not in name:
            weights[name] = tensor.float() + noise * torch.randn(tensor.shape, generator=generator)
    for name, (rank, size) in changes.items():
        m, n = weights[name].shape
        u, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator))
        s = 0.6 ** torch.arange(rank, dtype=torch.float32)
        weights[name] += (u * (s * size / s.norm())) @ v.T
    save_file(weights, target)
    return target


@pytest.mark.parametrize(("svd", "bound"), [("exact", 1 + 1e-6), ("randomized", 1.02)])
def test_extract_is_the_optimal_rank_k_approximation_of_each_difference(sdxl_checkpoint, tmp_path, svd, bound):
    """The single-file SDXL case the memory benchmark measures (UNet, CLIP-L and OpenCLIP's stacked q/k/v),
    at a rank below the change's: each extracted layer's error against the files' own difference is the
    optimal rank-k error (Eckart–Young, from torch's dense singular values), exactly for the exact SVD."""
    with ModelWeights.open(sdxl_checkpoint) as model:
        slots = {key: slot.name for key, slot in model.slots.items()}
    changed = {slots[k]: (6, 12.0) for k in ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                                            "unet.up_blocks.1.attentions.0.proj_in",
                                            "text_encoder.text_model.encoder.layers.1.mlp.fc1",
                                            "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj")}
    tuned = _tuned_checkpoint(sdxl_checkpoint, tmp_path / "tuned.safetensors", changed, noise=1e-3)
    rank = 3
    result = extract(sdxl_checkpoint, tuned, rank=rank, svd=svd)
    differences = {}
    with ModelWeights.open(sdxl_checkpoint) as base, ModelWeights.open(tuned) as model:
        for key in result.adapter.modules:
            differences[key] = model.read(key).double() - base.read(key).double()
    assert set(differences) == set(_layers(sdxl_checkpoint, subset=("",)))  # noise changed every targeted layer
    for key, module in result.adapter.modules.items():
        assert module.rank == rank
        error = float((module.delta().double().reshape(differences[key].shape) - differences[key]).norm())
        optimum = optimal_error(differences[key], rank)
        assert optimum * (1 - 1e-6) <= error <= optimum * bound, (key, error / optimum)
        reported = result.report.modules[key].error  # the randomized SVD estimates the top singular values
        assert reported == pytest.approx(optimum / float(differences[key].norm()), rel=1e-4 if svd == "exact" else 2e-2)
    for key in ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"):
        assert result.report.modules[key].retained > 0.95  # the known change dominates these layers


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_extract_refuses_a_layer_with_nonfinite_values(sdxl_checkpoint, tmp_path, value):
    from safetensors.torch import load_file, save_file

    weights = load_file(sdxl_checkpoint)
    with ModelWeights.open(sdxl_checkpoint) as model:
        name = model.slots["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].name
    weights[name] = weights[name].clone()
    weights[name][0, 1] = value
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(CorruptFileError, match="attn2.to_v holds NaN or infinite values"):
        extract(sdxl_checkpoint, tmp_path / "bad.safetensors", rank=2)
