"""Single-file Flux.1 and SD3/SD3.5 transformers as base models for generate and train.

Oracles:
- diffusers' own single-file converters: ``SD3Transformer2DModel.from_single_file`` loads the tiny
  SD3/SD3.5 files that ``lorareg tiny-model --single-file`` writes to exactly the original
  weights; ``convert_flux_transformer_checkpoint_to_diffusers`` (which assumes Flux.1's full width
  3072, so it is run on the full-size model on the meta device) maps every name and shape we write
  back to the model's own;
- the diffusers folder the file was taken from: generating from the file gives the same latents
  (bit for bit) and the same PNG as from the folder;
- the loss: a short training run on the file lowers the evaluation loss.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from loralib.errors import InvalidArgumentError
from loralib.files.header import read_header
from loralib.generation import GenerationSettings, render
from loralib.pipelines import load_base_model
from loralib.tiny_models import build_tiny_pipeline, write_tiny_model
from loralib.transformer_files import inspect_transformer_file, native_state_dict
from tests.helpers.training import train_and_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in read_header(path).tensors.items()}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-files")
    folder = write_tiny_model(root / "flux", "flux", single_file=root / "flux1-tiny.safetensors")
    return folder, root / "flux1-tiny.safetensors"


@pytest.mark.parametrize("arch", ["sd3", "sd35-medium", "sd35-large"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_diffusers_sd3_converter_loads_the_written_file_exactly(arch, prefix, tmp_path, lorareg):
    from diffusers import SD3Transformer2DModel

    args = ["tiny-model", tmp_path / "base", "--arch", arch, "--single-file", tmp_path / "t.safetensors"]
    result = lorareg(*args, *(["--comfy"] if prefix else []))
    assert result.code == 0, result.err
    names = list(_shapes(tmp_path / "t.safetensors"))
    assert all(n.startswith(prefix) for n in names)
    assert f"{prefix}joint_blocks.0.x_block.attn.qkv.weight" in names
    loaded = SD3Transformer2DModel.from_single_file(str(tmp_path / "t.safetensors"),
                                                    config=str(tmp_path / "base"), subfolder="transformer",
                                                    local_files_only=True)
    original = SD3Transformer2DModel.from_pretrained(tmp_path / "base", subfolder="transformer")
    theirs, ours = loaded.state_dict(), original.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    info = inspect_transformer_file(tmp_path / "t.safetensors", _shapes(tmp_path / "t.safetensors"))
    assert info.architecture == arch and info.prefix == prefix


def test_flux_names_are_those_diffusers_converter_reads_at_full_size():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from loralib.architectures import FLUX

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX.denoiser_config)
    native = native_state_dict(model, "flux")
    assert "double_blocks.18.img_attn.norm.query_norm.scale" in native and "single_blocks.37.linear1.weight" in native
    info = inspect_transformer_file("flux1-dev.safetensors", {k: tuple(v.shape) for k, v in native.items()})
    assert info.architecture == "flux" and {k: info.config[k] for k in FLUX.denoiser_config} == \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in FLUX.denoiser_config.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(native))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_tiny_flux_file_loads_to_the_folder_weights(flux_files):
    folder, file = flux_files
    base = load_base_model(file, components=folder)
    original = build_tiny_pipeline("flux").transformer.state_dict()
    loaded = base.denoiser.state_dict()
    assert base.architecture == "flux" and loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_generate_from_the_file_gives_the_folders_latents(arch, flux_files, tmp_path):
    if arch == "flux":
        folder, file = flux_files
    else:
        folder = write_tiny_model(tmp_path / "sd3", "sd3", single_file=tmp_path / "sd3.safetensors")
        file = tmp_path / "sd3.safetensors"
    settings = GenerationSettings("a red castle", "", 2, 3.5 if arch == "flux" else 5.0, 32, 32, seed=3)
    base = load_base_model(folder)
    # Safetensors' memory-mapped weights sit at other alignments than freshly allocated ones, which moves
    # CPU kernels' float rounding (~5e-7); re-allocated, the folder's weights must give the very same latents.
    base.denoiser.load_state_dict({k: v.clone() for k, v in base.denoiser.state_dict().items()}, assign=True)
    from_folder = render(base.pipeline(), settings, [3], output_type="latent")[0]
    from_file = render(load_base_model(file, components=folder).pipeline(), settings, [3], output_type="latent")[0]
    assert torch.equal(from_folder, from_file)


def test_generate_command_with_base_components_writes_the_folders_png(flux_files, tmp_path, lorareg):
    folder, file = flux_files
    common = ["a red castle", "--seed", "5", "--steps", "2", "--width", "32", "--height", "32"]
    a = lorareg("generate", *common, "--base", folder, "-o", tmp_path / "a")
    b = lorareg("generate", *common, "--base", file, "--base-components", folder, "-o", tmp_path / "b")
    assert a.code == 0 and b.code == 0, (a.err, b.err)
    from PIL import Image

    with Image.open(tmp_path / "a" / "00000-5.png") as x, Image.open(tmp_path / "b" / "00000-5.png") as y:
        # equal up to one level of 8-bit rounding (see the alignment note above)
        difference = np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16))
        assert x.size == y.size and difference.max() <= 1


def test_training_on_the_file_lowers_the_loss(flux_files, tmp_path):
    folder, file = flux_files
    run = train_and_evaluate(tmp_path, file, 2, (200, 500, 800), base_components=str(folder), max_train_steps=12,
                             batch_size=2, learning_rate=2e-2, alpha=4)
    assert run["result"].steps == 12
    assert run["after"] < 0.97 * run["before"], (run["before"], run["after"])


def test_a_transformer_file_without_components_is_one_line(flux_files, tmp_path, lorareg):
    _, file = flux_files
    with pytest.raises(InvalidArgumentError, match="holds the Flux.1 transformer;") as info:
        load_base_model(file)
    assert "\n" not in str(info.value) and "--base-components" in str(info.value)
    result = lorareg("generate", "x", "--base", file, "-o", tmp_path / "o")
    assert result.code != 0 and "--base-components" in result.err and "Traceback" not in result.err


def test_components_of_another_family_are_one_line(flux_files, tiny_sd3):
    _, file = flux_files
    with pytest.raises(InvalidArgumentError, match="not a Flux.1 diffusers folder"):
        load_base_model(file, components=tiny_sd3)


def test_an_incomplete_transformer_file_is_one_line(flux_files, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, file = flux_files
    tensors = load_file(str(file))
    del tensors["txt_in.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(InvalidArgumentError, match="has no txt_in.weight") as info:
        load_base_model(tmp_path / "broken.safetensors", components=folder)
    assert "\n" not in str(info.value)
    tensors = load_file(str(file))
    tensors["double_blocks.0.img_in_extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(InvalidArgumentError, match="no flux model has"):
        load_base_model(tmp_path / "extra.safetensors", components=folder)


def test_single_file_for_an_sd_architecture_is_refused(tmp_path, lorareg):
    result = lorareg("tiny-model", tmp_path / "b", "--arch", "sd1", "--single-file", tmp_path / "u.safetensors")
    assert result.code != 0 and "only for Flux.1 and SD3" in result.err
    assert not (tmp_path / "u.safetensors").exists()


def _weightless_copy(folder, target, emptied):
    """The diffusers folder with the weights of ``emptied`` components removed (their configs kept)."""
    import shutil

    shutil.copytree(folder, target)
    for name in emptied:
        for weights in (target / name).glob("*.safetensors"):
            weights.unlink()
    return target


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_an_all_in_one_file_gives_its_vae_and_text_encoders_and_the_folder_only_configs(arch, tmp_path, lorareg):
    # SD3's tiny CLIP-L and CLIP-G have one width, so which is which can only come from the names.
    from tests.helpers.compose_cases import all_in_one_file

    folder = write_tiny_model(tmp_path / arch, arch, single_file=tmp_path / "t.safetensors",
                              single_file_prefix="model.diffusion_model.")
    file = all_in_one_file(folder, tmp_path / "t.safetensors", tmp_path / "all-in-one.safetensors")
    encoders = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if arch == "sd3" else [])
    configs_only = _weightless_copy(folder, tmp_path / "configs", ["vae", *encoders])
    info = inspect_transformer_file(file, _shapes(file))
    assert set(info.components()) == {"vae", *encoders}
    base = load_base_model(file, components=configs_only)
    reference = load_base_model(folder)
    for ours, theirs in [(base.vae, reference.vae), *zip(base.text_encoders, reference.text_encoders),
                         (base.denoiser, reference.denoiser)]:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), type(theirs).__name__
    settings = GenerationSettings("a red castle", "", 2, 3.5 if arch == "flux" else 5.0, 32, 32, seed=3)
    # The weights are equal bit for bit (above); where they sit in memory still moves float rounding (~2e-7).
    assert torch.allclose(render(reference.pipeline(), settings, [3], output_type="latent")[0],
                          render(base.pipeline(), settings, [3], output_type="latent")[0], rtol=0, atol=1e-5)
    result = lorareg("generate", "a red castle", "--steps", "1", "--width", "32", "--height", "32", "--base", file,
                     "--base-components", configs_only, "-o", tmp_path / "images")
    assert result.code == 0, result.err
    assert len(list((tmp_path / "images").glob("*.png"))) == 1


def test_parts_an_all_in_one_file_lacks_come_from_the_folder_and_missing_weights_are_one_line(flux_files, tmp_path):
    from tests.helpers.compose_cases import all_in_one_file

    folder, transformer = flux_files
    file = all_in_one_file(folder, transformer, tmp_path / "te-only.safetensors", parts=("clip_l", "t5xxl"))
    base = load_base_model(file, components=_weightless_copy(folder, tmp_path / "no-te", ["text_encoder", "text_encoder_2"]))
    vae = load_base_model(folder).vae.state_dict()
    assert all(torch.equal(base.vae.state_dict()[k], v) for k, v in vae.items())  # from the folder
    with pytest.raises(InvalidArgumentError, match="lack weights the file te-only.safetensors does not hold") as info:
        load_base_model(file, components=_weightless_copy(folder, tmp_path / "no-vae", ["vae"]))
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="and its vae, text_encoder, text_encoder_2; the tokenizers"):
        load_base_model(all_in_one_file(folder, transformer, tmp_path / "aio.safetensors"))


def test_damaged_parts_of_an_all_in_one_file_are_one_line_naming_the_part(flux_files, tmp_path, lorareg):
    from safetensors.torch import load_file, save_file

    from tests.helpers.compose_cases import all_in_one_file

    folder, transformer = flux_files
    whole = load_file(all_in_one_file(folder, transformer, tmp_path / "aio.safetensors"))
    reshaped = next(k for k in whole if k.startswith("text_encoders.clip_l.") and k.endswith("fc1.weight"))
    damaged = {
        "clip_l text encoder (weights of another shape": {**whole, reshaped: torch.zeros(3, 3)},
        "VAE (": {k: v for k, v in whole.items() if not (k.startswith("vae.") and "mid.attn_1" in k)},
        "t5xxl text encoder (9 weights missing": {k: v for k, v in whole.items()
                                                  if not (k.startswith("text_encoders.t5xxl.") and ".block.1." in k)},
    }
    for number, (expected, tensors) in enumerate(damaged.items()):
        file = tmp_path / f"damaged{number}.safetensors"
        save_file(tensors, file)
        with pytest.raises(InvalidArgumentError, match=f"holds an incomplete or damaged {re.escape(expected)}"):
            load_base_model(file, components=folder)
        result = lorareg("generate", "x", "--steps", "1", "--width", "32", "--height", "32", "--base", file,
                         "--base-components", folder, "-o", tmp_path / f"out{number}")
        assert result.code != 0 and len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
        assert not (tmp_path / f"out{number}").exists()
