"""Outputs of convert/resize/merge are registered with their parents, and lineage shows the tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import loralib
from loralib.files.hashes import hash_file
from loralib.synthetic import random_adapter
from lorareg.registry.catalog import Catalog
from tests.helpers.small_loras import sd1_attention_layers


@pytest.fixture(scope="module")
def layers():
    return sd1_attention_layers()


@pytest.fixture
def chain(lorareg, layers, tmp_path):
    """convert (diffusers -> kohya), resize (8 -> 4), merge (0.7 resized + 0.3 other), through the CLI.

    The merge names its inputs by catalog name and by A1111 hash prefix, so resolve_adapter is exercised too.
    """
    original, other = tmp_path / "original_diffusers.safetensors", tmp_path / "other.safetensors"
    loralib.save(random_adapter(layers, rank=8, seed=1, architecture="sd1"), original, "diffusers")
    loralib.save(random_adapter(layers, rank=4, seed=2, architecture="sd1"), other)
    assert lorareg("add", other, "--name", "other-style").code == 0
    steps = [("convert", original, "--to", "kohya", "-o", tmp_path / "converted.safetensors"),
             ("resize", "converted", "--rank", "4", "-o", tmp_path / "small.safetensors"),
             ("merge", "small:0.7", f"{hash_file(other).tensor_sha256[:12]}:0.3", "-o", tmp_path / "merged.safetensors")]
    for step in steps:
        res = lorareg(*step)
        assert res.code == 0, res.err
        assert "registered as" in res.err
    return {"original": original, "other": other, "dir": tmp_path}


def test_lineage_of_a_merge_of_a_resize_of_a_conversion(lorareg, chain):
    tree = json.loads(lorareg("lineage", "merged", "--json").out)
    assert (tree["name"], tree["operation"], tree["in_catalog"]) == ("merged", "merge", True)
    assert [(p["name"], p["weight"], p["operation"]) for p in tree["parents"]] == [
        ("small", 0.7, "resize"), ("other-style", 0.3, None)]
    small = tree["parents"][0]
    assert small["params"]["rank"] == 4
    converted = small["parents"][0]
    assert (converted["name"], converted["operation"]) == ("converted", "convert")
    assert converted["params"]["from_format"] == "diffusers" and converted["params"]["to_format"] == "kohya"
    original = converted["parents"][0]
    assert (original["name"], original["in_catalog"], original["file"]) == (None, False, "original_diffusers.safetensors")
    assert original["tensor_sha256"] == hash_file(chain["original"]).tensor_sha256
    assert original["parents"] == [] and tree["parents"][1]["parents"] == []
    text = lorareg("lineage", "merged").out.splitlines()
    assert text[0].startswith("merged ← merge")
    assert text[1].startswith("├── 0.7 × small ← resize (rank=4")
    assert text[2].startswith("│   └── converted ← convert (diffusers → kohya)")
    assert text[3].startswith("│       └── original_diffusers.safetensors [") and "(not in the catalog)" in text[3]
    assert text[4].startswith("└── 0.3 × other-style")


def test_outputs_are_registered_with_operation_parameters_and_parents(lorareg, chain):
    merged = json.loads(lorareg("show", "merged", "--json").out)
    assert merged["source"] == "output" and merged["operation"]["operation"] == "merge"
    assert merged["operation"]["method"] == "concat"
    weights = [(p["name"], p["weight"], p["tensor_sha256"][:12]) for p in merged["parents"]]
    assert weights == [("small", 0.7, hash_file(chain["dir"] / "small.safetensors").tensor_sha256[:12]),
                       ("other-style", 0.3, hash_file(chain["other"]).tensor_sha256[:12])]
    assert merged["files"][0]["path"] == str(chain["dir"] / "merged.safetensors")
    assert json.loads(lorareg("show", "small", "--json").out)["children"] == ["merged"]
    converted = json.loads(lorareg("show", "converted", "--json").out)
    assert converted["parents"][0]["path"] == str(chain["original"])
    assert "lineage" in lorareg("show", "merged").out


def test_lineage_from_a_files_own_history_when_its_parents_are_not_in_the_catalog(lorareg, chain, tmp_path):
    fresh = tmp_path / "fresh-home"
    assert lorareg("--home", fresh, "add", chain["dir"] / "small.safetensors").code == 0
    tree = json.loads(lorareg("--home", fresh, "lineage", "small", "--json").out)
    assert (tree["name"], tree["operation"]) == ("small", "resize")
    converted = tree["parents"][0]
    assert (converted["in_catalog"], converted["from_history"], converted["operation"]) == (False, True, "convert")
    assert converted["tensor_sha256"] == hash_file(chain["dir"] / "converted.safetensors").tensor_sha256
    assert converted["parents"][0]["file"] == "original_diffusers.safetensors"
    assert "from the file's history" in lorareg("--home", fresh, "lineage", "small").out


def test_commands_accept_names_and_hash_prefixes_and_peft_outputs_resolve_to_their_folder(lorareg, chain, tmp_path):
    small = hash_file(chain["dir"] / "small.safetensors")
    for reference in ("small", small.tensor_sha256[:12], small.sha256[:10]):
        res = lorareg("inspect", reference, "--json", "--no-hash")
        assert res.code == 0 and json.loads(res.out)["path"] == str(chain["dir"] / "small.safetensors")
    res = lorareg("convert", "small", "--to", "peft", "-o", tmp_path / "small_peft")
    assert res.code == 0, res.err
    with Catalog() as catalog:
        entry = catalog.get("small_peft")
        assert entry.format == "peft" and catalog.local_path(entry) == tmp_path / "small_peft"
    assert json.loads(lorareg("inspect", "small_peft", "--json", "--no-hash").out)["format"] == "peft"
    line = lorareg("inspect", "no-such-adapter")
    assert line.code == 1 and "not a file, a catalog name, a hash prefix or a Hub repo id" in line.err


def test_register_output_accepts_paths_records_and_weights(tmp_path, layers):
    """The hook colleagues call: inputs as paths or records, weights separately, extra parameters kept."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    loralib.save(random_adapter(layers, rank=2, seed=3, architecture="sd1"), a)
    loralib.save(random_adapter(layers, rank=2, seed=4, architecture="sd1"), b)
    out = tmp_path / "trained.safetensors"
    loralib.save(random_adapter(layers, rank=2, seed=5, architecture="sd1"), out)
    sample = tmp_path / "sample.png"
    sample.write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature without text: no prompt
    operation = {"operation": "train", "inputs": [str(a), {"file": "dataset/", "images": 12}, Path(b)],
                 "weights": [0.5, None, 2], "config": {"rank": 2, "learning_rate": 1e-4}, "dataset": {"images": 12},
                 "samples": [sample, tmp_path / "gone.png"]}
    with Catalog() as catalog:
        entry = catalog.register_output(out, operation).entry
        parents = catalog.parents(entry)
        assert [(p.file, p.weight) for p in parents] == [("a.safetensors", 0.5), ("dataset/", None), ("b.safetensors", 2.0)]
        assert parents[0].tensor_sha256 == hash_file(a).tensor_sha256 and parents[1].tensor_sha256 is None
        assert entry.operation["config"] == {"rank": 2, "learning_rate": 1e-4}
        assert entry.operation["dataset"] == {"images": 12} and entry.operation["inputs"][1]["images"] == 12
        assert entry.samples == [{"path": str(sample), "prompt": None, "weight": 1.0, "source": "train"}]
        assert parents[0].identity == hash_file(a).identity and parents[0].name is None


