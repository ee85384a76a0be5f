"""Hugging Face Hub repository references: ``user/repo`` or ``user/repo@revision``."""

from __future__ import annotations

import re

from .errors import InvalidArgumentError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
REVISION = re.compile(r"^[\w./-]{1,200}$")


def parse_repo_ref(text: str) -> tuple[str, str | None]:
    """``user/repo[@revision]`` (also ``hf://…`` and ``https://huggingface.co/…``) -> (repo id, revision)."""
    ref = text.strip()
    for prefix in ("hf://", "https://huggingface.co/", "http://huggingface.co/"):
        ref = ref.removeprefix(prefix)
    repo, _, revision = ref.partition("@")
    repo = repo.strip("/")
    if not REPO_ID.match(repo) or ".." in repo or (revision and not REVISION.match(revision)):
        raise InvalidArgumentError(f"{text!r} is not a Hub repo id", "Write it as user/repo or user/repo@revision")
    return repo, revision or None


def is_repo_ref(text: str) -> bool:
    """True when ``text`` reads as ``user/repo[@revision]``."""
    try:
        parse_repo_ref(text)
    except InvalidArgumentError:
        return False
    return True
