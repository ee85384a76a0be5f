"""Identity is the content as stored (names, dtypes, shapes, tensor data; not metadata); conversions are
"converted from" edges between entries; pending input hashes cannot be recorded wrong; schema 2 catalogs
upgrade with their data."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

import loralib
from loralib.adapter import LoraAdapter
from loralib.files.hashes import hash_file
from loralib.layers import LayerShape
from loralib.synthetic import random_adapter
from lorareg.registry.catalog import Catalog
from lorareg.registry.records import ParentRecord
from tests.helpers.small_loras import sd1_attention_layers, small_lora_bytes

DIFFUSERS_OLD = "sd15_diffusers-lora-down_unet-prefix_f32.safetensors"


def _identity_by_hand(path: Path) -> str:
    """The documented definition, written out: SHA-256 over the sorted tensor index and the tensor data's SHA-256."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    rows = [[name, e["dtype"], e["shape"], *e["data_offsets"]] for name, e in sorted(header.items())]
    data_hash = hashlib.sha256(raw[8 + size:]).hexdigest()
    return hashlib.sha256(b"lorareg-identity/1\n" + json.dumps(rows, separators=(",", ":")).encode()
                          + b"\n" + data_hash.encode()).hexdigest()


def test_identity_is_names_dtypes_shapes_and_data_without_metadata(tmp_path):
    first, edited = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(small_lora_bytes(1))
    edited.write_bytes(small_lora_bytes(1, metadata={"modelspec.title": "edited", "ss_tag_frequency": "{}"}))
    a, b = hash_file(first), hash_file(edited)
    assert a.identity == _identity_by_hand(first) and b.identity == _identity_by_hand(edited)
    assert a.sha256 != b.sha256 and a.identity == b.identity  # a metadata edit: the same content
    adapter = loralib.load(first)
    renamed = loralib.save(adapter, tmp_path / "d.safetensors", "diffusers").path
    other_dtype = loralib.save(adapter, tmp_path / "f32.safetensors", dtype=__import__("torch").float32).path
    assert len({a.identity, hash_file(renamed).identity, hash_file(other_dtype).identity}) == 3


