"""Flux.1 LyCORIS and DoRA files are read: fused layers split into exact parts (oracle: lycoris-lora, dense math)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loralib
from loralib.errors import UnsupportedFormatError
from tests.helpers.lycoris_cases import assert_close

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e '.[test]')")
from lycoris.functional import loha as lyco_loha  # noqa: E402
from lycoris.functional import lokr as lyco_lokr  # noqa: E402

H = 48  # a narrow Flux: the fused layers keep Flux's row layout (qkv 3h, linear1 3h + 4h)
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
PARTS = {  # BFL path -> (stored [out, in], diffusers parts in row order, each part's rows)
    "double_blocks.0.img_attn.qkv": ((3 * H, H), [f"transformer.transformer_blocks.0.{p}" for p in QKV], [H] * 3),
    "double_blocks.0.txt_attn.qkv": ((3 * H, H), [f"transformer.transformer_blocks.0.{p}" for p in ADD_QKV], [H] * 3),
    "single_blocks.0.linear1": ((7 * H, H), [f"transformer.single_transformer_blocks.0.{p}" for p in (*QKV, "proj_mlp")],
                                [H, H, H, 4 * H]),
    "double_blocks.0.img_attn.proj": ((H, H), ["transformer.transformer_blocks.0.attn.to_out.0"], [H]),
    "single_blocks.0.linear2": ((H, 5 * H), ["transformer.single_transformer_blocks.0.proj_out"], [H]),
}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _split_rows(dense, path):
    """The dense fused ΔW's row blocks, by diffusers key."""
    _, keys, rows = PARTS[path]
    return dict(zip(keys, torch.split(dense, rows)))


def _loha(path, seed, rank=3):
    (out, inp), _, _ = PARTS[path]
    g = _g(seed)
    t = {"hada_w1_a": torch.randn(out, rank, generator=g), "hada_w1_b": torch.randn(rank, inp, generator=g),
         "hada_w2_a": torch.randn(out, rank, generator=g), "hada_w2_b": torch.randn(rank, inp, generator=g),
         "alpha": torch.tensor(2.0)}
    dense = lyco_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                                  gamma=torch.tensor(2.0 / rank), backend="torch")
    return t, dense


def _lokr(path, seed, right_rows=16, decompose_left=False):
    (out, inp), _, _ = PARTS[path]
    g = _g(seed)
    a, c, d = out // right_rows, right_rows, 12
    b = inp // d
    t = {"lokr_w2_a": torch.randn(c, 2, generator=g), "lokr_w2_b": torch.randn(2, d, generator=g),
         "alpha": torch.tensor(1.0)}
    if decompose_left:
        t.update(lokr_w1_a=torch.randn(a, 2, generator=g), lokr_w1_b=torch.randn(2, b, generator=g))
    else:
        t["lokr_w1"] = torch.randn(a, b, generator=g)
    gamma = 1.0  # alpha: lycoris divides by the rank of the decomposed factor itself
    dense = lyco_lokr.diff_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), None, t["lokr_w2_a"],
                                  t["lokr_w2_b"], None, gamma=gamma, backend="torch")
    return t, dense


def _write(path, modules):
    save_file({f"{name}.{suffix}": tensor.contiguous() for name, tensors in modules.items()
               for suffix, tensor in tensors.items()}, str(path))
    return path


