"""Issue 9: no command loses a user's file, crashes, or hangs, whatever the input.

Data loss (pull into a folder, rm --delete-file, an input given as its own output, stale
temporaries), hangs (catastrophic PEFT patterns, special files, absurd training configs, a
trickling Hub, a huge header), crashes turned into one line (catalog errors, warnings, terminal
escapes) and what is refused or flagged (non-finite factors, push samples, files the operations
refuse). The corpus of broken files is in tests/test_broken_inputs.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loralib
from loralib.errors import CorruptFileError, InvalidArgumentError, OutputExistsError
from lorareg.registry.catalog import Catalog
from tests.conftest import ROOT
from tests.helpers.broken_inputs import (
    Tensor,
    f32,
    good_kohya,
    good_peft_config,
    kohya_tensors,
    peft_folder,
    safetensors_bytes,
    time_limit,
)
from tests.helpers.hub_server import HubServer
from tests.helpers.small_loras import small_lora_bytes

TOKEN = "hf_alice_reliability_token"


def one_line_error(result, *fragments: str) -> str:
    assert result.code != 0, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def hub(monkeypatch) -> Iterator[HubServer]:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(tokens={TOKEN: "alice"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server
        assert server.server_errors == []


# -- pull never replaces or deletes a file it did not create ------------------------------------ #

@pytest.fixture
def published(hub) -> bytes:
    data = small_lora_bytes(21)
    hub.create_repo("alice/style")
    hub.add_commit("alice/style", {"style.safetensors": data})
    return data


def test_pull_into_a_folder_reuses_an_identical_file_untouched(lorareg, published, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    mine = folder / "style.safetensors"
    mine.write_bytes(published)
    before = os.stat(mine)
    res = lorareg("pull", "alice/style", "--dir", folder, "--json")
    assert res.code == 0, res.err
    after = os.stat(mine)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not even rewritten
    assert sorted(p.name for p in folder.iterdir()) == ["style.safetensors"]


def test_pull_refuses_to_replace_a_different_file_and_force_replaces_it_only_when_verified(
        lorareg, hub, published, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    mine = folder / "style.safetensors"
    own = small_lora_bytes(99)
    mine.write_bytes(own)
    one_line_error(lorareg("pull", "alice/style", "--dir", folder), "already exists", "--force")
    assert mine.read_bytes() == own
    hub.corrupt_file("alice/style", "style.safetensors")  # the download is bad: the user's file must survive
    one_line_error(lorareg("pull", "alice/style", "--dir", folder, "--force"), "is corrupt", "no file of yours")
    assert mine.read_bytes() == own
    assert sorted(p.name for p in folder.iterdir()) == ["style.safetensors"]  # nothing left behind
    hub.clear_corruption()
    res = lorareg("pull", "alice/style", "--dir", folder, "--force", "--json")
    assert res.code == 0, res.err
    assert mine.read_bytes() == published
    assert sorted(p.name for p in folder.iterdir()) == ["style.safetensors"]


def test_pull_into_a_full_folder_keeps_the_old_file(lorareg, hub, published, tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    mine = folder / "style.safetensors"
    own = small_lora_bytes(98)
    mine.write_bytes(own)
    import errno

    import lorareg.registry.hub as hub_module

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub_module, "_download", disk_full)
    one_line_error(lorareg("pull", "alice/style", "--dir", folder, "--force"), "No space left on device")
    assert mine.read_bytes() == own
    assert sorted(p.name for p in folder.iterdir()) == ["style.safetensors"]


def test_a_stalled_download_is_abandoned_quickly_with_nothing_left(lorareg, hub, published, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAREG_STALL_SECONDS", "1")
    hub.trickle_file("alice/style", "style.safetensors", interval=0.2)
    folder = tmp_path / "loras"
    started = time.monotonic()
    with time_limit(60):
        line = one_line_error(lorareg("pull", "alice/style", "--dir", folder), "stalled")
    assert time.monotonic() - started < 30, line
    assert [p for p in folder.rglob("*")] == []
    started = time.monotonic()
    with time_limit(60):
        one_line_error(lorareg("pull", "alice/style"), "stalled")  # into the Hugging Face cache
    assert time.monotonic() - started < 30
    cache = Path(os.environ["HF_HOME"]) / "hub"
    assert [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".incomplete"] == []
    assert not [p for p in cache.rglob("blobs/*") if p.is_file()]


# -- rm --delete-file deletes only what the catalog recorded ----------------------------------- #

def test_rm_delete_file_keeps_a_file_whose_content_changed(lorareg, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(small_lora_bytes(1))
    assert lorareg("add", path, "--name", "a").code == 0
    other = small_lora_bytes(2)
    path.write_bytes(other)  # another adapter now lives at this path
    res = lorareg("rm", "a", "--delete-file", "--yes", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out) == [{"name": "a", "deleted": [], "kept": [str(path)]}]
    assert path.read_bytes() == other
    path2 = tmp_path / "b.safetensors"
    path2.write_bytes(small_lora_bytes(3))
    assert lorareg("add", path2, "--name", "b").code == 0
    res = lorareg("rm", "b", "--delete-file", "--yes")
    assert res.code == 0 and not path2.exists()


# -- an input is never its own output ------------------------------------------------------------ #

@pytest.fixture
def adapter_file(tmp_path) -> Path:
    path = tmp_path / "a.safetensors"
    path.write_bytes(good_kohya(1))
    return path


def _spellings(path: Path) -> list[Path]:
    link = path.parent / "link.safetensors"
    link.symlink_to(path.name)
    hard = path.parent / "hard.safetensors"
    os.link(path, hard)
    sub = path.parent / "sub"
    sub.mkdir()
    return [path, Path(os.path.relpath(path)), link, hard, sub / ".." / path.name, Path(str(path.parent) + "//" + path.name)]


@pytest.mark.parametrize("command", ["resize", "merge", "convert"])
def test_an_input_is_never_its_own_output_under_any_spelling(command, adapter_file, lorareg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = adapter_file.read_bytes()
    for output in _spellings(adapter_file):
        args = {"resize": ["resize", adapter_file, "--rank", "1"],
                "merge": ["merge", f"{adapter_file}:0.5", f"{adapter_file}:0.5"],
                "convert": ["convert", adapter_file]}[command]
        one_line_error(lorareg(*args, "-o", output, "--force"), "is also an input")
        assert adapter_file.read_bytes() == before


def test_a_peft_folder_is_never_converted_onto_itself(lorareg, tmp_path):
    folder = peft_folder(tmp_path / "peft", good_peft_config())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    one_line_error(lorareg("convert", folder, "--to", "peft", "-o", folder, "--force"), "is also an input")
    one_line_error(lorareg("convert", folder / "adapter_model.safetensors", "--to", "peft", "-o", folder, "--force"),
                   "is also an input")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_library_save_refuses_the_source_as_output(adapter_file):
    adapter = loralib.load(adapter_file)
    with pytest.raises(OutputExistsError, match="is also an input"):
        loralib.save(adapter, adapter_file.parent / "." / adapter_file.name, force=True)


def test_bake_refuses_its_inputs_as_its_output(adapter_file, tiny_sd1, tmp_path):
    from loralib.compose import bake
    from tests.helpers.compose_cases import single_file_checkpoint

    base = single_file_checkpoint(tiny_sd1, tmp_path / "base.safetensors")
    link = tmp_path / "base-link.safetensors"
    link.symlink_to(base)
    before = base.read_bytes()
    for output in (adapter_file, link):
        with pytest.raises(OutputExistsError, match="is also an input"):
            bake(base, [adapter_file], output, force=True)
    assert adapter_file.read_bytes() == good_kohya(1) and base.read_bytes() == before


# -- temporaries: owned, swept, short enough ----------------------------------------------------- #

def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path, adapter_file, lorareg):
    from loralib.files.atomic import leftovers, sweep_stale

    out = tmp_path / "out"
    out.mkdir()
    script = ("import sys, time; from loralib.files.atomic import atomic_file\n"
              "with atomic_file(sys.argv[1]) as tmp:\n"
              "    tmp.write_bytes(b'x' * 1000000); print(tmp, flush=True); time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(out / "result.safetensors")], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    partial = Path(process.stdout.readline().strip())
    assert partial.exists()
    assert leftovers(out) == []  # its writer is alive: not a leftover, never removed
    assert sweep_stale(out) == [] and partial.exists()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert leftovers(out) == [partial]
    legacy = out / ".old.safetensors.abcd1234.partial"  # an earlier version's: reported, never removed
    legacy.write_bytes(b"x")
    unrelated = out / ".notes.partial"
    unrelated.write_bytes(b"mine")
    assert lorareg("add", adapter_file, "--name", "a").code == 0
    res = lorareg("convert", adapter_file, "-o", out / "c.safetensors")
    assert res.code == 0, res.err
    assert not partial.exists() and legacy.exists() and unrelated.read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(["c.safetensors", legacy.name, unrelated.name])
    assert lorareg("add", out / "c.safetensors").code == 0
    report = json.loads(lorareg("verify", "--json").out)
    assert report["leftovers"] == [str(legacy)]


def test_temporary_names_carry_the_owner_and_fit_the_file_system(tmp_path):
    from loralib.files.atomic import atomic_file, temp_name

    name = temp_name("x" * 300)
    assert len(os.fsencode(name)) <= 255 and f"-{os.getpid()}-" in name and name.startswith(".")
    foreign = tmp_path / temp_name("a.safetensors").replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    foreign.write_bytes(b"stale")
    with atomic_file(tmp_path / "b.safetensors") as tmp:
        tmp.write_bytes(b"new")
    assert not foreign.exists() and (tmp_path / "b.safetensors").read_bytes() == b"new"


@pytest.mark.parametrize("length", [238, 245, 255])
def test_outputs_with_names_up_to_the_file_system_limit(length, adapter_file, lorareg, tmp_path):
    name = "o" * (length - len(".safetensors")) + ".safetensors"
    res = lorareg("convert", adapter_file, "-o", tmp_path / name)
    assert res.code == 0, res.err
    assert loralib.load(tmp_path / name).modules
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- hangs ------------------------------------------------------------------------------------------ #

def test_catastrophic_patterns_end_within_seconds_as_one_line(lorareg, tmp_path):
    from tests.helpers.broken_inputs import CASES

    crafted = next(c for c in CASES if c.name == "peft_crafted_names_and_pattern")
    folder = crafted.build(tmp_path)
    for args in (("inspect", folder), ("convert", folder, "-o", tmp_path / "o.safetensors"), ("add", folder)):
        started = time.monotonic()
        with time_limit(60):
            one_line_error(lorareg(*args), "takes too long")
        assert time.monotonic() - started < 20


def test_honest_patterns_match_as_peft_matches_them():
    """Oracle: peft's own get_pattern_key, on real module names and the pattern shapes people write."""
    from peft.utils.other import get_pattern_key

    from loralib.formats.peft_config import PatternTable

    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
             "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
             "mid_block.attentions.0.proj_in", "text_model.encoder.layers.11.self_attn.q_proj",
             "up_blocks.3.resnets.0.conv1"]
    patterns = {"to_q": 1, "attn2.to_k": 2, r".*\.ff\.net\.0\.proj": 3, r"^(?!.*up_blocks).*proj_in": 4,
                r"layers\.1[01]\.self_attn\.(q|k)_proj": 5, "transformer_blocks.0.attn1.to_q": 6, r"resnets\.\d+\.conv1": 7,
                r"(attn1|attn2)\.to_[qkv]": 8}
    table = PatternTable(patterns)
    for name in names:
        expected = get_pattern_key(list(patterns), name)
        found, value = table.lookup(name)
        assert patterns.get(expected) == (value if found else None), name


