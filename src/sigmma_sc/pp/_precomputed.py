"""Patch embeddings computed by other scverse tools (sopa, LazySlide), pooled onto the hierarchy's nodes.

Layout read (both tools write it into a SpatialData object):

- **patches**: a shapes element (GeoDataFrame) of square polygons, one per patch, in some coordinate
  system. sopa's ``sopa.patches.compute_embeddings`` writes ``"embeddings_patches"`` in the image's
  pixels with the image's transformations (so the package's ``Scale([mpp, mpp])`` to section ``S``
  comes along); LazySlide / wsidata write ``"tiles"`` (``tile_id``, ``x``, ``y`` columns) in
  level-0 pixels of the slide with an ``Identity`` to ``"global"``.
- **embeddings**: a table (AnnData) with one row per patch, the embedding in ``X`` (or an ``obsm``
  key). Rows are matched to patches by the table's ``spatialdata_attrs`` ``instance_key`` column
  (sopa: ``obs["instance"]`` = the patches' index; wsidata: ``obs["tile_id"]``), else by
  ``obs_names`` against the patches' index, else by position when the counts agree. sopa names the
  table ``"{model}_embeddings"``, LazySlide ``"{model}_tiles"``.

Each node's feature is the mean of the embeddings of the patches overlapping its field of view (a
square of the level's ``fov_um`` around the node centre), weighted by the overlap area, or of the
patches whose centre falls inside the view. Patches are taken as their axis-aligned bounding boxes
in the section's microns (the tools write axis-aligned squares).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Keys, ReaderKeys
from sigmma_sc._logging import logger

from ._encoders import PRECOMPUTED, _safe_id
from ._features import FeatureKey, commit_features, features_target, missing_levels

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: pp.patch_features(weighting=...): overlap-area weights, or the patches whose centre is in the view.
WEIGHTINGS = ("area", "centre")
#: pp.patch_features(coordinates=...).
COORDINATES = ("auto", "pixels", "microns")
#: Feature cache method of each weighting (part of the FeatureKey id).
_METHODS = {"area": "patches", "centre": "patches-centre"}
# Below this ratio of polygon area to bounding-box area a patch is not a rectangle (logged).
_RECTANGLE = 0.99


def pool_patch_boxes(
    centers: np.ndarray, fov: float, boxes: np.ndarray, values: np.ndarray, *, weighting: str = "area"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of patch values over square node windows (the array-level core of :func:`patch_features`).

    Parameters
    ----------
    centers
        ``(n, 2)`` window centres ``(x, y)``.
    fov
        Window side (same unit as ``centers``).
    boxes
        ``(m, 4)`` patch boxes ``(x0, y0, x1, y1)``.
    values
        ``(m, d)`` patch values.
    weighting
        ``"area"``: weights are the overlap areas of window and patch; ``"centre"``: weight 1 for
        patches whose centre lies in the window (half-open: ``[lo, hi)``).

    Returns
    -------
    ``((n, d) float64 means, (n,) bool: windows no patch reached, whose row is 0)``.

    Examples
    --------
    >>> boxes = np.array([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]])
    >>> means, empty = pool_patch_boxes(np.array([[11.0, 5.0], [50.0, 50.0]]), 5.0, boxes, np.array([[1.0], [3.0]]))
    >>> means[:, 0], empty  # window x in [8.5, 13.5]: 1.5 over the first patch, 3.5 over the second
    (array([2.4, 0. ]), array([False,  True]))
    """
    import shapely

    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    values = np.asarray(values, dtype=np.float64)
    half = float(fov) / 2.0
    lo, hi = centers - half, centers + half
    tree = shapely.STRtree(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]))
    node, patch = tree.query(shapely.box(lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]))  # bounding boxes meet
    if weighting == "area":
        ox = np.minimum(hi[node, 0], boxes[patch, 2]) - np.maximum(lo[node, 0], boxes[patch, 0])
        oy = np.minimum(hi[node, 1], boxes[patch, 3]) - np.maximum(lo[node, 1], boxes[patch, 1])
        w = np.clip(ox, 0.0, None) * np.clip(oy, 0.0, None)
    else:
        c = 0.5 * (boxes[patch, :2] + boxes[patch, 2:])
        w = np.all((lo[node] <= c) & (c < hi[node]), axis=1).astype(np.float64)
    keep = w > 0
    W = sparse.csr_matrix((w[keep], (node[keep], patch[keep])), shape=(len(centers), len(boxes)))
    total = np.asarray(W.sum(axis=1)).ravel()
    means = np.asarray(W @ values) / np.where(total > 0, total, 1.0)[:, None]
    return means, total <= 0


