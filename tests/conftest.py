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


class FakeTextEncoder:
    """Deterministic stand-in for MiniLM (hash-seeded vectors): fast unit tests of the graph side."""

    dim = 384

    def encode(self, texts):
        import hashlib

        import numpy as np

        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).normal(size=self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """A tiny *untrained* bundle saved in HF format (fast to load; outputs are marked UNTRAINED)."""
    from neural_core.bundle import untrained_bundle
    from neural_core.config import tiny_report_config

    d = tmp_path_factory.mktemp("bundle") / "tiny"
    b = untrained_bundle(tiny_report_config())
    b.save(d, fp16=False)
    return d


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_bundle_dir):
    from neural_core.bundle import load_bundle
    from neural_core.pipeline import Pipeline

    return Pipeline(load_bundle(tiny_bundle_dir, device="cpu"), text_encoder=FakeTextEncoder())
