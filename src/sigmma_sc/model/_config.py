"""The training configuration: every hyper-parameter of one run, with the package's defaults, and how a run fails."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from sigmma_sc._constants import Choices, Defaults, Levels


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (also the saved configuration).

    Every default is the package's (:class:`sigmma_sc._constants.Defaults`), the same as
    :func:`sigmma_sc.tl.fit`'s; see there for what each one does.

    Examples
    --------
    >>> from sigmma_sc.model import TrainConfig
    >>> TrainConfig(max_epochs=5).max_epochs
    5
    >>> TrainConfig(levels=("micro",))
    Traceback (most recent call last):
    ...
    ValueError: levels must be a subset of ('micro', 'meso', 'macro') containing 'meso' (the subgraph level), got ('micro',).
    """

    levels: tuple[str, ...] = Levels.ALL
    graph: bool = True
    embed_dim: int = Defaults.EMBED_DIM
    hidden_dim: int = Defaults.HIDDEN_DIM
    intra_layers: int = Defaults.INTRA_LAYERS
    inter_layers: int = Defaults.INTER_LAYERS
    heads: int = Defaults.HEADS
    dropout: float = Defaults.DROPOUT
    #: Training batches see each node's counts thinned to a random share in ``[1 - depth_augment, 1]``.
    depth_augment: float = Defaults.DEPTH_AUGMENT
    #: Training batches see the image features with a random per-channel gain and offset of this sd.
    feature_jitter: float = Defaults.FEATURE_JITTER
    lr: float = Defaults.LR
    weight_decay: float = Defaults.WEIGHT_DECAY
    batch_size: int = Defaults.BATCH_SIZE
    max_cells: int | None = Defaults.MAX_CELLS
    #: Training: at most this many cells per subgraph that is context only (``None``: ``max_cells``;
    #: ``"auto"``: see :meth:`context_cells`).
    max_context_cells: int | str | None = "auto"
    max_epochs: int = Defaults.MAX_EPOCHS
    patience: int = Defaults.PATIENCE
    val_fraction: float = Defaults.VAL_FRACTION
    consistency_weight: float = Defaults.CONSISTENCY_WEIGHT
    coarse_targets: str = Defaults.COARSE_TARGETS
    #: obs column of the batches (sections, patients) whose mini-batches, and so negatives, stay
    #: within one batch; ``None``: batches mix everything.
    batch_key: str | None = Defaults.BATCH_KEY
    level_weights: dict[str, float] | None = None
    seed: int = Defaults.SEED
    accelerator: str = Defaults.ACCELERATOR
    devices: Any = Defaults.DEVICES
    precision: str | None = None
    checkpoint_dir: str | None = None
    #: Continue an interrupted run: ``True`` from the newest ``last.ckpt`` of ``checkpoint_dir``,
    #: a path from that checkpoint, ``None`` / ``False`` from scratch.
    resume: bool | str | None = None

    def __post_init__(self) -> None:
        self._check_numbers()
        self.levels = tuple(self.levels)
        bad = [lv for lv in self.levels if lv not in Levels.ALL]
        if bad or Levels.MESO not in self.levels:
            raise ValueError(
                f"levels must be a subset of {Levels.ALL} containing 'meso' (the subgraph level), got {self.levels!r}."
            )
        if self.coarse_targets not in Choices.COARSE_TARGETS:
            raise ValueError(f"coarse_targets must be one of {Choices.COARSE_TARGETS}, got {self.coarse_targets!r}.")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        if self.resume is False:
            self.resume = None
        elif isinstance(self.resume, os.PathLike):
            self.resume = os.fspath(self.resume)
        elif self.resume is not None and self.resume is not True and not isinstance(self.resume, str):
            raise TypeError(
                f"resume must be True (the newest last.ckpt of checkpoint_dir), a checkpoint path or None, "
                f"got {type(self.resume).__name__}."
            )

    def context_cells(self, unit_kind: str | None = None) -> int | None:
        """Resolve the cap on the cells of a context-only subgraph for units of ``unit_kind`` (``None``: unknown).

        ``"auto"`` is :attr:`~sigmma_sc._constants.Defaults.MAX_CONTEXT_CELLS` for cells and bins (and
        when the kind is unknown: array-level callers train on large slides), ``max_cells`` for spots,
        whose slides are small enough that the context costs little.

        Examples
        --------
        >>> from sigmma_sc.model import TrainConfig
        >>> TrainConfig().context_cells("cell"), TrainConfig().context_cells("spot")
        (4, 16)
        >>> TrainConfig(max_context_cells=8).context_cells("spot")
        8
        """
        if self.max_context_cells != "auto":
            return self.max_context_cells
        return self.max_cells if unit_kind == "spot" else Defaults.MAX_CONTEXT_CELLS

    def _check_numbers(self) -> None:
        """Every numeric hyper-parameter in its valid range, each error naming the argument and the range."""
        _integer("embed_dim", self.embed_dim, 1)
        _integer("hidden_dim", self.hidden_dim, 1)
        _integer("heads", self.heads, 1)
        _integer("intra_layers", self.intra_layers, 0)
        _integer("inter_layers", self.inter_layers, 0)
        _integer("batch_size", self.batch_size, 2, why=" (InfoNCE needs negatives in every batch)")
        _integer("max_epochs", self.max_epochs, 1)
        _integer("patience", self.patience, 0)
        _integer("seed", self.seed, 0)
        if self.max_cells is not None:
            _integer("max_cells", self.max_cells, 1, why=" (or None for every cell)")
        if self.max_context_cells is not None and not (
            isinstance(self.max_context_cells, str) and self.max_context_cells == "auto"
        ):
            _integer("max_context_cells", self.max_context_cells, 1, why=" (or None for max_cells, or 'auto')")
        _number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _number("depth_augment", self.depth_augment, 0.0, 1.0, high_open=True)
        _number("feature_jitter", self.feature_jitter, 0.0, None)
        _number("lr", self.lr, 0.0, None, low_open=True)
        _number("weight_decay", self.weight_decay, 0.0, None)
        _number("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        _number("consistency_weight", self.consistency_weight, 0.0, None)
        if self.graph and self.embed_dim % self.heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be a multiple of heads ({self.heads}): each attention head "
                f"gets embed_dim / heads channels; e.g. heads={_divisor_near(self.embed_dim, self.heads)}."
            )
        if self.level_weights is not None:
            if not isinstance(self.level_weights, dict):
                raise TypeError(
                    f"level_weights must be a dict {{level: weight}}, got {type(self.level_weights).__name__}."
                )
            for lv, w in self.level_weights.items():
                if lv not in Levels.ALL:
                    raise ValueError(f"level_weights names level {lv!r}; levels are {Levels.ALL}.")
                _number(f"level_weights[{lv!r}]", w, 0.0, None)

    @staticmethod
    def check_gene_options(n_genes: Any, min_detected: Any) -> None:
        """Check :func:`sigmma_sc.tl.fit`'s gene options (not fields: genes are chosen from the data).

        Examples
        --------
        >>> TrainConfig.check_gene_options(0, None)
        Traceback (most recent call last):
        ...
        ValueError: n_genes must be an integer >= 1, got 0.
        """
        _integer("n_genes", n_genes, 1)
        if min_detected is not None:
            _number("min_detected", min_detected, 0.0, 1.0, why=" (a fraction of the training units, or None)")

    @staticmethod
    def check_context_weight(context_weight: Any) -> None:
        """Check :func:`sigmma_sc.tl.fit`'s ``context_weight`` (``None``: the default per data type).

        Examples
        --------
        >>> TrainConfig.check_context_weight(-1)
        Traceback (most recent call last):
        ...
        ValueError: context_weight must be a number in [0, inf) (the coarser levels' weight in X_sigmma, or None), got -1.
        """
        if context_weight is not None:
            _number(
                "context_weight", context_weight, 0.0, None, why=" (the coarser levels' weight in X_sigmma, or None)"
            )

    @staticmethod
    def check_trainer_kwargs(trainer_kwargs: Any) -> dict[str, Any]:
        """Check extra Lightning ``Trainer`` options; returns them as a dict (``{}`` for ``None``).

        ``callbacks`` (a callback or a list) are appended to the package's own, a ``logger`` replaces
        the default none, any other ``lightning.Trainer`` argument is passed on. The options the
        package sets from its own keywords are refused, naming the keyword to use instead.

        Examples
        --------
        >>> TrainConfig.check_trainer_kwargs({"max_epochs": 3})
        Traceback (most recent call last):
        ...
        ValueError: trainer_kwargs['max_epochs'] is set by sigmma-sc itself: pass max_epochs= to tl.fit / TrainConfig instead.
        """
        if trainer_kwargs is None:
            return {}
        if not isinstance(trainer_kwargs, dict):
            raise TypeError(
                f"trainer_kwargs must be a dict of lightning.Trainer options, got {type(trainer_kwargs).__name__}."
            )
        for key in trainer_kwargs:
            if key in TRAINER_OWNED:
                raise ValueError(f"trainer_kwargs[{key!r}] is set by sigmma-sc itself: {TRAINER_OWNED[key]}.")
        import inspect

        import lightning as L

        accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
        unknown = sorted(k for k in trainer_kwargs if k not in accepted)
        if unknown:
            raise ValueError(
                f"trainer_kwargs {unknown} are not lightning.Trainer arguments (lightning {L.__version__}); "
                "see https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-class-api."
            )
        callbacks = trainer_kwargs.get("callbacks")
        if callbacks is not None:
            callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
            bad = [type(c).__name__ for c in callbacks if not isinstance(c, L.Callback)]
            if bad:
                raise TypeError(f"trainer_kwargs['callbacks'] must be lightning.Callback objects, got {bad}.")
            trainer_kwargs = {**trainer_kwargs, "callbacks": callbacks}
        return dict(trainer_kwargs)


