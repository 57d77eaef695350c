"""Cost of the hierarchy, the patches and the image features; dense vs per-crop features in a ridge probe.

Usage::

    python benchmarks/patches_features.py --datasets kidney her2st --probe --stain crop

For each data set (her2st: 5 sections; the full Visium HD kidney: 165k bins) and every level it
prints seconds and peak resident memory for the hierarchy, patch extraction and the dense
features; tiles (or crops) per second next to the encoder's own forward rate on the same tiles and
the raw array-slicing rate on the same image (the two limits). ``--probe`` fits a ridge probe on
her2st (leave-one-section-out, RidgeCV on standardised, clipped features -> top-50 variable genes,
log1p; mean Pearson r over genes) for the dense and the per-crop features; ``--stain`` adds the
dense features after Macenko / Reinhard stain normalisation.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager

import numpy as np

import sigmma_sc as sg
from sigmma_sc._constants import Defaults
from sigmma_sc.pp._patches import crop_geometry
from sigmma_sc.pp._pooling import map_grid_shape, needed_cells, tile_rects, window_cells

sg.settings.progress_bar = False


# -- measurement helpers ----------------------------------------------------------------------------
def _rss_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


@contextmanager
def measure(label: str, rows: list, **extra):
    """Wall time and peak resident memory (sampled every 50 ms) of a block."""
    peak = [_rss_gb()]
    start_rss = peak[0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_gb())
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    info: dict = dict(extra)
    yield info
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    row = {
        "step": label,
        "seconds": round(dt, 2),
        "peak_rss_gb": round(peak[0], 2),
        "rss_delta_gb": round(peak[0] - start_rss, 2),
    }
    row.update(info)
    rows.append(row)
    print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def dense_tiles(slide, hier, tile_px: int, margin_px: int, coarse_fov_um: float) -> dict:
    """Tiles and megapixels the dense path encodes per scale (same rule as pp.image_features)."""
    out: dict = {}
    for code, section in enumerate(slide.sections):
        img = slide.images[section]
        for scale in (1, 2):
            levels = [lv for lv in hier.levels.values() if (2 if lv.fov_um >= coarse_fov_um else 1) == scale]
            wins = [window_cells(img, lv.centers_um[np.asarray(lv.section) == code], lv.fov_um, scale) for lv in levels]
            wins = [w for w in wins if len(w[0])]
            if not wins:
                continue
            rects = tile_rects(needed_cells(wins, map_grid_shape(img.shape, scale)), tile_px)
            mpx = (
                sum(((a1 - a0) * 32 + 2 * margin_px) * ((b1 - b0) * 32 + 2 * margin_px) for a0, a1, b0, b1 in rects)
                / 1e6
            )
            key = f"x{scale}"
            n, m = out.get(key, (0, 0.0))
            out[key] = (n + len(rects), round(m + mpx, 1))
    return out


def limits(image, enc, rows: list, *, tile_px: int, margin_px: int) -> None:
    """The encoder's own forward rate (tiles and 224 px crops) and the raw slicing rate on this image."""
    rng = np.random.default_rng(0)
    side = tile_px + 2 * margin_px
    h, w = image.shape
    tiles = np.stack(
        [image.read(r, r + side, c, c + side) for r, c in rng.integers(0, max(1, min(h, w) - side), (2, 2))]
    )
    enc.encode_map(tiles[:1])  # warm-up
    with measure("encoder forward, dense tiles", rows, tiles=len(tiles), px=side) as info:
        enc.encode_map(tiles)
    info["tiles_per_s"] = round(len(tiles) / rows[-1]["seconds"], 3) if rows[-1]["seconds"] else None
    rows[-1]["tiles_per_s"] = info["tiles_per_s"]
    crops = np.stack([image.read(r, r + 224, c, c + 224) for r, c in rng.integers(0, min(h, w) - 224, (32, 2))])
    enc.encode(crops[:4])
    t0 = time.perf_counter()
    enc.encode(crops)
    rate = len(crops) / (time.perf_counter() - t0)
    rows.append({"step": "encoder forward, 224 px crops", "crops_per_s": round(rate, 1)})
    print(f"  encoder forward on 224 px crops: {rate:.1f} crops/s", flush=True)
    pos = rng.integers(0, min(h, w) - 224, (2000, 2))
    t0 = time.perf_counter()
    for r, c in pos:
        image.read(r, r + 224, c, c + 224)
    rate = len(pos) / (time.perf_counter() - t0)
    rows.append({"step": "raw array slicing, 224 px windows", "reads_per_s": round(rate, 1)})
    print(f"  raw array slicing (SectionImage.read, 224 px): {rate:.0f} windows/s", flush=True)


