"""``tl.fit``: train SIGMMA on a slide and write its embeddings into the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sigmma_sc._constants import Defaults, Keys, Levels
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings
from sigmma_sc.model import Sigmma, TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def fit(
    sdata: SpatialData,
    *,
    table_key: str = Keys.TABLE,
    levels: Sequence[str] = Levels.ALL,
    graph: bool = True,
    encoder: Any = Defaults.ENCODER,
    n_genes: int = Defaults.N_GENES,
    min_detected: float = Defaults.MIN_DETECTED,
    embed_dim: int = Defaults.EMBED_DIM,
    hidden_dim: int = Defaults.HIDDEN_DIM,
    max_epochs: int = Defaults.MAX_EPOCHS,
    batch_size: int = Defaults.BATCH_SIZE,
    max_cells: int | None = Defaults.MAX_CELLS,
    lr: float = Defaults.LR,
    weight_decay: float = Defaults.WEIGHT_DECAY,
    patience: int = Defaults.PATIENCE,
    val_fraction: float = Defaults.VAL_FRACTION,
    coarse_targets: str = Defaults.COARSE_TARGETS,
    consistency_weight: float = Defaults.CONSISTENCY_WEIGHT,
    context_weight: float | None = None,
    level_weights: dict[str, float] | None = None,
    intra_layers: int = Defaults.INTRA_LAYERS,
    inter_layers: int = Defaults.INTER_LAYERS,
    heads: int = Defaults.HEADS,
    dropout: float = Defaults.DROPOUT,
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
) -> Sigmma:
    """Train SIGMMA (multi-scale graph contrastive alignment of H&E and expression) on a slide.

    Runs what is missing of :func:`sigmma_sc.pp.build_hierarchy` and
    :func:`sigmma_sc.pp.image_features` (cached in the table), selects the genes, trains the
    image and expression encoders with PyTorch Lightning, then writes the embeddings of every unit.

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
        Fraction of training units in which a gene must be non-zero to be modelled. 10% suits spots
        and cells; sparse units such as Visium HD 8 µm bins leave few genes at 10% (17 on the
        kidney), and ``0.01`` gives the expression encoders hundreds (453), which raised the
        kidney's prediction r from 0.13 to 0.16 (``benchmarks/README.md``).
    embed_dim, hidden_dim
        Embedding size of every level, and width of the per-level MLPs.
    max_epochs, batch_size, lr, weight_decay, patience, val_fraction
        Optimisation.
    max_cells
        Training only: a random bag of at most this many cells (nuclei) per subgraph in each batch,
        redrawn every epoch (``None``: all). Embedding always uses every cell.
    coarse_targets
        Macro regions of neighbouring subgraphs overlap almost entirely, so plain InfoNCE treats
        near-duplicates as negatives. ``"soft"``: BLEEP-style soft targets from within-modality
        similarity; ``"disjoint"``: only a non-overlapping subset of each batch's regions enters
        the macro loss; ``"soft+disjoint"`` (default): both; ``"hard"``: plain InfoNCE. Measured on
        her2st (leave one section out over C2-C6, 10 epochs; mean Pearson r of the top-50 HVG
        predicted by kNN-weighted reference expression / image->expression Recall@5 on the
        held-out section, chance 0.027): hard 0.427 / 0.271, soft 0.434 / 0.292, disjoint
        0.438 / 0.297, soft+disjoint 0.445 / 0.289; single-scale baseline 0.352 / 0.109.
    consistency_weight
        Weight of the cross-scale term tying each node's embedding to its parent's.
    context_weight
        Weight of the coarser levels' blocks in the unit embeddings ``X_sigmma*`` (the unit's own
        level weighs 1). Default: 1 for spot data, 0 for cell data, whose cells share their niche's
        embedding exactly (clusters would follow the niche tiles); see
        :func:`sigmma_sc.model.default_context_weight`.
    level_weights
        Weight of each level's InfoNCE (default 1 each).
    intra_layers, inter_layers, heads, dropout
        GNN depth (cells inside a subgraph, subgraph graph), attention heads, dropout.
    accelerator, devices, precision
        Lightning options; ``"auto"`` uses CUDA when present. Precision defaults to
        ``"bf16-mixed"`` on GPU and ``"32-true"`` on CPU.
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
        Passed to :func:`sigmma_sc.pp.build_hierarchy` when the table has no hierarchy.
    checkpoint_dir
        Keep Lightning checkpoints here (default: a temporary folder, removed after training).
    resume
        Continue an interrupted run (Ctrl+C, a crash, a time limit): ``True`` from the newest
        ``last.ckpt`` of ``checkpoint_dir``, or the path of a checkpoint. Pass the other arguments
        of the interrupted run; on CPU the result equals an uninterrupted run's.

    Returns
    -------
    The trained :class:`~sigmma_sc.Sigmma`. The table gets ``obsm["X_sigmma"]`` (joint),
    ``obsm["X_sigmma_img"]``, ``obsm["X_sigmma_expr"]``, per-level
    ``obsm["X_sigmma_{level}_{img|expr}"]`` and ``uns["sigmma"]["params" | "genes" | "history" |
    "versions"]``; the hierarchy and feature caches stay in ``uns["sigmma"]``. Every other key of
    the table is kept.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> import scanpy as sc
    >>> sdata = sg.datasets.her2st()
    >>> model = sg.tl.fit(sdata, max_epochs=20)
    >>> adata = sdata["table"]
    >>> sc.pp.neighbors(adata, use_rep="X_sigmma")
    >>> clip = sg.tl.fit(sdata, levels=("meso",), graph=False)  # single-scale baseline
    """
    config = TrainConfig(
        levels=tuple(levels),
        graph=bool(graph),
        embed_dim=int(embed_dim),
        hidden_dim=int(hidden_dim),
        intra_layers=int(intra_layers),
        inter_layers=int(inter_layers),
        heads=int(heads),
        dropout=float(dropout),
        lr=float(lr),
        weight_decay=float(weight_decay),
        batch_size=int(batch_size),
        max_cells=None if max_cells is None else int(max_cells),
        max_epochs=int(max_epochs),
        patience=int(patience),
        val_fraction=float(val_fraction),
        consistency_weight=float(consistency_weight),
        coarse_targets=coarse_targets,
        level_weights=level_weights,
        seed=int(settings.seed if seed is None else seed),
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    model, emb = Sigmma.train(
        sdata,
        table_key=table_key,
        config=config,
        encoder=encoder,
        n_genes=int(n_genes),
        min_detected=float(min_detected),
        feature_method=feature_method,
        stain_normalize=stain_normalize,
        hierarchy_kwargs=hierarchy_kwargs,
        context_weight=context_weight,
        feature_norm=feature_norm,
    )
    # Everything is computed; now the writes.
    table = sdata.tables[table_key]
    obsm = {Keys.X_SIGMMA: emb["joint"], Keys.X_SIGMMA_IMG: emb["img"], Keys.X_SIGMMA_EXPR: emb["expr"]}
    for lv in model.levels:
        for mod in ("img", "expr"):
            obsm[Keys.level_embedding(lv, mod)] = emb.get(f"{lv}_{mod}")
    for k, v in obsm.items():
        if v is not None:
            table.obsm[k] = np.asarray(v, dtype=np.float32)
    table.uns.setdefault(Keys.UNS, {}).update(model.to_uns())
    logger.info(
        f"wrote obsm[{Keys.X_SIGMMA!r}] ({emb['joint'].shape[1]}-d) and per-level embeddings to table {table_key!r}"
    )
    return model