def _kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def test_the_bfl_lokr_key_list_is_read_into_exact_parts(key_lists, tmp_path):
    """The InvokeAI BFL LoKr names (its shapes are not a Flux layer's, so factors are shaped for a narrow Flux)."""
    names = json.loads((key_lists / "invokeai__flux_lokr_bfl_format__state_dict_keys.json").read_text())["keys_to_shapes"]
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    assert set(modules) == {f"diffusion_model.{p}" for p in ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj",
                                                                "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
                                                                "single_blocks.0.linear1", "single_blocks.0.linear2")}
    wanted = [m.removeprefix("diffusion_model.") for m in modules if m.removeprefix("diffusion_model.") in PARTS]
    built = {path: _lokr(path, i, decompose_left=i % 2 == 1) for i, path in enumerate(wanted)}
    file = _write(tmp_path / "lokr.safetensors", {f"diffusion_model.{p}": t for p, (t, _) in built.items()})
    adapter = loralib.load(file)
    assert set(adapter.kinds) == {"lokr"}
    assert set(adapter.modules) == {k for p in wanted for k in PARTS[p][1]}
    for path, (_, dense) in built.items():
        for key, rows in _split_rows(dense, path).items():
            assert_close(adapter.modules[key].delta(), rows)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_kohya_named_flux_loha_and_lokr_split_exactly(tmp_path, kind):
    make = _loha if kind == "loha" else _lokr
    built = {path: make(path, i) for i, path in enumerate(PARTS)}
    file = _write(tmp_path / f"{kind}.safetensors", {_kohya(p): t for p, (t, _) in built.items()})
    adapter = loralib.load(file)
    assert set(adapter.kinds) == {kind} and adapter.architecture == "flux"
    for path, (_, dense) in built.items():
        for key, rows in _split_rows(dense, path).items():
            assert_close(adapter.modules[key].delta(), rows)
            up, down, coefficient = adapter.modules[key].low_rank(torch.float64)  # the exact low-rank form too
            assert_close(coefficient * up @ down, rows)


def test_full_differences_and_a_swapped_final_layer_split_exactly(tmp_path):
    g = _g(5)
    diff, diff_b = torch.randn(7 * H, H, generator=g), torch.randn(7 * H, generator=g)
    loha, dense = _loha("double_blocks.0.img_attn.qkv", 6)
    final = {"diff": torch.randn(2 * H, H, generator=g)}
    file = _write(tmp_path / "full.safetensors", {_kohya("single_blocks.0.linear1"): {"diff": diff, "diff_b": diff_b},
                                                  _kohya("double_blocks.0.img_attn.qkv"): loha,
                                                  "lora_unet_final_layer_adaLN_modulation_1": final})
    adapter = loralib.load(file)
    for (key, rows), bias in zip(_split_rows(diff, "single_blocks.0.linear1").items(),
                                 torch.split(diff_b, PARTS["single_blocks.0.linear1"][2])):
        assert torch.equal(adapter.modules[key].delta(), rows) and torch.equal(adapter.modules[key].bias_delta(), bias)
    for key, rows in _split_rows(dense, "double_blocks.0.img_attn.qkv").items():
        assert_close(adapter.modules[key].delta(), rows)
    shift, scale = final["diff"].chunk(2)  # BFL stores shift then scale; diffusers' norm_out.linear scale then shift
    assert torch.equal(adapter.modules["transformer.norm_out.linear"].delta(), torch.cat([scale, shift]))


def _dora_dense(weight, delta, magnitude, eps):
    combined = weight + delta
    return combined * (magnitude / (combined.norm(dim=1) + eps))[:, None] - weight


@pytest.mark.parametrize("inner", ["loha", "lora"])
def test_fused_dora_with_per_output_magnitude_splits_exactly(tmp_path, inner):
    path = "single_blocks.0.linear1"
    if inner == "loha":
        factors, dense = _loha(path, 7)
    else:
        g = _g(7)
        factors = {"lora_down.weight": torch.randn(4, H, generator=g), "lora_up.weight": torch.randn(7 * H, 4, generator=g),
                   "alpha": torch.tensor(2.0), "diff_b": torch.randn(7 * H, generator=g)}
        dense = factors["lora_up.weight"] @ factors["lora_down.weight"] * (2.0 / 4)
    magnitude = torch.rand(7 * H, 1, generator=_g(8)) + 0.5
    file = _write(tmp_path / "dora.safetensors", {_kohya(path): {**factors, "dora_scale": magnitude}})
    adapter = loralib.load(file)
    assert set(adapter.kinds) == {"dora"}
    base = torch.randn(7 * H, H, generator=_g(9))
    eps = float(torch.finfo(torch.float32).eps)
    expected = _dora_dense(base.double(), dense.double(), magnitude.reshape(-1).double(), eps)
    _, keys, rows = PARTS[path]
    for key, part_base, part in zip(keys, torch.split(base, rows), torch.split(expected, rows)):
        assert_close(adapter.modules[key].delta(base=part_base), part, 1e-4)
    if inner == "lora":  # the bias difference beside the factors is split by rows too
        for key, bias in zip(keys, torch.split(factors["diff_b"], rows)):
            assert torch.equal(adapter.modules[key].bias_delta(), bias)


