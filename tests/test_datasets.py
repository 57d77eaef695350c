"""sigmma_sc.datasets: real-data loaders against their raw files, the SpatialData contract, the synthetic tissue."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

import sigmma_sc as sg
from sigmma_sc._constants import HER2ST_MPP, VISIUM_SPOT_PITCH_UM, XENIUM_NCBI858_MPP, Keys
from sigmma_sc.datasets import _paths

HER2ST_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


# ----------------------------------------------------------------------------- helpers
def _scale_keys(tree) -> list[str]:
    return sorted(tree.children, key=lambda k: int(k[len("scale") :]))


def _level(sdata, image_key: str, level: int) -> tuple[np.ndarray, float, float]:
    """(h, w, 3) float pixels of a pyramid level and its (row, column) downscale factors."""
    tree = sdata.images[image_key]
    keys = _scale_keys(tree)
    full = tree[keys[0]]["image"]
    arr = tree[keys[level]]["image"]
    fy = full.shape[1] / arr.shape[1]
    fx = full.shape[2] / arr.shape[2]
    return np.moveaxis(arr.values, 0, -1).astype(np.float64), fy, fx


def _um_to_px_matrix(sdata, image_key: str, section: str) -> np.ndarray:
    """3x3 affine from microns (x, y) to full-resolution intrinsic pixels (col, row)."""
    from spatialdata.transformations import get_transformation

    tr = get_transformation(sdata.images[image_key], to_coordinate_system=section)
    return np.linalg.inv(tr.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))


def _window_mean(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius: int) -> np.ndarray:
    """Mean grey value of the (2r+1)^2 window around each (row, col); NaN when outside the image."""
    grey = img.mean(axis=2)
    out = np.full(len(rows), np.nan)
    for i, (r, c) in enumerate(zip(rows, cols)):
        if 0 <= r < grey.shape[0] and 0 <= c < grey.shape[1]:
            out[i] = grey[max(r - radius, 0) : r + radius + 1, max(c - radius, 0) : c + radius + 1].mean()
    return out


def _raw_her2st_join(folder: Path, section: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test's own join of counts rows "<x>x<y>" to selected spots: (counts, selection) aligned."""
    counts = pd.read_csv(folder / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(folder / "spots" / f"{section}_selection.tsv", sep="\t")
    sel = sel[sel["selected"] == 1]
    sel.index = [f"{int(round(x))}x{int(round(y))}" for x, y in zip(sel["x"], sel["y"])]
    keep = counts.index.intersection(sel.index)
    return counts.loc[keep], sel.loc[keep]


@pytest.fixture(scope="module")
def her2st_raw(her2st_dir) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    return {s: _raw_her2st_join(her2st_dir, s) for s in sg.datasets.her2st_sections(her2st_dir)}


# ----------------------------------------------------------------------------- the contract, every loader
LOADERS = ["her2st_sdata", "xenium_sdata", "kidney_crop_sdata", "mouse_brain_sdata", "synthetic_sdata"]


@pytest.mark.parametrize("fixture", LOADERS)
def test_spatialdata_contract(fixture, request):
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import Identity, Scale, get_transformation

    sdata = request.getfixturevalue(fixture)
    table = sdata[Keys.TABLE]
    info = table.uns[Keys.DATASET]
    sections = list(table.obs[Keys.SECTION].cat.categories)
    assert list(info[Keys.IMAGE_KEYS]) == sections == list(info[Keys.SHAPES_KEYS])
    assert info[Keys.UNIT_KIND] in ("spot", "cell")
    assert info[Keys.UNIT_DIAMETER] > 0
    regions, region_key, instance_key = get_table_keys(table)
    assert (region_key, instance_key) == (Keys.REGION, Keys.INSTANCE)
    assert sorted(regions) == sorted(info[Keys.SHAPES_KEYS].values())
    assert table.obs_names.is_unique
    for s in sections:
        image_key, shapes_key = info[Keys.IMAGE_KEYS][s], info[Keys.SHAPES_KEYS][s]
        assert image_key == f"{s}_he"
        tree = sdata.images[image_key]
        keys = _scale_keys(tree)
        assert len(keys) >= 2, "the image must be a multiscale pyramid"
        full = tree[keys[0]]["image"]
        assert full.dims == ("c", "y", "x") and full.shape[0] == 3 and full.dtype == np.uint8
        assert max(tree[keys[-1]]["image"].shape[1:]) <= 1000
        tr = get_transformation(tree, to_coordinate_system=s)
        assert isinstance(tr, Scale) and np.allclose(tr.scale[0], tr.scale[1])
        assert isinstance(get_transformation(sdata.shapes[shapes_key], to_coordinate_system=s), Identity)

        rows = (table.obs[Keys.SECTION] == s).to_numpy()
        obs = table.obs[rows]
        assert (obs[Keys.REGION] == shapes_key).all()
        assert list(obs.index) == [f"{s}_{i}" for i in obs[Keys.INSTANCE]]
        shapes = sdata.shapes[shapes_key].loc[obs[Keys.INSTANCE].to_numpy()]
        centres = np.c_[shapes.geometry.centroid.x, shapes.geometry.centroid.y]
        np.testing.assert_allclose(centres, table.obsm[Keys.SPATIAL][rows], atol=1e-6)
        if "radius" in shapes:
            np.testing.assert_allclose(2 * shapes["radius"], info[Keys.UNIT_DIAMETER])
        else:
            np.testing.assert_allclose(np.sqrt(shapes.geometry.area), info[Keys.UNIT_DIAMETER])

    assert sparse.issparse(table.X) and table.X.format == "csr"
    if info[Keys.LOG_NORMALIZED]:
        assert Keys.COUNTS_LAYER not in table.layers
    else:
        assert table.X.dtype == np.int32
        counts = table.layers[Keys.COUNTS_LAYER]
        assert counts is not table.X and (counts != table.X).nnz == 0
        assert table.X.data.min() >= 0
    # Every loader's output is accepted by the one validation entry point as it is.
    slide = sg.io.validate(sdata, require_counts=not info[Keys.LOG_NORMALIZED])
    assert slide.sections == sections
    assert slide.unit_kind == info[Keys.UNIT_KIND]


# ----------------------------------------------------------------------------- her2st
def test_her2st_sections_and_spot_counts(her2st_sdata, her2st_dir, her2st_raw):
    table = her2st_sdata[Keys.TABLE]
    found = sg.datasets.her2st_sections(her2st_dir)
    assert list(table.obs[Keys.SECTION].cat.categories) == found
    per_section = table.obs[Keys.SECTION].value_counts().to_dict()
    for s in found:
        counts, _ = her2st_raw[s]
        assert per_section[s] == len(counts)
    if found == list(HER2ST_SPOTS):  # the copy in ../shared/data
        assert per_section == HER2ST_SPOTS
        assert table.n_obs == 910


def test_her2st_counts_match_raw_files(her2st_sdata, her2st_raw):
    table = her2st_sdata[Keys.TABLE]
    assert table.X.dtype == np.int32
    union: set[str] = set()
    for s in table.obs[Keys.SECTION].cat.categories:
        counts, _ = her2st_raw[s]
        union |= set(counts.columns)
        rows = (table.obs[Keys.SECTION] == s).to_numpy()
        sub = table[rows]
        assert list(sub.obs[Keys.BARCODE]) == list(counts.index)
        cols = table.var_names.get_indexer(counts.columns)
        X = sub.X.toarray()
        assert (cols >= 0).sum() > 0.9 * len(cols)
        np.testing.assert_array_equal(X[:, cols[cols >= 0]], counts.to_numpy()[:, cols >= 0])
        # Genes the loader dropped have no count in any loaded spot.
        assert counts.to_numpy()[:, cols < 0].sum() == 0
        others = np.setdiff1d(np.arange(table.n_vars), cols)
        assert not X[:, others].any(), "genes a section did not report must be 0 (union)"
    assert set(table.var_names) <= union
    assert (np.asarray(table.X.sum(axis=0)).ravel() > 0).all()
    assert (np.asarray(table.X.sum(axis=1)).ravel() > 0).all()


def test_her2st_micron_transform_maps_back_to_pixels(her2st_sdata, her2st_raw):
    table = her2st_sdata[Keys.TABLE]
    for s in table.obs[Keys.SECTION].cat.categories:
        _, sel = her2st_raw[s]
        rows = (table.obs[Keys.SECTION] == s).to_numpy()
        xy = table.obsm[Keys.SPATIAL][rows]
        px = (_um_to_px_matrix(her2st_sdata, f"{s}_he", s) @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]
        # Intrinsic coordinates put pixel edges at integers: the centre of pixel index i is i + 0.5.
        np.testing.assert_allclose(px - 0.5, sel[["pixel_x", "pixel_y"]].to_numpy(), atol=1e-6)
        np.testing.assert_allclose(xy, (sel[["pixel_x", "pixel_y"]].to_numpy() + 0.5) * HER2ST_MPP)
        # Spots are 100 µm apart on the ST array's 200 µm pitch grid (diagonal neighbours ~ 100-200 µm).
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        assert 150 < np.median(d.min(axis=1)) < 250


def test_her2st_spots_lie_on_tissue(her2st_sdata):
    table = her2st_sdata[Keys.TABLE]
    for s in table.obs[Keys.SECTION].cat.categories:
        img, fy, fx = _level(her2st_sdata, f"{s}_he", 3)
        xy = table.obsm[Keys.SPATIAL][(table.obs[Keys.SECTION] == s).to_numpy()]
        rows = (xy[:, 1] / (HER2ST_MPP * fy)).astype(int)
        cols = (xy[:, 0] / (HER2ST_MPP * fx)).astype(int)
        radius = int(30 / (HER2ST_MPP * fx))
        spot_grey = _window_mean(img, rows, cols, radius)
        sat = img.max(axis=2) - img.min(axis=2)
        spot_sat = _window_mean(np.repeat(sat[..., None], 3, axis=2), rows, cols, radius)
        # Slide background: a 4% frame around the scan.
        k = int(0.04 * min(img.shape[:2]))
        frame = np.ones(img.shape[:2], bool)
        frame[k:-k, k:-k] = False
        bg_grey = img.mean(axis=2)[frame]
        assert np.nanmean(spot_grey) < bg_grey.mean() - 40, s
        assert np.nanpercentile(spot_grey, 90) < np.percentile(bg_grey, 10), s
        assert np.nanmean(spot_sat) > sat[frame].mean() + 15, s


def test_her2st_section_subset_and_missing_section(her2st_dir):
    sections = sg.datasets.her2st_sections(her2st_dir)
    sdata = sg.datasets.her2st(her2st_dir, sections=sections[-1:])
    assert list(sdata[Keys.TABLE].obs[Keys.SECTION].cat.categories) == sections[-1:]
    assert list(sdata.images) == [f"{sections[-1]}_he"]
    with pytest.raises(KeyError, match="not in"):
        sg.datasets.her2st(her2st_dir, sections=["nope"])


# ----------------------------------------------------------------------------- a tiny her2st-layout folder
def _write_her2st_section(folder: Path, section: str, genes: list[str], spots: list[tuple[int, int]], seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("counts", "spots", "images"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{x}x{y}" for x, y in spots]
    counts = pd.DataFrame(rng.integers(0, 9, (len(spots), len(genes))), index=ids, columns=genes)
    counts.to_csv(folder / "counts" / f"{section}.tsv.gz", sep="\t")
    sel = pd.DataFrame(
        {
            "x": [x for x, _ in spots] + [99],
            "y": [y for _, y in spots] + [99],
            "new_x": 0.0,
            "new_y": 0.0,
            "pixel_x": [10.0 * x for x, _ in spots] + [5.0],
            "pixel_y": [12.0 * y for _, y in spots] + [5.0],
            "selected": [1] * (len(spots) - 1) + [0, 1],  # last counted spot unselected; selected row 99x99 absent
        }
    )
    sel.to_csv(folder / "spots" / f"{section}_selection.tsv", sep="\t", index=False)
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(folder / "images" / f"{section}_HE.jpg")
    return counts


def test_her2st_reads_any_sections_with_gene_union(tmp_path):
    root = tmp_path / "her2st"
    a = _write_her2st_section(root, "A1", ["g1", "g2", "g3"], [(1, 2), (2, 2), (3, 4)], seed=0)
    b = _write_her2st_section(root, "Z9", ["g3", "g4"], [(5, 5), (6, 5)], seed=1)
    (root / "counts" / "X7.tsv.gz").write_bytes(b"")  # a section without image / spots is not a section
    assert sg.datasets.her2st_sections(root) == ["A1", "Z9"]
    sdata = sg.datasets.her2st(root)
    table = sdata[Keys.TABLE]
    assert list(table.var_names) == ["g1", "g2", "g3", "g4"]
    assert table.obs[Keys.SECTION].value_counts().to_dict() == {"A1": 2, "Z9": 1}
    a1 = table[table.obs[Keys.SECTION] == "A1"]
    np.testing.assert_array_equal(a1.X.toarray(), np.c_[a.iloc[:2].to_numpy(), np.zeros(2, int)])
    z9 = table[table.obs[Keys.SECTION] == "Z9"]
    np.testing.assert_array_equal(z9.X.toarray(), np.c_[np.zeros((1, 2), int), b.iloc[:1].to_numpy()])
    assert list(table.obs[Keys.BARCODE]) == ["1x2", "2x2", "5x5"]
    # A folder holding the data set folder is accepted too, and so is $SIGMMA_DATA_DIR.
    assert sg.datasets.her2st(tmp_path, sections=["Z9"])[Keys.TABLE].n_obs == 1


def test_data_dir_env_takes_precedence(tmp_path, monkeypatch):
    _write_her2st_section(tmp_path / "her2st", "B2", ["g1"], [(1, 1), (2, 1)], seed=2)
    monkeypatch.setenv(sg.datasets.DATA_DIR_ENV, str(tmp_path))
    table = sg.datasets.her2st()[Keys.TABLE]
    assert list(table.obs[Keys.SECTION].cat.categories) == ["B2"]


def test_missing_data_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv(sg.datasets.DATA_DIR_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(_paths, "repo_data_dir", lambda: tmp_path / "no_shared")
    monkeypatch.setattr(_paths, "cache_dir", lambda: tmp_path / "cache")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(_paths, "_download", offline)
    with pytest.raises(FileNotFoundError) as err:
        sg.datasets.her2st()
    msg = str(err.value)
    assert "SIGMMA_DATA_DIR" in msg and "path=" in msg and "no network" in msg and "almaan/her2st" in msg
    with pytest.raises(FileNotFoundError, match="no public file-level source"):
        sg.datasets.visium_hd_kidney()
    with pytest.raises(FileNotFoundError, match="does not hold"):
        sg.datasets.xenium_lung(tmp_path)


# ----------------------------------------------------------------------------- Xenium lung
def test_xenium_cells_on_tissue_only_with_row_column_swap(xenium_sdata, xenium_dir):
    import anndata as ad

    table = xenium_sdata[Keys.TABLE]
    assert table.n_obs == 200 and table.X.dtype == np.int32
    assert table.uns[Keys.DATASET][Keys.UNIT_DIAMETER] == 20
    raw = ad.read_h5ad(xenium_dir / "NCBI858.h5ad")
    np.testing.assert_array_equal(table.X.toarray(), np.asarray(raw[:, table.var_names].X))
    assert np.asarray(raw.X).sum(axis=0)[~raw.var_names.isin(table.var_names)].sum() == 0  # dropped: empty
    img, _, _ = _level(xenium_sdata, "NCBI858_he", 0)
    xy = table.obsm[Keys.SPATIAL]
    rows = np.floor(xy[:, 1] / XENIUM_NCBI858_MPP).astype(int)
    cols = np.floor(xy[:, 0] / XENIUM_NCBI858_MPP).astype(int)
    np.testing.assert_array_equal(rows, np.round(raw.obs["x_pixel"]).astype(int))  # x_pixel is the ROW
    on = _window_mean(img, rows, cols, 3)
    swapped = _window_mean(img, cols, rows, 3)
    swapped = np.where(np.isnan(swapped), 255, swapped)
    tissue = 220  # glass is ~240-250 grey in this scan
    assert (on < tissue).mean() > 0.95
    assert (swapped < tissue).mean() < 0.7
    assert stats.wilcoxon(on, swapped).pvalue < 1e-6


# ----------------------------------------------------------------------------- Visium HD kidney
def _gene(table, name: str) -> np.ndarray:
    return np.asarray(table.X[:, table.var_names.get_loc(name)].todense()).ravel()


def test_kidney_podocyte_bins_sit_on_glomeruli(kidney_crop_sdata):
    table = kidney_crop_sdata[Keys.TABLE]
    assert table.n_obs == 5517  # 5,695 bins, 178 of which have no count in the crop's 216 genes
    assert table.uns[Keys.DATASET][Keys.TECHNOLOGY] == "visium_hd"
    podocyte = _gene(table, "NPHS2") + _gene(table, "PODXL")
    tubule = _gene(table, "UMOD")
    glom = (podocyte >= 2) & (tubule == 0)
    tub = (tubule >= 5) & (podocyte == 0)
    assert glom.sum() > 100 and tub.sum() > 50
    img, _, _ = _level(kidney_crop_sdata, "kidney_he", 0)
    mpp = 1 / _um_to_px_matrix(kidney_crop_sdata, "kidney_he", "kidney")[0, 0]
    xy = table.obsm[Keys.SPATIAL]
    rows, cols = np.floor(xy[:, 1] / mpp).astype(int), np.floor(xy[:, 0] / mpp).astype(int)
    grey = _window_mean(img, rows, cols, 4)  # 16 µm bin = 8 px
    green = _window_mean(np.repeat(img[..., 1:2], 3, axis=2), rows, cols, 4)
    # Glomeruli (dense nuclei) are darker, and less eosin-pale in green, than UMOD+ thick ascending limbs.
    assert np.nanmean(grey[glom]) < np.nanmean(grey[tub]) - 5
    assert stats.mannwhitneyu(grey[glom], grey[tub], nan_policy="omit").pvalue < 1e-4
    assert stats.mannwhitneyu(green[glom], green[tub], nan_policy="omit").pvalue < 1e-4
    # The shuffled control: the same test on random bins of the same sizes does not separate them.
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(grey))
    a, b = perm[: glom.sum()], perm[glom.sum() : glom.sum() + tub.sum()]
    assert stats.mannwhitneyu(grey[a], grey[b], nan_policy="omit").pvalue > 1e-4


def test_kidney_crop_keeps_every_bin_without_drop_empty(kidney_dir):
    table = sg.datasets.visium_hd_kidney(kidney_dir, crop=True, drop_empty=False)[Keys.TABLE]
    assert table.shape == (5695, 216)
    assert table.obs_names.is_unique


@pytest.mark.slow
def test_kidney_full_section():
    folder = _paths.local_dataset_dir("visiumhd_kidney", required=_paths.REQUIRED_FILES["visiumhd_kidney"])
    if folder is None:
        pytest.skip("visiumhd_kidney not found")
    sdata = sg.datasets.visium_hd_kidney(folder)
    table = sdata[Keys.TABLE]
    assert table.shape == (165184 - 12, 1011)  # 12 bins have no count in the stored genes
    assert {"NPHS2", "PODXL", "UMOD"} <= set(table.var_names)
    assert isinstance(sdata.shapes["kidney_bins"].geometry.iloc[0].area, float)
    assert sdata.images["kidney_he"]["scale0"]["image"].shape == (3, 6000, 4456)


# ----------------------------------------------------------------------------- Visium mouse brain
def test_mouse_brain_flags_log_normalised_and_derives_mpp(mouse_brain_sdata):
    table = mouse_brain_sdata[Keys.TABLE]
    info = table.uns[Keys.DATASET]
    assert info[Keys.LOG_NORMALIZED] is True and info[Keys.TECHNOLOGY] == "visium"
    assert table.X.dtype == np.float32 and Keys.COUNTS_LAYER not in table.layers
    mpp = 1 / _um_to_px_matrix(mouse_brain_sdata, "mouse_brain_he", "mouse_brain")[0, 0]
    assert mpp == pytest.approx(VISIUM_SPOT_PITCH_UM / 137, rel=1e-6)
    xy = table.obsm[Keys.SPATIAL]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.median(d.min(axis=1)) == pytest.approx(VISIUM_SPOT_PITCH_UM)


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_truth_and_layout(synthetic_sdata):
    table = synthetic_sdata[Keys.TABLE]
    assert table.n_obs == 1200 and table.n_vars == 80
    assert table.obs[Keys.SECTION].value_counts().to_dict() == {"S0": 600, "S1": 600}
    assert (table.obs[Keys.CELL_TYPE].value_counts() > 0).all()
    assert (table.obs[Keys.NICHE].value_counts() > 0).all()
    assert table.uns[Keys.DATASET][Keys.TECHNOLOGY] == "synthetic"
    # Niches are smooth regions: a cell's nearest neighbours mostly share its niche ...
    from scipy.spatial import cKDTree

    for s in ("S0", "S1"):
        sub = table[table.obs[Keys.SECTION] == s]
        _, nn = cKDTree(sub.obsm[Keys.SPATIAL]).query(sub.obsm[Keys.SPATIAL], k=6)
        niche = sub.obs[Keys.NICHE].cat.codes.to_numpy()
        assert (niche[nn[:, 1:]] == niche[:, None]).mean() > 0.75
    # ... and cell-type proportions depend on the niche.
    contingency = pd.crosstab(table.obs[Keys.NICHE], table.obs[Keys.CELL_TYPE])
    assert stats.chi2_contingency(contingency).pvalue < 1e-10


def test_synthetic_expression_tied_to_types(synthetic_sdata):
    table = synthetic_sdata[Keys.TABLE]
    X = table.X.toarray().astype(float)
    X = np.log1p(X / X.sum(1, keepdims=True).clip(1) * 1e4)
    types = table.obs[Keys.CELL_TYPE].cat.codes.to_numpy()
    train = table.obs[Keys.SECTION].to_numpy() == "S0"
    centroids = np.stack([X[train & (types == t)].mean(0) for t in range(types.max() + 1)])
    pred = np.argmin(((X[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == types[~train]).mean() > 0.6  # chance is about 1/6, across sections


def test_synthetic_image_differs_by_type(synthetic_sdata):
    table = synthetic_sdata[Keys.TABLE]
    sub = table[table.obs[Keys.SECTION] == "S0"]
    img, _, _ = _level(synthetic_sdata, "S0_he", 0)
    mpp = 1 / _um_to_px_matrix(synthetic_sdata, "S0_he", "S0")[0, 0]
    xy = sub.obsm[Keys.SPATIAL]
    rows, cols = np.floor(xy[:, 1] / mpp).astype(int), np.floor(xy[:, 0] / mpp).astype(int)
    types = sub.obs[Keys.CELL_TYPE].cat.codes.to_numpy()
    centre = _window_mean(img, rows, cols, 1)  # nuclear stain
    halo = _window_mean(img, rows, cols, 6) - centre  # nuclear size / cytoplasm around it
    groups = [t for t in np.unique(types) if (types == t).sum() >= 10]
    assert stats.kruskal(*[centre[types == t] for t in groups]).pvalue < 1e-10
    assert stats.kruskal(*[halo[types == t] for t in groups]).pvalue < 1e-10
    # Nuclei are darker than the space between cells, and the glass margin is near white.
    assert centre.mean() < img.mean() - 20
    assert img[:5, :5].mean() > 235


def test_synthetic_pyramid_levels_agree(synthetic_sdata):
    full, _, _ = _level(synthetic_sdata, "S0_he", 0)
    coarse, fy, fx = _level(synthetic_sdata, "S0_he", 1)
    assert full.shape[0] // 2 == coarse.shape[0] and full.shape[1] // 2 == coarse.shape[1]
    h, w = coarse.shape[:2]
    binned = full[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    # Levels are drawn independently at their own pixel size: the same tissue, not the same noise.
    assert np.abs(binned.mean(axis=(0, 1)) - coarse.mean(axis=(0, 1))).max() < 8
    coarse_blocks = coarse[: h // 16 * 16, : w // 16 * 16].reshape(h // 16, 16, w // 16, 16, 3).mean(axis=(1, 3))
    binned_blocks = binned[: h // 16 * 16, : w // 16 * 16].reshape(h // 16, 16, w // 16, 16, 3).mean(axis=(1, 3))
    assert np.corrcoef(coarse_blocks.ravel(), binned_blocks.ravel())[0, 1] > 0.8


def test_synthetic_deterministic_by_seed():
    a = sg.datasets.synthetic(300, n_genes=20, seed=3)
    b = sg.datasets.synthetic(300, n_genes=20, seed=3)
    c = sg.datasets.synthetic(300, n_genes=20, seed=4)
    ta, tb, tc = (x[Keys.TABLE] for x in (a, b, c))
    assert (ta.X != tb.X).nnz == 0
    np.testing.assert_array_equal(ta.obsm[Keys.SPATIAL], tb.obsm[Keys.SPATIAL])
    np.testing.assert_array_equal(_level(a, "S0_he", 0)[0], _level(b, "S0_he", 0)[0])
    assert not np.array_equal(ta.obsm[Keys.SPATIAL], tc.obsm[Keys.SPATIAL])
    assert ta.n_obs == 300 and tc.n_obs == 300


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_cells": 1, "n_sections": 2},
        {"n_genes": 0},
        {"mpp": 0.0},
        {"stain_shift": 1.0},
        {"stain_shift": -0.1},
        {"depth_shift": 1.0},
        {"depth_shift": -0.1},
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sg.datasets.synthetic(**kwargs)


# The last version of datasets/_synthetic.py without section effects: with them off, the output must be its output.
_SYNTHETIC_BEFORE_EFFECTS = "9477453f8442c8c8287b7e828906e3fd73e97ecf"
_SYNTHETIC_PATH = "src/sigmma_sc/datasets/_synthetic.py"


def _synthetic_digest(sdata) -> dict[str, str]:
    """sha256 of the counts, the coordinates and every pyramid level of every image."""
    import hashlib

    table = sdata[Keys.TABLE]
    out = {
        "X": hashlib.sha256(table.X.toarray().tobytes()).hexdigest(),
        "spatial": hashlib.sha256(np.ascontiguousarray(table.obsm[Keys.SPATIAL]).tobytes()).hexdigest(),
    }
    for key in sorted(sdata.images):
        for level in _scale_keys(sdata.images[key]):
            pixels = np.ascontiguousarray(sdata.images[key][level]["image"].values)
            out[f"{key}/{level}"] = hashlib.sha256(pixels.tobytes()).hexdigest()
    return out


def test_synthetic_default_output_unchanged_by_section_effects():
    import types

    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{_SYNTHETIC_BEFORE_EFFECTS}:{_SYNTHETIC_PATH}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history with commit {_SYNTHETIC_BEFORE_EFFECTS[:7]} not available")
    name = "_synthetic_before_section_effects"
    before = types.ModuleType(name)
    sys.modules[name] = before  # dataclasses look their module up
    try:
        exec(compile(source, name, "exec"), before.__dict__)
        kwargs = dict(n_genes=30, n_sections=2, seed=5)
        reference = _synthetic_digest(before.synthetic(300, **kwargs))
    finally:
        del sys.modules[name]
    assert _synthetic_digest(sg.datasets.synthetic(300, **kwargs)) == reference
    off = sg.datasets.synthetic(300, stain_shift=0.0, depth_shift=0.0, **kwargs)
    assert _synthetic_digest(off) == reference


def _stain_concentrations(rgb: np.ndarray) -> np.ndarray:
    """Mean H, E, DAB concentrations of an RGB image (Ruifrok-Johnston unmixing of optical densities)."""
    from sigmma_sc.datasets._synthetic import _DAB_OD, _E_OD, _H_OD

    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 0.5) / 255.0)
    return (od @ np.linalg.inv(np.stack([_H_OD, _E_OD, _DAB_OD]).astype(np.float64))).mean(axis=0)


def test_synthetic_section_effects_are_known_and_per_section():
    from sigmma_sc.datasets._synthetic import section_shifts

    kwargs = dict(n_genes=30, n_sections=3, seed=5)
    plain = sg.datasets.synthetic(300, **kwargs)
    shifted = sg.datasets.synthetic(300, stain_shift=0.3, depth_shift=0.6, **kwargs)
    truth = section_shifts(3, seed=5, stain_shift=0.3, depth_shift=0.6)
    assert list(truth.index) == ["S0", "S1", "S2"]
    assert truth["depth_factor"].between(0.4, 1).all() and truth["depth_factor"].nunique() == 3
    assert truth[["h_scale", "e_scale"]].stack().between(0.7, 1.3).all() and (truth["dab_bias"] >= 0).all()
    neutral = section_shifts(3, seed=5)
    assert (neutral[["h_scale", "e_scale", "depth_factor"]] == 1).all().all()
    assert (neutral[["h_bias", "e_bias", "dab_bias"]] == 0).all().all()
    assert not section_shifts(3, seed=6, stain_shift=0.3).equals(section_shifts(3, seed=5, stain_shift=0.3))

    # The truth stays known and is the same tissue: cells, types, niches, sections.
    a, b = plain[Keys.TABLE], shifted[Keys.TABLE]
    for col in (Keys.SECTION, Keys.CELL_TYPE, Keys.NICHE):
        assert col in b.obs
        assert (a.obs[col].astype(str) == b.obs[col].astype(str)).all()
    np.testing.assert_array_equal(a.obsm[Keys.SPATIAL], b.obsm[Keys.SPATIAL])

    section = b.obs[Keys.SECTION].astype(str).to_numpy()
    library = {}
    for s in truth.index:
        rows = section == s
        before, after = a.X[rows], b.X[rows]
        # Binomial thinning: never more molecules than before, about depth_factor of them, none left empty.
        assert (after > before).nnz == 0
        assert after.sum() / before.sum() == pytest.approx(truth.loc[s, "depth_factor"], abs=0.03)
        assert np.asarray(after.sum(axis=1)).min() >= 1
        assert (b.layers[Keys.COUNTS_LAYER][rows] != after).nnz == 0
        library[s] = after.sum() / rows.sum()
        # Stain: the glass margin untouched, the tissue shifted in HED space by the section's own amount.
        img_a = np.moveaxis(plain.images[f"{s}_he"]["scale1"]["image"].values, 0, -1)
        img_b = np.moveaxis(shifted.images[f"{s}_he"]["scale1"]["image"].values, 0, -1)
        np.testing.assert_array_equal(img_b[:3, :3], img_a[:3, :3])
        h, w = img_a.shape[:2]
        inner = (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))  # tissue only: the glass margin is 30 um
        conc_a, conc_b = _stain_concentrations(img_a[inner]), _stain_concentrations(img_b[inner])
        # Eosin covers all tissue (no clipping at zero): c -> e_scale * c + e_bias; DAB gains the cast.
        expected_e = truth.loc[s, "e_scale"] * conc_a[1] + truth.loc[s, "e_bias"]
        assert conc_b[1] == pytest.approx(expected_e, abs=0.003)
        assert conc_b[2] - conc_a[2] == pytest.approx(truth.loc[s, "dab_bias"], abs=0.003)
        assert np.abs(img_b[inner].astype(float).mean((0, 1)) - img_a[inner].astype(float).mean((0, 1))).max() > 1
    # Sections now differ in depth as drawn (the unshifted sections share one depth).
    order = sorted(library, key=library.get)
    assert order == list(truth["depth_factor"].sort_values().index)
    assert max(library.values()) / min(library.values()) > 1.2
    # Same arguments, same object.
    again = sg.datasets.synthetic(300, stain_shift=0.3, depth_shift=0.6, **kwargs)
    assert _synthetic_digest(again) == _synthetic_digest(shifted)


# ----------------------------------------------------------------------------- the builder on edge cases
def test_build_sdata_rejects_bad_images_and_shapes():
    from sigmma_sc.io import SectionArrays, build_sdata

    def section(**kw):
        base = dict(
            section="S",
            image=np.zeros((40, 30, 3), np.uint8),
            mpp=1.0,
            xy_um=np.array([[5.0, 5.0]]),
            counts=sparse.csr_matrix(np.array([[1, 2]])),
            genes=["a", "b"],
            shape="circle",
            diameter_um=4.0,
            unit="cell",
        )
        base.update(kw)
        return SectionArrays(**base)

    opts = dict(technology="custom", unit_kind="cell", unit_diameter_um=4.0)
    assert build_sdata([section()], **opts)[Keys.TABLE].n_obs == 1
    with pytest.raises(ValueError, match="uint8"):
        build_sdata([section(image=np.zeros((40, 30, 3), np.float32))], **opts)
    with pytest.raises(ValueError, match="RGB"):
        build_sdata([section(image=np.zeros((40, 30), np.uint8))], **opts)
    with pytest.raises(ValueError, match="unique"):
        build_sdata([section(), section()], **opts)
    with pytest.raises(ValueError, match="xy_um"):
        build_sdata([section(xy_um=np.zeros((2, 2)))], **opts)
    with pytest.raises(ValueError, match="duplicated gene"):
        build_sdata([section(genes=["a", "a"])], **opts)
    squares = build_sdata([section(shape="square", unit="bin")], **opts)
    assert squares.shapes["S_bins"].geometry.iloc[0].area == pytest.approx(16.0)


# ----------------------------------------------------------------------------- import stays light
def test_import_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import sigmma_sc; dt = time.perf_counter() - t; "
        "heavy = ['torch', 'squidpy', 'spatialdata', 'torch_geometric', 'scanpy', 'lightning']; "
        "print(dt); print(','.join(m for m in heavy if m in sys.modules))"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "", f"heavy modules imported by `import sigmma_sc`: {out[1]}"
    assert float(out[0]) < 1.5
    assert time.perf_counter() - start < 15  # the interpreter itself, loosely


def test_logs_name_data_folders_relative_to_where_they_were_found(tmp_path, monkeypatch, caplog):
    """Notebook logs travel: they show $SIGMMA_DATA_DIR/her2st, never the absolute path of the machine they ran on."""
    import logging

    from sigmma_sc.datasets._paths import DATA_DIR_ENV, display_path

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert display_path(tmp_path / "her2st" / "images") == f"${DATA_DIR_ENV}/her2st/images"
    assert display_path(tmp_path) == f"${DATA_DIR_ENV}"
    elsewhere = tmp_path.parent / "mine"
    assert display_path(elsewhere) == str(elsewhere)  # a folder the user chose stays as they wrote it
    her2st = sg.datasets.local_dataset_dir("her2st", required=["counts/*.tsv.gz"])
    if her2st is None:
        pytest.skip("her2st not available")
    monkeypatch.setenv(DATA_DIR_ENV, str(her2st.parent))
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sg.datasets.her2st(sections=["C3"])
    line = next(r.getMessage() for r in caplog.records if "Reading her2st" in r.getMessage())
    assert line.endswith(f"from ${DATA_DIR_ENV}/her2st."), line
    assert str(her2st.parent) not in line
