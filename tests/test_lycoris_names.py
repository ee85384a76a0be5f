"""LyCORIS files in LyCORIS' own ``lycoris_`` names (SimpleTuner) are read for Flux.1, SD3/SD3.5 and SD1/SDXL.

Files are built from the full-size layer tables (meta device) in this spelling; they read back to
exactly the modules and factors written, with ΔW equal to lycoris-lora's own weight functions.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loralib
from loralib.errors import LoraError
from loralib.lycoris.shapes import factorization
from loralib.naming.flat import meta_layers, shipped_layers
from tests.helpers.lycoris_cases import assert_close

pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e '.[test]')")
from lycoris.functional import loha as lyco_loha
from lycoris.functional import lokr as lyco_lokr

COMPONENT = {"flux": "transformer", "sd35-medium": "transformer", "sdxl": "unet"}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _lokr(out: int, inp: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A LoKr of rank 1 on its right factor (alpha 1: LyCORIS' scale is 1)."""
    (a, c), (b, d) = factorization(out, 8), factorization(inp, 8)
    return {"lokr_w1": torch.randn(a, b, generator=g), "lokr_w2_a": torch.randn(c, 1, generator=g),
            "lokr_w2_b": torch.randn(1, d, generator=g), "alpha": torch.tensor(1.0)}


def _lokr_dense(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return lyco_lokr.diff_weight(t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"], None,
                                 gamma=1.0, backend="torch")


def _loha(out: int, inp: int, g: torch.Generator, rank: int = 2) -> dict[str, torch.Tensor]:
    return {"hada_w1_a": torch.randn(out, rank, generator=g), "hada_w1_b": torch.randn(rank, inp, generator=g),
            "hada_w2_a": torch.randn(out, rank, generator=g), "hada_w2_b": torch.randn(rank, inp, generator=g),
            "alpha": torch.tensor(1.0)}


def _loha_dense(t: dict[str, torch.Tensor]) -> torch.Tensor:
    rank = t["hada_w1_b"].shape[0]
    return lyco_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], None, None,
                                 gamma=torch.tensor(1.0 / rank), backend="torch")


def _write(path, modules: dict[str, dict[str, torch.Tensor]]):
    save_file({f"lycoris_{p.replace('.', '_')}.{s}": t.contiguous() for p, ts in modules.items() for s, t in ts.items()},
              str(path))
    return path


def _linear_layers(architecture: str) -> dict[str, tuple[int, int]]:
    return {p: s for p, s in shipped_layers()[architecture] if len(s) == 2}


def test_the_shipped_layer_tables_are_the_meta_device_denoisers():
    for architecture, layers in shipped_layers().items():
        assert meta_layers(architecture) == layers, architecture


