"""What `pip install lorareg` gives: one top-level name, a torch-free core, extras for the rest.

The slow test builds the wheel, installs it alone (no extra) into a fresh virtual environment and
runs every torch-free command there on the real fixtures, with push and pull against the in-repo
Hub server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lorareg.cli.main import EXTRA_MODULES
from tests.conftest import ROOT
from tests.helpers.hub_server import HubServer
from tests.helpers.small_loras import small_lora_bytes

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Distribution name -> the module it is imported as, where they differ.
IMPORT_NAMES = {"pillow": "PIL", "python-multipart": "multipart"}


def _requirement_name(requirement: str) -> str:
    for stop in "<>=![; ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip()


def test_every_package_folder_is_installed_under_a_lorareg_name():
    setuptools = PYPROJECT["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join([name, *relative.parts]))
    assert found == set(setuptools["packages"])
    assert {p.split(".", 1)[0] for p in found} == {"loralib", "lorareg"}


def test_extras_match_what_the_cli_names_for_a_missing_module():
    extras = PYPROJECT["project"]["optional-dependencies"]
    named = {}
    for extra in ("compose", "train", "web"):
        for requirement in extras[extra]:
            name = _requirement_name(requirement)
            if not name.startswith("lorareg"):
                named[IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))] = extra
    assert named == EXTRA_MODULES
    core = {_requirement_name(r).lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not core & {"torch", "diffusers", "peft", "transformers", "safetensors", "accelerate"}
    assert "numpy" in core  # the catalog's ΔW fingerprints read factors with numpy
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"  # tomllib, used by training configs


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding lorareg without any extra (built once for this module)."""
    work = tmp_path_factory.mktemp("core")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(work / "wheels")], check=True, capture_output=True)
    wheel = next((work / "wheels").glob("lorareg-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-c", str(ROOT / "constraints.txt"), str(wheel)], check=True, capture_output=True)
    return venv


def _run(venv: Path, *args, cwd: Path, env: dict, check_code: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(venv / "bin" / "lorareg"), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    if check_code is not None:
        assert result.returncode == check_code, (args, result.stdout, result.stderr)
    return result


def test_the_core_install_runs_every_torch_free_command(core_venv, real_loras, tmp_path):
    python = str(core_venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(LORAREG_HOME=str(tmp_path / "home"), HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1")
    cwd = tmp_path  # not the repository: nothing may be imported from the source tree
    probe = ("import importlib.util as u; print(sorted(m for m in ('torch', 'diffusers', 'peft', 'transformers', "
             "'safetensors', 'cli', 'registry') if u.find_spec(m)))")
    assert subprocess.run([python, "-c", probe], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"

    for path in sorted(real_loras.glob("*.safetensors")):
        bad = path.name.startswith(("BAD_", "NOT-LORA_"))
        result = _run(core_venv, "inspect", path, "--json", cwd=cwd, env=env, check_code=None)
        if bad:  # a truncated file is still described, flagged damaged; the others are one error line (and JSON)
            assert result.returncode == 1, result.stderr
            data = json.loads(result.stdout)
            assert data.get("damaged") or (data["error"] and len(result.stderr.splitlines()) == 1), data
        else:
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["hashes"]["sha256"]
    scanned = json.loads(_run(core_venv, "scan", real_loras, "--json", cwd=cwd, env=env).stdout)
    assert scanned["added"] >= 9
    own = tmp_path / "pixel.safetensors"
    own.write_bytes(small_lora_bytes(7))
    _run(core_venv, "add", own, "--name", "pixel", "--tag", "retro", cwd=cwd, env=env)
    assert "pixel" in _run(core_venv, "list", cwd=cwd, env=env).stdout
    assert [e["name"] for e in json.loads(_run(core_venv, "search", "pixel", "--json", cwd=cwd, env=env).stdout)] \
        == ["pixel"]
    _run(core_venv, "tag", "pixel", "+style", cwd=cwd, env=env)
    assert json.loads(_run(core_venv, "show", "pixel", "--json", cwd=cwd, env=env).stdout)["tags"] == ["retro", "style"]
    assert json.loads(_run(core_venv, "verify", "--json", cwd=cwd, env=env).stdout)["missing"] == 0
    _run(core_venv, "lineage", "pixel", cwd=cwd, env=env)

    with HubServer(tokens={"hf_token_for_test": "alice"}) as server:
        hub_env = {**env, "HF_ENDPOINT": server.url, "HF_TOKEN": "hf_token_for_test", "HF_HUB_OFFLINE": "0"}
        _run(core_venv, "push", "pixel", "--repo", "alice/pixel", cwd=cwd, env=hub_env)
        _run(core_venv, "rm", "pixel", cwd=cwd, env=env)
        pulled = json.loads(_run(core_venv, "pull", "alice/pixel", "--json", cwd=cwd, env=hub_env).stdout)
        assert pulled["hashes"]["tensor_sha256"] == json.loads(
            _run(core_venv, "inspect", own, "--json", cwd=cwd, env=env).stdout)["hashes"]["tensor_sha256"]

    missing = _run(core_venv, "convert", own, "--to", "peft", "-o", tmp_path / "out", cwd=cwd, env=env,
                   check_code=1)
    assert missing.stderr.strip().splitlines() == [
        "error: this command needs torch, which comes with lorareg's 'compose' extra; "
        "install it with: pip install 'lorareg[compose]'"]
    assert not (tmp_path / "out").exists()
