"""Patches: centred on their node at every level (also through a mirrored affine and a pyramid), padded at borders."""

from __future__ import annotations

import numpy as np
import pytest

import sigmma_sc as sg
from sigmma_sc.pp._patches import as_section_image, crop_geometry, iter_crops, resize_batch


def _marked_image(centres_um: np.ndarray, mark_um: float, px_from_um: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """White image with a black square of side ``mark_um`` centred on each point (given in microns)."""
    img = np.full((*shape, 3), 255, np.uint8)
    colrow = centres_um @ px_from_um[:2, :2].T + px_from_um[:2, 2]
    half = mark_um * abs(px_from_um[0, 0]) / 2
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    for c, r in colrow:
        # Pixel (i, j) is inside when its centre (i + 0.5, j + 0.5) is.
        inside = (np.abs(rows + 0.5 - r) < half) & (np.abs(cols + 0.5 - c) < half)
        img[inside] = 0
    return img


def _pyramid_image(img: np.ndarray, px_from_um: np.ndarray):
    from spatialdata.models import Image2DModel

    el = Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), scale_factors=[2, 2])
    from sigmma_sc.io import SectionImage

    return SectionImage.from_element(el, section="s", name="he", coordinate_system="s", px_from_um=px_from_um)


def _dark_centroid(crops: np.ndarray) -> np.ndarray:
    dark = crops.mean(axis=-1) < 128
    out = []
    for d in dark:
        r, c = np.nonzero(d)
        out.append((r.mean() + 0.5, c.mean() + 0.5))
    return np.array(out)


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize(("fov_um", "size_px"), [(32.0, 32), (150.0, 64), (500.0, 64)])
def test_patches_centred_on_node(mirrored, fov_um, size_px):
    mpp = 0.5 if fov_um < 100 else 1.0  # microns per pixel (coarser for wide views: a smaller test image)
    spacing = 1.6 * fov_um
    centres = np.array(
        [[spacing * (i + 0.6) + 3.3 * i, spacing * (j + 0.6) - 2.1 * j] for i in range(2) for j in range(2)]
    )
    width_um = spacing * 2.4
    shape = (int(width_um / mpp), int(width_um / mpp))
    a = np.diag([1 / mpp, 1 / mpp, 1.0])
    if mirrored:  # image mirrored left-right relative to the microns (as the Visium HD kidney is)
        a[0, 0], a[0, 2] = -1 / mpp, shape[1]
    img = _marked_image(centres, fov_um / 6, a, shape)
    image = _pyramid_image(img, a)
    level, _, _ = crop_geometry(image, centres, fov_um, size_px)
    if fov_um >= 150:
        assert level > 0  # big views are cut from a coarser pyramid level
    crops = np.concatenate([c for _, c in iter_crops(image, centres, fov_um, size_px=size_px, batch_size=3)])
    assert crops.shape == (4, size_px, size_px, 3) and crops.dtype == np.uint8
    # The mark is in the middle of every crop, within a pixel of the output grid.
    np.testing.assert_allclose(_dark_centroid(crops), size_px / 2, atol=1.0)
    # And it has the expected size: fov / 6 of the crop side.
    frac = (crops.mean(axis=-1) < 128).mean(axis=(1, 2))
    np.testing.assert_allclose(frac, 1 / 36, rtol=0.35)


def test_patches_padded_white_at_borders():
    img = np.full((100, 120, 3), 40, np.uint8)
    a = np.eye(3)
    crops = next(iter_crops(img, np.array([[0.0, 0.0], [119.0, 99.0]]), 20.0, size_px=20, px_from_um=a))[1]
    first, last = crops
    assert (first[:10, :10] == 255).all() and (first[10:, 10:] == 40).all()
    assert (last[11:, 11:] == 255).all() and (last[:10, :10] == 40).all()


def test_iter_crops_reads_dask_lazily():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    lazy = da.from_array(arr, chunks=(64, 64, 3))
    centres = rng.uniform(0, 150, (7, 2))
    eager = np.concatenate([c for _, c in iter_crops(arr, centres, 24.0, size_px=24, px_from_um=np.eye(3))])
    from_dask = np.concatenate([c for _, c in iter_crops(lazy, centres, 24.0, size_px=24, px_from_um=np.eye(3))])
    np.testing.assert_array_equal(eager, from_dask)
    # The crop really is the array slice around the centre.
    r0, c0 = np.floor(centres[0, ::-1] - 12 + 0.5).astype(int)
    np.testing.assert_array_equal(eager[0], arr[r0 : r0 + 24, c0 : c0 + 24])


def test_resize_batch_keeps_constant_images():
    x = np.full((2, 50, 50, 3), 77, np.uint8)
    np.testing.assert_array_equal(resize_batch(x, 20), 77)


def test_as_section_image_rejects_bad_input():
    with pytest.raises(ValueError, match="px_from_um"):
        as_section_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
        as_section_image(np.zeros((4, 4), np.uint8), np.eye(3))


def test_extract_patches_on_kidney_crop(monkeypatch):
    monkeypatch.setattr(sg.settings, "progress_bar", False)
    sdata = sg.datasets.visium_hd_kidney(crop=True)
    h = sg.pp.build_hierarchy(sdata)
    slide = sg.io.validate(sdata)
    for level in h.levels:
        crops = sg.pp.extract_patches(sdata, level=level, indices=[0, 5, 9], size_px=48)
        assert crops.shape == (3, 48, 48, 3) and crops.dtype == np.uint8
        lvl = h.levels[level]
        expect = next(iter_crops(slide.images["kidney"], lvl.centers_um[[0, 5, 9]], lvl.fov_um, size_px=48))[1]
        np.testing.assert_array_equal(crops, expect)
        assert crops.std() > 5  # real tissue, not padding
    with pytest.raises(ValueError, match="not in the hierarchy"):
        sg.pp.extract_patches(sdata, level="nano")
