"""LyCORIS and DoRA adapters in every composition: conversion to plain LoRA (exact, or optimal at a
rank, against dense SVDs), merge, TIES, resize, bake (into diffusers folders and single-file
checkpoints), extract and generation's fusing, each checked against dense ΔW."""

from __future__ import annotations

import pytest
import torch

import loralib
from loralib.adapter import LoraAdapter
from loralib.compose import bake, extract, merge, resize, to_lora
from loralib.compose.model_weights import ModelWeights, checkpoint_slots, vector_key
from loralib.compose.ties_dare import ties
from loralib.errors import InvalidArgumentError, MismatchError
from loralib.files.header import read_header
from loralib.layers import LayerShape
from loralib.lycoris.synthetic import random_full, random_loha, random_lokr, random_norm
from tests.helpers.compose_cases import optimal_error, relative, single_file_checkpoint
from tests.helpers.lycoris_cases import mixed_adapter


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd here (LyCORIS' modules copy into parameters); only inside each test, never for the process."""
    with torch.no_grad():
        yield

LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LayerShape(96, 64, None),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": LayerShape(64, 192, None),
    "unet.down_blocks.0.resnets.0.conv1": LayerShape(32, 16, (3, 3)),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LayerShape(48, 48, None),
}


def _matrix(module, base=None) -> torch.Tensor:
    return module.delta(torch.float64, base).reshape(module.out_features, -1)


def _bases(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s.out_features, s.in_features, *(s.kernel_size or ()), generator=g) * 0.05
            for k, s in LAYERS.items()}


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-tucker", "full"])
def test_to_lora_at_a_rank_is_the_best_approximation(kind):
    g = torch.Generator().manual_seed(1)
    make = {"loha": lambda s: random_loha(s, 3, 1.5, generator=g, tucker=True),
            "lokr": lambda s: random_lokr(s, 2, 3.0, generator=g),
            "lokr-tucker": lambda s: random_lokr(s, 2, 3.0, generator=g, tucker=True),
            "full": lambda s: random_full(s, generator=g)}[kind]
    adapter = LoraAdapter({k: make(s) for k, s in LAYERS.items()}, "sd1")
    result = to_lora(adapter, 4, svd="exact")
    for key, module in adapter.modules.items():
        dense = _matrix(module)
        best = optimal_error(dense, 4) / float(dense.norm())
        got = relative(_matrix(result.adapter.modules[key]), dense)
        entry = result.report.modules[key]
        assert got == pytest.approx(best, abs=1e-5), key
        assert entry.error == pytest.approx(best, abs=1e-5) and entry.rank == min(4, min(dense.shape))
        assert entry.retained == pytest.approx((1 - best ** 2) ** 0.5, abs=1e-5)
    assert result.adapter.is_plain and result.adapter.ranks == [4]


def test_to_lora_without_a_rank_is_exact_and_keeps_the_exact_rank():
    g = torch.Generator().manual_seed(2)
    modules = {k: (random_loha(s, 2, 1.0, generator=g) if i % 2 else random_lokr(s, 2, 2.0, generator=g))
               for i, (k, s) in enumerate(LAYERS.items())}
    result = to_lora(LoraAdapter(modules, "sd1"))
    for key, module in modules.items():
        plain = result.adapter.modules[key]
        assert plain.rank == min(module.exact_rank, *_matrix(module).shape)
        assert relative(_matrix(plain), _matrix(module)) < 1e-6
    assert result.report.max_error < 1e-6


def test_dynamic_rules_read_the_exact_spectrum():
    adapter = LoraAdapter({k: random_lokr(s, 3, 2.0, generator=torch.Generator().manual_seed(3))
                           for k, s in LAYERS.items()}, "sd1")
    result = to_lora(adapter, dynamic="sv_fro:0.9")
    for key, module in adapter.modules.items():
        s = torch.linalg.svdvals(_matrix(module))
        energy = (s ** 2).cumsum(0) / (s ** 2).sum()
        assert result.adapter.modules[key].rank == int((energy < 0.81 - 1e-12).sum()) + 1, key