_CONFIG_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.floats(),
              st.text(max_size=12), st.just(10 ** 400), st.sampled_from(["to_q", "(a|a)*x", "([", ".*", "to_.", r"\1"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["to_q", "attn1.to_q", "to_k", ".*", "(", "a" * 40, r"(x+x+)+y", "ff.net.0.proj"]) | st.text(max_size=8),
        inner, max_size=3), max_leaves=10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora",
                                                "target_modules", "peft_type", "use_dora"]), _CONFIG_VALUES, max_size=4))
def test_fuzzed_peft_configs_are_read_or_refused_in_time(tmp_path, changes):
    """Any values in a PEFT config: the folder reads with finite alphas, or is refused with one
    LoraError line, within seconds (never a hang, never another exception)."""
    folder = tmp_path / "peft"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    try:
        text = json.dumps(good_peft_config(**changes))
    except ValueError:  # NaN is refused by json.dumps(allow_nan) only when asked; keep what it writes
        return
    peft_folder(folder, None, config_text=text)
    started = time.monotonic()
    with time_limit(30):
        try:
            adapter = loralib.load(folder)
        except loralib.errors.LoraError as exc:
            assert "\n" not in str(exc)
        else:
            assert all(math.isfinite(m.alpha) for m in adapter.modules.values())
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("config, message", [
    (good_peft_config(lora_alpha="eight"), "lora_alpha must be a number"),
    (good_peft_config(lora_alpha=None), "lora_alpha must be a number"),
    (good_peft_config(lora_alpha=[8]), "lora_alpha must be a number"),
    (good_peft_config(alpha_pattern=["to_q"]), "alpha_pattern must map"),
    (good_peft_config(rank_pattern="to_q"), "rank_pattern must map"),
    (good_peft_config(alpha_pattern={"to_q": "x"}), "must be a number"),
    (good_peft_config(alpha_pattern={"(": 1}), "not a valid regular expression"),
    (good_peft_config(alpha_pattern={"a" * 5000 + "(": 1}), "characters long"),
])
def test_wrong_types_in_peft_configs_are_named(config, message, tmp_path):
    folder = peft_folder(tmp_path / "peft", config)
    with pytest.raises(CorruptFileError, match=re.escape(message)):
        loralib.load(folder)


