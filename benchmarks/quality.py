"""Quality benchmark: SIGMMA vs single-scale CLIP and ridge probes on real data, one script per dataset.

her2st, leave-one-section-out over the sections given (C2-C6 of patient C by default layout, or any
other her2st-layout folder):

    python benchmarks/quality.py --dataset her2st --data ../shared/data/her2st \
        --train C2,C3,C4,C5 --test C6 --seeds 0,1,2 --out results.json
    python benchmarks/quality.py --dataset her2st --data DIR --train C2,C3,C4,C5,C6 --loso --seeds 0,1,2

Visium HD kidney by spatial blocks (train on the other blocks, bins within the buffer of the test
block dropped from training, every block tested once unless --folds picks some):

    python benchmarks/quality.py --dataset kidney --data ../shared/data/visiumhd_kidney \
        --blocks 4x4 --buffer-um 64 --seeds 0,1,2

Test sections are loaded on their own, as a user would load a new slide: their table lacks the genes
without counts in them, so a model may have a few genes the test table does not hold. ``tl.evaluate``
then scores the genes both hold; each fold prints how many model genes the test lacked, and the
JSON keeps ``n_genes_missing`` / ``genes_missing`` in every fold's ``evaluate`` protocol.

Prints method x metric (mean ± std over seeds of the mean over folds), SIGMMA's relative gain over
each baseline and the wall time, and writes a JSON
``{"protocol": {...}, "methods": {method: {metric: mean, metric_std: std, ..., "chance_r5": ...}}}``.
Image features are computed once per section and kept in ``--cache`` (default
``~/.cache/sigmma_sc/benchmarks``), so folds and seeds do not recompute them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import sigmma_sc as sg
from sigmma_sc._constants import Keys

METRIC_KEYS = (
    "pcc_hvg50",
    "pcc_hvg50_det1",
    "pcc_heg50",
    "pcc_hvg50_per_slide",
    "r1_img2expr",
    "r5_img2expr",
    "r10_img2expr",
    "r1_expr2img",
    "r5_expr2img",
    "r10_expr2img",
)
GAIN_KEYS = ("pcc_hvg50", "pcc_hvg50_det1", "pcc_heg50", "r5_img2expr", "r5_expr2img", "r10_img2expr")
# Ablation rows of every SIGMMA fit: the fixed retrieval of earlier versions, each readout kind alone and
# the kind chosen on held-out units ("auto"); the "sigmma" row uses tl.predict_expression's default.
DEFAULT_READOUTS: dict[str, dict[str, Any]] = {
    "sigmma_knn50": {"method": "knn", "k": 50, "temperature": 0.1},
    "sigmma_knn": {"method": "knn"},
    "sigmma_ridge": {"method": "ridge"},
    "sigmma_auto": {"method": "auto"},
}
METHOD_ORDER = ("sigmma", "single_scale", "ridge", "ridge_cv")
QUICK_EPOCHS = 5


# ---------------------------------------------------------------------------------------------
# Feature cache: a node's features depend only on its image window, i.e. on its centre and level.
# A section's hierarchy never crosses sections and niche tiles sit on a fixed grid, so the nodes of
# any multi-section object, crop or spatial block are nodes of the whole sections: features computed
# once per whole section are looked up by node centre for every fold.
# ---------------------------------------------------------------------------------------------
def _cache_file(cache: Path, dataset: str, section: str) -> Path:
    return cache / f"{dataset}_{section}_features.npz"


def _section_features(load, dataset: str, section: str, cache: Path) -> tuple[str, dict[str, np.ndarray]]:
    """Per-level features of one whole section (and their node centres), computed once and cached on disk."""
    path = _cache_file(cache, dataset, section)
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            key = str(z["key"])
            return key, {name: z[name] for name in z.files if name != "key"}
    t0 = time.perf_counter()
    sdata = load([section])
    hier = sg.pp.build_hierarchy(sdata)
    key = str(sg.pp.image_features(sdata))
    feats = sg.pp.get_features(sdata, key=key)
    arrays = {f"feat_{lv}": f for lv, f in feats.items()}
    arrays.update({f"centers_{lv}": lvl.centers_um for lv, lvl in hier.levels.items()})
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.asarray(key), **arrays)
    print(f"  features of {section}: {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return key, arrays


def _rows_by_centre(cached: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of ``cached`` with the same centre (to 1 nm) as each row of ``wanted``; -1 where none."""
    as_index = lambda c: pd.MultiIndex.from_arrays(list(np.round(np.asarray(c, float), 3).T))  # noqa: E731
    return as_index(cached).get_indexer(as_index(wanted))


