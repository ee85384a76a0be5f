"""`push` and `pull` against the in-memory Hub test server (tests/helpers/hub_server.py), through the CLI.

No test reaches the network: the real huggingface_hub client talks to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import loralib
from loralib.files.hashes import hash_file
from lorareg.registry.catalog import Catalog
from lorareg.registry.hub import safe_repo_path
from tests.helpers.hub_server import HubServer
from tests.helpers.small_loras import sd1_attention_layers, small_lora_bytes

ALICE, BOB = "hf_alice_secret_token", "hf_bob_secret_token"
TRIGGER_META = {"modelspec.trigger_phrase": "pxl style", "ss_tag_frequency": json.dumps({"5_px": {"castle": 3}})}


@pytest.fixture
def hub(monkeypatch) -> Iterator[HubServer]:
    import huggingface_hub.constants

    # conftest sets HF_HUB_OFFLINE=1 for every test; huggingface_hub may have read it at import.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(tokens={ALICE: "alice", BOB: "bob"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", ALICE)
        yield server
        assert server.server_errors == []


@pytest.fixture
def pixel(lorareg, tmp_path) -> Path:
    """A catalog entry 'pixel-art' with tags, a trigger word and a sample image."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = tmp_path / "pixel.safetensors"
    path.write_bytes(small_lora_bytes(1, metadata=TRIGGER_META))
    sample = tmp_path / "castle.png"
    info = PngInfo()
    info.add_text("parameters", "a pxl style castle at dusk\nSteps: 20, Seed: 7")
    Image.new("RGB", (8, 8), "purple").save(sample, pnginfo=info)
    res = lorareg("add", path, "--name", "pixel-art", "--tag", "retro", "--trigger", "8bit", "--sample", sample,
                  "--description", "Crisp pixels")
    assert res.code == 0, res.err
    return path


def _one_line_error(result, *fragments: str) -> str:
    assert result.code == 1, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert ALICE not in result.err + result.out and BOB not in result.err + result.out
    return lines[0]


def _front_matter(readme: str) -> dict:
    """The card's metadata as huggingface_hub itself reads it."""
    from huggingface_hub import ModelCard

    assert readme.startswith("---\n")
    return ModelCard(readme).data.to_dict()


def test_push_then_pull_into_a_fresh_catalog_gives_the_identical_file_and_a_complete_entry(
        lorareg, hub, pixel, tmp_path, monkeypatch):
    res = lorareg("push", "pixel-art", "--repo", "alice/pixel-art-lora", "--json")
    assert res.code == 0, res.err
    pushed = json.loads(res.out)
    assert pushed["commit"] == hub.head("alice/pixel-art-lora")
    assert hub.list_files("alice/pixel-art-lora") == [".gitattributes", "README.md", "images/castle.png",
                                                      "pixel-art.safetensors"]
    assert hub.file_bytes("alice/pixel-art-lora", "pixel-art.safetensors") == pixel.read_bytes()
    assert json.loads(lorareg("show", "pixel-art", "--json").out)["hub"][0]["repo"] == "alice/pixel-art-lora"

    monkeypatch.delenv("HF_TOKEN")  # a public repo needs no token to pull
    fresh = tmp_path / "fresh"
    res = lorareg("--home", fresh, "pull", "alice/pixel-art-lora", "--json")
    assert res.code == 0, res.err
    pulled = json.loads(res.out)
    assert Path(pulled["path"]).read_bytes() == pixel.read_bytes()
    assert Path(pulled["path"]).is_relative_to(tmp_path.parent)  # in the test's HF cache
    entry = json.loads(lorareg("--home", fresh, "show", pulled["name"], "--json").out)
    original = json.loads(lorareg("show", "pixel-art", "--json").out)
    for key in ("hashes", "format", "architecture", "modules", "ranks", "alphas", "components", "dtype", "size",
                "metadata"):
        assert entry[key] == original[key], key
    assert entry["name"] == "pixel-art" and entry["tags"] == ["retro"]
    assert entry["triggers"][:2] == ["8bit", "pxl style"] and "castle" in entry["triggers"]
    assert (entry["source"], entry["source_repo"], entry["source_revision"]) == ("hub", "alice/pixel-art-lora", "main")
    assert entry["source_commit"] == pushed["commit"] and entry["source_file"] == "pixel-art.safetensors"
    again = lorareg("--home", fresh, "pull", "alice/pixel-art-lora")
    assert again.code == 0 and "already in the catalog" in again.out


