"""Seconds and peak memory of ``pp.build_hierarchy`` on her2st, the Visium HD kidney and 1M cells.

Run: ``python benchmarks/hierarchy.py [--skip-her2st] [--n-cells 1000000]``.

Peak memory is reported twice: ``traced`` is the peak of allocations made during the build
(tracemalloc, which numpy reports to), ``rss`` the process's maximum resident set size so far
(includes the data set itself).
"""

from __future__ import annotations

import argparse
import importlib
import resource
import time
import tracemalloc

import numpy as np

import sigmma_sc as sg


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, fn) -> object:
    """Run ``fn`` once, print wall seconds, traced peak and process peak RSS."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{name:<42s} {sec:8.1f} s   traced peak {peak / 2**20:8.0f} MiB   rss max {_rss_mb():8.0f} MiB", flush=True)
    return out


def describe(h) -> None:
    for k, lv in h.levels.items():
        mem = "" if lv.members is None else f", members nnz {lv.members.nnz}"
        print(f"    {k:<6s} {lv.n_nodes:>9d} nodes {lv.edges.shape[1]:>10d} edges, fov {lv.fov_um:g} um{mem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-her2st", action="store_true")
    parser.add_argument("--skip-kidney", action="store_true")
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    args = parser.parse_args()
    sg.settings.progress_bar = False
    sg.settings.verbosity = 1
    # squidpy (and scanpy under it) take ~10 s to import: paid once per process, not per build.
    t0 = time.perf_counter()
    importlib.import_module("squidpy")
    print(f"{'import squidpy (once per process)':<42s} {time.perf_counter() - t0:8.1f} s", flush=True)

    if not args.skip_her2st:
        sdata = measure("her2st: load 5 sections", lambda: sg.datasets.her2st())
        measure("her2st: segment_nuclei (5 sections)", lambda: sg.pp.segment_nuclei(sdata))
        h = measure("her2st: build_hierarchy (nuclei present)", lambda: sg.pp.build_hierarchy(sdata))
        describe(h)
        nuc = sdata.shapes
        per_spot = np.bincount(np.concatenate([nuc[f"{s}_nuclei"]["spot"].to_numpy() for s in h.sections]))
        print(f"    nuclei per spot: median {np.median(per_spot):.0f}, 10-90% {np.percentile(per_spot, [10, 90])}")
        del sdata, h

    if not args.skip_kidney:
        sdata = measure("kidney: load 165k bins", lambda: sg.datasets.visium_hd_kidney())
        h = measure("kidney: build_hierarchy", lambda: sg.pp.build_hierarchy(sdata))
        describe(h)
        del sdata, h

    if args.n_cells:
        sdata = measure(
            f"synthetic: make {args.n_cells} cells",
            lambda: sg.datasets.synthetic(n_cells=args.n_cells, n_genes=20, n_sections=2),
        )
        h = measure(f"synthetic: build_hierarchy ({args.n_cells} cells)", lambda: sg.pp.build_hierarchy(sdata))
        describe(h)


if __name__ == "__main__":
    main()
