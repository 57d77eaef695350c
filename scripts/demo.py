"""sigmma-sc demo on real data: her2st HER2+ breast cancer sections (legacy Spatial Transcriptomics).

Steps (each prints what it did; the outputs go to ``--out``):

1. load every her2st section found as one SpatialData object (H&E pyramids, spots, counts);
2. validate it with ``sigmma_sc.io.validate`` (the check every public function runs first);
3. save ``her2st_overview.png``: each section's H&E with its spots coloured by total counts.

Usage::

    python scripts/demo.py --out demo_output [--data /path/to/her2st]
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
    return parser.parse_args(argv)


def step(title: str) -> float:
    """Announce a step and return its start time."""
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(start: float, message: str) -> None:
    """Report a finished step with its duration."""
    print(f"   {message} ({time.perf_counter() - start:.1f} s)", flush=True)


def coarse_level(sdata, image_key: str) -> tuple[np.ndarray, float]:
    """Return the coarsest pyramid level as (h, w, 3) uint8 and its microns per pixel (from the transformation)."""
    from spatialdata.transformations import get_transformation

    tree = sdata.images[image_key]
    keys = sorted(tree.children, key=lambda k: int(k[len("scale") :]))
    full, coarse = tree[keys[0]]["image"], tree[keys[-1]]["image"]
    section = next(iter(get_transformation(tree, get_all=True)))
    affine = get_transformation(tree, to_coordinate_system=section).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    um_per_px = float(affine[0, 0]) * full.shape[2] / coarse.shape[2]
    return np.moveaxis(np.asarray(coarse.values), 0, -1), um_per_px


def overview_figure(sdata, path: Path) -> None:
    """Plot every section's H&E with its spots coloured by total counts, a colour bar and a 1 mm bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.patches import Circle, Rectangle

    table = sdata[Keys.TABLE]
    info = table.uns[Keys.DATASET]
    sections = list(table.obs[Keys.SECTION].cat.categories)
    totals = np.asarray(table.X.sum(axis=1)).ravel()
    norm = Normalize(vmin=float(np.percentile(totals, 1)), vmax=float(np.percentile(totals, 99)))
    cmap = plt.get_cmap("viridis")
    radius = info[Keys.UNIT_DIAMETER] / 2

    ncols = min(len(sections), 3)
    nrows = int(np.ceil(len(sections) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 5.4 * nrows), squeeze=False)
    for ax, s in zip(axes.ravel(), sections):
        img, um_per_px = coarse_level(sdata, info[Keys.IMAGE_KEYS][s])
        height_um, width_um = img.shape[0] * um_per_px, img.shape[1] * um_per_px
        ax.imshow(img, extent=(0, width_um, height_um, 0), interpolation="lanczos")
        rows = (table.obs[Keys.SECTION] == s).to_numpy()
        xy = table.obsm[Keys.SPATIAL][rows]
        spots = PatchCollection(
            [Circle((x, y), radius) for x, y in xy], cmap=cmap, norm=norm, edgecolor="none", alpha=0.85
        )
        spots.set_array(totals[rows])
        ax.add_collection(spots)
        # Zoom on the spots (with a margin): the scans carry a lot of empty glass.
        lo, hi = xy.min(axis=0) - 600, xy.max(axis=0) + 600
        ax.set_xlim(max(lo[0], 0), min(hi[0], width_um))
        ax.set_ylim(min(hi[1], height_um), max(lo[1], 0))
        x0, x1 = ax.get_xlim()
        y1, y0 = ax.get_ylim()
        bar_x, bar_y = x0 + 0.05 * (x1 - x0), y1 - 0.06 * (y1 - y0)
        ax.add_patch(Rectangle((bar_x, bar_y), 1000, 0.012 * (y1 - y0), color="black"))
        ax.text(bar_x + 500, bar_y - 0.015 * (y1 - y0), "1 mm", ha="center", va="bottom", fontsize=9)
        ax.set_title(f"{s}: {rows.sum()} spots, median {np.median(totals[rows]):.0f} UMI / spot", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(sections) :]:
        ax.axis("off")
    fig.suptitle(
        f"her2st: {len(sections)} HER2+ breast cancer sections, {table.n_obs} spots of "
        f"{info[Keys.UNIT_DIAMETER]:.0f} µm over the H&E",
        fontsize=13,
    )
    fig.tight_layout(rect=(0, 0, 0.92, 0.96))
    cax = fig.add_axes((0.93, 0.25, 0.015, 0.5))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, label="total counts per spot (UMI)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the demo's steps in order."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    t = step("1. Load her2st (every section found)")
    sdata = sg.datasets.her2st(args.data)
    table = sdata[Keys.TABLE]
    per_section = table.obs[Keys.SECTION].value_counts().sort_index()
    done(t, f"{table.n_obs} spots x {table.n_vars} genes; spots per section: {per_section.to_dict()}")

    t = step("2. Validate")
    validate = getattr(sg.io, "validate", None)
    if validate is None:
        done(t, "sigmma_sc.io.validate is not available in this version; skipped")
    else:
        slide = validate(sdata, require_counts=True)
        done(
            t,
            f"valid: {len(slide.sections)} sections, technology {slide.technology!r}, "
            f"unit {slide.unit_kind!r} of {slide.unit_diameter_um:.0f} µm",
        )

    t = step("3. Overview figure")
    path = args.out / "her2st_overview.png"
    overview_figure(sdata, path)
    done(t, f"wrote {path}")


if __name__ == "__main__":
    main()