#: Lightning Trainer options the package sets itself, and what to pass instead.
TRAINER_OWNED: dict[str, str] = {
    "max_epochs": "pass max_epochs= to tl.fit / TrainConfig instead",
    "accelerator": "pass accelerator= to tl.fit / TrainConfig instead",
    "devices": "pass devices= to tl.fit / TrainConfig instead",
    "num_nodes": "pass devices= to tl.fit (several nodes: launch with torchrun / SLURM, Lightning reads them)",
    "strategy": "it follows devices= (DDP when more than one device)",
    "precision": "pass precision= to tl.fit / TrainConfig instead",
    "default_root_dir": "pass checkpoint_dir= to tl.fit / TrainConfig instead",
    "enable_checkpointing": "checkpoints make resume= work; pass checkpoint_dir= to keep them",
    "deterministic": "CPU runs are deterministic so that a seed reproduces them bit for bit",
    "enable_progress_bar": "set sigmma_sc.settings.progress_bar instead",
}


def _integer(name: str, value: Any, low: int, *, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{why}, got {value!r}.")


def _number(
    name: str,
    value: Any,
    low: float,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    ok = ok and bool(np.isfinite(value))
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        lo = f"({low:g}" if low_open else f"[{low:g}"
        hi = "inf)" if high is None else (f"{high:g})" if high_open else f"{high:g}]")
        raise ValueError(f"{name} must be a number in {lo}, {hi}{why}, got {value!r}.")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN / inf loss or gradient and stopped before the weights were updated.

    Attributes
    ----------
    epoch, batch
        Where it happened (epoch counted from 1, batch from 0).
    checkpoint
        Path of the last good checkpoint (the latest finished epoch), or ``None`` when no epoch
        finished.
    """

    def __init__(self, message: str, *, epoch: int, batch: int, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.batch = batch
        self.checkpoint = checkpoint