def test_the_model_card_has_hub_metadata_usage_lineage_and_hashes(lorareg, hub, pixel):
    assert lorareg("push", "pixel-art", "--repo", "alice/card").code == 0
    readme = hub.file_bytes("alice/card", "README.md").decode()
    meta = _front_matter(readme)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers" and meta["license"] == "creativeml-openrail-m"
    assert meta["instance_prompt"] == "8bit"
    assert {"lora", "text-to-image", "diffusers", "template:sd-lora", "stable-diffusion", "retro"} <= set(meta["tags"])
    assert meta["widget"] == [{"text": "a pxl style castle at dusk", "output": {"url": "images/castle.png"}}]
    hashes = hash_file(pixel)
    for text in ('load_lora_weights(\'alice/card\', weight_name=\'pixel-art.safetensors\')', "ComfyUI", "LoraLoader",
                 "<lora:pixel-art:1>", "`pxl style`", "Crisp pixels", hashes.sha256, hashes.tensor_sha256[:12]):
        assert text in readme, text
    assert ("POST", "/api/validate-yaml") in hub.requests


def test_push_records_lineage_in_the_card_and_converts_extra_layouts(lorareg, hub, tmp_path):
    from loralib.synthetic import random_adapter

    layers = sd1_attention_layers(4)
    source = tmp_path / "src_diffusers.safetensors"
    loralib.save(random_adapter(layers, rank=4, seed=9, architecture="sd1"), source, "diffusers")
    assert lorareg("convert", source, "--to", "kohya", "-o", tmp_path / "made.safetensors").code == 0
    res = lorareg("push", "made", "--repo", "alice/made", "--also", "diffusers,peft", "--license", "mit")
    assert res.code == 0, res.err
    files = hub.list_files("alice/made")
    assert {"made.safetensors", "diffusers/pytorch_lora_weights.safetensors", "peft/adapter_model.safetensors",
            "peft/adapter_config.json"} <= set(files)
    readme = hub.file_bytes("alice/made", "README.md").decode()
    assert _front_matter(readme)["license"] == "mit"
    assert "## Lineage" in readme and "src_diffusers.safetensors" in readme and "convert (diffusers → kohya)" in readme
    res = lorareg("pull", "alice/made", "--file", "peft/adapter_model.safetensors", "--json")
    assert res.code == 0, res.err
    pulled = json.loads(res.out)
    assert Path(pulled["path"]).is_dir() and (Path(pulled["path"]) / "adapter_config.json").is_file()
    with Catalog() as catalog:
        entry = catalog.get(pulled["name"])
        assert entry.format == "peft" and entry.source_file == "peft/adapter_model.safetensors"
    assert pulled["name"] == "made-2"  # a generic file name: named after the repo, kept unique
    res = lorareg("pull", "alice/made", "--file", "diffusers/pytorch_lora_weights.safetensors", "--json")
    # The same tensors in the same order (scales live in the config / metadata): the same tensor hash, but
    # other key names, so another entry — recognised as the same adapter by its fingerprint.
    diffusers = json.loads(res.out)
    assert res.code == 0 and (diffusers["name"], diffusers["new"]) == ("made-3", True)
    assert diffusers["hashes"]["tensor_sha256"] == pulled["hashes"]["tensor_sha256"]
    shown = json.loads(lorareg("show", "made-3", "--json").out)
    assert {s["name"] for s in shown["same_adapter_as"]} == {"made", "made-2"}