def test_full_differences_by_randomized_svd_come_close_to_optimal_and_report_exactly():
    shape = LayerShape(256, 192, None)
    g = torch.Generator().manual_seed(4)
    u, v = torch.linalg.qr(torch.randn(256, 64, generator=g))[0], torch.linalg.qr(torch.randn(192, 64, generator=g))[0]
    diff = (u * (0.85 ** torch.arange(64.0))) @ v.T
    module = random_full(shape, generator=g)
    module = type(module)(diff.float())
    adapter = LoraAdapter({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": module}, "sd1")
    result = to_lora(adapter, 8, svd="randomized")
    entry = next(iter(result.report.modules.values()))
    best = optimal_error(diff.double(), 8) / float(diff.norm())
    got = relative(_matrix(next(iter(result.adapter.modules.values()))), diff)
    assert got == pytest.approx(entry.error, rel=1e-4) and best <= got <= best * 1.01


def test_dora_needs_the_base_and_then_reports_its_true_error(tiny_sd1):
    base = _bases()
    adapter = mixed_adapter(LAYERS, base=base, kinds=("dora", "dora-lokr", "dora-in"), architecture="sd1")
    with pytest.raises(InvalidArgumentError, match="DoRA module.*--base") as caught:
        to_lora(adapter, 4)
    assert "\n" not in str(caught.value)
    result = to_lora(adapter, 4, base=base)
    for key, module in adapter.modules.items():
        dense = _matrix(module, base[key])
        best = optimal_error(dense, 4) / float(dense.norm())
        assert result.report.modules[key].error == pytest.approx(best, abs=1e-4), key
        assert relative(_matrix(result.adapter.modules[key]), dense) == pytest.approx(best, abs=1e-4)
    assert any("DoRA" in note and "on that model only" in note for note in result.report.notes)
    with pytest.raises(MismatchError, match="to_q is \\[32, 32\\] in sd1 but"):
        to_lora(adapter, 4, base=tiny_sd1)
    with pytest.raises(MismatchError, match="not in"):
        to_lora(adapter, 4, base={})


def test_norm_and_bias_differences_are_left_out_with_a_note():
    g = torch.Generator().manual_seed(6)
    key = next(iter(LAYERS))
    adapter = LoraAdapter({key: random_full(LAYERS[key], bias=True, generator=g),
                           "unet.down_blocks.0.resnets.0.norm1": random_norm(16, generator=g)}, "sd1")
    result = to_lora(adapter, 4)
    assert list(result.adapter.modules) == [key]
    notes = " ".join(result.report.notes)
    assert "1 norm-layer difference" in notes and "bias differences (diff_b) of 1" in notes


def test_merge_of_mixed_kinds_is_exact_without_a_rank_and_optimal_with_one():
    base = _bases()
    a = mixed_adapter(LAYERS, base=base, kinds=("loha", "lokr", "dora", "lora"), seed=1, architecture="sd1")
    b = mixed_adapter(LAYERS, base=base, kinds=("lokr", "full", "lora", "loha-tucker"), seed=2, architecture="sd1")
    exact = merge([(a, 0.7), (b, -0.4)], base=base)
    ranked = merge([(a, 0.7), (b, -0.4)], 5, base=base)
    for key in LAYERS:
        target = 0.7 * _matrix(a.modules[key], base[key]) - 0.4 * _matrix(b.modules[key], base[key])
        assert relative(_matrix(exact.adapter.modules[key]), target) < 1e-5, key
        best = optimal_error(target, 5) / float(target.norm())
        assert relative(_matrix(ranked.adapter.modules[key]), target) == pytest.approx(best, abs=1e-5), key
        assert ranked.report.modules[key].error == pytest.approx(best, abs=1e-5)
    assert exact.adapter.is_plain and ranked.adapter.is_plain
    with pytest.raises(InvalidArgumentError, match="DoRA"):
        merge([(a, 1.0)])


def test_ties_on_lycoris_inputs_acts_on_their_dense_deltas():
    a = LoraAdapter({k: random_lokr(s, 2, 2.0, generator=torch.Generator().manual_seed(7)) for k, s in LAYERS.items()})
    b = LoraAdapter({k: random_loha(s, 2, 1.0, generator=torch.Generator().manual_seed(8)) for k, s in LAYERS.items()})
    result = merge([(a, 1.0), (b, 0.5)], method="ties", density=0.3, svd="exact", rank=64)
    for key in LAYERS:
        expected = ties([_matrix(a.modules[key]).float(), 0.5 * _matrix(b.modules[key]).float()], 0.3)
        assert relative(_matrix(result.adapter.modules[key]), expected) < 1e-4, key


def test_resize_turns_lycoris_modules_into_plain_lora_of_that_rank():
    adapter = LoraAdapter({k: random_loha(s, 3, 1.5, generator=torch.Generator().manual_seed(9))
                           for k, s in LAYERS.items()}, "sd1")
    resized, converted = resize(adapter, 3), to_lora(adapter, 3)
    for key in LAYERS:
        assert resized.report.modules[key].error == pytest.approx(converted.report.modules[key].error, abs=1e-7)
    assert resized.adapter.ranks == [3]


def _tiny_mixed(model, base_reader, seed=0, kinds=None):
    """A mixed adapter over a subset of a tiny model's layers, with norm and bias differences."""
    from loralib.layers import select_layers

    with ModelWeights.open(model) as weights:
        chosen = select_layers(weights.shapes(), conv=True)
        subset = {k: s for k, s in chosen.items()
                  if k.startswith(("unet.down_blocks.0.", "unet.mid_block.", "text_encoder.text_model.encoder.layers.0."))}
        base = {k: weights.read(k) for k in subset}
    adapter = mixed_adapter(subset, base=base, norms={"unet.down_blocks.0.resnets.0.norm1": 32}, seed=seed,
                            kinds=kinds or ("lora", "loha", "lokr", "full", "dora", "loha-tucker", "dora-lokr", "dora-in"),
                            architecture="sd1")
    return adapter, base


def _vectors(model) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with ModelWeights.open(model, vectors=True) as weights:
        out = {}
        for key, slot in weights.slots.items():
            if ":" in key:
                with safe_open(slot.file, "pt") as handle:
                    out[key] = handle.get_tensor(slot.name)
        return out


def test_bake_fuses_every_kind_into_a_diffusers_folder(tiny_sd1, tmp_path):
    adapter, base = _tiny_mixed(tiny_sd1, None)
    assert {"loha", "lokr", "full", "dora", "norm"} <= set(adapter.kinds)
    result = bake(tiny_sd1, [(adapter, 0.8)], tmp_path / "baked")
    with ModelWeights.open(tmp_path / "baked") as baked:
        for key, module in adapter.modules.items():
            if not module.is_matrix:
                continue
            expected = base[key].double() + 0.8 * module.delta(torch.float64, base[key]).reshape(base[key].shape)
            assert relative(baked.read(key), expected) < 1e-6 or \
                float((baked.read(key).double() - expected).abs().max()) < 1e-6, key
    before, after = _vectors(tiny_sd1), _vectors(tmp_path / "baked")
    norm = adapter.modules["unet.down_blocks.0.resnets.0.norm1"]
    key = vector_key("unet.down_blocks.0.resnets.0.norm1", "weight")
    assert torch.allclose(after[key], before[key] + 0.8 * norm.delta(), atol=1e-6)
    full_key = next(k for k, m in adapter.modules.items() if m.kind == "full")
    bias = vector_key(full_key, "bias")
    assert torch.allclose(after[bias], before[bias] + 0.8 * adapter.modules[full_key].bias_delta(), atol=1e-6)
    assert result.modules == len(adapter.modules)


def test_bake_lycoris_norm_and_bias_into_a_single_file_checkpoint(tiny_sd1, tmp_path):
    checkpoint = single_file_checkpoint(tiny_sd1, tmp_path / "sd1.safetensors")
    adapter, base = _tiny_mixed(checkpoint, None, kinds=("lokr", "full", "dora"))
    bake(checkpoint, [(adapter, 1.0)], tmp_path / "baked.safetensors")
    slots = checkpoint_slots(read_header(tmp_path / "baked.safetensors"), vectors=True)
    from safetensors.torch import load_file

    before, after = load_file(checkpoint), load_file(tmp_path / "baked.safetensors")
    for key, module in adapter.modules.items():
        if module.is_matrix:
            name = slots[key].name
            expected = before[name].double() + module.delta(torch.float64, base[key]).reshape(before[name].shape)
            assert float((after[name].double() - expected).abs().max()) < 1e-5, key
        for parameter, delta in (("bias", module.bias_delta()), ("weight", None if module.is_matrix else module.delta())):
            if delta is not None:
                name = slots[vector_key(key, parameter)].name
                assert torch.allclose(after[name], before[name] + delta, atol=1e-6), (key, parameter)


def test_extracting_a_baked_lokr_finds_what_to_lora_finds(tiny_sd1, tmp_path):
    """Two optimal routes to the same rank-k LoRA: the SVD of (baked − base) and LoKr's Kronecker spectrum."""
    from loralib.layers import select_layers

    with ModelWeights.open(tiny_sd1) as weights:
        layers = {k: s for k, s in select_layers(weights.shapes()).items() if k.startswith("unet.down_blocks.0.")}
    lokr = LoraAdapter({k: random_lokr(s, 4, 8.0, generator=torch.Generator().manual_seed(i))
                        for i, (k, s) in enumerate(layers.items())}, "sd1")
    bake(tiny_sd1, [lokr], tmp_path / "baked")
    extracted = extract(tiny_sd1, tmp_path / "baked", 3, svd="exact", min_diff=1e-7)
    converted = to_lora(lokr, 3)
    for key in layers:
        assert extracted.report.modules[key].error == pytest.approx(converted.report.modules[key].error, abs=1e-3)


def test_generation_fuses_every_kind_and_removes_it_exactly():
    from loralib.base_model import layer_shape, pipeline_layers
    from loralib.generation import AdapterUse, fuse_adapters
    from loralib.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    layers = pipeline_layers(pipe, norms=True)
    shapes = {k: layer_shape(m) for k, m in layers.items()
              if k.startswith("unet.down_blocks.0.") and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    original = {k: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                for k, m in layers.items()}
    adapter = mixed_adapter(shapes, base={k: original[k][0] for k in shapes},
                            norms={"unet.down_blocks.0.resnets.0.norm1": 32}, architecture="sd1")
    fused = fuse_adapters(pipe, [(adapter, 0.5, AdapterUse("mixed", 0.5))])
    for key, module in adapter.modules.items():
        weight, bias = original[key]
        delta = module.delta(torch.float32, weight if module.needs_base else None)
        assert torch.allclose(layers[key].weight, weight + 0.5 * delta.reshape(weight.shape), atol=1e-6), key
        if module.bias_delta() is not None:
            assert torch.allclose(layers[key].bias, bias + 0.5 * module.bias_delta(), atol=1e-6), key
    fused.remove()
    assert all(torch.equal(layers[k].weight, w) and (b is None or torch.equal(layers[k].bias, b))
               for k, (w, b) in original.items())


def test_cli_converts_merges_and_resizes_lycoris_files(tmp_path, lorareg, real_loras):
    lokr = real_loras / "sd1_lycoris-lokr_f16.safetensors"
    res = lorareg("convert", lokr, "--rank", "4", "-o", tmp_path / "r4.safetensors")
    assert res.code == 0, res.err
    assert "retained energy" in res.out and "largest error" in res.out
    converted = loralib.load(tmp_path / "r4.safetensors")
    assert converted.is_plain and converted.ranks == [4] and converted.source_format == "kohya"
    res = lorareg("convert", lokr, "--plain", "--to", "diffusers", "-o", tmp_path / "exact.safetensors")
    assert res.code == 0 and "1 on every module" in res.out, res.out + res.err
    res = lorareg("merge", lokr, f"{tmp_path / 'r4.safetensors'}:-1", "--rank", "8", "-o", tmp_path / "m.safetensors")
    assert res.code == 0, res.err
    res = lorareg("convert", lokr, "--rank", "4", "-o", tmp_path / "r4.safetensors")
    assert res.code == 1 and "exists" in res.err and len(res.err.strip().splitlines()) == 1
