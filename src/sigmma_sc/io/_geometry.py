"""Geometry readers: units, sections and images of a SpatialData object, in microns.

Two readers, one per kind of input: objects written by sigmma_sc (``uns["sigmma_dataset"]``) and
objects written by ``spatialdata_io`` (Xenium, Visium, Visium HD), whose microns come from the
shapes, the image transformations and what each technology fixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import VISIUM_SPOT_DIAMETER_UM, Choices, Keys, ReaderKeys
from sigmma_sc._logging import logger

from ._image import SectionImage, channel_kind, image_levels

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

# Unknown technologies: units at least this wide are spots (hold many cells), else cells / fine bins.
_SPOT_MIN_DIAMETER_UM = 30.0
# A unit centre may lie this many pixels outside the image before it counts as outside (rounding).
_OUTSIDE_TOL_PX = 1.0


# ---------------------------------------------------------------------------------------------
# helpers: matrices
# ---------------------------------------------------------------------------------------------
def _affine(transformation: Any) -> np.ndarray:
    """3x3 matrix ``[x', y', 1] = M @ [x, y, 1]`` of a spatialdata transformation (x = column, y = row)."""
    return np.asarray(
        transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
        dtype=np.float64,
    )


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _area_scale(m: np.ndarray) -> float:
    """Linear scale of an affine (square root of its area scale)."""
    return float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))


def _transformations(element: Any) -> dict[str, Any]:
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True))


# ---------------------------------------------------------------------------------------------
# helpers: images
# ---------------------------------------------------------------------------------------------
def _image_pixels(element: Any) -> int:
    lv = image_levels(element)[0]
    return int(lv.sizes["y"]) * int(lv.sizes["x"])


def _pick_image(
    sdata: Any,
    coordinate_systems: list[str],
    image_key: str | None,
    region: str,
    wanted_cs: str | None,
) -> tuple[str, str] | None:
    """Choose ``(image name, coordinate system)`` for a region.

    Rule: among images with a transformation to a coordinate system the region's shapes also map
    to (``coordinate_system=`` when given), take RGB images (3 channels, or RGBA) before any
    other, then the most full-resolution pixels (the full-resolution H&E beats hires / lowres
    thumbnails), then the name. The coordinate system is ``"global"`` when shared, else the first
    shared one. ``image_key=`` overrides the choice of image.
    """
    cands = [image_key] if image_key is not None else list(sdata.images)
    if image_key is not None and image_key not in sdata.images:
        raise KeyError(f"image {image_key!r} (image_key=) not found in sdata.images (has {sorted(sdata.images)}).")
    scored = []
    for name in cands:
        tr = _transformations(sdata.images[name])
        shared = [cs for cs in coordinate_systems if cs in tr]
        if wanted_cs is not None:
            shared = [cs for cs in shared if cs == wanted_cs]
        if not shared:
            if image_key is not None:
                target = wanted_cs if wanted_cs is not None else coordinate_systems
                raise ValueError(
                    f"image {name!r} has no transformation to coordinate system {target!r} of region {region!r} "
                    f"(it maps to {sorted(tr)}). Register it: spatialdata.transformations.set_transformation("
                    f"sdata.images[{name!r}], transformation, to_coordinate_system=...)."
                )
            continue
        cs = ReaderKeys.GLOBAL if ReaderKeys.GLOBAL in shared else shared[0]
        rgb = channel_kind(image_levels(sdata.images[name])[0])[0] != "bad"
        scored.append((not rgb, -_image_pixels(sdata.images[name]), name, cs))
    if not scored:
        return None
    scored.sort()
    return scored[0][2], scored[0][3]


# ---------------------------------------------------------------------------------------------
# helpers: shapes
# ---------------------------------------------------------------------------------------------
def _shape_centres(gdf: Any) -> np.ndarray:
    geom = gdf.geometry
    kinds = set(geom.geom_type.unique())
    if kinds <= {"Point"}:
        return np.column_stack([geom.x.to_numpy(), geom.y.to_numpy()]).astype(np.float64)
    c = geom.centroid
    return np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)


def _shape_half_width(gdf: Any) -> np.ndarray:
    """Per shape, half its width in intrinsic units: the radius of circles, sqrt(area / pi) of polygons."""
    if "radius" in gdf.columns:
        return np.asarray(gdf["radius"], dtype=np.float64)
    return np.sqrt(np.asarray(gdf.geometry.area, dtype=np.float64) / np.pi)


def _rows_in_shapes(gdf: Any, ids: pd.Series, region: str, id_col: str) -> np.ndarray:
    idx = pd.Index(gdf.index)
    pos = idx.get_indexer(pd.Index(ids))
    if (pos < 0).any() and idx.dtype != pd.Index(ids).dtype:
        # readers store ids as int in one place and str in another: compare as strings
        pos = pd.Index(idx.astype(str)).get_indexer(pd.Index(ids.astype(str)))
    if (pos < 0).any():
        missing = ids[pos < 0]
        raise KeyError(
            f"{int((pos < 0).sum())} unit(s) of region {region!r} have obs[{id_col!r}] ids missing from the index of "
            f"shapes {region!r}, e.g. {list(missing[:5])}. The table's instance ids must match the shapes' index."
        )
    return pos


# ---------------------------------------------------------------------------------------------
# geometry of objects written by sigmma_sc (uns["sigmma_dataset"])
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Geometry:
    """Where a table's units are: sections, unit centres in microns, images, and what the units are."""

    sections: list[str]
    unit_section: np.ndarray
    xy_um: np.ndarray
    images: dict[str, SectionImage]
    technology: str
    unit_kind: str
    unit_diameter_um: float
    log_normalized: bool


