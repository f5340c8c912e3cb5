"""Shared fixtures. Tests that need ``../shared/data`` skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NEURAL_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set NEURAL_SHARED_DATA or provide ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    return _need(shared_data / "dicom")


@pytest.fixture(scope="session")
def kermany_dir(shared_data: Path) -> Path:
    return _need(shared_data / "kermany-train")


@pytest.fixture(scope="session")
def covid_dir(shared_data: Path) -> Path:
    return _need(shared_data / "covid-cxr")


@pytest.fixture(scope="session")
def iu_dir(shared_data: Path) -> Path:
    return _need(shared_data / "iu-reports")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (CI does; the default run stays fast)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("NEURAL_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
