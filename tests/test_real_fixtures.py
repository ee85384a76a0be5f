"""Every real file in ../shared/fixtures/real-loras gets the handling its README row names."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import loralib
from loralib.errors import CorruptFileError, NotALoraError

READABLE = {  # file stem -> (format, architecture, modules, dtype)
    "sd15_diffusers-attnprocs_noprefix_f32": ("diffusers-attnprocs", "sd1", 128, "F32"),
    "sd15_diffusers-attnprocs_unet-prefix_f32": ("diffusers-attnprocs", "sd1", 128, "F32"),
    "sd15_diffusers-lora-down_unet-prefix_f32": ("diffusers-old", "sd1", 128, "F32"),
    "sd2_diffusers-attnprocs_unet-prefix_f32": ("diffusers-attnprocs", "sd2", 128, "F32"),
    "sd2_diffusers-lora-down_unet-prefix_f32": ("diffusers-old", "sd2", 128, "F32"),
    "sd2_diffusers-lora-down_unet-prefix_bf16": ("diffusers-old", "sd2", 128, "BF16"),
    "sd15_cloneofsimo_r4_f16": ("cloneofsimo", "sd1", 192, "F16"),
    "sd15_cloneofsimo_r1_f32_with-ti-tokens": ("cloneofsimo", "sd1", 192, "F32"),
    "flux_aitoolkit-peft-names_f16": ("diffusers", "flux", 4, "F16"),
}


def test_fixtures_are_the_published_bytes(real_loras):
    for line in (real_loras / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((real_loras / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("stem", sorted(READABLE))
def test_readable_files_inspect_load_and_convert(real_loras, lorareg, tmp_path, stem):
    fmt, arch, modules, dtype = READABLE[stem]
    path = real_loras / f"{stem}.safetensors"
    res = lorareg("inspect", path, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert (report["format"], report["architecture"], report["modules"]) == (fmt, arch, modules)
    assert set(report["dtypes"]) == {dtype}
    assert report["hashes"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for target in ("kohya", "diffusers"):
        out = tmp_path / f"{target}.safetensors"
        extra = ["--drop-embeddings"] if "ti-tokens" in stem and target != "kohya" else []
        res = lorareg("convert", path, "--to", target, "-o", out, *extra)
        assert res.code == 0, res.err
        assert loralib.load(out).architecture == arch
    original = loralib.load(path)
    again = loralib.load(tmp_path / "kohya.safetensors")
    for key, module in original.modules.items():
        assert torch.equal(module.down, again.modules[key].down) and module.scale == again.modules[key].scale


def test_cloneofsimo_text_encoder_and_unet_modules_are_named(real_loras):
    adapter = loralib.load(real_loras / "sd15_cloneofsimo_r4_f16.safetensors")
    assert adapter.components == ["unet", "text_encoder"]
    assert "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj" in adapter.modules
    assert "text_encoder.text_model.encoder.layers.11.self_attn.out_proj" in adapter.modules


def test_textual_inversion_tokens_are_reported(real_loras, lorareg):
    res = lorareg("inspect", real_loras / "sd15_cloneofsimo_r1_f32_with-ti-tokens.safetensors", "--json")
    assert json.loads(res.out)["embeddings"] == ["<s1>", "<s2>"]
    res = lorareg("inspect", real_loras / "sd15_cloneofsimo_r1_f32_with-ti-tokens.safetensors")
    assert "<s1>, <s2>" in res.out


def test_lycoris_lokr_is_read_kept_as_lokr_and_refused_where_a_format_cannot_hold_it(real_loras, lorareg, tmp_path):
    path = real_loras / "sd1_lycoris-lokr_f16.safetensors"
    res = lorareg("inspect", path, "--json")
    assert res.code == 0
    report = json.loads(res.out)
    assert report["format"] == "lycoris-lokr" and report["format_title"] == "LyCORIS LoKr"
    assert report["architecture"] == "sd1" and report["modules"] == 350 and report["kinds"] == {"lokr": 350}
    assert sum(k.startswith(("ss_", "sshs_")) for k in report["metadata"]) == 61
    res = lorareg("convert", path, "-o", tmp_path / "x.safetensors")
    assert res.code == 0 and loralib.load(tmp_path / "x.safetensors").kinds == {"lokr": 350}
    res = lorareg("convert", path, "--to", "peft", "-o", tmp_path / "x_peft")
    assert res.code == 1 and res.err.startswith("error: ") and "cannot hold the adapter's 350 LoKr" in res.err
    assert "Traceback" not in res.err and not (tmp_path / "x_peft").exists()


def test_flux_is_detected_from_keys_not_metadata(real_loras, lorareg, tmp_path):
    path = real_loras / "flux_aitoolkit-peft-names_f16.safetensors"
    report = json.loads(lorareg("inspect", path, "--json").out)
    assert report["architecture"] == "flux" and report["metadata_claims"] == "sd_1.5"
    assert (report["format"], report["modules"], report["components"]) == ("diffusers", 4, {"transformer": 4})
    assert any("claims sd_1.5" in n for n in report["notes"])
    res = lorareg("convert", path, "-o", tmp_path / "x.safetensors")
    assert res.code == 0, res.err
    written = loralib.load(tmp_path / "x.safetensors")
    assert written.architecture == "flux" and written.metadata["ss_base_model_version"] == "flux1"


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers", "peft"])
def test_the_real_flux_lora_converts_to_every_spelling_and_back_bit_for_bit(real_loras, tmp_path, fmt):
    from safetensors.torch import load_file

    source = real_loras / "flux_aitoolkit-peft-names_f16.safetensors"
    there = tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors")
    loralib.convert(source, there, fmt)
    assert loralib.load(there).architecture == "flux"
    loralib.convert(there, tmp_path / "back.safetensors", "diffusers")
    original, back = load_file(source), load_file(tmp_path / "back.safetensors")
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)


@pytest.mark.parametrize("stem, error, message", [
    ("BAD_sd15_malformed-kohya-double-prefix", CorruptFileError, "LoRA-like keys in no known spelling.*lora_unet_unet_"),
    ("BAD_sdxl_diffusers-attnprocs_truncated-data", CorruptFileError, "is truncated"),
    ("NOT-LORA_textual-inversion", NotALoraError, "not a LoRA adapter: it is a textual-inversion embedding"),
])
def test_unloadable_files_raise_clear_errors(real_loras, stem, error, message):
    with pytest.raises(error, match=message):
        loralib.load(real_loras / f"{stem}.safetensors")


@pytest.mark.parametrize("stem", ["BAD_sd15_malformed-kohya-double-prefix", "NOT-LORA_textual-inversion",
                                  "BAD_sdxl_diffusers-attnprocs_truncated-data"])
def test_bad_files_give_one_error_line_on_the_command_line(real_loras, lorareg, tmp_path, stem):
    res = lorareg("convert", real_loras / f"{stem}.safetensors", "-o", tmp_path / "out.safetensors")
    assert res.code == 1
    assert res.err.count("\n") == 1 and res.err.startswith("error: ") and "Traceback" not in res.err
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_described_and_flagged(real_loras, lorareg):
    res = lorareg("inspect", real_loras / "BAD_sdxl_diffusers-attnprocs_truncated-data.safetensors", "--json")
    assert res.code == 1
    report = json.loads(res.out)
    assert report["damaged"] and report["architecture"] == "sdxl" and report["modules"] == 560
    assert "truncated" in report["problems"][0]
