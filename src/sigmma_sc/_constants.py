"""Every key the package reads or writes, and every default size (in microns), in one place."""

from __future__ import annotations

from typing import Final


class Keys:
    """Names of AnnData / SpatialData fields used by sigmma-sc."""

    # SpatialData element / table conventions written by the loaders.
    TABLE: Final = "table"
    REGION: Final = "region"  # obs column naming the shapes element of each unit
    INSTANCE: Final = "spot_id"  # obs column with the unit's id inside its shapes element
    SECTION: Final = "section"  # obs column (categorical): the slide/section of each unit
    SPATIAL: Final = "spatial"  # obsm: unit centres, x/y in microns in the section's coordinate system
    COUNTS_LAYER: Final = "counts"  # layers: raw integer counts

    # uns: dataset description written by loaders and io.from_anndata.
    DATASET: Final = "sigmma_dataset"  # uns dict, see DatasetInfo
    LOG_NORMALIZED: Final = "log_normalized"  # bool in uns[DATASET]: X is already log1p-normalised
    TECHNOLOGY: Final = "technology"  # "st", "visium", "visium_hd", "xenium", "synthetic", "custom"
    UNIT_KIND: Final = "unit_kind"  # "spot" (units hold many cells) or "cell" (units are cells / fine bins)
    UNIT_DIAMETER: Final = "unit_diameter_um"  # spot or cell diameter in microns
    IMAGE_KEYS: Final = "image_keys"  # dict section -> image element name
    SHAPES_KEYS: Final = "shapes_keys"  # dict section -> shapes element name

    # Written by sigmma_sc.pp / tl.
    UNS: Final = "sigmma"  # uns dict: hierarchy, feature cache, fit parameters, history
    HIERARCHY: Final = "hierarchy"  # uns[UNS][HIERARCHY]
    FEATURES: Final = "features"  # uns[UNS][FEATURES][cache_key][level] -> (n_nodes, n_features)
    PARAMS: Final = "params"
    HISTORY: Final = "history"
    GENES: Final = "genes"
    VERSIONS: Final = "versions"
    CONNECTIVITIES: Final = "spatial_connectivities"  # obsp, as squidpy writes it
    DISTANCES: Final = "spatial_distances"  # obsp, as squidpy writes it

    X_SIGMMA: Final = "X_sigmma"  # obsm: joint embedding
    X_SIGMMA_IMG: Final = "X_sigmma_img"  # obsm: image-side embedding
    X_SIGMMA_EXPR: Final = "X_sigmma_expr"  # obsm: expression-side embedding

    @staticmethod
    def level_embedding(level: str, modality: str) -> str:
        """Per-level embedding key, e.g. ``X_sigmma_meso_img``."""
        return f"X_sigmma_{level}_{modality}"


class Levels:
    """Names of the hierarchy levels, fine to coarse."""

    MICRO: Final = "micro"
    MESO: Final = "meso"
    MACRO: Final = "macro"
    ALL: Final = ("micro", "meso", "macro")


class Defaults:
    """Default sizes (microns) and numbers."""

    # Field of view of the image view at each level (crop side, in microns).
    MICRO_FOV_UM: Final = 32.0
    MESO_FOV_UM: Final = 150.0  # her2st spots are 100 um; the view carries a little context
    MACRO_FOV_UM: Final = 500.0
    # Single-cell data: niches (meso subgraphs) are square tiles of this side.
    NICHE_SIZE_UM: Final = 100.0
    # Macro regions: a subgraph plus the ring of subgraphs whose centres lie within this radius.
    REGION_RADIUS_UM: Final = 250.0
    # Cell graphs: radius cut for Delaunay edges between cells.
    CELL_GRAPH_RADIUS_UM: Final = 50.0
    N_GENES: Final = 1000
    EMBED_DIM: Final = 128
    ENCODER: Final = "efficientnet_lite0"
    BATCH_SIZE: Final = 64
    SEED: Final = 0
    # Clip for standardised features: near-constant channels explode on new data otherwise.
    FEATURE_Z_CLIP: Final = 5.0


# Legacy Spatial Transcriptomics and 10x Visium geometry.
ST_SPOT_DIAMETER_UM: Final = 100.0
ST_SPOT_PITCH_UM: Final = 200.0
VISIUM_SPOT_DIAMETER_UM: Final = 55.0
VISIUM_SPOT_PITCH_UM: Final = 100.0
HER2ST_MPP: Final = 0.688
