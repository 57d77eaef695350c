"""The SIGMMA model: model inputs, subgraph batches, GNN layers, contrastive losses, the Lightning module and the Sigmma class.

Only the light pieces are imported here (numpy / scipy / pandas); torch and lightning load inside
the methods that train or embed.
"""

from ._config import NonFiniteLossError, TrainConfig
from ._inputs import (
    apply_feature_scaling,
    apply_section_scaling,
    default_min_detected,
    feature_scaling,
    feature_stats,
    select_genes,
    standardize_features,
)
from ._sigmma import Sigmma, default_context_weight

__all__ = [
    "NonFiniteLossError",
    "Sigmma",
    "TrainConfig",
    "apply_feature_scaling",
    "apply_section_scaling",
    "default_context_weight",
    "default_min_detected",
    "feature_scaling",
    "feature_stats",
    "select_genes",
    "standardize_features",
]
