"""A tiny, in-memory stand-in for the Hugging Face Hub HTTP API, for tests only.

This module is a *test helper*, not a Hub.  It implements just enough of the
Hub's HTTP protocol for the real ``huggingface_hub`` client (2.x) to create
repos, push commits and pull files from it over 127.0.0.1, so that lorareg's
``push``/``pull`` code can be exercised end to end without network access.
It uses the Python standard library only and keeps everything in memory: it
never writes files anywhere, whatever names a commit contains.

What it models
--------------
* Model repos (``/api/models/...``) and Space repos (``/api/spaces/...``, kept
  under the id ``spaces/<owner>/<name>`` in the test hooks, e.g.
  ``hub.list_files("spaces/alice/gallery")``); dataset/kernel routes answer
  404 ``RepoNotFound``.
* Git-like history: every commit has a 40-hex id and a parent; branches (at
  least ``main``) and tags point to commits; a revision is a branch name, a
  tag name or a full commit id.  Like the real Hub, a new repo starts with an
  "initial commit" that adds a standard ``.gitattributes``.
* Bearer-token auth from the ``tokens`` mapping.  Writes without a valid token
  answer 401, an unknown token answers 401 on every route, private repos are
  invisible (404 ``RepoNotFound``) to everyone but their owner, and writing to
  someone else's public repo answers 403.
* Uploads are always "regular" (base64 inside the NDJSON commit body); the
  preupload endpoint never asks for LFS/Xet, and ``lfsFile`` commit entries are
  rejected with a 400 that says so.
* Files matching a ``filter=lfs`` pattern of the commit's ``.gitattributes``
  (``*.safetensors``, ``*.bin``, ... by default) are *described* the way the
  Hub describes LFS files even though they were uploaded as regular blobs:
  the tree/paths-info entries and ``model_info(files_metadata=True)`` siblings
  carry an ``lfs`` block with the SHA-256, and ``HEAD/GET .../resolve/...``
  sends ``X-Linked-Etag: "<sha256>"`` and ``X-Linked-Size``.  Other files are
  described by their git blob SHA-1 (``ETag``), as on the Hub.
* Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers that
  ``huggingface_hub.utils.hf_raise_for_status`` maps to typed exceptions
  (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Test hooks
----------
``hub.requests`` (list of ``(method, path)``), ``hub.commits(repo_id)``,
``hub.file_bytes(repo_id, path, revision)``, ``hub.list_files(...)``,
``hub.add_commit(...)`` (plant any file names, e.g. ``../evil.safetensors``,
which the client itself refuses to send), ``hub.corrupt_downloads = True`` or
``hub.corrupt_file(repo_id, path)`` (file bodies are altered while the HEAD /
listing metadata still advertise the original size and hashes),
``hub.trickle_file(repo_id, path, interval)`` (the body is sent one byte per
``interval`` seconds, a download that stalls), and
``hub.server_errors`` (tracebacks of unexpected server-side exceptions).

Usage
-----
``huggingface_hub`` reads ``HF_ENDPOINT`` (and ``HF_HUB_DISABLE_XET``) once, at
import time, so inside the pytest process pass the endpoint explicitly; for a
subprocess (e.g. the CLI) use ``hub.client_env()``::

    import pytest
    from huggingface_hub import HfApi, hf_hub_download
    from tests.helpers.hub_server import HubServer

    @pytest.fixture
    def hub(tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        with HubServer(tokens={"hf_test_token": "alice"}) as server:
            monkeypatch.setenv("HF_ENDPOINT", server.url)  # for code that reads it late
            yield server

    def test_roundtrip(hub, tmp_path):
        api = HfApi(endpoint=hub.url, token="hf_test_token")
        api.create_repo("alice/demo")
        api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="alice/demo")
        path = hf_hub_download("alice/demo", "a.txt", endpoint=hub.url,
                               cache_dir=tmp_path / "cache", token=False)
        assert open(path, "rb").read() == b"hi"

    # For a subprocess: subprocess.run([...], env={**os.environ, **hub.client_env("hf_test_token")})

Always pass an explicit ``token=`` (a string, or ``False`` for anonymous) in
process: a token saved by ``hf auth login`` or set in ``HF_TOKEN`` would
otherwise be sent and rejected as invalid credentials.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import socket
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["DEFAULT_GITATTRIBUTES", "Blob", "CommitRecord", "HubError", "HubServer"]

#: Content of the ``.gitattributes`` that the initial commit of every repo adds.
#: Only the ``filter=lfs`` patterns matter here: they decide which files are
#: described as LFS files (SHA-256 metadata) by the listing and download routes.
DEFAULT_GITATTRIBUTES = (
    "".join(
        f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
        for pattern in (
            "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5",
            "*.joblib", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx",
            "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar",
            "*.safetensors", "saved_model/**/*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
            "*.xz", "*.zip", "*.zst", "*tfevents*", "*.gguf",
        )
    )
).encode()

_DEFAULT_BRANCH = "main"
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


# --------------------------------------------------------------------------- #
# Content model
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Blob:
    """Immutable file content together with the hashes the Hub advertises for it."""

    data: bytes
    git_sha1: str  #: git blob id of ``data`` (``sha1(b"blob <len>\\0" + data)``)
    sha256: str  #: hex SHA-256 of ``data`` (what the Hub reports for LFS files)

    @classmethod
    def of(cls, data: bytes) -> Blob:
        """Hash ``data`` once and wrap it."""
        return cls(data=data, git_sha1=_git_blob_id(data), sha256=hashlib.sha256(data).hexdigest())

    @property
    def size(self) -> int:
        """Length of the content in bytes."""
        return len(self.data)

    def lfs_pointer(self) -> bytes:
        """The git-LFS pointer file that would stand for this blob in a real git repo."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        ).encode()


