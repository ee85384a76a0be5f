"""The command line's word lists come from loralib.vocabulary, and the library agrees with them."""

from __future__ import annotations

import subprocess
import sys

import click

from loralib import vocabulary
from loralib.formats import FORMATS
from lorareg.cli.main import COMMANDS, cli
from lorareg.registry.catalog import SORTS


def test_vocabulary_matches_the_library():
    assert vocabulary.WRITE_FORMATS == tuple(f.name for f in FORMATS if f.write is not None) == (
        "kohya", "peft", "diffusers", "comfyui")
    assert {"kohya", "peft", "diffusers", "diffusers-old", "diffusers-attnprocs", "cloneofsimo", "comfyui",
            "onetrainer-internal", "onetrainer-original", "omi", "xlabs"} == set(vocabulary.FORMAT_NAMES)
    assert tuple(SORTS) == vocabulary.CATALOG_SORTS
    assert vocabulary.HUB_LAYOUTS == ("peft", "diffusers", "comfyui")
    assert vocabulary.ARCHITECTURE_NAMES == ("sd1", "sd2", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large")


def test_every_cli_choice_is_a_vocabulary_list():
    """No command keeps its own copy of a word list: each Choice equals one list of the vocabulary."""
    lists = {tuple(v) for k, v in vars(vocabulary).items() if k.isupper() and isinstance(v, (tuple, dict))}
    lists |= {tuple(sorted(vocabulary.STORAGE_DTYPES))}
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        for param in command.params:
            if isinstance(param.type, click.Choice):
                assert tuple(param.type.choices) in lists, (name, param.name, param.type.choices)


def test_vocabulary_imports_no_torch():
    code = "import sys, loralib.vocabulary; print(sorted(m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