def fill_features(sdata, per_section: dict[str, tuple[str, dict[str, np.ndarray]]], cache: Path) -> None:
    """Build the hierarchy of ``sdata`` and fill its feature cache from whole-section features."""
    from sigmma_sc.pp._features import _write_features

    hier = sg.pp.build_hierarchy(sdata)
    keys = {k for k, _ in per_section.values()}
    if len(keys) != 1:
        raise RuntimeError(f"cached features of {sorted(per_section)} use different keys {keys}; clear {cache}.")
    key = keys.pop()
    feats: dict[str, np.ndarray] = {}
    for lv, level in hier.levels.items():
        out = None
        for code, section in enumerate(hier.sections):
            arrays = per_section[section][1]
            rows = np.flatnonzero(np.asarray(level.section) == code)
            f, centres = arrays.get(f"feat_{lv}"), arrays.get(f"centers_{lv}")
            src = _rows_by_centre(centres, level.centers_um[rows]) if f is not None else np.array([-1])
            if (src < 0).any():
                raise RuntimeError(
                    f"cached {lv} features of section {section} lack nodes of this hierarchy; clear {cache}."
                )
            if out is None:
                out = np.zeros((level.n_nodes, f.shape[1]), np.float32)
            out[rows] = f[src]
        feats[lv] = out
    _write_features(sdata.tables[Keys.TABLE], key, feats)


def prepare(load, dataset: str, sections: list[str], cache: Path):
    """A SpatialData of ``sections`` with its hierarchy built and image features filled from the cache."""
    per_section = {s: _section_features(load, dataset, s, cache) for s in sections}
    sdata = load(sections)
    fill_features(sdata, per_section, cache)
    return sdata


# ---------------------------------------------------------------------------------------------
# Datasets and splits
# ---------------------------------------------------------------------------------------------
def her2st_folds(args) -> tuple[Any, list[dict[str, Any]]]:
    train = [s for s in args.train.split(",") if s] if args.train else []
    test = [s for s in args.test.split(",") if s] if args.test else []
    if args.loso:
        sections = list(dict.fromkeys(train + test))
        if len(sections) < 2:
            raise SystemExit("--loso needs at least two sections in --train / --test.")
        folds = [{"train": [s for s in sections if s != t], "test": [t]} for t in sections]
    else:
        if not train or not test:
            raise SystemExit("her2st needs --train and --test (or --loso).")
        folds = [{"train": train, "test": test}]

    def load(sections):
        return sg.datasets.her2st(args.data, sections=sections)

    return load, folds


def spatial_blocks(xy: np.ndarray, nx: int, ny: int, buffer_um: float) -> list[dict[str, np.ndarray]]:
    """Grid blocks over the unit centres; training excludes the test block and a buffer around it."""
    lo, hi = xy.min(axis=0), xy.max(axis=0) + 1e-6
    edges_x = np.linspace(lo[0], hi[0], nx + 1)
    edges_y = np.linspace(lo[1], hi[1], ny + 1)
    bx = np.clip(np.searchsorted(edges_x, xy[:, 0], side="right") - 1, 0, nx - 1)
    by = np.clip(np.searchsorted(edges_y, xy[:, 1], side="right") - 1, 0, ny - 1)
    folds = []
    for j in range(ny):
        for i in range(nx):
            test = (bx == i) & (by == j)
            near = (
                (xy[:, 0] >= edges_x[i] - buffer_um)
                & (xy[:, 0] < edges_x[i + 1] + buffer_um)
                & (xy[:, 1] >= edges_y[j] - buffer_um)
                & (xy[:, 1] < edges_y[j + 1] + buffer_um)
            )
            folds.append({"block": j * nx + i, "train": np.flatnonzero(~near), "test": np.flatnonzero(test)})
    return folds


def subset_units(sdata, idx: np.ndarray):
    """A SpatialData with the same image and shapes and the table restricted to some units."""
    from spatialdata import SpatialData

    table = sdata.tables[Keys.TABLE][np.sort(idx)].copy()
    # Graphs, hierarchy and feature caches describe the full table: rebuilt for the subset.
    table.uns.pop(Keys.UNS, None)
    for key in list(table.obsp):
        del table.obsp[key]
    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={Keys.TABLE: table})


