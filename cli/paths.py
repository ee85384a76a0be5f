"""Where commands write: one rule for every output option.

- A path that ends in ``/`` (or names an existing folder) is a folder. A command that writes one
  file (a kohya or diffusers adapter, a single-file model) puts it inside, under the command's
  usual name for it; a command whose output is a folder (a PEFT adapter, generated images, a
  training run, a tiny model, Hub downloads) uses the folder itself.
- Missing folders above an output are created, and the command says so on stderr
  (``created folder …``). Nothing is created before the command's arguments have been checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def names_folder(text: str | os.PathLike) -> bool:
    """True when an output argument names a folder: it ends in a slash or is an existing folder."""
    raw = os.fspath(text)
    return raw.endswith(("/", os.sep)) or Path(raw).expanduser().is_dir()


def output_file(text: str | os.PathLike, default_name: str) -> Path:
    """The file to write for an output argument: ``text`` itself, or ``default_name`` inside it when it names a folder."""
    path = Path(os.fspath(text)).expanduser()
    return path / default_name if names_folder(text) else path


def adapter_output(text: str | os.PathLike, fmt: str, default_name: str) -> Path:
    """Where an adapter in format ``fmt`` goes for an output argument (a PEFT adapter is a folder;
    a diffusers file inside a folder is ``pytorch_lora_weights.safetensors``)."""
    if fmt == "peft":
        return Path(os.fspath(text).rstrip("/" + os.sep) or os.fspath(text)).expanduser()
    return output_file(text, DIFFUSERS_FILE if fmt == "diffusers" else default_name)


def refuse_existing(target: Path, fmt: str | None, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an adapter output that is one of ``inputs`` (whatever ``force`` says) or exists, unless
    ``force`` (a PEFT folder exists when it holds an adapter)."""
    from loralib.errors import OutputExistsError
    from loralib.files.atomic import refuse_input_as_output

    refuse_input_as_output(target, inputs)

    probe = target / "adapter_model.safetensors" if fmt == "peft" else target
    if force or not probe.exists():
        return
    raise OutputExistsError(f"{target} already " + ("holds a PEFT adapter" if fmt == "peft" else "exists"),
                            "Pass --force to overwrite it, or choose another output path")


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path`` (the output itself is left to its writer), saying so on stderr."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not missing:
        return []
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    import click

    click.echo(f"created folder {path.absolute().parent}", err=True)
    return missing