# -- one data set -------------------------------------------------------------------------------------
def run_dataset(name: str, *, patch_sample: int, args) -> dict:
    print(f"\n=== {name} ===", flush=True)
    rows: list = []
    with measure("load", rows):
        sdata = sg.datasets.her2st() if name == "her2st" else sg.datasets.visium_hd_kidney()
    with measure("hierarchy (pp.build_hierarchy)", rows) as info:
        hier = sg.pp.build_hierarchy(sdata)
        info["nodes"] = {k: v.n_nodes for k, v in hier.levels.items()}
    slide = sg.io.validate(sdata)
    rng = np.random.default_rng(0)
    for level, lvl in hier.levels.items():
        n = min(patch_sample, lvl.n_nodes)
        idx = np.sort(rng.choice(lvl.n_nodes, n, replace=False))
        first = slide.images[slide.sections[0]]
        pyr, side, _ = crop_geometry(first, lvl.centers_um[:1], lvl.fov_um, 224)
        with measure(
            f"patches {level} (224 px, {lvl.fov_um:g} um)", rows, n=n, pyramid_level=pyr, side_px=side
        ) as info:
            sg.pp.extract_patches(sdata, level=level, indices=idx)
        rows[-1]["crops_per_s"] = round(n / rows[-1]["seconds"], 1)
        rows[-1]["all_nodes_s_est"] = round(lvl.n_nodes / rows[-1]["crops_per_s"], 1)

    enc = sg.pp.get_encoder("efficientnet_lite0", device="auto")
    tiles = dense_tiles(slide, hier, Defaults.DENSE_TILE_PX, Defaults.DENSE_MARGIN_PX, Defaults.DENSE_COARSE_FOV_UM)
    with measure("features dense, all levels", rows, tiles_mpx=tiles) as info:
        key = sg.pp.image_features(sdata, encoder=enc, method="dense")
    n_tiles = sum(n for n, _ in tiles.values())
    rows[-1]["tiles_per_s"] = round(n_tiles / rows[-1]["seconds"], 3)
    rows[-1]["mpx_per_s"] = round(sum(m for _, m in tiles.values()) / rows[-1]["seconds"], 3)
    feats = sg.pp.get_features(sdata, key=key)
    for level, f in feats.items():
        print(f"  {level}: {f.shape}, finite {bool(np.isfinite(f).all())}", flush=True)
    limits(
        slide.images[slide.sections[0]], enc, rows, tile_px=Defaults.DENSE_TILE_PX, margin_px=Defaults.DENSE_MARGIN_PX
    )
    return {"rows": rows, "sdata": sdata, "hier": hier, "slide": slide, "dense_key": key}


# -- ridge probe ---------------------------------------------------------------------------------------
def ridge_probe(slide, feats: np.ndarray, *, n_genes: int = 50) -> float:
    """Leave-one-section-out RidgeCV, features standardised with training stats and clipped; mean Pearson r."""
    from sklearn.linear_model import RidgeCV

    counts = slide.counts()
    lib = np.asarray(counts.sum(1)).ravel()
    expr_all = np.log1p(counts.multiply(1e4 / np.maximum(lib, 1)[:, None]).toarray())
    rs = []
    for code, section in enumerate(slide.sections):
        test = slide.unit_section == code
        train = ~test
        # Top variable genes of the training sections only.
        genes = np.argsort(expr_all[train].var(0))[::-1][:n_genes]
        y_tr, y_te = expr_all[train][:, genes], expr_all[test][:, genes]
        x_tr, x_te = sg.model.standardize_features(feats[train], feats[test])
        model = RidgeCV(alphas=np.logspace(0, 5, 11)).fit(x_tr, y_tr)
        pred = model.predict(x_te)
        r = [
            np.corrcoef(pred[:, g], y_te[:, g])[0, 1]
            for g in range(len(genes))
            if y_te[:, g].std() > 0 and pred[:, g].std() > 0
        ]
        rs.append(float(np.mean(r)))
        print(f"    held-out {section}: mean r {rs[-1]:.3f}", flush=True)
    return float(np.mean(rs))


def unit_features(hier, feats: dict, levels: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([feats[lv][hier.unit_nodes(lv)] for lv in levels], axis=1)


def stain_variants(sdata, rows: list, *, method: str) -> list:
    """Features after Macenko / Reinhard normalisation (fitted per section, applied per tile / crop)."""
    out = []
    for stain in ("macenko", "reinhard"):
        with measure(f"features {method} + {stain}, meso + macro", rows):
            key = sg.pp.image_features(sdata, method=method, levels=["meso", "macro"], stain_normalize=stain)
        out.append((f"{method}+{stain}", key))
    return out


def probe_her2st(res: dict, *, stain: str | None) -> list:
    sdata, hier, slide = res["sdata"], res["hier"], res["slide"]
    rows: list = []
    variants = [("dense", res["dense_key"])]
    with measure("features crop, meso + macro", rows):
        key = sg.pp.image_features(sdata, method="crop", levels=["meso", "macro"])
    variants.append(("crop", key))
    if stain:
        variants += stain_variants(sdata, rows, method=stain)
    for label, key in variants:
        feats = sg.pp.get_features(sdata, key=key)
        for levels in (("meso",), ("meso", "macro")):
            print(f"  ridge probe {label} {'+'.join(levels)}:", flush=True)
            r = ridge_probe(slide, unit_features(hier, feats, levels))
            rows.append({"probe": label, "levels": "+".join(levels), "mean_r": round(r, 3)})
            print(f"  => {label} {'+'.join(levels)}: mean Pearson r {r:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["kidney", "her2st"], choices=["kidney", "her2st"])
    ap.add_argument("--patch-sample", type=int, default=2000, help="nodes per level timed for patch extraction")
    ap.add_argument("--probe", action="store_true", help="her2st ridge probe: dense vs per-crop features")
    ap.add_argument(
        "--stain",
        choices=["dense", "crop"],
        default=None,
        help="with --probe: add Macenko / Reinhard normalised features computed with this method",
    )
    args = ap.parse_args()
    import torch

    print(f"CPU threads: torch {torch.get_num_threads()}, os {os.cpu_count()}; load average {os.getloadavg()}")
    for name in args.datasets:
        res = run_dataset(name, patch_sample=args.patch_sample, args=args)
        if name == "her2st" and args.probe:
            probe_her2st(res, stain=args.stain)
        print(f"load average after {name}: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
