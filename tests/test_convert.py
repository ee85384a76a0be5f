"""Conversions between kohya, PEFT and diffusers keep every module's factors and alpha exactly."""

from __future__ import annotations

import json

import pytest
import torch

import loralib
from loralib.base_model import full_size_layers, layer_shape, pipeline_layers
from loralib.errors import OutputExistsError, UnsupportedFormatError
from loralib.files.header import read_header
from loralib.formats import convert
from loralib.metadata import history
from loralib.tiny_models import build_tiny_pipeline
from tests.helpers.adapters import assert_same_deltas, assert_same_factors, varied_adapter


@pytest.fixture(scope="module")
def tiny_layers():
    return {arch: {k: layer_shape(m) for k, m in pipeline_layers(build_tiny_pipeline(arch)).items()}
            for arch in ("sd1", "sdxl")}


def _round_trip(adapter, tmp_path):
    """kohya -> PEFT -> diffusers -> kohya, through files, with the public convert()."""
    loralib.save(adapter, tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft")
    convert(tmp_path / "peft", tmp_path / "d.safetensors", "diffusers")
    convert(tmp_path / "d.safetensors", tmp_path / "b.safetensors", "kohya")
    return loralib.load(tmp_path / "b.safetensors")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_round_trip_tiny_is_bit_identical_with_conv_and_text_encoders(tiny_layers, tmp_path, arch):
    adapter = varied_adapter(tiny_layers[arch], architecture=arch)
    assert any(m.is_conv for m in adapter.modules.values())
    assert {"text_encoder"} <= set(adapter.components)
    back = _round_trip(adapter, tmp_path)
    assert_same_factors(adapter, back)
    assert back.architecture == arch and back.source_format == "kohya"


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_round_trip_full_size_every_module(tmp_path, arch):
    """Every Linear and Conv layer of the full-size model, rank 1, with SGM names for SDXL."""
    adapter = varied_adapter(full_size_layers(arch), architecture=arch, rank=1, conv_rank=1, dtype=torch.float16)
    back = _round_trip(adapter, tmp_path)
    assert_same_factors(adapter, back)
    assert back.dtype == torch.float16
    if arch == "sdxl":
        names = read_header(tmp_path / "b.safetensors").tensors
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in names


def test_cp_mid_is_kept_in_kohya_and_folded_elsewhere(tiny_layers, tmp_path):
    adapter = varied_adapter(tiny_layers["sd1"], architecture="sd1", mid=True)
    assert any(m.mid is not None for m in adapter.modules.values())
    loralib.save(adapter, tmp_path / "k.safetensors")
    assert_same_factors(adapter, loralib.load(tmp_path / "k.safetensors"))
    result = convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    assert any("lora_mid" in note for note in result.notes)
    folded = loralib.load(tmp_path / "d.safetensors")
    assert all(m.mid is None for m in folded.modules.values())
    assert_same_deltas(adapter, folded, atol=1e-6)


def test_fractional_alpha_survives_every_format(tiny_layers, tmp_path):
    adapter = varied_adapter(tiny_layers["sd1"], architecture="sd1")
    for module in adapter.modules.values():
        module.alpha = 0.3  # not a float32 number
    assert_same_factors(adapter, _round_trip(adapter, tmp_path))


def test_rslora_peft_config_is_read_with_its_own_scale(tiny_layers, tmp_path):
    adapter = varied_adapter(tiny_layers["sd1"], architecture="sd1", rank=4)
    loralib.save(adapter, tmp_path / "p", "peft")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(use_rslora=True, alpha_pattern={}, lora_alpha=2.0)
    config_path.write_text(json.dumps(config))
    read = loralib.load(tmp_path / "p")
    unet = {k: m for k, m in read.modules.items() if k.startswith("unet.")}
    for module in unet.values():  # rsLoRA scale alpha/sqrt(r) == kohya scale alpha'/r
        assert module.scale == pytest.approx(2.0 / module.rank ** 0.5, rel=1e-12)


def test_bf16_real_file_keeps_its_dtype(real_loras, tmp_path):
    source = real_loras / "sd2_diffusers-lora-down_unet-prefix_bf16.safetensors"
    convert(source, tmp_path / "k.safetensors")
    converted = loralib.load(tmp_path / "k.safetensors")
    assert converted.dtype == torch.bfloat16
    assert_same_factors(loralib.load(source), converted)


def test_conversion_records_history_and_hashes(real_loras, tmp_path):
    source = real_loras / "sd15_diffusers-lora-down_unet-prefix_f32.safetensors"
    result = convert(source, tmp_path / "k.safetensors")
    metadata = read_header(result.path).metadata
    record = history(metadata)[-1]
    assert record["operation"] == "convert" and record["from_format"] == "diffusers-old"
    assert record["inputs"][0]["tensor_sha256"] == loralib.inspect(source).hashes["tensor_sha256"]
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert metadata["sshs_model_hash"] == result.hashes.tensor_sha256


def test_existing_output_is_kept_without_force(tiny_layers, tmp_path):
    adapter = varied_adapter(tiny_layers["sd1"], architecture="sd1")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        loralib.save(adapter, out)
    assert out.read_bytes() == b"precious"
    loralib.save(adapter, out, force=True)
    assert_same_factors(adapter, loralib.load(out))


def test_failed_write_leaves_nothing_behind(tiny_layers, tmp_path, monkeypatch):
    adapter = varied_adapter(tiny_layers["sd1"], architecture="sd1")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    import loralib.files.writer as writer

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "tensor_bytes", broken)
    with pytest.raises(OSError):
        loralib.save(adapter, out, force=True)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_textual_inversion_tokens_are_never_dropped_silently(real_loras, tmp_path):
    source = real_loras / "sd15_cloneofsimo_r1_f32_with-ti-tokens.safetensors"
    original = loralib.load(source)
    assert set(original.embeddings) == {"<s1>", "<s2>"}
    with pytest.raises(UnsupportedFormatError, match="<s1>, <s2>.*--drop-embeddings"):
        convert(source, tmp_path / "p", "peft")
    assert not (tmp_path / "p").exists()
    result = convert(source, tmp_path / "p", "peft", drop_embeddings=True)
    assert any("<s1>" in note for note in result.notes)
    convert(source, tmp_path / "k.safetensors")  # kohya bundles them the way A1111 reads them
    bundled = loralib.load(tmp_path / "k.safetensors")
    assert "bundle_emb.<s1>.string_to_param.*" in read_header(tmp_path / "k.safetensors").tensors
    for token, vectors in original.embeddings.items():
        assert torch.equal(bundled.embeddings[token].reshape(-1), vectors.reshape(-1))
    assert_same_factors(original, bundled)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_writers_return_the_hashes_a_fresh_read_gives(tiny_layers, tmp_path, fmt):
    """The hashes computed while writing (main file, and the identity of every file of a PEFT folder)
    are those that reading the written adapter back gives, so nothing needs to read it again."""
    from loralib.files.hashes import hash_adapter_files
    from loralib.formats.layout import open_inputs

    adapter = loralib.synthetic.random_adapter(tiny_layers["sdxl"], 4, architecture="sdxl")
    target = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    result = loralib.save(adapter, target, fmt)
    headers = [source.header for source in open_inputs(target).sources]
    assert len(headers) == (3 if fmt == "peft" else 1)
    assert result._hashes is not None and result.hashes == hash_adapter_files(headers)
