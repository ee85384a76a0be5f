"""Push adapters to the Hugging Face Hub with a model card, and pull them back, verified.

Everything goes through ``huggingface_hub`` (its cache, revision pinning, the standard login:
``HF_TOKEN`` or ``hf auth login``). ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` are read when a function runs, not when the library was imported. A token is
passed to the library and never stored, logged or printed by lorareg.

``pull`` pins the download to the commit the revision resolves to, checks the file's SHA-256
against the one the Hub lists (huggingface_hub does not), deletes a download that does not match
and registers nothing, and refuses file names that would land outside its destination. A
download that stalls (less than :data:`STALL_BYTES` in :data:`STALL_SECONDS`) is abandoned and
its partial file removed. With a destination folder (``--dir``) a pull never replaces or
deletes a file it did not create: a file of the same name with the same content is reused, one
with other content is refused unless ``force``, and even then it is replaced only by a complete,
verified download (an atomic rename).

``push`` uploads the adapter, its card, and the sample images that really are images (PNG,
JPEG, WebP, GIF, checked by their first bytes); any other file recorded as a sample is left out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from loralib.errors import CorruptFileError, InputNotFoundError, InvalidArgumentError, LoraError, OutputExistsError
from loralib.files import special_kind
from loralib.files.atomic import sweep_stale, temp_name
from loralib.files.hashes import file_sha256, hash_file
from loralib.formats.layout import adapter_root, companions
from loralib.hub_ids import parse_repo_ref
from loralib.units import human_size
from loralib.version import __version__
from loralib.vocabulary import HUB_LAYOUTS

from .catalog import AddResult, Catalog
from .describe import GENERIC_STEMS, clean_name
from .paths import absolute
from .records import Entry
from .samples import image_kind
from .schema import now

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from loralib.files.hashes import FileHashes

LAYOUTS = HUB_LAYOUTS
DEFAULT_REVISION = "main"
# progress(description, done, total): what pull and push are doing, step by step.
Steps = Callable[[str, int, int], None]


def _no_steps(description: str, done: int, total: int) -> None:
    return None


STALL_SECONDS = 30.0  # a download receiving less than STALL_BYTES in this long is abandoned
STALL_BYTES = 64 * 1024


class HubError(LoraError):
    """The Hub could not be reached, refused a request, or sent something wrong."""


def endpoint() -> str | None:
    """The Hub endpoint from ``HF_ENDPOINT`` now (None: the library's default, huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def cache_dir() -> Path:
    """huggingface_hub's download cache, from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def safe_repo_path(name: str) -> bool:
    """True for a repo file name that stays inside any folder it is downloaded into."""
    if not name or name.startswith("/") or "\\" in name or any(ord(c) < 32 for c in name):
        return False
    parts = PurePosixPath(name).parts
    return all(part not in ("", ".", "..") and ":" not in part for part in parts) and not name.endswith("/")


def _api(token: str | None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token, library_name="lorareg", library_version=__version__)


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            found = getattr(imported, name, None)
            if isinstance(found, type) and issubclass(found, BaseException):
                types.append(found)
    return tuple(types)


def _first_line(exc: BaseException, count: int = 1) -> str:
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    return " ".join(lines[:count]) if lines else type(exc).__name__


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, filename: str | None = None) -> Iterator[None]:
    """Turn whatever huggingface_hub or the network raises into one clear :class:`HubError` line."""
    from huggingface_hub import errors

    where = endpoint() or "https://huggingface.co"
    at = f"{repo_id}@{revision}" if revision else repo_id
    login = "Log in with `hf auth login` or set HF_TOKEN"
    try:
        yield
    except LoraError:
        raise
    except errors.OfflineModeIsEnabled as exc:
        raise HubError("HF_HUB_OFFLINE is set, so the Hub cannot be reached",
                       "Unset HF_HUB_OFFLINE to use the network") from exc
    except errors.GatedRepoError as exc:
        raise HubError(f"{repo_id} is a gated repo",
                       f"Accept its conditions on the Hub, then {login[0].lower()}{login[1:]}") from exc
    except errors.RepositoryNotFoundError as exc:
        raise HubError(f"the Hub repo {repo_id} was not found at {where}",
                       f"Check the name; if it is private, {login[0].lower()}{login[1:]}") from exc
    except errors.RevisionNotFoundError as exc:
        raise HubError(f"the revision {revision!r} does not exist in {repo_id}",
                       "Use a branch, a tag or a commit id of the repo") from exc
    except (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError) as exc:
        if isinstance(exc, errors.LocalEntryNotFoundError):
            raise HubError(f"the Hub at {where} could not be reached to download {filename or 'a file'} of {at}",
                           "Check the network connection and HF_ENDPOINT") from exc
        raise HubError(f"{at} has no file {filename!r}", "List its files on the Hub and pass one with --file") from exc
    except errors.HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 401:
            raise HubError(f"the Hub at {where} rejected the credentials (401 Unauthorized)",
                           f"{login} with a valid token") from exc
        if status == 403:
            raise HubError(f"no permission for {repo_id} (403 Forbidden)",
                           "Use a token with write access to that namespace, or push to your own namespace") from exc
        message = (getattr(exc, "server_message", None) or "").splitlines()[0:1]
        raise HubError(f"the Hub answered {status or 'an error'} for {at}" + (f": {message[0]}" if message else ""),
                       "Try again later") from exc
    except ValueError as exc:  # huggingface_hub's own checks, e.g. model card metadata the Hub rejects
        raise HubError(f"the Hub refused the request for {at}: {_first_line(exc, 3)}") from exc
    except _network_error_types() as exc:
        raise HubError(f"cannot reach the Hub at {where}: {_first_line(exc)}",
                       "Check the network connection and HF_ENDPOINT") from exc


# -- pull ------------------------------------------------------------------------------------ #

@dataclass
class PullResult:
    """A verified download and its catalog entry."""

    repo_id: str
    revision: str
    commit: str
    file: str
    path: Path
    added: AddResult
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {"repo": self.repo_id, "revision": self.revision, "commit": self.commit, "file": self.file,
                "path": str(self.path), "files": self.files, "name": self.added.entry.name,
                "new": self.added.created, "hashes": self.added.entry.hashes}


def _choose_file(repo_id: str, revision: str, names: list[str], wanted: str | None) -> str:
    """The adapter file to download: ``wanted``, or the only ``.safetensors`` file (top level first)."""
    unsafe = [n for n in names if not safe_repo_path(n)]
    if wanted is not None:
        if not safe_repo_path(wanted):
            raise HubError(f"refusing the file name {wanted!r}: it would be written outside the download folder")
        if wanted not in names:
            choices = ", ".join(n for n in names if n.endswith(".safetensors") and n not in unsafe)
            raise HubError(f"{repo_id}@{revision} has no file {wanted!r}", f"Choose one of: {choices[:300]}")
        return wanted
    usable = [n for n in names if n not in unsafe and n.endswith(".safetensors")]
    top = [n for n in usable if "/" not in n]
    candidates = top or usable
    skipped = f" ({len(unsafe)} file names pointing outside the repo were ignored)" if unsafe else ""
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise HubError(f"{repo_id}@{revision} holds no .safetensors file{skipped}", "Pass the adapter's file with --file")
    raise HubError(f"{repo_id}@{revision} holds several adapter files: {', '.join(candidates[:6])}{skipped}",
                   "Choose one with --file")


def _digest(path: Path, digest) -> str:
    """``digest`` (a hashlib object, possibly already fed a prefix) updated with the file's bytes."""
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    return file_sha256(path)


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % path.stat().st_size)
    return _digest(path, digest)


