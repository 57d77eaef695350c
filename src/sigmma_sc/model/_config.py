"""The training configuration: every hyper-parameter of one run, with the package's defaults, and how a run fails."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

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
    lr: float = Defaults.LR
    weight_decay: float = Defaults.WEIGHT_DECAY
    batch_size: int = Defaults.BATCH_SIZE
    max_cells: int | None = Defaults.MAX_CELLS
    max_epochs: int = Defaults.MAX_EPOCHS
    patience: int = Defaults.PATIENCE
    val_fraction: float = Defaults.VAL_FRACTION
    consistency_weight: float = Defaults.CONSISTENCY_WEIGHT
    coarse_targets: str = Defaults.COARSE_TARGETS
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
        self.levels = tuple(self.levels)
        bad = [lv for lv in self.levels if lv not in Levels.ALL]
        if bad or Levels.MESO not in self.levels:
            raise ValueError(
                f"levels must be a subset of {Levels.ALL} containing 'meso' (the subgraph level), got {self.levels!r}."
            )
        if self.coarse_targets not in Choices.COARSE_TARGETS:
            raise ValueError(f"coarse_targets must be one of {Choices.COARSE_TARGETS}, got {self.coarse_targets!r}.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (InfoNCE needs negatives), got {self.batch_size}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
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
