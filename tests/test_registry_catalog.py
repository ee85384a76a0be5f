"""The catalog: what `add` records, identity by tensor hash, names, search, tags, rm, verify, schema."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from loralib.files.hashes import hash_file
from lorareg.registry.catalog import Catalog
from lorareg.registry.home import catalog_home, catalog_path
from lorareg.registry.schema import SCHEMA_VERSION, CatalogError, connect, write
from tests.conftest import ROOT
from tests.helpers.small_loras import small_lora_bytes, write_small_loras

TAG_FREQUENCY = json.dumps({"10_pxl": {"pixel art": 40, "castle": 12, "1girl": 5}})


def _lora(folder: Path, name: str, seed: int, **metadata: str) -> Path:
    path = folder / f"{name}.safetensors"
    path.write_bytes(small_lora_bytes(seed, metadata=metadata))
    return path


def _one_line_error(result) -> str:
    assert result.code == 1, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    return lines[0]


def test_add_records_header_facts_hashes_and_user_fields(lorareg, tmp_path):
    path = _lora(tmp_path, "pxl", 1, **{"modelspec.trigger_phrase": "pxl style, pixel", "ss_tag_frequency": TAG_FREQUENCY,
                                        "ss_learning_rate": "1e-4"})
    res = lorareg("add", path, "--name", "pixel-art", "--tag", "Style", "--trigger", "8bit", "--description", "Crisp pixels")
    assert res.code == 0 and "added pixel-art" in res.out
    shown = json.loads(lorareg("show", "pixel-art", "--json").out)
    expected = hash_file(path)
    assert shown["hashes"] == {"sha256": expected.sha256, "autov2": expected.sha256[:10],
                               "tensor_sha256": expected.tensor_sha256, "autov3": expected.tensor_sha256,
                               "a1111": expected.tensor_sha256[:12], "legacy": expected.legacy}
    assert (shown["format"], shown["architecture"], shown["modules"]) == ("kohya", "sd1", 4)
    assert shown["ranks"] == {"1": 4} and shown["alphas"] == {"1": 4} and shown["components"] == {"unet": 4}
    assert shown["dtype"] == "F16" and shown["size"] == path.stat().st_size
    assert shown["tags"] == ["style"] and shown["description"] == "Crisp pixels"
    assert shown["triggers"][:3] == ["8bit", "pxl style", "pixel"] and "pixel art" in shown["triggers"]
    assert shown["metadata"]["ss_learning_rate"] == "1e-4"
    assert shown["source"] == "file" and shown["added_at"].endswith("Z")
    assert [f["path"] for f in shown["files"]] == [str(path)] and shown["files"][0]["state"] == "ok"


def test_a_metadata_only_edit_is_the_same_adapter_with_two_paths(lorareg, tmp_path):
    first = _lora(tmp_path, "a", 7)
    second = _lora(tmp_path, "a_retitled", 7, **{"modelspec.title": "Retitled", "modelspec.trigger_phrase": "zz"})
    assert hash_file(first).sha256 != hash_file(second).sha256
    assert lorareg("add", first, "--tag", "one").code == 0
    res = lorareg("add", second, "--tag", "two")
    assert res.code == 0 and "already in the catalog" in res.out and "new path recorded" in res.out
    entries = json.loads(lorareg("list", "--json").out)
    assert len(entries) == 1 and entries[0]["tags"] == ["one", "two"] and entries[0]["title"] == "Retitled"
    shown = json.loads(lorareg("show", "a", "--json").out)
    assert sorted(f["path"] for f in shown["files"]) == sorted([str(first), str(second)])
    assert "zz" in shown["triggers"]


NAMES = ["O'Brien \"quoted\" style", "x'); DROP TABLE adapters;--", "ピクセル・アート 🎨", "100%_off [v2] *star*",
         "naïve café", "back`tick` $HOME"]


def test_names_with_quotes_unicode_and_sql_metacharacters(lorareg, tmp_path):
    for seed, name in enumerate(NAMES):
        res = lorareg("add", _lora(tmp_path, f"n{seed}", seed), "--name", name, "--tag", name)
        assert res.code == 0, res.err
    listed = json.loads(lorareg("list", "--json").out)
    assert sorted(e["name"] for e in listed) == sorted(NAMES)
    for name in NAMES:
        shown = json.loads(lorareg("show", name, "--json").out)
        assert shown["name"] == name and shown["tags"] == [name.lower()]
        assert [e["name"] for e in json.loads(lorareg("list", "--tag", name, "--json").out)] == [name]
    assert "x'); DROP TABLE adapters;--" in [e["name"] for e in json.loads(lorareg("search", "DROP TABLE", "--json").out)]
    assert [e["name"] for e in json.loads(lorareg("search", "O'Brien", "--json").out)] == [NAMES[0]]
    assert [e["name"] for e in json.loads(lorareg("search", "ピクセル", "--json").out)] == [NAMES[2]]
    assert [e["name"] for e in json.loads(lorareg("search", "naive", "--json").out)] == [NAMES[4]]  # diacritics folded
    assert lorareg("show", NAMES[2].upper()).code == 0  # case-insensitive
    assert lorareg("tag", NAMES[1], "+ok", "-" + NAMES[1]).code == 0
    assert json.loads(lorareg("show", NAMES[1], "--json").out)["tags"] == ["ok"]
    assert lorareg("rm", NAMES[0]).code == 0
    assert len(json.loads(lorareg("list", "--json").out)) == len(NAMES) - 1
    with Catalog() as catalog:
        assert catalog.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_names_that_would_read_as_paths_are_refused_and_duplicates_are_renamed(lorareg, tmp_path):
    assert "slash" in _one_line_error(lorareg("add", _lora(tmp_path, "a", 1), "--name", "user/repo"))
    assert lorareg("add", _lora(tmp_path, "b", 2), "--name", "dup").code == 0
    assert "already used" in _one_line_error(lorareg("add", _lora(tmp_path, "c", 3), "--name", "DUP"))
    (tmp_path / "other").mkdir()
    assert lorareg("add", _lora(tmp_path, "same", 4)).code == 0
    assert lorareg("add", _lora(tmp_path / "other", "same", 5)).code == 0
    assert {e["name"] for e in json.loads(lorareg("list", "--json").out)} >= {"same", "same-2"}


def test_search_covers_names_tags_triggers_descriptions_and_metadata(lorareg, tmp_path):
    lorareg("add", _lora(tmp_path, "castle_lora", 1, ss_tag_frequency=TAG_FREQUENCY), "--description", "Gothic towers")
    lorareg("add", _lora(tmp_path, "neon", 2), "--tag", "cyberpunk", "--trigger", "glowing signs")
    lorareg("add", _lora(tmp_path, "plain", 3, ss_sd_model_name="dreamshaper_8.safetensors"))

    def names(query: str, *options: str) -> list[str]:
        res = lorareg("search", query, "--json", *options)
        assert res.code == 0, res.err
        return [e["name"] for e in json.loads(res.out)]

    assert names("castle") == ["castle_lora"]           # name and caption tags
    assert names("gothic") == ["castle_lora"]           # description
    assert names("cyber") == ["neon"]                   # tag, as a prefix
    assert names("glowing sig") == ["neon"]             # trigger words, every word required
    assert names("dreamshaper") == ["plain"]            # training metadata
    assert sorted(names("tags:cyberpunk OR gothic")) == ["castle_lora", "neon"]  # FTS5 syntax passes through
    assert names("keywords:dreamshaper") == ["plain"] and names("name:castle") == ["castle_lora"]
    assert names("castle", "--tag", "cyberpunk") == []
    assert names("pixel art") == ["castle_lora"]
    table = lorareg("search", "neon")
    assert table.code == 0 and "neon" in table.out and "cyberpunk" in table.out


@pytest.mark.parametrize("query", ['"unbalanced', "nosuchcolumn:x", "AND", "(a OR"])
def test_search_with_fts_syntax_errors_gives_one_clear_line(lorareg, tmp_path, query):
    lorareg("add", _lora(tmp_path, "a", 1))
    line = _one_line_error(lorareg("search", query))
    assert "not valid full-text query syntax" in line and "quote" in line


def test_list_filters_sorts_limits_and_prints_tables(lorareg, tmp_path):
    for i in range(5):
        lorareg("add", _lora(tmp_path, f"lora{i}", i), "--tag", "even" if i % 2 == 0 else "odd")
    assert [e["name"] for e in json.loads(lorareg("list", "--tag", "even", "--json").out)] == ["lora0", "lora2", "lora4"]
    assert json.loads(lorareg("list", "--arch", "sdxl", "--json").out) == []
    assert len(json.loads(lorareg("list", "--format", "kohya", "--arch", "sd1", "--json").out)) == 5
    limited = lorareg("list", "--limit", "2", "--json")
    assert len(json.loads(limited.out)) == 2 and "showing 2 of 5" in limited.err
    assert next(e["name"] for e in json.loads(lorareg("list", "--sort", "added", "--json").out)) == "lora4"
    table = lorareg("list").out.splitlines()
    assert table[0].split() == ["name", "arch", "format", "rank", "modules", "size", "tags", "A1111"]
    assert len(table) == 6 and table[1].split()[:5] == ["lora0", "sd1", "kohya", "1", "4"]


def test_hash_prefixes_find_entries_and_ambiguity_is_explained(lorareg, tmp_path):
    path = _lora(tmp_path, "hashme", 11)
    lorareg("add", path)
    hashes = hash_file(path)
    for reference in (hashes.tensor_sha256[:12], hashes.sha256[:10], hashes.sha256, f"sha256:{hashes.sha256[:16]}",
                      "0x" + hashes.tensor_sha256, hashes.tensor_sha256[:8].upper()):
        res = lorareg("show", reference, "--json")
        assert res.code == 0 and json.loads(res.out)["name"] == "hashme", reference
    with Catalog() as catalog, write(catalog.conn):
        for suffix in ("1", "2"):
            catalog._insert("adapters", {"name": f"twin{suffix}", "tensor_sha256": "abcdef12" + suffix * 56,
                                         "added_at": "x", "updated_at": "x"})
    assert "matches 2 adapters" in _one_line_error(lorareg("show", "abcdef12"))
    assert "no adapter named" in _one_line_error(lorareg("show", "nothing-like-this"))


def test_rm_keeps_files_unless_delete_file_is_given(lorareg, tmp_path):
    keep, drop = _lora(tmp_path, "keep", 1), _lora(tmp_path, "drop", 2)
    lorareg("add", keep), lorareg("add", drop)
    res = lorareg("rm", "keep")
    assert res.code == 0 and "kept" in res.out and keep.exists()
    assert lorareg("show", "keep").code == 1
    res = lorareg("rm", "drop", "--delete-file", "--yes", "--json")
    assert res.code == 0 and json.loads(res.out) == [{"name": "drop", "deleted": [str(drop)], "kept": []}] and not drop.exists()
    assert "no adapter named" in _one_line_error(lorareg("rm", "keep"))


def test_tag_adds_and_removes(lorareg, tmp_path):
    lorareg("add", _lora(tmp_path, "t", 1), "--tag", "style")
    res = lorareg("tag", "t", "+anime", "-style", "Retro", "+pixel art")
    assert res.code == 0 and res.out.strip() == "t: anime, retro, pixel art"
    assert json.loads(lorareg("tag", "t", "--json").out) == {"name": "t", "tags": ["anime", "retro", "pixel art"]}


def test_verify_reports_missing_moved_changed_and_edited_files(lorareg, tmp_path):
    folder, elsewhere = tmp_path / "loras", tmp_path / "moved"
    folder.mkdir(), elsewhere.mkdir()
    paths = {name: _lora(folder, name, seed) for seed, name in enumerate(["ok", "moved", "missing", "changed", "edited"])}
    assert lorareg("scan", folder).code == 0
    paths["moved"].rename(elsewhere / "renamed.safetensors")
    paths["missing"].unlink()
    paths["changed"].write_bytes(small_lora_bytes(99))
    paths["edited"].write_bytes(small_lora_bytes(4, metadata={"modelspec.title": "edited"}))
    res = lorareg("verify", "--search", elsewhere, "--json")
    assert res.code == 1
    report = json.loads(res.out)
    status = {item["name"]: item for item in report["files"]}
    assert {k: v["status"] for k, v in status.items()} == {
        "ok": "ok", "moved": "moved", "missing": "missing", "changed": "changed", "edited": "metadata-changed"}
    assert status["moved"]["new_path"] == str(elsewhere / "renamed.safetensors")
    assert (report["checked"], report["missing"], report["changed"]) == (5, 1, 1)
    moved = json.loads(lorareg("show", "moved", "--json").out)
    assert [f["path"] for f in moved["files"]] == [str(elsewhere / "renamed.safetensors")]
    assert json.loads(lorareg("show", "edited", "--json").out)["title"] == "edited"
    text = lorareg("verify")
    assert text.code == 1 and "1 missing" in text.out and "1 changed" in text.out
    assert lorareg("verify", "ok", "moved").code == 0


def test_catalog_location_follows_home_option_environment_and_xdg(lorareg, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAREG_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert catalog_path() == tmp_path / "xdg" / "lorareg" / "catalog.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert catalog_home() == tmp_path / "user" / ".local" / "share" / "lorareg"
    monkeypatch.setenv("LORAREG_HOME", str(tmp_path / "env"))
    assert catalog_home() == tmp_path / "env" and catalog_home(tmp_path / "arg") == tmp_path / "arg"
    assert lorareg("--home", tmp_path / "cli", "add", _lora(tmp_path, "a", 1)).code == 0
    assert (tmp_path / "cli" / "catalog.db").exists() and not (tmp_path / "env" / "catalog.db").exists()
    assert json.loads(lorareg("--home", tmp_path / "cli", "list", "--json").out)[0]["name"] == "a"
    assert json.loads(lorareg("list", "--json").out) == []


def test_schema_is_versioned_in_wal_mode_and_migrates_forward(tmp_path, monkeypatch):
    import lorareg.registry.schema as schema

    path = tmp_path / "catalog.db"
    with Catalog(tmp_path) as catalog:
        catalog.add(_lora(tmp_path, "kept", 1), tags=["x"])
        assert catalog.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert catalog.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000
    assert schema.schema_version(sqlite3.connect(path)) == SCHEMA_VERSION

    def add_rating(db) -> None:
        db["adapters"].add_column("rating", int)

    monkeypatch.setitem(schema.MIGRATIONS, SCHEMA_VERSION + 1, add_rating)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    conn = connect(path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == list(range(1, SCHEMA_VERSION + 2))
    assert conn.execute("SELECT name, tags, rating FROM adapters").fetchall() == [("kept", '["x"]', None)]
    conn.close()
    monkeypatch.delitem(schema.MIGRATIONS, SCHEMA_VERSION + 1)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION)
    with pytest.raises(CatalogError, match="newer lorareg"):
        connect(path)


def test_a_version_1_catalog_is_migrated_with_its_data(tmp_path):
    """Version 1 indexed the raw metadata JSON; version 2 indexes its words and the tags."""
    import lorareg.registry.schema as schema

    conn = sqlite3.connect(tmp_path / "catalog.db", isolation_level=None)
    schema.migrate(conn, {1: schema.MIGRATIONS[1]})
    metadata = json.dumps({"ss_sd_model_name": "dreamshaper_8.safetensors", "ss_bucket_info": '{"buckets": {}}'})
    conn.execute("INSERT INTO adapters (name, tensor_sha256, tags, metadata, added_at, updated_at) "
                  "VALUES ('old', 'ab', '[\"style\"]', ?, 'x', 'x')", (metadata,))
    conn.close()
    with Catalog(tmp_path) as catalog:
        assert [r[0] for r in catalog.conn.execute("SELECT version FROM schema_version")] == list(
            range(1, schema.SCHEMA_VERSION + 1))
        assert catalog.get("old").identity == "tensor:ab"  # no file on disk: the documented placeholder
        assert catalog.conn.execute("SELECT keywords FROM adapters").fetchone()[0] == "dreamshaper_8.safetensors"
        assert [e.name for e in catalog.search("dreamshaper")[0]] == ["old"]
        assert [e.name for e in catalog.list(tag="style")] == ["old"]
        assert catalog.search("buckets")[1] == 0  # bulky JSON is no longer indexed
        catalog.tag("old", add=["new"])
        assert [e.name for e in catalog.list(tag="new")] == ["old"]
        assert [e.name for e in catalog.list(sort="size")] == ["old"]  # version 3's sort indexes


def test_a_damaged_catalog_file_gives_one_line(lorareg, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "catalog.db").write_bytes(b"this is not sqlite" * 100)
    line = _one_line_error(lorareg("--home", tmp_path / "bad", "list"))
    assert "cannot be read" in line


def test_scan_of_real_files_registers_adapters_and_counts_the_rest(lorareg, real_loras):
    res = lorareg("scan", real_loras, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    names = {Path(p).name for p in report["not_lora"]}
    damaged = {Path(p).name for p in report["damaged"]}
    assert names == {"NOT-LORA_textual-inversion.safetensors"}
    assert damaged == {"BAD_sdxl_diffusers-attnprocs_truncated-data.safetensors",
                       "BAD_sd15_malformed-kohya-double-prefix.safetensors"}
    assert report["added"] == report["found"] - 2 == 11
    entries = {e["name"]: e for e in json.loads(lorareg("list", "--json").out)}
    assert entries["flux_aitoolkit-peft-names_f16"]["architecture"] == "flux"
    assert entries["sd1_lycoris-lokr_f16"]["format"] == "lycoris-lokr"
    assert entries["sd2_diffusers-lora-down_unet-prefix_bf16"]["architecture"] == "sd2"
    assert entries["BAD_sdxl_diffusers-attnprocs_truncated-data"]["damaged"] is True
    again = json.loads(lorareg("scan", real_loras, "--json").out)
    assert (again["unchanged"], again["added"], len(again["not_lora"]), len(again["damaged"])) == (13, 0, 1, 2)
    assert "not a LoRA adapter" in _one_line_error(lorareg("add", real_loras / "NOT-LORA_textual-inversion.safetensors"))
    truncated = lorareg("add", real_loras / "BAD_sdxl_diffusers-attnprocs_truncated-data.safetensors")
    assert truncated.code == 0 and "truncated" in truncated.err


CATALOG_SESSION = """
import sys
from lorareg.cli.main import main
def run(*args):
    try:
        main(list(args))
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
folder, lora = sys.argv[1], sys.argv[2]
run("scan", folder)
run("add", lora, "--name", "extra", "--tag", "t")
run("list"); run("list", "--json"); run("search", "extra"); run("show", "extra"); run("show", "extra", "--json")
run("tag", "extra", "+u"); run("lineage", "extra"); run("verify"); run("rm", "extra")
heavy = sorted(m for m in ("torch", "diffusers", "peft", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_catalog_commands_never_import_torch_diffusers_or_peft(tmp_path):
    write_small_loras(tmp_path / "loras", 3)
    lora = _lora(tmp_path, "x", 50)
    done = subprocess.run([sys.executable, "-c", CATALOG_SESSION, str(tmp_path / "loras"), str(lora)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


READING_SESSION = """
import sys
from lorareg.cli.main import main
for args in (["list"], ["list", "--json"], ["search", "x"], ["search", "lora", "--json"], ["scan", sys.argv[2]]):
    try:
        main(["--home", sys.argv[1], *args])
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
print("LOADED", sorted(m for m in ("loralib.formats", "numpy", "torch") if m in sys.modules))
"""


def test_listing_searching_and_rescanning_load_no_format_reader(tmp_path):
    """list and search read rows only, and a rescan of unchanged files only stats them: the format
    readers (and numpy) stay unloaded, which halves their start-up."""
    write_small_loras(tmp_path / "loras", 2)
    done = subprocess.run([sys.executable, "-m", "lorareg", "--home", str(tmp_path / "home"), "scan",
                           str(tmp_path / "loras")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = subprocess.run([sys.executable, "-c", READING_SESSION, str(tmp_path / "home"), str(tmp_path / "loras")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "LOADED []" in run.stdout


def test_database_errors_in_any_catalog_method_are_one_line_naming_the_file(tmp_path, monkeypatch):
    """No raw sqlite3 error leaves the Catalog: each becomes a CatalogError naming the database and what to do."""
    with Catalog(tmp_path) as catalog:
        for message, expected in (("attempt to write a readonly database", "is read-only"),
                                  ("database or disk is full", "Free some space"),
                                  ("database is locked", "locked by another lorareg"),
                                  ("database disk image is malformed", "it is damaged")):
            class Failing:
                def execute(self, *args, message=message):
                    raise (sqlite3.DatabaseError if "malformed" in message else sqlite3.OperationalError)(message)

            monkeypatch.setattr(catalog, "conn", Failing())
            with pytest.raises(CatalogError) as caught:
                catalog.list()
            text = str(caught.value)
            assert expected in text and str(catalog.path) in text and "\n" not in text
            assert isinstance(caught.value.__cause__, sqlite3.Error)
            monkeypatch.undo()


def test_a_read_only_catalog_gives_one_line(lorareg, tmp_path, monkeypatch):
    """A catalog that cannot be written: reading works; a write says so in one line naming the file.

    Tests run as root, which ignores file modes, so the connection is made read-only the way a
    read-only file makes it (SQLite then refuses every write with the same error).
    """
    import lorareg.registry.catalog as catalog_module
    from tests.helpers.small_loras import write_small_loras

    home = tmp_path / "ro"
    path = write_small_loras(tmp_path / "files", 1)[0]
    assert lorareg("--home", home, "add", path, "--name", "one").code == 0
    real = catalog_module.connect

    def read_only(db):
        connection = real(db)
        connection.execute("PRAGMA query_only = 1")
        return connection

    monkeypatch.setattr(catalog_module, "connect", read_only)
    assert lorareg("--home", home, "show", "one").code == 0
    res = lorareg("--home", home, "tag", "one", "+x")
    line = _one_line_error(res)
    assert "is read-only" in line and str(home / "catalog.db") in line
