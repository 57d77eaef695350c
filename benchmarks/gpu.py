"""Throughput, peak memory and GPU busy time of the model core on synthetic cells (100k and 1M).

Run from the source tree (no install needed)::

    PYTHONPATH=src python benchmarks/gpu.py --out gpu.json              # CUDA, 100k and 1M cells
    PYTHONPATH=src python benchmarks/gpu.py --cells 2000 --device cpu   # a quick check without a GPU

Needs only torch, lightning, torch-geometric, numpy, scipy and pandas: the inputs are arrays handed
to the array-level API of ``sigmma_sc.model`` (``LevelInput``, ``ExpressionSource``, ``train``,
``make_batcher``, ``embed_nodes``, ``unit_embeddings``); anndata, scanpy, spatialdata and squidpy are
never imported (the JSON records which of them ended up loaded: none is expected).

The slide: cells on a 10 um grid with Poisson counts of ``--genes`` genes (micro, the units), square
niches of 10 x 10 cells (meso, 100 um), and one region per niche: the niche and its ring of niches
within 250 um (macro, 21 niches), as ``pp.build_hierarchy`` builds for cell data. Cells are joined to
their 8 grid neighbours, niches too; random image features (``--features`` channels) per node of
every level, with a tissue-type signal shared by features and counts.

Measured for each size:

- ``train``: ``_core.train`` (Lightning, bf16 mixed precision on CUDA, the package defaults:
  batches of 64 niches, bags of 16 cells, 10% validation) for ``--epochs`` epochs on at most
  ``--max-train-niches`` niches of the slide (a random subset; its batches still read the graphs of
  the whole slide). ``cells_per_s`` = cells of the training niches x epochs / seconds of
  ``trainer.fit`` (validation included); ``peak_gpu_mib`` = ``torch.cuda.max_memory_allocated``
  over the fit.
- ``infer``: ``_core.embed_nodes`` over every niche (all cells of every subgraph, bf16 autocast on
  CUDA), then ``unit_embeddings`` for every cell (numpy, timed apart). ``cells_per_s`` = all cells /
  seconds of ``embed_nodes``.
- ``busy_fraction``: the share of wall time the device is busy, measured on a window of
  ``--profile-steps`` batches (after 2 warm-up batches) of the same work run outside Lightning
  (training: batch build, forward, loss, backward, clipping, AdamW step; inference: batch build and
  forward): ``torch.profiler`` records the device activity (CUDA kernels, memcpy and memset) and the
  union of their time intervals is divided by the wall time of the window. On CPU the same union is
  taken over the torch operators instead (time inside torch ops vs wall).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

#: Modules a stock CUDA image lacks; the benchmark must not load them.
HEAVY = ("anndata", "scanpy", "spatialdata", "squidpy")
CELL_PITCH_UM = 10.0
NICHE_CELLS = 10  # niche side in cells: 100 um niches
REGION_RADIUS_NICHES = 2.5  # 250 um ring radius / 100 um niches
N_TYPES = 8
CHUNK = 65536


# ---------------------------------------------------------------------------------------------------------------
# synthetic slide
# ---------------------------------------------------------------------------------------------------------------
def grid_edges(h: int, w: int, offsets: list[tuple[int, int]], *, valid: np.ndarray | None = None) -> np.ndarray:
    """``(2, E)`` int64 edges, both directions, between the cells of an ``h x w`` row-major grid.

    ``offsets`` are ``(drow, dcol)`` half-offsets (each pair is joined both ways); ``valid`` masks the
    grid positions that exist (row-major ids are then those of the full grid).
    """
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    parts = []
    for dr, dc in offsets:
        r2, c2 = rows + dr, cols + dc
        ok = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        a, b = np.flatnonzero(ok), (r2 * w + c2)[ok]
        if valid is not None:
            keep = valid[a] & valid[b]
            a, b = a[keep], b[keep]
        parts += [np.stack([a, b]), np.stack([b, a])]
    return np.concatenate(parts, axis=1) if parts else np.zeros((2, 0), np.int64)


def ring_matrix(h: int, w: int, radius: float) -> sp.csr_matrix:
    """``(h*w, h*w)`` 0/1: node ``i`` row holds every node whose grid distance to ``i`` is <= ``radius``."""
    r = int(math.floor(radius))
    offs = [(dr, dc) for dr in range(-r, r + 1) for dc in range(-r, r + 1) if dr * dr + dc * dc <= radius * radius]
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    src, dst = [], []
    for dr, dc in offs:
        r2, c2 = rows + dr, cols + dc
        ok = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        src.append(np.flatnonzero(ok))
        dst.append((r2 * w + c2)[ok])
    src, dst = np.concatenate(src), np.concatenate(dst)
    return sp.csr_matrix((np.ones(src.size, np.float32), (src, dst)), shape=(h * w, h * w))


#: Rows of the per-type pools that features and counts are drawn from (fast at millions of rows).
POOL = 4096


def random_features(types: np.ndarray, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float32 rows ``centers[type] + N(0, 1)`` noise, each a random row of a per-type pool of ``POOL`` draws."""
    n_types, f = centers.shape
    pool = rng.standard_normal((n_types * POOL, f), dtype=np.float32)
    pool += np.repeat(centers, POOL, axis=0)
    out = np.empty((types.size, f), dtype=np.float32)
    for start in range(0, types.size, CHUNK):
        t = types[start : start + CHUNK]
        out[start : start + t.size] = pool[t * POOL + rng.integers(0, POOL, t.size)]
    return out