def _sections_of(values: pd.Series) -> tuple[list[str], np.ndarray]:
    codes, uniques = pd.factorize(values.astype(str), sort=False)
    return [str(u) for u in uniques], codes.astype(np.int64)


def geometry_sigmma(
    sdata: Any,
    table: AnnData,
    table_key: str,
    info: dict,
    *,
    require_image: bool,
    mpp: float | None,
    coordinate_system: str | None,
    image_key: str | dict[str, str] | None,
) -> Geometry:
    if Keys.SECTION not in table.obs:
        raise KeyError(
            f"table {table_key!r} has uns[{Keys.DATASET!r}] but no obs[{Keys.SECTION!r}] column naming each unit's "
            "section. Add it (categorical section names)."
        )
    sections, codes = _sections_of(table.obs[Keys.SECTION])
    if Keys.SPATIAL not in table.obsm:
        raise KeyError(
            f"table {table_key!r} has no obsm[{Keys.SPATIAL!r}] (unit centres in microns). Add it, or rebuild the "
            "object with sigmma_sc.io.from_anndata."
        )
    xy = np.asarray(table.obsm[Keys.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise ValueError(
            f"table {table_key!r} obsm[{Keys.SPATIAL!r}] must be a finite (n_units, 2) array of microns, got shape "
            f"{xy.shape} with {int((~np.isfinite(xy)).sum())} non-finite value(s)."
        )
    xy = xy[:, :2].copy()
    image_keys = dict(info.get(Keys.IMAGE_KEYS, {}))
    shapes_keys = dict(info.get(Keys.SHAPES_KEYS, {}))
    images: dict[str, SectionImage] = {}
    for s in sections:
        shp = shapes_keys.get(s)
        if shp is None or shp not in sdata.shapes:
            raise KeyError(
                f"shapes element {shp!r} of section {s!r} (uns[{Keys.DATASET!r}][{Keys.SHAPES_KEYS!r}]) not found "
                f"in sdata.shapes (has {sorted(sdata.shapes)}). Restore it or fix the {Keys.SHAPES_KEYS!r} entry."
            )
        name = image_key.get(s) if isinstance(image_key, dict) else image_key
        name = name if name is not None else image_keys.get(s)
        if name is None or name not in sdata.images:
            if require_image:
                raise KeyError(
                    f"image {name!r} of section {s!r} not found in sdata.images (has {sorted(sdata.images)}). Add the "
                    f"H&E image, fix uns[{Keys.DATASET!r}][{Keys.IMAGE_KEYS!r}], or pass image_key=."
                )
            continue
        cs = coordinate_system if coordinate_system is not None else s
        tr = _transformations(sdata.images[name])
        if cs not in tr:
            raise ValueError(
                f"image {name!r} has no transformation to coordinate system {cs!r} (the section's microns; it maps "
                f"to {sorted(tr)}). Set one: spatialdata.transformations.set_transformation(sdata.images[{name!r}], "
                f"Scale([mpp, mpp], axes=('y', 'x')), to_coordinate_system={cs!r})."
            )
        um_from_px = _affine(tr[cs])
        if mpp is not None and not np.isclose(_area_scale(um_from_px), mpp, rtol=0.02):
            logger.warning(
                f"mpp={mpp} ignored for image {name!r}: its transformation to {cs!r} says "
                f"{_area_scale(um_from_px):.4g} um/px."
            )
        images[s] = SectionImage.from_element(
            sdata.images[name], section=s, name=name, coordinate_system=cs, px_from_um=np.linalg.inv(um_from_px)
        )
    tech = str(info.get(Keys.TECHNOLOGY, "custom"))
    diam = float(info.get(Keys.UNIT_DIAMETER, np.nan))
    kind = str(info.get(Keys.UNIT_KIND, _infer_unit_kind(tech, diam)))
    if kind not in Choices.UNIT_KINDS:
        raise ValueError(
            f"uns[{Keys.DATASET!r}][{Keys.UNIT_KIND!r}] = {kind!r}; use 'spot' (units hold many cells) or 'cell'."
        )
    if not np.isfinite(diam) or diam <= 0:
        raise ValueError(
            f"uns[{Keys.DATASET!r}][{Keys.UNIT_DIAMETER!r}] = {diam!r}; set the spot / cell diameter in microns."
        )
    return Geometry(sections, codes, xy, images, tech, kind, diam, bool(info.get(Keys.LOG_NORMALIZED, False)))


def _infer_unit_kind(technology: str, diameter_um: float) -> str:
    if technology in Choices.SPOT_TECHNOLOGIES:
        return "spot"
    if technology in ("xenium", "visium_hd", Choices.BINNED_CELLS, "synthetic"):
        return "cell"
    return "spot" if np.isfinite(diameter_um) and diameter_um >= _SPOT_MIN_DIAMETER_UM else "cell"


# ---------------------------------------------------------------------------------------------
# geometry of objects written by spatialdata_io (no uns["sigmma_dataset"])
# ---------------------------------------------------------------------------------------------
def _infer_technology(sdata: Any, table: AnnData, regions: list[str], instance_key: str) -> str:
    if any(re.search(ReaderKeys.VISIUM_HD_BIN_PATTERN, r) for r in regions):
        return "visium_hd"
    if any(r in ReaderKeys.XENIUM_REGIONS for r in regions) or any(k in sdata.images for k in ReaderKeys.XENIUM_IMAGES):
        return "xenium"
    if any(k.endswith(ReaderKeys.VISIUM_IMAGE_SUFFIXES) for k in sdata.images):
        return "visium"
    return "custom"


def _region_shapes(sdata: Any, table: AnnData, region: str, technology: str, instance_key: str) -> tuple[str, str]:
    """Name of the shapes element holding a region's units, and the obs column matching its index."""
    if region in sdata.shapes:
        return region, instance_key
    if technology == "xenium":
        # spatialdata_io annotates "cell_labels" (a raster) by default; the same cells exist as shapes in microns.
        for name in ReaderKeys.XENIUM_CELL_SHAPES:
            if name in sdata.shapes and ReaderKeys.XENIUM_CELL_ID in table.obs:
                return name, ReaderKeys.XENIUM_CELL_ID
    where = "sdata.labels" if region in getattr(sdata, "labels", {}) else "nowhere"
    raise KeyError(
        f"region {region!r} annotated by the table is not a shapes element (found in {where}; shapes are "
        f"{sorted(sdata.shapes)}). Unit centres come from shapes: add circles / polygons for the units, e.g. "
        "spatialdata.to_circles(sdata[region]), and annotate them."
    )


def _um_per_cs(
    *,
    technology: str,
    region: str,
    gdf: Any,
    cs_from_shape: np.ndarray,
    cs_from_px: np.ndarray | None,
    mpp: float | None,
    image_name: str | None,
) -> tuple[np.ndarray, float]:
    """``um_from_cs`` (3x3) and the unit diameter in microns."""
    half_cs = _shape_half_width(gdf) * _area_scale(cs_from_shape)
    med_half_cs = float(np.median(half_cs)) if len(half_cs) else np.nan
    if mpp is not None:
        if cs_from_px is None:
            raise ValueError(f"mpp= gives the image's pixel size, but region {region!r} has no image to apply it to.")
        um_from_cs = np.diag([mpp, mpp, 1.0]) @ np.linalg.inv(cs_from_px)
        diam = {"visium": VISIUM_SPOT_DIAMETER_UM}.get(technology, 2 * med_half_cs * _area_scale(um_from_cs))
        if technology == "visium_hd":
            diam = _visium_hd_bin_um(region)
        return um_from_cs, float(diam)
    if technology == "xenium":
        # Xenium shapes are stored in microns with Scale(1 / pixel_size) to "global".
        um_from_cs = np.linalg.inv(cs_from_shape)
        return um_from_cs, float(2 * np.median(_shape_half_width(gdf)))
    if technology == "visium":
        um = (VISIUM_SPOT_DIAMETER_UM / 2) / med_half_cs
        return np.diag([um, um, 1.0]), VISIUM_SPOT_DIAMETER_UM
    if technology == "visium_hd":
        bin_um = _visium_hd_bin_um(region)
        # circles of radius side / 2, or squares of area side^2 (half width sqrt(area / pi))
        half_side_cs = med_half_cs if "radius" in gdf.columns else med_half_cs * np.sqrt(np.pi) / 2
        um = (bin_um / 2) / half_side_cs
        return np.diag([um, um, 1.0]), bin_um
    raise ValueError(
        f"cannot tell the pixel size of region {region!r} / image {image_name!r}: the table has no "
        f"uns[{Keys.DATASET!r}] and the technology is not recognised. Pass mpp= (microns per full-resolution pixel of "
        "the image), or build the object with sigmma_sc.io.from_anndata(adata, image, mpp=...)."
    )


def _visium_hd_bin_um(region: str) -> float:
    m = re.search(ReaderKeys.VISIUM_HD_BIN_PATTERN, region)
    if m is None:
        raise ValueError(f"region {region!r}: no bin size ('square_016um') in its name; pass mpp=.")
    return float(m.group(1))


def geometry_foreign(
    sdata: Any,
    table: AnnData,
    table_key: str,
    *,
    require_image: bool,
    mpp: float | None,
    coordinate_system: str | None,
    image_key: str | dict[str, str] | None,
) -> Geometry:
    attrs = table.uns.get(ReaderKeys.ATTRS)
    if not attrs or ReaderKeys.REGION_KEY not in attrs or ReaderKeys.INSTANCE_KEY not in attrs:
        raise KeyError(
            f"table {table_key!r} has neither uns[{Keys.DATASET!r}] (sigmma_sc loaders) nor "
            f"uns[{ReaderKeys.ATTRS!r}] with region_key / instance_key (spatialdata tables). Annotate the units: "
            "TableModel.parse(adata, region=shapes_name, region_key='region', instance_key='spot_id'), or use "
            "sigmma_sc.io.from_anndata."
        )
    region_key, instance_key = attrs[ReaderKeys.REGION_KEY], attrs[ReaderKeys.INSTANCE_KEY]
    for col in (region_key, instance_key):
        if col not in table.obs:
            raise KeyError(f"table {table_key!r} lacks obs[{col!r}] named in uns[{ReaderKeys.ATTRS!r}].")
    regions, codes = _sections_of(table.obs[region_key])
    technology = _infer_technology(sdata, table, regions, instance_key)
    xy = np.empty((table.n_obs, 2), dtype=np.float64)
    images: dict[str, SectionImage] = {}
    diams = []
    for r_i, region in enumerate(regions):
        rows = np.flatnonzero(codes == r_i)
        shapes_name, id_col = _region_shapes(sdata, table, region, technology, instance_key)
        gdf = sdata.shapes[shapes_name]
        shp_tr = _transformations(gdf)
        pos = _rows_in_shapes(gdf, table.obs[id_col].iloc[rows], shapes_name, id_col)
        name = image_key.get(region) if isinstance(image_key, dict) else image_key
        pick = _pick_image(sdata, list(shp_tr), name, region, coordinate_system)
        if pick is None:
            if require_image:
                target = coordinate_system if coordinate_system is not None else sorted(shp_tr)
                raise KeyError(
                    f"no image in sdata.images (has {sorted(sdata.images)}) has a transformation to coordinate "
                    f"system {target!r} of shapes {shapes_name!r}. Add the H&E with a transformation to one of them "
                    "(spatialdata.transformations.set_transformation), or pass image_key=."
                )
            if coordinate_system is not None and coordinate_system not in shp_tr:
                raise ValueError(f"shapes {shapes_name!r} have no transformation to {coordinate_system!r}.")
            cs = coordinate_system or (ReaderKeys.GLOBAL if ReaderKeys.GLOBAL in shp_tr else next(iter(shp_tr)))
            img_name, cs_from_px = None, None
        else:
            img_name, cs = pick
            cs_from_px = _affine(_transformations(sdata.images[img_name])[cs])
        cs_from_shape = _affine(shp_tr[cs])
        um_from_cs, diam = _um_per_cs(
            technology=technology,
            region=shapes_name,
            gdf=gdf,
            cs_from_shape=cs_from_shape,
            cs_from_px=cs_from_px,
            mpp=mpp,
            image_name=img_name,
        )
        diams.append(diam)
        centres = _shape_centres(gdf)[pos]
        xy[rows] = _apply(um_from_cs @ cs_from_shape, centres)
        if img_name is not None:
            images[region] = SectionImage.from_element(
                sdata.images[img_name],
                section=region,
                name=img_name,
                coordinate_system=cs,
                px_from_um=np.linalg.inv(um_from_cs @ cs_from_px),
            )
    diam = float(np.median(diams))
    if technology == "xenium" and ReaderKeys.XENIUM_CELL_AREA in table.obs:
        area = np.asarray(table.obs[ReaderKeys.XENIUM_CELL_AREA], dtype=np.float64)
        area = area[np.isfinite(area) & (area > 0)]
        if area.size:
            diam = float(2 * np.sqrt(np.median(area) / np.pi))
    log_norm = ReaderKeys.SCANPY_LOG1P in table.uns
    logger.info(
        f"validate: table {table_key!r} comes without uns[{Keys.DATASET!r}]; read as {technology!r} "
        f"({len(regions)} section(s) {regions}, unit diameter {diam:.3g} um)."
    )
    return Geometry(regions, codes, xy, images, technology, _infer_unit_kind(technology, diam), diam, bool(log_norm))


def check_inside(geo: Geometry) -> None:
    for s_i, s in enumerate(geo.sections):
        img = geo.images.get(s)
        if img is None:
            continue
        rows = np.flatnonzero(geo.unit_section == s_i)
        cr = img.um_to_px(geo.xy_um[rows])
        h, w = img.shape
        out = (
            (cr[:, 0] < -_OUTSIDE_TOL_PX)
            | (cr[:, 0] > w + _OUTSIDE_TOL_PX)
            | (cr[:, 1] < -_OUTSIDE_TOL_PX)
            | (cr[:, 1] > h + _OUTSIDE_TOL_PX)
        )
        if out.any():
            ex = cr[out][0]
            raise ValueError(
                f"{int(out.sum())} of {rows.size} unit(s) of section {s!r} lie outside image {img.element!r} "
                f"({w} x {h} px), e.g. at column {ex[0]:.1f}, row {ex[1]:.1f}. Check the image's transformation / "
                "mpp (pixel size) and the x = column, y = row order of the coordinates, or drop units outside the "
                "image from the table."
            )
