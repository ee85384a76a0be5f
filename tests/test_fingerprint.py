"""The ΔW fingerprint: equal for one adapter in any format, key spelling, dtype or factorization; near for a
rank reduction; about 0 between different adapters (checked against dense ΔW); `lorareg duplicates` groups."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import loralib
from loralib.adapter import LoraAdapter, LoraModule
from loralib.fingerprint import NEAR_COSINE, SAME_COSINE, band_keys, compare, decode, fingerprint_file
from loralib.inspection import inspect
from loralib.layers import LayerShape
from loralib.synthetic import random_adapter
from tests.helpers.small_loras import sd1_attention_layers

CONV = "unet.down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def layers():
    found = sd1_attention_layers()
    found[CONV] = LayerShape(320, 320, (3, 3))
    return found


def _print(path):
    report = inspect(path, fingerprint=True)
    assert report.fingerprint is not None, report.fingerprint_note
    return report.fingerprint


def _dense(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {k: m.delta(torch.float64).flatten() for k, m in adapter.modules.items()}


def _true_cosine(a: LoraAdapter, b: LoraAdapter) -> float:
    """The cosine of the two adapters' whole ΔW, from dense matrices (modules one lacks count as zero)."""
    da, db = _dense(a), _dense(b)
    dot = sum(float(da[k] @ db[k]) for k in da.keys() & db.keys())
    na = sum(float(v @ v) for v in da.values()) ** 0.5
    nb = sum(float(v @ v) for v in db.values()) ** 0.5
    return dot / (na * nb)


def _refactored(adapter: LoraAdapter) -> LoraAdapter:
    """The same ΔW with other factors: up scaled by 3, down by 1/2 and alpha by 2/3, mid folded into down."""
    modules = {}
    for key, module in adapter.modules.items():
        plain = module.without_mid()
        modules[key] = LoraModule(plain.down * 0.5, plain.up * 3.0, plain.alpha * 2 / 3)
    return LoraAdapter(modules, adapter.architecture)


def test_one_adapter_in_every_format_dtype_and_factorization_has_one_fingerprint(layers, tmp_path):
    adapter = random_adapter(layers, rank=8, seed=1, architecture="sd1", mid=True)
    paths = {
        "kohya": loralib.save(adapter, tmp_path / "k.safetensors").path,
        "peft": loralib.save(adapter, tmp_path / "p", "peft").path,
        "diffusers": loralib.save(adapter, tmp_path / "d.safetensors", "diffusers").path,
        "bf16": loralib.save(adapter, tmp_path / "b.safetensors", dtype=torch.bfloat16).path,
        "fp16 peft": loralib.save(adapter, tmp_path / "p16", "peft", dtype=torch.float16).path,
        "refactored": loralib.save(_refactored(adapter), tmp_path / "r.safetensors").path,
    }
    prints = {name: _print(path).to_bytes() for name, path in paths.items()}
    for name, blob in prints.items():
        comparison = compare(prints["kohya"], blob)
        assert comparison.verdict == "same", (name, comparison)
        assert comparison.similarity >= SAME_COSINE
    # the modules are all there (the CP mid of the conv module included) and the norm estimates ‖ΔW‖
    kohya = _print(paths["kohya"])
    assert kohya.modules == len(layers) and not kohya.skipped
    assert kohya.bands() == band_keys(kohya.to_bytes()) == band_keys(_print(paths["bf16"]).to_bytes())
    dense_norm = sum(float(v @ v) for v in _dense(adapter).values()) ** 0.5
    assert kohya.norm == pytest.approx(dense_norm, rel=0.35)


def test_a_rank_reduction_is_near_and_another_adapter_is_neither(layers, tmp_path):
    from loralib.compose import resize

    adapter = random_adapter(layers, rank=8, seed=1, architecture="sd1")
    other = random_adapter(layers, rank=8, seed=2, architecture="sd1")
    resized = resize(adapter, 4).adapter
    a = loralib.save(adapter, tmp_path / "a.safetensors").path
    b = loralib.save(other, tmp_path / "b.safetensors").path
    r = loralib.save(resized, tmp_path / "r.safetensors").path
    near = compare(_print(a).to_bytes(), _print(r).to_bytes())
    assert near.verdict == "near" and near.similarity < SAME_COSINE
    # the fingerprint's cosine estimates the true cosine of the dense ΔW
    assert near.similarity == pytest.approx(_true_cosine(adapter, resized), abs=0.08)
    far = compare(_print(a).to_bytes(), _print(b).to_bytes())
    assert far.verdict == "different" and abs(far.similarity - _true_cosine(adapter, other)) < 0.25


def test_bf16_and_fp16_bytes_decode_as_torch_reads_them():
    values = torch.randn(64, dtype=torch.float32) * 3
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")):
        stored = values.to(dtype)
        raw = stored.view(torch.uint8 if dtype == torch.float32 else torch.int16).numpy().tobytes()
        decoded = decode(raw, name, (8, 8))
        np.testing.assert_array_equal(decoded, stored.float().reshape(8, 8).numpy())
    with pytest.raises(ValueError, match="I32"):
        decode(b"\0" * 16, "I32", (4,))