def stall_seconds() -> float:
    """The stall window: ``LORAREG_STALL_SECONDS`` if set (for slow links, and tests), else :data:`STALL_SECONDS`."""
    try:
        value = float(os.environ.get("LORAREG_STALL_SECONDS", ""))
    except ValueError:
        return STALL_SECONDS
    return value if 0 < value < 1e6 else STALL_SECONDS


class DownloadStalledError(HubError):
    """A download that stopped making progress."""


class _StallCheckedStream:
    """A response body that raises :class:`DownloadStalledError` when fewer than :data:`STALL_BYTES`
    arrive in a stall window, or nothing at all within it (checked at every network read, which
    huggingface_hub's buffered chunks would hide)."""

    def __init__(self, stream: Any, label: str, window: float) -> None:
        self.stream, self.label, self.window = stream, label, window

    def __iter__(self) -> Iterator[bytes]:
        import httpx2

        since, before, received = time.monotonic(), 0, 0
        try:
            for chunk in self.stream:
                received += len(chunk)
                now = time.monotonic()
                if now - since >= self.window:
                    if received - before < STALL_BYTES:
                        raise self._stalled(received - before, now - since)
                    since, before = now, received
                yield chunk
        except httpx2.TimeoutException as exc:  # not a transient error to retry: the connection went silent
            raise self._stalled(received - before, time.monotonic() - since) from exc

    def _stalled(self, count: int, seconds: float) -> DownloadStalledError:
        return DownloadStalledError(
            f"the download of {self.label} stalled: {count} bytes arrived in the last {seconds:.0f} s",
            "Check the network connection and try again; the partial download was removed "
            "(LORAREG_STALL_SECONDS sets how long to wait)")

    def close(self) -> None:
        self.stream.close()