def test_a_lora_alpha_of_ten_to_the_400_is_refused(tmp_path):
    text = json.dumps(good_peft_config()).replace('"lora_alpha": 4', f'"lora_alpha": {10 ** 400}')
    folder = peft_folder(tmp_path / "peft", None, config_text=text)
    with pytest.raises(CorruptFileError, match="lora_alpha is a number too large"):
        loralib.inspect(folder)


@pytest.mark.parametrize("make", ["fifo", "socket"])
def test_special_files_are_refused_before_they_are_opened(make, tmp_path, lorareg):
    path = tmp_path / "x.safetensors"
    if make == "fifo":
        os.mkfifo(path)
    else:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    with time_limit(20):
        one_line_error(lorareg("inspect", path), "a socket" if make == "socket" else "a FIFO")
        one_line_error(lorareg("inspect", "/dev/zero"), "character device")


def test_a_fifo_config_in_a_peft_folder_is_refused(tmp_path):
    folder = peft_folder(tmp_path / "peft", good_peft_config())
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    with time_limit(20), pytest.raises(loralib.errors.LoraError):
        loralib.load(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("edit", [
    lambda h: h.replace('{"dtype": "F32"', '{"dtype": "F16", "dtype": "F32"', 1),  # a field twice
    lambda h: h.replace('{"dtype": "F32"', '{"\\u0064type": "F16", "dtype": "F32"', 1),  # ... spelled with an escape
    lambda h: h.replace('{"__metadata__"', '{"__metadata__": {}, "__metadata__"', 1),
    lambda h: h.replace('{"__metadata__"', '{"\\u005f_metadata__": {}, "__metadata__"', 1),
])
def test_a_key_written_twice_is_refused_however_it_is_spelled(edit, tmp_path):
    from loralib.files.header import read_header
    from tests.helpers.broken_inputs import with_header_edit

    path = tmp_path / "x.safetensors"
    path.write_bytes(with_header_edit(edit))
    with pytest.raises(CorruptFileError, match="twice"):
        read_header(path)


def _big_header_file(path: Path, tensors: int) -> Path:
    parts = ['{"__metadata__":{"ss_network_module":"networks.lora"}']
    offset = 0
    for i in range(tensors):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_{i}.lora_down.weight"
        parts.append(f',"{name}":{{"dtype":"F16","shape":[1,1],"data_offsets":[{offset},{offset + 2}]}}')
        offset += 2
    raw = ("".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def test_a_large_header_costs_about_one_json_parse(tmp_path):
    """A 10 MB header (66,000 tensors): inspecting it stays within a few JSON parses of the same text
    (the 99.6 MB maximum is measured by benchmarks/header_size.py)."""
    path = _big_header_file(tmp_path / "big.safetensors", 66_000)
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    text = path.read_bytes()[8:8 + size].decode()
    started = time.process_time()
    json.loads(text)
    parse = time.process_time() - started
    started = time.process_time()
    with pytest.raises(CorruptFileError):  # names no real module: refused after every tensor was read
        loralib.inspect(path, hashes=False)
    inspect = time.process_time() - started
    assert inspect < 10 * parse + 0.5, (inspect, parse)


# -- training configs with absurd values ----------------------------------------------------------- #

@pytest.mark.parametrize("key, value, message", [
    ("max_aspect_ratio", "inf", "max_aspect_ratio"),
    ("max_aspect_ratio", "1e9", "max_aspect_ratio"),
    ("learning_rate", "inf", "learning_rate"),
    ("learning_rate", "nan", "learning_rate"),
    ("noise_offset", "inf", "noise_offset"),
    ("resolution", "1048576", "resolution"),
])
def test_absurd_training_values_are_config_errors(key, value, message, lorareg, tmp_path):
    from tests.helpers.training import small_dataset

    data = small_dataset(tmp_path / "data", 2)
    with time_limit(60):
        line = one_line_error(lorareg("train", "--data", data, f"--{key.replace('_', '-')}", value, "--dry-run"))
    assert message in line


def test_absurd_repeat_folders_and_undecodable_metadata_are_dataset_errors(tmp_path):
    from PIL import Image

    from loralib.training.dataset import DatasetError, scan_dataset

    root = tmp_path / "kohya"
    for folder in ("99999999999_x", "5" * 200 + "_y"):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / folder / "a.png")
        (root / folder / "a.txt").write_text("a cat")
    with time_limit(30), pytest.raises(DatasetError, match="repeats; use 1 to 10000"):
        scan_dataset(root)
    meta = tmp_path / "meta"
    meta.mkdir()
    Image.new("RGB", (8, 8)).save(meta / "a.png")
    (meta / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        scan_dataset(meta)
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DatasetError, match="too many digits"):
        scan_dataset(meta)


def test_sigterm_during_training_saves_a_checkpoint(tiny_sd1, tmp_path, one_thread):
    """A real SIGTERM delivered to this process after step 1: the run stops after the step with a
    checkpoint, as on Ctrl-C (the Ctrl-C test in test_training_resume.py does it to a subprocess)."""
    from loralib.training import load_config, train
    from loralib.training.checkpoints import list_checkpoints
    from tests.helpers.training import quick_settings, small_dataset

    data = small_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    config = load_config(None, quick_settings(tiny_sd1, data, out, max_train_steps=50))

    def terminate_after_first(report) -> None:
        if report.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with time_limit(300):
        result = train(config, on_step=terminate_after_first)
    assert result.interrupted and 1 <= result.steps < 50
    assert [step for step, _ in list_checkpoints(out)] == [result.steps]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed after the run


# -- crashes become one line -------------------------------------------------------------------------- #

def test_catalog_errors_name_the_database(lorareg, adapter_file, tmp_path, monkeypatch):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "catalog.db").write_bytes(b"this is not an SQLite database" * 100)
    one_line_error(lorareg("--home", damaged, "list"), str(damaged / "catalog.db"), "damaged")
    one_line_error(lorareg("--home", damaged, "add", adapter_file), str(damaged / "catalog.db"))
    import lorareg.registry.schema as schema

    assert lorareg("--home", tmp_path / "ro", "list").code == 0  # create it
    real_connect = sqlite3.connect

    def read_only(path, *args, **kwargs):
        return real_connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(schema.sqlite3, "connect", read_only)
    one_line_error(lorareg("--home", tmp_path / "ro", "add", adapter_file), "read-only", "catalog.db")
    monkeypatch.setattr(schema.sqlite3, "connect", real_connect)

    def tiny(path, *args, **kwargs):  # a disk that fills up after a few pages
        conn = real_connect(path, *args, **kwargs)
        conn.execute("PRAGMA max_page_count = 40")
        return conn

    monkeypatch.setattr(schema.sqlite3, "connect", tiny)
    folder = tmp_path / "many"
    for seed in range(60):
        (folder / f"{seed}.safetensors").parent.mkdir(exist_ok=True)
        (folder / f"{seed}.safetensors").write_bytes(small_lora_bytes(seed, metadata={"modelspec.description": "x" * 3000}))
    one_line_error(lorareg("--home", tmp_path / "full", "scan", folder), "could not be written", "catalog.db")


