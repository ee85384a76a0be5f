"""The command line: fast help without torch, inspect/convert behaviour, errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import loralib
from loralib.base_model import layer_shape, pipeline_layers
from loralib.tiny_models import build_tiny_pipeline
from lorareg.cli.main import COMMANDS
from tests.conftest import ROOT
from tests.helpers.adapters import assert_same_factors, varied_adapter

HELP_PROBE = """
import resource, sys
from lorareg.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "diffusers", "peft", "transformers") if m in sys.modules)
usage = resource.getrusage(resource.RUSAGE_SELF)
print("\\nPROBE", code, round(usage.ru_utime + usage.ru_stime, 3), ",".join(heavy) or "-", file=sys.stderr)
"""


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_help_is_instant_and_imports_no_torch(command):
    """`lorareg [COMMAND] --help` in a fresh interpreter: no torch, under 0.5 s of CPU in all
    (CPU time rather than wall time, so that a busy test machine does not make it flaky)."""
    args = [command] if command else []
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *args, "--help"], cwd=ROOT, capture_output=True, text=True)
    _, code, cpu_seconds, heavy = proc.stderr.strip().splitlines()[-1].split()
    assert code == "0" and "Usage: lorareg" in proc.stdout
    assert heavy == "-", f"lorareg {command or ''} --help imported {heavy}"
    assert float(cpu_seconds) < 0.5, f"lorareg {command or ''} --help took {cpu_seconds}s of CPU"


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    layers = {k: layer_shape(m) for k, m in pipeline_layers(build_tiny_pipeline("sd1")).items()}
    adapter = varied_adapter(layers, architecture="sd1")
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    loralib.save(adapter, path)
    return path


def test_inspect_json(kohya_file, lorareg):
    res = lorareg("inspect", kohya_file, "--json")
    assert res.code == 0
    report = json.loads(res.out)
    adapter = loralib.load(kohya_file)
    conv = sum(m.is_conv for m in adapter.modules.values())
    assert report["format"] == "kohya" and report["architecture"] == "sd1"
    assert report["components"] == {"unet": 83, "text_encoder": 12}
    assert report["ranks"] == {"2": conv, "4": 95 - conv} and report["conv_modules"] == conv > 0
    assert report["metadata"]["sshs_model_hash"] == report["hashes"]["tensor_sha256"]


def test_inspect_human(kohya_file, lorareg):
    res = lorareg("inspect", kohya_file)
    assert res.code == 0
    for text in ("kohya-ss LoRA", "Stable Diffusion 1.x", "(unet 83, text_encoder 12)", "A1111 hash", "AutoV2"):
        assert text in res.out, res.out


def test_convert_every_direction_from_the_command_line(kohya_file, lorareg, tmp_path):
    res = lorareg("convert", kohya_file, "--to", "peft", "-o", tmp_path / "peft", "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["format"] == "peft" and len(result["files"]) == 4  # unet + text_encoder, weights + config
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert lorareg("convert", tmp_path / "peft", "--to", "diffusers", "-o", tmp_path / "d.safetensors").code == 0
    assert lorareg("convert", tmp_path / "d.safetensors", "-o", tmp_path / "k.safetensors").code == 0
    assert_same_factors(loralib.load(kohya_file), loralib.load(tmp_path / "k.safetensors"))


def test_convert_to_diffusers_folder_and_default_names(kohya_file, lorareg, tmp_path):
    (tmp_path / "out").mkdir()
    assert lorareg("convert", kohya_file, "--to", "diffusers", "-o", tmp_path / "out").code == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    source = tmp_path / "mine.safetensors"
    source.write_bytes(kohya_file.read_bytes())
    assert lorareg("convert", source, "--to", "peft").code == 0
    assert (tmp_path / "mine_peft" / "adapter_model.safetensors").is_file()


def test_dtype_option(kohya_file, lorareg, tmp_path):
    assert lorareg("convert", kohya_file, "--dtype", "bf16", "-o", tmp_path / "b.safetensors").code == 0
    assert loralib.load(tmp_path / "b.safetensors").dtype == torch.bfloat16


def test_existing_output_needs_force_and_stays_untouched(kohya_file, lorareg, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    res = lorareg("convert", kohya_file, "-o", out)
    assert res.code == 1 and "already exists" in res.err and "--force" in res.err
    assert out.read_bytes() == b"keep me"
    assert lorareg("convert", kohya_file, "-o", out, "--force").code == 0
    assert loralib.load(out).architecture == "sd1"


def test_input_is_never_modified(kohya_file, lorareg, tmp_path):
    before = kohya_file.read_bytes()
    lorareg("convert", kohya_file, "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert kohya_file.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00" * 7, "only 7 bytes"),
    (bytes(range(256)) * 8, "not a valid safetensors file"),
    (b"\xff" * 8 + b"{}", "declares a"),
])
def test_broken_inputs_are_one_line(content, message, lorareg, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    for args in (("inspect", bad), ("convert", bad, "-o", tmp_path / "out.safetensors")):
        res = lorareg(*args)
        assert res.code == 1 and res.out == ""
        assert res.err.startswith("error: ") and res.err.count("\n") == 1 and message in res.err
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_input(lorareg, tmp_path):
    res = lorareg("inspect", tmp_path / "nope.safetensors")
    assert res.code == 1 and "nope.safetensors is not a file" in res.err


def test_non_lora_safetensors(lorareg, tmp_path):
    from safetensors.torch import save_file

    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4)}, tmp_path / "m.safetensors")
    res = lorareg("inspect", tmp_path / "m.safetensors")
    assert res.code == 1 and "not a LoRA adapter" in res.err


def test_pickle_files_need_an_explicit_opt_in(kohya_file, lorareg, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(kohya_file)
    torch.save(tensors, tmp_path / "lora.pt")
    res = lorareg("convert", tmp_path / "lora.pt", "-o", tmp_path / "out.safetensors")
    assert res.code == 1 and "pickle" in res.err and "--allow-pickle" in res.err
    assert not (tmp_path / "out.safetensors").exists()
    res = lorareg("convert", tmp_path / "lora.pt", "-o", tmp_path / "out.safetensors", "--allow-pickle")
    assert res.code == 0, res.err
    assert_same_factors(loralib.load(kohya_file), loralib.load(tmp_path / "out.safetensors"))


def test_unknown_format_is_a_usage_error(kohya_file, lorareg):
    res = lorareg("convert", kohya_file, "--to", "ckpt")
    assert res.code == 2 and "Invalid value for '--to'" in res.err