@contextmanager
def _stall_checks(label: str) -> Iterator[None]:
    """Check every file body huggingface_hub downloads inside the block for stalls."""
    import httpx2
    from huggingface_hub.utils import get_session

    window = stall_seconds()

    class Checked(_StallCheckedStream, httpx2.SyncByteStream):
        pass

    def hook(response: Any) -> None:
        if response.request.method == "GET" and "/resolve/" in response.request.url.path:
            response.stream = Checked(response.stream, label, window)

    hooks = get_session().event_hooks["response"]
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)


@contextmanager
def _read_timeout() -> Iterator[None]:
    """Give up on a silent connection after the stall window, unless HF_HUB_DOWNLOAD_TIMEOUT says otherwise."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_DOWNLOAD_TIMEOUT
    if not os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"):
        constants.HF_HUB_DOWNLOAD_TIMEOUT = min(previous, stall_seconds())
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = previous


def _expected_hash(sibling: Any, filename: str, repo_id: str) -> tuple[str, str]:
    """``(kind, value)`` of the hash the Hub lists for a file: its SHA-256 (LFS) or git blob id."""
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None and getattr(lfs, "sha256", None):
        return "SHA-256", lfs.sha256
    if getattr(sibling, "blob_id", None):
        return "git blob id", sibling.blob_id
    raise HubError(f"the Hub lists no hash for {filename} in {repo_id}", "lorareg only registers downloads it can verify")


def _same_content(path: Path, sibling: Any, filename: str, repo_id: str) -> bool:
    """True when the local file at ``path`` is byte for byte the one the Hub lists."""
    kind, expected = _expected_hash(sibling, filename, repo_id)
    if special_kind(path) is not None:
        return False
    size = getattr(sibling, "size", None)
    if size is not None and path.stat().st_size != size:
        return False
    return (file_sha256(path) if kind == "SHA-256" else _git_blob_id(path)) == expected


def _discard(path: Path, destination: Path, local_dir: Path | None, filename: str) -> None:
    """Delete a bad download (and the cache entries that would hand it out again)."""
    targets = [path]
    real = Path(os.path.realpath(path))
    if real != path and real.is_relative_to(Path(os.path.realpath(destination))):
        targets.append(real)
    if local_dir is not None:
        meta = local_dir / ".cache" / "huggingface" / "download"
        targets += [meta / f"{filename}.metadata", meta / f"{filename}.lock"]
    for target in targets:
        with contextlib.suppress(OSError):
            target.unlink()


def _verify(path: Path, sibling: Any, filename: str, repo_id: str, commit: str) -> FileHashes | None:
    """Compare a download with the SHA-256 (LFS files) or git blob id (others) the Hub lists.

    Returns the file's hashes when it is a readable safetensors file (so it is read once).
    """
    kind, expected = _expected_hash(sibling, filename, repo_id)
    expected_size = getattr(sibling, "size", None)
    hashes = None
    if kind == "SHA-256":
        try:
            hashes = hash_file(path)
            actual = hashes.sha256
        except LoraError:  # not a readable safetensors file: hash its bytes alone
            actual = _file_sha256(path)
    else:
        actual = _git_blob_id(path)
    size = path.stat().st_size
    if actual != expected or (expected_size is not None and size != expected_size):
        raise CorruptFileError(
            f"the download of {filename} from {repo_id}@{commit[:12]} is corrupt: its {kind} is {actual[:16]}… "
            f"({size} bytes) but the Hub lists {expected[:16]}… ({expected_size} bytes)",
            "It was deleted and nothing was registered (no file of yours was touched); try again")
    return hashes


def _card_fields(repo_id: str, commit: str, token: str | None) -> tuple[list[str], list[str]]:
    """Tags and trigger word from the repo's model card (always into the cache; empty when unreadable)."""
    from huggingface_hub import ModelCard, hf_hub_download

    from .model_card import ARCHITECTURE_TAGS, STANDARD_TAGS

    try:
        path = hf_hub_download(repo_id, "README.md", revision=commit, endpoint=endpoint(), token=token,
                               cache_dir=cache_dir())
        data = ModelCard.load(path).data.to_dict()
    except Exception:  # a card is a courtesy; an unreadable one must not stop the pull
        return [], []
    standard = set(STANDARD_TAGS) | set(ARCHITECTURE_TAGS.values())
    tags = [str(t) for t in data.get("tags") or [] if isinstance(t, (str, int)) and str(t) not in standard]
    prompt = data.get("instance_prompt")
    return tags, [str(prompt)] if isinstance(prompt, (str, int, float)) and str(prompt).strip() else []


