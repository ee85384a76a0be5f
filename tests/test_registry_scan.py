"""`scan` is incremental and survives being killed; parallel processes share the catalog safely."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorareg.registry.describe as describe_module
import lorareg.registry.scan as scan_module
from loralib.errors import LoraError
from lorareg.registry.catalog import Catalog
from lorareg.registry.scan import scan
from lorareg.registry.schema import SCHEMA_VERSION
from tests.conftest import ROOT
from tests.helpers.small_loras import small_lora_bytes, write_small_loras

KILL_FILES = 1000


def _consistent(home: Path) -> tuple[int, int]:
    """Check the catalog's integrity and its invariants; return (adapters, adapter files)."""
    conn = sqlite3.connect(home / "catalog.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    adapters = conn.execute("SELECT count(*) FROM adapters").fetchone()[0]
    files = conn.execute("SELECT count(*) FROM files WHERE adapter_id IS NOT NULL").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM adapters_fts").fetchone()[0] == adapters
    conn.close()
    return adapters, files


def test_rescan_skips_unchanged_files_and_notices_changes(tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    paths = write_small_loras(folder, 30)
    write_small_loras(folder / "sub", 2, start=100)
    (folder / "notes.txt").write_text("not an adapter")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with Catalog(tmp_path / "home") as catalog:
        first = scan(catalog, folder)
        assert (first.found, first.added, len(first.damaged)) == (33, 32, 1)
        calls = []
        real = describe_module.describe  # scan imports it when a file is to be read
        monkeypatch.setattr(describe_module, "describe", lambda path, *a: calls.append(path) or real(path, *a))
        again = scan(catalog, folder)
        assert (again.unchanged, again.added, again.updated, calls) == (33, 0, 0, [])
        assert len(again.damaged) == 1
        paths[0].write_bytes(small_lora_bytes(500))          # new tensor data under an old name
        paths[1].write_bytes(small_lora_bytes(1, metadata={"modelspec.title": "edited"}))  # metadata only
        paths[2].unlink()
        write_small_loras(folder, 1, start=200)
        third = scan(catalog, folder)
        assert (third.added, third.updated, third.unchanged, len(calls)) == (2, 1, 30, 3)
        assert third.missing == [str(paths[2])]
        assert catalog.count() == 34  # the adapter whose file was overwritten stays known, without a file
        assert catalog.files(catalog.get("lora_00000")) == []
        flat = scan(catalog, folder, recursive=False)
        assert flat.found == 31 and flat.missing == []
    assert _consistent(tmp_path / "home")[0] == 34


def test_progress_is_reported_for_every_file(tmp_path):
    write_small_loras(tmp_path / "loras", 12)
    seen = []
    with Catalog(tmp_path / "home") as catalog:
        scan(catalog, tmp_path / "loras", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 12) for i in range(0, 13)]


@pytest.fixture(scope="module")
def many_loras(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many") / "loras"
    write_small_loras(folder, KILL_FILES)
    return folder


def _start_scan(folder: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "LORAREG_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "lorareg", "scan", str(folder)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_batch(home: Path, process: subprocess.Popen) -> None:
    """Wait until the running scan has committed something (at least one batch)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            conn = sqlite3.connect(home / "catalog.db", timeout=5)
            count = conn.execute("SELECT count(*) FROM files").fetchone()[0]
            conn.close()
            if count:
                return
        except sqlite3.OperationalError:  # not created yet
            pass
        time.sleep(0.01)
    raise AssertionError("the scan committed nothing within 60 s")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_scan_leaves_a_consistent_catalog_that_the_next_scan_completes(many_loras, tmp_path, how):
    home = tmp_path / "home"
    process = _start_scan(many_loras, home)
    _wait_for_first_batch(home, process)
    process.send_signal(how)
    _out, err = process.communicate(timeout=60)
    adapters, files = _consistent(home)
    assert 0 < adapters < KILL_FILES and adapters == files, "the scan should have been stopped part way"
    if how == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:  # Ctrl-C and kill: what was read is saved, and the user is told how to go on
        assert process.returncode == 130 and "run the same scan again to finish" in err and "Traceback" not in err
    with Catalog(home) as catalog:
        report = scan(catalog, many_loras)
    assert report.unchanged == adapters and report.added == KILL_FILES - adapters
    assert _consistent(home) == (KILL_FILES, KILL_FILES)


ADDER = """
import sys
from pathlib import Path
from lorareg.registry.catalog import Catalog
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with Catalog() as catalog:       # a new connection each time, as separate lorareg runs would
        catalog.add(path, tags=["added"])
"""


def test_parallel_processes_adding_and_scanning_never_lose_entries_or_fail(tmp_path):
    write_small_loras(tmp_path / "a", 300, start=0)
    write_small_loras(tmp_path / "b", 300, start=400)
    write_small_loras(tmp_path / "c", 40, start=800)
    env = {**os.environ, "LORAREG_HOME": str(tmp_path / "home")}
    commands = [[sys.executable, "-m", "lorareg", "scan", str(tmp_path / "a"), "--json"],
                [sys.executable, "-m", "lorareg", "scan", str(tmp_path / "b"), "--json"],
                [sys.executable, "-c", ADDER, str(tmp_path / "c")]]
    processes = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]  # all start on an empty home: they also race to create the schema
    results = [p.communicate(timeout=120) for p in processes]
    for process, (_, err) in zip(processes, results):
        assert process.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err
    assert [json.loads(results[i][0])["added"] for i in (0, 1)] == [300, 300]
    assert _consistent(tmp_path / "home") == (640, 640)
    with Catalog(tmp_path / "home") as catalog:
        assert catalog.count(tag="added") == 40
        # three processes raced to create the schema; each migration ran once
        assert [r[0] for r in catalog.conn.execute("SELECT version FROM schema_version")] == \
            list(range(1, SCHEMA_VERSION + 1))


def test_worker_processes_record_what_one_process_records(tmp_path):
    """Files read by worker processes are recorded exactly as when this process reads them: same
    entries and hashes, in the same order; bad files flagged the same way."""
    folder = tmp_path / "loras"
    write_small_loras(folder, 40)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (folder / "weights.safetensors").write_bytes(small_lora_bytes(7)[:-50])  # truncated
    rows = {}
    for workers in (1, 2):
        home = tmp_path / f"home{workers}"
        with Catalog(home) as catalog:
            report = scan(catalog, folder, workers=workers, batch_files=7)
        assert report.added == 40 and report.not_lora == []
        assert sorted(Path(p).name for p in report.damaged) == ["broken.safetensors", "weights.safetensors"]
        conn = sqlite3.connect(home / "catalog.db")
        rows[workers] = conn.execute("SELECT name, identity, tensor_sha256, sha256, fingerprint FROM adapters "
                                     "ORDER BY id").fetchall()
        rows[workers, "files"] = conn.execute("SELECT path, state FROM files ORDER BY path").fetchall()
        conn.close()
        _consistent(home)
    assert rows[1] == rows[2] and len(rows[1]) == 40
    assert rows[1, "files"] == rows[2, "files"]


def _catalog_rows(home: Path) -> tuple[list[tuple], list[tuple]]:
    """Every column of every adapter (ids and timestamps left out) and of every file row (the
    adapter named instead of its id), in a stable order."""
    conn = sqlite3.connect(home / "catalog.db")
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(adapters)")
                   if r[1] not in ("id", "added_at", "updated_at")]
        adapters = conn.execute(f"SELECT {', '.join(columns)} FROM adapters ORDER BY name").fetchall()
        files = conn.execute("SELECT f.path, a.name, f.size, f.mtime_ns, f.sha256, f.state, f.problem FROM files f "
                             "LEFT JOIN adapters a ON a.id = f.adapter_id WHERE f.state = 'ok' "
                             "ORDER BY f.path").fetchall()
        parents = conn.execute("SELECT a.name, p.position, p.tensor_sha256, p.sha256, p.file, p.path, p.format, "
                               "p.weight FROM parents p JOIN adapters a ON a.id = p.child_id "
                               "ORDER BY a.name, p.position").fetchall()
    finally:
        conn.close()
    return adapters, files + parents


def test_a_first_scan_records_exactly_what_adding_each_file_records(tmp_path, real_loras):
    """A first scan stores, column for column, what ``Catalog.add`` of each of its files stores:
    small kohya files (two sharing a name, so one becomes ``name-2``), a copy of one (a second
    path of the same adapter) and the real files published by others, damaged ones included."""
    folder = tmp_path / "loras"
    write_small_loras(folder / "a", 12)
    (folder / "b").mkdir()
    first = sorted((folder / "a").iterdir())[0]
    (folder / "b" / first.name).write_bytes(first.read_bytes())  # the same adapter at a second path
    (folder / "c").mkdir()
    (folder / "c" / first.name).write_bytes(small_lora_bytes(999))  # another adapter with the same file name
    for real in sorted(real_loras.glob("*.safetensors")):
        (folder / "real").mkdir(exist_ok=True)
        (folder / "real" / real.name).write_bytes(real.read_bytes())
    with Catalog(tmp_path / "scanned") as catalog:
        report = scan(catalog, folder, workers=1, batch_files=5)
    assert report.added >= 14 and report.extra_paths == 1
    with Catalog(tmp_path / "added") as catalog:
        for path in scan_module._candidates(folder, True, scan_module.ScanReport(str(folder)), False):
            try:
                catalog.add(path)
            except LoraError:
                pass  # not an adapter, or unreadable: scan records those as files only
    scanned, added = _catalog_rows(tmp_path / "scanned"), _catalog_rows(tmp_path / "added")
    assert len(scanned[0]) == report.added and len(scanned[1]) >= report.added + 1
    assert scanned == added


def test_a_file_row_holds_the_file_s_own_hashes_and_survives_pickling(tmp_path, real_loras):
    """What a worker passes back (``FileRow``) carries hashes equal to hashlib's over the file's
    bytes, the file's size and mtime, and comes out of pickle unchanged; the catalog stores the same
    whether given the row or the facts it was made from."""
    import hashlib
    import pickle
    import struct

    from lorareg.registry.describe import FileRow, describe

    write_small_loras(tmp_path / "small", 2)
    paths = sorted((tmp_path / "small").iterdir()) + [real_loras / "sd1_lycoris-lokr_f16.safetensors"]
    for path in paths:
        facts = describe(path)
        row = facts.row()
        data = path.read_bytes()
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        assert isinstance(row, FileRow) and pickle.loads(pickle.dumps(row)) == row
        assert row.sha256 == hashlib.sha256(data).hexdigest() == row.columns["sha256"]
        assert row.tensor_sha256 == hashlib.sha256(data[header_end:]).hexdigest() == row.columns["tensor_sha256"]
        assert (row.path, row.size, row.mtime_ns) == (str(path), path.stat().st_size, path.stat().st_mtime_ns)
        assert row.columns == facts.columns() and row.default_name == facts.default_name() == path.stem
    rows = {}
    for given in ("facts", "row"):
        with Catalog(tmp_path / given) as catalog:
            stored = catalog.add_many([describe(p) if given == "facts" else describe(p).row() for p in paths])
        assert [s.created for s in stored] == [True] * len(paths)
        rows[given] = _catalog_rows(tmp_path / given)
    assert rows["facts"] == rows["row"] and len(rows["row"][0]) == len(paths)


def test_scan_workers_option_reads_in_worker_processes_and_records_the_same(tmp_path, lorareg, monkeypatch):
    """``lorareg scan --workers 2`` stores what ``--workers 1`` stores; a count below 1 is refused in one line."""
    folder = tmp_path / "loras"
    write_small_loras(folder, 30)
    reports = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("LORAREG_HOME", str(tmp_path / f"home{workers}"))
        result = lorareg("scan", folder, "--workers", workers, "--json")
        assert result.code == 0, result.err
        reports[workers] = json.loads(result.out)
    assert reports["1"]["added"] == reports["2"]["added"] == 30
    assert _catalog_rows(tmp_path / "home1") == _catalog_rows(tmp_path / "home2")
    refused = lorareg("scan", folder, "--workers", "0")
    assert refused.code == 2 and "--workers" in refused.err and "Traceback" not in refused.err


@pytest.mark.parametrize(("cores", "load", "expected"), [(1, 0.0, 1), (2, 0.0, 2), (2, 1.0, 1), (2, 6.0, 1),
                                                         (8, 2.0, 6)])
def test_scan_reads_with_one_worker_per_free_core(monkeypatch, cores, load, expected):
    """The default number of workers: the cores minus the load average, at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert scan_module._free_cores() == expected


def test_workers_end_with_a_killed_scan(many_loras, tmp_path):
    """A scan killed (SIGKILL) while worker processes read leaves none behind: they would hold the
    command's output open for ever, so reading it to its end would never finish."""
    env = {**os.environ, "LORAREG_HOME": str(tmp_path / "home")}
    process = subprocess.Popen([sys.executable, "-m", "lorareg", "scan", str(many_loras), "--workers", "2"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_first_batch(tmp_path / "home", process)
    process.kill()
    start = time.monotonic()
    process.communicate(timeout=60)  # returns once every holder of the pipes (the workers too) is gone
    assert process.returncode == -signal.SIGKILL and time.monotonic() - start < 30
    adapters, files = _consistent(tmp_path / "home")
    assert 0 < adapters < KILL_FILES and adapters == files
