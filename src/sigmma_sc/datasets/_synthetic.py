"""A synthetic tissue whose H&E and expression share a known structure (niches -> cell types -> both).

Generative model (all sizes in microns):

- **Niches**: a Voronoi partition of the tissue into smooth regions (seeds about every 400 µm, or
  closer on small tissues so that every niche appears), boundaries warped by low-frequency waves.
  Seed labels cycle through the niches, so each niche is present.
- **Cells**: candidate positions on a jittered 10 µm grid; each candidate draws a cell type from its
  niche's composition and survives with the type's packing density, so dense types pack tightly.
  Exactly ``n_cells`` survivors are kept (uniform thinning).
- **Image**: Beer-Lambert optical densities of hematoxylin and eosin. Each type has its own nuclear
  size, eccentricity, hematoxylin stain and cytoplasm eosin; each niche its own extracellular eosin
  tint; a white glass margin surrounds the tissue. The pyramid is lazy (dask): each 1024 px tile of
  each level is drawn at that level's pixel size only when read, so a million-cell slide costs
  memory only for the cells' parameters.
- **Expression**: negative binomial counts (``theta = 5``) of ``softmax(base + type program + niche
  program)`` times a log-normal library size; each type and each niche up-regulates its own genes.
- **Section effects** (off by default, a known truth for integration and robustness benchmarks):
  a per-section stain shift in HED space (each stain's concentration scaled and offset, a DAB cast
  added) and a per-section sequencing depth (counts binomially thinned). Their draws use their own
  random streams, so the tissue, the cells and (with the effects off) every count and pixel are those
  of the same seed without them; :func:`section_shifts` gives the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Defaults, Keys
from sigmma_sc.io import SectionArrays, build_sdata, level_shapes, pyramid_factors

if TYPE_CHECKING:  # pragma: no cover
    from scipy.spatial import cKDTree
    from spatialdata import SpatialData

# Stain optical-density vectors (R, G, B) of hematoxylin and eosin (Ruifrok & Johnston).
_H_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_E_OD = np.array([0.07, 0.99, 0.11], dtype=np.float32)
_DAB_OD = np.array([0.27, 0.57, 0.78], dtype=np.float32)  # the third HED stain: a brown cast
_GLASS_OD = 0.04
_GRID_UM = 10.0  # candidate cell spacing: cells are about 10 µm apart at full packing
_JITTER = 0.3  # fraction of the grid step a candidate moves
_NICHE_SCALE_UM = 400.0
_MARGIN_UM = 30.0  # glass around the tissue
_CYTO_RADIUS_UM = 5.5
_NICHE_GRID_UM = 4.0  # resolution of the niche background tint
_THETA = 5.0  # negative binomial inverse dispersion
_MEAN_LIBRARY = 120.0
_CHUNK_CELLS = 20_000
_STAMP_BUDGET = 1_000_000  # stamp pixels per batch (~40 MB of temporaries)
# Section effects: additive stain offsets (optical density) per unit of stain_shift, and the columns
# of section_shifts. Stream tags of their random draws ([seed, tag, section]; layout and counts use 1).
_STAIN_BIAS_OD = 0.25
_SHIFT_COLUMNS = ("h_scale", "e_scale", "h_bias", "e_bias", "dab_bias", "depth_factor")
_STAIN_STREAM = 2
_DEPTH_STREAM = 3


@dataclass(frozen=True)
class _Programs:
    """Everything shared by the sections: cell-type morphology, niche composition, gene programs."""

    nuc_radius_um: np.ndarray  # (T,) semi-major axis
    eccentricity: np.ndarray  # (T,)
    hema_od: np.ndarray  # (T,)
    cyto_od: np.ndarray  # (T,)
    density: np.ndarray  # (T,) survival probability of a candidate position
    composition: np.ndarray  # (K, T) type probabilities per niche
    niche_eosin: np.ndarray  # (K,) extracellular eosin per niche
    log_base: np.ndarray  # (G,)
    type_effect: np.ndarray  # (T, G)
    niche_effect: np.ndarray  # (K, G)


def _spread(n: int, lo: float, hi: float, shift: float) -> np.ndarray:
    # Well-separated values for any number of types: a shifted golden-ratio sequence in [lo, hi].
    frac = (np.arange(n) * 0.6180339887 + shift) % 1.0
    return lo + (hi - lo) * frac


def _programs(rng: np.random.Generator, n_types: int, n_niches: int, n_genes: int) -> _Programs:
    composition = rng.dirichlet(np.full(n_types, 0.4), size=n_niches)
    # Each niche is dominated by its own type (cycling), so niches differ in composition and look.
    composition[np.arange(n_niches), np.arange(n_niches) % n_types] += 1.5
    composition /= composition.sum(axis=1, keepdims=True)

    log_base = rng.normal(0.0, 1.0, n_genes)
    type_effect = rng.normal(0.0, 0.2, (n_types, n_genes))
    niche_effect = np.zeros((n_niches, n_genes))
    order = rng.permutation(n_genes)
    n_type_markers = max(2, n_genes // (2 * n_types))
    for t in range(n_types):
        genes = order[(t * n_type_markers) % n_genes : (t * n_type_markers) % n_genes + n_type_markers]
        type_effect[t, genes] += rng.uniform(1.5, 2.5, len(genes))
    n_niche_markers = max(2, n_genes // (4 * n_niches))
    offset = n_types * n_type_markers
    for k in range(n_niches):
        start = (offset + k * n_niche_markers) % n_genes
        genes = order[start : start + n_niche_markers]
        niche_effect[k, genes] += rng.uniform(1.0, 2.0, len(genes))
    return _Programs(
        nuc_radius_um=_spread(n_types, 2.4, 4.8, 0.10),
        eccentricity=_spread(n_types, 0.0, 0.92, 0.55),
        hema_od=_spread(n_types, 0.55, 1.5, 0.30),
        cyto_od=_spread(n_types, 0.15, 0.65, 0.80),
        density=_spread(n_types, 0.45, 1.0, 0.20),
        composition=composition,
        niche_eosin=_spread(n_niches, 0.12, 0.42, 0.0),
        log_base=log_base,
        type_effect=type_effect,
        niche_effect=niche_effect,
    )


@dataclass
class _Scene:
    """One section: cell positions and morphology, plus what the tile renderer needs."""

    section_seed: tuple[int, int]
    programs: _Programs
    width_um: float  # image extent, glass margin included
    height_um: float
    tissue_lo: float  # tissue occupies [lo, hi_x] x [lo, hi_y]
    tissue_hi_x: float
    tissue_hi_y: float
    seeds: np.ndarray  # (m, 2) niche seeds
    seed_niche: np.ndarray  # (m,)
    warp: np.ndarray  # (4, 4): amplitude, frequency x, frequency y, phase of boundary waves
    xy: np.ndarray  # (n, 2)
    cell_type: np.ndarray  # (n,)
    niche: np.ndarray  # (n,)
    angle: np.ndarray  # (n,) nucleus orientation
    size: np.ndarray  # (n,) per-cell size factor around the type's nucleus size
    # (h_scale, e_scale, h_bias, e_bias, dab_bias) of the section's stain shift; None: no shift.
    stain: np.ndarray | None = None
    tree: cKDTree = field(init=False, repr=False)  # built once: tiles are drawn from several threads
    seed_tree: cKDTree = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.xy)
        self.seed_tree = cKDTree(self.seeds)

    def niche_at(self, xy: np.ndarray) -> np.ndarray:
        """Niche code at points ``(n, 2)``: the warped Voronoi cell they fall in."""
        return _niche_at(xy, self.seed_tree, self.seed_niche, self.warp)


def _niche_at(xy: np.ndarray, seed_tree: cKDTree, seed_niche: np.ndarray, warp: np.ndarray) -> np.ndarray:
    warped = np.array(xy, dtype=np.float64, copy=True)
    for amp, fx, fy, phase in warp:
        wave = amp * np.sin(fx * xy[:, 0] + fy * xy[:, 1] + phase)
        warped[:, 0] += wave
        warped[:, 1] += wave * 0.7
    _, idx = seed_tree.query(warped, k=1)
    return seed_niche[idx]


def _layout(rng: np.random.Generator, programs: _Programs, n_cells: int, section_seed: tuple[int, int]) -> _Scene:
    from scipy.spatial import cKDTree

    n_niches = programs.composition.shape[0]
    # Expected survival of a candidate, niches taking equal areas on average.
    keep = float(np.mean(programs.composition @ programs.density))
    side = float(np.sqrt(n_cells / keep * 1.08)) * _GRID_UM
    while True:
        n_side = int(np.ceil(side / _GRID_UM))
        side = n_side * _GRID_UM
        spacing = min(_NICHE_SCALE_UM, side / 2.5)
        n_seed_side = max(2, int(round(side / spacing)))
        gy, gx = np.meshgrid(np.arange(n_seed_side), np.arange(n_seed_side), indexing="ij")
        seeds = (np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(0.1, 0.9, (gx.size, 2))) * (side / n_seed_side)
        seeds += _MARGIN_UM
        seed_niche = rng.permutation(np.arange(len(seeds)) % n_niches)
        warp = np.stack(
            [
                rng.uniform(0.05, 0.15, 4) * spacing,
                rng.normal(0, 1, 4) * 2 * np.pi / (spacing * rng.uniform(0.8, 2.0, 4)),
                rng.normal(0, 1, 4) * 2 * np.pi / (spacing * rng.uniform(0.8, 2.0, 4)),
                rng.uniform(0, 2 * np.pi, 4),
            ],
            axis=1,
        )
        cy, cx = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
        xy = (np.stack([cx.ravel(), cy.ravel()], 1) + 0.5) * _GRID_UM
        xy += rng.uniform(-_JITTER, _JITTER, xy.shape) * _GRID_UM + _MARGIN_UM
        niche = _niche_at(xy, cKDTree(seeds), seed_niche, warp)
        # Inverse-CDF draw of each candidate's type from its niche's composition.
        cdf = np.cumsum(programs.composition, axis=1)[niche]
        cell_type = (rng.random(len(xy))[:, None] > cdf).sum(axis=1)
        cell_type = np.minimum(cell_type, programs.composition.shape[1] - 1)
        alive = rng.random(len(xy)) < programs.density[cell_type]
        if alive.sum() >= n_cells:
            break
        side *= 1.1  # rare: the draw came out sparse; a larger tissue fixes it
    chosen = np.sort(rng.choice(np.flatnonzero(alive), size=n_cells, replace=False))
    n = len(chosen)
    return _Scene(
        section_seed=section_seed,
        programs=programs,
        width_um=side + 2 * _MARGIN_UM,
        height_um=side + 2 * _MARGIN_UM,
        tissue_lo=_MARGIN_UM,
        tissue_hi_x=side + _MARGIN_UM,
        tissue_hi_y=side + _MARGIN_UM,
        seeds=seeds,
        seed_niche=seed_niche,
        warp=warp,
        xy=xy[chosen],
        cell_type=cell_type[chosen],
        niche=niche[chosen],
        angle=rng.uniform(0, np.pi, n),
        size=rng.uniform(0.85, 1.15, n),
    )


def _counts(rng: np.random.Generator, scene: _Scene) -> sparse.csr_matrix:
    p = scene.programs
    blocks = []
    for start in range(0, len(scene.xy), _CHUNK_CELLS):
        t = scene.cell_type[start : start + _CHUNK_CELLS]
        k = scene.niche[start : start + _CHUNK_CELLS]
        logits = p.log_base[None, :] + p.type_effect[t] + p.niche_effect[k]
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        library = _MEAN_LIBRARY * rng.lognormal(-0.5 * 0.35**2, 0.35, len(t))
        mu = prob * library[:, None]
        lam = mu * (rng.standard_gamma(_THETA, mu.shape, dtype=np.float32) / np.float32(_THETA))
        blocks.append(sparse.csr_matrix(rng.poisson(lam).astype(np.int32)))
    return sparse.vstack(blocks, format="csr")


def _stamp(
    scene: _Scene,
    idx: np.ndarray,
    mpp_y: float,
    mpp_x: float,
    box: tuple[int, int, int, int],
    eosin: np.ndarray,
    hema: np.ndarray,
) -> None:
    """Stamp cytoplasm (eosin) and nuclei (hematoxylin) of cells ``idx`` into a tile, in place.

    Every cell gets the same ``(2R+1)^2`` offset grid around its centre pixel; the densities are
    max-combined so overlapping cells do not add up.
    """
    p = scene.programs
    row0, row1, col0, col1 = box
    w = col1 - col0
    t = scene.cell_type[idx]
    cx, cy = scene.xy[idx, 0], scene.xy[idx, 1]
    reach = _CYTO_RADIUS_UM * 1.2
    ry, rx = int(np.ceil(reach / mpp_y)) + 1, int(np.ceil(reach / mpp_x)) + 1
    oy, ox = np.meshgrid(np.arange(-ry, ry + 1), np.arange(-rx, rx + 1), indexing="ij")
    disc = (oy * mpp_y) ** 2 + (ox * mpp_x) ** 2 <= (reach + 2 * max(mpp_x, mpp_y)) ** 2  # skip the corners
    oy, ox = oy[disc].astype(np.int32), ox[disc].astype(np.int32)
    # int32 indices: a tile has at most Defaults.IMAGE_CHUNK_PX^2 pixels.
    prow = np.floor(cy / mpp_y).astype(np.int32)[:, None] + oy[None, :]  # (cells, stamp)
    pcol = np.floor(cx / mpp_x).astype(np.int32)[:, None] + ox[None, :]
    dy = ((prow + 0.5) * mpp_y - cy[:, None]).astype(np.float32)
    dx = ((pcol + 0.5) * mpp_x - cx[:, None]).astype(np.float32)
    inside = (prow >= row0) & (prow < row1) & (pcol >= col0) & (pcol < col1)
    flat = (prow - row0) * w + (pcol - col0)
    # Soft edges about one pixel wide: on coarse levels sub-pixel nuclei stay visible, fainter.
    edge = np.float32(1.0 / max(mpp_x, mpp_y))
    size = scene.size[idx].astype(np.float32)[:, None]
    cyto = np.clip((np.float32(_CYTO_RADIUS_UM) * size - np.sqrt(dx * dx + dy * dy)) * edge, 0, 1)
    cyto *= p.cyto_od[t].astype(np.float32)[:, None]
    a = p.nuc_radius_um[t].astype(np.float32)[:, None] * size
    b = a * np.sqrt(1 - p.eccentricity[t] ** 2).astype(np.float32)[:, None]
    cos = np.cos(scene.angle[idx]).astype(np.float32)[:, None]
    sin = np.sin(scene.angle[idx]).astype(np.float32)[:, None]
    u = (dx * cos + dy * sin) / a
    v = (dy * cos - dx * sin) / b
    nucleus = np.clip((1 - np.sqrt(u * u + v * v)) * b * edge, 0, 1) * p.hema_od[t].astype(np.float32)[:, None]
    keep = inside & (cyto > 0)
    np.maximum.at(eosin.reshape(-1), flat[keep], cyto[keep])
    keep = inside & (nucleus > 0)
    np.maximum.at(hema.reshape(-1), flat[keep], nucleus[keep])


def _linear_weights(pos_um: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear-interpolation weights ``(len(pos), n)`` from a grid of step ``step`` and its centres ``(n,)``."""
    first = np.floor(pos_um[0] / step - 0.5)
    centres = (np.arange(first, np.floor(pos_um[-1] / step - 0.5) + 2) + 0.5) * step
    pos = pos_um / step - 0.5 - first
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0).astype(np.float32)
    weights = np.zeros((len(pos_um), len(centres)), dtype=np.float32)
    rows = np.arange(len(pos_um))
    weights[rows, i0] = 1 - frac
    weights[rows, i0 + 1] += frac
    return weights, centres