def pull(catalog: Catalog, reference: str, *, filename: str | None = None, name: str | None = None,
         tags: Iterable[str] = (), local_dir: str | os.PathLike | None = None, token: str | None = None,
         force: bool = False, progress: Steps | None = None) -> PullResult:
    """Download an adapter from ``user/repo[@revision]``, verify it, and register it in ``catalog``.

    The file goes into the huggingface_hub cache (or ``local_dir``), pinned to the commit the
    revision resolves to. Tags and the trigger word of the repo's model card are kept. In
    ``local_dir`` an existing file of the same name is reused when its content is the same, and
    otherwise refused unless ``force``; a replaced file stays until its successor is complete and
    verified. ``progress(description, done, total)`` is told each step (resolving, each download,
    registering).
    """
    progress = progress or _no_steps
    repo_id, revision = parse_repo_ref(reference)
    revision = revision or DEFAULT_REVISION
    if offline():
        raise HubError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded",
                       "Unset HF_HUB_OFFLINE, or use an adapter that is already in the catalog")
    destination = absolute(local_dir) if local_dir is not None else cache_dir()
    api = _api(token)
    progress(f"resolving {repo_id}@{revision}", 0, 1)
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = _choose_file(repo_id, revision, list(siblings), filename)
    wanted = [chosen, *(n for n in companions(chosen, list(siblings)) if safe_repo_path(n))]
    if local_dir is not None:
        downloaded, hashes = _pull_into_folder(repo_id, revision, commit, wanted, siblings, destination, token, force,
                                               progress)
    else:
        downloaded, hashes = _pull_into_cache(repo_id, revision, commit, wanted, siblings, destination, token,
                                              progress)
    progress("registering", len(wanted), len(wanted))
    card_tags, triggers = _card_fields(repo_id, commit, token) if "README.md" in siblings else ([], [])
    root = adapter_root(downloaded[0])
    default = PurePosixPath(chosen).stem
    if default.lower() in GENERIC_STEMS:
        default = repo_id.split("/", 1)[1]
    source = {"source": "hub", "repo": repo_id, "revision": revision, "commit": commit, "file": chosen}
    added = catalog.add(root, name=name, fallback_name=clean_name(default), tags=[*card_tags, *tags],
                        triggers=triggers, source=source, hashes=hashes[0] if root == downloaded[0] else None)
    return PullResult(repo_id, revision, commit, chosen, root, added, [str(p) for p in downloaded])


def _download(repo_id: str, revision: str, commit: str, item: str, token: str | None, progress: Steps,
              step: tuple[int, int], size: int | None, **where: Any) -> Path:
    """One file through huggingface_hub, abandoned (and its partial file removed) if it stalls.

    ``progress`` hears of the bytes received; ``step`` is ``(this file's number, files to download)``.
    """
    from huggingface_hub import hf_hub_download

    description = f"downloading {item} ({step[0]}/{step[1]})"
    progress(description, 0, size or 0)
    with hub_errors(repo_id, revision, item), _read_timeout(), _stall_checks(f"{item} from {repo_id}"):
        return Path(hf_hub_download(repo_id, item, revision=commit, endpoint=endpoint(), token=token,
                                    tqdm_class=_byte_counter(progress, description, size or 0), **where))