def poisson_counts(types: np.ndarray, profiles: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """``(n, n_genes)`` CSR of Poisson counts with means ``profiles[type]``.

    Each cell's row is a random row of a per-type pool of ``POOL`` Poisson draws (same sparsity and
    library sizes as independent draws, at the cost of a row gather).
    """
    lam = np.repeat(profiles, POOL, axis=0)
    pool = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    return pool[types * POOL + rng.integers(0, POOL, types.size)]


def synthetic_slide(n_cells: int, *, n_genes: int, n_feat: int, seed: int = 0) -> dict:
    """Levels (micro cells / meso niches / macro regions) and counts of about ``n_cells`` cells.

    The cell grid is ``W x H`` with ``W`` a multiple of the niche side and ``H = ceil(n / W)``: the
    actual number of cells is ``W * H`` (within one grid row of the request).
    """
    from sigmma_sc.model._data import LevelInput

    rng = np.random.default_rng(seed)
    w = NICHE_CELLS * max(1, math.ceil(math.sqrt(n_cells) / NICHE_CELLS))
    h = max(1, math.ceil(n_cells / w))
    n = w * h
    rows, cols = np.divmod(np.arange(n, dtype=np.int64), w)
    nw, nh = w // NICHE_CELLS, math.ceil(h / NICHE_CELLS)
    m = nw * nh
    niche = (rows // NICHE_CELLS) * nw + cols // NICHE_CELLS
    niche_members = sp.csr_matrix((np.ones(n, np.float32), (niche, np.arange(n))), shape=(m, n))
    # Tissue types: 300 um patches of niches, plus 20% of cells of a random other type.
    nr, nc = np.divmod(np.arange(m), nw)
    niche_type = ((nr // 3) * 7 + (nc // 3) * 3) % N_TYPES
    cell_type = niche_type[niche].copy()
    flip = rng.random(n) < 0.2
    cell_type[flip] = rng.integers(0, N_TYPES, int(flip.sum()))
    centers = rng.normal(0.0, 0.5, size=(N_TYPES, n_feat)).astype(np.float32)
    profiles = rng.gamma(0.3, 1.0, size=(N_TYPES, n_genes)) + 0.01
    profiles *= 100.0 / profiles.sum(1, keepdims=True)  # ~100 counts per cell
    counts = poisson_counts(cell_type, profiles, rng)

    eight = [(0, 1), (1, 0), (1, 1), (1, -1)]
    ring = ring_matrix(nh, nw, REGION_RADIUS_NICHES)
    niche_edges = grid_edges(nh, nw, eight)
    levels = {
        "micro": LevelInput(
            "micro",
            n,
            grid_edges(h, w, eight),
            niche,
            random_features(cell_type, centers, rng),
            sp.identity(n, format="csr", dtype=np.float32),
        ),
        "meso": LevelInput(
            "meso",
            m,
            niche_edges,
            np.arange(m, dtype=np.int64),
            random_features(niche_type, centers, rng),
            niche_members,
        ),
        "macro": LevelInput(
            "macro",
            m,
            niche_edges,
            None,
            random_features(niche_type, centers, rng),
            sp.csr_matrix(ring @ niche_members),
        ),
    }
    return {"levels": levels, "counts": counts, "n_cells": n, "n_niches": m}


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def busy_fraction(step, n_steps: int, device: str) -> dict:
    """Run ``step(i)`` for ``i < n_steps`` under ``torch.profiler``; union of device activity / wall time.

    CUDA: device events (kernels, memcpy, memset) recorded with the CUDA activity only (no CPU op
    tracing overhead); if that yields no device event, again with CPU + CUDA activities. CPU: the
    torch operators' intervals.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    tries = (
        [[ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]]
        if device == "cuda"
        else [[ProfilerActivity.CPU]]
    )
    want = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    errors = []
    for activities in tries:
        _sync(device)
        try:
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for i in range(n_steps):
                    step(i)
                _sync(device)
                wall = time.perf_counter() - t0
            intervals = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == want]
        except Exception as err:  # a profiler that cannot run here: try the next activities
            errors.append(f"{'+'.join(a.name for a in activities)}: {type(err).__name__}: {err}")
            continue
        if intervals:
            busy = _union_us(intervals) / 1e6
            return {
                "busy_fraction": round(busy / wall, 4),
                "busy_s": round(busy, 4),
                "window_wall_s": round(wall, 4),
                "window_steps": n_steps,
                "n_events": len(intervals),
                "method": (
                    "torch.profiler "
                    + "+".join(a.name for a in activities)
                    + ": union of "
                    + ("CUDA kernel/memcpy/memset intervals" if device == "cuda" else "CPU torch-op intervals")
                    + " / wall time of the window"
                ),
            }
    return {
        "busy_fraction": None,
        "method": "torch.profiler recorded no device event",
        "window_steps": n_steps,
        "errors": errors,
    }


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _autocast(device: str):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def profile_training(module, data, device: str, n_steps: int) -> dict:
    """Busy fraction of the training step run outside Lightning (bf16 autocast on CUDA)."""
    import torch

    module = module.to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=module.lr, weight_decay=module.weight_decay)

    def step(i: int) -> None:
        batch = _to(data[i % len(data)], device)
        with _autocast(device):
            z = module(batch)
            loss = module.criterion(z["img"], z["expr"], batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()

    for i in range(min(2, len(data))):  # warm-up: cuBLAS handles, allocator pools
        step(i)
    out = busy_fraction(lambda i: step(i + 2), n_steps, device)
    out["steps_per_s"] = round(n_steps / out["window_wall_s"], 3) if out.get("window_wall_s") else None
    return out


def profile_inference(module, data, device: str, n_steps: int) -> dict:
    """Busy fraction of the embedding pass (batch build + forward, bf16 autocast on CUDA)."""
    import torch

    module = module.to(device).eval()

    @torch.no_grad()
    def step(i: int) -> None:
        batch = _to(data[i % len(data)], device)
        with _autocast(device):
            module(batch)

    for i in range(min(2, len(data))):
        step(i)
    out = busy_fraction(lambda i: step(i + 2), n_steps, device)
    out["steps_per_s"] = round(n_steps / out["window_wall_s"], 3) if out.get("window_wall_s") else None
    return out


def run_size(n_request: int, args, res: dict, save) -> dict:
    """Build, train, embed and profile one size; ``res`` is filled in place and ``save()`` called after each step."""
    import torch

    from sigmma_sc._settings import settings
    from sigmma_sc.model._core import TrainConfig, embed_nodes, make_batcher, split_nodes, train, unit_embeddings
    from sigmma_sc.model._data import MAX_MICRO_PAIRS, ExpressionSource
    from sigmma_sc.model._module import SubgraphBatches

    settings.progress_bar = False
    device = args.device
    cuda = device == "cuda"
    res["cells_requested"] = n_request
    t0 = time.perf_counter()
    slide = synthetic_slide(n_request, n_genes=args.genes, n_feat=args.features, seed=args.seed)
    levels, counts = slide["levels"], slide["counts"]
    source = ExpressionSource.from_counts(counts, np.arange(counts.shape[1]), log_normalized=False)
    res.update(
        n_cells=slide["n_cells"],
        n_niches=slide["n_niches"],
        n_genes=int(counts.shape[1]),
        n_features=args.features,
        cell_edges=int(levels["micro"].edges.shape[1]),
        region_member_cells=int(levels["macro"].members.nnz),
        build_s=round(time.perf_counter() - t0, 2),
    )
    print(
        f"[{res['n_cells']:,} cells] {res['n_niches']:,} niches, {res['cell_edges']:,} cell edges, "
        f"built in {res['build_s']:.1f} s",
        flush=True,
    )
    save()

    cfg = TrainConfig(
        max_epochs=args.epochs,
        patience=args.epochs + 1,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        seed=args.seed,
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # Train on at most --max-train-niches niches (a random subset of the whole slide's graph).
    pool = np.arange(slide["n_niches"])
    if 0 < args.max_train_niches < pool.size:
        pool = np.sort(np.random.default_rng(args.seed).choice(pool, args.max_train_niches, replace=False))
    tr, _ = split_nodes(pool.size, cfg.val_fraction, cfg.seed)  # the split train() makes
    cells_per_niche = np.bincount(levels["micro"].parent, minlength=slide["n_niches"])
    train_cells = int(cells_per_niche[pool[tr]].sum())
    t0 = time.perf_counter()
    module, history, stats, fit_s = train(levels, source, cfg, nodes=pool)
    total_s = time.perf_counter() - t0
    epochs = int(history["epoch"].max())
    res["train"] = {
        "niches": int(pool.size),
        "train_niches": int(tr.size),
        "train_cells": train_cells,
        "epochs": epochs,
        "fit_s": round(fit_s, 2),
        "total_s": round(total_s, 2),
        "cells_per_s": round(train_cells * epochs / fit_s, 1),
        "niches_per_s": round(tr.size * epochs / fit_s, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "precision": "bf16-mixed" if cuda else "32-true",
        "loss_first_last": [
            round(float(history["train_loss"].iloc[0]), 4),
            round(float(history["train_loss"].iloc[-1]), 4),
        ],
    }
    print(
        f"  train: {tr.size:,} niches ({train_cells:,} cells), {epochs} epochs, fit {fit_s:.1f} s (train() {total_s:.1f} s), "
        f"{res['train']['cells_per_s']:,.0f} cells/s, peak GPU {res['train']['peak_gpu_mib']} MiB, "
        f"loss {res['train']['loss_first_last'][0]:.3f} -> {res['train']['loss_first_last'][1]:.3f}",
        flush=True,
    )
    save()

    batcher = make_batcher(levels, cfg, source, stats)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    module = module.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with _autocast(device):
        nodes = embed_nodes(module, batcher, batch_size=cfg.batch_size, expression=True)
    _sync(device)
    embed_s = time.perf_counter() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    t0 = time.perf_counter()
    emb = unit_embeddings(nodes, levels, "micro", res["n_cells"])
    unit_s = time.perf_counter() - t0
    res["infer"] = {
        "embed_s": round(embed_s, 2),
        "cells_per_s": round(res["n_cells"] / embed_s, 1),
        "unit_embeddings_s": round(unit_s, 2),
        "peak_gpu_mib": peak,
        "precision": "bf16 autocast" if cuda else "fp32",
        "joint_shape": list(emb["joint"].shape),
        "finite": bool(np.isfinite(emb["joint"]).all()),
    }
    print(
        f"  infer: embed_nodes {embed_s:.1f} s, {res['infer']['cells_per_s']:,.0f} cells/s, "
        f"unit_embeddings {unit_s:.1f} s, peak GPU {peak} MiB, joint {tuple(emb['joint'].shape)}",
        flush=True,
    )
    save()
    del nodes, emb

    # Busy fraction on a window of batches, outside Lightning.
    train_data = SubgraphBatches(
        batcher,
        np.arange(slide["n_niches"]),
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        max_micro_pairs=MAX_MICRO_PAIRS,
        max_children=cfg.max_cells,
        max_context_children=cfg.context_cells("cell"),
    )
    infer_data = SubgraphBatches(
        batcher, np.arange(slide["n_niches"]), batch_size=cfg.batch_size, shuffle=False, max_micro_pairs=None
    )
    try:
        res["train"]["busy"] = profile_training(module, train_data, device, args.profile_steps)
        res["infer"]["busy"] = profile_inference(module, infer_data, device, args.profile_steps)
    except Exception as err:  # the throughput numbers above stand without the profile
        res["busy_error"] = f"{type(err).__name__}: {err}"
    for part in ("train", "infer"):
        b = res[part].get("busy", {})
        print(
            f"  {part} busy: {b.get('busy_fraction')} of {b.get('window_wall_s')} s over "
            f"{b.get('window_steps')} batches ({b.get('method')})",
            flush=True,
        )
    if "busy_error" in res:
        print(f"  busy: failed: {res['busy_error']}", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", default="100000,1000000", help="comma-separated cell counts (default 100000,1000000)"
    )
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per size (default 1)")
    parser.add_argument(
        "--max-train-niches",
        type=int,
        default=4096,
        help="train on a random subset of at most this many niches, 10%% of them for validation (0: all)",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rewritten after each size)")
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--features", type=int, default=1280, help="image feature channels at every level")
    parser.add_argument(
        "--profile-steps", type=int, default=None, help="batches in each profiled window (default 20 on CUDA, 3 on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.profile_steps is None:
        args.profile_steps = 20 if args.device == "cuda" else 3

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu)")
    torch.manual_seed(args.seed)
    out = {
        "benchmark": "benchmarks/gpu.py",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "args": vars(args),
        "results": [],
    }

    def save() -> None:
        out["heavy_modules_loaded"] = [m for m in HEAVY if m in sys.modules]
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2))

    for n in [int(float(x)) for x in args.cells.split(",") if x.strip()]:
        t0 = time.perf_counter()
        res: dict = {}
        out["results"].append(res)
        run_size(n, args, res, save)
        res["total_s"] = round(time.perf_counter() - t0, 1)
        print(f"  total {res['total_s']:.0f} s", flush=True)
        save()
    print(f"heavy modules loaded: {out.get('heavy_modules_loaded')}", flush=True)
    return out


if __name__ == "__main__":
    main()
