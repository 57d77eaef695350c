"""Helpers shared by several test modules (not a test module itself; ``tests`` is on pytest's ``pythonpath``).

- ``TINY_ENCODER`` / :func:`tiny_patch_encoder` / :func:`tiny_patch_registered`: a fixed random 32-px
  patch encoder (8 features, milliseconds per image on a CPU) standing in for a real image encoder.
- :func:`quiet_single_thread`: one torch thread and no progress bars, both restored afterwards.
- :func:`spot_grid`: the geometry of a grid of spots (graph edges, ring regions, tissue kinds) for
  array-level training inputs.
- :func:`one_section`: one section of a SpatialData as its own object (a train / query split).
- :func:`snapshot` / :func:`assert_unchanged` (with :func:`_table_state` and :func:`_assert_equal`): a
  deep copy of everything a call could change in a SpatialData, and the check that nothing did.
- :func:`_must_not_run`: a stand-in for a step that a refused input must never reach.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp

import sigmma_sc as sg
from sigmma_sc._constants import Keys

# ---------------------------------------------------------------------------------------------
# the tiny patch encoder and the quiet single-thread setup
# ---------------------------------------------------------------------------------------------
TINY_ENCODER = "tiny_patch"


def tiny_patch_encoder(**kwargs):
    """A fixed random 32-px patchifier: dense features in milliseconds instead of EfficientNet's seconds."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 32, stride=32), torch.nn.ReLU())
    return sg.pp.encoder_from_module(net, id=TINY_ENCODER, feature_map=lambda m, x: m(x))


@contextmanager
def tiny_patch_registered() -> Iterator[str]:
    """``TINY_ENCODER`` registered (as :func:`tiny_patch_encoder`) inside the block, unregistered after it."""
    from sigmma_sc.pp import _encoders

    sg.pp.register_encoder(TINY_ENCODER, tiny_patch_encoder)
    try:
        yield TINY_ENCODER
    finally:
        _encoders._REGISTRY.pop(TINY_ENCODER, None)


@contextmanager
def quiet_single_thread() -> Iterator[None]:
    """One torch thread and no progress bars inside the block; both settings restored after it.

    Tiny matrices: one thread avoids OpenMP spin-waits on a shared CPU (10x faster here).
    """
    import torch

    n, bar = torch.get_num_threads(), sg.settings.progress_bar
    torch.set_num_threads(1)
    sg.settings.progress_bar = False
    try:
        yield
    finally:
        torch.set_num_threads(n)
        sg.settings.progress_bar = bar


# ---------------------------------------------------------------------------------------------
# a grid of spots (array-level inputs)
# ---------------------------------------------------------------------------------------------
def spot_grid(n_side: int, n_sec: int) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """Spots 200 µm apart on an ``n_side`` x ``n_side`` grid in each of ``n_sec`` sections.

    Returns the spot graph's ``(2, n_edges)`` edges (the 4 neighbours in the same section), the ring
    regions (spots within 250 µm in the same section, a CSR membership matrix) and each spot's kind
    (0-3, blocks of 3 x 3 spots). Deterministic: draws no random numbers.
    """
    grid = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * 200.0
    xy = np.concatenate([grid] * n_sec)
    sec = np.repeat(np.arange(n_sec), len(grid))
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    same = sec[:, None] == sec[None]
    edges = np.array(np.nonzero((d > 0) & (d <= 201) & same))
    region = sp.csr_matrix(((d <= 250) & same).astype(np.float32))
    kind = ((xy[:, 0] // 600 + xy[:, 1] // 600) % 4).astype(int)
    return edges, region, kind


# ---------------------------------------------------------------------------------------------
# one section of a SpatialData
# ---------------------------------------------------------------------------------------------
def one_section(sdata, section: str):
    """The elements and units of one section as their own SpatialData."""
    from spatialdata import SpatialData

    table = sdata.tables[Keys.TABLE]
    table = table[table.obs[Keys.SECTION] == section].copy()
    table.obs[Keys.REGION] = table.obs[Keys.REGION].astype(str).astype("category")
    table.uns["spatialdata_attrs"]["region"] = sorted(table.obs[Keys.REGION].unique())
    prefix = f"{section}_"
    return SpatialData(
        images={k: v for k, v in sdata.images.items() if k.startswith(prefix)},
        shapes={k: v for k, v in sdata.shapes.items() if k.startswith(prefix)},
        tables={Keys.TABLE: table},
    )


# ---------------------------------------------------------------------------------------------
# a deep snapshot of a SpatialData, to prove an object is exactly as before
# ---------------------------------------------------------------------------------------------
def _table_state(t) -> dict:
    return {
        "obs_names": list(t.obs_names),
        "var_names": list(t.var_names),
        "obs": t.obs.copy(),
        "var": t.var.copy(),
        "X": copy.deepcopy(t.X),
        "layers": copy.deepcopy(dict(t.layers)),
        "obsm": copy.deepcopy(dict(t.obsm)),
        "obsp": copy.deepcopy(dict(t.obsp)),
        "varm": copy.deepcopy(dict(t.varm)),
        "uns": copy.deepcopy(dict(t.uns)),
    }


def snapshot(sdata) -> dict:
    """A deep copy of what a call could change: element names and objects, shapes, every table slot."""
    return {
        "names": {kind: sorted(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")},
        "images": {k: id(v) for k, v in sdata.images.items()},
        "shapes": {k: pd.DataFrame(v).copy() for k, v in sdata.shapes.items()},
        "tables": {k: _table_state(t) for k, t in sdata.tables.items()},
    }


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict), where
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif sp.issparse(a) or sp.issparse(b):
        assert sp.issparse(a) and sp.issparse(b) and a.shape == b.shape and a.dtype == b.dtype, where
        a, b = sp.csr_matrix(a), sp.csr_matrix(b)
        for x in (a, b):
            x.sort_indices()
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices), where
        assert np.array_equal(a.data, b.data, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_unchanged(sdata, before: dict) -> None:
    """``sdata`` is as :func:`snapshot` saw it: the same element names and image objects, equal shapes and tables."""
    after = snapshot(sdata)
    assert after["names"] == before["names"]
    assert after["images"] == before["images"], "an image element was replaced"
    for k, v in before["shapes"].items():
        pd.testing.assert_frame_equal(after["shapes"][k], v)
    _assert_equal(after["tables"], before["tables"], "tables")


def _must_not_run(*args, **kwargs):
    raise AssertionError("reached the hierarchy: the input was checked too late")