def test_library_warnings_never_reach_the_user(lorareg, adapter_file, monkeypatch):
    import warnings

    import loralib.inspection

    real = loralib.inspection.inspect

    def noisy(*args, **kwargs):
        from PIL import Image

        warnings.warn("something deprecated", UserWarning, stacklevel=1)
        warnings.warn("huge image", Image.DecompressionBombWarning, stacklevel=1)
        import logging

        logging.getLogger("huggingface_hub.repocard").warning("Repo card metadata block was not found.")
        return real(*args, **kwargs)

    monkeypatch.setattr(loralib.inspection, "inspect", noisy)
    res = lorareg("inspect", adapter_file)
    assert res.code == 0 and res.err == "", res.err


def test_a_repo_card_without_metadata_prints_nothing_on_pull(lorareg, hub, tmp_path):
    hub.create_repo("alice/plain")
    hub.add_commit("alice/plain", {"p.safetensors": small_lora_bytes(5), "README.md": b"# just a title\n"})
    res = lorareg("pull", "alice/plain")
    assert res.code == 0 and res.err == "", res.err


def test_markup_and_escapes_from_files_are_shown_literally(lorareg, tmp_path):
    folder = tmp_path / "[" / "x]"  # shown as .../[/x]/...
    folder.mkdir(parents=True)
    path = folder / "[bold]a.safetensors"
    path.write_bytes(good_kohya(3, {"modelspec.title": "[/]\x1b]0;pwned\x07", "ss_output_name": "\x1b[2Jclear"}))
    res = lorareg("inspect", path)
    assert res.code == 0, res.err
    assert "[/x]" in res.out and "[bold]a.safetensors" in res.out and "[/]" in res.out
    assert "\x1b" not in res.out and "\\x1b]0;pwned\\x07" in res.out and "\\x1b[2Jclear" in res.out
    assert lorareg("add", path, "--name", "odd").code == 0
    res = lorareg("show", "odd")
    assert res.code == 0 and "\x1b" not in res.out and "[/x]" in res.out, res.out


