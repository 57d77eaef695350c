"""sigmma-sc demo on real data: her2st HER2+ breast cancer sections (legacy Spatial Transcriptomics).

Steps (each prints what it did and how long it took; the outputs go to ``--out``):

1. load every her2st section found as one SpatialData object (H&E pyramids, spots, counts);
2. validate it with ``sigmma_sc.io.validate`` (the check every public function runs first);
3. ``her2st_overview.png``: each section's H&E with its spots coloured by total counts;
4. fit SIGMMA (micro nuclei / meso spots / macro regions, graphs) on every section but the held-out one;
5. Leiden clusters of the joint embedding over the H&E (``her2st_clusters.png``), training curves;
6. predict the held-out section's expression from its H&E alone and map ERBB2 predicted vs observed;
7. evaluate SIGMMA against the ridge probes and single-scale CLIP on the held-out section
   (printed table, ``evaluation.csv``, ``evaluation.png``) and save the model.

Usage::

    python scripts/demo.py --out demo_output [--data /path/to/her2st] [--test C6] [--epochs 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import sigmma_sc as sg
from sigmma_sc._constants import Keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (created)")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="her2st folder (or a folder holding it); default $SIGMMA_DATA_DIR, then ../shared/data",
    )
    parser.add_argument("--test", default=None, help="held-out section (default: the last one found)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (a quick setting; tl.fit uses 30)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def step(title: str) -> float:
    """Announce a step and return its start time."""
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(start: float, message: str) -> None:
    """Report a finished step with its duration."""
    print(f"   {message} ({time.perf_counter() - start:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the demo's steps in order."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sg.settings.progress_bar = False
    t_all = time.perf_counter()

    t = step("1. Load her2st (every section found)")
    sdata = sg.datasets.her2st(args.data)
    table = sdata[Keys.TABLE]
    sections = list(table.obs[Keys.SECTION].cat.categories)
    done(
        t,
        f"{table.n_obs} spots x {table.n_vars} genes; spots per section: {table.obs[Keys.SECTION].value_counts().sort_index().to_dict()}",
    )

    t = step("2. Validate")
    slide = sg.io.validate(sdata, require_counts=True)
    done(
        t,
        f"valid: {len(slide.sections)} sections, technology {slide.technology!r}, unit {slide.unit_kind!r} of {slide.unit_diameter_um:.0f} µm",
    )

    t = step("3. Overview figure")
    table.obs["total_counts"] = np.asarray(table.X.sum(axis=1)).ravel()
    sg.pl.spatial(
        sdata, color="total_counts", ncols=3, title="total counts (UMI) per spot", save=args.out / "her2st_overview.png"
    )
    done(t, f"wrote {args.out / 'her2st_overview.png'}")

    test = args.test or sections[-1]
    train_sections = [s for s in sections if s != test]
    if test not in sections or not train_sections:
        raise SystemExit(f"--test {test!r} must be one of {sections} and leave at least one training section.")
    train = sg.datasets.her2st(args.data, sections=train_sections)
    held_out = sg.datasets.her2st(args.data, sections=[test])

    t = step(f"4. Fit SIGMMA on {', '.join(train_sections)} ({args.epochs} epochs)")
    model = sg.tl.fit(train, max_epochs=args.epochs, seed=args.seed)
    h = model.history
    done(
        t,
        f"{len(model.genes)} genes, levels {model.levels}; loss {h['train_loss'].iloc[0]:.2f} -> {h['train_loss'].iloc[-1]:.2f}",
    )

    t = step("5. Leiden clusters of the joint embedding over the H&E")
    adata = train[Keys.TABLE]
    sc.pp.neighbors(adata, use_rep=Keys.X_SIGMMA, random_state=args.seed)
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=0.6, random_state=args.seed)
    sg.pl.spatial(train, color="leiden", ncols=2, title="SIGMMA joint clusters", save=args.out / "her2st_clusters.png")
    sg.pl.history(model, save=args.out / "training_curves.png")
    done(t, f"{adata.obs['leiden'].nunique()} clusters; wrote her2st_clusters.png, training_curves.png")

    t = step(f"6. Predict {test}'s expression from its H&E alone")
    # inplace=True keeps the section's hierarchy and image features in its table: evaluate reuses them.
    pred = sg.tl.predict_expression(model, held_out, inplace=True)
    genes = [g for g in ("ERBB2", "GRB7", "CD74") if g in pred.var_names]
    sg.pl.predicted_vs_observed(pred, held_out, genes=genes, save=args.out / "predicted_vs_observed.png")
    done(t, f"{pred.n_obs} spots x {pred.n_vars} genes predicted; wrote predicted_vs_observed.png")

    t = step(f"7. Evaluate on {test} against the baselines")
    df = sg.tl.evaluate(model, held_out, train_sdata=train, seed=args.seed, fit_kwargs={"max_epochs": args.epochs})
    cols = ["pcc_hvg50", "pcc_heg50", "r1_img2expr", "r5_img2expr", "r10_img2expr", "r5_expr2img", "chance_r5"]
    print(df[[c for c in cols if c in df.columns]].round(3).to_string())
    df.to_csv(args.out / "evaluation.csv")
    sg.pl.evaluation(df, save=args.out / "evaluation.png")
    model.save(args.out / "model")
    done(t, f"wrote evaluation.csv, evaluation.png and model/ to {args.out}")
    print(f"\nDemo finished in {time.perf_counter() - t_all:.0f} s.")


if __name__ == "__main__":
    main()
