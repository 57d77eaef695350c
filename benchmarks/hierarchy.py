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


def synthetic_cells(n_cells: int, n_sections: int = 2, seed: int = 0):
    """A SpatialData of ``n_cells`` cells (~1 per 100 um2, clustered) without image or genes of note."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from sigmma_sc._constants import Keys

    rng = np.random.default_rng(seed)
    per = n_cells // n_sections
    side = np.sqrt(per * 100.0)
    shapes, obs, xy_all = {}, [], []
    for s in range(n_sections):
        name = f"S{s}"
        # clustered tissue: cells around random centres, clipped to the section square
        centres = rng.uniform(0, side, (per // 500 + 1, 2))
        xy = centres[rng.integers(0, len(centres), per)] + rng.normal(0, side / 40, (per, 2))
        xy = np.clip(xy, 0, side)
        gdf = gpd.GeoDataFrame(
            {"radius": np.full(per, 5.0)}, geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]), index=np.arange(per)
        )
        shapes[f"{name}_cells"] = ShapesModel.parse(gdf, transformations={name: Identity()})
        obs.append(
            pd.DataFrame(
                {Keys.REGION: f"{name}_cells", Keys.INSTANCE: np.arange(per), Keys.SECTION: name},
                index=[f"{name}_{i}" for i in range(per)],
            )
        )
        xy_all.append(xy)
    obs = pd.concat(obs)
    obs[Keys.REGION] = obs[Keys.REGION].astype("category")
    obs[Keys.SECTION] = obs[Keys.SECTION].astype("category")
    n = len(obs)
    counts = sp.random(n, 20, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    table = ad.AnnData(X=counts, obs=obs, obsm={Keys.SPATIAL: np.concatenate(xy_all)})
    table.layers[Keys.COUNTS_LAYER] = counts
    table.uns[Keys.DATASET] = {
        Keys.TECHNOLOGY: "synthetic",
        Keys.UNIT_KIND: "cell",
        Keys.UNIT_DIAMETER: 10.0,
        Keys.LOG_NORMALIZED: False,
        Keys.IMAGE_KEYS: {},
        Keys.SHAPES_KEYS: {f"S{s}": f"S{s}_cells" for s in range(n_sections)},
    }
    table = TableModel.parse(table, region=sorted(shapes), region_key=Keys.REGION, instance_key=Keys.INSTANCE)
    return SpatialData(shapes=shapes, tables={Keys.TABLE: table})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-her2st", action="store_true")
    parser.add_argument("--skip-kidney", action="store_true")
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    args = parser.parse_args()
    sg.settings.progress_bar = False
    sg.settings.verbosity = 1
    # squidpy (and scanpy under it) take ~10 s to import: paid once per process, not per build.
    measure("import squidpy (once per process)", lambda: importlib.import_module("squidpy"))

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
        sdata = measure(f"synthetic: make {args.n_cells} cells", lambda: synthetic_cells(args.n_cells))
        h = measure(f"synthetic: build_hierarchy ({args.n_cells} cells)", lambda: sg.pp.build_hierarchy(sdata))
        describe(h)


if __name__ == "__main__":
    main()