@pytest.mark.parametrize("case", ["per-input dora", "lokr boundary"])
def test_splits_that_would_be_wrong_are_refused_in_one_line(tmp_path, case, lorareg):
    path = "double_blocks.0.img_attn.qkv"
    if case == "per-input dora":
        tensors, _ = _loha(path, 1)
        tensors["dora_scale"] = torch.rand(1, H, generator=_g(2))
        needle = "per input channel"
    else:
        tensors, _ = _lokr(path, 1, right_rows=9)  # 9 rows do not divide the boundaries at 48 and 96
        needle = "do not divide"
    file = _write(tmp_path / "bad.safetensors", {_kohya(path): tensors})
    with pytest.raises(UnsupportedFormatError, match=needle) as caught:
        loralib.load(file)
    assert "\n" not in str(caught.value) and "transformer.transformer_blocks.0.attn.to_q" in str(caught.value)
    res = lorareg("inspect", file)
    assert res.code != 0 and "Traceback" not in res.out


@pytest.mark.parametrize(("name", "modules"), [("invokeai__flux_dora_onetrainer_format__state_dict_keys.json", 506),
                                               ("invokeai__flux_lora_diffusers_dora_format__state_dict_keys.json", 266)])
def test_the_flux_dora_key_lists_are_read(key_lists, tmp_path, name, modules):
    """OneTrainer's Flux DoRA files (diffusers names under lora_transformer_, per-input dora_scale), with random tensors."""
    shapes = json.loads((key_lists / name).read_text())["keys_to_shapes"]
    g = _g(3)
    tensors = {k: (torch.tensor(4.0) if not v else torch.randn(*v, generator=g).to(torch.float16)) for k, v in shapes.items()}
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    adapter = loralib.load(tmp_path / "dora.safetensors")
    assert adapter.kinds == {"dora": modules} and adapter.architecture == "flux"
    key = "transformer.transformer_blocks.0.attn.to_q"
    module = adapter.modules[key]
    stem = "lora_transformer_transformer_blocks_0_attn_to_q"
    assert module.axis == "in" and torch.equal(module.magnitude, tensors[f"{stem}.dora_scale"].reshape(-1))
    assert torch.equal(module.inner.up, tensors[f"{stem}.lora_up.weight"])


def test_a_flux_loha_is_inspected_and_converted_to_an_exact_plain_lora(tmp_path, lorareg):
    built = {path: _loha(path, i) for i, path in enumerate(PARTS)}
    file = _write(tmp_path / "loha.safetensors", {_kohya(p): t for p, (t, _) in built.items()})
    data = json.loads(lorareg("inspect", file, "--json").out)
    assert data["kinds"] == {"loha": sum(len(keys) for _, keys, _ in PARTS.values())}
    refused = lorareg("convert", file, "--to", "kohya", "-o", tmp_path / "kept.safetensors")
    assert refused.code != 0 and "Traceback" not in refused.out and not (tmp_path / "kept.safetensors").exists()
    res = lorareg("convert", file, "--plain", "--to", "kohya", "-o", tmp_path / "plain.safetensors")
    assert res.code == 0, res.out
    plain = loralib.load(tmp_path / "plain.safetensors")
    assert set(plain.kinds) == {"lora"}
    for path, (_, dense) in built.items():
        for key, rows in _split_rows(dense, path).items():
            assert_close(plain.modules[key].delta(), rows)
