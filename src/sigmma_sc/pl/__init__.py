"""Plotting: embeddings, clusters and genes over the H&E, hierarchy levels, retrieval, training curves, evaluation."""

from ._embedding import embedding
from ._levels import levels
from ._retrieval import retrieval
from ._spatial import predicted_vs_observed, spatial
from ._tables import evaluation, history

__all__ = ["spatial", "embedding", "levels", "predicted_vs_observed", "retrieval", "history", "evaluation"]
