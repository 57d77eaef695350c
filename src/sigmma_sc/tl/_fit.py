"""``tl.fit``: train SIGMMA on a slide and write its embeddings into the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sigmma_sc import pp
from sigmma_sc._constants import Choices, Defaults, Keys, Levels
from sigmma_sc._logging import logger, timed
from sigmma_sc._settings import settings
from sigmma_sc._utils import torch_device
from sigmma_sc.io import get_table, validate
from sigmma_sc.model import Sigmma, TrainConfig, select_genes
from sigmma_sc.pp import light_copy

__all__ = ["fit", "light_copy"]  # light_copy: the working copy of fit and the baselines

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: Field of a fit's uns entry listing the obsm keys that fit wrote (its claim on them).
OBSM_KEYS = Keys.OBSM_KEYS


def fit(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    key_added: str = Keys.X_SIGMMA,
    copy: bool = False,
    levels: Sequence[str] = Levels.ALL,
    graph: bool = True,
    encoder: Any = Defaults.ENCODER,
    n_genes: int = Defaults.N_GENES,
    min_detected: float | None = None,
    genes: Sequence[str] | str | None = None,
    embed_dim: int = Defaults.EMBED_DIM,
    hidden_dim: int = Defaults.HIDDEN_DIM,
    max_epochs: int = Defaults.MAX_EPOCHS,
    batch_size: int = Defaults.BATCH_SIZE,
    max_cells: int | None = Defaults.MAX_CELLS,
    max_context_cells: int | str | None = "auto",
    lr: float = Defaults.LR,
    weight_decay: float = Defaults.WEIGHT_DECAY,
    patience: int = Defaults.PATIENCE,
    val_fraction: float = Defaults.VAL_FRACTION,
    coarse_targets: str = Defaults.COARSE_TARGETS,
    batch_key: str | None = Defaults.BATCH_KEY,
    consistency_weight: float = Defaults.CONSISTENCY_WEIGHT,
    context_weight: float | None = None,
    level_weights: dict[str, float] | None = None,
    intra_layers: int = Defaults.INTRA_LAYERS,
    inter_layers: int = Defaults.INTER_LAYERS,
    heads: int = Defaults.HEADS,
    dropout: float = Defaults.DROPOUT,
    depth_augment: float = Defaults.DEPTH_AUGMENT,
    feature_jitter: float = Defaults.FEATURE_JITTER,
    accelerator: str = Defaults.ACCELERATOR,
    devices: Any = Defaults.DEVICES,
    precision: str | None = None,
    seed: int | None = None,
    feature_method: str = Defaults.FEATURE_METHOD,
    stain_normalize: str | None = None,
    feature_norm: str = Defaults.FEATURE_NORM,
    hierarchy_kwargs: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    resume: bool | str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Sigmma | tuple[Sigmma, SpatialData]:
    """Train SIGMMA (multi-scale graph contrastive alignment of H&E and expression) on a slide.

    Runs what is missing of :func:`sigmma_sc.pp.build_hierarchy` and
    :func:`sigmma_sc.pp.image_features` (cached in the table), selects the genes, trains the
    image and expression encoders with PyTorch Lightning, then writes the embeddings of every unit.

    Everything is computed on a private working copy first and written into the table at the
    end, all at once: after an error (or ``KeyboardInterrupt``) ``sdata`` is exactly as before.
    Keys the package did not write are never overwritten.

    Training: mini-batches of ``batch_size`` meso subgraphs (spots or niches) with their cells,
    their GNN context and their regions; AdamW; a random ``val_fraction`` of the subgraphs is held
    out for early stopping (``patience`` epochs) and the best validation epoch is kept (held-out
    subgraphs still serve as GNN context of their neighbours, so the validation loss is an early
    stopping signal, not a test score); bf16 mixed precision on GPU; DDP when more than one device;
    seeded (bit-identical on CPU for a seed).

    Parameters
    ----------
    sdata
        SpatialData with H&E images and a table of units with raw counts (see
        :func:`sigmma_sc.io.validate`; ``from_anndata`` for a plain AnnData + image).
    table_key
        Table of the units.
    key_added
        ``obsm`` key of the joint embedding; it prefixes the others (``{key_added}_img``,
        ``{key_added}_expr``, ``{key_added}_{level}_{img|expr}``) and names the uns entry of the
        fit (``uns["sigmma"]`` for the default ``"X_sigmma"``, else ``uns[key_added]``, as
        :func:`scanpy.tl.pca` does). A second model sits beside the first under its own key, e.g.
        ``key_added="X_clip"``. Refused when one of these keys exists and was not written by
        sigmma-sc.
    copy
        As in scanpy: leave ``sdata`` untouched and return ``(model, sdata_copy)``, where
        ``sdata_copy`` holds the results. Its tables and shapes are copies; images, labels and
        points (read only, never modified by sigmma-sc) are shared with ``sdata``.
    levels
        Hierarchy levels to align, a subset of ``("micro", "meso", "macro")`` containing
        ``"meso"``. ``levels=("meso",), graph=False`` is the single-scale CLIP baseline.
    graph
        Use the intra-subgraph (cells) and inter-subgraph (meso graph) GATv2 layers.
    encoder
        Frozen image encoder (see :func:`sigmma_sc.pp.image_features`).
    n_genes
        Genes to model: the most variable (log1p-normalised variance among genes detected in at
        least ``min_detected`` of units); capped at the genes available.
    min_detected
        Fraction of training units in which a gene must be non-zero to be modelled. Default
        (:func:`sigmma_sc.model.default_min_detected`): 10%, lowered for sparse units until 500
        genes pass, never below 1%. It reads the counts, so spots keep 10% and fine bins and
        cells get hundreds of genes without a keyword: the Visium HD kidney's 16 µm bins pass 17
        genes at 10% and 453 at 1%, which raised its prediction r from 0.13 to 0.16
        (``benchmarks/README.md``). The value used is in ``model.params["min_detected"]``.
    genes
        The genes to model instead of the rule above: a list of gene names, or the name of a
        boolean ``var`` column such as ``"highly_variable"`` (from
        :func:`scanpy.pp.highly_variable_genes`). ``n_genes`` and ``min_detected`` then do not
        apply. Unknown genes, a missing column or a non-boolean one raise before any work.
    embed_dim, hidden_dim
        Embedding size of every level, and width of the per-level MLPs.
    max_epochs, batch_size, lr, weight_decay, patience, val_fraction
        Optimisation.
    max_cells
        Training only: a random bag of at most this many cells (nuclei) per subgraph in each batch,
        redrawn every epoch (``None``: all). Embedding always uses every cell.
    max_context_cells
        Training only: the same for the subgraphs a batch carries as context (its targets' graph
        neighbours and the other members of their regions; ``None``: ``max_cells``). They feed the
        targets' inter-subgraph GNN and region pooling but not the loss, and outnumber the targets
        ~14:1 on a 100k-cell slide. ``"auto"``: 4 for cells and bins (one epoch over 100k synthetic
        cells 35.1 s -> 15.7 s), ``max_cells`` for spots (her2st leave-one-section-out, 3 seeds:
        r 0.462 vs 0.464 with 4, within the seed spread: spots, whose slides are small, keep every
        sampled cell and their landed figures).
    coarse_targets
        Macro regions of neighbouring subgraphs overlap almost entirely, so plain InfoNCE treats
        near-duplicates as negatives. ``"soft"``: BLEEP-style soft targets from within-modality
        similarity; ``"disjoint"``: only a non-overlapping subset of each batch's regions enters
        the macro loss; ``"soft+disjoint"`` (default): both; ``"hard"``: plain InfoNCE. Measured on
        her2st (leave one section out over C2-C6, 10 epochs; mean Pearson r of the top-50 HVG
        predicted by kNN-weighted reference expression / image->expression Recall@5 on the
        held-out section, chance 0.027): hard 0.427 / 0.271, soft 0.434 / 0.292, disjoint
        0.438 / 0.297, soft+disjoint 0.445 / 0.289; single-scale baseline 0.352 / 0.109.
    batch_key
        ``"section"`` (default) or an ``obs`` column (``"patient"``, a lab, ...): every training
        mini-batch holds the subgraphs of one batch, so a unit's negatives come from its own
        section. With negatives from other sections the loss rewards embedding whatever marks a
        section in both modalities (stain, depth), and the embeddings separate sections that their
        inputs mix: on her2st C2-C6 the share of a spot's 15 nearest neighbours from other
        sections is 0.71 with ``"section"`` and 0.27 with ``None`` (uniform mixing 0.80), with
        prediction and retrieval on a held-out section no worse (``benchmarks/README.md``,
        "Integration"). ``None``: mini-batches mix all sections.
    consistency_weight
        Weight of the cross-scale term tying each node's embedding to its parent's.
    context_weight
        Weight of the coarser levels' blocks in the unit embeddings ``X_sigmma*`` (the unit's own
        level weighs 1). Default: 1 for spot data, 0 for cell data, whose cells share their niche's
        embedding exactly (clusters would follow the niche tiles), 1 for Visium HD bins (their
        niche lifts image->expression retrieval 4.0% -> 14.7% on the kidney); resolved at training
        and recorded in ``params["context_weight"]``; see :func:`sigmma_sc.model.default_context_weight`.
    level_weights
        Weight of each level's InfoNCE (default 1 each).
    intra_layers, inter_layers, heads, dropout
        GNN depth (cells inside a subgraph, subgraph graph), attention heads, dropout.
    depth_augment
        Training augmentation for slides sequenced less deeply than the training data: every
        training batch thins each node's counts binomially to a random share drawn from
        ``[1 - depth_augment, 1]`` (0: off). Validation and embeddings read the counts as they are.
        On a her2st section thinned to 650 UMI per spot and re-stained (``benchmarks/shift.py``,
        3 seeds), ``depth_augment=0.9, feature_jitter=0.1`` raise image->expression Recall@10
        from 0.199 to 0.309 and leave prediction as it was (r 0.190 vs 0.189).
    feature_jitter
        Training augmentation for stain and scanner shifts left after the feature scaling: every
        training batch multiplies each standardised image-feature channel by ``1 + feature_jitter * a``
        and adds ``feature_jitter * b`` (``a``, ``b`` standard normal, one draw per batch and level;
        0: off).
    accelerator, devices, precision
        Lightning options, for training and the image features alike; ``"auto"`` uses CUDA when
        present. Asking for a GPU that torch does not see (or more than it sees) fails at once,
        before any work. Precision defaults to ``"bf16-mixed"`` on GPU and ``"32-true"`` on CPU.
    seed
        Random seed (default ``sigmma_sc.settings.seed``).
    feature_method, stain_normalize
        Passed to :func:`sigmma_sc.pp.image_features`.
    feature_norm
        ``"section"`` (default): z-score the image features of every section with that section's
        own statistics, in training and on every slide embedded later, so the model does not
        lean on a slide's stain and scanner (her2st leave-one-section-out, 5 epochs: mean r of
        the top-50 HVGs 0.364 -> 0.403 on C2, 0.422 -> 0.445 on C5). Sections with fewer than
        30 nodes at a level use the training statistics. ``"global"``: the training statistics
        everywhere (for queries that are small parts of a tissue).
    hierarchy_kwargs
        Passed to :func:`sigmma_sc.pp.build_hierarchy` when the table has no hierarchy, e.g.
        ``{"connectivity_key": "spatial"}`` to build it on a squidpy graph already in the table.
    checkpoint_dir
        Keep Lightning checkpoints here. Default: a folder of :attr:`sigmma_sc.settings.cachedir`
        named after the data, the genes and the parameters, removed after a successful run and
        kept after an interrupt (for ``resume=True``).
    resume
        Continue an interrupted run (Ctrl+C, a crash, a time limit): ``True`` from the newest
        ``last.ckpt`` of ``checkpoint_dir`` (default: the interrupted run's own folder, found
        from the same data and arguments), or the path of a checkpoint. Pass the other arguments
        of the interrupted run; on CPU the result equals an uninterrupted run's bit for bit.
    trainer_kwargs
        Extra options of the Lightning ``Trainer``: ``callbacks`` run after the package's own, a
        ``logger`` (e.g. ``lightning.pytorch.loggers.CSVLogger("logs")``) replaces the default
        none, any other ``Trainer`` argument (``max_time``, ``limit_train_batches``,
        ``gradient_clip_val``, ``profiler``, ...) is passed on. Refused: the options the package
        sets from its own keywords (``max_epochs``, ``accelerator``, ``devices``, ``num_nodes``,
        ``strategy``, ``precision``, ``default_root_dir``, ``enable_checkpointing``,
        ``deterministic``, ``enable_progress_bar``), each error naming the keyword to use.

    Returns
    -------
    The trained :class:`~sigmma_sc.Sigmma` (with ``copy=True``: ``(model, sdata_copy)``). The
    table gets ``obsm["X_sigmma"]`` (joint), ``obsm["X_sigmma_img"]``, ``obsm["X_sigmma_expr"]``,
    per-level ``obsm["X_sigmma_{level}_{img|expr}"]`` (or the ``key_added`` ones) and
    ``uns["sigmma"]["params" | "genes" | "history" | "versions" | "obsm_keys"]`` (or
    ``uns[key_added]``); the hierarchy and feature caches stay in ``uns["sigmma"]``, the unit graph
    in ``obsp`` (see :func:`sigmma_sc.pp.build_hierarchy`), nuclei in ``"{section}_nuclei"``
    shapes. Every other key of the table is kept.

    Examples
    --------
    On the five her2st sections (minutes on a CPU):

    >>> import sigmma_sc as sg
    >>> import scanpy as sc
    >>> sdata = sg.datasets.her2st()  # doctest: +SKIP
    >>> model = sg.tl.fit(sdata, max_epochs=20)  # doctest: +SKIP
    >>> sc.pp.neighbors(sdata["table"], use_rep="X_sigmma")  # doctest: +SKIP
    >>> hvg = sg.tl.fit(sdata, genes="highly_variable")  # doctest: +SKIP

    The last line needs ``sc.pp.highly_variable_genes`` first. A run stopped by Ctrl+C (the table
    is then as before) continues with the same call plus ``resume=True``; on CPU the embeddings
    equal an uninterrupted run's bit for bit (same ``seed``, same data, same
    ``torch.get_num_threads()``). Quick runs on ``train``, 200
    synthetic cells whose hierarchy and image features are already cached in the table (see
    :class:`sigmma_sc.Sigmma`); one epoch and small layers only to keep the examples short:

    >>> kw = dict(max_epochs=1, embed_dim=16, hidden_dim=32, seed=0)
    >>> model, fitted = sg.tl.fit(train, copy=True, **kw)  # train untouched
    >>> fitted["table"].obsm["X_sigmma"].shape  # micro | meso | macro
    (200, 48)
    >>> clip = sg.tl.fit(fitted, levels=("meso",), graph=False, key_added="X_clip", **kw)  # beside X_sigmma
    >>> fitted["table"].obsm["X_clip"].shape
    (200, 16)
    >>> some = sg.tl.fit(fitted, genes=["gene0", "gene1", "gene2"], key_added="X_3genes", **kw)
    >>> some.genes
    ['gene0', 'gene1', 'gene2']
    """
    table = get_table(sdata, table_key)
    keys = _output_keys(key_added, levels)
    _refuse_foreign_keys(table, keys)
    chosen = None if genes is None else select_genes(None, table.var, genes=genes)
    TrainConfig.check_gene_options(n_genes, min_detected)
    TrainConfig.check_context_weight(context_weight)
    extra = TrainConfig.check_trainer_kwargs(trainer_kwargs)
    # Validate first: the data (units, images, counts) and the choices read later, before any hierarchy,
    # feature or training work. Genes without counts are allowed (never modelled unless asked for).
    validate(
        sdata,
        table_key=table_key,
        require_counts=True,
        allow_empty_genes=True,
        require_image=not getattr(encoder, "precomputed", False),
        min_units=2,
    )
    for name, value, allowed in (
        ("feature_norm", feature_norm, Choices.FEATURE_NORMS),
        ("feature_method", feature_method, Choices.FEATURE_METHODS),
        ("stain_normalize", stain_normalize, (None, *Choices.STAIN_METHODS)),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    if batch_key is not None and batch_key != Keys.SECTION and batch_key not in table.obs:
        raise KeyError(
            f"batch_key={batch_key!r} is not an obs column of table {table_key!r}; pass an existing column, "
            f"{Keys.SECTION!r} (the default) or None."
        )
    config = TrainConfig(
        levels=tuple(levels),
        graph=bool(graph),
        embed_dim=int(embed_dim),
        hidden_dim=int(hidden_dim),
        intra_layers=int(intra_layers),
        inter_layers=int(inter_layers),
        heads=int(heads),
        dropout=float(dropout),
        depth_augment=float(depth_augment),
        feature_jitter=float(feature_jitter),
        lr=float(lr),
        weight_decay=float(weight_decay),
        batch_size=int(batch_size),
        max_cells=None if max_cells is None else int(max_cells),
        max_context_cells=max_context_cells
        if max_context_cells is None or isinstance(max_context_cells, str)
        else int(max_context_cells),
        max_epochs=int(max_epochs),
        patience=int(patience),
        val_fraction=float(val_fraction),
        consistency_weight=float(consistency_weight),
        coarse_targets=coarse_targets,
        batch_key=batch_key,
        level_weights=level_weights,
        seed=int(settings.seed if seed is None else seed),
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    device = torch_device(accelerator, devices)  # an absent GPU fails here, before any work
    work = light_copy(sdata, table_key=table_key)
    _, hier = pp.ensure_hierarchy(work, table_key=table_key, require_image=False, **(hierarchy_kwargs or {}))
    with timed("image features"):
        pp.image_features(
            work,
            table_key=table_key,
            encoder=encoder,
            method=feature_method,
            levels=[lv for lv in config.levels if lv in hier.levels],
            stain_normalize=stain_normalize,
            device=device,
        )
    with timed("training and embedding"):
        model, emb = Sigmma.train(
            work,
            table_key=table_key,
            config=config,
            encoder=encoder,
            n_genes=int(n_genes),
            min_detected=None if min_detected is None else float(min_detected),
            genes=chosen,
            feature_method=feature_method,
            stain_normalize=stain_normalize,
            hierarchy_kwargs=hierarchy_kwargs,
            context_weight=context_weight,
            feature_norm=feature_norm,
            trainer_kwargs=extra,
        )
    obsm = {keys["joint"]: emb["joint"], keys["img"]: emb["img"], keys["expr"]: emb["expr"]}
    for lv in model.levels:
        for mod in ("img", "expr"):
            obsm[keys[f"{lv}_{mod}"]] = emb.get(f"{lv}_{mod}")
    obsm = {k: np.asarray(v, dtype=np.float32) for k, v in obsm.items() if v is not None}
    # Everything is computed; now the writes, into sdata or its copy.
    target = _copy_sdata(sdata) if copy else sdata
    pp.write_back(work, target, table_key=table_key, before=sdata)
    _write_fit(get_table(target, table_key), keys["uns"], obsm, model.to_uns())
    _write_scanpy_spatial(target, table_key)
    logger.info(
        f"wrote obsm[{keys['joint']!r}] ({emb['joint'].shape[1]}-d) and per-level embeddings to table {table_key!r}"
        + (" of the copy" if copy else "")
    )
    return (model, target) if copy else model


# ---------------------------------------------------------------------------------------------
# keys, the working copy and the final writes
# ---------------------------------------------------------------------------------------------
def _output_keys(key_added: str, levels: Sequence[str]) -> dict[str, str]:
    # obsm keys of one fit, and its uns entry ("sigmma" for the default key, as scanpy's "pca").
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    keys = {"joint": key_added, "img": f"{key_added}_img", "expr": f"{key_added}_expr"}
    for lv in levels:
        for mod in ("img", "expr"):
            keys[f"{lv}_{mod}"] = f"{key_added}_{lv}_{mod}"
    keys["uns"] = Keys.UNS if key_added == Keys.X_SIGMMA else key_added
    return keys


def _claimed(table: AnnData, uns_key: str) -> set[str]:
    # obsm keys a fit recorded under uns[uns_key]; fits from before the record claimed the X_sigmma keys.
    entry = table.uns.get(uns_key)
    if not isinstance(entry, dict):
        return set()
    if OBSM_KEYS in entry:
        return {str(k) for k in np.asarray(entry[OBSM_KEYS], dtype=object).ravel()}
    if uns_key == Keys.UNS and Keys.PARAMS in entry:
        return {k for k in table.obsm if k == Keys.X_SIGMMA or k.startswith(f"{Keys.X_SIGMMA}_")}
    return set()


def _refuse_foreign_keys(table: AnnData, keys: dict[str, str]) -> None:
    uns_key = keys["uns"]
    if uns_key != Keys.UNS and uns_key in table.uns and not _claimed(table, uns_key):
        raise ValueError(
            f"uns[{uns_key!r}] exists and was not written by sigmma-sc; it is left alone. Pass another key_added= "
            f"(the fit's uns entry is named after it)."
        )
    owned = _claimed(table, uns_key)
    foreign = [k for name, k in keys.items() if name != "uns" and k in table.obsm and k not in owned]
    if foreign:
        raise ValueError(
            f"obsm[{foreign[0]!r}] exists and was not written by sigmma-sc; it is left alone. Pass another "
            f"key_added= (e.g. key_added={keys['joint'] + '_2'!r}) to write the embeddings beside it."
        )


def _copy_sdata(sdata: SpatialData) -> SpatialData:
    # copy=True: tables, shapes and attrs copied; images, labels, points (lazy, never modified) shared.
    import copy

    from spatialdata import SpatialData

    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes={k: v.copy() for k, v in sdata.shapes.items()},
        tables={k: v.copy() for k, v in sdata.tables.items()},
        attrs=copy.deepcopy(dict(sdata.attrs)),
    )


def _write_fit(table: AnnData, uns_key: str, obsm: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    # The embeddings and the fit's uns entry. A refit under the same key replaces the earlier fit whole:
    # the earlier fit's obsm keys this one does not write (levels it dropped) go, so no stale embedding
    # stays beside the new ones; keys another entry claims, or the user's, are never touched.
    others = set().union(*(_claimed(table, k) for k in table.uns if k != uns_key and isinstance(table.uns[k], dict)))
    stale = sorted((_claimed(table, uns_key) - set(obsm) - others) & set(table.obsm))
    for key in stale:
        del table.obsm[key]
    if stale:
        logger.info(f"removed obsm {stale}: written by the earlier fit under {uns_key!r}, not by this one")
    for key, value in obsm.items():
        table.obsm[key] = value
    entry = table.uns.setdefault(uns_key, {})
    entry.update(record)
    entry[OBSM_KEYS] = np.asarray(sorted(obsm), dtype=object)


# scanpy's uns["spatial"][library_id] layout, read by sc.pl.spatial and squidpy's plots.
SCANPY_HIRES = "hires"
SCANPY_HIRES_PX = 2000  # scanpy's "hires" images are about this wide: the pyramid level nearest it


def _write_scanpy_spatial(sdata: SpatialData, table_key: str) -> None:
    """``uns["spatial"][section]`` so ``sc.pl.spatial(adata, library_id=section)`` draws the units over the H&E.

    scanpy multiplies ``obsm["spatial"]`` (microns here) by ``tissue_hires_scalef`` to place units on the
    "hires" image, so the factor is hires pixels per micron and ``spot_diameter_fullres`` is in microns
    (in ``obsm["spatial"]``'s units in general: the factor is fitted to them). Written only when the table
    has no ``uns["spatial"]`` or only the package's own (``metadata["written_by"]``); a section whose image
    is rotated or mirrored against ``obsm["spatial"]`` is left out (logged).
    """
    table = get_table(sdata, table_key)
    old = table.uns.get(Keys.SPATIAL)
    ours = isinstance(old, dict) and all(
        isinstance(v, dict) and dict(v.get("metadata") or {}).get(Keys.WRITTEN_BY) == "sigmma_sc" for v in old.values()
    )
    if (old is not None and not ours) or Keys.SPATIAL not in table.obsm:
        logger.info("uns['spatial'] is not the package's (or obsm['spatial'] is missing): left as it is")
        return
    slide = validate(sdata, table_key=table_key, require_image=False)
    xy = np.asarray(table.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    out = dict(old or {})
    for code, section in enumerate(slide.sections):
        img = slide.images.get(section)
        rows = slide.unit_section == code
        if img is None or not rows.any():
            continue
        level = int(np.argmin([abs(max(img.level_shape(lv)) - SCANPY_HIRES_PX) for lv in range(img.n_levels)]))
        px = img.um_to_px(slide.xy_um[rows], level=level) - 0.5  # pixel index: imshow puts pixel centres at integers
        if np.allclose(xy[rows], slide.xy_um[rows]):
            scalef = 1.0 / img.level_um_per_px(level)  # the package's microns
        else:  # other units (e.g. pixels of a spatialdata_io table): the scale that fits them
            scalef = float((xy[rows] * px).sum() / max(float((xy[rows] ** 2).sum()), 1e-300))
        if not np.allclose(scalef * xy[rows], px, atol=2.0):
            logger.info(f"uns['spatial']: section {section!r} left out (its image is not a scale of obsm['spatial'])")
            continue
        h, w = img.level_shape(level)
        out[section] = {
            "images": {SCANPY_HIRES: np.array(img.read(0, h, 0, w, level=level))},
            "scalefactors": {
                f"tissue_{SCANPY_HIRES}_scalef": float(scalef),
                "spot_diameter_fullres": float(slide.unit_diameter_um / (img.level_um_per_px(level) * scalef)),
            },
            "metadata": {Keys.WRITTEN_BY: "sigmma_sc"},
        }
    if out:
        table.uns[Keys.SPATIAL] = out
