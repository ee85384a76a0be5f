"""What a new user trips over, one test each: tags that look like options, output paths, pickles, renames,
unknown filter values, checks before torch, threads, JSON errors, stray output, completion, model cards."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import loralib
from loralib.synthetic import random_adapter
from tests.conftest import ROOT
from tests.helpers.small_loras import sd1_attention_layers, small_lora_bytes


def _one_line_error(result) -> str:
    assert result.code != 0, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


@pytest.fixture
def lora(tmp_path) -> Path:
    path = tmp_path / "style.safetensors"
    loralib.save(random_adapter(sd1_attention_layers(2), rank=4, seed=1, architecture="sd1"), path)
    return path


def test_tags_starting_with_a_dash_are_removed_not_read_as_options(lorareg, tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(small_lora_bytes(1))
    assert lorareg("add", path, "--tag", "photo", "--tag", "h").code == 0
    res = lorareg("tag", "t", "-photo", "-h", "+hdr")
    assert res.code == 0 and "Usage" not in res.out + res.err
    assert json.loads(lorareg("tag", "t", "--json").out) == {"name": "t", "tags": ["hdr"]}
    assert "Usage" in lorareg("tag", "--help").out


def test_a_trailing_slash_is_a_folder_and_missing_folders_are_created(lorareg, lora, tmp_path):
    res = lorareg("convert", lora, "-o", f"{tmp_path / 'new' / 'dir'}/")
    assert res.code == 0, res.err
    assert (tmp_path / "new" / "dir" / "style_kohya.safetensors").is_file()
    assert f"created folder {tmp_path / 'new' / 'dir'}" in res.err
    res = lorareg("convert", lora, "--to", "diffusers", "-o", f"{tmp_path / 'd'}/")
    assert res.code == 0 and (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()
    res = lorareg("resize", lora, "--rank", "2", "-o", f"{tmp_path / 'small'}/")
    assert res.code == 0 and (tmp_path / "small" / "style_r2.safetensors").is_file()
    res = lorareg("merge", f"{lora}:0.5", "-o", tmp_path / "a" / "b" / "half.safetensors")
    assert res.code == 0 and (tmp_path / "a" / "b" / "half.safetensors").is_file()
    assert f"created folder {tmp_path / 'a' / 'b'}" in res.err
    res = lorareg("convert", lora, "--to", "peft", "-o", f"{tmp_path / 'x' / 'p'}/")
    assert res.code == 0 and (tmp_path / "x" / "p" / "adapter_model.safetensors").is_file()
    # the same file again: refused before any work, with the path it would have written
    line = _one_line_error(lorareg("convert", lora, "-o", f"{tmp_path / 'new' / 'dir'}/"))
    assert "style_kohya.safetensors already exists" in line


def test_pickles_are_named_and_inspect_suggests_only_real_options(lorareg, tmp_path):
    import torch

    checkpoint = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, checkpoint)
    line = _one_line_error(lorareg("inspect", checkpoint))
    assert "inspect never unpickles" in line and "`lorareg convert FILE --allow-pickle`" in line
    assert "pass --allow-pickle" not in line
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(checkpoint.read_bytes())
    assert "is a PyTorch pickle file (a zip archive" in _one_line_error(lorareg("inspect", renamed))
    old = tmp_path / "old.safetensors"
    old.write_bytes(pickle.dumps({"w": [0.0] * 4}, protocol=2))
    line = _one_line_error(lorareg("inspect", old))
    assert "is a PyTorch pickle file (a pickle, protocol 2)" in line and "GiB header" not in line


@pytest.mark.parametrize("header_bytes", [0x280, 0x380, 0x480, 0x580])
@pytest.mark.parametrize("rank", [2, 4096], ids=["small file", "file read in parts"])
def test_safetensors_headers_whose_length_looks_like_a_pickle_are_read(tmp_path, header_bytes, rank):
    """A header of 640 bytes starts with b"\\x80\\x02", a protocol-2 pickle's first bytes: the JSON decides,
    whether the file is small enough to be read at once or not."""
    from loralib.files.header import READ_AT_ONCE, read_header

    names = {"a.lora_down.weight": [rank, 8], "a.lora_up.weight": [8, rank]}
    size = rank * 8 * 4
    meta = {n: {"dtype": "F32", "shape": s, "data_offsets": [i * size, i * size + size]}
            for i, (n, s) in enumerate(names.items())}
    text = json.dumps(meta)
    meta["__metadata__"] = {"pad": "x" * (header_bytes - len(text) - len(', "__metadata__": {"pad": ""}'))}
    raw = json.dumps(meta).encode()
    assert len(raw) == header_bytes
    path = tmp_path / "a.safetensors"
    path.write_bytes(header_bytes.to_bytes(8, "little") + raw + bytes(2 * size))
    assert (path.stat().st_size > READ_AT_ONCE) == (rank > 2)
    assert set(read_header(path).tensors) == set(names)


def test_add_with_a_name_does_not_silently_rename(lorareg, lora):
    assert lorareg("add", lora, "--name", "first").code == 0
    line = _one_line_error(lorareg("add", lora, "--name", "second"))
    assert "already in the catalog as 'first'" in line and "--rename" in line
    assert [e["name"] for e in json.loads(lorareg("list", "--json").out)] == ["first"]
    res = lorareg("add", lora, "--name", "second", "--rename")
    assert res.code == 0 and "renamed first to second" in res.out
    assert [e["name"] for e in json.loads(lorareg("list", "--json").out)] == ["second"]
    assert lorareg("add", lora, "--name", "second").code == 0  # its own name: nothing to refuse


def test_unknown_architectures_and_formats_are_refused_with_a_suggestion(lorareg, lora):
    lorareg("add", lora)
    assert "Did you mean sd1?" in _one_line_error(lorareg("list", "--arch", "sd15"))
    assert "Did you mean kohya?" in _one_line_error(lorareg("search", "style", "--format", "koyha"))
    assert len(json.loads(lorareg("list", "--arch", "SD1", "--format", "Kohya", "--json").out)) == 1
    assert json.loads(lorareg("list", "--format", "lycoris-lokr", "--json").out) == []


CHECKS_FIRST = """
import json, sys
from lorareg.cli.main import main
results = []
for args in json.loads(sys.argv[1]):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    results.append([code, "torch" in sys.modules])
print("RESULTS", json.dumps(results))
"""


def test_commands_that_use_torch_check_their_arguments_before_importing_it(lora, tmp_path):
    tiny_sd1 = tmp_path / "model"  # a diffusers folder as far as the checks before torch can tell
    tiny_sd1.mkdir()
    (tiny_sd1 / "model_index.json").write_text("{}")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    invocations = [
        ["resize", str(lora), "-o", str(tmp_path / "r.safetensors")],                        # no --rank
        ["resize", str(lora), "--rank", "2", "-o", str(existing)],                            # output exists
        ["merge", f"{lora}:0.5", "-o", str(existing)],
        ["convert", str(lora), "-o", str(existing)],
        ["extract", str(tmp_path / "missing"), str(tmp_path / "also-missing"), "--rank", "4", "-o", "x.safetensors"],
        ["bake", str(tmp_path / "missing"), str(lora), "-o", str(tmp_path / "baked")],
        ["generate", "a cat", "--base", "someone/not-cached", "-o", str(tmp_path / "images")],  # offline Hub id
        ["generate", "a cat", "--base", str(tmp_path / "no-model"), "-o", str(tmp_path / "images")],
        ["train", "--data", str(tmp_path / "no-data"), "--base", str(tiny_sd1), "-o", str(tmp_path / "run")],
        ["train", "--data", str(data), "--base", "someone/not-cached", "-o", str(tmp_path / "run")],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECKS_FIRST, json.dumps(invocations)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    results = json.loads(done.stdout.split("RESULTS", 1)[1])
    assert [code for code, _ in results] == [1] * len(invocations), (results, done.stderr)
    assert [imported for _, imported in results] == [False] * len(invocations), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "images").exists() and not (tmp_path / "run").exists()
    assert "needs a target rank or a dynamic rule" in done.stderr
    assert "HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache" in done.stderr


def test_thread_count_follows_lorareg_threads_then_the_load(lorareg, lora, tmp_path, monkeypatch):
    import torch

    from lorareg.cli.threads import default_threads

    assert default_threads(2, 0.1) == 2 and default_threads(2, 2.6) == 1 and default_threads(8, 3.2) == 5
    assert default_threads(16, 0.0, work_bytes=5 * 2**20) == 1  # a tiny model: one thread
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LORAREG_THREADS", "2")
        assert lorareg("convert", lora, "-o", tmp_path / "a.safetensors").code == 0
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("LORAREG_THREADS", "many")
        assert "LORAREG_THREADS='many'" in _one_line_error(lorareg("convert", lora, "-o", tmp_path / "b.safetensors"))
    finally:
        torch.set_num_threads(before)


def test_busy_cores_are_measured_over_the_start_up_less_this_process_own_work():
    from lorareg.cli.threads import CpuCounters, busy_elsewhere, read_counters

    # 2 cores over 1 s: 1.5 core-seconds busy, 1.0 of them this process's own -> others kept 0.5 busy
    before, after = CpuCounters(10.0, 100.0, 2, 3.0, 50.0), CpuCounters(11.5, 102.0, 2, 4.0, 51.0)
    assert busy_elsewhere(before, after) == pytest.approx(0.5)
    assert busy_elsewhere(before, CpuCounters(10.2, 100.2, 2, 3.0, 50.1)) is None  # too short to tell
    stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n"
    counters = read_counters(stat)
    hertz = os.sysconf("SC_CLK_TCK")
    assert (counters.busy, counters.total, counters.cores) == (150 / hertz, 1000 / hertz, 2)
    assert read_counters("garbage") is None and read_counters("cpu x y\n") is None

    # a real busy process beside this one: the kernel's counters see at least half a core of it
    start = read_counters()
    if start is None:  # no /proc/stat (not Linux): the load average is used, tested above
        return
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass"])
    spinner.wait()
    busy = busy_elsewhere(start, read_counters())
    assert busy is not None and busy >= 0.5


def test_the_readme_and_the_demo_say_how_to_run_lorareg_afterwards():
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/lorareg" in readme and "source .venv/bin/activate" in readme
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    hint = next(line for line in demo.splitlines() if "show pxl-mix-r4" in line)
    assert "$(pwd)/.venv/bin/lorareg show" in hint and "LORAREG_HOME=" in hint


def test_json_errors_are_json_on_stdout(lorareg):
    res = lorareg("show", "nothing-like-this", "--json")
    assert res.code == 1 and json.loads(res.out)["error"].startswith("no adapter named 'nothing-like-this'")
    res = lorareg("list", "--limit", "-3", "--json")
    assert res.code == 2 and "-3" in json.loads(res.out)["error"]
    res = lorareg("list", "--arch", "sd15", "--json")
    assert res.code == 1 and "Did you mean sd1?" in json.loads(res.out)["error"]


def test_composition_commands_print_no_stray_blank_lines(lorareg, lora, tmp_path, tiny_sd1):
    from loralib.base_model import layer_shape, pipeline_layers
    from loralib.layers import select_layers
    from tests.helpers.diffusers_oracle import pipeline_class

    pipe = pipeline_class("sd1").from_pretrained(tiny_sd1)
    layers = select_layers({k: layer_shape(m) for k, m in pipeline_layers(pipe).items()}, feed_forward=False)
    tiny = loralib.save(random_adapter(layers, 2, seed=1, architecture="sd1"), tmp_path / "tiny.safetensors").path
    for args in (("resize", lora, "--rank", "2", "-o", tmp_path / "r.safetensors"),
                 ("merge", f"{lora}:0.5", f"{lora}:0.5", "-o", tmp_path / "m.safetensors"),
                 ("bake", tiny_sd1, f"{tiny}:0.5", "-o", tmp_path / "baked")):
        res = lorareg(*args)
        assert res.code == 0, res.err
        assert "" not in res.err.splitlines(), (args, res.err)  # no blank line, nor a stray one first


def test_training_progress_completes_and_messages_do_not_run_into_it(monkeypatch):
    import io

    from rich.console import Console

    import lorareg.cli.output as output
    from lorareg.cli.train import TrainingDisplay

    screen = io.StringIO()
    monkeypatch.setattr(output, "console", lambda stderr=False: Console(file=screen, force_terminal=True, width=100))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with TrainingDisplay(enabled=True) as display:
        display.wait("loading torch, diffusers and peft")
        display.phase("caching captions", 9, 9)  # done at once (one batch): never drawn as 0/9
        display.message("training pxl-style: 4 steps")
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "0/9" not in text and "caching captions" not in text
    assert "training pxl-style: 4 steps" in re.split(r"[\r\n]", text)  # a line of its own


TORCH_MARKER = """
import sys
class Marker:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("TORCH-IMPORTED", file=sys.stderr, flush=True)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Marker())
from lorareg.cli.main import main
main(sys.argv[1:])
"""


def test_train_shows_what_it_does_before_the_slow_imports(tiny_sd1, tmp_path):
    from tests.helpers.training import small_dataset

    data = small_dataset(tmp_path / "data", 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", TORCH_MARKER, "train", "--base", str(tiny_sd1), "--data", str(data),
                           "-o", str(tmp_path / "out"), "--mixed-precision", "fp16", "--no-tensorboard"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.splitlines()
    marker = lines.index("TORCH-IMPORTED")
    assert lines[:marker] == ["checking images…", "loading torch, diffusers and peft…"], lines
    assert "fp16 mixed precision needs a CUDA GPU" in lines[-1]


def test_model_cards_do_not_name_a_hub_base_for_a_local_one():
    from lorareg.registry.model_card import CardInputs, front_matter, model_card
    from lorareg.registry.records import Entry

    inputs = CardInputs(repo_id="alice/x", weight_name="x.safetensors", hashes={})
    local = Entry(id=1, name="x", tensor_sha256="0" * 64, architecture="sd1",
                  metadata={"ss_sd_model_name": "/home/alice/models/base"})
    assert "base_model" not in front_matter(local, inputs)
    assert "trained on a local base model, `base`" in model_card(local, inputs)
    hub = Entry(id=2, name="y", tensor_sha256="0" * 64, architecture="sd1", metadata={"ss_sd_model_name": "org/model"})
    assert front_matter(hub, inputs)["base_model"] == "org/model"
    unknown = Entry(id=3, name="z", tensor_sha256="0" * 64, architecture="sdxl")
    assert front_matter(unknown, inputs)["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"


def test_catalog_names_complete_in_the_shell(lorareg, tmp_path):
    for name, seed in (("pixel-art", 1), ("pixel_100%", 2), ("other", 3)):
        path = tmp_path / f"{seed}.safetensors"
        path.write_bytes(small_lora_bytes(seed))
        assert lorareg("add", path, "--name", name).code == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_LORAREG_COMPLETE": "bash_complete", "COMP_CWORD": "2"}

    def complete(line: str) -> list[str]:
        done = subprocess.run([sys.executable, "-m", "lorareg"], cwd=ROOT, env={**env, "COMP_WORDS": line},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("lorareg show PIX") == ["plain,pixel-art", "plain,pixel_100%"]
    assert complete("lorareg show pixel_1") == ["plain,pixel_100%"]  # _ and % are not wildcards
    assert complete("lorareg tag o") == ["plain,other"]
    assert complete("lorareg resize pix") == ["file,pix", "plain,pixel-art", "plain,pixel_100%"]
    script = subprocess.run([sys.executable, "-m", "lorareg"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "_LORAREG_COMPLETE": "bash_source"})
    assert "complete -o nosort -F" in script.stdout and "_LORAREG_COMPLETE=bash_complete" in script.stdout