def _element(sdata: SpatialData, value: Any, kind: str) -> tuple[Any, str | None]:
    if isinstance(value, str):
        store = sdata.shapes if kind == "patches" else sdata.tables
        if value not in store:
            what = "shapes" if kind == "patches" else "tables"
            raise KeyError(f"{kind}={value!r} is not in sdata.{what} (has {list(store)}).")
        return store[value], value
    return value, None


def _transformations(gdf: Any) -> dict[str, Any]:
    from spatialdata.transformations import get_transformation

    try:
        return dict(get_transformation(gdf, get_all=True) or {})
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


def _affine(transformation: Any) -> np.ndarray:
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _boxes(gdf: Any) -> np.ndarray:
    """``(m, 4)`` bounding boxes of the patch geometries (circles: centre +- radius)."""
    geom = gdf.geometry
    b = np.asarray(geom.bounds, dtype=np.float64)
    if "radius" in gdf.columns and (geom.geom_type == "Point").all():
        r = np.asarray(gdf["radius"], dtype=np.float64)
        b = b + np.stack([-r, -r, r, r], axis=1)
    else:
        area = np.asarray(geom.area, dtype=np.float64)
        bbox = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        odd = int(np.sum(area < _RECTANGLE * bbox))
        if odd:
            logger.warning(
                f"{odd} of {len(b)} patches are not axis-aligned rectangles: pooled over their bounding boxes"
            )
    if not np.isfinite(b).all() or np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
        raise ValueError("patches must be polygons (or circles with a 'radius' column) of positive area.")
    return b