def _pull_into_cache(repo_id: str, revision: str, commit: str, wanted: list[str], siblings: dict[str, Any],
                     destination: Path, token: str | None,
                     progress: Steps = _no_steps) -> tuple[list[Path], list[FileHashes | None]]:
    """Download into the Hugging Face cache and verify; a bad download is deleted from the cache."""
    downloaded: list[Path] = []
    hashes: list[FileHashes | None] = []
    for number, item in enumerate(wanted, 1):
        local = absolute(_download(repo_id, revision, commit, item, token, progress, (number, len(wanted)),
                                   getattr(siblings[item], "size", None), cache_dir=destination))
        if not local.is_relative_to(destination):
            _discard(local, destination, None, item)
            raise HubError(f"the download of {item!r} landed outside {destination}; it was deleted")
        try:
            hashes.append(_verify(local, siblings[item], item, repo_id, commit))
        except LoraError:
            for path in [*downloaded, local]:
                _discard(path, destination, None, item)
            raise
        downloaded.append(local)
    return downloaded, hashes


def _pull_into_folder(repo_id: str, revision: str, commit: str, wanted: list[str], siblings: dict[str, Any],
                      destination: Path, token: str | None, force: bool,
                      progress: Steps = _no_steps) -> tuple[list[Path], list[FileHashes | None]]:
    """Download into a folder of the user's without ever losing a file of theirs.

    Every file is downloaded into a temporary folder inside ``destination`` and verified there;
    only when all are complete and verified are they renamed into place. A file already at a
    target path is reused when it has the listed content; other content is refused without
    ``force`` (checked before anything is downloaded).
    """
    destination.mkdir(parents=True, exist_ok=True)
    targets = {item: destination / item for item in wanted}
    reuse: dict[str, bool] = {}
    for item, target in targets.items():
        if not os.path.lexists(target):
            continue
        if target.is_dir() and not target.is_symlink():
            raise HubError(f"{target} is a folder; it cannot receive {item} from {repo_id}", "Choose another --dir")
        reuse[item] = target.is_file() and _same_content(target, siblings[item], item, repo_id)
        if not reuse[item] and not force:
            raise OutputExistsError(f"{target} already exists with other content than {item} of {repo_id}@{commit[:12]}",
                                    "Pass --force to replace it (it stays until the new file is downloaded and "
                                    "verified), or choose another --dir")
    staging = destination / temp_name(".pull")
    sweep_stale(destination)
    staging.mkdir(mode=0o700)
    try:
        staged: dict[str, Path] = {}
        hashes: dict[str, FileHashes | None] = {}
        to_download = [item for item in wanted if not reuse.get(item)]
        for item in wanted:
            if reuse.get(item):
                hashes[item] = _verify(targets[item], siblings[item], item, repo_id, commit)
                continue
            local = absolute(_download(repo_id, revision, commit, item, token, progress,
                                       (to_download.index(item) + 1, len(to_download)),
                                       getattr(siblings[item], "size", None), local_dir=staging))
            if not local.is_relative_to(absolute(staging)):
                raise HubError(f"the download of {item!r} landed outside {destination}; it was deleted")
            hashes[item] = _verify(local, siblings[item], item, repo_id, commit)
            staged[item] = local
        for item, local in staged.items():
            targets[item].parent.mkdir(parents=True, exist_ok=True)
            os.chmod(local, 0o644)
            os.replace(local, targets[item])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [targets[item] for item in wanted], [hashes[item] for item in wanted]


# -- push ------------------------------------------------------------------------------------ #

@dataclass
class PushResult:
    """What ``push`` uploaded, and where."""

    repo_id: str
    commit: str
    url: str
    files: list[str]
    weight_name: str
    private: bool

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {"repo": self.repo_id, "commit": self.commit, "url": self.url, "files": self.files,
                "weight_name": self.weight_name, "private": self.private}


def weight_file_name(entry: Entry) -> str:
    """The kohya file's name in the repo: the catalog name made file-safe."""
    stem = re.sub(r"[^\w.-]+", "_", entry.name, flags=re.ASCII).strip("._") or f"lora_{entry.tensor_sha256[:12]}"
    return f"{stem}.safetensors"


