"""The :class:`Sigmma` model: a thin stateful object over the array-level training and embedding."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sigmma_sc import io
from sigmma_sc._constants import Choices, Defaults, Keys, Levels
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings
from sigmma_sc._utils import array_digest, image_digest, jsonable, sparse_digest, uns_safe, versions
from sigmma_sc.pp import FeatureKey, available_encoders, get_encoder

from ._config import TrainConfig
from ._data import ExpressionSource, LevelInput, node_batches, unit_batch_codes
from ._inputs import (
    build_reference,
    default_min_detected,
    expression_matrix,
    feature_stats,
    has_expression_matrix,
    level_inputs,
    model_genes,
    slide_features,
)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "weights.pt"
_GENES_FILE = "genes.txt"
_STATS_FILE = "stats.npz"
_REFERENCE_FILE = "reference.h5ad"
_HISTORY_FILE = "history.csv"
#: Saved-model format. 1: no checksums (sigmma-sc <= 0.1.0 before the reliability work); 2: the
#: config records ``files``, the sha256 and size of every other file, and the folder is written
#: atomically. :meth:`Sigmma.load` reads both.
_FORMAT_VERSION = 2
#: Config key of the per-file records (``{name: {"sha256": hex, "bytes": size}}``), format >= 2.
_FILES_KEY = "files"
#: Files every saved model has (the reference is optional).
_REQUIRED_FILES = (_WEIGHTS_FILE, _GENES_FILE, _STATS_FILE, _HISTORY_FILE)
_MODEL_FILES = (_CONFIG_FILE, *_REQUIRED_FILES, _REFERENCE_FILE)
#: Config fields :meth:`Sigmma.load` needs to rebuild the module.
_REQUIRED_FIELDS = ("levels", "encoder", "img_dims", "expr_dims", "pair_levels")
#: Sibling folders of a model folder during :meth:`Sigmma.save`: the new model being written, and
#: the previous one moved aside for the instant of the swap.
_SAVING_TAG = ".saving-"
_REPLACED_TAG = ".replaced-"
_REWRITE_HINT = "copy the whole model folder again from where it came from, or save the model again"


# ---------------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------------
def default_context_weight(unit_level: str, technology: str | None = None) -> float:
    """Weight of the coarser levels' blocks in the unit embedding.

    Spot data (units = meso): 1, every spot has its own region. Cell data (units = micro): 0, since
    all cells of a niche share its meso / macro embedding exactly, and a full-weight concatenation
    makes Leiden cluster the niche tiles instead of the tissue (synthetic tissue, 3,000 cells:
    niche ARI 0.10 at weight 1, 0.41 at 0.25, 0.62 at 0). The cell block itself carries the context
    (intra-subgraph GNN, consistency with its niche) and the per-level embeddings keep their keys.
    Visium HD bins (``technology="visium_hd"``, units = micro):
    :attr:`~sigmma_sc._constants.Defaults.CONTEXT_WEIGHT_BINS`, since a bin is a square of tissue
    whose own expression is sparse and its niche carries most of the signal (kidney, one block:
    image->expression Recall@10 4.0% at 0, 14.7% at 1; prediction r 0.186 -> 0.188). Leiden of
    ``X_sigmma`` then follows the niches; ``X_sigmma_micro_img`` is the bins' own. Cells that
    :func:`sigmma_sc.pp.bins_to_cells` made are cells (technology ``"visium_hd_cells"``): 0.

    Examples
    --------
    >>> default_context_weight("micro"), default_context_weight("meso")
    (0.0, 1.0)
    >>> default_context_weight("micro", "visium_hd")
    1.0
    """
    if unit_level != Levels.MICRO:
        return 1.0
    return Defaults.CONTEXT_WEIGHT_BINS if technology in Choices.BIN_TECHNOLOGIES else 0.0


# ---------------------------------------------------------------------------------------------
# persistence helpers (atomic folder writes, checksums)
# ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}{tag}{uuid.uuid4().hex[:12]}"


def _check_save_target(path: Path, overwrite: bool) -> None:
    """Refuse targets whose replacement would lose something: a file, foreign files, a model without overwrite."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: Sigmma.save writes a folder; pass a folder path.")
    if not path.is_dir():
        return
    entries = sorted(e.name for e in path.iterdir())
    if not entries:
        return
    if _CONFIG_FILE not in entries:
        raise FileExistsError(
            f"{path} is not empty and holds no saved model ({entries[:5]}): save into a new or empty folder."
        )
    if not overwrite:
        raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True to replace it.")
    foreign = [e for e in entries if e not in _MODEL_FILES]
    if foreign:
        raise FileExistsError(
            f"{path} holds a saved model and other files ({foreign[:5]}): replacing the model folder would "
            "delete them; move them elsewhere or save into another folder."
        )


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing ``path`` is moved aside first, then removed.

    Readers see either the old folder or the new one, never a mix (between the two renames
    ``path`` is briefly absent; :meth:`Sigmma.load` then names the folder holding the old model).
    """
    if path.exists():
        old = _sibling(path, _REPLACED_TAG)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _interrupted_save_hint(path: Path) -> str:
    """Describe the leftovers of an interrupted :meth:`Sigmma.save` next to ``path`` ('' if none)."""
    if not path.parent.is_dir():
        return ""
    old = sorted(path.parent.glob(f".{path.name}{_REPLACED_TAG}*"))
    if old:
        return f" An interrupted save left the previous model in {old[-1]}: rename that folder to {path} to use it."
    partial = sorted(path.parent.glob(f".{path.name}{_SAVING_TAG}*"))
    if partial:
        return f" An interrupted save left an incomplete folder {partial[-1]} (safe to delete)."
    return ""


def _format_version(path: Path, config: dict[str, Any]) -> int:
    version = config.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"{path / _CONFIG_FILE}: format_version {version!r} is not a saved-model format (an integer >= 1); "
            f"the file was edited or is not a Sigmma config: {_REWRITE_HINT}."
        )
    if version > _FORMAT_VERSION:
        saved_by = (config.get("versions") or {}).get("sigmma_sc", "a newer version")
        here = versions().get("sigmma_sc", "installed here")
        raise ValueError(
            f"{path} was saved by sigmma-sc {saved_by} in saved-model format {version}; this sigmma-sc "
            f"({here}) reads formats up to {_FORMAT_VERSION}: upgrade it (pip install -U sigmma-sc)."
        )
    return version


def _verify_files(path: Path, config: dict[str, Any], version: int) -> list[str]:
    """Check every file of a model folder before anything is read; the names of the files to read.

    Format >= 2: every file recorded in the config exists with its size and sha256. Format 1 (no
    records): the required files exist.
    """
    if version < 2:
        missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} lacks {', '.join(missing)}: the model folder is incomplete; {_REWRITE_HINT}."
            )
        logger.info(f"{path}: saved-model format 1 has no checksums; save the model again to add them")
        return [name for name in (*_REQUIRED_FILES, _REFERENCE_FILE) if (path / name).is_file()]
    records = config.get(_FILES_KEY)
    if not isinstance(records, dict):
        raise ValueError(
            f"{path / _CONFIG_FILE} has no {_FILES_KEY!r} record (format {version} requires it): the config was "
            f"edited or replaced; {_REWRITE_HINT}."
        )
    unrecorded = [name for name in _REQUIRED_FILES if name not in records]
    if unrecorded:
        raise ValueError(
            f"{path / _CONFIG_FILE}: {_FILES_KEY!r} does not record {', '.join(unrecorded)}: the config was edited "
            f"or replaced; {_REWRITE_HINT}."
        )
    missing = [name for name in records if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {', '.join(missing)}, written by Sigmma.save: the model folder is incomplete; "
            f"{_REWRITE_HINT}."
        )
    for name, record in records.items():
        file = path / name
        size = file.stat().st_size
        expected = record.get("bytes")
        if expected is not None and size != expected:
            what = "truncated" if size < expected else "longer than written"
            raise ValueError(f"{file} is {what} ({size} bytes, {expected} written by Sigmma.save): {_REWRITE_HINT}.")
        if _sha256(file) != record.get("sha256"):
            raise ValueError(
                f"{file} is corrupted: its sha256 differs from the one recorded in {_CONFIG_FILE} when it was "
                f"saved; {_REWRITE_HINT}."
            )
    return list(records)


def _read_stats(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path / _STATS_FILE) as stats:
            return {k: np.asarray(stats[k]) for k in stats.files}
    except Exception as exc:
        raise ValueError(f"{path / _STATS_FILE} cannot be read ({exc}): {_REWRITE_HINT}.") from exc


def _check_dims(path: Path, config: dict[str, Any], genes: list[str], stats: dict[str, np.ndarray]) -> None:
    """Genes file, statistics and config agree on the dimensions of the module's inputs."""
    genes_file = path / _GENES_FILE
    if not genes:
        raise ValueError(f"{genes_file} lists no genes: {_REWRITE_HINT}.")
    dup = sorted({g for g in genes if genes.count(g) > 1}) if len(set(genes)) != len(genes) else []
    if dup:
        raise ValueError(f"{genes_file} lists genes twice ({dup[:5]}): {_REWRITE_HINT}.")
    for lv, n in dict(config["expr_dims"]).items():
        if int(n) != len(genes):
            raise ValueError(
                f"{genes_file} lists {len(genes)} genes but the {lv} expression encoder takes {n} "
                f"({_CONFIG_FILE} expr_dims[{lv!r}]): the genes file does not belong to these weights; "
                f"{_REWRITE_HINT}."
            )
    for lv, d in dict(config["img_dims"]).items():
        mean, std = stats.get(f"feature_{lv}_mean"), stats.get(f"feature_{lv}_std")
        if mean is None or std is None:
            raise ValueError(
                f"{path / _STATS_FILE} has no image-feature statistics for level {lv!r} ({_CONFIG_FILE} img_dims "
                f"lists it): {_REWRITE_HINT}."
            )
        if mean.shape[-1] != int(d) or std.shape != mean.shape:
            raise ValueError(
                f"{path / _STATS_FILE}: the image-feature statistics of level {lv!r} have {mean.shape[-1]} "
                f"channels but the image encoder takes {d} ({_CONFIG_FILE} img_dims[{lv!r}]): the statistics "
                f"do not belong to these weights; {_REWRITE_HINT}."
            )
    for key, value in stats.items():
        if key.startswith("expr_") and value.shape[-1] != len(genes):
            raise ValueError(
                f"{path / _STATS_FILE}: {key} has {value.shape[-1]} genes, {genes_file} {len(genes)}: {_REWRITE_HINT}."
            )


