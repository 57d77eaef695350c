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
    BARCODE: Final = "barcode"  # obs: the unit's id in the source files (written by the loaders)
    CELL_TYPE: Final = "cell_type"  # obs (categorical): true cell type of datasets.synthetic
    NICHE: Final = "niche"  # obs (categorical): true niche of datasets.synthetic

    # uns: dataset description written by loaders and io.from_anndata.
    DATASET: Final = "sigmma_dataset"  # uns dict, see DatasetInfo
    LOG_NORMALIZED: Final = "log_normalized"  # bool in uns[DATASET]: X is already log1p-normalised
    TECHNOLOGY: Final = "technology"  # one of Choices.TECHNOLOGIES
    UNIT_KIND: Final = "unit_kind"  # "spot" (units hold many cells) or "cell" (units are cells / fine bins)
    UNIT_DIAMETER: Final = "unit_diameter_um"  # spot or cell diameter in microns
    IMAGE_KEYS: Final = "image_keys"  # dict section -> image element name
    SHAPES_KEYS: Final = "shapes_keys"  # dict section -> shapes element name

    # Written by sigmma_sc.pp / tl.
    UNS: Final = "sigmma"  # uns dict: hierarchy, feature cache, fit parameters, history
    HIERARCHY: Final = "hierarchy"  # uns[UNS][HIERARCHY]
    FEATURES: Final = "features"  # uns[UNS][FEATURES][cache_key][level] -> (n_nodes, n_features)
    FEATURES_LATEST: Final = "features_latest"  # uns[UNS][FEATURES_LATEST]: newest feature cache key
    PARAMS: Final = "params"
    HISTORY: Final = "history"
    GENES: Final = "genes"
    VERSIONS: Final = "versions"
    CONNECTIVITIES: Final = "spatial_connectivities"  # obsp, as squidpy writes it
    DISTANCES: Final = "spatial_distances"  # obsp, as squidpy writes it
    NEIGHBORS: Final = "spatial_neighbors"  # uns, as squidpy writes it (keys + builder params)
    OWN_GRAPH: Final = "sigmma_spatial"  # obsp / uns key of the package's graph when "spatial" is the user's
    WRITTEN_BY: Final = "written_by"  # field of uns[f"{key}_neighbors"]: "sigmma_sc" on graphs the package wrote
    GRAPH_NNZ: Final = "nnz"  # field of uns[f"{key}_neighbors"]: edge count of the written graph
    UNIT_GRAPH: Final = "unit_graph"  # field of the stored hierarchy: obsp key of the unit graph it used
    OBSM_KEYS: Final = "obsm_keys"  # field of a fit's uns entry: the obsm keys that fit wrote (its claim)
    # Nuclei shapes element "{section}_nuclei" (pp.segment_nuclei) and its columns.
    NUCLEI_SUFFIX: Final = "_nuclei"
    NUCLEUS_AREA: Final = "area_um2"
    NUCLEUS_ECCENTRICITY: Final = "eccentricity"
    NUCLEUS_HEMATOXYLIN: Final = "hematoxylin"  # mean hematoxylin optical density of the nucleus
    NUCLEUS_SPOT: Final = "spot"  # row of the containing spot in the table at segmentation time
    NUCLEUS_UNIT: Final = "unit"  # obs_name of the containing spot (robust to table reordering)
    NUCLEUS_SECTION: Final = "section"

    X_SIGMMA: Final = "X_sigmma"  # obsm: joint embedding
    X_SIGMMA_IMG: Final = "X_sigmma_img"  # obsm: image-side embedding
    X_SIGMMA_EXPR: Final = "X_sigmma_expr"  # obsm: expression-side embedding
    VALIDATION: Final = "sigmma_validation"  # obs of model.reference: unit held out of training (validation)
    # Written by tl.predict_expression into the AnnData it returns.
    HELDOUT_R: Final = "sigmma_heldout_r"  # var: held-out Pearson r of the gene on the reference
    CONFIDENCE: Final = "sigmma_confidence"  # obs: mean cosine to the nearest reference units

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
    # ... or this many times the median nearest-neighbour distance when the cells are sparser (a
    # subsampled Xenium field: 75 um between cells, a 50 um cut left 74 edges on 200 cells).
    CELL_GRAPH_NN_FACTOR: Final = 3.0
    # Nuclei from the H&E (pp.segment_nuclei): accepted areas and the read margin around a spot.
    NUCLEUS_MIN_AREA_UM2: Final = 12.0
    NUCLEUS_MAX_AREA_UM2: Final = 300.0
    NUCLEUS_MARGIN_UM: Final = 15.0
    # pp.bins_to_cells: a bin joins a cell when within the nucleus radius plus this (bin2cell: ~2 bins of 2 um).
    BIN_EXPAND_UM: Final = 4.0
    N_GENES: Final = 1000
    # Genes must be non-zero in this fraction of training units to be modelled: 10%, lowered for sparse
    # units (cells, fine bins) until MIN_DETECTED_GENES genes pass, never below MIN_DETECTED_FLOOR
    # (model.default_min_detected). Visium HD kidney, 16 um bins: 17 genes pass at 10%, 453 at 1%,
    # prediction r 0.131 -> 0.159 (benchmarks/README.md).
    MIN_DETECTED: Final = 0.1
    MIN_DETECTED_FLOOR: Final = 0.01
    MIN_DETECTED_GENES: Final = 500
    # Readout of tl.predict_expression / tl.evaluate, chosen on held-out reference units (tl._readout):
    # retrieval over these k and softmax temperatures, or a ridge head on the image embedding with these
    # penalties (times the mean diagonal of the Gram matrix). K / TEMPERATURE: the retrieval used when
    # nothing can be held out (one group), the former fixed defaults.
    # Default readout kind by unit kind (tl.predict_expression(method=None)); "auto" (chosen on held-out
    # units across kinds) picked the ridge on her2st where retrieval predicts better; on the kidney's
    # 16 um bins the ridge head beats retrieval by 0.012 r in every block (benchmarks/README.md, "Readout").
    # Spots: the blend of retrieval and ridge, her2st leave-one-section-out 3 seeds r 0.456 -> 0.462
    # (every seed up) and the shifted C6 0.190 -> 0.196 (every seed up). Visium HD bins (embedded with
    # their niche, CONTEXT_WEIGHT_BINS): the blend beats the ridge in every kidney block and seed
    # (benchmarks/README.md, "Visium HD kidney: the bins' context weight").
    READOUT_SPOT: Final = "blend"
    READOUT_CELL: Final = "ridge"
    READOUT_BINS: Final = "blend"
    READOUT_K: Final = 50
    READOUT_TEMPERATURE: Final = 0.1
    READOUT_KS: Final = (10, 30, 100, 300, 1000)
    READOUT_TEMPERATURES: Final = (0.05, 0.1, 0.3, 1.0)
    READOUT_ALPHAS: Final = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    READOUT_HELDOUT_UNITS: Final = 1000
    # Fewer validation units than this (small references): any reference unit may be held out.
    READOUT_MIN_HELDOUT: Final = 20
    CONFIDENCE_NEIGHBOURS: Final = 10
    # Largest share of the model's genes a query table may lack before its expression side is refused
    # (missing genes are embedded as zeros): a section loaded on its own drops genes without counts.
    MAX_MISSING_GENES: Final = 0.1
    # Library size every unit is scaled to before log1p (scanpy's normalize_total target).
    TARGET_SUM: Final = 1e4
    ENCODER: Final = "efficientnet_lite0"
    FEATURE_METHOD: Final = "auto"
    # The seed of settings.seed, used wherever a function's seed is None.
    SEED: Final = 0
    # Training (tl.fit / TrainConfig).
    EMBED_DIM: Final = 128
    HIDDEN_DIM: Final = 256
    INTRA_LAYERS: Final = 1
    INTER_LAYERS: Final = 1
    HEADS: Final = 4
    DROPOUT: Final = 0.1
    DEPTH_AUGMENT: Final = 0.0
    FEATURE_JITTER: Final = 0.0
    LR: Final = 1e-3
    WEIGHT_DECAY: Final = 1e-4
    BATCH_SIZE: Final = 64
    MAX_CELLS: Final = 16
    # Training: cells per context-only subgraph (the targets' graph ball and region members) on cell and
    # bin data. A batch of 64 targets carries ~14x as many context subgraphs on a 100k-cell slide; they
    # feed the targets' GNN and pooling, not the loss: one epoch 35.1 s -> 15.7 s. Spots keep
    # MAX_CELLS ("auto"): their slides are small, and her2st leave-one-section-out with 4 (0.464 +- 0.010
    # vs 0.462) is within the seed spread, so their landed figures stay (benchmarks/README.md, "scale.py").
    MAX_CONTEXT_CELLS: Final = 4
    # Unit embedding of Visium HD bins: their niche's and region's blocks at this weight beside the bin's
    # own. A 16 um bin is a noisy square of tissue, its niche the signal: kidney 2 x 2 block 0, seed 0,
    # image->expression R@10 4.0% / 7.1% / 11.2% / 14.7% at 0 / 0.25 / 0.5 / 1 (single-scale CLIP 4.7%),
    # r 0.186 -> 0.188 (benchmarks/README.md, "context weight").
    CONTEXT_WEIGHT_BINS: Final = 1.0
    MAX_EPOCHS: Final = 30
    PATIENCE: Final = 5
    VAL_FRACTION: Final = 0.1
    CONSISTENCY_WEIGHT: Final = 0.1
    COARSE_TARGETS: Final = "soft+disjoint"
    # tl.fit(batch_key=...): mini-batches, and so the contrastive negatives, drawn within each section.
    # Negatives from other sections let the loss reward embedding what marks a section in both
    # modalities: on her2st C2-C6 the kNN other-section share of X_sigmma is 0.71 within, 0.27
    # across, with prediction and retrieval no worse (benchmarks/README.md, "Integration").
    BATCH_KEY: Final = "section"
    ACCELERATOR: Final = "auto"
    DEVICES: Final = "auto"
    # Clip for standardised features: near-constant channels explode on new data otherwise.
    FEATURE_Z_CLIP: Final = 5.0
    # Image features are z-scored per section by default: stain and scanner shift every channel of a
    # slide together. her2st leave-one-section-out, 5 epochs: mean r 0.364 -> 0.403 (C2), 0.422 -> 0.445 (C5).
    FEATURE_NORM: Final = "section"
    # Below this many nodes of a level, a section's own statistics are noise: the training ones are used.
    FEATURE_NORM_MIN_NODES: Final = 30
    # Dense image features: tiles of this many pixels plus a context margin on each side (the margin is
    # cropped off the feature map). EfficientNet-Lite0 map cells next to a tile seam vs one big tile:
    # cosine >= 0.80 with a 128 px margin, 0.96 with 192, 0.997 with 256. Levels whose view is at least
    # DENSE_COARSE_FOV_UM wide are pooled from the 2x-downsampled map (wider receptive field).
    DENSE_TILE_PX: Final = 1024
    DENSE_MARGIN_PX: Final = 256
    DENSE_COARSE_FOV_UM: Final = 300.0
    # Chunk side of the image pyramids the loaders write (dask / zarr chunks, and synthetic tiles).
    IMAGE_CHUNK_PX: Final = 1024
    # tl.integration_metrics: kNN other-section share and Leiden clusters shared by sections.
    INTEGRATION_NEIGHBORS: Final = 15
    INTEGRATION_RESOLUTION: Final = 1.0
    SHARED_CLUSTER_MIN_UNITS: Final = 5
    SHARED_CLUSTER_MIN_BATCHES: Final = 3
    # settings.cachedir: this environment variable, else $XDG_CACHE_HOME/sigmma_sc (~/.cache/sigmma_sc).
    CACHE_DIR_ENV: Final = "SIGMMA_CACHE_DIR"
    # Image / counts fingerprints (uns["sigmma"]["params"]["fingerprint"], cache keys): about this many
    # values sampled with a fixed stride from the coarsest pyramid level, plus its shape and dtype.
    FINGERPRINT_SAMPLES: Final = 1 << 20