def push(catalog: Catalog, entry: Entry, repo_id: str, *, private: bool = False, also: Iterable[str] = (),
         license: str | None = None, base_model: str | None = None, message: str | None = None,
         token: str | None = None, progress: Steps | None = None) -> PushResult:
    """Upload ``entry`` to ``repo_id`` (created if needed) in kohya format, with a model card.

    ``also`` adds layouts: ``diffusers`` (``diffusers/pytorch_lora_weights.safetensors``),
    ``peft`` (a ``peft/`` folder) and ``comfyui`` (``comfyui/<name>.safetensors``, ComfyUI/BFL
    names). Sample images recorded in the catalog become the card's widget. Converting (an adapter
    not stored as kohya, or ``also``) needs torch. ``progress(description, done, total)`` is told
    each step (conversions, the model card, the upload).
    """
    progress = progress or _no_steps
    from huggingface_hub import CommitOperationAdd

    from .lineage import lineage, render
    from .model_card import CardInputs, model_card

    repo_id, revision = parse_repo_ref(repo_id)
    if revision:
        raise InvalidArgumentError("push writes to the main branch", f"Give the repo as {repo_id}, without @{revision}")
    layouts = [x.strip().lower() for x in also if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        raise InvalidArgumentError(f"unknown layout {unknown[0]!r} for --also", f"Choose from {', '.join(LAYOUTS)}")
    if offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", "Unset HF_HUB_OFFLINE to use the network")
    source = catalog.local_path(entry)
    weight_name = weight_file_name(entry)
    uploads: list[tuple[str, Path | bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lorareg-push-") as tmp:
        work = Path(tmp)
        if entry.format == "kohya" and source.is_file():
            kohya_file = source
        else:
            progress("converting to kohya", 0, 1)
            kohya_file = _convert(source, work / weight_name, "kohya")[0]
        uploads.append((weight_name, kohya_file))
        if "diffusers" in layouts:
            progress("converting to diffusers", 0, 1)
            out = _convert(source, work / "diffusers" / "pytorch_lora_weights.safetensors", "diffusers")
            uploads += [(f"diffusers/{p.relative_to(work / 'diffusers').as_posix()}", p) for p in out]
        if "peft" in layouts:
            progress("converting to peft", 0, 1)
            out = _convert(source, work / "peft", "peft")
            uploads += [(f"peft/{p.relative_to(work / 'peft').as_posix()}", p) for p in out]
        if "comfyui" in layouts:
            out = _convert(source, work / "comfyui" / weight_name, "comfyui")
            uploads += [(f"comfyui/{weight_name}", out[0])]
        widget = []
        for sample in entry.samples:
            image = Path(str(sample.get("path", "")))
            if image_kind(image) is None:  # only real images go up: never a text file recorded as a sample
                continue
            name = _unique_name(f"images/{_repo_file_name(image.name)}", {n for n, _ in uploads})
            uploads.append((name, image))
            widget.append(_widget_item(sample, name))
        card = model_card(entry, CardInputs(
            repo_id=repo_id, weight_name=weight_name, hashes=hash_file(kohya_file).to_dict(),
            lineage=render(lineage(catalog, entry)), widget=widget, extra_layouts=layouts,
            base_model=base_model, license=license))
        uploads.append(("README.md", card.encode("utf-8")))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes) else str(data))
                      for name, data in uploads]
        api = _api(token)
        total = sum(len(data) if isinstance(data, bytes) else data.stat().st_size for _, data in uploads)
        progress(f"uploading {len(uploads)} files ({human_size(total)}) to {repo_id}", 0, 1)
        with hub_errors(repo_id):
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=message or f"Upload {entry.name} with lorareg")
    progress(f"uploaded {len(uploads)} files to {repo_id}", 1, 1)
    files = [name for name, _ in uploads]
    catalog.record_push(entry, {"repo": repo_id, "commit": info.oid, "file": weight_name, "files": files,
                                "date": now()})
    return PushResult(repo_id, info.oid, info.commit_url, files, weight_name, private)