def test_a_corrupted_download_is_rejected_deleted_and_nothing_is_registered(lorareg, hub, pixel, tmp_path):
    assert lorareg("push", "pixel-art", "--repo", "alice/p").code == 0
    hub.corrupt_file("alice/p", "pixel-art.safetensors")
    fresh = tmp_path / "fresh"
    _one_line_error(lorareg("--home", fresh, "pull", "alice/p"), "is corrupt", "SHA-256", "nothing was registered")
    assert json.loads(lorareg("--home", fresh, "list", "--json").out) == []
    repo_cache = Path(os.environ["HF_HOME"]) / "hub" / "models--alice--p"
    assert [p for p in repo_cache.rglob("*") if p.is_file() and p.stat().st_size == pixel.stat().st_size] == []
    hub.clear_corruption()  # the bad copy was deleted, so a retry downloads again and succeeds
    res = lorareg("--home", fresh, "pull", "alice/p", "--json")
    assert res.code == 0 and Path(json.loads(res.out)["path"]).read_bytes() == pixel.read_bytes()


def test_pull_never_writes_outside_its_destination_whatever_names_the_repo_holds(lorareg, hub, tmp_path):
    hub.create_repo("alice/evil")
    good = small_lora_bytes(3)
    hub.add_commit("alice/evil", {"../evil.safetensors": small_lora_bytes(4), "a/../../x.safetensors": small_lora_bytes(5),
                                  "/abs.safetensors": small_lora_bytes(6), "good.safetensors": good})
    target = tmp_path / "deep" / "loras"
    res = lorareg("pull", "alice/evil", "--dir", target, "--json")
    assert res.code == 0, res.err
    assert Path(json.loads(res.out)["path"]) == target / "good.safetensors"
    assert (target / "good.safetensors").read_bytes() == good
    for name in ("../evil.safetensors", "a/../../x.safetensors", "/abs.safetensors"):
        _one_line_error(lorareg("pull", "alice/evil", "--file", name, "--dir", target), "refusing the file name")
        _one_line_error(lorareg("pull", "alice/evil", "--file", name), "refusing the file name")
    written = {p.name for folder in (tmp_path, Path(os.environ["HF_HOME"])) for p in folder.rglob("*")}
    assert not written & {"evil.safetensors", "x.safetensors", "abs.safetensors"}
    hub.create_repo("alice/only-evil")
    hub.add_commit("alice/only-evil", {"../evil.safetensors": small_lora_bytes(4)})
    _one_line_error(lorareg("pull", "alice/only-evil"), "holds no .safetensors file", "1 file names pointing outside")
    assert not safe_repo_path("a\\..\\b") and not safe_repo_path("c:x") and safe_repo_path("sub/ok.safetensors")


def test_pull_pins_the_revision_it_resolves(lorareg, hub, tmp_path):
    hub.create_repo("alice/versions")
    first = hub.add_commit("alice/versions", {"v.safetensors": small_lora_bytes(10)})
    hub.add_commit("alice/versions", {"v.safetensors": small_lora_bytes(11)})
    res = json.loads(lorareg("pull", f"alice/versions@{first}", "--json").out)
    assert res["commit"] == first and Path(res["path"]).read_bytes() == small_lora_bytes(10)
    latest = json.loads(lorareg("pull", "alice/versions", "--json").out)
    assert latest["commit"] == hub.head("alice/versions") and Path(latest["path"]).read_bytes() == small_lora_bytes(11)
    with Catalog() as catalog:
        assert catalog.get(res["name"]).source_commit == first and catalog.count() == 2


