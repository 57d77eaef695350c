"""Shift benchmark: a held-out her2st section made "foreign" (shallow counts, another stain), 3 seeds.

A model trained on some sections of one patient meets a slide of another lab: fewer UMIs per spot
and a different H&E stain. This benchmark makes that slide from a held-out section, with one fixed
transform written here (never used for training augmentation):

- counts binomially thinned so the median spot holds ``--target-umi`` UMIs (650: the shallow
  her2st patient the issue measured);
- the H&E re-stained in HED space (Ruifrok & Johnston's stain vectors): the hematoxylin and eosin
  optical-density vectors each rotated by ``STAIN_ROTATION_DEG`` degrees about the normal of their
  plane, the concentrations scaled by ``STAIN_SCALE`` (0.85 hematoxylin, 1.15 eosin).

Every seed fits SIGMMA on the other sections (``tl.fit`` defaults, ``--epochs``) and scores it with
``tl.evaluate`` against ``ridge``, ``ridge_cv`` and ``single_scale`` on the foreign section; the
ridges get the model's feature scaling (``baseline_feature_norm="model"``: per-section z-scores by
default), so every method sees the same scaled features. ``--clean`` also scores the unshifted
section (SIGMMA and ``ridge_cv``) for reference.

Run::

    OPENBLAS_NUM_THREADS=1 python benchmarks/shift.py --data ../shared/data/her2st --test C6 \
        --seeds 0,1,2 --epochs 10 --out benchmarks/results_shift.json

The JSON (rewritten after every seed) holds the protocol, every seed's rows and the summary: per
method the mean and sample std over seeds of ``pcc_hvg50`` and ``r10_img2expr``, and the per-seed
paired differences SIGMMA - ridge_cv and ratios SIGMMA / single_scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.pp._stain import _HED_FROM_RGB, _RGB_FROM_HED

# Ruifrok & Johnston (2001) unit optical-density vectors of hematoxylin, eosin and DAB (rows), the
# package's own (pp.hed_jitter's colour space).
RGB_FROM_HED, HED_FROM_RGB = _RGB_FROM_HED, _HED_FROM_RGB
STAIN_ROTATION_DEG = 8.0
STAIN_SCALE = (0.85, 1.15, 1.0)
TARGET_UMI = 650
METRICS = ("pcc_hvg50", "pcc_hvg50_det1", "r10_img2expr", "r5_img2expr")
BASELINES = ("ridge", "ridge_cv", "single_scale")
ROWS_PER_STRIP = 1024


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit axis."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def stain_matrices() -> tuple[np.ndarray, np.ndarray]:
    """``(hed_from_rgb, shifted rgb_from_hed)``: deconvolution of the original stains, reconstruction with the shifted ones."""
    m = RGB_FROM_HED
    rot = _rotation(np.cross(m[0], m[1]), STAIN_ROTATION_DEG)
    shifted = m.copy()
    shifted[:2] = m[:2] @ rot.T  # both stain vectors turned by the same angle within their plane
    shifted[:2] /= np.linalg.norm(shifted[:2], axis=1, keepdims=True)
    return HED_FROM_RGB, np.asarray(STAIN_SCALE)[:, None] * shifted


def restain(rgb: np.ndarray) -> np.ndarray:
    """The benchmark's fixed stain shift of an RGB ``uint8`` image, strip by strip (a new array)."""
    hed_from_rgb, shifted = stain_matrices()
    out = np.empty_like(rgb)
    for r0 in range(0, rgb.shape[0], ROWS_PER_STRIP):
        od = -np.log10((rgb[r0 : r0 + ROWS_PER_STRIP].astype(np.float32) + 1.0) / 256.0)
        od = (od @ hed_from_rgb.astype(np.float32)) @ shifted.astype(np.float32)
        out[r0 : r0 + ROWS_PER_STRIP] = np.clip(np.rint(256.0 * 10.0 ** (-od) - 1.0), 0, 255).astype(np.uint8)
    return out


def thin(counts: sparse.spmatrix, target_umi: float, rng: np.random.Generator) -> tuple[sparse.csr_matrix, float]:
    """Binomial thinning of every count with one probability, so the median unit holds ``target_umi`` UMIs."""
    counts = sparse.csr_matrix(counts, copy=True)
    median = float(np.median(np.asarray(counts.sum(axis=1)).ravel()))
    p = min(1.0, target_umi / median)
    counts.data = rng.binomial(counts.data.astype(np.int64), p).astype(counts.dtype)
    counts.eliminate_zeros()
    return counts, p