def make_folds(args, cache: Path):
    """The folds of the dataset and a function that turns one fold into (train, test) SpatialData."""
    if args.dataset == "her2st":
        load, folds = her2st_folds(args)
        folder = Path(args.data).resolve() if args.data else Path("default")
        # Cache files are per data folder: another folder's section of the same name is another slide.
        tag = f"her2st-{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"

        def fold_data(fold):
            return prepare(load, tag, fold["train"], cache), prepare(load, tag, fold["test"], cache)

        return folds, fold_data

    full = sg.datasets.visium_hd_kidney(args.data, crop=args.crop)
    nx, ny = (int(v) for v in args.blocks.lower().split("x"))
    xy = np.asarray(full.tables[Keys.TABLE].obsm[Keys.SPATIAL], dtype=float)
    folder = Path(args.data).resolve() if args.data else Path("default")
    tag = f"kidney-{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}{'-crop' if args.crop else ''}"
    sections = list(pd.unique(full.tables[Keys.TABLE].obs[Keys.SECTION].astype(str)))
    everything = np.arange(len(xy))
    # Features of the whole section, computed on a copy so the loaded table stays free of caches.
    per_section = {s: _section_features(lambda _: subset_units(full, everything), tag, s, cache) for s in sections}

    def block_data(fold):
        train, test = subset_units(full, fold["train"]), subset_units(full, fold["test"])
        fill_features(train, per_section, cache)
        fill_features(test, per_section, cache)
        return train, test

    return spatial_blocks(xy, nx, ny, args.buffer_um), block_data