def test_hub_ids_are_accepted_wherever_an_adapter_is(lorareg, hub, pixel, monkeypatch):
    assert lorareg("push", "pixel-art", "--repo", "alice/ref").code == 0
    assert lorareg("rm", "pixel-art").code == 0
    res = lorareg("inspect", "alice/ref@main", "--json", "--no-hash")
    assert res.code == 0, res.err
    assert json.loads(res.out)["format"] == "kohya"
    with Catalog() as catalog:
        assert catalog.get("pixel-art").source_repo == "alice/ref"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, the copy already pulled is used
    requests = len(hub.requests)
    assert lorareg("inspect", "alice/ref", "--json", "--no-hash").code == 0
    assert len(hub.requests) == requests
    _one_line_error(lorareg("inspect", "alice/never-pulled"), "HF_HUB_OFFLINE")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_failures_are_one_clear_line_and_never_show_the_token(lorareg, hub, pixel, monkeypatch):
    assert lorareg("push", "pixel-art", "--repo", "alice/exists").code == 0
    _one_line_error(lorareg("pull", "alice/nothing-here"), "was not found", "hf auth login")
    _one_line_error(lorareg("pull", "alice/exists@no-such-branch"), "revision 'no-such-branch' does not exist")
    _one_line_error(lorareg("pull", "alice/exists", "--file", "other.safetensors"), "has no file 'other.safetensors'")
    _one_line_error(lorareg("push", "pixel-art", "--repo", "bob/theirs"), "no permission", "403")
    monkeypatch.setenv("HF_TOKEN", "hf_forged_token")
    _one_line_error(lorareg("pull", "alice/exists"), "rejected the credentials", "401")
    monkeypatch.delenv("HF_TOKEN")
    _one_line_error(lorareg("push", "pixel-art", "--repo", "alice/new"), "rejected the credentials")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(lorareg("pull", "alice/exists"), "HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    _one_line_error(lorareg("pull", "alice/exists"), "cannot reach the Hub")
    _one_line_error(lorareg("pull", "not a repo id"), "is not a Hub repo id")
    with Catalog() as catalog:
        assert catalog.count() == 1


def test_private_repos_need_the_owners_token(lorareg, hub, pixel, monkeypatch):
    assert lorareg("push", "pixel-art", "--repo", "alice/secret", "--private").code == 0
    assert hub.repo_is_private("alice/secret")
    monkeypatch.setenv("HF_TOKEN", BOB)
    _one_line_error(lorareg("pull", "alice/secret"), "was not found", "private")
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert lorareg("pull", "alice/secret").code == 0


def test_push_uploads_every_sample_and_the_widget_uses_their_prompts(lorareg, hub, pixel, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    (tmp_path / "second").mkdir()
    other = tmp_path / "second" / "castle.png"  # the same file name as the first sample
    info = PngInfo()
    info.add_text("parameters", "a pxl style tower <lora:pixel-art:0.7>\nNegative prompt: blurry\nSteps: 4, Seed: 9")
    Image.new("RGB", (8, 8), "teal").save(other, pnginfo=info)
    assert lorareg("add", pixel, "--sample", other).code == 0
    assert lorareg("push", "pixel-art", "--repo", "alice/samples").code == 0
    files = hub.list_files("alice/samples")
    assert {"images/castle.png", "images/castle-2.png"} <= set(files)
    assert hub.file_bytes("alice/samples", "images/castle-2.png") == other.read_bytes()
    widget = _front_matter(hub.file_bytes("alice/samples", "README.md").decode())["widget"]
    assert widget == [{"text": "a pxl style castle at dusk", "output": {"url": "images/castle.png"}},
                      {"text": "a pxl style tower", "parameters": {"negative_prompt": "blurry"},
                       "output": {"url": "images/castle-2.png"}}]


def test_pull_and_push_report_their_progress(lorareg, hub, pixel, monkeypatch):
    import lorareg.cli.hub as cli_hub
    from lorareg.registry.hub import pull

    seen = []
    real_steps = cli_hub.steps

    def recording(enabled=True):
        seen.append(enabled)
        return real_steps(enabled)

    monkeypatch.setattr(cli_hub, "steps", recording)
    assert lorareg("push", "pixel-art", "--repo", "alice/progress").code == 0
    assert seen == [True]
    steps = []
    with Catalog() as catalog:
        pull(catalog, "alice/progress", progress=lambda *step: steps.append(step))
    size = pixel.stat().st_size
    assert steps[0][0] == "resolving alice/progress@main" and steps[-1][0] == "registering"
    downloads = [s for s in steps if s[0].startswith("downloading pixel-art.safetensors")]
    assert downloads[0][1:] == (0, size) and downloads[-1][1:] == (size, size)  # bytes received, as they came