# ---------------------------------------------------------------------------------------------
# what a rerun needs: the data's fingerprint and the run's checkpoint folder
# ---------------------------------------------------------------------------------------------
def data_fingerprint(slide: Any, matrix: Any) -> dict[str, Any]:
    """SHA-256 fingerprints of what a fit reads: the expression matrix with unit and gene names, each section image.

    Images: a strided sample of the pyramid's coarsest level plus every level's shape and dtype
    (:func:`sigmma_sc._utils.image_digest`), so the cost does not grow with the slide.
    """
    names = array_digest(np.asarray(slide.table.obs_names, dtype=str), np.asarray(slide.table.var_names, dtype=str))
    images = {}
    for section, image in slide.images.items():
        pyramid = [image.level_array(lv) for lv in range(image.n_levels)]
        images[section] = image_digest(pyramid, samples=Defaults.FINGERPRINT_SAMPLES)
    return {
        "counts": sparse_digest(matrix),
        "names": names,
        "images": images,
        "n_units": int(slide.table.n_obs),
        "n_genes": int(slide.table.n_vars),
    }


#: Parameters that do not change what a run computes (left out of its checkpoint folder's name).
_RUN_IRRELEVANT = ("resume", "checkpoint_dir")


def run_folder(params: dict[str, Any], genes: Sequence[str]) -> Path:
    """Return the checkpoint folder of a run in :attr:`sigmma_sc.settings.cachedir`, named after its data, genes and parameters.

    An interrupted run and its rerun with ``resume=True`` (same data, same arguments) share it.
    """
    relevant = {k: v for k, v in params.items() if k not in _RUN_IRRELEVANT}
    digest = array_digest(np.asarray(list(genes), dtype=str), extra=json.dumps(relevant, sort_keys=True, default=str))
    return settings.cachedir / "checkpoints" / digest[:24]


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
    On the five her2st sections (minutes on a CPU):

    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.her2st()  # doctest: +SKIP
    >>> model = sg.tl.fit(sdata, max_epochs=10)  # doctest: +SKIP

    Here and in the other examples, ``model`` was fitted on ``train``, 200 cells of a synthetic
    tissue (``train = sg.datasets.synthetic(400, n_genes=40, n_sections=2, seed=0)
    .filter_by_coordinate_system("S0")``, then ``model = sg.tl.fit(train, max_epochs=1,
    embed_dim=16, hidden_dim=32, seed=0)``); ``test`` is the other section, ``"S1"``:

    >>> model
    Sigmma(levels=('micro', 'meso', 'macro'), graph=True, genes=40, embed_dim=16, encoder='efficientnet_lite0', epochs=1)
    >>> emb = model.get_embeddings(test)
    >>> emb["joint"].shape
    (200, 48)
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     model.save(f"{tmp}/model")
    ...     loaded = sg.Sigmma.load(f"{tmp}/model")
    >>> loaded.genes == model.genes
    True
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
    def train(
        cls,
        sdata: SpatialData,
        *,
        config: TrainConfig,
        table_key: str = Keys.TABLE,
        encoder: Any = Defaults.ENCODER,
        n_genes: int = Defaults.N_GENES,
        min_detected: float | None = None,
        genes: Sequence[str] | str | None = None,
        feature_method: str = Defaults.FEATURE_METHOD,
        stain_normalize: str | None = None,
        hierarchy_kwargs: dict[str, Any] | None = None,
        context_weight: float | None = None,
        feature_norm: str = Defaults.FEATURE_NORM,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Sigmma, dict[str, np.ndarray | None]]:
        """Train a model on a slide; the array-level work behind :func:`sigmma_sc.tl.fit`.

        Computes what is missing of the hierarchy and the image features (cached in the table, as
        :mod:`sigmma_sc.pp` does), selects the genes, trains, and embeds the training units. It
        writes no embeddings: :func:`sigmma_sc.tl.fit` does, with :meth:`to_uns`.

        Parameters
        ----------
        sdata
            SpatialData with H&E images and a table of units with counts.
        config
            Every training hyper-parameter (:class:`TrainConfig`).
        table_key, encoder, n_genes, min_detected, genes, feature_method, stain_normalize, hierarchy_kwargs, context_weight, feature_norm, trainer_kwargs
            As in :func:`sigmma_sc.tl.fit`. Without ``config.checkpoint_dir``, the checkpoints go to a
            folder of :attr:`sigmma_sc.settings.cachedir` named after the data, the genes and the
            parameters (``resume=True`` finds it), removed after a successful run.

        Returns
        -------
        ``(model, embeddings)``: the trained model and the per-unit embeddings of the table (see
        :meth:`get_embeddings`).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> config = sg.model.TrainConfig(max_epochs=1, embed_dim=16, hidden_dim=32)
        >>> model, emb = sg.Sigmma.train(train, config=config)  # 200 synthetic cells
        >>> emb["joint"].shape, len(model.history)  # epoch 0 is the initialisation
        ((200, 48), 2)
        """
        if feature_norm not in Choices.FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {Choices.FEATURE_NORMS}, got {feature_norm!r}.")
        TrainConfig.check_gene_options(n_genes, min_detected)
        TrainConfig.check_context_weight(context_weight)
        trainer_kwargs = TrainConfig.check_trainer_kwargs(trainer_kwargs)
        slide = io.validate(sdata, table_key=table_key)
        if not has_expression_matrix(slide.table):
            raise ValueError(f"table {table_key!r} holds no expression: training needs counts for its units.")
        unit_batch = unit_batch_codes(slide.table, slide.unit_section, config.batch_key)
        base = {
            **jsonable(asdict(config)),
            "encoder": encoder if isinstance(encoder, str) else None,
            "feature_method": feature_method,
            "stain_normalize": stain_normalize,
            "hierarchy_kwargs": dict(hierarchy_kwargs or {}),
            "n_genes_requested": int(n_genes),
            "min_detected": min_detected,
            "genes_from": genes if isinstance(genes, str) else (None if genes is None else "list"),
            "context_weight": None if context_weight is None else float(context_weight),
            "feature_norm": feature_norm,
        }
        slide, hier, feats, key = slide_features(
            sdata,
            table_key=table_key,
            levels=config.levels,
            encoder=encoder,
            feature_method=feature_method,
            stain_normalize=stain_normalize,
            hierarchy_kwargs=hierarchy_kwargs,
        )
        base["encoder"] = key.encoder
        base["feature_key"] = key.id
        base["unit_level"] = hier.unit_level
        base["unit_kind"] = slide.unit_kind
        base["technology"] = slide.technology
        # "auto" resolved once the unit kind is known and recorded with the model; the caller's config is untouched
        config = replace(config, max_context_cells=config.context_cells(slide.unit_kind))
        base["max_context_cells"] = config.max_context_cells
        if base["context_weight"] is None:
            base["context_weight"] = default_context_weight(hier.unit_level, slide.technology)
        base["log_normalized"] = bool(slide.log_normalized)

        matrix = expression_matrix(slide)
        base["fingerprint"] = data_fingerprint(slide, matrix)
        if min_detected is None:
            min_detected = default_min_detected(matrix, n_genes=n_genes)
        base["min_detected"] = float(min_detected)
        genes = model_genes(slide, matrix, n_genes=n_genes, min_detected=min_detected, genes=genes)
        gene_idx = slide.table.var_names.get_indexer(genes)
        expression = ExpressionSource.from_counts(matrix, gene_idx, log_normalized=slide.log_normalized)

        use = tuple(lv for lv in config.levels if lv in hier.levels)
        if Levels.MICRO in config.levels and Levels.MICRO not in hier.levels:
            logger.warning("the hierarchy has no micro level (no nuclei / cells): training without it")
        f_stats = {lv: feature_stats(feats[lv]) for lv in use if lv in feats}
        levels = level_inputs(hier, feats, f_stats, feature_norm=feature_norm)
        config.levels = use
        base["levels"] = list(use)
        # _core imports torch and lightning at its top: loaded on first training / embedding.
        import torch

        from ._core import split_nodes, train

        # Bit-identical reruns need the same thread count (CPU reductions split by thread): recorded.
        base["torch_threads"] = int(torch.get_num_threads())
        scratch = config.checkpoint_dir is None
        if scratch:
            config.checkpoint_dir = str(run_folder(base, genes))
        batches = None if unit_batch is None else node_batches(levels[Levels.MESO].members, unit_batch)
        module, history, expr_stats, seconds = train(
            levels, expression, config, batches=batches, trainer_kwargs=trainer_kwargs, scratch=scratch
        )
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
        # train() held these meso subgraphs out (never in a gradient step): their units are the honest
        # queries when a readout is chosen on the reference.
        _, val_nodes = split_nodes(levels[Levels.MESO].n, config.val_fraction, config.seed)
        validation = np.isin(hier.unit_nodes(Levels.MESO), val_nodes)
        model.reference = build_reference(slide, genes, emb, validation=validation)
        return model, emb

    def to_uns(self) -> dict[str, Any]:
        """Return what :func:`sigmma_sc.tl.fit` stores in ``uns["sigmma"]``: parameters, genes, history, versions.

        Every value is one anndata can write (``sdata.write`` / ``write_h5ad``).
        """
        return {
            Keys.PARAMS: uns_safe(self.params),
            Keys.GENES: np.asarray(self.genes, dtype=object),
            Keys.HISTORY: {c: self.history[c].to_numpy() for c in self.history.columns},
            Keys.VERSIONS: versions(),
        }

    # -- embedding ----------------------------------------------------------------------------
    def _embed(
        self, slide: Any, hier: Any, levels: dict[str, LevelInput], expression: ExpressionSource | None
    ) -> dict[str, np.ndarray | None]:
        # _core imports torch and lightning at its top: loaded on first training / embedding.
        from ._core import embed_units, make_batcher

        cfg = TrainConfig(**{f.name: self._config[f.name] for f in fields(TrainConfig) if f.name in self._config})
        cfg.levels = tuple(lv for lv in cfg.levels if lv in levels)
        batcher = make_batcher(levels, cfg, expression, self._expr_stats)
        weight = self._config.get("context_weight")
        if weight is None:  # models saved before the weight was resolved at training
            weight = default_context_weight(hier.unit_level)
        return embed_units(
            self._module,
            batcher,
            hier.unit_level,
            slide.n_units,
            batch_size=cfg.batch_size,
            expression=expression is not None,
            context_weight=float(weight),
        )

    def get_embeddings(
        self,
        sdata: SpatialData,
        *,
        table_key: str = Keys.TABLE,
        expression: bool | None = None,
        max_missing_genes: float = Defaults.MAX_MISSING_GENES,
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
            ``None``: embed expression when the table holds the model genes, none when it holds no
            expression (H&E only), error when it holds some other gene panel. ``True``: require it.
            ``False``: image side only (no genes needed).
        max_missing_genes
            Share of the model's genes the table may lack: they are embedded as zeros (no counts),
            with a warning, as for a section loaded on its own (loaders drop genes without counts).
            A larger share is an error (another gene panel).

        Returns
        -------
        ``{"img", "expr", "joint", "{level}_img", "{level}_expr"}``, each ``(n_units, d)`` float32
        rows of unit norm or ``None`` (``expr`` without expression; ``joint`` = ``img`` then).

        Examples
        --------
        >>> import sigmma_sc as sg
        >>> model = sg.Sigmma.load("model/")  # doctest: +SKIP
        >>> emb = model.get_embeddings(sg.datasets.her2st(sections=["C2"]))  # doctest: +SKIP

        With ``model`` fitted on 200 synthetic cells and ``test``, 200 other cells (see :class:`Sigmma`):

        >>> emb = model.get_embeddings(test)
        >>> emb["img"].shape, emb["meso_expr"].shape
        ((200, 48), (200, 16))
        >>> model.get_embeddings(test, expression=False)["expr"] is None
        True
        """
        slide = io.validate(sdata, table_key=table_key)
        use_expr = self._check_genes(slide.table, table_key, expression, max_missing_genes)
        slide, hier, feats, key = slide_features(
            sdata,
            table_key=table_key,
            levels=self.levels,
            encoder=self.encoder,
            feature_method=self._config.get("feature_method", Defaults.FEATURE_METHOD),
            stain_normalize=self._config.get("stain_normalize"),
            hierarchy_kwargs=self._config.get("hierarchy_kwargs", {}),
        )
        if key.views != FeatureKey.parse(self.feature_key).views:
            logger.warning(
                f"image features {key.id!r} differ from the training features {self.feature_key!r} "
                "(other fields of view or stain normalisation): embeddings may shift"
            )
        # Models saved before per-section scaling existed were trained on global statistics.
        levels = level_inputs(hier, feats, self._feature_stats, feature_norm=self._config.get("feature_norm", "global"))
        source = None
        if use_expr:
            matrix = expression_matrix(slide)
            idx = slide.table.var_names.get_indexer(self.genes)
            if (idx < 0).any():
                # Model genes the table lacks (checked above) read an appended all-zero column: no counts,
                # library sizes unchanged.
                zeros = sp.csr_matrix((matrix.shape[0], 1), dtype=matrix.dtype)
                matrix = sp.hstack([matrix, zeros], format="csr")
                idx = np.where(idx < 0, matrix.shape[1] - 1, idx)
            source = ExpressionSource.from_counts(matrix, idx, log_normalized=slide.log_normalized)
        return self._embed(slide, hier, levels, source)

    def _check_genes(
        self,
        table: AnnData,
        table_key: str,
        expression: bool | None,
        max_missing_genes: float = Defaults.MAX_MISSING_GENES,
    ) -> bool:
        """Whether to embed the table's expression; warns when it lacks a few model genes, refuses more.

        A section loaded on its own drops genes without counts, so a few missing genes are the normal
        case: they are embedded as zeros (no counts). A larger share is another gene panel.
        """
        if expression is False:
            return False
        if not has_expression_matrix(table):
            if expression:
                raise ValueError(f"table {table_key!r} holds no expression; pass expression=False for H&E only.")
            return False
        if not 0.0 <= max_missing_genes <= 1.0:
            raise ValueError(f"max_missing_genes must be a share between 0 and 1, got {max_missing_genes!r}.")
        var = pd.Index(table.var_names)
        missing = [g for g, p in zip(self.genes, var.get_indexer(self.genes)) if p < 0]
        if not missing:
            return True
        share = len(missing) / len(self.genes)
        if share > max_missing_genes:
            raise ValueError(
                f"table {table_key!r} lacks {len(missing)} of the model's {len(self.genes)} genes ({share:.1%}, "
                f"e.g. {missing[:5]}), more than max_missing_genes={max_missing_genes:.1%}: the gene panel does not "
                "match the model. Pass expression=False to embed the H&E only, raise max_missing_genes= to embed "
                "the expression with the missing genes as zeros, or train a model on this panel."
            )
        logger.warning(
            f"table {table_key!r} lacks {len(missing)} of the model's {len(self.genes)} genes ({share:.1%}, e.g. "
            f"{missing[:5]}): their expression is embedded as zero (no counts), as a section loaded on its own "
            "drops genes without counts"
        )
        return True

    # -- persistence --------------------------------------------------------------------------
    def save(self, dir: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write weights, configuration, genes, encoder id, standardisation and reference to a folder.

        The write is atomic: everything goes to a temporary sibling folder, is flushed to disk, and
        the folder is then renamed to ``dir``, so ``dir`` holds either the previous model or the
        new one, never a mix (a crash leaves the previous model in place). ``config.json`` records
        the saved-model format and the sha256 and size of every other file; :meth:`load` checks them.

        Parameters
        ----------
        dir
            Folder (created when missing). An existing folder must be empty or hold a saved model
            and nothing else.
        overwrite
            Replace a saved model already in ``dir``.

        Examples
        --------
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     model.save(f"{tmp}/model")
        ...     sorted(os.listdir(f"{tmp}/model"))
        ['config.json', 'genes.txt', 'history.csv', 'reference.h5ad', 'stats.npz', 'weights.pt']
        """
        import torch

        path = Path(os.path.abspath(os.fspath(dir)))
        _check_save_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(path, _SAVING_TAG)
        tmp.mkdir()
        try:
            (tmp / _GENES_FILE).write_text("\n".join(self.genes) + "\n")
            torch.save(self._module.state_dict(), tmp / _WEIGHTS_FILE)
            arrays = {}
            for kind, stats in (("feature", self._feature_stats), ("expr", self._expr_stats)):
                for lv, (a, b) in stats.items():
                    arrays[f"{kind}_{lv}_mean"] = a
                    arrays[f"{kind}_{lv}_std"] = b
            np.savez(tmp / _STATS_FILE, **arrays)
            self.history.to_csv(tmp / _HISTORY_FILE, index=False)
            written = list(_REQUIRED_FILES)
            if self.reference is not None:
                self.reference.write_h5ad(tmp / _REFERENCE_FILE)
                written.append(_REFERENCE_FILE)
            files = {}
            for name in written:
                _fsync_file(tmp / name)
                files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            config = {**self._config, "format_version": _FORMAT_VERSION, "versions": versions(), _FILES_KEY: files}
            (tmp / _CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
            _fsync_file(tmp / _CONFIG_FILE)
            _fsync_dir(tmp)
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, dir: str | os.PathLike, *, sdata: SpatialData | None = None, table_key: str = Keys.TABLE) -> Sigmma:
        """Read a model written by :meth:`save` (any saved-model format up to the current one).

        Every file is checked before use: present, of the size and sha256 recorded at saving
        (format 2), the genes and the feature statistics matching the weights' dimensions, the image
        encoder registered. Each failure names the file or field and what to do.

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
        >>> import tempfile
        >>> import sigmma_sc as sg
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     model.save(f"{tmp}/model")
        ...     loaded = sg.Sigmma.load(f"{tmp}/model", sdata=test)
        >>> loaded
        Sigmma(levels=('micro', 'meso', 'macro'), graph=True, genes=40, embed_dim=16, encoder='efficientnet_lite0', epochs=1)
        """
        import anndata as ad
        import torch

        # _core imports torch and lightning at its top: loaded on first training / embedding.
        from ._core import build_module

        path = Path(os.path.abspath(os.fspath(dir)))
        if not (path / _CONFIG_FILE).is_file():
            what = f"{_CONFIG_FILE} missing" if path.is_dir() else "no such folder"
            raise FileNotFoundError(f"{path} holds no saved Sigmma model ({what}).{_interrupted_save_hint(path)}")
        try:
            config = json.loads((path / _CONFIG_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path / _CONFIG_FILE} is not valid JSON ({exc}): it is corrupted or truncated; {_REWRITE_HINT}."
            ) from exc
        if not isinstance(config, dict):
            raise ValueError(f"{path / _CONFIG_FILE} does not hold a Sigmma configuration: {_REWRITE_HINT}.")
        version = _format_version(path, config)
        absent = [f for f in _REQUIRED_FIELDS if f not in config]
        if absent:
            raise ValueError(
                f"{path / _CONFIG_FILE} lacks the field(s) {', '.join(absent)}: the config was edited or is "
                f"incomplete; {_REWRITE_HINT}."
            )
        present = _verify_files(path, config, version)
        encoder = config["encoder"]
        known = available_encoders()
        precomputed = str(encoder).startswith("precomputed")
        if not precomputed and encoder not in known:
            raise ValueError(
                f"the model's image encoder {encoder!r} ({_CONFIG_FILE} field 'encoder') is not available here "
                f"(known: {known}); register it with sigmma_sc.pp.register_encoder before loading."
            )
        if not precomputed:
            dim = int(get_encoder(encoder).dim)
            other = {lv: int(d) for lv, d in dict(config["img_dims"]).items() if int(d) != dim}
            if other:
                raise ValueError(
                    f"the image encoder registered here as {encoder!r} gives {dim} features, but the model was "
                    f"trained on {sorted(set(other.values()))} ({_CONFIG_FILE} img_dims {other}): it is another "
                    "encoder under the same name. Register the encoder the model was trained with "
                    "(sigmma_sc.pp.register_encoder) before loading."
                )
        genes = [g for g in (path / _GENES_FILE).read_text().splitlines() if g]
        stats = _read_stats(path)
        _check_dims(path, config, genes, stats)
        f_stats, e_stats = {}, {}
        for kind, target in (("feature", f_stats), ("expr", e_stats)):
            for lv in Levels.ALL:
                if f"{kind}_{lv}_mean" in stats:
                    target[lv] = (stats[f"{kind}_{lv}_mean"], stats[f"{kind}_{lv}_std"])
        # Models saved before max_context_cells existed capped context cells like the targets.
        config.setdefault("max_context_cells", None)
        cfg = TrainConfig(**{f.name: config[f.name] for f in fields(TrainConfig) if f.name in config})
        module = build_module(config["img_dims"], config["expr_dims"], tuple(config["pair_levels"]), cfg)
        try:
            state = torch.load(path / _WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path / _WEIGHTS_FILE} cannot be read ({exc}): {_REWRITE_HINT}.") from exc
        try:
            module.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path / _WEIGHTS_FILE} does not fit the module described by {_CONFIG_FILE} (img_dims, expr_dims, "
                f"embed_dim, hidden_dim, levels, graph): {exc}"
            ) from exc
        module.eval()
        try:
            history = pd.read_csv(path / _HISTORY_FILE)
            reference = ad.read_h5ad(path / _REFERENCE_FILE) if _REFERENCE_FILE in present else None
        except Exception as exc:
            raise ValueError(f"{path} holds an unreadable history or reference file ({exc}): {_REWRITE_HINT}.") from exc
        config.pop("versions", None)
        config.pop("format_version", None)
        config.pop(_FILES_KEY, None)
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
