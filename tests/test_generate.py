"""``lorareg generate``: weighted adapters fused like diffusers fuses them, A1111 parameters in every PNG,
the same seed giving the same image."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import loralib
from loralib.base_model import layer_shape, pipeline_layers
from loralib.files.hashes import hash_file
from loralib.generation import AdapterUse, fuse_adapters, read_parameters
from loralib.layers import select_layers
from loralib.synthetic import random_adapter
from tests.helpers.diffusers_oracle import pipeline_class

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def _tiny_layers(base):
    pipe = pipeline_class("sd1").from_pretrained(base)
    return select_layers({k: layer_shape(m) for k, m in pipeline_layers(pipe).items()}, feed_forward=False)


@pytest.fixture(scope="module")
def adapters(tiny_sd1, tmp_path_factory):
    """Two random adapters for the tiny SD1 model (UNet and text encoder attention), in kohya files."""
    folder = tmp_path_factory.mktemp("adapters")
    layers = _tiny_layers(tiny_sd1)
    paths = []
    for name, seed, rank in (("pixel", 1, 4), ("other", 2, 2)):
        adapter = random_adapter(layers, rank, alpha=rank / 2, seed=seed, architecture="sd1")
        paths.append(loralib.save(adapter, folder / f"{name}.safetensors").path)
    return paths


def _folder_hash(folder) -> str:
    """A1111's "Model hash" of a diffusers folder as docs/generation.md defines it, written out."""
    import hashlib

    listing = "".join(f"{f.relative_to(folder).as_posix()}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                      for f in sorted(p for p in folder.rglob("*") if p.is_file()))
    return hashlib.sha256(listing.encode()).hexdigest()[:10]


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_pngs_carry_a1111_parameters_and_seeds_reproduce(tiny_sd1, adapters, tmp_path, lorareg):
    pixel, other = adapters
    res = lorareg("generate", "pxl style, a castle", "--base", tiny_sd1, "--lora", f"{pixel}:0.8", "--lora",
                  f"{other}:-0.3", "-n", "2", "--seed", "7", "--steps", "2", "--width", "32", "--height", "48",
                  "--negative", "blurry, dark", "--scheduler", "euler_a", "-o", tmp_path / "first")
    assert res.code == 0, res.err
    first, second = tmp_path / "first" / "00000-7.png", tmp_path / "first" / "00001-8.png"
    assert first.is_file() and second.is_file()
    lines = read_parameters(first).split("\n")
    assert lines[0] == "pxl style, a castle <lora:pixel:0.8> <lora:other:-0.3>"
    assert lines[1] == "Negative prompt: blurry, dark"
    fields = lines[2]
    for expected in ("Steps: 2", "Sampler: Euler a", "CFG scale: 7", "Seed: 7", "Size: 32x48",
                     f"Model hash: {_folder_hash(tiny_sd1)}, Model: {tiny_sd1.name}",
                     f'Lora hashes: "pixel: {hash_file(pixel).a1111}, other: {hash_file(other).a1111}"'):
        assert expected in fields, (expected, fields)
    # the images belong to both adapters in the catalog, each with its own weight
    for name, weight in (("pixel", 0.8), ("other", -0.3)):
        samples = json.loads(lorareg("show", name, "--json").out)["samples"]
        assert [(s["path"], s["seed"], s["weight"], s["prompt"], s["negative_prompt"], s["source"]) for s in samples] == [
            (str(first), 7, weight, "pxl style, a castle", "blurry, dark", "generate"),
            (str(second), 8, weight, "pxl style, a castle", "blurry, dark", "generate")]
        assert samples[0]["parameters"]["Steps"] == "2" and samples[0]["parameters"]["Sampler"] == "Euler a"
    assert "seed 7, weight 0.8" in lorareg("show", "pixel").out
    with Image.open(second) as image:
        assert image.size == (32, 48)
        details = json.loads(image.text["lorareg"])
    assert details["seed"] == 8 and [a["weight"] for a in details["adapters"]] == [0.8, -0.3]
    assert "Seed: 8" in read_parameters(second)

    again = lorareg("generate", "pxl style, a castle", "--base", tiny_sd1, "--lora", f"{pixel}:0.8", "--lora",
                    f"{other}:-0.3", "--seed", "8", "--steps", "2", "--width", "32", "--height", "48",
                    "--negative", "blurry, dark", "--scheduler", "euler_a", "-o", tmp_path / "again", "--json")
    assert again.code == 0, again.err
    written = json.loads(again.out)["images"]
    assert [Image.open(w["path"]).size for w in written] == [(32, 48)]
    assert np.array_equal(_pixels(written[0]["path"]), _pixels(second))  # the same seed, the same image
    assert not np.array_equal(_pixels(first), _pixels(second))


def test_fused_weights_equal_diffusers_set_adapters(tiny_sd1, adapters):
    import loralib

    pixel, other = adapters
    ours = pipeline_class("sd1").from_pretrained(tiny_sd1)
    original = {k: m.weight.detach().clone() for k, m in pipeline_layers(ours).items()}
    loaded = [(loralib.load(pixel), 0.8, AdapterUse("pixel", 0.8)), (loralib.load(other), -0.3, AdapterUse("other", -0.3))]
    fused = fuse_adapters(ours, loaded)

    theirs = pipeline_class("sd1").from_pretrained(tiny_sd1)
    theirs.load_lora_weights(str(pixel), adapter_name="pixel")
    theirs.load_lora_weights(str(other), adapter_name="other")
    theirs.set_adapters(["pixel", "other"], [0.8, -0.3])
    theirs.fuse_lora(adapter_names=["pixel", "other"])
    theirs.unload_lora_weights()

    mine, reference = pipeline_layers(ours), pipeline_layers(theirs)
    changed = 0
    for key, layer in mine.items():
        torch.testing.assert_close(layer.weight, reference[key].weight, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(layer.weight, original[key])
    assert changed == len(set(loaded[0][0].modules) | set(loaded[1][0].modules))
    fused.remove()
    assert all(torch.equal(m.weight, original[k]) for k, m in pipeline_layers(ours).items())


def test_catalog_names_work_as_adapter_references(tiny_sd1, adapters, tmp_path, lorareg):
    pixel, _ = adapters
    assert lorareg("add", pixel, "--name", "pixel-art").code == 0
    res = lorareg("generate", "a pxl style castle", "--base", tiny_sd1, "--lora", "pixel-art:0.5", "--seed", "1",
                  "--steps", "1", "--width", "32", "--height", "32", "-o", tmp_path)
    assert res.code == 0, res.err
    text = read_parameters(tmp_path / "00000-1.png")
    assert text.startswith("a pxl style castle <lora:pixel-art:0.5>\n")
    assert re.search(rf'Lora hashes: "?pixel-art: {hash_file(pixel).a1111}', text)


def test_an_adapter_for_another_architecture_is_refused(tiny_sd1, tiny_sdxl, tmp_path, lorareg):
    pipe = pipeline_class("sdxl").from_pretrained(tiny_sdxl)
    layers = select_layers({k: layer_shape(m) for k, m in pipeline_layers(pipe).items()}, feed_forward=False)
    path = loralib.save(random_adapter(layers, 2, seed=3, architecture="sdxl"), tmp_path / "xl.safetensors").path
    res = lorareg("generate", "x", "--base", tiny_sd1, "--lora", path, "--steps", "1", "-o", tmp_path / "out")
    assert res.code == 1
    assert "xl is an sdxl adapter and the base model is sd1" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "out").exists()  # refused before anything was rendered


def test_tiny_model_command_builds_a_loadable_base(tmp_path, lorareg):
    res = lorareg("tiny-model", tmp_path / "base", "--arch", "sd1", "--seed", "3")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "base" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    again = lorareg("tiny-model", tmp_path / "base")
    assert again.code == 1 and "already exists" in again.err
    assert lorareg("tiny-model", tmp_path / "base", "--force").code == 0
