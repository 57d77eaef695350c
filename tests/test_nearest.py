"""Reference search in float32 blocks (tl._retrieve.nearest) against a float64 brute force."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from sigmma_sc.tl import _metrics as m
from sigmma_sc.tl._retrieve import nearest


def _brute_force(queries, gallery, k):
    """The previous implementation: float64 cosine, full matrix, ties to the lower index."""
    return m.top_k(m.cosine_similarity(queries, gallery), k)


def _assert_same_ranking(idx, sc, ref_idx, ref_sc, sim64):
    np.testing.assert_allclose(sc, ref_sc, atol=2e-6)
    # Orders may differ only between items whose float64 scores are within float32 precision.
    rows, cols = np.nonzero(idx != ref_idx)
    gap = np.abs(sim64[rows, idx[rows, cols]] - sim64[rows, ref_idx[rows, cols]])
    assert (gap < 2e-6).all(), gap.max()


@pytest.mark.parametrize("block_bytes", [256 * 2**20, 20 * 500, 20 * 37, 20])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_nearest_matches_float64_brute_force(block_bytes, k):
    rng = np.random.default_rng(k)
    n, n_gallery = (150, 230) if block_bytes > 20 * 100 else (30, 60)  # tiny blocks: one pair at a time
    q = rng.normal(size=(n, 16))
    g = rng.normal(size=(n_gallery, 16)) * rng.uniform(0.1, 5, size=(n_gallery, 1))
    idx, sc = nearest(q, g, k, block_bytes=block_bytes)
    ref_idx, ref_sc = _brute_force(q, g, k)
    assert idx.shape == sc.shape == (n, k) and idx.dtype == np.int64 and sc.dtype == np.float64
    _assert_same_ranking(idx, sc, ref_idx, ref_sc, m.cosine_similarity(q, g))
    # Random data has no ties within float32 precision here: the very same ranking.
    np.testing.assert_array_equal(idx, ref_idx)


@pytest.mark.parametrize("block_bytes", [256 * 2**20, 20 * 60, 20])
def test_nearest_ties_go_to_the_lower_index_across_blocks(block_bytes):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(5, 4))
    g = base[rng.integers(0, 5, size=90)]  # many exact duplicates, spread over gallery blocks
    g[[3, 40, 77]] = 0.0  # zero rows: similarity 0 to everything
    q = np.vstack([base, np.zeros((2, 4)), rng.normal(size=(10, 4))])  # zero queries tie everything
    for k in (1, 6, 25, 90):
        idx, sc = nearest(q, g, k, block_bytes=block_bytes)
        ref_idx, ref_sc = _brute_force(q, g, k)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(sc, ref_sc, atol=2e-6)
    assert (nearest(np.zeros((1, 4)), g, 4)[0] == np.arange(4)).all()


def test_nearest_infinite_rows_rank_last_and_bounds_as_before():
    q = np.array([[1.0, 0.0], [np.inf, 1.0]])
    g = np.array([[np.inf, 0.0], [1.0, 0.1], [0.0, 1.0]])
    idx, sc = nearest(q, g, 3, block_bytes=12)
    ref_idx, ref_sc = _brute_force(q, g, 3)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sc, ref_sc, atol=2e-6)  # NaN where the old float64 path had NaN
    for bad in (0, 4):
        with pytest.raises(ValueError, match="between 1 and the gallery size 3"):
            nearest(q, g, bad)
    with pytest.raises(ValueError, match="same embedding size"):
        nearest(q, g[:, :1], 1)
    idx, sc = nearest(np.zeros((0, 2)), g, 2)
    assert idx.shape == sc.shape == (0, 2)


def test_nearest_memory_is_one_block_not_the_similarity_matrix():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(600, 32)).astype(np.float32)
    g = rng.normal(size=(50_000, 32)).astype(np.float32)
    budget = 4 * 2**20
    tracemalloc.start()
    try:
        idx, _ = nearest(q, g, 10, block_bytes=budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Unit-length copies of the inputs + one block (+ slack); the full float64 matrix would be 240 MB.
    assert peak < q.nbytes + g.nbytes + 2 * budget, peak / 2**20
    ref = _brute_force(q[:50], g, 10)[0]
    np.testing.assert_array_equal(idx[:50], ref)