class Choices:
    """Every closed list of values a keyword accepts, in one place (validated where the keyword is read)."""

    TECHNOLOGIES: Final = ("st", "visium", "visium_hd", "visium_hd_cells", "xenium", "synthetic", "custom")
    # Cells that pp.bins_to_cells gathered from Visium HD bins: segmented cells at irregular centres, so
    # they take the cells' defaults (Delaunay graph, context weight 0, ridge readout), not the bins'.
    BINNED_CELLS: Final = "visium_hd_cells"
    # Technologies whose units hold many cells.
    SPOT_TECHNOLOGIES: Final = ("st", "visium")
    # Units that are squares of a lattice at cell scale (bins), not segmented cells.
    BIN_TECHNOLOGIES: Final = ("visium_hd",)
    UNIT_KINDS: Final = ("spot", "cell")
    # pp.image_features(method=...).
    FEATURE_METHODS: Final = ("dense", "crop", "auto")
    # pp.image_features(stain_normalize=...), besides None.
    STAIN_METHODS: Final = ("macenko", "reinhard")
    # tl.fit(feature_norm=...): z-score image features per section or with the training statistics.
    FEATURE_NORMS: Final = ("section", "global")
    # tl.fit(coarse_targets=...): how the coarse (macro) InfoNCE treats overlapping regions.
    COARSE_TARGETS: Final = ("hard", "soft", "disjoint", "soft+disjoint")
    # tl.predict_expression(method=...): chosen on held-out reference units, retrieval, or a ridge head.
    READOUTS: Final = ("auto", "knn", "ridge", "blend")
    # tl.fit(accelerator=...) / pp.image_features(device=...): Lightning's accelerator names.
    ACCELERATORS: Final = ("auto", "cpu", "gpu", "cuda")