def test_non_utf8_file_names_are_read_or_refused_clearly(lorareg, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.safetensors"))
    odd.write_bytes(good_kohya(4))
    (folder / "fine.safetensors").write_bytes(good_kohya(5))
    res = lorareg("inspect", odd)
    assert res.code == 0 and "caf\\xe9" in res.out, res.err
    one_line_error(lorareg("add", odd), "not valid UTF-8")
    res = lorareg("scan", folder, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["added"] == 1 and "not valid UTF-8" in report["skipped"][0]["reason"]


# -- refused or flagged ------------------------------------------------------------------------------ #

def _nan_file(path: Path) -> Path:
    tensors = kohya_tensors()
    name = next(n for n in tensors if n.endswith("lora_down.weight"))
    tensors[name] = Tensor("F32", [2, 320], f32([float("nan")] * 640))
    path.write_bytes(safetensors_bytes(tensors, {}))
    return path


def test_nonfinite_factors_are_refused_naming_the_module_unless_allowed(lorareg, tmp_path):
    bad = _nan_file(tmp_path / "nan.safetensors")
    good = tmp_path / "good.safetensors"
    good.write_bytes(good_kohya(2))
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    one_line_error(lorareg("convert", bad, "-o", tmp_path / "c.safetensors"), "NaN or infinite", module,
                   "--allow-nonfinite")
    one_line_error(lorareg("merge", good, bad, "-o", tmp_path / "m.safetensors"), "NaN or infinite", module)
    one_line_error(lorareg("resize", bad, "--rank", "1", "-o", tmp_path / "r.safetensors"), "NaN or infinite", module)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "nan.safetensors"]
    assert lorareg("convert", bad, "-o", tmp_path / "c.safetensors", "--allow-nonfinite").code == 0
    res = lorareg("merge", good, bad, "-o", tmp_path / "m.safetensors", "--allow-nonfinite")
    assert res.code == 0, res.err
    assert loralib.load(tmp_path / "m.safetensors").nonfinite_modules() == [module]
    one_line_error(lorareg("merge", good, bad, "--rank", "2", "-o", tmp_path / "m2.safetensors", "--allow-nonfinite"),
                   "exact merge")


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers"])
def test_values_that_overflow_only_once_stored_are_refused_while_writing_and_nothing_is_left(tmp_path, fmt):
    import torch

    from loralib.errors import CorruptFileError
    from loralib.formats import save_adapter
    from loralib.synthetic import random_adapter
    from tests.helpers.compose_cases import SMALL_LAYERS

    adapter = random_adapter(SMALL_LAYERS, 4, seed=3, architecture="sd15")
    keys = list(adapter.modules)
    adapter.modules[keys[-1]].up[0, 0] = 1e6  # finite in float32, infinite in float16
    with pytest.raises(CorruptFileError, match=rf"1 module\(s\) would hold NaN or infinite values once stored as "
                                               rf"float16: {keys[-1]}"):
        save_adapter(adapter, tmp_path / "out.safetensors", fmt, dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []
    written = save_adapter(adapter, tmp_path / "out.safetensors", fmt, dtype=torch.float16, allow_nonfinite=True)
    assert loralib.load(written.path).nonfinite_modules() == [keys[-1]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_the_finiteness_check_agrees_with_isfinite(dtype):
    """all_finite sums first (fast) and looks at every value only when the sum is not finite: a NaN,
    an infinity, infinities of both signs, and finite values whose sum overflows must all be judged
    as torch.isfinite judges them."""
    import torch

    from loralib.values import all_finite

    dt = getattr(torch, dtype)
    big = torch.finfo(dt).max
    cases = {
        "plain": torch.randn(64, 33).to(dt),
        "nan": torch.tensor([1.0, float("nan"), 2.0]).to(dt),
        "inf": torch.tensor([1.0, float("inf")]).to(dt),
        "both infinities": torch.tensor([float("inf"), 0.0, float("-inf")]).to(dt),
        "sum overflows": torch.full((4096,), big, dtype=dt),
        "empty": torch.zeros(0, 3, dtype=dt),
        "a strided view": torch.tensor([[1.0, float("nan")], [2.0, 3.0]]).to(dt)[:, 0],
    }
    for name, tensor in cases.items():
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all()), name
    assert all_finite(torch.arange(5))  # integers are always finite


def test_values_that_overflow_the_output_dtype_are_refused(lorareg, tmp_path):
    tensors = kohya_tensors()
    name = next(n for n in tensors if n.endswith("lora_up.weight"))
    tensors[name] = Tensor("F32", [320, 2], f32([1e6] * 640))
    path = tmp_path / "big.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {}))
    one_line_error(lorareg("convert", path, "--dtype", "fp16", "-o", tmp_path / "h.safetensors"), "float16")
    assert lorareg("convert", path, "-o", tmp_path / "f.safetensors").code == 0


def test_an_alpha_of_1e300_is_converted_exactly_and_refused_by_resize(lorareg, tmp_path):
    tensors = kohya_tensors()
    name = next(n for n in tensors if n.endswith(".alpha"))
    tensors[name] = Tensor("F64", [], struct.pack("<d", 1e300))
    path = tmp_path / "huge.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {}))
    assert lorareg("convert", path, "-o", tmp_path / "c.safetensors").code == 0
    assert max(m.alpha for m in loralib.load(tmp_path / "c.safetensors").modules.values()) == 1e300
    one_line_error(lorareg("resize", path, "--rank", "1", "-o", tmp_path / "r.safetensors"), "scale too large")


def test_push_uploads_only_the_adapter_its_card_and_real_images(lorareg, hub, adapter_file, tmp_path):
    from PIL import Image

    png = tmp_path / "sample.png"
    Image.new("RGB", (4, 4), "red").save(png)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    hidden = tmp_path / ".hidden"
    hidden.mkdir()
    (hidden / ".env").write_text("TOKEN=abc")
    for not_an_image in (secret, hidden / ".env"):  # refused at the door already
        res = lorareg("add", adapter_file, "--name", "a", "--sample", not_an_image)
        assert res.code == 1 and "is not an image" in res.err
    swapped = tmp_path / "swapped.png"
    Image.new("RGB", (4, 4), "blue").save(swapped)
    res = lorareg("add", adapter_file, "--name", "a", "--sample", png, "--sample", swapped)
    assert res.code == 0, res.err
    swapped.write_text("password=hunter2")  # a recorded sample replaced by something else since
    res = lorareg("push", "a", "--repo", "alice/a", "--json")
    assert res.code == 0, res.err
    files = set(hub.list_files("alice/a"))
    assert files == {".gitattributes", "a.safetensors", "README.md", "images/sample.png"}
    assert b"hunter2" not in b"".join(hub.file_bytes("alice/a", f) for f in files)


@pytest.mark.parametrize("case", ["nan_alpha", "trailing_garbage", "duplicate_metadata", "duplicate_tensor_key"])
def test_the_catalog_and_the_operations_agree_on_what_is_valid(case, lorareg, tmp_path):
    from tests.helpers.broken_inputs import CASES

    folder = tmp_path / "in"
    folder.mkdir()
    path = next(c for c in CASES if c.name == case).build(folder)
    assert lorareg("convert", path, "-o", tmp_path / "o.safetensors").code == 1
    assert lorareg("inspect", path).code == 1
    report = json.loads(lorareg("scan", folder, "--json").out)
    assert report["damaged"] == [str(path)]
    with Catalog() as catalog:
        assert all(entry.damaged for entry in catalog.list()), "an adapter every operation refuses is listed as fine"
        record = catalog.file_record(path)
        assert record.state == "damaged" or catalog.by_path(path).damaged


# -- scanning ------------------------------------------------------------------------------------------ #

def test_one_file_that_breaks_its_reader_does_not_stop_a_scan(lorareg, tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    for seed in range(3):
        (folder / f"{seed}.safetensors").write_bytes(small_lora_bytes(seed))
    import lorareg.registry.describe as describe_module  # scan imports describe when a file is to be read

    real = describe_module.describe

    def flaky(path, *args, **kwargs):
        if Path(path).name == "1.safetensors":
            raise RuntimeError("a reader bug")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(describe_module, "describe", flaky)
    res = lorareg("scan", folder, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["added"] == 2 and report["damaged"] == [str(folder / "1.safetensors")]


def test_links_loops_and_the_root_of_the_file_system(lorareg, tmp_path):
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.safetensors").write_bytes(small_lora_bytes(1))
    (folder / "sub" / "loop").symlink_to(folder)
    (folder / "root").symlink_to("/")
    (folder / "up").symlink_to(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "b.safetensors").write_bytes(small_lora_bytes(2))
    (folder / "elsewhere").symlink_to(outside)
    started = time.monotonic()
    with time_limit(60):
        res = lorareg("scan", folder, "--json")
    assert res.code == 0 and time.monotonic() - started < 30, res.err
    report = json.loads(res.out)
    assert report["added"] == 1
    reasons = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {"loop", "root", "up", "elsewhere"}
    assert "--follow-links" in reasons["elsewhere"] and "loop" in reasons["loop"] and "never" in reasons["root"]
    res = lorareg("scan", folder, "--json", "--follow-links")
    report = json.loads(res.out)
    assert report["added"] == 1 and report["unchanged"] == 1
    assert {Path(item["path"]).name for item in report["skipped"]} == {"loop", "root", "up"}


def test_verify_reports_nothing_for_a_clean_folder(lorareg, adapter_file):
    assert lorareg("add", adapter_file).code == 0
    report = json.loads(lorareg("verify", "--json").out)
    assert report["leftovers"] == [] and report["ok"] == 1


def test_invalid_argument_is_raised_for_a_nonfinite_merge_request():
    from loralib.compose import merge

    with pytest.raises(InvalidArgumentError, match="exact merge"):
        merge([], rank=2, allow_nonfinite=True)
