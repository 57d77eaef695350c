"""Cell resolution: are cell types and niches recovered, and does the micro (cell) level help prediction?

Two parts, on ``sigmma_sc.datasets.synthetic`` cells, whose truth is known (``obs["cell_type"]``,
``obs["niche"]``), plus an end-to-end run on the Xenium lung (no truth: graph, genes, readout only).

1. **Clusters** (``--seeds``; one section of ``--n-cells`` cells per seed, ``tl.fit`` with the
   defaults): Leiden (scanpy neighbours k=15, igraph flavour) at each ``--resolutions`` value on
   ``expr_pca`` (log1p(normalize_total), HVGs, PCA 30: expression alone), ``X_sigmma`` (joint),
   ``X_sigmma_expr`` and ``X_sigmma_img``; ARI and NMI against the true niches and cell types.
2. **Prediction** (same seeds; three sections per seed, trained on two, tested on the third):
   ``tl.evaluate`` of the default model (micro, meso, macro) against the same fit without the micro
   level (``levels=("meso", "macro")``), mean Pearson r over the top-50 HVGs of the test cells.
3. **Xenium lung** (``--xenium``): ``tl.fit`` on the 200 cells: graph mean degree, modelled genes,
   the readout chosen on held-out reference units.

    python benchmarks/cells.py --seeds 0,1,2 --n-cells 3000 --xenium --out benchmarks/results_cells.json

The JSON is rewritten after every seed. Times are wall seconds on this shared 2-core CPU.
"""

from __future__ import annotations

import argparse
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

N_PCS = 30
N_NEIGHBOURS = 15
REPRESENTATIONS = ("expr_pca", "X_sigmma", "X_sigmma_expr", "X_sigmma_img")


def epochs(args) -> dict[str, int]:
    """``max_epochs`` of every fit when ``--epochs`` is given (else tl.fit's default)."""
    return {} if args.epochs is None else {"max_epochs": int(args.epochs)}


