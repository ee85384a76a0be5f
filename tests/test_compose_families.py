"""Every operation on Flux.1 (and SD3) adapters, against dense ΔW and the models' own files.

merge (mixed spellings: a fused kohya file with a split diffusers one), resize, TIES, extract
(diffusers folders and single BFL-named files), bake (into a diffusers folder, a transformer
folder and a single BFL file), inspect, the catalog and the Hub card.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loralib
from loralib.compose import bake, extract, merge, resize
from loralib.compose.model_weights import ModelWeights
from loralib.layers import select_layers
from loralib.synthetic import random_adapter
from tests.test_hub_registry import _front_matter, hub  # noqa: F401 (fixture)
from tests.test_naming_families import FLUX_EXTRA, original_layout


def _flux_layers(base):
    with ModelWeights.open(base) as model:
        return select_layers({k: s for k, s in model.shapes().items() if not k.startswith("text_encoder_2")})


def _dense(adapter) -> dict[str, torch.Tensor]:
    return {k: m.delta(torch.float64) for k, m in adapter.modules.items()}


@pytest.fixture(scope="module")
def flux_pair(tiny_flux, tmp_path_factory):
    """Two random Flux adapters: one written as kohya (fused qkv/linear1), one as diffusers (split)."""
    folder = tmp_path_factory.mktemp("flux_pair")
    layers = _flux_layers(tiny_flux)
    a = random_adapter(layers, 4, 2.0, seed=1, architecture="flux")
    b = random_adapter(layers, 6, 6.0, seed=2, architecture="flux")
    return (a, loralib.save(a, folder / "a_kohya.safetensors", "kohya").path,
            b, loralib.save(b, folder / "b_diffusers.safetensors", "diffusers").path)


def test_a_fused_kohya_flux_lora_has_the_fingerprint_of_its_split_spelling(flux_pair, tmp_path):
    """The catalog's ΔW fingerprint sketches each part of a fused layer from its rows of the stored
    factors: the kohya file (fused qkv/linear1) and the diffusers file (split) are the same adapter."""
    from loralib.fingerprint import compare, fingerprint_file

    a, a_path, _, _ = flux_pair
    assert any(name.endswith("_qkv.lora_up.weight") for name in load_file(a_path))
    split = loralib.save(a, tmp_path / "a_diffusers.safetensors", "diffusers").path
    fused, separate = fingerprint_file(str(a_path)), fingerprint_file(str(split))
    assert fused.modules == separate.modules == len(a.modules) and not fused.skipped
    assert compare(fused.to_bytes(), separate.to_bytes()).verdict == "same"


def test_kohya_names_of_flux_refuse_modules_that_are_not_plain_lora(flux_pair, tmp_path):
    """Original names fuse layers, which only plain factors can: a bias difference is refused in one
    line, and nothing is written."""
    from loralib.errors import UnsupportedFormatError

    a = flux_pair[0]
    key = "transformer.transformer_blocks.0.attn.to_q"
    module = a.modules[key]
    biased = loralib.LoraAdapter({**a.modules, key: loralib.LoraModule(module.down, module.up, module.alpha,
                                                                       bias=torch.ones(module.up.shape[0]))},
                                 "flux")
    for fmt, message in (("kohya", f"{key}, are not plain LoRA factors"), ("comfyui", "cannot hold .* bias")):
        with pytest.raises(UnsupportedFormatError, match=message):
            loralib.save(biased, tmp_path / f"{fmt}.safetensors", fmt)
    assert list(tmp_path.iterdir()) == []


def test_merge_of_a_fused_kohya_and_a_split_diffusers_flux_lora_is_the_weighted_sum(flux_pair, tmp_path):
    a, a_path, b, b_path = flux_pair
    assert loralib.load(a_path).source_format == "kohya" and loralib.load(b_path).source_format == "diffusers"
    result = merge([(a_path, 0.7), (b_path, -0.3)])
    assert result.adapter.architecture == "flux"
    da, db, merged = _dense(a), _dense(b), _dense(result.adapter)
    assert set(merged) == set(da)
    for key in merged:
        assert torch.allclose(merged[key], 0.7 * da[key] - 0.3 * db[key], atol=1e-6), key
    out = result.save(tmp_path / "merged.safetensors")  # kohya: q, k, v fused block-diagonally again
    again = _dense(loralib.load(out.path))
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)
    with_rank = merge([(a_path, 0.7), (b_path, -0.3)], rank=4)
    u = _dense(with_rank.adapter)
    for key in ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.1.proj_mlp"):
        exact = merged[key]
        s = torch.linalg.svdvals(exact)
        best_error = float(s[4:].pow(2).sum().sqrt())
        assert abs(float((u[key] - exact).norm()) - best_error) <= 1e-6 * max(1.0, best_error), key


def test_resize_and_ties_of_a_flux_kohya_file(flux_pair):
    _, a_path, _, _ = flux_pair
    source = loralib.load(a_path)
    resized = resize(a_path, rank=2)
    assert resized.adapter.architecture == "flux" and resized.adapter.ranks == [2]
    for key, module in resized.adapter.modules.items():
        exact = source.modules[key].delta(torch.float64)
        s = torch.linalg.svdvals(exact)
        assert abs(float((module.delta(torch.float64) - exact).norm()) - float(s[2:].pow(2).sum().sqrt())) < 1e-6, key
    ties = merge([(a_path, 1.0)], method="ties", density=1.0)
    for key, module in ties.adapter.modules.items():
        assert torch.allclose(module.delta(torch.float64), source.modules[key].delta(torch.float64), atol=1e-6), key


def test_bake_into_a_flux_folder_and_extract_it_back(tiny_flux, flux_pair, tmp_path):
    from diffusers import FluxPipeline

    a, a_path, _, _ = flux_pair
    baked = bake(tiny_flux, [(a_path, 0.5)], tmp_path / "baked")
    assert baked.kind == "diffusers" and baked.modules == len(a.modules)
    pipe = FluxPipeline.from_pretrained(tiny_flux)  # oracle: diffusers' own fuse of the diffusers spelling
    loralib.save(a, tmp_path / "a_diffusers.safetensors", "diffusers")
    pipe.load_lora_weights(str(tmp_path / "a_diffusers.safetensors"), adapter_name="a")
    pipe.set_adapters(["a"], [0.5])
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    again = FluxPipeline.from_pretrained(tmp_path / "baked")
    for component in ("transformer", "text_encoder"):
        expected, got = getattr(pipe, component).state_dict(), getattr(again, component).state_dict()
        assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 2e-6, component
    extracted = extract(tiny_flux, tmp_path / "baked", rank=4)
    assert extracted.adapter.architecture == "flux"
    dense = _dense(a)
    for key, module in extracted.adapter.modules.items():
        assert torch.allclose(module.delta(torch.float64), 0.5 * dense[key], atol=2e-5), key
    assert set(extracted.adapter.modules) == set(dense)


def test_bake_into_a_single_bfl_file_and_a_transformer_folder_and_extract(tiny_flux, flux_pair, tmp_path):
    a = flux_pair[0]
    from diffusers import FluxTransformer2DModel

    from loralib.naming.flux import FLUX_MAP

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    bfl = original_layout(transformer, FLUX_MAP, FLUX_EXTRA, lambda name, value: value.detach().clone().contiguous())
    save_file(bfl, tmp_path / "flux_bfl.safetensors")
    transformer_only = {k: m for k, m in a.modules.items() if k.startswith("transformer.")}
    a_transformer = loralib.LoraAdapter(transformer_only, "flux")
    result = bake(tmp_path / "flux_bfl.safetensors", [(a_transformer, 1.0)], tmp_path / "baked_bfl.safetensors")
    assert result.kind == "checkpoint" and result.modules == len(transformer_only)
    expected_state = {k: v.clone() for k, v in transformer.state_dict().items()}
    for key, module in transformer_only.items():
        expected_state[key.split(".", 1)[1] + ".weight"] += module.delta()
    transformer.load_state_dict(expected_state)
    expected = original_layout(transformer, FLUX_MAP, FLUX_EXTRA, lambda name, value: value.detach())
    baked = load_file(tmp_path / "baked_bfl.safetensors")
    assert set(baked) == set(expected)
    assert max((baked[k] - expected[k]).abs().max().item() for k in baked) <= 2e-6
    # the same into a diffusers transformer folder on its own
    folder = bake(tiny_flux / "transformer", [(a_transformer, 1.0)], tmp_path / "baked_transformer")
    assert folder.kind == "diffusers"
    state = FluxTransformer2DModel.from_pretrained(tmp_path / "baked_transformer").state_dict()
    assert max((state[k] - expected_state[k]).abs().max().item() for k in state) <= 2e-6
    # extract from two single BFL files: fused layers are read a part at a time
    extracted = extract(tmp_path / "flux_bfl.safetensors", tmp_path / "baked_bfl.safetensors", rank=4)
    assert extracted.adapter.architecture == "flux" and set(extracted.adapter.modules) == set(transformer_only)
    for key, module in extracted.adapter.modules.items():
        assert torch.allclose(module.delta(torch.float64), transformer_only[key].delta(torch.float64), atol=2e-5), key


def test_inspect_catalog_and_hub_card_of_a_flux_lora(flux_pair, lorareg, hub, tmp_path):  # noqa: F811
    _, a_path, _, _ = flux_pair
    report = json.loads(lorareg("inspect", a_path, "--json").out)
    assert (report["format"], report["architecture"]) == ("kohya", "flux")
    assert report["components"] == {"transformer": report["components"]["transformer"], "text_encoder": 12}
    res = lorareg("add", a_path, "--name", "flux-style")
    assert res.code == 0, res.err
    listed = json.loads(lorareg("list", "--arch", "flux", "--json").out)
    assert [e["name"] for e in listed] == ["flux-style"]
    res = lorareg("push", "flux-style", "--repo", "alice/flux-style", "--also", "diffusers,comfyui")
    assert res.code == 0, res.err
    readme = hub.file_bytes("alice/flux-style", "README.md").decode()
    meta = _front_matter(readme)
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev" and "flux" in meta["tags"]
    assert "Use it in ComfyUI and Forge" in readme and "Flux.1" in readme
    assert {"flux-style.safetensors", "diffusers/pytorch_lora_weights.safetensors",
            "comfyui/flux-style.safetensors"} <= set(hub.list_files("alice/flux-style"))
    res = lorareg("pull", "alice/flux-style", "--file", "comfyui/flux-style.safetensors", "--json")
    assert res.code == 0, res.err
    pulled = json.loads(res.out)
    assert loralib.load(pulled["path"]).architecture == "flux"


def test_bake_into_an_sd3_single_file_with_mmdit_names_and_extract_it_back(tiny_sd3, tmp_path):
    from diffusers import SD3Transformer2DModel

    from loralib.naming.sd3 import SD3_MAP
    from tests.test_naming_families import SD3_EXTRA

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer")
    original = original_layout(transformer, SD3_MAP, SD3_EXTRA, lambda name, value: value.detach().clone().contiguous())
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, tmp_path / "sd3.safetensors")
    with ModelWeights.open(tmp_path / "sd3.safetensors") as model:
        layers = model.shapes()
    assert "transformer.pos_embed.proj" in layers and layers["transformer.pos_embed.proj"].is_conv
    adapter = random_adapter(layers, 3, 3.0, seed=4, architecture="sd3")  # every layer, the conv and the swapped ones too
    bake(tmp_path / "sd3.safetensors", [(adapter, 1.0)], tmp_path / "baked.safetensors")
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    for key, module in adapter.modules.items():
        state[key.split(".", 1)[1] + ".weight"] += module.delta()
    transformer.load_state_dict(state)
    expected = original_layout(transformer, SD3_MAP, SD3_EXTRA, lambda name, value: value.detach())
    baked = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(tmp_path / "baked.safetensors").items()}
    assert set(baked) == set(expected)
    assert max((baked[k] - expected[k]).abs().max().item() for k in baked) <= 2e-6
    extracted = extract(tmp_path / "sd3.safetensors", tmp_path / "baked.safetensors", rank=3, conv_rank=3)
    assert extracted.adapter.architecture == "sd3"
    for key, module in extracted.adapter.modules.items():
        assert torch.allclose(module.delta(torch.float64), adapter.modules[key].delta(torch.float64), atol=2e-5), key
