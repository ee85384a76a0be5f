"""docs/cli.md documents every command and every option, the way sqlite-utils checks its CLI reference.

Each command is described in one section of docs/cli.md (sections are delimited by
``<!-- section: … -->`` markers); every long option of the command appears in that section.
`train` takes one option per configuration key, which docs/training.md documents key by key.
"""

from __future__ import annotations

import re

import click
import pytest

from lorareg.cli.main import COMMANDS, cli
from tests.conftest import ROOT

CLI_DOC = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
TRAINING_DOC = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")


def _sections() -> dict[str, str]:
    parts = re.split(r"<!-- section: ([\w-]+) -->", CLI_DOC)
    return dict(zip(parts[1::2], parts[2::2]))


def _section_of(command: str) -> str:
    mentions = re.compile(rf"(`lorareg {re.escape(command)}\b|^\| `{re.escape(command)}\b)", re.MULTILINE)
    found = [text for text in _sections().values() if mentions.search(text)]
    assert found, f"docs/cli.md does not describe `lorareg {command}`"
    return found[0]


def _long_options(command: click.Command) -> list[str]:
    flags = []
    for param in command.params:
        if isinstance(param, click.Option):
            flags += [f for f in param.opts + param.secondary_opts if f.startswith("--") and f != "--help"]
    return flags


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_of_every_command_is_in_the_reference(name):
    command = cli.get_command(click.Context(cli), name)
    section = _section_of(name)
    text = section + (TRAINING_DOC if name == "train" else "")
    missing = [flag for flag in _long_options(command) if not re.search(rf"{re.escape(flag)}(?![\w-])", text)]
    if name == "train":  # options made from configuration keys are documented as keys (learning_rate)
        missing = [f for f in missing if f.removeprefix("--").removeprefix("no-").replace("-", "_") not in TRAINING_DOC]
    assert missing == [], f"docs/cli.md does not mention {missing} of `lorareg {name}`"


def test_the_global_options_are_in_the_reference():
    for flag in _long_options(cli):
        assert flag in CLI_DOC.split("<!-- section:")[0], flag
