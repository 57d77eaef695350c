"""Integration benchmark: does each representation mix sections while keeping tissue structure?

For every representation of the units, the kNN (k=15) other-section share and the share of units in
Leiden (resolution 1) clusters holding >= 5 units in >= 3 sections (``sigmma_sc.tl.integration_metrics``),
plus, on synthetic data, the ARI of those clusters against the true niches. Representations:

- ``expr_pca``: expression PCA (log1p(normalize_total), 2,000 HVGs, 30 PCs) of all units together;
- ``expr_pca_section``: the same with each section's genes centred on the section's mean (what
  per-section expression statistics would feed a model);
- ``img_raw``: meso image features as cached (z-scored with the statistics of all units, PCA 30);
- ``img_section``: the same features z-scored per section (the model's input, ``feature_norm="section"``);
- per fitted variant: ``X_sigmma_img``, ``X_sigmma`` and ``X_sigmma_expr``.

Every variant is a ``tl.fit`` on all sections (``seed``, ``--epochs``) with some keywords changed; the
diagnostic variants of the README table (negatives within / across sections, coarse levels off,
consistency off, no inter-subgraph graph context, global feature scaling):

    python benchmarks/integration.py --dataset her2st --sections C2,C3,C4,C5,C6 \
        --variants within,across,across_no_macro --epochs 10 --out results_integration_her2st.json
    python benchmarks/integration.py --dataset synthetic --n-sections 3 --n-cells 4500 \
        --stain-shift 0.2 --depth-shift 0.5 --variants within,across --out results_integration_synthetic.json

her2st image features come from the per-section cache of ``benchmarks/quality.py`` (``--cache``), so
reruns do not re-encode the slides. The JSON (rewritten after every variant) holds the protocol and
``{"rows": [{"variant", "representation", "knn_other_batch", "shared_clusters", "n_clusters", "ari"?, ...}]}``.
Measured under a shared 2-core CPU: fit seconds are comparable only within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import sigmma_sc as sg
from sigmma_sc._constants import Keys, Levels

#: Named tl.fit keyword sets; "within" is the package default (batch_key="section").
VARIANTS: dict[str, dict[str, Any]] = {
    "within": {},
    "across": {"batch_key": None},
    "across_no_macro": {"batch_key": None, "levels": [Levels.MICRO, Levels.MESO]},
    "across_no_consistency": {"batch_key": None, "consistency_weight": 0.0},
    "across_no_context": {"batch_key": None, "inter_layers": 0},
    "across_global_features": {"batch_key": None, "feature_norm": "global"},
    "across_single_scale": {"batch_key": None, "levels": [Levels.MESO], "graph": False},
    "within_no_macro": {"levels": [Levels.MICRO, Levels.MESO]},
}
EMBEDDINGS = {"X_sigmma_img": "img", "X_sigmma": "joint", "X_sigmma_expr": "expr"}
N_PCS = 30
N_HVG = 2000


def expression_pca(table, *, by_section: bool, seed: int) -> np.ndarray:
    """PCA (30) of log1p(normalize_total) counts on 2,000 HVGs; optionally genes centred per section first."""
    import anndata as ad
    import scanpy as sc

    counts = table.layers[Keys.COUNTS_LAYER] if Keys.COUNTS_LAYER in table.layers else table.X
    a = ad.AnnData(counts.astype(np.float32), obs=table.obs[[Keys.SECTION]].copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(N_HVG, a.n_vars))
    x = np.asarray(a[:, a.var["highly_variable"]].X.todense() if hasattr(a.X, "todense") else a.X, dtype=np.float64)
    if by_section:
        x = _centre_by(x, a.obs[Keys.SECTION].to_numpy(), scale=False)
    return _pca(x, seed=seed)


def _centre_by(x: np.ndarray, groups: np.ndarray, *, scale: bool) -> np.ndarray:
    out = np.array(x, dtype=np.float64, copy=True)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] -= out[rows].mean(axis=0)
        if scale:
            out[rows] /= np.maximum(out[rows].std(axis=0), 1e-6)
    return out


def _pca(x: np.ndarray, *, seed: int, standardise: bool = False) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    if standardise:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    return PCA(n_components=min(N_PCS, *x.shape), random_state=seed).fit_transform(x).astype(np.float32)


def image_inputs(sdata, *, seed: int) -> dict[str, np.ndarray]:
    """Meso image features of every unit: globally z-scored and per-section z-scored, each PCA 30."""
    _, hier = sg.pp.ensure_hierarchy(sdata, require_image=False)
    feats = sg.pp.get_features(sdata)[Levels.MESO][hier.unit_nodes(Levels.MESO)]
    sections = sdata.tables[Keys.TABLE].obs[Keys.SECTION].astype(str).to_numpy()
    return {
        "img_raw": _pca(feats, seed=seed, standardise=True),
        "img_section": _pca(_centre_by(feats, sections, scale=True), seed=seed),
    }


def measure(table, rep: str, *, labels_key: str | None, seed: int) -> dict[str, float]:
    return sg.tl.integration_metrics(table, use_rep=rep, labels_key=labels_key, seed=seed)


def load(args):
    """The SpatialData to integrate, with its hierarchy and image features ready, and the truth column."""
    if args.dataset == "synthetic":
        sdata = sg.datasets.synthetic(
            args.n_cells,
            n_genes=args.n_genes,
            n_sections=args.n_sections,
            seed=args.data_seed,
            stain_shift=args.stain_shift,
            depth_shift=args.depth_shift,
        )
        sg.pp.image_features(sdata)
        return sdata, Keys.NICHE
    sys.path.insert(0, str(Path(__file__).parent))
    import quality  # the benchmark's per-section feature cache

    folder = Path(args.data).resolve() if args.data else Path("default")
    tag = f"her2st-{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    sections = [s for s in args.sections.split(",") if s]

    def read(secs):
        return sg.datasets.her2st(args.data, sections=secs)

    return quality.prepare(read, tag, sections, Path(args.cache)), None


def print_table(rows: list[dict[str, Any]]) -> None:
    has_ari = any("ari" in r for r in rows)
    head = f"{'variant':<24}{'representation':<20}{'kNN other-section':>19}{'shared clusters':>17}{'clusters':>10}"
    print("\n" + head + (f"{'ARI niches':>12}" if has_ari else ""))
    for r in rows:
        line = (
            f"{r['variant']:<24}{r['representation']:<20}{r['knn_other_batch']:>19.3f}"
            f"{100 * r['shared_clusters']:>16.0f}%{int(r['n_clusters']):>10d}"
        )
        print(line + (f"{r['ari']:>12.3f}" if "ari" in r else ""))
    if rows:
        print(f"uniform mixing: kNN other-section share {rows[0]['knn_other_batch_uniform']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("her2st", "synthetic"), required=True)
    p.add_argument("--data", default=None, help="her2st folder (default: sigmma_sc.datasets path resolution)")
    p.add_argument("--sections", default="C2,C3,C4,C5,C6", help="her2st sections")
    p.add_argument("--n-sections", type=int, default=3, help="synthetic sections")
    p.add_argument("--n-cells", type=int, default=4500)
    p.add_argument("--n-genes", type=int, default=100)
    p.add_argument("--stain-shift", type=float, default=0.2)
    p.add_argument("--depth-shift", type=float, default=0.5)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--variants", default="within,across", help=f"comma-separated, from {sorted(VARIANTS)}")
    p.add_argument("--fit", default="{}", help="extra tl.fit arguments for every variant, as JSON")
    p.add_argument("--epochs", type=int, default=None, help="max_epochs of every fit (default: tl.fit's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-inputs", action="store_true", help="skip the input representations")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "sigmma_sc" / "benchmarks"))
    p.add_argument("--out", default="results_integration.json")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}.")
    extra = json.loads(args.fit)
    if args.epochs is not None:
        extra["max_epochs"] = args.epochs

    sg.settings.progress_bar = False
    t_start = time.perf_counter()
    sdata, labels_key = load(args)
    table = sdata.tables[Keys.TABLE]
    rows: list[dict[str, Any]] = []
    protocol = {
        "dataset": args.dataset,
        "command": " ".join(sys.argv),
        "n_units": int(table.n_obs),
        "sections": sorted(table.obs[Keys.SECTION].astype(str).unique()),
        "seed": args.seed,
        "fit_kwargs": extra,
        "metrics": "tl.integration_metrics: kNN k=15 other-section share; units in Leiden (res 1, scanpy "
        "neighbors k=15) clusters with >= 5 units in >= 3 sections; ARI of the clusters vs obs['niche']",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shared",
    }
    if args.dataset == "synthetic":
        protocol.update(
            {
                k: getattr(args, k)
                for k in ("n_sections", "n_cells", "n_genes", "stain_shift", "depth_shift", "data_seed")
            }
        )
    out = Path(args.out)

    def write() -> None:
        protocol["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2, default=str))

    def add(variant: str, rep: str, values: dict[str, float], **info: Any) -> None:
        rows.append({"variant": variant, "representation": rep, **values, **info})

    if not args.no_inputs:
        reps = {
            "expr_pca": expression_pca(table, by_section=False, seed=args.seed),
            "expr_pca_section": expression_pca(table, by_section=True, seed=args.seed),
            **image_inputs(sdata, seed=args.seed),
        }
        for name, x in reps.items():
            table.obsm[f"_bench_{name}"] = x
            add("inputs", name, measure(table, f"_bench_{name}", labels_key=labels_key, seed=args.seed))
            del table.obsm[f"_bench_{name}"]
        write()
        print_table(rows)

    for variant in variants:
        kwargs = {**VARIANTS[variant], **extra}
        t0 = time.perf_counter()
        model, fitted = sg.tl.fit(sdata, copy=True, seed=args.seed, **kwargs)
        seconds = time.perf_counter() - t0
        ftable = fitted.tables[Keys.TABLE]
        epochs = int(model.history["epoch"].max())
        for key in EMBEDDINGS:
            if key in ftable.obsm:
                add(
                    variant,
                    key,
                    measure(ftable, key, labels_key=labels_key, seed=args.seed),
                    fit_kwargs=kwargs,
                    fit_seconds=round(seconds, 1),
                    epochs=epochs,
                )
        write()
        print_table(rows[-len(EMBEDDINGS) :])
        print(f"{variant}: {epochs} epochs, {seconds:.0f} s", flush=True)
        del model, fitted
    print_table(rows)
    print(f"results: {out}")
    return {"protocol": protocol, "rows": rows}


if __name__ == "__main__":
    main()
