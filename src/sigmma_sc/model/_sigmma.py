"""The :class:`Sigmma` model: a thin stateful object over the array-level training and embedding."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sigmma_sc._constants import Defaults, Keys, Levels
from sigmma_sc._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._core import TrainConfig
    from ._data import ExpressionSource, LevelInput

_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "weights.pt"
_GENES_FILE = "genes.txt"
_STATS_FILE = "stats.npz"
_REFERENCE_FILE = "reference.h5ad"
_HISTORY_FILE = "history.csv"
_FORMAT_VERSION = 1
#: Fewer modelled genes than this leave the expression encoders little to align: warn and name the fix.
FEW_GENES = 50


# ---------------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------------
def feature_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and floored std of training features (:func:`sigmma_sc.pp._features.feature_scaling`), as saved.

    Examples
    --------
    >>> import numpy as np
    >>> mu, sd = feature_stats(np.array([[0.0, 1.0], [2.0, 1.0]]))
    >>> mu.round(3).tolist(), bool(sd[1] > 0)
    ([1.0, 1.0], True)
    """
    from sigmma_sc.pp._features import feature_scaling

    mu, sd = feature_scaling(train)
    return mu.astype(np.float32), sd.astype(np.float32)


def apply_feature_stats(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Standardise and clip features with a model's saved statistics."""
    from sigmma_sc.pp._features import apply_feature_scaling

    _check_channels(x, stats)
    return apply_feature_scaling(x, *stats)


def _check_channels(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> None:
    """Refuse features from another encoder than the model's (a channel-count mismatch)."""
    if x.shape[1] != stats[0].shape[0]:
        raise ValueError(
            f"image features have {x.shape[1]} channels but the model was trained on {stats[0].shape[0]}: "
            "the encoder differs from the model's."
        )


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _uns_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Make a dict anndata can write: ``None`` dropped, tuples as arrays, nested dicts kept."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = _uns_safe(v)
        elif isinstance(v, tuple | list):
            v = np.asarray([str(x) for x in v], dtype=object) if v and isinstance(v[0], str) else np.asarray(v)
        out[k] = v
    return out


def versions() -> dict[str, str]:
    """Versions of sigmma-sc and the libraries that shape its results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sigmma-sc", "torch", "lightning", "torch-geometric", "anndata", "spatialdata"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            continue
    return out


def default_context_weight(unit_level: str) -> float:
    """Weight of the coarser levels' blocks in the unit embedding.

    Spot data (units = meso): 1, every spot has its own region. Cell data (units = micro): 0, since
    all cells of a niche share its meso / macro embedding exactly, and a full-weight concatenation
    makes Leiden cluster the niche tiles instead of the tissue (synthetic tissue, 3,000 cells:
    niche ARI 0.10 at weight 1, 0.41 at 0.25, 0.62 at 0). The cell block itself carries the context
    (intra-subgraph GNN, consistency with its niche) and the per-level embeddings keep their keys.

    Examples
    --------
    >>> default_context_weight("micro"), default_context_weight("meso")
    (0.0, 1.0)
    """
    return 0.0 if unit_level == Levels.MICRO else 1.0


def has_expression_matrix(table: AnnData) -> bool:
    """Whether a table carries any expression (H&E-only tables have no genes or no ``X``)."""
    return table.n_vars > 0 and (table.X is not None or Keys.COUNTS_LAYER in table.layers)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
class Sigmma:
    """A trained SIGMMA model: hierarchical H&E / expression encoders aligned by contrastive learning.

    Build one with :func:`sigmma_sc.tl.fit` (or :meth:`load`); it embeds any slide with
    :meth:`get_embeddings`, also slides with H&E only.

    Attributes
    ----------
    genes
        Expression genes, in model order.
    levels
        Hierarchy levels the model embeds, fine to coarse.
    encoder
        Id of the frozen image encoder of the features.
    feature_key
        Feature cache key of the training slide.
    history
        One row per epoch (epoch 0: at initialisation): train / val loss per level, temperatures.
    reference
        Training units: ``X`` = log1p-normalised expression of :attr:`genes`, ``obs["section"]``,
        ``obsm["X_sigmma_img"]``, ``obsm["X_sigmma_expr"]``, ``obsm["X_sigmma"]``.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()
    >>> model = sg.tl.fit(sdata, max_epochs=10)
    >>> emb = model.get_embeddings(sdata)
    >>> emb["joint"].shape
    >>> model.save("model/")
    >>> model = sg.Sigmma.load("model/")
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        module: Any,
        genes: list[str],
        feature_stats: dict[str, tuple[np.ndarray, np.ndarray]],
        expr_stats: dict[str, tuple[np.ndarray, np.ndarray]],
        history: pd.DataFrame,
        reference: AnnData | None = None,
    ) -> None:
        self._config = dict(config)
        self._module = module
        self.genes = list(genes)
        self._feature_stats = feature_stats
        self._expr_stats = expr_stats
        self.history = history
        self.reference = reference

    # -- read-only properties ----------------------------------------------------------------
    @property
    def levels(self) -> tuple[str, ...]:
        """Hierarchy levels the model embeds, fine to coarse."""
        return tuple(self._config["levels"])

    @property
    def encoder(self) -> str:
        """Id of the image encoder whose features the model reads."""
        return str(self._config["encoder"])

    @property
    def feature_key(self) -> str:
        """Feature cache key of the training slide."""
        return str(self._config["feature_key"])

    @property
    def params(self) -> dict[str, Any]:
        """Every training parameter (a copy)."""
        return dict(self._config)

    @property
    def module(self) -> Any:
        """The underlying :class:`lightning.LightningModule` (image and expression encoders)."""
        return self._module

    def __repr__(self) -> str:
        n_ep = int(self.history["epoch"].max()) if len(self.history) else 0
        return (
            f"Sigmma(levels={self.levels}, graph={self._config['graph']}, genes={len(self.genes)}, "
            f"embed_dim={self._config['embed_dim']}, encoder={self.encoder!r}, epochs={n_ep})"
        )

    # -- training -----------------------------------------------------------------------------
    @classmethod
    def _train(
        cls,
        sdata: SpatialData,
        *,
        table_key: str,
        config: TrainConfig,
        encoder: str,
        n_genes: int,
        feature_method: str,
        min_detected: float = Defaults.MIN_DETECTED,
        stain_normalize: str | None,
        hierarchy_kwargs: dict[str, Any] | None,
        context_weight: float | None = None,
        feature_norm: str = Defaults.FEATURE_NORM,
    ) -> tuple[Sigmma, dict[str, np.ndarray | None]]:
        """Train on a slide; returns the model and the per-unit embeddings of its table."""
        from sigmma_sc.io import validate

        from ._core import train
        from ._data import ExpressionSource, select_genes

        if feature_norm not in Defaults.FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {Defaults.FEATURE_NORMS}, got {feature_norm!r}.")
        slide = validate(sdata, table_key=table_key)
        if not has_expression_matrix(slide.table):
            raise ValueError(f"table {table_key!r} holds no expression: training needs counts for its units.")
        base = {
            **_jsonable(asdict(config)),
            "encoder": encoder if isinstance(encoder, str) else None,
            "feature_method": feature_method,
            "stain_normalize": stain_normalize,
            "hierarchy_kwargs": dict(hierarchy_kwargs or {}),
            "n_genes_requested": int(n_genes),
            "min_detected": float(min_detected),
            "context_weight": None if context_weight is None else float(context_weight),
            "feature_norm": feature_norm,
        }
        hier, feats, key = _prepare(sdata, table_key, base, encoder=encoder)
        base["encoder"] = key.split("__")[0]
        base["feature_key"] = key
        base["unit_level"] = hier.unit_level
        base["unit_kind"] = slide.unit_kind
        base["log_normalized"] = bool(slide.log_normalized)

        matrix = _expression_matrix(slide)
        genes = select_genes(
            matrix,
            slide.table.var_names,
            n_genes=n_genes,
            log_normalized=slide.log_normalized,
            min_detected=min_detected,
        )
        if len(genes) < min(n_genes, FEW_GENES):
            logger.warning(
                f"only {len(genes)} genes are detected in >= {min_detected:.0%} of the training units (asked for "
                f"{n_genes}): sparse units such as 8 um bins need a lower min_detected, e.g. tl.fit(min_detected=0.01)."
            )
        elif len(genes) < n_genes:
            logger.info(f"{len(genes)} genes pass the detection filter (asked for {n_genes}): using them all")
        gene_idx = slide.table.var_names.get_indexer(genes)
        expression = ExpressionSource.from_counts(matrix, gene_idx, log_normalized=slide.log_normalized)

        use = tuple(lv for lv in config.levels if lv in hier.levels)
        if Levels.MICRO in config.levels and Levels.MICRO not in hier.levels:
            logger.warning("the hierarchy has no micro level (no nuclei / cells): training without it")
        f_stats = {lv: feature_stats(feats[lv]) for lv in use if lv in feats}
        levels = _level_inputs(hier, feats, f_stats, feature_norm=feature_norm)
        config.levels = use
        base["levels"] = list(use)
        module, history, expr_stats, seconds = train(levels, expression, config)
        base["fit_seconds"] = float(seconds)
        base["img_dims"] = {lv: int(m.net[0].in_features) for lv, m in module.img.mlp.items()}
        base["expr_dims"] = (
            {lv: int(m.net[0].in_features) for lv, m in module.expr.mlp.items()} if module.expr is not None else {}
        )
        base["pair_levels"] = list(module.criterion.pair_levels)
        model = cls(
            config=base,
            module=module,
            genes=genes,
            feature_stats=f_stats,
            expr_stats=expr_stats,
            history=history,
        )
        emb = model._embed(slide, hier, levels, expression)
        model.reference = _reference(slide, genes, emb)
        return model, emb

    # -- embedding ----------------------------------------------------------------------------
    def _embed(
        self, slide: Any, hier: Any, levels: dict[str, LevelInput], expression: ExpressionSource | None
    ) -> dict[str, np.ndarray | None]:
        from ._core import TrainConfig, embed_nodes, make_batcher, unit_embeddings

        cfg = TrainConfig(**{f.name: self._config[f.name] for f in fields(TrainConfig) if f.name in self._config})
        cfg.levels = tuple(lv for lv in cfg.levels if lv in levels)
        batcher = make_batcher(levels, cfg, expression, self._expr_stats)
        nodes = embed_nodes(self._module, batcher, batch_size=cfg.batch_size, expression=expression is not None)
        weight = self._config.get("context_weight")
        if weight is None:
            weight = default_context_weight(hier.unit_level)
        return unit_embeddings(nodes, levels, hier.unit_level, slide.n_units, context_weight=float(weight))

    def get_embeddings(
        self, sdata: SpatialData, *, table_key: str = Keys.TABLE, expression: bool | None = None
    ) -> dict[str, np.ndarray | None]:
        """Embeddings of every unit of a table, image side always, expression side when counts exist.

        The hierarchy and the image features are computed with the model's parameters when the
        table lacks them (they are cached in the table by :mod:`sigmma_sc.pp`); nothing else is
        written.

        Parameters
        ----------
        sdata
            SpatialData with the H&E and a table of units (counts optional).
        table_key
            Table of the units.
        expression
            ``None``: embed expression when the table holds all model genes, none when it holds no
            expression (H&E only), error when it holds some other gene panel. ``True``: require it.
            ``False``: image side only.

        Returns
        -------
        ``{"img", "expr", "joint", "{level}_img", "{level}_expr"}``, each ``(n_units, d)`` float32
        rows of unit norm or ``None`` (``expr`` without expression; ``joint`` = ``img`` then).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> model = sg.Sigmma.load("model/")  # doctest: +SKIP
        >>> emb = model.get_embeddings(sg.datasets.her2st(sections=["C2"]))  # doctest: +SKIP
        >>> emb["img"].shape  # doctest: +SKIP
        """
        from sigmma_sc.io import validate

        from ._data import ExpressionSource

        slide = validate(sdata, table_key=table_key)
        use_expr = self._check_genes(slide.table, table_key, expression)
        hier, feats, key = _prepare(sdata, table_key, self._config, encoder=self.encoder)
        if key.split("__")[1:] != self.feature_key.split("__")[1:]:
            logger.warning(
                f"image features {key!r} differ from the training features {self.feature_key!r} "
                "(other fields of view or stain normalisation): embeddings may shift"
            )
        # Models saved before per-section scaling existed were trained on global statistics.
        levels = _level_inputs(
            hier, feats, self._feature_stats, feature_norm=self._config.get("feature_norm", "global")
        )
        source = None
        if use_expr:
            matrix = _expression_matrix(slide)
            idx = slide.table.var_names.get_indexer(self.genes)
            source = ExpressionSource.from_counts(matrix, idx, log_normalized=slide.log_normalized)
        return self._embed(slide, hier, levels, source)

    def _check_genes(self, table: AnnData, table_key: str, expression: bool | None) -> bool:
        if expression is False:
            return False
        if not has_expression_matrix(table):
            if expression:
                raise ValueError(f"table {table_key!r} holds no expression; pass expression=False for H&E only.")
            return False
        missing = [g for g in self.genes if g not in table.var_names]
        if missing:
            raise ValueError(
                f"table {table_key!r} lacks {len(missing)} of the model's {len(self.genes)} genes "
                f"(e.g. {missing[:5]}): the gene panel does not match the model. Pass expression=False to "
                "embed the H&E only, or train a model on this panel."
            )
        return True

    # -- persistence --------------------------------------------------------------------------
    def save(self, dir: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write weights, configuration, genes, encoder id, standardisation and reference to a folder.

        Parameters
        ----------
        dir
            Folder (created when missing).
        overwrite
            Replace an existing saved model in ``dir``.

        Examples
        --------
        >>> model.save("model/")  # doctest: +SKIP
        """
        import torch

        path = Path(dir)
        if (path / _CONFIG_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True to replace it.")
        path.mkdir(parents=True, exist_ok=True)
        config = {**self._config, "format_version": _FORMAT_VERSION, "versions": versions()}
        (path / _CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        (path / _GENES_FILE).write_text("\n".join(self.genes) + "\n")
        torch.save(self._module.state_dict(), path / _WEIGHTS_FILE)
        arrays = {}
        for kind, stats in (("feature", self._feature_stats), ("expr", self._expr_stats)):
            for lv, (a, b) in stats.items():
                arrays[f"{kind}_{lv}_mean"] = a
                arrays[f"{kind}_{lv}_std"] = b
        np.savez(path / _STATS_FILE, **arrays)
        self.history.to_csv(path / _HISTORY_FILE, index=False)
        if self.reference is not None:
            self.reference.write_h5ad(path / _REFERENCE_FILE)

    @classmethod
    def load(cls, dir: str | os.PathLike, *, sdata: SpatialData | None = None, table_key: str = Keys.TABLE) -> Sigmma:
        """Read a model written by :meth:`save`.

        Parameters
        ----------
        dir
            Folder written by :meth:`save`.
        sdata
            Optional target slide: loading refuses it when its table holds expression without the
            model's genes.
        table_key
            Table of ``sdata``.

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> model = sg.Sigmma.load("model/")  # doctest: +SKIP
        """
        import anndata as ad
        import torch

        from sigmma_sc.pp._encoders import available_encoders

        from ._core import TrainConfig, build_module

        path = Path(dir)
        if not (path / _CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path} holds no saved Sigmma model ({_CONFIG_FILE} missing).")
        config = json.loads((path / _CONFIG_FILE).read_text())
        if config.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(f"{path} was saved by a newer sigmma-sc (format {config['format_version']}); upgrade.")
        encoder = config["encoder"]
        known = available_encoders()
        if encoder != "precomputed" and encoder not in known:
            raise ValueError(
                f"the model's image encoder {encoder!r} is not available here (known: {known}); register it with "
                "sigmma_sc.pp.register_encoder before loading."
            )
        genes = [g for g in (path / _GENES_FILE).read_text().splitlines() if g]
        stats = np.load(path / _STATS_FILE)
        f_stats, e_stats = {}, {}
        for kind, target in (("feature", f_stats), ("expr", e_stats)):
            for lv in Levels.ALL:
                if f"{kind}_{lv}_mean" in stats:
                    target[lv] = (stats[f"{kind}_{lv}_mean"], stats[f"{kind}_{lv}_std"])
        cfg = TrainConfig(**{f.name: config[f.name] for f in fields(TrainConfig) if f.name in config})
        module = build_module(config["img_dims"], config["expr_dims"], tuple(config["pair_levels"]), cfg)
        module.load_state_dict(torch.load(path / _WEIGHTS_FILE, map_location="cpu", weights_only=True))
        module.eval()
        history = pd.read_csv(path / _HISTORY_FILE)
        reference = ad.read_h5ad(path / _REFERENCE_FILE) if (path / _REFERENCE_FILE).exists() else None
        config.pop("versions", None)
        config.pop("format_version", None)
        model = cls(
            config=config,
            module=module,
            genes=genes,
            feature_stats=f_stats,
            expr_stats=e_stats,
            history=history,
            reference=reference,
        )
        if sdata is not None:
            if table_key not in sdata.tables:
                raise KeyError(f"table {table_key!r} not in sdata.tables (has {sorted(sdata.tables)}).")
            model._check_genes(sdata.tables[table_key], table_key, None)
        return model


# ---------------------------------------------------------------------------------------------
# SpatialData plumbing
# ---------------------------------------------------------------------------------------------
def _prepare(
    sdata: SpatialData, table_key: str, config: dict[str, Any], *, encoder: Any
) -> tuple[Any, dict[str, np.ndarray], str]:
    """Hierarchy and raw image features of a slide, computed with ``config``'s parameters when missing."""
    from sigmma_sc import pp
    from sigmma_sc.pp._features import get_features, image_features

    wanted = tuple(config["levels"])
    try:
        hier = pp.get_hierarchy(sdata, table_key=table_key)
    except KeyError:
        hier = None
    if hier is None:
        hier = pp.build_hierarchy(sdata, table_key=table_key, **config.get("hierarchy_kwargs", {}))
    use = [lv for lv in wanted if lv in hier.levels]
    key = image_features(
        sdata,
        table_key=table_key,
        encoder=encoder,
        method=config.get("feature_method", "auto"),
        levels=use,
        stain_normalize=config.get("stain_normalize"),
    )
    feats = get_features(sdata, key=key, table_key=table_key)
    return hier, {lv: feats[lv] for lv in use if lv in feats}, key


def _level_inputs(
    hier: Any,
    feats: dict[str, np.ndarray],
    stats: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    feature_norm: str = Defaults.FEATURE_NORM,
) -> dict[str, LevelInput]:
    """Model inputs from a :class:`~sigmma_sc.pp.Hierarchy` and raw features (standardised here).

    ``feature_norm="section"`` z-scores each section's features with its own statistics (the
    training statistics for sections under ``Defaults.FEATURE_NORM_MIN_NODES`` nodes);
    ``"global"`` uses the training statistics everywhere.
    """
    from sigmma_sc.pp._features import apply_section_scaling

    from ._data import LevelInput

    out = {}
    for name, lv in hier.levels.items():
        f = None
        if name in feats and name in stats:
            if feature_norm == "section":
                _check_channels(feats[name], stats[name])
                f, small = apply_section_scaling(feats[name], lv.section, stats[name])
                if small:
                    names = [hier.sections[c] for c in small]
                    logger.warning(
                        f"sections {names} have fewer than {Defaults.FEATURE_NORM_MIN_NODES} {name} nodes: their "
                        "image features are standardised with the training statistics, not their own"
                    )
            else:
                f = apply_feature_stats(feats[name], stats[name])
        out[name] = LevelInput(
            name=name,
            n=lv.n_nodes,
            edges=lv.edges,
            parent=lv.parent,
            features=f,
            members=lv.members,
        )
    return out


def _expression_matrix(slide: Any) -> sp.csr_matrix:
    """Raw counts, or the log1p-normalised ``X`` of tables flagged ``log_normalized``."""
    if slide.log_normalized:
        return sp.csr_matrix(slide.table.X, dtype=np.float32)
    return slide.counts()


def _reference(slide: Any, genes: list[str], emb: dict[str, np.ndarray | None]) -> AnnData:
    import anndata as ad

    obs = pd.DataFrame(index=pd.Index(slide.table.obs_names.astype(str)))
    obs[Keys.SECTION] = pd.Categorical(np.asarray(slide.sections, dtype=object)[slide.unit_section])
    ref = ad.AnnData(
        X=slide.expression(genes).astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    ref.obsm[Keys.SPATIAL] = np.asarray(slide.xy_um, dtype=np.float64)
    ref.obsm[Keys.X_SIGMMA_IMG] = emb["img"]
    ref.obsm[Keys.X_SIGMMA_EXPR] = emb["expr"]
    ref.obsm[Keys.X_SIGMMA] = emb["joint"]
    return ref