def _draw_tile(
    scene: _Scene, mpp_y: float, mpp_x: float, row0: int, row1: int, col0: int, col1: int, level: int
) -> np.ndarray:
    """Render pixels ``[row0, row1) x [col0, col1)`` of a level with pixel size ``(mpp_y, mpp_x)``."""
    p = scene.programs
    h, w = row1 - row0, col1 - col0
    ys = (np.arange(row0, row1) + 0.5) * mpp_y  # pixel centres in microns
    xs = (np.arange(col0, col1) + 0.5) * mpp_x
    rng = np.random.default_rng([*scene.section_seed, level, row0, col0])

    # Extracellular eosin: the niche tint on a coarse grid, linearly interpolated to the pixels
    # (soft niche borders without a niche lookup per pixel).
    step = max(_NICHE_GRID_UM, 4 * mpp_x, 4 * mpp_y)
    wy, gy = _linear_weights(ys, step)
    wx, gx = _linear_weights(xs, step)
    grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1).reshape(-1, 2)
    tint = p.niche_eosin[scene.niche_at(grid)].reshape(len(gy), len(gx)).astype(np.float32)
    eosin = np.ascontiguousarray(wy @ tint @ wx.T)
    hema = np.zeros((h, w), dtype=np.float32)

    # Cells whose cytoplasm reaches into the tile, in batches to bound the stamp's memory.
    margin = _CYTO_RADIUS_UM * 1.2 + 2 * max(mpp_x, mpp_y)
    centre = np.array([(xs[0] + xs[-1]) / 2, (ys[0] + ys[-1]) / 2])
    half = max(xs[-1] - xs[0], ys[-1] - ys[0]) / 2 + margin
    idx = np.sort(np.asarray(scene.tree.query_ball_point(centre, r=half, p=np.inf), dtype=np.int64))
    stamp_px = (2 * int(np.ceil(_CYTO_RADIUS_UM * 1.2 / mpp_y)) + 3) * (
        2 * int(np.ceil(_CYTO_RADIUS_UM * 1.2 / mpp_x)) + 3
    )
    batch = max(1, _STAMP_BUDGET // stamp_px)
    for start in range(0, len(idx), batch):
        _stamp(scene, idx[start : start + batch], mpp_y, mpp_x, (row0, row1, col0, col1), eosin, hema)

    # Chromatin texture and stain noise.
    hema *= np.float32(0.8) + np.float32(0.4) * rng.random(hema.shape, dtype=np.float32)
    eosin += np.float32(0.02) * rng.standard_normal(eosin.shape, dtype=np.float32)
    np.maximum(eosin, 0, out=eosin)  # optical densities are non-negative (keeps exp(-od) <= 1)
    dab = None
    if scene.stain is not None:
        # The section's stain shift in HED space: each stain's concentration scaled and offset, a DAB cast.
        h_scale, e_scale, h_bias, e_bias, dab_bias = (np.float32(v) for v in scene.stain)
        for od, scale, bias in ((hema, h_scale, h_bias), (eosin, e_scale, e_bias)):
            od *= scale
            od += bias
            np.maximum(od, 0, out=od)
        dab = max(dab_bias, np.float32(0))
    # Beer-Lambert, one channel at a time (no (h, w, 3) float temporaries).
    out = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        channel = hema * _H_OD[c]
        channel += eosin * _E_OD[c]
        if dab is not None:
            channel += dab * _DAB_OD[c]
        np.negative(channel, out=channel)
        np.exp(channel, out=channel)
        channel *= np.float32(255.0)
        out[..., c] = channel  # exp(-od) <= 1 for non-negative od; uint8 truncation
    # Glass outside the tissue.
    rows_in = (ys >= scene.tissue_lo) & (ys < scene.tissue_hi_y)
    cols_in = (xs >= scene.tissue_lo) & (xs < scene.tissue_hi_x)
    if not (rows_in.all() and cols_in.all()):
        out[~(rows_in[:, None] & cols_in[None, :])] = np.uint8(255.0 * np.exp(-_GLASS_OD))
    return out


def _thin(counts: sparse.csr_matrix, factor: float, rng: np.random.Generator) -> sparse.csr_matrix:
    """Keep each molecule with probability ``factor`` (binomial thinning); every cell keeps at least one."""
    out = counts.copy()
    out.data = rng.binomial(counts.data, factor).astype(counts.dtype)
    stored = np.flatnonzero(np.diff(out.indptr) > 0)  # rows with counts before thinning
    totals = np.asarray(out.sum(axis=1)).ravel()
    # A cell without counts is refused downstream: give it back one molecule of its most expressed gene.
    for row in stored[totals[stored] == 0]:
        lo, hi = counts.indptr[row], counts.indptr[row + 1]
        out.data[lo + int(np.argmax(counts.data[lo:hi]))] = 1
    out.eliminate_zeros()
    return out


def section_shifts(
    n_sections: int = 1, *, seed: int = 0, stain_shift: float = 0.0, depth_shift: float = 0.0
) -> pd.DataFrame:
    """Per-section stain and depth shifts of :func:`synthetic` (the truth an integration method should undo).

    Each section ``S{i}`` draws, from its own random stream of ``seed``: stain scales
    ``U(1 - stain_shift, 1 + stain_shift)`` of the hematoxylin and eosin concentrations, offsets
    ``U(-1, 1) * 0.25 * stain_shift`` (optical density) of both, a DAB cast ``U(0, 1) * 0.25 *
    stain_shift``, and a depth factor ``U(1 - depth_shift, 1)``: the share of its molecules kept.

    Parameters
    ----------
    n_sections, seed, stain_shift, depth_shift
        As in :func:`synthetic`.

    Returns
    -------
    DataFrame indexed by section: ``h_scale``, ``e_scale``, ``h_bias``, ``e_bias``, ``dab_bias``,
    ``depth_factor`` (1, 1, 0, 0, 0, 1 for effects that are off).

    Examples
    --------
    >>> bool(section_shifts(2, seed=0, depth_shift=0.5)["depth_factor"].between(0.5, 1).all())
    True
    """
    if not 0.0 <= stain_shift < 1.0:
        raise ValueError(f"stain_shift must be in [0, 1) (a stain scale stays positive), got {stain_shift!r}.")
    if not 0.0 <= depth_shift < 1.0:
        raise ValueError(f"depth_shift must be in [0, 1) (a section keeps some counts), got {depth_shift!r}.")
    rows = []
    for s in range(n_sections):
        u = np.random.default_rng([seed, _STAIN_STREAM, s]).uniform(-1.0, 1.0, 5)
        v = np.random.default_rng([seed, _DEPTH_STREAM, s]).uniform(0.0, 1.0)
        bias = _STAIN_BIAS_OD * stain_shift
        rows.append(
            (
                1.0 + stain_shift * u[0],
                1.0 + stain_shift * u[1],
                bias * u[2],
                bias * u[3],
                bias * abs(u[4]),
                1.0 - depth_shift * v,
            )
        )
    return pd.DataFrame(rows, index=pd.Index([f"S{s}" for s in range(n_sections)]), columns=list(_SHIFT_COLUMNS))


def _lazy_level(scene: _Scene, shape: tuple[int, int], full: tuple[int, int], mpp: float, level: int) -> Any:
    import dask
    import dask.array as da

    h, w = shape
    # The exact per-axis factor SpatialData assigns this level (full / level size).
    mpp_y, mpp_x = mpp * full[0] / h, mpp * full[1] / w
    # The scene rides in a partial: dask would otherwise hash its arrays once per tile.
    draw = dask.delayed(partial(_draw_tile, scene), pure=False)
    rows = []
    for r0 in range(0, h, Defaults.IMAGE_CHUNK_PX):
        r1 = min(r0 + Defaults.IMAGE_CHUNK_PX, h)
        row = []
        for c0 in range(0, w, Defaults.IMAGE_CHUNK_PX):
            c1 = min(c0 + Defaults.IMAGE_CHUNK_PX, w)
            tile = draw(mpp_y, mpp_x, r0, r1, c0, c1, level)
            row.append([da.from_delayed(tile, shape=(r1 - r0, c1 - c0, 3), dtype=np.uint8)])
        rows.append(row)
    return da.block(rows)


def synthetic(
    n_cells: int = 2000,
    *,
    n_genes: int = 200,
    n_sections: int = 1,
    seed: int = 0,
    n_types: int = 6,
    n_niches: int = 4,
    mpp: float = 0.5,
    stain_shift: float = 0.0,
    depth_shift: float = 0.0,
) -> SpatialData:
    """Generate a tissue with known niches and cell types, visible in both the H&E and the counts.

    Niches are smooth regions; each niche has its own cell-type composition and extracellular
    eosin tint. Each cell type has its own nuclear size, eccentricity, hematoxylin stain,
    cytoplasm eosin and packing density, and its own up-regulated genes; each niche adds its own
    genes. Image-expression alignment is therefore learnable, and the truth is stored in
    ``obs["cell_type"]`` and ``obs["niche"]``. Cells are about 10 µm apart; counts are negative
    binomial (about 120 UMI per cell). The image is a lazy pyramid drawn tile by tile on read, so
    memory holds only the cells' parameters and the counts: one million cells take about 100 s and
    2.3 GB to generate on a busy 2-core machine (the counts, in ``X`` and ``layers["counts"]``);
    the coarsest level of their 650 Mpx image then draws in seconds.

    Section effects, off by default, make a ground truth for integration and robustness across
    sections: ``stain_shift`` gives every section its own H&E colour (a shift in HED space) and
    ``depth_shift`` its own sequencing depth, while niches and cell types stay known per cell.
    The tissue and the cells do not depend on them, and with both at 0 the object is exactly the one
    of earlier versions for the same seed.

    Parameters
    ----------
    n_cells
        Total number of cells, split evenly across sections.
    n_genes
        Number of genes.
    n_sections
        Number of sections (independent layouts of the same generative model), named ``S0``, ``S1``, ...
    seed
        Random seed: the same seed gives the same object (layout, counts and pixels).
    n_types
        Number of cell types (``type0``, ...).
    n_niches
        Number of niches (``niche0``, ...).
    mpp
        Microns per pixel of the full-resolution image.
    stain_shift
        Strength of a per-section stain shift in HED space, in ``[0, 1)``: each section scales its
        hematoxylin and eosin concentrations by ``U(1 - stain_shift, 1 + stain_shift)``, offsets them
        by up to ``0.25 * stain_shift`` optical density (densities stay non-negative) and adds a DAB
        (brown) cast of up to that much; the glass stays as it is. 0.05 is a mild scanner / batch difference, 0.2 a strong one
        (as in HED colour augmentation, Tellez et al. 2018).
    depth_shift
        Strength of a per-section sequencing-depth shift, in ``[0, 1)``: each section keeps a share
        ``U(1 - depth_shift, 1)`` of its molecules (binomial thinning of the counts; a cell left
        without counts keeps one molecule of its top gene).

    Returns
    -------
    Per section ``S``: image ``"{S}_he"``, circles ``"{S}_cells"`` (10 µm diameter); table ``"table"``
    with raw counts, ``obs["cell_type"]``, ``obs["niche"]``, ``obs["section"]`` and technology
    ``"synthetic"``. The section effects drawn are :func:`section_shifts` of the same arguments.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(2000, n_genes=100, seed=1)
    >>> sdata["table"].obs["cell_type"].nunique()
    6
    >>> batches = sg.datasets.synthetic(2000, n_sections=3, stain_shift=0.2, depth_shift=0.5, seed=1)
    """
    if n_cells < n_sections or n_sections < 1:
        raise ValueError(f"need n_sections >= 1 and at least one cell per section, got {n_cells=}, {n_sections=}.")
    if n_genes < 1 or n_types < 1 or n_niches < 1:
        raise ValueError(f"n_genes, n_types and n_niches must be positive, got {n_genes}, {n_types}, {n_niches}.")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}.")
    shifts = section_shifts(n_sections, seed=seed, stain_shift=stain_shift, depth_shift=depth_shift)
    programs = _programs(np.random.default_rng([seed, 0]), n_types, n_niches, n_genes)
    genes = [f"gene{g}" for g in range(n_genes)]
    type_names = [f"type{t}" for t in range(n_types)]
    niche_names = [f"niche{k}" for k in range(n_niches)]
    per_section = np.full(n_sections, n_cells // n_sections)
    per_section[: n_cells % n_sections] += 1

    arrays = []
    for s, n in enumerate(per_section):
        rng = np.random.default_rng([seed, 1, s])
        scene = _layout(rng, programs, int(n), (seed, s))
        counts = _counts(rng, scene)
        if stain_shift > 0:
            scene.stain = shifts.iloc[s][list(_SHIFT_COLUMNS[:5])].to_numpy(dtype=np.float64)
        if depth_shift > 0:
            thin_rng = np.random.default_rng([seed, _DEPTH_STREAM, s, 1])
            counts = _thin(counts, float(shifts.iloc[s]["depth_factor"]), thin_rng)
        full = (int(np.ceil(scene.height_um / mpp)), int(np.ceil(scene.width_um / mpp)))
        shapes = level_shapes(*full, len(pyramid_factors(*full)) + 1)
        levels = [_lazy_level(scene, shp, full, mpp, lvl) for lvl, shp in enumerate(shapes)]
        obs = pd.DataFrame(
            {
                Keys.CELL_TYPE: pd.Categorical.from_codes(scene.cell_type, categories=type_names),
                Keys.NICHE: pd.Categorical.from_codes(scene.niche, categories=niche_names),
            }
        )
        arrays.append(
            SectionArrays(
                section=f"S{s}",
                image=levels,
                mpp=mpp,
                xy_um=scene.xy,
                counts=counts,
                genes=genes,
                shape="circle",
                diameter_um=_GRID_UM,
                unit="cell",
                obs=obs,
            )
        )
    return build_sdata(arrays, technology="synthetic", unit_kind="cell", unit_diameter_um=_GRID_UM)
