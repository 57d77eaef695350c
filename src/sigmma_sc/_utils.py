"""Small helpers every layer may use: library versions and values AnnData can write."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Libraries whose versions shape the package's results (recorded with every model and evaluation).
VERSIONED = (
    "sigmma-sc",
    "numpy",
    "scipy",
    "scikit-learn",
    "torch",
    "lightning",
    "torch-geometric",
    "anndata",
    "spatialdata",
)


def versions() -> dict[str, str]:
    """Installed versions of sigmma-sc and the libraries that shape its results.

    Examples
    --------
    >>> from sigmma_sc._utils import versions
    >>> "numpy" in versions()
    True
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            continue
    return out


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Return a flat dict with tuples as lists and numpy scalars as Python numbers (for ``json.dumps``).

    Examples
    --------
    >>> import numpy as np
    >>> jsonable({"levels": ("meso",), "lr": np.float32(0.5)})
    {'levels': ['meso'], 'lr': 0.5}
    """
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def uns_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Return a dict anndata can write: ``None`` dropped, sequences as arrays, nested dicts kept.

    Examples
    --------
    >>> uns_safe({"levels": ["meso", "macro"], "seed": 0, "checkpoint_dir": None})
    {'levels': array(['meso', 'macro'], dtype=object), 'seed': 0}
    """
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = uns_safe(v)
        elif isinstance(v, tuple | list):
            v = np.asarray([str(x) for x in v], dtype=object) if v and isinstance(v[0], str) else np.asarray(v)
        out[k] = v
    return out