@dataclass(frozen=True)
class CommitRecord:
    """One commit of a repo's history, as kept by the server."""

    oid: str  #: 40-hex commit id
    parent: str | None  #: id of the parent commit (``None`` for the initial commit)
    author: str  #: user name of the committer
    title: str  #: commit summary
    description: str  #: commit description (may be empty)
    created_at: datetime  #: UTC time of the commit
    files: Mapping[str, Blob]  #: full snapshot: path in repo -> content (read-only)


def _git_blob_id(data: bytes) -> str:
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def _iso(moment: datetime) -> str:
    """Format a datetime the way the Hub does (``2024-01-31T12:00:00.000Z``)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _lfs_patterns(files: Mapping[str, Blob]) -> list[str]:
    """Patterns marked ``filter=lfs`` in the snapshot's root ``.gitattributes``."""
    attributes = files.get(".gitattributes")
    if attributes is None:
        return []
    patterns = []
    for line in attributes.data.decode("utf-8", errors="replace").splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _is_lfs_path(path: str, patterns: Iterable[str]) -> bool:
    """Approximate gitattributes matching: slash-less patterns match the base name."""
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(path, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern.strip("/")):
            return True
    return False


class HubError(Exception):
    """An HTTP error answer, shaped like the Hub's (JSON body + error headers)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra_body = extra
        self.headers: dict[str, str] = {}


def _repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _entry_not_found(path: str, revision: str, commit: str | None = None) -> HubError:
    error = HubError(404, f"Entry not found: '{path}' does not exist at revision '{revision}'", "EntryNotFound")
    if commit is not None:
        error.headers["X-Repo-Commit"] = commit
    return error


@dataclass
class _Repo:
    repo_id: str
    owner: str
    private: bool
    created_at: datetime
    object_id: str
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    sdk: str | None = None  #: Spaces only: gradio, docker or static


class _RepoStore:
    """Thread-safe in-memory repos with commit history.  Knows nothing about HTTP."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._sequence = itertools.count()

    # -- repos ------------------------------------------------------------ #
    def get(self, repo_id: str) -> _Repo | None:
        with self.lock:
            return self._repos.get(repo_id)

    def create(self, repo_id: str, owner: str, private: bool, sdk: str | None = None) -> _Repo:
        with self.lock:
            if repo_id in self._repos:
                raise HubError(409, "You already created this model repo")
            now = datetime.now(UTC)
            object_id = hashlib.sha1(f"{repo_id}:{next(self._sequence)}".encode()).hexdigest()[:24]
            repo = _Repo(repo_id=repo_id, owner=owner, private=private, created_at=now, object_id=object_id, sdk=sdk)
            self._repos[repo_id] = repo
            gitattributes = {".gitattributes": Blob.of(DEFAULT_GITATTRIBUTES)}
            initial = self._new_commit(repo, None, owner, "initial commit", "", gitattributes)
            repo.branches[_DEFAULT_BRANCH] = initial.oid
            return repo

    def delete(self, repo_id: str) -> None:
        with self.lock:
            self._repos.pop(repo_id, None)

    # -- revisions -------------------------------------------------------- #
    def resolve(self, repo: _Repo, revision: str) -> CommitRecord:
        """Branch, tag or full commit id -> commit; raises RevisionNotFound."""
        with self.lock:
            name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
            oid = repo.branches.get(name) or repo.tags.get(name)
            if oid is None and len(revision) == 40 and revision.lower() in repo.commits:
                oid = revision.lower()
            if oid is None:
                raise _revision_not_found(revision)
            return repo.commits[oid]

    def history(self, repo: _Repo, start: CommitRecord) -> list[CommitRecord]:
        """``start`` and its ancestors, newest first."""
        with self.lock:
            chain = [start]
            while chain[-1].parent is not None:
                chain.append(repo.commits[chain[-1].parent])
            return chain

    # -- writing ---------------------------------------------------------- #
    def commit(
        self,
        repo: _Repo,
        branch: str,
        *,
        author: str,
        title: str,
        description: str = "",
        additions: Mapping[str, bytes] | None = None,
        deleted_files: Iterable[str] = (),
        deleted_folders: Iterable[str] = (),
        parent_commit: str | None = None,
    ) -> CommitRecord:
        """Apply deletions then additions on top of ``branch`` and advance it."""
        with self.lock:
            if branch not in repo.branches:
                raise _revision_not_found(branch)
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and parent_commit.lower() != head.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for path in deleted_files:
                if files.pop(path, None) is None:
                    raise _entry_not_found(path, branch)
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(prefix)]
                if not doomed:
                    raise _entry_not_found(folder, branch)
                for path in doomed:
                    del files[path]
            for path, data in (additions or {}).items():
                files[_checked_path(path)] = Blob.of(data)
            record = self._new_commit(repo, head.oid, author, title, description, files)
            repo.branches[branch] = record.oid
            return record

    def _new_commit(
        self,
        repo: _Repo,
        parent: str | None,
        author: str,
        title: str,
        description: str,
        files: Mapping[str, Blob],
    ) -> CommitRecord:
        now = datetime.now(UTC)
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_id}\n{parent}\n{author}\n{_iso(now)}\n{next(self._sequence)}\n".encode())
        digest.update(f"{title}\n{description}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].git_sha1}\n".encode())
        record = CommitRecord(
            oid=digest.hexdigest(),
            parent=parent,
            author=author,
            title=title,
            description=description,
            created_at=now,
            files=MappingProxyType(dict(files)),
        )
        repo.commits[record.oid] = record
        return record


