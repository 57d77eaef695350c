"""Preprocessing: neighbourhood graphs, nuclei, the micro / meso / macro hierarchy, patches and image features."""

import warnings
from typing import Any

from ._bins import bins_to_cells
from ._encoders import Encoder, available_encoders, encoder_from_module, get_encoder, register_encoder
from ._features import FeatureKey, get_features, image_features, section_features
from ._graphs import spatial_graphs
from ._hierarchy import Hierarchy, Level, build_hierarchy, ensure_hierarchy, get_hierarchy
from ._nuclei import segment_nuclei
from ._patches import extract_patches, iter_crops
from ._precomputed import patch_features
from ._stain import fit_stain_normalizer, hed_jitter, normalize_stain
from ._workcopy import light_copy, write_back

__all__ = [
    "Encoder",
    "FeatureKey",
    "Hierarchy",
    "Level",
    "available_encoders",
    "bins_to_cells",
    "build_hierarchy",
    "encoder_from_module",
    "ensure_hierarchy",
    "extract_patches",
    "fit_stain_normalizer",
    "get_encoder",
    "get_features",
    "get_hierarchy",
    "hed_jitter",
    "image_features",
    "iter_crops",
    "light_copy",
    "normalize_stain",
    "patch_features",
    "register_encoder",
    "section_features",
    "segment_nuclei",
    "spatial_graphs",
    "write_back",
]

# Names that moved to sigmma_sc.model (feature scaling is a property of the model's inputs).
_MOVED = {"standardize_features": "sigmma_sc.model"}


def __getattr__(name: str) -> Any:
    # A deprecated alias, resolved at call time: pp itself never depends on the model layer.
    if name in _MOVED:
        import importlib

        warnings.warn(
            f"sigmma_sc.pp.{name} moved to {_MOVED[name]}.{name}; the pp alias will be removed in a future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'sigmma_sc.pp' has no attribute {name!r}")
