"""Shared test fixtures: isolation from the user's machine, tiny pipelines, the real fixtures, the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# One torch thread per test worker unless asked otherwise (LORAREG_TEST_THREADS): the workers
# already fill the cores, and a second spinning OpenMP thread per worker only slows the suite
# down (the ill-conditioned compose tests took 82 s with default threads, 7 s with one). Set
# before any test module imports torch; subprocesses inherit it.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, os.environ.get("LORAREG_TEST_THREADS", "1"))

ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
REAL_LORAS = SHARED_FIXTURES / "real-loras"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """No test touches the user's catalog or Hub cache, and none reaches the network."""
    home = tmp_path_factory.mktemp("lorareg-home")
    monkeypatch.setenv("LORAREG_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("LORAREG_DEBUG", raising=False)
    yield home


@pytest.fixture(scope="session")
def real_loras() -> Path:
    """The folder of real adapter files published by others (../shared/fixtures/real-loras)."""
    if not REAL_LORAS.is_dir():
        pytest.skip("../shared/fixtures is not present in this checkout (CI always has it)")
    return REAL_LORAS


@pytest.fixture(scope="session")
def key_lists() -> Path:
    """The folder of real adapters' key lists (../shared/fixtures/key-lists)."""
    folder = SHARED_FIXTURES / "key-lists"
    if not folder.is_dir():
        pytest.skip("../shared/fixtures is not present in this checkout (CI always has it)")
    return folder


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A tiny random SD1-shaped pipeline saved with save_pretrained (built once per session)."""
    from loralib.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny random SDXL-shaped pipeline saved with save_pretrained (built once per session)."""
    from loralib.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny random Flux.1-shaped pipeline saved with save_pretrained (built once per session)."""
    from loralib.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", "flux")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random SD3-shaped pipeline saved with save_pretrained (built once per session)."""
    from loralib.tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd3", "sd3")


@pytest.fixture
def one_thread():
    """Run tiny models on one thread: OpenMP's spinning second thread only slows them down on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class CliResult:
    """What one ``lorareg`` invocation did."""

    code: int
    out: str
    err: str


@pytest.fixture
def lorareg(capsys):
    """Run the real ``lorareg`` entry point in-process: ``lorareg("inspect", path)`` -> CliResult."""
    from lorareg.cli.main import main

    def run(*args: str | os.PathLike) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@dataclass
class DemoCatalog:
    """A copy of the playground's demo catalog (tests/helpers/web_catalog.py) for one test."""

    home: Path  # the catalog folder (give it to Catalog(home) or --home)
    files: Path  # the adapter files, samples and previews it records
    ids: dict[str, int]  # entry ids by name


@pytest.fixture(scope="session")
def demo_catalog_template(tmp_path_factory) -> DemoCatalog:
    """The demo catalog, built once per session (a merge and a conversion included: about 3 s)."""
    from tests.helpers.web_catalog import build_demo_catalog

    root = tmp_path_factory.mktemp("demo-catalog")
    ids = build_demo_catalog(root / "home", root / "files")
    return DemoCatalog(root / "home", root / "files", ids)


@pytest.fixture
def demo_catalog(demo_catalog_template, tmp_path) -> DemoCatalog:
    """A private copy of the demo catalog's database (the files it records are shared, and left unchanged)."""
    import shutil

    home = tmp_path / "demo-home"
    shutil.copytree(demo_catalog_template.home, home)
    return DemoCatalog(home, demo_catalog_template.files, dict(demo_catalog_template.ids))