def add_kidney_block_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a script that studies one kidney block and seed as ``quality.py`` runs it."""
    p.add_argument("--data", default=None, help="Visium HD kidney folder (default: the package's data path)")
    p.add_argument("--crop", action="store_true", help="the 5,695-bin fixture crop (a quick check)")
    p.add_argument("--blocks", default="2x2")
    p.add_argument("--buffer-um", type=float, default=64.0)
    p.add_argument("--block", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "sigmma_sc" / "benchmarks"))


def kidney_block(args: argparse.Namespace):
    """(train, test) SpatialData of ``args.block``: the same blocks, buffer and feature cache as ``quality.py``."""
    fold_args = argparse.Namespace(
        dataset="kidney", data=args.data, crop=args.crop, blocks=args.blocks, buffer_um=args.buffer_um
    )
    folds, fold_data = make_folds(fold_args, Path(args.cache))
    return fold_data(folds[args.block])


# ---------------------------------------------------------------------------------------------
# Runs and aggregation
# ---------------------------------------------------------------------------------------------
def run_fold(
    train_sdata,
    test_sdata,
    *,
    seed: int,
    fit_kwargs: dict[str, Any],
    baselines: list[str],
    readouts: dict[str, dict[str, Any]] | None = None,
) -> pd.DataFrame:
    model = sg.tl.fit(train_sdata, seed=seed, **fit_kwargs)
    return sg.tl.evaluate(
        model,
        test_sdata,
        train_sdata=train_sdata,
        baselines=baselines,
        seed=seed,
        fit_kwargs=fit_kwargs,
        readouts=readouts,
    )


def missing_genes_note(protocol: dict[str, Any]) -> str:
    """One line on the model genes the test table lacked (a section loaded on its own drops genes without counts)."""
    n_missing = int(protocol.get("n_genes_missing", 0))
    n_model = protocol.get("n_model_genes", "?")
    if not n_missing:
        return f"  genes: the test table holds all {n_model} model genes"
    return (
        f"  genes: the test table lacks {n_missing} of the {n_model} model genes "
        f"(e.g. {list(protocol.get('genes_missing', []))[:5]}); scored on the {protocol.get('n_genes_scored', '?')} shared genes"
    )


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method and metric: mean over folds within each seed, then mean and std over seeds."""
    df = pd.DataFrame(runs)
    out: dict[str, dict[str, float]] = {}
    methods = [m for m in METHOD_ORDER if m in set(df["method"])] + sorted(set(df["method"]) - set(METHOD_ORDER))
    for method in methods:
        sub = df[df["method"] == method]
        per_seed = sub.groupby("seed")[list(METRIC_KEYS) + ["chance_r5"]].mean()
        entry: dict[str, float] = {}
        for key in METRIC_KEYS:
            vals = per_seed[key].to_numpy(dtype=float)
            entry[key] = float(np.mean(vals))
            entry[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        entry["chance_r5"] = float(per_seed["chance_r5"].mean())
        out[method] = entry
    return out


def fold_differences(runs: list[dict[str, Any]], baseline: str, metric: str = "pcc_hvg50") -> pd.Series:
    """Per fold: SIGMMA's seed-mean minus the baseline's (paired by fold)."""
    df = pd.DataFrame(runs)
    per_fold = df.groupby(["fold", "method"])[metric].mean().unstack()
    if "sigmma" not in per_fold or baseline not in per_fold:
        return pd.Series(dtype=float)
    return (per_fold["sigmma"] - per_fold[baseline]).dropna()


def fold_wins(runs: list[dict[str, Any]], baseline: str, metric: str = "pcc_hvg50") -> tuple[int, int]:
    """Folds where SIGMMA's seed-mean beats the baseline's, and the number of folds."""
    diff = fold_differences(runs, baseline, metric)
    return int((diff > 0).sum()), int(len(diff))


def merge_runs(paths: list[str], *, sigmma_row: str | None = None) -> dict[str, Any]:
    """Join the runs of several result files (folds or seeds run apart with ``--folds`` / ``--seeds``).

    ``sigmma_row`` names the readout row to report as SIGMMA (e.g. ``sigmma_ridge`` when the files
    were written under different default readouts); the files' own ``sigmma`` rows are then dropped.
    A (fold, seed, method) present in two files is refused.
    """
    runs: list[dict[str, Any]] = []
    folds: list[dict[str, Any]] = []
    wall_s = 0.0
    seen: dict[tuple[int, int, str], str] = {}
    for path in paths:
        protocol = json.loads(Path(path).read_text())["protocol"]
        for run in protocol["runs"]:
            if sigmma_row is not None and run["method"] == "sigmma":
                continue
            run = dict(run, method="sigmma") if run["method"] == sigmma_row else dict(run)
            key = (int(run["fold"]), int(run["seed"]), str(run["method"]))
            if key in seen:
                raise ValueError(f"fold {key[0]}, seed {key[1]}, {key[2]!r} is in both {seen[key]} and {path}.")
            seen[key] = str(path)
            runs.append(run)
        folds += protocol["folds"]
        wall_s += float(protocol.get("wall_time_s", 0.0))
    if not runs:
        raise ValueError(f"no runs in {paths}.")
    return {
        "protocol": {
            "merged_from": [str(p) for p in paths],
            "sigmma_row": sigmma_row,
            "folds": folds,
            "runs": runs,
            "wall_time_s": round(wall_s, 1),
        },
        "methods": aggregate(runs),
    }


def print_report(methods: dict[str, dict[str, float]], runs: list[dict[str, Any]], wall_s: float) -> None:
    cols = list(METRIC_KEYS)
    header = f"{'method':<14}" + "".join(f"{c:>22}" for c in cols)
    print("\n" + header)
    for name, m in methods.items():
        print(f"{name:<14}" + "".join(f"{m[c]:>14.3f} ± {m[c + '_std']:<5.3f}" for c in cols))
    chance = next(iter(methods.values()))["chance_r5"]
    print(f"chance Recall@5: {chance:.3f}")
    if "sigmma" in methods:
        s = methods["sigmma"]
        for base, b in methods.items():
            if base == "sigmma":
                continue
            gains = []
            for c in GAIN_KEYS:
                gains.append(f"{c} {(s[c] - b[c]) / abs(b[c]) * 100:+.1f}%" if b[c] else f"{c} n/a (baseline 0)")
            wins, n = fold_wins(runs, base)
            diffs = " ".join(f"{v:+.3f}" for v in fold_differences(runs, base))
            print(f"SIGMMA vs {base}: " + ", ".join(gains) + f"; pcc_hvg50 wins {wins}/{n} folds ({diffs})")
    print(f"wall time: {wall_s / 60:.1f} min")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("her2st", "kidney"))
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="join these result files (run apart with --folds / --seeds) into --out and report them",
    )
    p.add_argument("--sigmma-row", default=None, help="with --merge: the readout row reported as SIGMMA")
    p.add_argument("--data", default=None, help="dataset folder (default: sigmma_sc.datasets path resolution)")
    p.add_argument("--train", default="", help="her2st: training sections, comma-separated")
    p.add_argument("--test", default="", help="her2st: test sections, comma-separated")
    p.add_argument("--loso", action="store_true", help="her2st: leave-one-section-out over every section given")
    p.add_argument("--blocks", default="4x4", help="kidney: spatial blocks, NXxNY")
    p.add_argument(
        "--buffer-um", type=float, default=64.0, help="kidney: training bins this close to the test block are dropped"
    )
    p.add_argument("--crop", action="store_true", help="kidney: the 1.2 mm fixture crop (smoke test)")
    p.add_argument("--folds", default="", help="run only these fold indices (comma-separated; kidney: block ids)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--baselines", default="ridge,ridge_cv,single_scale")
    p.add_argument(
        "--baselines-once",
        action="store_true",
        help="ridge baselines on the first seed only (they do not depend on the seed; single_scale runs every seed)",
    )
    p.add_argument(
        "--readouts",
        default=json.dumps(DEFAULT_READOUTS),
        help="extra SIGMMA rows read out otherwise (tl.evaluate(readouts=)), JSON; '{}' for none",
    )
    p.add_argument("--epochs", type=int, default=None, help="max_epochs of every fit (default: tl.fit's)")
    p.add_argument("--quick", action="store_true", help=f"short fits ({QUICK_EPOCHS} epochs unless --epochs)")
    p.add_argument("--fit", default="{}", help="extra tl.fit arguments as JSON, e.g. '{\"inter_layers\": 2}'")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "sigmma_sc" / "benchmarks"))
    p.add_argument("--out", default="results.json")
    args = p.parse_args(argv)
    if args.merge:
        merged = merge_runs(args.merge, sigmma_row=args.sigmma_row)
        Path(args.out).write_text(json.dumps(merged, indent=2, default=str))
        print_report(merged["methods"], merged["protocol"]["runs"], merged["protocol"]["wall_time_s"])
        print(f"results: {args.out}")
        return merged
    if args.dataset is None:
        p.error("--dataset is required (or --merge result files)")

    t_start = time.perf_counter()
    sg.settings.progress_bar = False
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    baselines = [b for b in args.baselines.split(",") if b]
    fit_kwargs: dict[str, Any] = json.loads(args.fit)
    readouts: dict[str, dict[str, Any]] = json.loads(args.readouts)
    if args.epochs is not None:
        fit_kwargs["max_epochs"] = args.epochs
    elif args.quick:
        fit_kwargs["max_epochs"] = QUICK_EPOCHS
    cache = Path(args.cache)

    folds, fold_data = make_folds(args, cache)
    chosen = [int(i) for i in args.folds.split(",") if i != ""] or list(range(len(folds)))

    runs: list[dict[str, Any]] = []
    fold_protocols = []
    for fi in chosen:
        fold = folds[fi]
        # Release the previous fold's images before loading the next (whole-slide JPEGs add up).
        train_sdata = test_sdata = None
        gc.collect()
        train_sdata, test_sdata = fold_data(fold)
        desc = (
            {"train": fold["train"], "test": fold["test"]}
            if args.dataset == "her2st"
            else {"block": fold["block"], "n_train": int(len(fold["train"])), "n_test": int(len(fold["test"]))}
        )
        for seed in seeds:
            t0 = time.perf_counter()
            df = run_fold(
                train_sdata,
                test_sdata,
                seed=seed,
                fit_kwargs=fit_kwargs,
                baselines=baselines
                if (seed == seeds[0] or not args.baselines_once)
                else [b for b in baselines if b == "single_scale"],
                readouts=readouts,
            )
            print(f"\nfold {fi} {desc} seed {seed} ({time.perf_counter() - t0:.0f} s)")
            print(missing_genes_note(df.attrs["protocol"]))
            print(
                df[
                    [
                        "pcc_hvg50",
                        "pcc_hvg50_det1",
                        "pcc_heg50",
                        "r5_img2expr",
                        "r10_img2expr",
                        "r5_expr2img",
                        "chance_r5",
                    ]
                ].round(3)
            )
            print(f"  readout: {df.attrs['protocol']['readouts']['sigmma']}")
            for method, row in df.iterrows():
                runs.append({"fold": fi, "seed": seed, "method": method, **{k: float(v) for k, v in row.items()}})
            fold_protocols.append({"fold": fi, "seed": seed, **desc, "evaluate": df.attrs["protocol"]})
            # Write what exists after every run: a long benchmark that stops early still reports.
            wall = time.perf_counter() - t_start
            result = {
                "protocol": {
                    "dataset": args.dataset,
                    "data": str(args.data),
                    "command": " ".join(sys.argv),
                    "split": "leave-one-section-out"
                    if args.loso
                    else (
                        "sections"
                        if args.dataset == "her2st"
                        else f"spatial blocks {args.blocks}, buffer {args.buffer_um} um"
                    ),
                    "folds": fold_protocols,
                    "seeds": seeds,
                    "baselines": baselines,
                    "fit_kwargs": fit_kwargs,
                    "aggregation": "mean over folds per seed, then mean and sample std over seeds",
                    "wall_time_s": round(wall, 1),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "runs": runs,
                },
                "methods": aggregate(runs),
            }
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print_report(result["methods"], runs, time.perf_counter() - t_start)
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
