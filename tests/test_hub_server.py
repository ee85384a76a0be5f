"""Tests for the in-memory Hub test server, driven by the real ``huggingface_hub`` client.

Everything runs against 127.0.0.1; no test reaches the network.  Each test gets
its own server, its own ``HF_HOME`` and its own download cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url

from tests.helpers.hub_server import DEFAULT_GITATTRIBUTES, HubServer

ALICE_TOKEN = "hf_test_token_alice"
BOB_TOKEN = "hf_test_token_bob"
REPO = "alice/adapter"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with HubServer(tokens={ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
        assert server.server_errors == [], "the test hub raised unexpectedly:\n" + "\n".join(server.server_errors)


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=ALICE_TOKEN)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf_cache"


def _download(hub: HubServer, cache_dir: Path, filename: str, repo_id: str = REPO, **kwargs: object) -> bytes:
    kwargs.setdefault("token", False)
    path = hf_hub_download(repo_id, filename, endpoint=hub.url, cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]
    return Path(path).read_bytes()


def _raw(hub: HubServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """Plain urllib request (bypasses the client's own validation); returns (status, headers, body)."""
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# --------------------------------------------------------------------------- #
# Repos, auth and visibility
# --------------------------------------------------------------------------- #
def test_create_public_and_private_repos(hub: HubServer, api: HfApi) -> None:
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    assert str(url) == f"{hub.url}/{REPO}"
    private_url = api.create_repo("secret", private=True)  # namespace defaults to the token's user
    assert private_url.repo_id == "alice/secret"

    assert hub.repo_is_private("alice/secret") is True
    assert hub.repo_is_private(REPO) is False
    assert api.model_info("alice/secret").private is True
    assert api.model_info(REPO).private is False
    # Like the Hub, a new repo starts with one commit holding .gitattributes.
    assert [c.title for c in hub.commits(REPO)] == ["initial commit"]
    assert hub.file_bytes(REPO, ".gitattributes") == DEFAULT_GITATTRIBUTES


def test_create_existing_repo_conflicts_unless_exist_ok(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert len(hub.commits(REPO)) == 1


def test_create_repo_in_someone_elses_namespace_is_forbidden(hub: HubServer, api: HfApi) -> None:
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("bob/mine")
    assert excinfo.value.response.status_code == 403
    assert hub._store.get("bob/mine") is None


def test_whoami(hub: HubServer) -> None:
    assert HfApi(endpoint=hub.url, token=BOB_TOKEN).whoami()["name"] == "bob"
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub.url, token="hf_not_a_token").whoami()
    assert excinfo.value.response.status_code == 401


def test_write_without_or_with_bad_token_is_401(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.create_repo("alice/other")
    assert excinfo.value.response.status_code == 401
    impostor = HfApi(endpoint=hub.url, token="hf_forged")
    with pytest.raises(HfHubHTTPError) as excinfo:
        impostor.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert excinfo.value.response.status_code == 401
    assert excinfo.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert hub.list_files(REPO) == [".gitattributes"]


def test_other_user_cannot_write_to_public_repo(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    bob = HfApi(endpoint=hub.url, token=BOB_TOKEN)
    with pytest.raises(HfHubHTTPError) as excinfo:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert excinfo.value.response.status_code == 403
    assert len(hub.commits(REPO)) == 1


def test_private_repo_is_invisible_to_others(hub: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.create_repo("alice/secret", private=True)
    api.upload_file(path_or_fileobj=b"classified", path_in_repo="w.safetensors", repo_id="alice/secret")
    bob = HfApi(endpoint=hub.url, token=BOB_TOKEN)
    anonymous = HfApi(endpoint=hub.url, token=False)
    for client in (bob, anonymous):
        with pytest.raises(RepositoryNotFoundError):
            client.model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            client.list_repo_files("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, cache_dir, "w.safetensors", repo_id="alice/secret", token=BOB_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/secret")
    # ... while the owner sees and downloads it.
    assert _download(hub, cache_dir, "w.safetensors", repo_id="alice/secret", token=ALICE_TOKEN) == b"classified"


# --------------------------------------------------------------------------- #
# Pushing
# --------------------------------------------------------------------------- #
def test_upload_file_and_folder_build_history(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="adapter.safetensors", repo_id=REPO)
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "sub" / "extra.bin").write_bytes(b"\x00\x01\x02")
    second = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="add folder")

    assert len(first.oid) == 40 and len(second.oid) == 40 and first.oid != second.oid
    assert first.commit_url == f"{hub.url}/{REPO}/commit/{first.oid}"
    history = hub.commits(REPO)
    assert [c.oid for c in history[:2]] == [second.oid, first.oid]
    assert history[0].title == "add folder" and history[0].parent == first.oid and history[0].author == "alice"
    assert sorted(api.list_repo_files(REPO)) == [
        ".gitattributes",
        "adapter.safetensors",
        "adapter_config.json",
        "sub/extra.bin",
    ]
    assert hub.file_bytes(REPO, "sub/extra.bin") == b"\x00\x01\x02"
    top_level = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(REPO)}
    assert top_level == {
        ".gitattributes": "RepoFile",
        "adapter.safetensors": "RepoFile",
        "adapter_config.json": "RepoFile",
        "sub": "RepoFolder",
    }
    assert [entry.path for entry in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/extra.bin"]
    assert hub.file_bytes(REPO, "adapter.safetensors", revision=first.oid) == b"v1"
    assert ("POST", f"/api/models/{REPO}/preupload/main") in hub.requests
    assert ("POST", f"/api/models/{REPO}/commit/main") in hub.requests


def test_create_commit_with_deletions_and_unchanged_files(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    api.create_commit(
        REPO,
        [
            CommitOperationAdd("a.txt", b"A"),
            CommitOperationAdd("dir/b.txt", b"B"),
            CommitOperationAdd("dir/c.txt", b"C"),
        ],
        commit_message="three files",
    )
    api.create_commit(
        REPO,
        [
            CommitOperationDelete("a.txt"),
            CommitOperationDelete("dir/", is_folder=True),
            CommitOperationAdd("d.txt", b"D"),
        ],
        commit_message="shuffle",
    )
    assert hub.list_files(REPO) == [".gitattributes", "d.txt"]
    # Re-uploading identical content is skipped client-side thanks to the preupload "oid": no new commit.
    head = hub.head(REPO)
    assert api.upload_file(path_or_fileobj=b"D", path_in_repo="d.txt", repo_id=REPO).oid == head
    assert hub.head(REPO) == head
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("missing.txt")], commit_message="nope")
    assert hub.head(REPO) == head


def test_commit_to_missing_branch_or_repo(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/absent")
    api.create_branch(REPO, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="x.txt", repo_id=REPO, revision="dev")
    assert hub.file_bytes(REPO, "x.txt", revision="dev") == b"dev"
    assert "x.txt" not in hub.list_files(REPO)


def test_readme_front_matter_goes_through_validate_yaml(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    readme = b"---\nlicense: apache-2.0\ntags:\n  - lora\n  - stable-diffusion\n---\n# My adapter\n"
    api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=REPO)
    assert ("POST", "/api/validate-yaml") in hub.requests
    assert hub.file_bytes(REPO, "README.md") == readme

    head = hub.head(REPO)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: mit\n# never closed\n", path_in_repo="README.md", repo_id=REPO)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\n- just\n- a list\n---\n", path_in_repo="README.md", repo_id=REPO)
    assert hub.head(REPO) == head

    # A list at its key's own indentation is valid YAML (PyYAML and ModelCardData write it so).
    compact = b"---\nlicense: mit\ntags:\n- lora\n- text-to-image\nbase_model: a/b\n---\n"
    api.upload_file(path_or_fileobj=compact, path_in_repo="README.md", repo_id=REPO)
    assert hub.file_bytes(REPO, "README.md") == compact


def test_commit_endpoint_rejects_lfs_and_stores_odd_names_verbatim(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    auth = {"Authorization": f"Bearer {ALICE_TOKEN}", "Content-Type": "application/x-ndjson"}
    header = {"key": "header", "value": {"summary": "raw commit", "description": ""}}

    no_path = {"key": "file", "value": {"encoding": "base64", "content": ""}}
    status, _, body = _raw(hub, "POST", f"/api/models/{REPO}/commit/main", _ndjson(header, no_path), auth)
    assert status == 400 and "needs a string 'path'" in json.loads(body)["error"]

    lfs = {"key": "lfsFile", "value": {"path": "big.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 9}}
    status, _headers, body = _raw(hub, "POST", f"/api/models/{REPO}/commit/main", _ndjson(header, lfs), auth)
    assert status == 400
    assert "only accepts regular" in json.loads(body)["error"]

    # The client refuses to send such names, but the server keeps whatever a commit says.
    content = base64.b64encode(b"pwn").decode()
    evil = {"key": "file", "value": {"path": "../evil.safetensors", "encoding": "base64", "content": content}}
    status, _, body = _raw(hub, "POST", f"/api/models/{REPO}/commit/main", _ndjson(header, evil), auth)
    assert status == 200 and len(json.loads(body)["commitOid"]) == 40
    assert "../evil.safetensors" in api.list_repo_files(REPO)
    status, _, body = _raw(hub, "GET", f"/{REPO}/resolve/main/%2E%2E/evil.safetensors")
    assert (status, body) == (200, b"pwn")


def test_add_commit_hook_plants_arbitrary_paths(hub: HubServer, api: HfApi) -> None:
    hub.create_repo(REPO)
    oid = hub.add_commit(REPO, {"../escape.safetensors": b"1", "/abs/x.bin": b"2", "sub/dir/x.safetensors": b"3"})
    assert api.model_info(REPO).sha == oid
    assert set(api.list_repo_files(REPO)) >= {"../escape.safetensors", "/abs/x.bin", "sub/dir/x.safetensors"}
    assert hub.file_bytes(REPO, "sub/dir/x.safetensors") == b"3"


# --------------------------------------------------------------------------- #
# Pulling
# --------------------------------------------------------------------------- #
def test_model_info_sha_and_file_metadata(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    weights = b"\x10" * 300
    commit = api.upload_file(path_or_fileobj=weights, path_in_repo="adapter.safetensors", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="adapter_config.json", repo_id=REPO)

    latest = api.model_info(REPO)
    assert latest.sha == hub.head(REPO) != commit.oid
    assert api.model_info(REPO, revision=commit.oid).sha == commit.oid
    assert {s.rfilename for s in latest.siblings} == {".gitattributes", "adapter.safetensors", "adapter_config.json"}

    detailed = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    weights_info = detailed["adapter.safetensors"]
    assert weights_info.size == 300
    assert weights_info.lfs is not None and weights_info.lfs.sha256 == hashlib.sha256(weights).hexdigest()
    config_info = detailed["adapter_config.json"]
    assert config_info.lfs is None
    assert config_info.blob_id == hashlib.sha1(b"blob 2\0{}").hexdigest()

    tree = {entry.path: entry for entry in api.list_repo_tree(REPO, recursive=True)}
    assert tree["adapter.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    paths = api.get_paths_info(REPO, ["adapter.safetensors", "does-not-exist"])
    assert [p.path for p in paths] == ["adapter.safetensors"] and paths[0].size == 300


def test_hf_hub_download_at_branch_and_pinned_commit(hub: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.create_repo(REPO)
    old = api.upload_file(path_or_fileobj=b"old weights", path_in_repo="adapter.safetensors", repo_id=REPO)
    new = api.upload_file(path_or_fileobj=b"new weights!", path_in_repo="adapter.safetensors", repo_id=REPO)
    assert old.oid != new.oid

    assert _download(hub, cache_dir, "adapter.safetensors") == b"new weights!"
    assert _download(hub, cache_dir, "adapter.safetensors", revision=old.oid) == b"old weights"
    assert ("HEAD", f"/{REPO}/resolve/{old.oid}/adapter.safetensors") in hub.requests
    assert ("GET", f"/{REPO}/resolve/{old.oid}/adapter.safetensors") in hub.requests

    metadata = get_hf_file_metadata(hf_hub_url(REPO, "adapter.safetensors", endpoint=hub.url), token=False)
    assert metadata.commit_hash == new.oid
    assert metadata.etag == hashlib.sha256(b"new weights!").hexdigest()  # X-Linked-Etag for LFS-style files
    assert metadata.size == len(b"new weights!")
    api.upload_file(path_or_fileobj=b"plain", path_in_repo="notes.txt", repo_id=REPO)
    text_meta = get_hf_file_metadata(hf_hub_url(REPO, "notes.txt", endpoint=hub.url), token=False)
    assert text_meta.etag == hashlib.sha1(b"blob 5\0plain").hexdigest()  # git blob id for regular files


def test_snapshot_download(hub: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.create_repo(REPO)
    api.create_commit(
        REPO,
        [
            CommitOperationAdd("adapter.safetensors", b"W" * 64),
            CommitOperationAdd("cfg/adapter_config.json", b'{"r":4}'),
        ],
        commit_message="adapter",
    )
    folder = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=cache_dir, token=False))
    assert folder.name == hub.head(REPO)
    assert (folder / "adapter.safetensors").read_bytes() == b"W" * 64
    assert (folder / "cfg" / "adapter_config.json").read_bytes() == b'{"r":4}'
    assert (folder / ".gitattributes").read_bytes() == DEFAULT_GITATTRIBUTES


def test_missing_repo_revision_and_file_raise_typed_errors(hub: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nothing-here")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, cache_dir, "x.txt", repo_id="alice/nothing-here")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v999")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, cache_dir, "x.txt", revision="f" * 40)
    with pytest.raises(EntryNotFoundError):
        _download(hub, cache_dir, "missing.safetensors")
    status, headers, _ = _raw(hub, "HEAD", f"/{REPO}/resolve/main/missing.safetensors")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == hub.head(REPO)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).dataset_info(REPO)  # only model repos exist here


def test_range_requests(hub: HubServer, api: HfApi) -> None:
    hub.create_repo(REPO)
    hub.add_commit(REPO, {"data.bin": bytes(range(100))})
    status, headers, body = _raw(hub, "GET", f"/{REPO}/resolve/main/data.bin", headers={"Range": "bytes=10-19"})
    assert (status, body) == (206, bytes(range(10, 20)))
    assert headers["Content-Range"] == "bytes 10-19/100"
    status, _, body = _raw(hub, "GET", f"/{REPO}/resolve/main/data.bin", headers={"Range": "bytes=-5"})
    assert (status, body) == (206, bytes(range(95, 100)))
    status, headers, _ = _raw(hub, "GET", f"/{REPO}/resolve/main/data.bin", headers={"Range": "bytes=100-"})
    assert status == 416 and headers["Content-Range"] == "bytes */100"


# --------------------------------------------------------------------------- #
# Fault injection and out-of-process use
# --------------------------------------------------------------------------- #
def test_corrupt_file_serves_altered_bytes_with_original_metadata(hub: HubServer, api: HfApi, cache_dir: Path) -> None:
    api.create_repo(REPO)
    original = b"genuine adapter weights"
    api.upload_file(path_or_fileobj=original, path_in_repo="adapter.safetensors", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"clean", path_in_repo="other.txt", repo_id=REPO)
    hub.corrupt_file(REPO, "adapter.safetensors")

    served = _download(hub, cache_dir, "adapter.safetensors")
    assert served != original and len(served) == len(original)
    advertised = get_hf_file_metadata(hf_hub_url(REPO, "adapter.safetensors", endpoint=hub.url), token=False)
    assert advertised.etag == hashlib.sha256(original).hexdigest() != hashlib.sha256(served).hexdigest()
    assert advertised.size == len(original)
    assert hub.file_bytes(REPO, "adapter.safetensors") == original  # storage itself is untouched
    assert _download(hub, cache_dir, "other.txt") == b"clean"  # only the targeted file is altered

    # hf_hub_download itself only checks the size; a SHA-256 check (ours, or the opt-in
    # verify_repo_checksums) against the advertised metadata catches the tampering.
    snapshot_download(REPO, endpoint=hub.url, cache_dir=cache_dir, token=False)
    report = api.verify_repo_checksums(REPO, cache_dir=cache_dir)
    assert [(m["path"], m["algorithm"]) for m in report.mismatches] == [("adapter.safetensors", "sha256")]

    hub.corrupt_downloads = True
    assert _download(hub, cache_dir / "fresh", "other.txt") != b"clean"
    hub.clear_corruption()
    assert _download(hub, cache_dir / "fresh2", "adapter.safetensors") == original


def test_client_env_points_a_subprocess_at_the_server(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"from subprocess", path_in_repo="x.txt", repo_id=REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(hub.client_env(token=ALICE_TOKEN), HF_HOME=str(tmp_path / "sub_home"))
    script = (
        "from huggingface_hub import HfApi, hf_hub_download;"
        f"print(HfApi().whoami()['name']);"
        f"print(open(hf_hub_download('{REPO}', 'x.txt'), 'rb').read().decode())"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alice", "from", "subprocess"]
