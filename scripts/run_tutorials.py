"""Execute the tutorials in place on real data and check what they carry.

Usage: ``python scripts/run_tutorials.py [tutorials/01_her2st_end_to_end.ipynb ...]`` (default: all of them).
Needs the ``tutorials`` extra (``bash scripts/setup.sh tutorials``) and the data under ``../shared/data`` or
``$SIGMMA_DATA_DIR``. Each notebook runs in a fresh kernel from the ``tutorials`` folder; the committed file is
replaced only when the whole notebook ran. Prints the wall time and size of each; the default test run checks the
committed files (``tests/test_docs.py``: executed, < 3 MB, no machine paths, no warning filters).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
TIMEOUT_S = 3600


def run(path: Path) -> None:
    """Execute one notebook in a fresh kernel; replace the committed file only if every cell ran."""
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    ).execute()
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    print(f"{path.name}: {time.perf_counter() - start:.0f} s, {path.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted(TUTORIALS.glob("*.ipynb"))
    for path in paths:
        run(path)