def _byte_counter(progress: Steps, description: str, size: int):
    """A tqdm class for huggingface_hub's downloads that reports the bytes received to ``progress`` and draws nothing."""
    from tqdm.auto import tqdm

    class ByteCounter(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.received = int(kwargs.get("initial") or 0)
            self.expected = int(kwargs.get("total") or size or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self.received += int(n or 0)
            progress(description, self.received, self.expected)
            return None

    return ByteCounter


def _unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem-2.ext``… when another upload already has it (samples from different folders)."""
    stem, dot, suffix = name.rpartition(".")
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    return candidate


def _widget_item(sample: dict, url: str) -> dict:
    """A model card widget entry for a sample image: its prompt, negative prompt, and the image."""
    item: dict = {"text": str(sample.get("prompt") or "")}
    if sample.get("negative_prompt"):
        item["parameters"] = {"negative_prompt": str(sample["negative_prompt"])}
    item["output"] = {"url": url}
    return item


def _repo_file_name(name: str) -> str:
    """A file name that is safe in a repo: no hidden name, no characters outside letters, digits, ``._-``."""
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.ASCII).lstrip(".")
    return cleaned or "image"


def _convert(source: Path, output: Path, fmt: str) -> list[Path]:
    """Write ``source`` in another format for upload (imports torch)."""
    from loralib.formats import convert

    output.parent.mkdir(parents=True, exist_ok=True)
    return list(convert(source, output, fmt).files)


@dataclass
class SitePushResult:
    """What ``push_site`` uploaded to a static Space."""

    space_id: str
    commit: str
    url: str
    files: list[str]
    private: bool

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {"space": self.space_id, "commit": self.commit, "url": self.url, "files": self.files,
                "private": self.private}


def space_readme(title: str, tags: Iterable[str] = ()) -> str:
    """The README.md of a static Space: the YAML front matter the Hub reads to serve ``index.html``."""
    lines = ["---", f"title: {_yaml_text(title)}", "emoji: 🎨", "colorFrom: indigo", "colorTo: pink", "sdk: static",
             "app_file: index.html", "pinned: false", "tags:", "  - lora", "  - lorareg"]
    lines += [f"  - {_yaml_text(t)}" for t in tags if t not in ("lora", "lorareg")]
    lines += ["---", "", f"# {title}", "", "A gallery of LoRA adapters exported with "
              f"[lorareg](https://pypi.org/project/lorareg/) {__version__} (`lorareg export-site`).", ""]
    return "\n".join(lines)


def _yaml_text(text: str) -> str:
    """A YAML double-quoted scalar (safe whatever the text holds)."""
    import json

    return json.dumps(" ".join(str(text).split()), ensure_ascii=False)


def push_site(folder: str | os.PathLike, space_id: str, *, private: bool = False, title: str | None = None,
              tags: Iterable[str] = (), message: str | None = None, token: str | None = None) -> SitePushResult:
    """Publish a folder written by ``export-site`` as a static Hugging Face Space (created if needed).

    Every file of the folder is uploaded, plus a README.md whose front matter makes the Hub
    serve ``index.html`` (``sdk: static``). Files the folder no longer has stay in the Space.
    """
    from huggingface_hub import CommitOperationAdd

    root = Path(folder)
    if not (root / "index.html").is_file():
        raise InputNotFoundError(f"{root} has no index.html", "Write the site first with: lorareg export-site DIR")
    repo_id, revision = parse_repo_ref(space_id)
    if revision:
        raise InvalidArgumentError("push-site writes to the main branch",
                                   f"Give the Space as {repo_id}, without @{revision}")
    if offline():
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", "Unset HF_HUB_OFFLINE to use the network")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    names = [p.relative_to(root).as_posix() for p in files]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in zip(names, files, strict=True) if name != "README.md"]
    readme = space_readme(title or repo_id.split("/")[-1], tags)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    api = _api(token)
    with hub_errors(repo_id):
        url = api.create_repo(repo_id, repo_type="space", space_sdk="static", private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, repo_type="space",
                                 commit_message=message or "Publish the LoRA gallery with lorareg")
    return SitePushResult(repo_id, info.oid, str(url), sorted({*names, "README.md"}), private)


def find_pulled(catalog: Catalog, repo_id: str, revision: str | None) -> Entry | None:
    """An entry already pulled from ``repo_id`` (at ``revision`` when given) that still has a file here."""
    for entry in catalog.pulled_from(repo_id, revision):
        try:
            catalog.local_path(entry)
        except InputNotFoundError:
            continue
        return entry
    return None