def test_plain_lora_fixtures_are_fingerprinted_without_false_positives(real_loras):
    blobs = {}
    for path in sorted(real_loras.glob("*.safetensors")):
        if path.name.startswith(("BAD_", "NOT-LORA_")):
            continue
        report = inspect(path, fingerprint=True)  # plain LoRA, Flux and LyCORIS LoKr: every module sketched
        assert report.fingerprint is not None and report.fingerprint.modules == report.modules, path.name
        blobs[path.name] = report.fingerprint.to_bytes()
    assert len(blobs) == 10
    names = sorted(blobs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert compare(blobs[a], blobs[b]).similarity < NEAR_COSINE, (a, b)


def test_a_lycoris_adapter_and_its_exact_plain_lora_are_the_same_adapter(real_loras, tmp_path):
    """The LoKr fixture's modules are sketched by their own ΔW code; its exact plain-LoRA form (a
    different factorization, other key suffixes) has the same fingerprint, its rank-8 form a near one."""
    from loralib.compose import to_lora

    lokr = real_loras / "sd1_lycoris-lokr_f16.safetensors"
    exact = to_lora(lokr).save(tmp_path / "exact.safetensors").path
    smaller = to_lora(lokr, 8).save(tmp_path / "r8.safetensors").path
    prints = {p.name: fingerprint_file(str(p)) for p in (lokr, exact, smaller)}
    assert all(f.modules == 350 and not f.skipped for f in prints.values())
    same = compare(prints[lokr.name].to_bytes(), prints["exact.safetensors"].to_bytes())
    assert same.verdict == "same", same
    assert compare(prints[lokr.name].to_bytes(), prints["r8.safetensors"].to_bytes()).verdict == "near"


def test_scan_groups_copies_formats_dtypes_and_near_duplicates(layers, tmp_path, lorareg, real_loras):
    from loralib.compose import resize

    folder = tmp_path / "loras"
    folder.mkdir()
    adapter = random_adapter(layers, rank=8, seed=3, architecture="sd1")
    kohya = loralib.save(adapter, folder / "style.safetensors").path
    loralib.save(adapter, folder / "style_peft", "peft")
    loralib.save(adapter, folder / "style_diffusers.safetensors", "diffusers")
    loralib.save(adapter, folder / "style_bf16.safetensors", dtype=torch.bfloat16)
    loralib.save(resize(adapter, 4).adapter, folder / "style_r4.safetensors")
    loralib.save(random_adapter(layers, rank=8, seed=4, architecture="sd1"), folder / "unrelated.safetensors")
    (folder / "copies").mkdir()
    shutil.copy(kohya, folder / "copies" / "style.safetensors")
    for path in real_loras.glob("*.safetensors"):  # real adapters beside them: no false positive
        shutil.copy(path, folder / path.name)
    assert lorareg("scan", folder).code == 0
    res = lorareg("duplicates", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert [sorted(m["name"] for m in group) for group in report["same"]] == [
        ["style", "style_bf16", "style_diffusers", "style_peft"]]
    assert [sorted(f["path"] for f in g["files"]) for g in report["copies"]] == [
        sorted([str(kohya), str(folder / "copies" / "style.safetensors")])]
    assert len(report["near"]) == 1
    pairs = report["near"][0]["pairs"]
    assert {frozenset((p["a"], p["b"])) for p in pairs} == {frozenset(("style", "style_r4"))}
    assert NEAR_COSINE <= pairs[0]["similarity"] < SAME_COSINE
    assert report["thresholds"] == {"same_cosine": SAME_COSINE, "same_norm_ratio": 0.99, "near_cosine": NEAR_COSINE}
    reasons = report["without_fingerprint"]
    assert list(reasons) == [next(r for r in reasons if r.startswith("the file is damaged") and "truncated" in r)]
    shown = json.loads(lorareg("show", "style_peft", "--json").out)
    assert sorted(s["name"] for s in shown["same_adapter_as"]) == ["style", "style_bf16", "style_diffusers"]
    assert "same adapter as" in lorareg("show", "style_peft").out
    assert json.loads(lorareg("show", "unrelated", "--json").out)["same_adapter_as"] == []
    text = lorareg("duplicates", "--near", "0.99")
    assert text.code == 0 and "style_r4" not in text.out and "style_bf16" in text.out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fingerprint_is_the_same_with_and_without_torch_loaded(layers, tmp_path, monkeypatch, dtype):
    """A command that wrote an adapter decodes its factors with torch, a scan with numpy: the stored
    fingerprints must be the same bytes (both widen the values exactly)."""
    path = tmp_path / "a.safetensors"
    loralib.save(random_adapter(layers, 8, seed=5, dtype=dtype), path)
    with_torch = fingerprint_file(str(path))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as in a process that never imported it
    without = fingerprint_file(str(path))
    assert with_torch.modules == without.modules == len(layers)
    assert with_torch.to_bytes() == without.to_bytes()


def test_fingerprint_does_not_depend_on_how_modules_are_grouped(layers, tmp_path, monkeypatch):
    """Modules of one shape are decoded and multiplied in groups of at most GROUP_BYTES; the size of
    the groups is a matter of speed only: the stored bytes are the same for groups of one module
    each and for a single group of every module."""
    import loralib.fingerprint as fp

    path = tmp_path / "a.safetensors"
    loralib.save(random_adapter(layers, 8, seed=6, dtype=torch.float16), path)
    found = {}
    for size in (1, fp.GROUP_BYTES, 2**40):
        monkeypatch.setattr(fp, "GROUP_BYTES", size)
        found[size] = fingerprint_file(str(path))
    assert {f.modules for f in found.values()} == {len(layers)}
    assert len({f.to_bytes() for f in found.values()}) == 1