def foreign_section(folder: Path, section: str, *, target_umi: float, seed: int) -> tuple[Any, dict[str, Any]]:
    """The held-out section, thinned and re-stained, as a SpatialData built like ``datasets.her2st``."""
    from sigmma_sc._constants import ST_SPOT_DIAMETER_UM
    from sigmma_sc.datasets._her2st import _read_section
    from sigmma_sc.io import build_sdata

    arrays = _read_section(folder, section)
    full = np.asarray(arrays.image[0])  # one section's pixels, ~276 MB: transformed strip by strip
    counts, p = thin(arrays.counts, target_umi, np.random.default_rng(seed))
    shifted = replace(arrays, image=restain(full), counts=counts)
    del full
    sdata = build_sdata(
        [shifted], technology="st", unit_kind="spot", unit_diameter_um=ST_SPOT_DIAMETER_UM, drop_empty=True
    )
    totals = np.asarray(sdata[Keys.TABLE].layers[Keys.COUNTS_LAYER].sum(axis=1)).ravel()
    info = {
        "thinning_p": round(p, 5),
        "median_umi_before": float(np.median(np.asarray(arrays.counts.sum(axis=1)).ravel())),
        "median_umi_after": float(np.median(totals)),
        "units": int(sdata[Keys.TABLE].n_obs),
    }
    return sdata, info


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds per method, and the paired per-seed comparisons of SIGMMA."""
    out: dict[str, Any] = {"methods": {}, "paired": {}}
    methods = sorted({r["method"] for r in rows})
    seeds = sorted({r["seed"] for r in rows if not r.get("clean")})
    for m in methods:
        vals = {k: [r[k] for r in rows if r["method"] == m and not r.get("clean") and k in r] for k in METRICS}
        out["methods"][m] = {
            k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None}
            for k, v in vals.items()
            if v
        }

    def value(method: str, seed: int, key: str) -> float | None:
        hit = [r[key] for r in rows if r["method"] == method and r["seed"] == seed and not r.get("clean") and key in r]
        return float(hit[0]) if hit else None

    def paired(row: str) -> dict[str, Any]:
        table = {}
        for key in METRICS:
            diffs, ratios = [], []
            for s in seeds:
                a, b, c = value(row, s, key), value("ridge_cv", s, key), value("single_scale", s, key)
                if a is not None and b is not None:
                    diffs.append(round(a - b, 4))
                if a is not None and c:
                    ratios.append(round(a / c, 4))
            table[key] = {
                "sigmma_minus_ridge_cv": diffs,
                "sigmma_over_single_scale": ratios,
                "above_ridge_cv_seeds": int(sum(d > 0 for d in diffs)),
                "ratio_single_scale_mean": round(float(np.mean(ratios)), 4) if ratios else None,
            }
        return table

    out["paired"] = paired("sigmma")
    # Extra readouts of the same fits (--readouts): the same comparisons, row by row.
    extra = [m for m in methods if m.startswith("sigmma_")]
    if extra:
        out["paired_readouts"] = {m: paired(m) for m in extra}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="her2st folder (default: the datasets' search path)")
    parser.add_argument("--train", default="C2,C3,C4,C5", help="training sections")
    parser.add_argument("--test", default="C6", help="the section made foreign")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--target-umi", type=float, default=TARGET_UMI)
    parser.add_argument("--fit", default="{}", help="extra tl.fit keywords (JSON), e.g. augmentation settings")
    parser.add_argument(
        "--method",
        default=None,
        help="readout of SIGMMA and single_scale (tl.evaluate(method=); default: the package's for spots)",
    )
    parser.add_argument(
        "--readouts", default="{}", help="extra SIGMMA rows read out otherwise (tl.evaluate(readouts=)), JSON"
    )
    parser.add_argument("--clean", action="store_true", help="also score the unshifted section (sigmma, ridge_cv)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "sigmma_sc" / "benchmarks"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sg.settings.progress_bar = False
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    fit_kwargs = {"max_epochs": args.epochs, **json.loads(args.fit)}
    from sigmma_sc.datasets._paths import REQUIRED_FILES

    folder = sg.datasets.resolve_dataset_dir("her2st", args.data, required=REQUIRED_FILES["her2st"]).resolve()
    train_sections = [s for s in args.train.split(",") if s]
    # Hierarchies and image features once per section, in quality.py's per-section cache (the same
    # files, so a her2st protocol run before this one has already encoded the training sections).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import prepare

    cache = Path(args.cache)
    tag = f"her2st-{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"

    def load(sections: list[str]) -> Any:
        return sg.datasets.her2st(folder, sections=sections)

    train = prepare(load, tag, train_sections, cache)
    foreign, info = foreign_section(folder, args.test, target_umi=args.target_umi, seed=0)
    shift_tag = f"{tag}-foreign-umi{args.target_umi:g}-rot{STAIN_ROTATION_DEG:g}"
    test = prepare(lambda _: foreign, shift_tag, [args.test], cache)
    clean = prepare(load, tag, [args.test], cache) if args.clean else None
    res: dict[str, Any] = {
        "protocol": {
            "command": "benchmarks/shift.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "train": train_sections,
            "test": args.test,
            "target_umi": args.target_umi,
            "stain": {
                "rgb_from_hed": RGB_FROM_HED.tolist(),
                "rotation_deg": STAIN_ROTATION_DEG,
                "concentration_scale": list(STAIN_SCALE),
            },
            "foreign": info,
            "seeds": seeds,
            "fit_kwargs": fit_kwargs,
            "baselines": list(BASELINES),
            "baseline_feature_norm": "model",
            "method": args.method,
            "readouts": json.loads(args.readouts),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        },
        "rows": [],
    }

    def save() -> None:
        res["summary"] = summarize(res["rows"])
        res["protocol"]["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")

    for seed in seeds:
        t0 = time.perf_counter()
        model = sg.tl.fit(train, seed=seed, **fit_kwargs)
        runs = [(test, BASELINES, False)] + ([(clean, ("ridge_cv",), True)] if clean is not None else [])
        for sdata, baselines, is_clean in runs:
            df = sg.tl.evaluate(
                model,
                sdata,
                train_sdata=train,
                baselines=baselines,
                seed=seed,
                fit_kwargs=fit_kwargs,
                baseline_feature_norm="model",
                method=args.method,
                readouts=None if is_clean else json.loads(args.readouts),
            )
            for method, row in df.iterrows():
                rec = {"seed": seed, "method": str(method), "clean": is_clean}
                rec.update({k: round(float(row[k]), 4) for k in METRICS if k in row and np.isfinite(row[k])})
                res["rows"].append(rec)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in res["rows"]:
            if r["seed"] == seed:
                print(
                    f"  {'clean ' if r['clean'] else ''}{r['method']:<13s} "
                    + "  ".join(f"{k} {r.get(k)}" for k in METRICS)
                )
        save()
    save()
    print(json.dumps(res["summary"], indent=1))
    return res


if __name__ == "__main__":
    main()