def _map_boxes(boxes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Bounding boxes of ``boxes`` after the ``(3, 3)`` affine ``m`` (exact for scales and translations)."""
    x0, y0, x1, y1 = boxes.T
    corners = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x0, y1], 1), np.stack([x1, y1], 1)])
    mapped = corners @ m[:2, :2].T + m[:2, 2]
    return np.concatenate([mapped.min(axis=0), mapped.max(axis=0)], axis=1)


def _match(gdf: Any, table: AnnData, region: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(table rows used, patch position of each)``: the table's rows matched to the patches."""
    attrs = table.uns.get(ReaderKeys.ATTRS) or {}
    rows = np.arange(table.n_obs)
    region_key = attrs.get(ReaderKeys.REGION_KEY)
    if region is not None and region_key in table.obs:
        in_region = np.asarray(table.obs[region_key].astype(str) == region)
        if in_region.any():
            rows = np.flatnonzero(in_region)
    instance = attrs.get(ReaderKeys.INSTANCE_KEY)
    candidates = []
    if instance in table.obs:
        candidates.append(np.asarray(table.obs[instance])[rows])
    candidates.append(np.asarray(table.obs_names)[rows])
    targets = [pd.Index(gdf.index)]
    if instance in gdf.columns:
        targets.append(pd.Index(gdf[instance]))
    for ids in candidates:
        for target in targets:
            for cast in (False, True):
                t = target.astype(str) if cast else target
                if not t.is_unique:
                    continue
                pos = t.get_indexer(pd.Index(ids).astype(str) if cast else pd.Index(ids))
                if (pos >= 0).all() and len(np.unique(pos)) == len(pos):
                    return rows, pos
    if len(rows) == len(gdf):
        logger.info("patch embeddings: no ids match the patches; rows are paired with patches by position")
        return rows, np.arange(len(gdf))
    raise ValueError(
        f"cannot pair the {len(rows)} embedding rows with the {len(gdf)} patches: neither the table's instance_key "
        f"column ({instance!r}) nor its obs_names match the patches' index"
        + (f" or column {instance!r}" if instance in gdf.columns else "")
        + "."
    )


def _values(table: AnnData, rows: np.ndarray, use_rep: str | None) -> np.ndarray:
    if use_rep is not None:
        if use_rep not in table.obsm:
            raise KeyError(f"embeddings have no obsm[{use_rep!r}] (obsm: {list(table.obsm)}).")
        x = table.obsm[use_rep]
    else:
        x = table.X
    if x is None:
        raise ValueError("the embeddings table has no X; pass use_rep= (an obsm key holding them).")
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = np.asarray(x, dtype=np.float64)[rows]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"patch embeddings must be a (n_patches, dim) matrix, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("patch embeddings contain NaN or infinite values.")
    return x


def _section_of_patches(
    slide: Any, gdf: Any, table: AnnData, rows: np.ndarray, pos: np.ndarray, section: str | None, coordinates: str
) -> np.ndarray:
    """Section name of every matched patch."""
    n = len(pos)
    if section is not None:
        if section not in slide.sections:
            raise KeyError(f"section {section!r} is not in the table (sections: {slide.sections}).")
        return np.full(n, section, dtype=object)
    if len(slide.sections) == 1:
        return np.full(n, slide.sections[0], dtype=object)
    if Keys.SECTION in gdf.columns:
        return np.asarray(gdf[Keys.SECTION].astype(str), dtype=object)[pos]
    if Keys.SECTION in table.obs:
        return np.asarray(table.obs[Keys.SECTION].astype(str), dtype=object)[rows]
    if coordinates == "auto":
        systems = {_system(slide, s): s for s in slide.sections}
        found = [systems[cs] for cs in _transformations(gdf) if cs in systems]
        if len(found) == 1:
            return np.full(n, found[0], dtype=object)
    raise ValueError(
        f"which section do the patches belong to? The table has sections {slide.sections}: pass section=, a dict "
        f"{{section: patches}}, or a {Keys.SECTION!r} column in the patches or the embeddings' obs."
    )


def _system(slide: Any, section: str) -> str:
    img = slide.images.get(section)
    return img.coordinate_system if img is not None else section


def _um_from_patches(sdata: SpatialData, slide: Any, gdf: Any, section: str, coordinates: str) -> np.ndarray:
    """``(3, 3)`` affine from the patches' coordinates to the section's microns."""
    img = slide.images.get(section)
    if coordinates == "microns":
        return np.eye(3)
    if coordinates == "pixels":
        if img is None:
            raise ValueError(f"coordinates='pixels' needs the H&E image of section {section!r}; it has none.")
        return img.um_from_px
    from spatialdata.transformations import get_transformation

    cs = _system(slide, section)
    transforms = _transformations(gdf)
    if cs not in transforms:
        raise ValueError(
            f"the patches have no transformation to coordinate system {cs!r} of section {section!r} (they have "
            f"{sorted(transforms) or 'none'}): pass coordinates='pixels' (full-resolution pixels of the section's "
            "H&E, as LazySlide tiles of the same slide) or coordinates='microns'."
        )
    to_cs = _affine(transforms[cs])
    if img is None or img.element not in sdata.images:
        return to_cs  # the package's sections: coordinate system units are microns
    img_to_cs = _affine(get_transformation(sdata.images[img.element], to_coordinate_system=cs))
    return img.um_from_px @ np.linalg.inv(img_to_cs) @ to_cs


def _inputs(patches: Any, embeddings: Any) -> list[tuple[str | None, Any, Any]]:
    if isinstance(patches, Mapping) != isinstance(embeddings, Mapping):
        raise TypeError("patches and embeddings must both be dicts {section: ...} or both single elements.")
    if isinstance(patches, Mapping):
        if set(patches) != set(embeddings):
            raise ValueError(
                f"patches and embeddings name different sections: {sorted(patches)} vs {sorted(embeddings)}."
            )
        return [(str(s), patches[s], embeddings[s]) for s in patches]
    return [(None, patches, embeddings)]


def patch_features(
    sdata: SpatialData,
    *,
    patches: str | Any | Mapping[str, str | Any],
    embeddings: str | AnnData | Mapping[str, str | AnnData],
    name: str | None = None,
    table_key: str = Keys.TABLE,
    section: str | None = None,
    coordinates: str = "auto",
    weighting: str = "area",
    use_rep: str | None = None,
    levels: Sequence[str] | None = None,
    overwrite: bool = False,
) -> FeatureKey:
    """Pool patch embeddings from other tools (sopa, LazySlide) onto every hierarchy node, cached like image features.

    Each node's feature is the mean embedding of the patches overlapping its field of view (the
    square of the level's ``fov_um`` around the node), weighted by the overlap area
    (``weighting="area"``) or over the patches whose centre lies in the view (``"centre"``). A node
    no patch reaches (outside the tiled tissue) takes the embedding of the nearest patch of its
    section (a warning counts them). The result sits in the feature cache under encoder
    ``"precomputed-{name}"`` (method ``"patches"`` / ``"patches-centre"``), like
    :func:`image_features`; :func:`get_features` reads it.

    Parameters
    ----------
    sdata
        SpatialData with the table of units (see :func:`sigmma_sc.io.validate`).
    patches
        Shapes element name in ``sdata`` or a GeoDataFrame of patch polygons (sopa:
        ``"embeddings_patches"``; LazySlide: ``"tiles"``); or ``{section: patches}``.
    embeddings
        Table name in ``sdata.tables`` or an AnnData with one row per patch (sopa:
        ``"{model}_embeddings"``; LazySlide: ``"{model}_tiles"``); or ``{section: embeddings}``
        (the same sections as ``patches``). Rows are paired with patches by the table's
        ``spatialdata_attrs`` ``instance_key`` column, else by ``obs_names``, else by position.
    name
        Name in the cache id (default: the embeddings' table name, else ``"patches"``).
    table_key
        Table of the units.
    section
        Section of every patch (default: the only section; else a ``"section"`` column of the
        patches or the embeddings' obs; else the one section whose coordinate system the patches
        have a transformation to).
    coordinates
        ``"auto"``: the patches' SpatialData transformation to the section's coordinate system (sopa
        run on the package's image brings it); ``"pixels"``: full-resolution pixels of the
        section's H&E (LazySlide tiles of the same slide file); ``"microns"``: the section's microns.
    weighting
        ``"area"`` or ``"centre"`` (see above).
    use_rep
        ``obsm`` key of the embeddings (default: ``X``).
    levels
        Levels to pool (default: every hierarchy level).
    overwrite
        Recompute even when cached.

    Returns
    -------
    The :class:`FeatureKey` of the cached set: ``uns["sigmma"]["features"][key.id][level]``,
    ``(n_nodes, dim)`` float32 aligned with the hierarchy's nodes.

    Examples
    --------
    A 20 µm patch grid over a synthetic section whose embedding is the patch centre ``(x, y)``:

    >>> import geopandas as gpd, shapely, anndata as ad
    >>> sdata = sg.datasets.synthetic(100, n_genes=20, seed=0)
    >>> x0, y0 = np.meshgrid(np.arange(0, 880, 20.0), np.arange(0, 880, 20.0))
    >>> tiles = gpd.GeoDataFrame(geometry=shapely.box(x0.ravel(), y0.ravel(), x0.ravel() + 20, y0.ravel() + 20))
    >>> emb = ad.AnnData(np.stack([x0.ravel() + 10, y0.ravel() + 10], 1).astype(np.float32))
    >>> key = sg.pp.patch_features(sdata, patches=tiles, embeddings=emb, coordinates="microns", name="xy")
    >>> key.id
    'precomputed-xy__patches__micro32_meso150_macro500__raw'
    >>> feats = sg.pp.get_features(sdata, key=key)
    >>> {level: f.shape for level, f in feats.items()}  # cells, niches, regions
    {'micro': (100, 2), 'meso': (4, 2), 'macro': (4, 2)}
    >>> feats["meso"][3]  # the niche at (150, 150): the mean patch centre under its 150 µm view
    array([150., 150.], dtype=float32)
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}.")
    work, slide, hier, levels = features_target(
        sdata, table_key=table_key, levels=levels, require_image=coordinates == "pixels"
    )

    parts = _inputs(patches, embeddings)
    boxes, values, secs = [], [], []
    label = name
    for sec, p, e in parts:
        gdf, p_name = _element(sdata, p, "patches")
        emb, e_name = _element(sdata, e, "embeddings")
        label = label or e_name
        rows, pos = _match(gdf, emb, p_name)
        x = _values(emb, rows, use_rep)
        of = _section_of_patches(slide, gdf, emb, rows, pos, sec or section, coordinates)
        b = _boxes(gdf)[pos]
        for s in pd.unique(of):
            sel = of == s
            boxes.append(_map_boxes(b[sel], _um_from_patches(sdata, slide, gdf, str(s), coordinates)))
            values.append(x[sel])
            secs.append(np.full(int(sel.sum()), s, dtype=object))
    dims = {v.shape[1] for v in values}
    if len(dims) != 1:
        raise ValueError(f"the embeddings of different sections have different sizes {sorted(dims)}.")
    boxes_um, vals, patch_section = np.concatenate(boxes), np.concatenate(values), np.concatenate(secs)
    unknown_secs = sorted(set(patch_section) - set(slide.sections))
    if unknown_secs:
        raise KeyError(f"patch sections {unknown_secs} are not in the table (sections: {slide.sections}).")

    encoder = _safe_id(f"{PRECOMPUTED}-{label or 'patches'}")
    fovs = {lv: float(hier.levels[lv].fov_um) for lv in hier.levels}
    key = FeatureKey(encoder, _METHODS[weighting], tuple(fovs.items()), None)
    todo = missing_levels(slide.table, key, hier, levels, overwrite=overwrite)
    if not todo:
        logger.info(f"patch features {key.id!r} found in the table cache")
        commit_features(work, sdata, key, {}, table_key=table_key)
        return key

    from scipy.spatial import cKDTree

    new: dict[str, np.ndarray] = {}
    filled = 0
    for lv in todo:
        level = hier.levels[lv]
        out = np.zeros((len(level.centers_um), vals.shape[1]), dtype=np.float64)
        for code, s in enumerate(slide.sections):
            nodes = np.flatnonzero(np.asarray(level.section) == code)
            if not len(nodes):
                continue
            mine = np.flatnonzero(patch_section == s)
            if not len(mine):
                raise ValueError(f"section {s!r} has no patches: every section of the table needs patch embeddings.")
            centers = np.asarray(level.centers_um, dtype=np.float64)[nodes]
            means, empty = pool_patch_boxes(centers, level.fov_um, boxes_um[mine], vals[mine], weighting=weighting)
            if empty.any():
                mid = 0.5 * (boxes_um[mine, :2] + boxes_um[mine, 2:])
                _, nearest = cKDTree(mid).query(centers[empty])
                means[empty] = vals[mine][nearest]
                filled += int(empty.sum())
            out[nodes] = means
        new[lv] = out.astype(np.float32)
    if filled:
        logger.warning(f"patch features: {filled} nodes overlap no patch; they take the nearest patch's embedding")
    commit_features(work, sdata, key, new, table_key=table_key)
    logger.info(f"patch features {key.id!r}: {len(vals)} patches of {vals.shape[1]} dims pooled onto {', '.join(todo)}")
    return key