def test_a_peft_folder_is_identified_by_all_its_files(tmp_path):
    layers = {**sd1_attention_layers(2),
              "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LayerShape(768, 768, None)}
    adapter = random_adapter(layers, rank=2, seed=5, architecture="sd1")
    folder = loralib.save(adapter, tmp_path / "p", "peft").path.parent
    component = folder / "text_encoder" / "adapter_model.safetensors"
    assert component.is_file()
    with Catalog() as catalog:
        before = catalog.add(folder).entry
        raw = bytearray(component.read_bytes())
        raw[-1] ^= 0x01  # one bit of the text encoder's data
        component.write_bytes(bytes(raw))
        after = catalog.add(folder).entry
    assert before.tensor_sha256 == after.tensor_sha256  # the main (UNet) file did not change
    assert before.identity != after.identity and before.id != after.id


@pytest.fixture
def original(real_loras, tmp_path):
    """A copy of a real diffusers-old file: converting it to PEFT keeps its tensor bytes (and tensor hash)."""
    return Path(shutil.copy(real_loras / DIFFUSERS_OLD, tmp_path / "orig.safetensors"))


def test_conversions_are_edges_between_entries(lorareg, original, tmp_path):
    """The issue's reproduction: convert to PEFT as p, the same original to kohya as k, then scan."""
    assert lorareg("convert", original, "--to", "peft", "-o", tmp_path / "p").code == 0
    assert hash_file(tmp_path / "p" / "adapter_model.safetensors").tensor_sha256 == hash_file(original).tensor_sha256
    tree = json.loads(lorareg("lineage", "p", "--json").out)
    assert [(p["file"], p["identity"]) for p in tree["parents"]] == [("orig.safetensors", hash_file(original).identity)]
    assert lorareg("convert", original, "--to", "kohya", "-o", tmp_path / "k.safetensors").code == 0
    tree = json.loads(lorareg("lineage", "k", "--json").out)
    assert [p["file"] for p in tree["parents"]] == ["orig.safetensors"]  # not p, which shares the tensor hash
    assert lorareg("scan", tmp_path).code == 0
    entries = {e["name"]: e for e in json.loads(lorareg("list", "--json").out)}
    assert {n: e["format"] for n, e in entries.items()} == {"orig": "diffusers-old", "p": "peft", "k": "kohya"}
    for child in ("p", "k"):
        tree = json.loads(lorareg("lineage", child, "--json").out)
        assert [(p["name"], p["in_catalog"]) for p in tree["parents"]] == [("orig", True)]
        assert tree["parents"][0]["parents"] == []
    assert sorted(json.loads(lorareg("show", "orig", "--json").out)["children"]) == ["k", "p"]
    res = lorareg("lineage", "orig")  # the original has no parents of its own
    assert res.out.strip().startswith("orig [") and len(res.out.strip().splitlines()) == 1
    assert "no recorded parents" in res.err


def test_old_histories_name_parents_by_tensor_hash_and_format(lorareg, original, tmp_path):
    """Files written before identities were recorded: the format and file name pick between entries that
    share a tensor hash, and a child is never its own parent."""
    assert lorareg("convert", original, "--to", "peft", "-o", tmp_path / "p").code == 0
    assert lorareg("add", original).code == 0
    tensor = hash_file(original).tensor_sha256
    with Catalog() as catalog:
        orig, peft = catalog.get("orig"), catalog.get("p")
        assert orig.tensor_sha256 == peft.tensor_sha256 == tensor and orig.id != peft.id
        record = lambda **kw: ParentRecord(0, tensor, None, kw.get("file"), None, kw.get("format"), None)  # noqa: E731
        assert catalog.parent_entry(record(format="diffusers-old")).name == "orig"
        assert catalog.parent_entry(record(format="peft")).name == "p"
        assert catalog.parent_entry(record(file="orig.safetensors")).name == "orig"
        assert catalog.parent_entry(record()) is None  # two candidates, nothing to choose by
        assert catalog.parent_entry(record(), child_id=peft.id).name == "orig"  # never the child itself
        assert catalog.with_tensor_hash(tensor) == [catalog.by_id(peft.id), catalog.by_id(orig.id)]


def test_a_pending_input_hash_is_recorded_as_the_real_hash(tmp_path, monkeypatch, one_thread):
    """The path that once recorded placeholders: the hash thread is still running when the header is built,
    finishes before the writer fills it in, and the input adapter is dropped and collected before the write."""
    import loralib.files.hashes as hashes
    import loralib.metadata as metadata
    from loralib.metadata import input_record
    from loralib.records import OperationRecord

    source = tmp_path / "source.safetensors"
    loralib.save(random_adapter(sd1_attention_layers(), rank=4, seed=6, architecture="sd1"), source)
    expected = hash_file(source)
    gate = threading.Event()
    real_hash = hashes.hash_adapter_files

    def gated(headers):
        assert gate.wait(60)
        return real_hash(headers)

    monkeypatch.setattr(hashes, "hash_adapter_files", gated)
    adapter = loralib.load(source)
    record = OperationRecord("convert", [input_record(adapter)], {"from_format": "kohya", "to_format": "diffusers"})
    output = LoraAdapter(dict(adapter.modules), adapter.architecture, metadata=dict(adapter.metadata))
    pending = record.inputs[0].pending_hashes
    seen = {}
    real_build = metadata.build

    def build_then_finish(*args, **kwargs):
        built = real_build(*args, **kwargs)
        seen["placeholders"] = set(built.pending)  # the hashes were not known when the header was made
        gate.set()
        pending.result()  # the hash thread finishes before the writer reads the values
        gc.collect()
        return built

    monkeypatch.setattr(metadata, "build", build_then_finish)
    del adapter
    gc.collect()  # the input adapter is gone before the write
    result = loralib.save(output, tmp_path / "out.safetensors", "diffusers", operation=record)
    assert len(seen["placeholders"]) == 3
    written = json.loads(loralib.inspect(result.path).metadata["lorareg.history"])[-1]["inputs"][0]
    assert (written["identity"], written["tensor_sha256"], written["sha256"]) == (
        expected.identity, expected.tensor_sha256, expected.sha256)
    assert not seen["placeholders"] & set(json.dumps(written).split('"'))
    stored = result.operation.inputs[0]
    assert (stored.identity, stored.tensor_sha256) == (expected.identity, expected.tensor_sha256)
    with Catalog() as catalog:
        entry = catalog.register_output(result.path, result.operation, hashes=result.hashes).entry
        assert [p.identity for p in catalog.parents(entry)] == [expected.identity]


def _v2_catalog(home: Path) -> sqlite3.Connection:
    import lorareg.registry.schema as schema

    home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(home / "catalog.db", isolation_level=None)
    schema.migrate(conn, {1: schema.MIGRATIONS[1], 2: schema.MIGRATIONS[2]})
    return conn


def _v2_entry(conn, name: str, tensor_sha256: str, paths: list[Path], *, tags=(), fmt="kohya") -> int:
    """A row as schema-2 code wrote it: identified by the tensor hash, one files row per path."""
    adapter_id = conn.execute(
        "INSERT INTO adapters (name, tensor_sha256, format, architecture, tags, metadata, keywords, added_at, "
        "updated_at) VALUES (?, ?, ?, 'sd1', ?, '{}', ?, 'x', 'x')",
        (name, tensor_sha256, fmt, json.dumps(list(tags)), name)).lastrowid
    for path in paths:
        stat = path.stat() if path.exists() else None
        conn.execute("INSERT INTO files (path, adapter_id, size, mtime_ns, sha256, state, seen_at) "
                     "VALUES (?, ?, ?, ?, ?, 'ok', 'x')",
                     (str(path), adapter_id, stat.st_size if stat else 1, stat.st_mtime_ns if stat else 1,
                      hash_file(path).sha256 if stat else "0" * 64))
    return adapter_id


def test_a_schema_2_catalog_upgrades_with_identities_from_the_files_on_disk(lorareg, original, tmp_path):
    home = tmp_path / "home"
    folder = tmp_path / "loras"
    folder.mkdir()
    kept = folder / "kept.safetensors"
    kept.write_bytes(small_lora_bytes(3))
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(small_lora_bytes(4))
    assert lorareg("convert", original, "--to", "peft", "-o", folder / "p").code == 0
    peft_file = folder / "p" / "adapter_model.safetensors"
    conn = _v2_catalog(home)
    kept_id = _v2_entry(conn, "kept", hash_file(kept).tensor_sha256, [kept], tags=["style"])
    conn.execute("INSERT INTO parents (child_id, position, tensor_sha256, file, weight) VALUES (?, 0, ?, 'a.safetensors', 0.5)",
                 (kept_id, "cd" * 32))
    # schema 2 merged the original and its PEFT conversion (the same tensor hash) into one entry
    _v2_entry(conn, "p", hash_file(original).tensor_sha256, [peft_file, original], tags=["mixed"], fmt="diffusers-old")
    _v2_entry(conn, "gone", hash_file(moved).tensor_sha256, [tmp_path / "was-here.safetensors"], tags=["old"])
    conn.close()

    with Catalog(home) as catalog:
        assert [r[0] for r in catalog.conn.execute("SELECT version FROM schema_version")] == [1, 2, 3, 4]
        entry = catalog.get("kept")
        assert entry.identity == hash_file(kept).identity and entry.tags == ["style"]
        assert [(p.tensor_sha256, p.file, p.weight) for p in catalog.parents(entry)] == [("cd" * 32, "a.safetensors", 0.5)]
        split = {e.name: e for e in catalog.list()}
        assert set(split) == {"kept", "p", "orig", "gone"}
        assert (split["p"].format, split["orig"].format) == ("peft", "diffusers-old")
        assert catalog.get("p").identity == hash_file(peft_file).identity
        assert catalog.get("orig").identity == hash_file(original).identity
        assert [f.path for f in catalog.files(catalog.get("orig"))] == [str(original)]
        assert split["orig"].tags == ["mixed"] == split["p"].tags
        assert catalog.get("gone").identity == "tensor:" + hash_file(moved).tensor_sha256  # documented placeholder
        assert [e.name for e in catalog.search("kept")[0]] == ["kept"]  # the full-text index survived
        assert [e.name for e in catalog.list(tag="old")] == ["gone"]  # and the tag index
        assert catalog.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # the first file found with the placeholder's tensor hash claims the entry
    res = lorareg("--home", home, "add", moved, "--tag", "found")
    assert res.code == 0 and "already in the catalog" in res.out
    shown = json.loads(lorareg("--home", home, "show", "gone", "--json").out)
    assert shown["identity"] == hash_file(moved).identity and shown["tags"] == ["old", "found"]
    # entries recorded before fingerprints get theirs at the next scan of their folder
    assert json.loads(lorareg("--home", home, "show", "kept", "--json").out)["fp_modules"] is None
    report = json.loads(lorareg("--home", home, "scan", folder, "--json").out)
    assert (report["updated"], report["unchanged"], report["added"]) == (1, 1, 0)  # p was read again when split
    assert json.loads(lorareg("--home", home, "show", "kept", "--json").out)["fp_modules"] == 4
