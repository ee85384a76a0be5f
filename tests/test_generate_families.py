"""``lorareg generate`` with Flux.1 and SD3 bases: the same adapters-with-weights as diffusers' own loader.

Oracle: diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline`` with ``load_lora_weights`` and
``set_adapters`` (two adapters, weights 0.8 and -0.3) on the same tiny pipeline, same seed, same
steps. Its denoised latents must equal ours (lorareg fuses ``weight · ΔW`` into the weights in
float32; diffusers adds the low-rank products at run time, so they agree to float32 rounding:
atol 1e-4 on latents of magnitude ~1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import loralib
from loralib.base_model import layer_shape, pipeline_layers
from loralib.generation import AdapterUse, GenerationSettings, fuse_adapters, read_parameters, render
from loralib.layers import select_layers
from loralib.pipelines import load_base_model
from loralib.synthetic import random_adapter
from tests.helpers.diffusers_oracle import pipeline_class

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = (0.8, -0.3)


def _adapters(arch: str, base_dir, folder):
    """Two random adapters on the transformer's attention and feed-forward layers, in diffusers files."""
    pipe = pipeline_class(arch).from_pretrained(base_dir)
    shapes = {k: layer_shape(m) for k, m in pipeline_layers(pipe).items() if k.startswith("transformer.")}
    layers = select_layers(shapes, projections=False, modulation=False)
    paths = []
    for name, seed in (("one", 1), ("two", 2)):
        adapter = random_adapter(layers, 4, alpha=2, seed=seed, architecture=arch)
        for module in adapter.modules.values():
            module.up = module.up * 20  # large enough to change the image visibly
        paths.append(loralib.save(adapter, folder / f"{name}.safetensors", format="diffusers").path)
    return paths


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_latents_equal_diffusers_load_lora_weights_and_set_adapters(arch, request, tmp_path):
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    paths = _adapters(arch, base_dir, tmp_path)
    settings = GenerationSettings("a red castle", "", 3, 3.5 if arch == "flux" else 5.0, 32, 48, seed=11)

    base = load_base_model(base_dir)
    ours = base.pipeline()
    loaded = [(loralib.load(p), w, AdapterUse(p.stem, w)) for p, w in zip(paths, WEIGHTS)]
    fused = fuse_adapters(ours, loaded)
    ours_latents = render(ours, settings, [11], output_type="latent")[0]
    fused.remove()
    plain_latents = render(ours, settings, [11], output_type="latent")[0]

    theirs = pipeline_class(arch).from_pretrained(base_dir)
    for path in paths:
        theirs.load_lora_weights(str(path), adapter_name=path.stem)
    theirs.set_adapters([p.stem for p in paths], list(WEIGHTS))
    their_latents = render(theirs, settings, [11], output_type="latent")[0]

    assert ours_latents.shape == their_latents.shape
    torch.testing.assert_close(ours_latents, their_latents, atol=1e-4, rtol=1e-4)
    assert (ours_latents - plain_latents).abs().max() > 1e-2  # the adapters do change the result


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_generate_command_writes_flow_model_pngs_that_reproduce(arch, request, tmp_path, lorareg):
    base_dir = request.getfixturevalue(f"tiny_{arch}")
    one, two = _adapters(arch, base_dir, tmp_path)
    args = ["generate", "a red castle", "--base", base_dir, "--lora", f"{one}:0.8", "--lora", f"{two}:-0.3",
            "--seed", "5", "--steps", "2", "--width", "32", "--height", "32"]
    first = lorareg(*args, "-o", tmp_path / "a")
    assert first.code == 0, first.err
    again = lorareg(*args, "-o", tmp_path / "b")
    assert again.code == 0, again.err
    png = tmp_path / "a" / "00000-5.png"
    with Image.open(png) as a, Image.open(tmp_path / "b" / "00000-5.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    lines = read_parameters(png).split("\n")
    assert lines[0] == "a red castle <lora:one:0.8> <lora:two:-0.3>"
    fields = lines[1]
    assert "Steps: 2" in fields and "Sampler: Euler" in fields and "Seed: 5" in fields and "Size: 32x32" in fields
    if arch == "flux":  # Forge's fields: guidance-distilled, default guidance 3.5
        assert "CFG scale: 1," in fields and "Distilled CFG Scale: 3.5" in fields
    else:
        assert "CFG scale: 7," in fields and "Distilled" not in fields


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "dpm++_2m"], "flow-matching"),
    (["--width", "40"], "multiple of 16"),
])
def test_flow_models_refuse_what_they_cannot_use(tiny_flux, tmp_path, lorareg, args, message):
    res = lorareg("generate", "a castle", "--base", tiny_flux, "--steps", "1", "--height", "32", "--width", "32",
                  *args, "-o", tmp_path)
    assert res.code != 0 and message in res.err and "Traceback" not in res.err
    assert not list(tmp_path.glob("*.png"))


def test_flux_refuses_a_negative_prompt(tiny_flux, tmp_path, lorareg):
    res = lorareg("generate", "a castle", "--base", tiny_flux, "--negative", "blurry", "-o", tmp_path)
    assert res.code != 0 and "negative prompt" in res.err and "Traceback" not in res.err


def test_heun_is_flow_matching_heun_on_flow_models(tiny_sd3, tmp_path, lorareg):
    res = lorareg("generate", "a castle", "--base", tiny_sd3, "--scheduler", "heun", "--steps", "2", "--seed", "1",
                  "--width", "32", "--height", "32", "-o", tmp_path)
    assert res.code == 0, res.err
    assert "Sampler: Heun" in read_parameters(tmp_path / "00000-1.png")
