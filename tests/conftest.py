"""Shared fixtures. Real data in ../shared/data is found through --shared_data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import (  # noqa: F401 - session fixtures for all
    commands,
    drenet_export,
    split_dataset,
    tiny_dataset,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shared_data", default=str(REPO.parent / "shared" / "data"),
                     help="Folder of the real public data (README.txt in each subfolder).")


@pytest.fixture(scope="session")
def shared_data(request: pytest.FixtureRequest) -> Path:
    path = Path(request.config.getoption("--shared_data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (a fresh checkout has no ../shared; "
                    "pass --shared_data=PATH)")
    return path


def shared_subdir(shared: Path, name: str) -> Path:
    path = shared / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent from the shared data folder")
    return path


@pytest.fixture(scope="session")
def bench_script():
    """``bench_script("shortcuts")``: bench/shortcuts.py imported as a module (the bench
    scripts are run as files, not installed)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
