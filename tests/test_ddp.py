"""Multi-process training computes the loss of one process on the global batch.

Two CPU processes (torch.distributed, gloo) each hold half of a global batch of meso subgraphs; the
loss terms and the DDP-averaged gradients must equal those of one process on the whole batch, with
the default coarse targets (soft + disjoint regions, whose mask is drawn on the global batch).
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

WORLD = 2
#: Batch seeds of rank 0 and rank 1; one process on the global batch draws with rank 0's.
SEEDS = (11, 23)
#: Two layouts: one region per niche (the hierarchy's) and regions of 2 x 2 niches shared across ranks.
CASES = ("ring", "shared")
TERMS = ("loss", "loss_micro", "loss_meso", "loss_macro", "loss_consistency")


def _grid_edges(n_side: int, reach: int) -> np.ndarray:
    """Both-direction edges of an ``n_side`` x ``n_side`` grid (4-neighbours or 8 with ``reach=8``)."""
    r, c = np.divmod(np.arange(n_side * n_side), n_side)
    d = np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])
    cheb = np.maximum(np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None]))
    adj = (cheb == 1) if reach == 8 else (d == 1)
    return np.array(np.nonzero(adj), dtype=np.int64)


def cell_levels(case: str, n_side: int = 12, cell_side: int = 2, n_feat: int = 12, n_genes: int = 20, seed: int = 0):
    """Cells on a grid -> square niches of ``cell_side``^2 cells -> regions (niche(s) + ring of niches)."""
    from sigmma_sc.model._data import ExpressionSource, LevelInput

    rng = np.random.default_rng(seed)
    n_cell_side = n_side * cell_side
    n_cells = n_cell_side**2
    cr, cc = np.divmod(np.arange(n_cells), n_cell_side)
    niche = (cr // cell_side) * n_side + cc // cell_side
    n_niche = n_side * n_side
    niche_members = sp.csr_matrix((np.ones(n_cells, np.float32), (niche, np.arange(n_cells))), shape=(n_niche, n_cells))
    nr, nc = np.divmod(np.arange(n_niche), n_side)
    if case == "ring":
        block, n_macro = np.arange(n_niche), n_niche
        br, bc, size = nr, nc, 1
    else:
        half = n_side // 2
        block = (nr // 2) * half + nc // 2
        n_macro = half * half
        br, bc, size = 2 * (np.arange(n_macro) // half), 2 * (np.arange(n_macro) % half), 2
    # Region = the block's niches and every niche within one step of the block.
    inside_r = (nr[None] >= br[:, None] - 1) & (nr[None] <= br[:, None] + size)
    inside_c = (nc[None] >= bc[:, None] - 1) & (nc[None] <= bc[:, None] + size)
    ring = sp.csr_matrix((inside_r & inside_c).astype(np.float32))
    region_members = sp.csr_matrix(ring @ niche_members)
    counts = sp.csr_matrix(rng.poisson(rng.gamma(1.0, 2.0, size=(n_cells, n_genes))).astype(np.float32))
    f_micro = rng.normal(size=(n_cells, n_feat)).astype(np.float32)
    f_meso = rng.normal(size=(n_niche, n_feat)).astype(np.float32)
    f_macro = rng.normal(size=(n_macro, n_feat)).astype(np.float32)
    levels = {
        "micro": LevelInput(
            "micro", n_cells, _grid_edges(n_cell_side, 4), niche, f_micro, sp.identity(n_cells, format="csr")
        ),
        "meso": LevelInput("meso", n_niche, _grid_edges(n_side, 8), block, f_meso, niche_members),
        "macro": LevelInput("macro", n_macro, np.zeros((2, 0), np.int64), None, f_macro, region_members),
    }
    src = ExpressionSource.from_counts(counts, np.arange(n_genes), log_normalized=False)
    return levels, src


def global_batch(case: str) -> tuple[np.ndarray, np.ndarray]:
    """Rank 0's and rank 1's meso targets (9 + 10 niches of the 12 x 12 grid).

    ``ring`` (a region per niche, 3 x 3 niches): pairs of neighbouring niches, one on each rank (their
    regions overlap), pairs far enough apart not to overlap, and one more niche on rank 1 overlapping
    a pair. ``shared`` (a region per 2 x 2 block, 4 x 4 niches): both ranks hold a niche of the same
    9 blocks (the same regions on both ranks), and rank 1 one more block overlapping 4 of them.
    """
    n = 12
    if case == "ring":
        left = [r * n + c for r in (1, 5, 9) for c in (1, 5, 9)]
        return np.array(left), np.array([i + 1 for i in left] + [3 * n + 3])
    left = [2 * br * n + 2 * bc for br in (0, 2, 4) for bc in (0, 2, 4)]
    return np.array(left), np.array([i + 1 for i in left] + [2 * n + 2])


def setup(case: str):
    """``(batcher, module)`` with the default coarse targets, dropout off (a deterministic forward)."""
    import torch

    from sigmma_sc.model._core import TrainConfig, build_module, make_batcher, module_dims
    from sigmma_sc.model._data import expression_stats

    levels, src = cell_levels(case)
    cfg = TrainConfig(embed_dim=16, hidden_dim=32, heads=2, dropout=0.0)
    assert cfg.coarse_targets == "soft+disjoint"
    stats = expression_stats(levels, src, {"meso": np.arange(levels["meso"].n)})
    batcher = make_batcher(levels, cfg, src, stats)
    torch.manual_seed(0)
    module = build_module(*module_dims(levels, batcher, src.units.shape[1]), cfg)
    return batcher, module


def loss_and_grads(batcher, module, ids: np.ndarray, seed: int) -> tuple[dict, dict]:
    """Loss terms and parameter gradients of one batch (gradients DDP-averaged across ranks)."""
    import torch
    import torch.distributed as dist

    batch = batcher.batch(ids, seed=seed, max_micro_pairs=None, max_children=None)
    module.zero_grad(set_to_none=True)
    z = module(batch)
    terms = module.criterion(z["img"], z["expr"], batch)
    terms["loss"].backward()
    grads = {}
    for name, p in module.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(g)  # what DDP does: the mean over ranks
            g /= dist.get_world_size()
        grads[name] = g
    out = {k: float(v.detach()) for k, v in terms.items()}
    if dist.is_initialized():
        from sigmma_sc.model._losses import info_nce

        # The former behaviour, for contrast: each rank masks its own regions before the gather.
        with torch.no_grad():
            old = info_nce(
                z["img"]["macro"],
                z["expr"]["macro"],
                module.criterion.scale("macro"),
                soft=True,
                mask=batch["macro_loss_mask"],
            )
        out["old_loss_macro"] = float(old)
    return out, grads


def _worker(rank: int, port: int, tmp: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        for case in CASES:
            batcher, module = setup(case)
            module.load_state_dict(torch.load(Path(tmp) / f"{case}_state.pt"))
            terms, grads = loss_and_grads(batcher, module, global_batch(case)[rank], SEEDS[rank])
            if rank == 0:
                torch.save({"terms": terms, "grads": grads}, Path(tmp) / f"{case}_ddp.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from sigmma_sc.model._losses import coarse_rows

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; and no OpenMP pool for the forked workers to inherit
    try:
        _run(tmp_path, coarse_rows, mp)
    finally:
        torch.set_num_threads(n_threads)


def _run(tmp_path, coarse_rows, mp) -> None:
    import torch

    refs = {}
    for case in CASES:
        batcher, module = setup(case)
        torch.save(module.state_dict(), tmp_path / f"{case}_state.pt")
        halves = global_batch(case)
        # The batch of one process: both halves, concatenated, drawn with rank 0's seed.
        refs[case] = loss_and_grads(batcher, module, np.concatenate(halves), SEEDS[0])
        # The global draw on one process is the batcher's own mask (single-process runs unchanged).
        batch = batcher.batch(np.concatenate(halves), seed=SEEDS[0])
        rows = coarse_rows(batch, "macro", disjoint=True).numpy()
        np.testing.assert_array_equal(rows, np.flatnonzero(batch["macro_loss_mask"].numpy()))

    # fork: the workers inherit the imported modules (spawn re-imports torch and lightning in each,
    # ~20 s on a busy 2-core machine); spawn where fork does not exist, the worker then imported by
    # name (pytest imports this file with --import-mode=importlib).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        worker = _worker if method == "fork" else importlib.import_module("test_ddp")._worker
        ctx = mp.start_processes(
            worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method=method
        )
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the two-process run did not finish in 180 s (a collective mismatch?)")
    finally:
        sys.path.remove(here)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    for case in CASES:
        ref_terms, ref_grads = refs[case]
        got = torch.load(tmp_path / f"{case}_ddp.pt")
        for name in TERMS:
            assert got["terms"][name] == pytest.approx(ref_terms[name], rel=1e-5, abs=1e-6), (case, name)
        # Masking each rank's regions before the gather (the former behaviour) gives another loss.
        assert abs(got["terms"]["old_loss_macro"] - ref_terms["loss_macro"]) > 1e-3, case
        assert got["grads"].keys() == ref_grads.keys()
        n_nonzero = 0
        for name, g in ref_grads.items():
            torch.testing.assert_close(
                got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name, c=case: f"{c} {n}: {m}"
            )
            n_nonzero += bool(g.abs().sum() > 0)
        assert n_nonzero > 0.9 * len(ref_grads)
