"""sigmma-sc: multi-scale graph contrastive alignment of H&E histology and spatial transcriptomics.

The top-level import is kept light: torch, squidpy, spatialdata and torch_geometric are
imported inside the functions that need them, so ``import sigmma_sc`` costs well under a second.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._logging import logger
from ._settings import settings

__version__ = "0.1.0"

# squidpy's docstrings make docrep print SyntaxWarnings at import ("'n_jobs' is not a valid key!"):
# noise for users, filtered once here rather than in every notebook.
warnings.filterwarnings("ignore", message=r".* is not a valid key!", category=SyntaxWarning, module=r"docrep")
# tqdm.auto in a Jupyter kernel without ipywidgets warns once and falls back to text bars, which
# work: the package's progress bars should not print a warning into every notebook.
warnings.filterwarnings("ignore", message=r"IProgress not found", module=r"tqdm")

_SUBMODULES = ("datasets", "io", "pp", "tl", "pl", "model")

if TYPE_CHECKING:  # pragma: no cover
    from . import datasets, io, model, pl, pp, tl
    from .model import Sigmma

__all__ = ["datasets", "io", "pp", "tl", "pl", "model", "Sigmma", "settings", "logger", "__version__"]


def __getattr__(name: str) -> Any:
    # Submodules and the model class load on first access, keeping `import sigmma_sc` cheap.
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "Sigmma":
        from .model import Sigmma

        return Sigmma
    raise AttributeError(f"module 'sigmma_sc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
