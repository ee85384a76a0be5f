"""resize: exact rank reduction through the QR route, dynamic rules, real files, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.adapter import LoraAdapter
from loralib.compose import resize
from loralib.errors import InvalidArgumentError
from loralib.files.header import read_header
from loralib.metadata import history
from tests.helpers.compose_cases import (
    MEDIUM_LAYERS,
    SMALL_LAYERS,
    adapter,
    dense,
    optimal_error,
    relative,
    with_spectrum,
)

CONV = "unet.down_blocks.0.resnets.0.conv1"


def test_resize_to_the_input_rank_is_lossless():
    source = adapter(SMALL_LAYERS, 6, 2.5, seed=1, mid_keys=(CONV,))
    same = resize(source, rank=6)
    for key, module in source.modules.items():  # kept bit for bit, alpha and CP mid included
        kept = same.adapter.modules[key]
        assert torch.equal(kept.down, module.down) and torch.equal(kept.up, module.up) and kept.alpha == module.alpha
        assert (kept.mid is None) == (module.mid is None)
    # through the SVD (a rule that keeps everything): equal ΔW up to round-off
    full = resize(source, dynamic="sv_fro:1.0")
    for key, module in source.modules.items():
        assert full.adapter.modules[key].rank == 6
        assert relative(dense(full.adapter.modules[key]), dense(module)) <= 1e-5, key
    assert full.adapter.modules[CONV].mid is None and full.adapter.modules[CONV].is_conv


@pytest.mark.parametrize("layers,rank,new_rank", [(SMALL_LAYERS, 8, 3), (MEDIUM_LAYERS, 64, 16)])
def test_resize_is_the_best_approximation(layers, rank, new_rank):
    source = adapter(layers, rank, rank / 4, seed=2, mid_keys=(CONV,), decay=0.9)
    result = resize(source, rank=new_rank)
    for key, module in result.adapter.modules.items():
        target = dense(source.modules[key])
        best = optimal_error(target, new_rank)
        assert module.rank == new_rank and module.alpha == new_rank
        assert module.weight_shape == source.modules[key].weight_shape
        assert abs(float((dense(module) - target).norm()) - best) <= 1e-4 * best, key
        assert result.report.modules[key].retained == pytest.approx(
            (1 - (best / float(target.norm())) ** 2) ** 0.5, rel=1e-5)


def test_dynamic_rules_pick_the_ranks_the_spectrum_dictates():
    spectra = {"unet.a.to_q": [8.0, 4.0, 2.0, 1.0, 0.5, 0.25], "unet.b.to_k": [3.0, 2.9, 2.8, 0.1],
               "unet.c.to_v": [1.0, 0.01, 0.001]}
    source = LoraAdapter({k: with_spectrum(s, 50, 40, seed=i) for i, (k, s) in enumerate(spectra.items())})

    def expected(rule, value, s):
        s = torch.tensor(s, dtype=torch.float64)
        if rule == "sv_ratio":
            return int((s >= s[0] / value).sum())
        fractions = (s.pow(2).cumsum(0) / s.pow(2).sum()).sqrt() if rule == "sv_fro" else s.cumsum(0) / s.sum()
        return int(torch.nonzero(fractions >= value)[0]) + 1

    for rule, value in (("sv_ratio", 3.0), ("sv_ratio", 10.0), ("sv_fro", 0.95), ("sv_fro", 0.999),
                        ("sv_cumulative", 0.7), ("sv_cumulative", 0.9)):
        result = resize(source, dynamic=f"{rule}:{value}")
        picked = {k: m.rank for k, m in result.adapter.modules.items()}
        assert picked == {k: expected(rule, value, s) for k, s in spectra.items()}, (rule, value)
    # by hand: sv_fro:0.95 on [8, 4, 2, 1, .5, .25] keeps 2: √(80/85.3125) = 0.968 ≥ 0.95 > √(64/85.3125) = 0.866
    assert resize(source, dynamic="sv_fro:0.95").adapter.modules["unet.a.to_q"].rank == 2
    capped = resize(source, dynamic="sv_fro:0.999", max_rank=2)
    assert max(m.rank for m in capped.adapter.modules.values()) == 2


def test_real_file_resize_and_record(real_loras, tmp_path):
    path = real_loras / "sd15_cloneofsimo_r4_f16.safetensors"
    source = loralib.load(path)
    result = resize(path, rank=2)
    assert result.adapter.dtype == torch.float16 and result.adapter.architecture == "sd1"
    for key in [k for k, m in source.modules.items() if max(m.weight_shape) <= 320]:
        target = dense(source.modules[key])
        error = float((dense(result.adapter.modules[key]) - target).norm())
        assert error <= optimal_error(target, 2) * (1 + 1e-3) + 1e-3 * float(target.norm()), key  # fp16 storage
    saved = result.save(tmp_path / "r2.safetensors")
    metadata = read_header(saved.path).metadata
    record = history(metadata)[-1]
    assert record["operation"] == "resize" and record["rank"] == 2
    assert record["inputs"][0]["file"] == path.name and record["inputs"][0]["tensor_sha256"]
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "2"


def test_resize_argument_errors():
    source = adapter(SMALL_LAYERS, 4, 4.0, seed=3)
    for kwargs, message in (({}, "needs a target rank"), ({"rank": 2, "dynamic": "sv_fro:0.9"}, "not both"),
                            ({"dynamic": "sv_frob:0.9"}, "unknown dynamic rank rule"), ({"rank": -1}, "positive")):
        with pytest.raises(InvalidArgumentError, match=message):
            resize(source, **kwargs)


def test_cli_resize(lorareg, tmp_path):
    source = loralib.save(adapter(SMALL_LAYERS, 8, 4.0, seed=4), tmp_path / "big.safetensors").path
    out = tmp_path / "small.safetensors"
    res = lorareg("resize", source, "--rank", "3", "-o", out)
    assert res.code == 0, res.err
    assert "retained energy" in res.out and "min" in res.out and "3 ×" in res.out
    assert loralib.load(out).ranks == [3]
    res = lorareg("resize", source, "--dynamic", "sv_fro:0.9", "--max-rank", "5", "-o", tmp_path / "d.safetensors",
                  "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)["report"]
    assert report["retained"]["min"] >= 0.9 or max(int(r) for r in report["ranks"]) == 5
    assert all(m["retained"] >= 0.9 or m["rank"] == 5 for m in report["modules"].values())
    res = lorareg("resize", source, "--dynamic", "fro:0.9", "-o", tmp_path / "x.safetensors")
    assert res.code == 1 and "unknown dynamic rank rule" in res.err
    res = lorareg("resize", source, "--rank", "2", "-o", out)
    assert res.code == 1 and "already exists" in res.err
    assert loralib.load(out).ranks == [3]
    res = lorareg("resize", tmp_path / "nope.safetensors", "--rank", "2", "-o", tmp_path / "y.safetensors")
    assert res.code == 1 and "nope.safetensors is not a file" in res.err
