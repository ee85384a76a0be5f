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
    assert {"kohya", "peft", "diffusers", "diffusers-old", "diffusers-attnprocs", "cloneofsimo", "lycoris-loha",
            "lycoris-lokr", "lycoris-full", "lycoris-norm", "lycoris-dora", "lycoris-locon", "comfyui",
            "onetrainer-internal", "onetrainer-original", "omi", "xlabs"} == set(vocabulary.FORMAT_NAMES)
    assert tuple(SORTS) == vocabulary.CATALOG_SORTS
    assert vocabulary.HUB_LAYOUTS == ("peft", "diffusers", "comfyui")
    assert vocabulary.ARCHITECTURE_NAMES == ("sd1", "sd2", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large")
    from loralib.formats.table import folder_formats

    assert {name for fmt in folder_formats() for name in fmt.folder.weights} == vocabulary.FOLDER_WEIGHTS


def test_every_cli_choice_is_a_vocabulary_list():
    """No command keeps its own copy of a word list: each Choice equals one list of the vocabulary."""
    names = [k for k in dir(vocabulary) if k.isupper()] + list(vocabulary._FROM_THE_TABLE)
    lists = {tuple(v) for v in (getattr(vocabulary, k) for k in names) if isinstance(v, (tuple, dict))}
    lists |= {tuple(sorted(vocabulary.STORAGE_DTYPES))}
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        for param in command.params:
            if isinstance(param.type, click.Choice):
                assert tuple(param.type.choices) in lists, (name, param.name, param.type.choices)


def test_vocabulary_imports_no_torch_and_the_catalog_commands_not_even_the_formats():
    heavy = "('torch', 'diffusers', 'peft', 'transformers', 'loralib.formats')"
    code = f"import sys, loralib.vocabulary, lorareg.cli.catalog; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert "kohya" in vocabulary.WRITE_FORMATS  # derived from the format table on first use