# Legacy Spatial Transcriptomics and 10x Visium geometry.
ST_SPOT_DIAMETER_UM: Final = 100.0
ST_SPOT_PITCH_UM: Final = 200.0
VISIUM_SPOT_DIAMETER_UM: Final = 55.0
VISIUM_SPOT_PITCH_UM: Final = 100.0


class ReaderKeys:
    """Element / column names written by ``spatialdata_io`` readers (read by ``io.validate``)."""

    ATTRS: Final = "spatialdata_attrs"  # table.uns: region / region_key / instance_key
    REGION: Final = "region"
    REGION_KEY: Final = "region_key"
    INSTANCE_KEY: Final = "instance_key"
    GLOBAL: Final = "global"  # preferred coordinate system when several are shared
    XENIUM_CELL_ID: Final = "cell_id"  # xenium obs / shapes index
    XENIUM_CELL_AREA: Final = "cell_area"  # xenium obs, um^2
    XENIUM_CELL_SHAPES: Final = ("cell_circles", "cell_boundaries")  # shapes in microns (Scale to "global")
    XENIUM_REGIONS: Final = ("cell_circles", "cell_boundaries", "cell_labels", "nucleus_boundaries")
    XENIUM_IMAGES: Final = ("morphology_focus", "morphology_mip")
    VISIUM_IMAGE_SUFFIXES: Final = ("_full_image", "_hires_image", "_lowres_image")
    VISIUM_HD_BIN_PATTERN: Final = r"square_(\d+)um"  # shapes / table name of a Visium HD bin size
    SCANPY_LOG1P: Final = "log1p"  # uns key scanpy writes after sc.pp.log1p


HER2ST_MPP: Final = 0.688
XENIUM_NCBI858_MPP: Final = 2.125  # deepspot_NCBI858 H&E pixel size (HEST-1k NCBI858, downsampled)