def _checked_path(path: str) -> str:
    """Accept any name the Hub would store verbatim (``../x`` included); refuse only unusable ones."""
    if not path or "\0" in path or path.endswith("/"):
        raise HubError(400, f"Invalid file path in commit: {path!r}")
    return path


# --------------------------------------------------------------------------- #
# HTTP layer
# --------------------------------------------------------------------------- #
@dataclass
class _Request:
    method: str
    path: str  #: raw (still percent-encoded) URL path
    segments: list[str]  #: path split on "/" and percent-decoded segment by segment
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    user: str | None

    def flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and values[-1].lower() in ("1", "true", "yes")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise HubError(400, f"Request body is not valid JSON: {exc}") from exc


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    trickle: float | None = None  #: send the body one byte per this many seconds

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> _Response:
        return cls(status, json.dumps(payload).encode(), [("Content-Type", "application/json"), *headers])

    @classmethod
    def error(cls, error: HubError) -> _Response:
        headers = [("X-Error-Message", error.message), *error.headers.items()]
        if error.error_code is not None:
            headers.append(("X-Error-Code", error.error_code))
        return cls.json({"error": error.message, **error.extra_body}, error.status, headers)


class _HubApi:
    """Routes Hub-protocol requests to the store and shapes the JSON answers."""

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        self.store = hub._store

    # -- entry point ------------------------------------------------------ #
    def handle(self, request: _Request) -> _Response:
        seg = request.segments
        method = request.method
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami(request)
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(request)
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(request)
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(request)
            if rest[:1] == ["spaces"] and len(rest) >= 3:
                return self._model_route(request, f"spaces/{rest[1]}/{rest[2]}", rest[3:])
            if rest[:1] in (["datasets"], ["spaces"], ["kernels"]):
                raise _repo_not_found()
            if rest[:1] == ["models"] and len(rest) >= 3:
                return self._model_route(request, f"{rest[1]}/{rest[2]}", rest[3:])
            if rest[:1] == ["models"] and len(rest) == 2:
                raise _repo_not_found()  # canonical single-segment ids ("gpt2") do not exist here
            raise HubError(404, "Not Found")
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            if seg[0] in ("datasets", "spaces", "kernels"):
                raise _repo_not_found()
            return self._resolve(request, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        if "resolve" in seg[1:3]:
            raise _repo_not_found()
        raise HubError(404, "Not Found")

    def _model_route(self, request: _Request, repo_id: str, rest: list[str]) -> _Response:
        method, action = request.method, (rest[0] if rest else "")
        if method == "GET" and not rest:
            return self._model_info(request, repo_id, None)
        if method == "GET" and action == "revision" and len(rest) >= 2:
            return self._model_info(request, repo_id, "/".join(rest[1:]))
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(request, repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            return self._paths_info(request, repo_id, rest[1])
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._preupload(request, repo_id, rest[1])
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self._commit(request, repo_id, rest[1])
        if method == "GET" and rest == ["refs"]:
            return self._refs(request, repo_id)
        if method == "GET" and action == "commits" and len(rest) == 2:
            return self._list_commits(request, repo_id, rest[1])
        if action == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._branch(request, repo_id, rest[1])
        if action == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._tag(request, repo_id, rest[1])
        raise HubError(404, "Not Found")

    # -- access control --------------------------------------------------- #
    def _readable(self, request: _Request, repo_id: str) -> _Repo:
        repo = self.store.get(repo_id)
        if repo is None or (repo.private and request.user != repo.owner):
            raise _repo_not_found()
        return repo

    def _require_user(self, request: _Request) -> str:
        if request.user is None:
            raise HubError(401, "Unauthorized: a valid access token is required for this operation")
        return request.user

    def _writable(self, request: _Request, repo_id: str) -> tuple[_Repo, str]:
        user = self._require_user(request)
        repo = self._readable(request, repo_id)
        if repo.owner != user:
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo, user

    # -- account and repos ------------------------------------------------ #
    def _whoami(self, request: _Request) -> _Response:
        user = self._require_user(request)
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": "test token",
                        "role": "write",
                        "createdAt": _iso(self.hub.started_at),
                    },
                },
            }
        )

    def _create_repo(self, request: _Request) -> _Response:
        user = self._require_user(request)
        payload = request.json() or {}
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "space"):
            raise HubError(400, f"This test hub only hosts model and space repos, not '{repo_type}' repos")
        if repo_type == "space" and payload.get("sdk") not in ("gradio", "docker", "static"):
            raise HubError(400, f"Invalid Space SDK: {payload.get('sdk')!r}")
        name, namespace = payload.get("name"), payload.get("organization") or user
        if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace '{namespace}'")
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private"))
        repo_id = f"{namespace}/{name}" if repo_type == "model" else f"spaces/{namespace}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        try:
            repo = self.store.create(repo_id, user, private, payload.get("sdk") if repo_type == "space" else None)
        except HubError as error:
            error.extra_body["url"] = url
            raise
        return _Response.json({"url": url, "name": repo_id, "id": repo.object_id})

    def _delete_repo(self, request: _Request) -> _Response:
        user = self._require_user(request)
        payload = request.json() or {}
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        self._writable(request, repo_id)
        self.store.delete(repo_id)
        return _Response.json({})

    def _validate_yaml(self, request: _Request) -> _Response:
        content = (request.json() or {}).get("content")
        if not isinstance(content, str):
            raise HubError(400, "'content' must be a string")
        errors, warnings = _check_front_matter(content)
        status = 400 if errors else 200
        return _Response.json(
            {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}, status
        )

    # -- reading ---------------------------------------------------------- #
    def _model_info(self, request: _Request, repo_id: str, revision: str | None) -> _Response:
        repo = self._readable(request, repo_id)
        commit = self.store.resolve(repo, revision or _DEFAULT_BRANCH)
        patterns = _lfs_patterns(commit.files)
        with_blobs = request.flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                blob = commit.files[path]
                sibling["size"] = blob.size
                if _is_lfs_path(path, patterns):
                    sibling["blobId"] = _git_blob_id(blob.lfs_pointer())
                    sibling["lfs"] = {"sha256": blob.sha256, "size": blob.size, "pointerSize": len(blob.lfs_pointer())}
                else:
                    sibling["blobId"] = blob.git_sha1
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": repo.object_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": _iso(commit.created_at),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(blob.size for blob in commit.files.values()),
        }
        if repo.sdk:
            info["sdk"] = repo.sdk
        wanted = request.query.get("expand") or request.query.get("expand[]")
        if wanted:
            info = {key: value for key, value in info.items() if key in {"_id", "id", *wanted}}
        return _Response.json(info)

    def _tree(self, request: _Request, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._readable(request, repo_id)
        commit = self.store.resolve(repo, revision)
        path = path.strip("/")
        folders = _folders(commit.files)
        if path and path not in folders:
            raise _entry_not_found(path, revision, commit.oid)
        prefix = f"{path}/" if path else ""
        recursive = request.flag("recursive")
        entries = []
        for folder in sorted(folders):
            if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix):]):
                entries.append(self._entry(repo, commit, folder, is_folder=True, expand=request.flag("expand")))
        for file_path in sorted(commit.files):
            if file_path.startswith(prefix) and (recursive or "/" not in file_path[len(prefix):]):
                entries.append(self._entry(repo, commit, file_path, is_folder=False, expand=request.flag("expand")))
        return _Response.json(entries)

    def _paths_info(self, request: _Request, repo_id: str, revision: str) -> _Response:
        repo = self._readable(request, repo_id)
        commit = self.store.resolve(repo, revision)
        if request.headers.get_content_type() == "application/json":
            payload = request.json() or {}
            paths, expand = list(payload.get("paths") or []), bool(payload.get("expand"))
        else:
            form = parse_qs(request.body.decode("utf-8"), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() in ("1", "true")
        folders = _folders(commit.files)
        entries = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in commit.files:
                entries.append(self._entry(repo, commit, path, is_folder=False, expand=expand))
            elif path in folders:
                entries.append(self._entry(repo, commit, path, is_folder=True, expand=expand))
        return _Response.json(entries)

    def _entry(self, repo: _Repo, commit: CommitRecord, path: str, *, is_folder: bool, expand: bool) -> dict[str, Any]:
        if is_folder:
            folder_id = _folder_id(commit.files, path)
            entry: dict[str, Any] = {"type": "directory", "oid": folder_id, "size": 0, "path": path}
        else:
            blob = commit.files[path]
            entry = {"type": "file", "oid": blob.git_sha1, "size": blob.size, "path": path}
            if _is_lfs_path(path, _lfs_patterns(commit.files)):
                pointer = blob.lfs_pointer()
                entry["oid"] = _git_blob_id(pointer)
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(pointer)}
        if expand:
            last = self._last_change(repo, commit, path, is_folder)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": _iso(last.created_at)}
        return entry

    def _last_change(self, repo: _Repo, commit: CommitRecord, path: str, is_folder: bool) -> CommitRecord:
        def state(record: CommitRecord) -> Any:
            if is_folder:
                return _folder_id(record.files, path) if path in _folders(record.files) else None
            blob = record.files.get(path)
            return None if blob is None else blob.git_sha1

        chain = self.store.history(repo, commit)
        current = state(chain[0])
        for newer, older in itertools.pairwise(chain):
            if state(older) != current:
                return newer
        return chain[-1]

    def _refs(self, request: _Request, repo_id: str) -> _Response:
        repo = self._readable(request, repo_id)
        with self.store.lock:
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
            ]
            tags = [
                {"name": name, "ref": f"refs/tags/{name}", "targetCommit": oid} for name, oid in sorted(repo.tags.items())
            ]
        return _Response.json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def _list_commits(self, request: _Request, repo_id: str, revision: str) -> _Response:
        repo = self._readable(request, repo_id)
        chain = self.store.history(repo, self.store.resolve(repo, revision))
        return _Response.json(
            [
                {
                    "id": record.oid,
                    "authors": [{"user": record.author, "avatar": ""}],
                    "date": _iso(record.created_at),
                    "title": record.title,
                    "message": record.description,
                }
                for record in chain
            ]
        )

    def _resolve(self, request: _Request, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._readable(request, repo_id)
        commit = self.store.resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _entry_not_found(path, revision, commit.oid)
        headers = [
            ("X-Repo-Commit", commit.oid),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", "application/octet-stream"),
        ]
        if _is_lfs_path(path, _lfs_patterns(commit.files)):
            headers += [
                ("ETag", f'"{_git_blob_id(blob.lfs_pointer())}"'),
                ("X-Linked-Etag", f'"{blob.sha256}"'),
                ("X-Linked-Size", str(blob.size)),
            ]
        else:
            headers.append(("ETag", f'"{blob.git_sha1}"'))
        if request.method == "HEAD":
            # Metadata always describes the real stored file, even when bodies are corrupted.
            return _Response(200, b"", [*headers, ("Content-Length", str(blob.size))])
        body = self.hub._served_bytes(repo.repo_id, path, blob.data)
        response = _ranged(body, request.headers.get("Range"), headers)
        response.trickle = self.hub._trickled.get((repo.repo_id, path))
        return response

    # -- writing ---------------------------------------------------------- #
    def _branch_for_write(self, repo: _Repo, revision: str, request: _Request) -> str:
        if request.flag("create_pr"):
            raise HubError(400, "This test hub does not support pull requests (create_pr)")
        branch = revision.removeprefix("refs/heads/")
        with self.store.lock:
            if branch not in repo.branches:
                raise _revision_not_found(revision)
        return branch

    def _preupload(self, request: _Request, repo_id: str, revision: str) -> _Response:
        repo, _ = self._writable(request, repo_id)
        branch = self._branch_for_write(repo, revision, request)
        head = self.store.resolve(repo, branch)
        files = (request.json() or {}).get("files")
        if not isinstance(files, list):
            raise HubError(400, "'files' must be a list")
        answers = []
        for item in files:
            path = item.get("path") if isinstance(item, dict) else None
            if not isinstance(path, str):
                raise HubError(400, "each file needs a 'path'")
            answer: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            existing = head.files.get(path)
            if existing is not None:
                # The client compares this with the git blob id of its local file to skip unchanged files.
                answer["oid"] = existing.git_sha1
            answers.append(answer)
        return _Response.json({"files": answers, "commitOid": head.oid})

    def _commit(self, request: _Request, repo_id: str, revision: str) -> _Response:
        repo, user = self._writable(request, repo_id)
        branch = self._branch_for_write(repo, revision, request)
        header: dict[str, Any] | None = None
        additions: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for number, line in enumerate(request.body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as exc:
                raise HubError(400, f"Malformed NDJSON commit payload at line {number}") from exc
            if not isinstance(value, dict):
                raise HubError(400, f"The 'value' of line {number} must be an object")
            path = value.get("path")
            if key != "header" and not isinstance(path, str):
                raise HubError(400, f"Line {number} ({key!r}) needs a string 'path'")
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported file encoding {value.get('encoding')!r}")
                try:
                    additions[path] = base64.b64decode(value["content"], validate=True)
                except (ValueError, KeyError, TypeError) as exc:
                    raise HubError(400, f"Invalid base64 'content' for '{path}' at line {number}") from exc
            elif key == "deletedFile":
                deleted_files.append(path)
            elif key == "deletedFolder":
                deleted_folders.append(path)
            elif key == "lfsFile":
                raise HubError(
                    400,
                    f"LFS upload of '{path}' refused: this test hub only accepts regular (base64) files"
                    " and always answers uploadMode=regular in preupload",
                )
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        if header is None or not str(header.get("summary") or "").strip():
            raise HubError(400, "The commit payload must start with a header carrying a non-empty summary")
        record = self.store.commit(
            repo,
            branch,
            author=user,
            title=str(header["summary"]),
            description=str(header.get("description") or ""),
            additions=additions,
            deleted_files=deleted_files,
            deleted_folders=deleted_folders,
            parent_commit=header.get("parentCommit"),
        )
        return _Response.json(
            {
                "success": True,
                "commitOid": record.oid,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{record.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _branch(self, request: _Request, repo_id: str, branch: str) -> _Response:
        repo, _ = self._writable(request, repo_id)
        if request.method == "DELETE":
            with self.store.lock:
                if branch == _DEFAULT_BRANCH:
                    raise HubError(403, "The default branch cannot be deleted")
                if repo.branches.pop(branch, None) is None:
                    raise _revision_not_found(branch)
            return _Response.json({})
        start = (request.json() or {}).get("startingPoint") or _DEFAULT_BRANCH
        target = self.store.resolve(repo, start)
        with self.store.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = target.oid
        return _Response.json({})

    def _tag(self, request: _Request, repo_id: str, name: str) -> _Response:
        repo, _ = self._writable(request, repo_id)
        if request.method == "DELETE":
            with self.store.lock:
                if repo.tags.pop(name, None) is None:
                    raise _revision_not_found(name)
            return _Response.json({})
        tag = (request.json() or {}).get("tag")
        if not isinstance(tag, str) or not tag:
            raise HubError(400, "'tag' is required")
        target = self.store.resolve(repo, name)  # for POST, the URL segment is the revision to tag
        with self.store.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = target.oid
        return _Response.json({})


def _folders(files: Iterable[str]) -> set[str]:
    """Every folder that contains at least one file (no empty names)."""
    folders: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            if parts[depth - 1]:
                folders.add("/".join(parts[:depth]))
    return folders


def _folder_id(files: Mapping[str, Blob], folder: str) -> str:
    prefix = folder + "/"
    digest = hashlib.sha1(b"tree\0")
    for path in sorted(p for p in files if p.startswith(prefix)):
        digest.update(f"{path}\0{files[path].git_sha1}\n".encode())
    return digest.hexdigest()


def _ranged(body: bytes, range_header: str | None, headers: list[tuple[str, str]]) -> _Response:
    """Answer a GET, honouring a single ``bytes=`` range; other range forms get the whole body."""
    total = len(body)
    if range_header and range_header.startswith("bytes=") and "," not in range_header:
        start_text, _, end_text = range_header[len("bytes="):].strip().partition("-")
        try:
            if start_text:
                start = int(start_text)
                end = min(int(end_text), total - 1) if end_text else total - 1
            else:
                start, end = max(total - int(end_text), 0), total - 1
        except ValueError:
            start, end = 0, total - 1
            range_header = None
        if range_header is not None:
            if start >= total or start > end:
                return _Response(416, b"", [*headers, ("Content-Range", f"bytes */{total}")])
            part = body[start : end + 1]
            return _Response(206, part, [*headers, ("Content-Range", f"bytes {start}-{end}/{total}")])
    return _Response(200, body, headers)


def _check_front_matter(content: str) -> tuple[list[str], list[str]]:
    """Rough, stdlib-only check of a README's YAML front matter -> (errors, warnings).

    Mirrors what the Hub reports: a missing or empty block is only a warning; an
    unterminated block or one whose top level is not a ``key: value`` mapping is an
    error.  It is a heuristic, not a YAML parser.
    """
    lines = content.splitlines()
    if not lines or lines[0].strip() != "---":
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        end = next(i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---")
    except StopIteration:
        return ["YAML metadata block is not closed by a '---' line"], []
    block = [line for line in lines[1:end] if line.strip() and not line.lstrip().startswith("#")]
    if not block:
        return [], ["empty or missing yaml metadata in repo card"]
    errors = []
    seen_key = False
    for number, line in enumerate(lines[1:end], start=2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = line[: len(line) - len(line.lstrip())]
        if "\t" in indent:
            errors.append(f"line {number}: tabs are not allowed for YAML indentation")
        elif indent:
            if not seen_key:
                errors.append(f"line {number}: indented content before any top-level key")
        elif line.startswith("- ") or line.rstrip() == "-":
            # A block sequence may sit at its key's own indentation (what PyYAML and
            # huggingface_hub's ModelCardData write): valid as the value of the key above.
            if not seen_key:
                errors.append(f"line {number}: a list item before any top-level key")
        else:
            key, colon, rest = line.partition(":")
            if not colon or not key.strip() or key.startswith(("-", "[", "{")) or (rest and not rest[0].isspace()):
                errors.append(f"line {number}: metadata must be a mapping of 'key: value' entries")
            else:
                seen_key = True
    return errors, []


class _Handler(BaseHTTPRequestHandler):
    """Per-connection request handler; all behaviour lives in :class:`_HubApi`."""

    server: _HttpServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections give up eventually
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests inspect ``hub.requests`` instead."""

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        hub._record(self.command, split.path)
        try:
            body = self._read_body()
            user = hub._authenticate(self.headers.get("Authorization"))
            request = _Request(
                method=self.command,
                path=split.path,
                segments=[unquote(part) for part in split.path.strip("/").split("/")],
                query=parse_qs(split.query, keep_blank_values=True),
                headers=self.headers,
                body=body,
                user=user,
            )
            response = hub._api.handle(request)
        except HubError as error:
            response = _Response.error(error)
        except Exception:  # a bug in this helper: report it loudly, keep serving
            hub._record_error(traceback.format_exc())
            response = _Response.error(HubError(500, "Internal error in the test hub (see hub.server_errors)"))
        self._send(response)

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        names = {name.lower() for name, _ in response.headers}
        for name, value in response.headers:
            self.send_header(name, value)
        if "content-length" not in names:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            if response.trickle is None:
                self.wfile.write(response.body)
                return
            for position in range(len(response.body)):  # until the client gives up or the server stops
                if self.server.stopping.wait(response.trickle):
                    return
                try:
                    self.wfile.write(response.body[position:position + 1])
                    self.wfile.flush()
                except OSError:
                    return


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Unblock handler threads parked on idle keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --------------------------------------------------------------------------- #
# Public object
# --------------------------------------------------------------------------- #
class HubServer:
    """An in-memory Hub-protocol server on ``127.0.0.1`` for tests.

    Args:
        tokens: valid bearer tokens mapped to the user name they authenticate.
        host: interface to bind (keep the default).
        port: TCP port; ``0`` picks a free one.

    Use it as a context manager (``with HubServer(...) as hub: hub.url``) or call
    :meth:`start` / :meth:`stop`.  See the module docstring for a fixture example.
    """

    def __init__(self, tokens: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        #: When true, every file body served by ``GET .../resolve/...`` is altered
        #: (same length) while HEAD and listings keep advertising the original.
        self.corrupt_downloads: bool = False
        #: ``(method, raw URL path)`` of every request received, in order.
        self.requests: list[tuple[str, str]] = []
        #: Tracebacks of unexpected exceptions raised while serving (should stay empty).
        self.server_errors: list[str] = []
        self.started_at = datetime.now(UTC)
        self._host, self._port = host, port
        self._store = _RepoStore()
        self._api = _HubApi(self)
        self._corrupted: dict[tuple[str, str], bytes | None] = {}
        self._trickled: dict[tuple[str, str], float] = {}
        self._log_lock = threading.Lock()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------- #
    def start(self) -> HubServer:
        """Bind the socket and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("HubServer already started")
        self._server = _HttpServer((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="HubServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (and any idle client connections)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` / ``endpoint=`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("HubServer is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables pointing a *new* process's ``huggingface_hub`` here.

        Merge into ``os.environ`` for a subprocess; also make sure ``HF_HUB_OFFLINE``
        is not set there.  ``token`` becomes ``HF_TOKEN`` when given.
        """
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    # -- direct state access (bypasses HTTP and auth) --------------------- #
    def create_repo(self, repo_id: str, *, private: bool = False, owner: str | None = None) -> None:
        """Create ``repo_id`` (with its initial commit); the owner defaults to the namespace."""
        self._store.create(repo_id, owner or repo_id.split("/", 1)[0], private)

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        deletions: Iterable[str] = (),
        message: str = "Test commit",
        branch: str = _DEFAULT_BRANCH,
        author: str | None = None,
    ) -> str:
        """Commit straight into the store and return the new commit id.

        Paths are stored verbatim, so tests can plant names the client refuses to
        upload itself (``../evil.safetensors``, ``.git/x``...).
        """
        repo = self._repo(repo_id)
        record = self._store.commit(
            repo, branch, author=author or repo.owner, title=message, additions=files or {}, deleted_files=deletions
        )
        return record.oid

    def commits(self, repo_id: str, revision: str = _DEFAULT_BRANCH) -> list[CommitRecord]:
        """History reachable from ``revision``, newest first; the last one is the initial commit."""
        repo = self._repo(repo_id)
        return self._store.history(repo, self._store.resolve(repo, revision))

    def head(self, repo_id: str, revision: str = _DEFAULT_BRANCH) -> str:
        """Commit id that ``revision`` (a branch, tag or commit id) currently resolves to."""
        return self.commits(repo_id, revision)[0].oid

    def list_files(self, repo_id: str, revision: str = _DEFAULT_BRANCH) -> list[str]:
        """Sorted paths stored at ``revision``."""
        return sorted(self.commits(repo_id, revision)[0].files)

    def file_bytes(self, repo_id: str, path: str, revision: str = _DEFAULT_BRANCH) -> bytes:
        """Stored (uncorrupted) content of ``path`` at ``revision``; ``KeyError`` if absent."""
        return self.commits(repo_id, revision)[0].files[path].data

    def space_sdk(self, repo_id: str) -> str | None:
        """The SDK a Space was created with (``repo_id`` written ``spaces/<owner>/<name>``)."""
        return self._repo(repo_id).sdk

    def repo_is_private(self, repo_id: str) -> bool:
        """Visibility of an existing repo."""
        return self._repo(repo_id).private

    # -- fault injection -------------------------------------------------- #
    def corrupt_file(self, repo_id: str, path: str, replacement: bytes | None = None) -> None:
        """Serve altered bytes for ``path`` (any revision) from now on.

        Without ``replacement`` the body keeps its length but its last byte is
        flipped (an empty file is served as one NUL byte).  HEAD, listings and
        ``model_info`` keep advertising the original size, ETag and SHA-256.
        """
        self._corrupted[(repo_id, path)] = replacement

    def trickle_file(self, repo_id: str, path: str, interval: float = 2.0) -> None:
        """Serve the body of ``path`` one byte every ``interval`` seconds (a stalled download)."""
        self._trickled[(repo_id, path)] = interval

    def clear_corruption(self) -> None:
        """Undo :meth:`corrupt_file` calls and reset :attr:`corrupt_downloads`."""
        self._corrupted.clear()
        self.corrupt_downloads = False

    # -- internals used by the HTTP layer --------------------------------- #
    def _repo(self, repo_id: str) -> _Repo:
        repo = self._store.get(repo_id)
        if repo is None:
            raise KeyError(f"no such repo: {repo_id}")
        return repo

    def _served_bytes(self, repo_id: str, path: str, data: bytes) -> bytes:
        key = (repo_id, path)
        if key in self._corrupted and self._corrupted[key] is not None:
            return self._corrupted[key]  # type: ignore[return-value]
        if key in self._corrupted or self.corrupt_downloads:
            return data[:-1] + bytes([data[-1] ^ 0xFF]) if data else b"\0"
        return data

    def _authenticate(self, authorization: str | None) -> str | None:
        """User for an ``Authorization`` header; ``None`` if absent; 401 if the token is unknown."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, _INVALID_CREDENTIALS)
        return user

    def _record(self, method: str, path: str) -> None:
        with self._log_lock:
            self.requests.append((method, path))

    def _record_error(self, text: str) -> None:
        with self._log_lock:
            self.server_errors.append(text)

    def __repr__(self) -> str:
        state = self.url if self._server is not None else "stopped"
        return f"HubServer({state})"