@pytest.mark.parametrize("command", ["convert", "resize", "merge"])
def test_inputs_the_catalog_holds_unchanged_are_not_hashed_again(lorareg, layers, tmp_path, monkeypatch, command):
    import hashlib
    import os

    import loralib.files.hashes as hashes
    from loralib.metadata import history

    source = tmp_path / "source.safetensors"
    loralib.save(random_adapter(layers, rank=8, seed=3, architecture="sd1"), source)
    assert lorareg("add", source).code == 0
    hashed = []
    real = hashes.hash_adapter_files
    monkeypatch.setattr(hashes, "hash_adapter_files", lambda headers: hashed.extend(h.path for h in headers) or real(headers))
    arguments = {"convert": ["convert", source], "resize": ["resize", source, "--rank", "4"],
                 "merge": ["merge", f"{source}:0.5", f"{source}:0.5"]}[command]

    def run(output):
        result = lorareg(*arguments, "-o", output)
        assert result.code == 0, result.err
        (record,) = [r for r in history(loralib.load(output).metadata) if r["operation"] == command]
        return record["inputs"][0]

    recorded = run(tmp_path / "out1.safetensors")
    assert source not in hashed  # the catalog's hashes were used
    data = source.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    assert recorded["sha256"] == hashlib.sha256(data).hexdigest()  # and they are the file's
    assert recorded["tensor_sha256"] == hashlib.sha256(data[start:]).hexdigest()
    assert recorded["identity"] == hash_file(source).identity
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # changed since: hashed again
    assert run(tmp_path / "out2.safetensors")["tensor_sha256"] == recorded["tensor_sha256"]
    assert source in hashed


@pytest.mark.parametrize("named", ["folder", "weights file"])
def test_a_peft_folder_the_catalog_holds_unchanged_is_not_hashed_again(lorareg, layers, tmp_path, monkeypatch, named):
    import os

    import loralib.files.hashes as hashes
    from loralib.files.header import read_header
    from loralib.metadata import history

    folder = tmp_path / "peft_source"
    loralib.save(random_adapter(layers, rank=8, seed=4, architecture="sd1"), folder, "peft")
    weights = folder / "adapter_model.safetensors"
    assert lorareg("add", folder).code == 0
    hashed = []
    real = hashes.hash_adapter_files
    monkeypatch.setattr(hashes, "hash_adapter_files", lambda headers: hashed.extend(h.path for h in headers) or real(headers))
    given = folder if named == "folder" else weights

    def run(output):
        result = lorareg("convert", given, "--to", "kohya", "-o", output)
        assert result.code == 0, result.err
        (record,) = [r for r in history(loralib.load(output).metadata) if r["operation"] == "convert"]
        return record["inputs"][0]

    recorded = run(tmp_path / "out1.safetensors")
    assert weights not in hashed  # the catalog's hashes were used, and they are the folder's
    truth = hashes.hash_adapter_files([read_header(weights)])
    assert (recorded["identity"], recorded["tensor_sha256"], recorded["sha256"]) == \
        (truth.identity, truth.tensor_sha256, truth.sha256)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # changed since: hashed again
    assert run(tmp_path / "out2.safetensors")["identity"] == recorded["identity"]
    assert weights in hashed
