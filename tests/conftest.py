"""Shared fixtures: the real data sets (skipped cleanly when absent) and a small synthetic tissue.

The data sets are session-scoped and shared by every test file: treat them as read-only (use
``sdata["table"].copy()`` or build your own object before modifying anything).

Slow tests (``@pytest.mark.slow``) run only with ``--runslow``, ``SIGMMA_RUN_SLOW=1`` or a ``-m``
expression that selects them (``pytest -m slow``). Tests marked ``gpu`` are skipped without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sigmma_sc.datasets import local_dataset_dir
from sigmma_sc.datasets._paths import DATA_DIR_ENV, KIDNEY_CROP_FILES, REQUIRED_FILES

SLOW_ENV = "SIGMMA_RUN_SLOW"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _run_slow(config: pytest.Config) -> bool:
    if config.getoption("--runslow") or os.environ.get(SLOW_ENV, "").strip() not in ("", "0"):
        return True
    markexpr = config.getoption("-m") or ""
    return "slow" in markexpr and "not slow" not in markexpr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _run_slow(config):
        skip_slow = pytest.mark.skip(reason=f"slow: run with --runslow or {SLOW_ENV}=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            skip_gpu = pytest.mark.skip(reason="needs CUDA")
            for item in gpu_items:
                item.add_marker(skip_gpu)


def _data_dir(name: str, files: tuple[str, ...]) -> Path:
    folder = local_dataset_dir(name, required=files)
    if folder is None:
        pytest.skip(
            f"data set '{name}' ({', '.join(files)}) not found under ${DATA_DIR_ENV} or ../shared/data; "
            f"set {DATA_DIR_ENV} to run the real-data tests"
        )
    return folder


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The her2st folder (raw files), for tests that recompute what the loader does."""
    return _data_dir("her2st", REQUIRED_FILES["her2st"])


@pytest.fixture(scope="session")
def her2st_sdata(her2st_dir: Path):
    """All her2st sections found (C2-C6 in ../shared/data): 910 spots, 100 µm circles."""
    import sigmma_sc as sg

    return sg.datasets.her2st(her2st_dir)


@pytest.fixture(scope="session")
def xenium_dir() -> Path:
    return _data_dir("deepspot_NCBI858", REQUIRED_FILES["deepspot_NCBI858"])


@pytest.fixture(scope="session")
def xenium_sdata(xenium_dir: Path):
    """200 Xenium lung cells (section "NCBI858")."""
    import sigmma_sc as sg

    return sg.datasets.xenium_lung(xenium_dir)


@pytest.fixture(scope="session")
def kidney_dir() -> Path:
    return _data_dir("visiumhd_kidney", KIDNEY_CROP_FILES)


@pytest.fixture(scope="session")
def kidney_crop_sdata(kidney_dir: Path):
    """The 5,695-bin Visium HD kidney crop (section "kidney", 16 µm squares)."""
    import sigmma_sc as sg

    return sg.datasets.visium_hd_kidney(kidney_dir, crop=True)


@pytest.fixture(scope="session")
def mouse_brain_sdata():
    """49 log-normalised Visium mouse-brain spots (section "mouse_brain")."""
    import sigmma_sc as sg

    return sg.datasets.visium_mouse_brain(_data_dir("squidpy_tests", REQUIRED_FILES["squidpy_tests"]))


@pytest.fixture(scope="session")
def synthetic_sdata():
    """A small synthetic tissue: 1,200 cells x 80 genes over two sections ("S0", "S1"), seed 0."""
    import sigmma_sc as sg

    return sg.datasets.synthetic(1200, n_genes=80, n_sections=2, seed=0)


@pytest.fixture(autouse=True, scope="session")
def _private_cachedir(tmp_path_factory: pytest.TempPathFactory):
    """Checkpoints and feature caches of the test run go to a temporary folder, never the user's ~/.cache."""
    import sigmma_sc as sg

    old = sg.settings._cachedir
    sg.settings.cachedir = tmp_path_factory.mktemp("sigmma_cache")
    yield
    sg.settings.cachedir = old
