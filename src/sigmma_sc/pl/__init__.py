"""Plotting: embeddings, clusters and genes over the H&E, hierarchy levels, retrieval, training curves, evaluation."""