@pytest.mark.parametrize(("architecture", "family"), [("flux", "flux"), ("sd35-medium", "sd3"), ("sdxl", None)])
def test_every_linear_layer_of_a_full_size_denoiser_reads_back_exactly(tmp_path, architecture, family):
    layers = _linear_layers(architecture)
    g = torch.Generator().manual_seed(0)
    built = {p: _lokr(*shape, g) for p, shape in layers.items()}
    loha_paths = list(layers)[:: max(1, len(layers) // 4)][:4]  # a few LoHa modules among the LoKr ones
    built.update({p: _loha(*layers[p], g) for p in loha_paths})
    file = _write(tmp_path / "lyco.safetensors", built)
    adapter = loralib.load(file)
    component = COMPONENT[architecture]
    assert set(adapter.modules) == {f"{component}.{p}" for p in layers}
    if family is not None:
        assert adapter.architecture.startswith(family)
    else:
        assert adapter.architecture == "sdxl"
    for path, tensors in built.items():
        module = adapter.modules[f"{component}.{path}"]
        for suffix, tensor in tensors.items():  # the factors written, exactly
            if suffix != "alpha":
                assert torch.equal(getattr(module, suffix.split("_", 1)[1]), tensor), (path, suffix)
    for path in [*loha_paths, *list(layers)[1::len(layers) // 3]]:  # ΔW against lycoris-lora's functions
        tensors = built[path]
        expected = _loha_dense(tensors) if "hada_w1_a" in tensors else _lokr_dense(tensors)
        assert_close(adapter.modules[f"{component}.{path}"].delta(), expected)


def test_the_examples_of_the_issue_name_the_diffusers_layers(tmp_path):
    g = torch.Generator().manual_seed(1)
    flux = _write(tmp_path / "flux.safetensors", {"transformer_blocks.0.attn.to_q": _lokr(3072, 3072, g),
                                                  "single_transformer_blocks.3.proj_mlp": _lokr(12288, 3072, g)})
    assert set(loralib.load(flux).modules) == {"transformer.transformer_blocks.0.attn.to_q",
                                               "transformer.single_transformer_blocks.3.proj_mlp"}
    sd3 = _write(tmp_path / "sd3.safetensors", {"transformer_blocks.0.attn.add_k_proj": _loha(1536, 1536, g)})
    adapter = loralib.load(sd3)
    assert set(adapter.modules) == {"transformer.transformer_blocks.0.attn.add_k_proj"}
    assert adapter.architecture.startswith("sd3")
    sdxl = _write(tmp_path / "sdxl.safetensors",
                  {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": _lokr(640, 640, g)})
    adapter = loralib.load(sdxl)
    assert set(adapter.modules) == {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"}


@pytest.mark.parametrize(("path", "shape", "needle"), [
    ("transformer_blocks.0.attn.to_qq", (3072, 3072), "lycoris_transformer_blocks_0_attn_to_qq is no layer"),
    ("transformer_blocks.0.attn.to_q", (100, 100), "lycoris_transformer_blocks_0_attn_to_q is no layer"),
])
def test_a_name_that_is_no_layer_is_refused_in_one_line(tmp_path, lorareg, path, shape, needle):
    file = _write(tmp_path / "bad.safetensors", {path: _loha(*shape, torch.Generator().manual_seed(2))})
    with pytest.raises(LoraError, match=needle) as caught:
        loralib.load(file)
    assert "\n" not in str(caught.value)
    res = lorareg("inspect", file)
    assert res.code != 0 and "Traceback" not in res.out + res.err


def test_inspect_convert_and_merge_through_the_cli(tmp_path, lorareg):
    g = torch.Generator().manual_seed(3)
    paths = {"transformer_blocks.0.attn.to_q": (3072, 3072), "transformer_blocks.0.attn.add_k_proj": (3072, 3072),
             "single_transformer_blocks.3.proj_mlp": (12288, 3072)}
    built = {p: (_loha if i % 2 else _lokr)(*s, g) for i, (p, s) in enumerate(paths.items())}
    expected = {f"transformer.{p}": (_loha_dense(t) if "hada_w1_a" in t else _lokr_dense(t)) for p, t in built.items()}
    file = _write(tmp_path / "lyco.safetensors", built)
    data = json.loads(lorareg("inspect", file, "--json").out)
    assert data["architecture"] == "flux" and data["kinds"] == {"lokr": 2, "loha": 1}

    res = lorareg("convert", file, "--plain", "--to", "kohya", "-o", tmp_path / "plain.safetensors")
    assert res.code == 0, res.err
    plain = loralib.load(tmp_path / "plain.safetensors")
    assert plain.is_plain and plain.architecture == "flux" and set(plain.modules) == set(expected)
    for key, dense in expected.items():
        assert_close(plain.modules[key].delta(), dense)

    res = lorareg("merge", file, f"{tmp_path / 'plain.safetensors'}:-0.25", "-o", tmp_path / "merged.safetensors")
    assert res.code == 0, res.err
    merged = loralib.load(tmp_path / "merged.safetensors")
    for key, dense in expected.items():
        assert_close(merged.modules[key].delta(), 0.75 * dense)


def test_a_name_two_layers_flatten_to_is_refused(monkeypatch):
    """No real denoiser has two such layers (checked over the shipped tables); a model that did would be refused."""
    from loralib.naming import flat

    assert all(len(found) == 1 for a in shipped_layers() for found in flat.flat_table(a).values())
    table = {"down_blocks_0_a_b": (("unet.down_blocks.0.a_b", (4, 4)), ("unet.down_blocks.0.a.b", (4, 4)))}
    monkeypatch.setattr(flat, "flat_table", lambda architecture: table)
    with pytest.raises(flat.FlatNameError, match="lycoris_down_blocks_0_a_b stands for 2 layers"):
        flat.resolve_flat_names(["lycoris_down_blocks_0_a_b"], {"lycoris_down_blocks_0_a_b": (4, 4)})