def expression_pca(table, *, seed: int) -> np.ndarray:
    """Expression alone: PCA (30) of log1p(normalize_total) counts on the highly variable genes."""
    import anndata as ad
    import scanpy as sc

    counts = table.layers[Keys.COUNTS_LAYER] if Keys.COUNTS_LAYER in table.layers else table.X
    a = ad.AnnData(counts.astype(np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars))
    a = a[:, a.var["highly_variable"]].copy()
    sc.pp.pca(a, n_comps=min(N_PCS, a.n_vars - 1), random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


def cluster_scores(rep: np.ndarray, truth: dict[str, np.ndarray], *, resolutions, seed: int) -> list[dict[str, Any]]:
    """Leiden at each resolution on ``rep``; ARI / NMI against each truth column."""
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a = ad.AnnData(np.zeros((len(rep), 1), np.float32))
    a.obsm["rep"] = np.asarray(rep, dtype=np.float32)
    sc.pp.neighbors(a, use_rep="rep", n_neighbors=N_NEIGHBOURS, random_state=seed)
    rows = []
    for res in resolutions:
        sc.tl.leiden(a, resolution=res, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
        labels = a.obs["leiden"].to_numpy()
        row: dict[str, Any] = {"resolution": float(res), "n_clusters": int(len(set(labels)))}
        for name, y in truth.items():
            row[f"ari_{name}"] = float(adjusted_rand_score(y, labels))
            row[f"nmi_{name}"] = float(normalized_mutual_info_score(y, labels))
        rows.append(row)
    return rows


def clusters_part(seed: int, args) -> list[dict[str, Any]]:
    sdata = sg.datasets.synthetic(args.n_cells, n_genes=args.n_genes, seed=seed)
    sg.tl.fit(sdata, seed=seed, **epochs(args))
    table = sdata.tables[Keys.TABLE]
    truth = {"niche": table.obs[Keys.NICHE].to_numpy(), "cell_type": table.obs[Keys.CELL_TYPE].to_numpy()}
    reps = {"expr_pca": expression_pca(table, seed=seed)}
    reps.update({key: np.asarray(table.obsm[key]) for key in REPRESENTATIONS if key in table.obsm})
    out = []
    for name, rep in reps.items():
        for row in cluster_scores(rep, truth, resolutions=args.resolutions, seed=seed):
            out.append({"seed": seed, "representation": name, **row})
    return out


def prediction_part(seed: int, args) -> list[dict[str, Any]]:
    sdata = sg.datasets.synthetic(3 * args.n_cells, n_genes=args.n_genes, n_sections=3, seed=seed)

    def sections(names):
        return sdata.subset([k for k in (*sdata.images, *sdata.shapes) if k.split("_")[0] in names], filter_tables=True)

    train, test = sections(["S0", "S1"]), sections(["S2"])
    out = []
    for variant, kwargs in (("micro+meso+macro", {}), ("meso+macro", {"levels": [Levels.MESO, Levels.MACRO]})):
        t0 = time.perf_counter()
        model = sg.tl.fit(train, seed=seed, **epochs(args), **kwargs)
        df = sg.tl.evaluate(model, test, train_sdata=train, baselines=tuple(args.baselines), seed=seed)
        row = df.loc["sigmma"]
        out.append(
            {
                "seed": seed,
                "variant": variant,
                **{f"{b}_pcc_hvg50": float(df.loc[b, "pcc_hvg50"]) for b in args.baselines},
                "pcc_hvg50": float(row["pcc_hvg50"]),
                "pcc_hvg50_det1": float(row["pcc_hvg50_det1"]),
                "r10_img2expr": float(row["r10_img2expr"]),
                "readout": df.attrs["protocol"]["readouts"]["sigmma"]["method"],
                "seconds": round(time.perf_counter() - t0, 1),
                "n_test": int(test.tables[Keys.TABLE].n_obs),
            }
        )
    return out


def xenium_part(args) -> dict[str, Any]:
    sdata = sg.datasets.xenium_lung(args.xenium_data)
    model = sg.tl.fit(sdata, seed=0, **epochs(args))
    table = sdata.tables[Keys.TABLE]
    graph = table.obsp[Keys.CONNECTIVITIES]
    pred = sg.tl.predict_expression(model, sdata)
    params = pred.uns[Keys.UNS][Keys.PARAMS]
    return {
        "n_cells": int(table.n_obs),
        "graph_mean_degree": float(graph.getnnz() / table.n_obs),
        "n_model_genes": len(model.genes),
        "min_detected": float(model.params["min_detected"]),
        "readout": {k: v for k, v in params.items() if k != "candidates"},
        "heldout_r_median_gene": float(np.nanmedian(pred.var[Keys.HELDOUT_R])),
        "confidence_median": float(np.median(pred.obs[Keys.CONFIDENCE])),
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if c.startswith(("ari_", "nmi_"))] + ["n_clusters"]
    g = df.groupby(["representation", "resolution"])[cols]
    mean, std = g.mean(), g.std(ddof=1)
    out = []
    for key in mean.index:
        out.append(
            {
                "representation": key[0],
                "resolution": key[1],
                **{c: float(mean.loc[key, c]) for c in cols},
                **{f"{c}_std": float(std.loc[key, c]) for c in cols if c != "n_clusters"},
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-genes", type=int, default=200)
    p.add_argument("--epochs", type=int, default=None, help="max_epochs of every fit (default: tl.fit's)")
    p.add_argument("--resolutions", default="0.25,0.5,1.0")
    p.add_argument("--skip-prediction", action="store_true")
    p.add_argument("--baselines", default="", help="tl.evaluate baselines of the prediction part, e.g. ridge_cv")
    p.add_argument("--xenium", action="store_true", help="also run the Xenium lung end to end")
    p.add_argument("--xenium-data", default=None)
    p.add_argument("--out", default="results_cells.json")
    args = p.parse_args(argv)
    args.resolutions = [float(r) for r in args.resolutions.split(",") if r]
    args.baselines = [b for b in args.baselines.split(",") if b]
    sg.settings.progress_bar = False
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "protocol": {
            "command": " ".join(sys.argv),
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "epochs": args.epochs,
            "resolutions": args.resolutions,
            "leiden": f"scanpy neighbors k={N_NEIGHBOURS}, leiden igraph, n_iterations=2",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shared",
        },
        "clusters": [],
        "prediction": [],
    }
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        result["clusters"] += clusters_part(seed, args)
        result["summary"] = summarise(result["clusters"])
        if not args.skip_prediction:
            result["prediction"] += prediction_part(seed, args)
        result["protocol"]["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"seed {seed} done ({result['protocol']['wall_time_s']:.0f} s)", flush=True)
    if args.xenium:
        result["xenium"] = xenium_part(args)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{'representation':<16}{'res':>6}{'clusters':>10}{'ARI niche':>12}{'ARI type':>10}{'NMI niche':>11}")
    for r in result["summary"]:
        print(
            f"{r['representation']:<16}{r['resolution']:>6.2f}{r['n_clusters']:>10.1f}"
            f"{r['ari_niche']:>8.3f}±{r['ari_niche_std']:.3f}{r['ari_cell_type']:>10.3f}{r['nmi_niche']:>11.3f}"
        )
    for r in result["prediction"]:
        print(f"prediction seed {r['seed']} {r['variant']:<18} r {r['pcc_hvg50']:.3f} (readout {r['readout']})")
    if "xenium" in result:
        print(f"xenium: {result['xenium']}")
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
