"""Doctest namespace of the package's docstring examples (``pytest --doctest-modules src``).

Every example sees ``sg`` (``sigmma_sc``), ``np`` and ``pd``. Examples about a fitted model may
also use, without building them:

- ``train``: section ``S0`` of ``sg.datasets.synthetic(400, n_genes=40, n_sections=2, seed=0)``
  (200 cells);
- ``test``: section ``S1`` of the same object (200 other cells, never seen by ``model``);
- ``model``: ``sg.tl.fit(train, max_epochs=1, embed_dim=16, hidden_dim=32, seed=0)``.

They are built once per session, and only when an example names them (the fit takes about 20 s
of CPU). Treat them as read-only: an example that changes a slide builds its own.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from typing import Any

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

#: Shared objects, built on demand (the whole doctest run should stay near two minutes).
SHARED = ("train", "test", "model")


@functools.cache
def _slides() -> tuple[Any, Any]:
    import sigmma_sc as sg

    sdata = sg.datasets.synthetic(400, n_genes=40, n_sections=2, seed=0)
    return sdata.filter_by_coordinate_system("S0"), sdata.filter_by_coordinate_system("S1")


@functools.cache
def _model() -> Any:
    import sigmma_sc as sg

    train, _ = _slides()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sg.tl.fit(train, max_epochs=1, embed_dim=16, hidden_dim=32, seed=0)


def _names(item: pytest.Item) -> set[str]:
    dtest = getattr(item, "dtest", None)
    if dtest is None:
        return set()
    return {w for ex in dtest.examples for w in re.findall(r"[A-Za-z_]\w*", ex.source)}


@pytest.fixture(autouse=True)
def _doctest_objects(request: pytest.FixtureRequest, doctest_namespace: dict[str, Any]):
    """Put ``sg``, ``np``, ``pd`` and, when an example names them, the shared slides and model in its namespace."""
    import numpy as np
    import pandas as pd

    import sigmma_sc as sg

    sg.settings.progress_bar = False
    doctest_namespace.update(sg=sg, np=np, pd=pd)
    for name in SHARED:
        doctest_namespace.pop(name, None)
    used = _names(request.node) & set(SHARED)
    if used & {"train", "test"}:
        doctest_namespace["train"], doctest_namespace["test"] = _slides()
    if "model" in used:
        doctest_namespace["model"] = _model()
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
