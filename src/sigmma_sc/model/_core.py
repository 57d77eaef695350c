"""Array-level training and embedding: everything between the level arrays and the unit embeddings.

The :class:`~sigmma_sc.model.Sigmma` class wraps these functions with the SpatialData plumbing;
they take :class:`~sigmma_sc.model._data.LevelInput` objects, so they can be tested and reused
without a slide. Imported only from inside functions (torch, lightning).
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from sigmma_sc._constants import Levels
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings
from sigmma_sc._utils import release_memory, torch_device

from ._config import NonFiniteLossError, TrainConfig
from ._data import MAX_MICRO_PAIRS, ExpressionSource, LevelInput, SubgraphBatcher, expression_stats
from ._module import SigmmaModule, SubgraphBatches

#: Levels whose nodes overlap their neighbours almost entirely (regions), for spot and cell data alike.
COARSE_LEVELS = (Levels.MACRO,)
#: Fewest meso subgraphs for which a validation split (and early stopping) is made.
MIN_NODES_FOR_VALIDATION = 40
#: At most this many batches are scored for the loss at initialisation (history row ``epoch 0``).
MAX_INIT_BATCHES = 20
#: File name (without ``.ckpt``) of the checkpoint of the latest finished epoch, rewritten every epoch.
LAST_CHECKPOINT = "last"
#: File name (without ``.ckpt``) of the checkpoint of the best validation epoch.
BEST_CHECKPOINT = "best"


def resolve_accelerator(accelerator: str, devices: Any) -> tuple[str, Any, str, str]:
    """``(accelerator, devices, strategy, precision)`` for Lightning from the user's choice.

    CUDA when present under ``"auto"``, bf16 mixed precision on GPU, DDP when more than one device.
    Unknown names, an absent GPU or more devices than visible fail at once
    (:func:`sigmma_sc._utils.torch_device`, the rule image features follow too).

    Examples
    --------
    >>> resolve_accelerator("cpu", "auto")
    ('cpu', 1, 'auto', '32-true')
    """
    torch_device(accelerator, devices)
    accelerator = str(accelerator)
    if accelerator.startswith("cuda:"):
        accelerator, devices = "gpu", [int(accelerator[5:])]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        accelerator = "gpu"
        n_avail = torch.cuda.device_count()
        n = (
            n_avail
            if devices in ("auto", -1)
            else (len(devices) if isinstance(devices, list | tuple) else int(devices))
        )
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        n = 1 if devices in ("auto", -1) else (len(devices) if isinstance(devices, list | tuple) else int(devices))
        precision = "32-true"
    if devices in ("auto", -1):
        devices = n
    strategy = "ddp_find_unused_parameters_true" if n > 1 else "auto"
    return accelerator, devices, strategy, precision


def make_batcher(
    levels: dict[str, LevelInput],
    config: TrainConfig,
    expression: ExpressionSource | None,
    expr_stats: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    node_batch: np.ndarray | None = None,
) -> SubgraphBatcher:
    """Build the batcher of a configuration (disjoint macro masks when ``coarse_targets`` asks).

    ``node_batch``: the batch code of every meso node, for negatives drawn within batches (training only).
    """
    return SubgraphBatcher(
        levels=levels,
        use_levels=tuple(lv for lv in config.levels if lv in levels),
        expression=expression,
        graph=config.graph,
        inter_hops=config.inter_layers,
        expr_stats=expr_stats,
        disjoint_macro="disjoint" in config.coarse_targets,
        node_batch=node_batch,
        depth_augment=config.depth_augment,
        feature_jitter=config.feature_jitter,
    )


def module_dims(
    levels: dict[str, LevelInput], batcher: SubgraphBatcher, n_genes: int
) -> tuple[dict[str, int], dict[str, int], tuple[str, ...]]:
    """``(img_dims, expr_dims, pair_levels)`` of the module for these levels."""
    use = batcher.use_levels
    img_dims = {lv: int(levels[lv].features.shape[1]) for lv in use if levels[lv].features is not None}
    if Levels.MESO not in img_dims:
        raise ValueError("the meso level has no image features: the model needs them (run pp.image_features).")
    expr_dims = {lv: int(n_genes) for lv in use if levels[lv].members is not None}
    pair_levels = tuple(lv for lv in use if lv in img_dims and lv in expr_dims)
    return img_dims, expr_dims, pair_levels


def build_module(
    img_dims: dict[str, int], expr_dims: dict[str, int], pair_levels: tuple[str, ...], config: TrainConfig
) -> SigmmaModule:
    """Build a fresh module of the given input dimensions and configuration."""
    soft = COARSE_LEVELS if "soft" in config.coarse_targets else ()
    disjoint = COARSE_LEVELS if "disjoint" in config.coarse_targets else ()
    return SigmmaModule(
        img_dims,
        expr_dims,
        tuple(pair_levels),
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        graph=config.graph,
        intra_layers=config.intra_layers,
        inter_layers=config.inter_layers,
        heads=config.heads,
        dropout=config.dropout,
        lr=config.lr,
        weight_decay=config.weight_decay,
        consistency_weight=config.consistency_weight,
        soft_levels=soft,
        disjoint_levels=disjoint,
        level_weights=config.level_weights,
    )


def split_nodes(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation split of meso subgraphs (validation empty for small inputs).

    Examples
    --------
    >>> tr, va = split_nodes(100, 0.1, 0)
    >>> len(tr), len(va)
    (90, 10)
    """
    nodes = np.arange(n)
    n_val = int(round(n * val_fraction))
    if n < MIN_NODES_FOR_VALIDATION or n_val < 2:
        return nodes, nodes[:0]
    perm = np.random.default_rng([seed, 17]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's banner lines only at debug verbosity; its pytree deprecation warnings never.

    Those warnings are Lightning's to fix (torch 2.x API change), not the user's.
    """
    lg = logging.getLogger("lightning.pytorch")
    level = lg.level
    if settings.verbosity < 3:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# reliability: non-finite losses, resumable checkpoints, interrupts
# ---------------------------------------------------------------------------------------------
def _non_finite_inputs(batch: dict[str, Any]) -> list[str]:
    """Keys of the floating-point tensors of a batch that hold NaN or inf."""
    bad = []
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            if not bool(torch.isfinite(value).all()):
                bad.append(key)
    return bad


def _rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, Python) in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, ValueError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _guard_callback(config: TrainConfig, precision: str):
    """Build the Lightning callback that stops at a non-finite loss / gradient and makes runs resumable.

    - Before every backward pass: a NaN / inf training loss raises :class:`NonFiniteLossError`
      (the weights are not updated); after every validation batch the same for the validation loss.
    - Before every optimiser step: a NaN / inf gradient raises the same (except under ``16-mixed``,
      whose gradient scaler skips such steps by design).
    - Checkpoints carry the history rows and the global RNG states (dropout draws, data loader
      seeds), so that a resumed CPU run ends with the weights of an uninterrupted one; the resumed
      run uses the configuration's learning rate and weight decay.
    - Records a ``KeyboardInterrupt`` (Lightning turns it into ``SystemExit``).
    """
    import lightning as L

    class _Guard(L.Callback):
        def __init__(self) -> None:
            self.interrupted: BaseException | None = None
            self._resumed = False

        @property
        def state_key(self) -> str:
            return "SigmmaTrainingState"

        def _fail(self, trainer: Any, pl_module: Any, what: str, batch: Any, batch_idx: int, detail: str) -> None:
            bad = _non_finite_inputs(batch) if isinstance(batch, dict) else []
            epoch = int(trainer.current_epoch) + 1
            causes = []
            if bad:
                causes.append(
                    f"the batch's inputs hold NaN / inf ({', '.join(bad)}): check the counts (non-negative, "
                    "finite) and the image features (recompute them with sigmma_sc.pp.image_features)"
                )
            causes.append(f"the learning rate is too high (lr={config.lr:g}): retry with a lower lr")
            if precision != "32-true":
                causes.append(f"the {precision} precision overflowed: retry with precision='32-true'")
            elif not bad:
                causes.append("bad counts or image features (NaN, inf or extreme values) in this batch")
            raise NonFiniteLossError(
                f"training stopped at epoch {epoch}, batch {batch_idx}: the {what} is not finite ({detail}); "
                "the weights were not updated. Likely causes: " + "; ".join(causes) + ".",
                epoch=epoch,
                batch=int(batch_idx),
            )

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._batch, self._batch_idx = batch, batch_idx

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            if not bool(torch.isfinite(loss.detach()).all()):
                self._fail(
                    trainer, pl_module, "training loss", self._batch, self._batch_idx, f"loss={float(loss.detach()):g}"
                )

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if precision == "16-mixed":
                return
            named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            if not named:
                return
            # One fused norm and one device sync a step; the per-tensor search only after a failure.
            total = torch.nn.utils.get_total_norm([g for _, g in named], foreach=True)
            if not bool(torch.isfinite(total)):
                names = [n for n, g in named if not bool(torch.isfinite(g).all())]
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                self._fail(
                    trainer, pl_module, "gradient", self._batch, self._batch_idx, f"in {', '.join(names[:3])}{more}"
                )

        def on_validation_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
                self._fail(trainer, pl_module, "validation loss", batch, batch_idx, f"loss={float(loss.detach()):g}")

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            checkpoint["sigmma"] = {"epoch_rows": list(pl_module.epoch_rows), "rng": _rng_state()}

        def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("sigmma")
            if state is None:
                return
            pl_module.epoch_rows = [dict(r) for r in state["epoch_rows"]]
            # Now, before the data loader of the resumed epoch is built: building it draws its
            # base seed from the global RNG, as it did at the start of that epoch in the first run.
            _set_rng_state(state["rng"])
            self._resumed = True

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if not self._resumed:
                return
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = config.lr
                    group["weight_decay"] = config.weight_decay

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if isinstance(exception, KeyboardInterrupt):
                self.interrupted = exception

    return _Guard()


def _checkpoint_callbacks(root: str, with_validation: bool) -> tuple[Any, Any]:
    """``(last, best)`` checkpoint callbacks: the latest finished epoch (every epoch) and the best one.

    Lightning's ``save_last=True`` rewrites ``last.ckpt`` only in the epochs where a top-k
    checkpoint is saved (2.6), that is when the validation loss improves; a separate unmonitored
    callback keeps the truly last epoch. Both save at the end of the training epoch, after the
    epoch's history row, so a resumed run starts at the next epoch.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    last = ModelCheckpoint(dirpath=root, filename=LAST_CHECKPOINT, save_top_k=1, save_on_train_epoch_end=True)
    best = (
        ModelCheckpoint(
            dirpath=root,
            monitor="val_loss",
            mode="min",
            save_top_k=1,
            filename=BEST_CHECKPOINT,
            save_on_train_epoch_end=True,
        )
        if with_validation
        else None
    )
    return last, best


def find_last_checkpoint(folder: str | Path) -> Path | None:
    """Return the newest ``last*.ckpt`` of a checkpoint folder (``None`` when there is none).

    Examples
    --------
    >>> find_last_checkpoint("/nonexistent") is None
    True
    """
    folder = Path(folder)
    found = sorted(folder.glob(f"{LAST_CHECKPOINT}*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def resolve_resume(config: TrainConfig) -> tuple[str | None, str | None]:
    """``(checkpoint to resume from, checkpoint folder)`` of a configuration.

    ``resume=True``: the newest ``last.ckpt`` of ``checkpoint_dir`` (a warning and a fresh start
    when there is none). A path: that checkpoint; its folder keeps the new checkpoints unless
    ``checkpoint_dir`` is given.
    """
    resume = config.resume
    if resume is None or resume is False:
        return None, config.checkpoint_dir
    if resume is True:
        if config.checkpoint_dir is None:
            raise ValueError(
                "resume=True resumes from the newest last.ckpt of checkpoint_dir, but checkpoint_dir is None: "
                "pass the checkpoint_dir of the interrupted run, or resume=<path to a .ckpt>."
            )
        found = find_last_checkpoint(config.checkpoint_dir)
        if found is None:
            logger.warning(f"resume=True: no {LAST_CHECKPOINT}.ckpt in {config.checkpoint_dir}: training from scratch")
            return None, config.checkpoint_dir
        return str(found), config.checkpoint_dir
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={str(resume)!r}: no such checkpoint file; pass a .ckpt written by a run with checkpoint_dir "
            f"(its {LAST_CHECKPOINT}.ckpt), or resume=True with that checkpoint_dir."
        )
    return str(path), config.checkpoint_dir or str(path.parent)


def _existing(path: str | None) -> str | None:
    return path if path and Path(path).is_file() else None


def _restore_sigint(handler: Any) -> None:
    """Put back the SIGINT handler Lightning replaces with ``SIG_IGN`` after a ``KeyboardInterrupt``."""
    if handler is None:
        return
    with contextlib.suppress(ValueError, TypeError, OSError):  # not the main thread / not settable
        if signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)


@torch.no_grad()
def initial_losses(module: SigmmaModule, data: SubgraphBatches) -> dict[str, float]:
    """Mean loss terms of the untrained module (eval mode) over the first batches of ``data``."""
    was_training = module.training
    module.eval()
    sums: dict[str, float] = {}
    n = min(len(data), MAX_INIT_BATCHES)
    for i in range(n):
        batch = data[i]
        z = module(batch)
        for name, value in module.criterion(z["img"], z["expr"], batch).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    module.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}


def train(
    levels: dict[str, LevelInput],
    expression: ExpressionSource,
    config: TrainConfig,
    *,
    nodes: np.ndarray | None = None,
    callbacks: Sequence[Any] = (),
    batches: np.ndarray | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    scratch: bool = False,
) -> tuple[SigmmaModule, pd.DataFrame, dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Train a module on the meso subgraphs ``nodes`` (default all) minus a held-out validation fraction.

    Subgraphs outside ``nodes`` never enter a batch unless they are graph neighbours of a training
    subgraph (graphs never cross sections, so leaving out whole sections isolates them).

    Every finished epoch is checkpointed (``last.ckpt``, with the optimiser state, the history rows
    and the RNG states; ``best.ckpt`` for the best validation epoch) in ``config.checkpoint_dir``
    (default: a temporary folder, removed after a successful run). ``config.resume`` continues an
    interrupted run: on CPU it ends with the weights of an uninterrupted one. A NaN / inf loss or
    gradient raises :class:`NonFiniteLossError` at once (before the weights change); Ctrl+C raises
    ``KeyboardInterrupt``; both keep the checkpoints and name the last one. ``callbacks`` are extra
    Lightning callbacks. ``batches``: the batch code of every meso node (:func:`~sigmma_sc.model._data.node_batches`);
    each mini-batch then holds one batch's subgraphs and draws its negatives there.
    ``trainer_kwargs`` (checked by :meth:`TrainConfig.check_trainer_kwargs`): their ``callbacks``
    run after the package's own, a ``logger`` replaces the default none, the other options go to
    ``lightning.Trainer``. ``scratch``: ``config.checkpoint_dir`` is the package's folder for this
    run (in ``settings.cachedir``): emptied before a run that does not resume, removed after a
    successful one, kept after an interrupt so that ``resume=True`` finds it.

    Returns the trained module (best validation epoch when there is a validation set, on CPU),
    the per-epoch history (epoch 0 = at initialisation), the expression standardisation and the
    training time in seconds.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    extra = TrainConfig.check_trainer_kwargs(trainer_kwargs)
    resume_from, checkpoint_dir = resolve_resume(config)
    if scratch and resume_from is None and checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # an older interrupted run's: not resumed, so stale
    L.seed_everything(config.seed, workers=True, verbose=False)
    pool = np.arange(levels[Levels.MESO].n) if nodes is None else np.unique(np.asarray(nodes, dtype=np.int64))
    tr, va = split_nodes(pool.size, config.val_fraction, config.seed)
    train_nodes, val_nodes = pool[tr], pool[va]
    stat_nodes = {Levels.MESO: train_nodes}
    probe = make_batcher(levels, config, expression, {})
    if probe.use_micro and probe.has_expression(Levels.MICRO):
        stat_nodes[Levels.MICRO] = np.sort(probe.micro_children[train_nodes].indices)
    if probe.use_macro and probe.has_expression(Levels.MACRO):
        stat_nodes[Levels.MACRO] = np.unique(probe.meso_parent[train_nodes])
    expr_stats = expression_stats(levels, expression, stat_nodes)
    node_batch = None if batches is None else np.asarray(batches, dtype=np.int64)
    if node_batch is not None and node_batch.shape != (levels[Levels.MESO].n,):
        raise ValueError(f"batches must give one code per meso node ({levels[Levels.MESO].n}), got {node_batch.shape}.")
    batcher = make_batcher(levels, config, expression, expr_stats, node_batch=node_batch)
    if not batcher.pair_levels():
        raise ValueError(
            "no level has both image features and expression: the table needs counts for its units "
            f"(levels {batcher.use_levels})."
        )
    module = build_module(*module_dims(levels, batcher, expression.units.shape[1]), config)
    accelerator, devices, strategy, precision = resolve_accelerator(config.accelerator, config.devices)
    precision = config.precision or precision
    bs = min(config.batch_size, max(2, train_nodes.size))

    def batches(nodes: np.ndarray, *, shuffle: bool) -> SubgraphBatches:
        return SubgraphBatches(
            batcher,
            nodes,
            batch_size=bs,
            shuffle=shuffle,
            seed=config.seed,
            max_micro_pairs=MAX_MICRO_PAIRS,
            max_children=config.max_cells,
            max_context_children=config.context_cells(),
            groups=None if node_batch is None else node_batch[nodes],
        )

    train_data = batches(train_nodes, shuffle=True)
    module.train_data = train_data
    val_data = batches(val_nodes, shuffle=False) if val_nodes.size else None
    init = initial_losses(module, train_data)
    init_val = initial_losses(module, val_data) if val_data is not None else {}
    row0 = {"epoch": 0.0, **{f"train_{k}": v for k, v in init.items()}, **{f"val_{k}": v for k, v in init_val.items()}}

    root = checkpoint_dir or tempfile.mkdtemp(prefix="sigmma_")
    last_ckpt, best_ckpt = _checkpoint_callbacks(root, with_validation=val_data is not None)
    guard = _guard_callback(config, precision)
    trainer_callbacks = [guard, *callbacks, *extra.pop("callbacks", []), last_ckpt]
    if best_ckpt is not None:
        trainer_callbacks = [
            EarlyStopping(monitor="val_loss", mode="min", patience=config.patience, min_delta=1e-4),
            *trainer_callbacks,
            best_ckpt,
        ]
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            max_epochs=config.max_epochs,
            default_root_dir=root,
            callbacks=trainer_callbacks,
            enable_checkpointing=True,
            enable_progress_bar=settings.progress_bar,
            # Bit-identical CPU runs for a seed; CUDA's index_add_ has no deterministic kernel.
            deterministic=accelerator == "cpu",
            # Defaults a user's trainer_kwargs may replace.
            **{
                "logger": False,
                "enable_model_summary": False,
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "gradient_clip_val": 1.0,
                **extra,
            },
        )
    if resume_from is not None:
        logger.info(f"resuming from {resume_from}")
    t0 = time.perf_counter()
    sigint = signal.getsignal(signal.SIGINT)
    keep = False
    try:
        with _quiet_lightning(), warnings.catch_warnings():
            if resume_from is not None:
                warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            trainer.fit(
                module,
                train_dataloaders=_loader(train_data, accelerator),
                val_dataloaders=None if val_data is None else _loader(val_data, accelerator),
                ckpt_path=resume_from,
            )
        seconds = time.perf_counter() - t0
        if best_ckpt is not None and best_ckpt.best_model_path:
            state = torch.load(best_ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
            module.load_state_dict(state)
    except NonFiniteLossError as err:
        last = _existing(last_ckpt.last_model_path or last_ckpt.best_model_path)
        keep = last is not None
        err.checkpoint = last
        where = (
            f"The last good checkpoint (epoch {err.epoch - 1}) is {last}: resume from it with resume={last!r} "
            "once the cause is fixed."
            if last
            else "No epoch finished, so there is no checkpoint to resume from."
        )
        raise NonFiniteLossError(f"{err} {where}", epoch=err.epoch, batch=err.batch, checkpoint=last) from None
    except SystemExit:
        if guard.interrupted is None:
            raise
        last = _existing(last_ckpt.last_model_path or last_ckpt.best_model_path)
        keep = last is not None
        again = "resume=True" if scratch else f"resume=True with checkpoint_dir={root!r}"
        msg = (
            f"training interrupted in epoch {trainer.current_epoch + 1}; the last checkpoint is {last}: continue "
            f"with resume={last!r} (or {again})"
            if last
            else f"training interrupted in epoch {trainer.current_epoch + 1}, before any checkpoint"
        )
        logger.warning(msg)
        raise KeyboardInterrupt(msg) from None
    finally:
        _restore_sigint(sigint)
        if (checkpoint_dir is None or scratch) and not keep:
            shutil.rmtree(root, ignore_errors=True)
    module = module.cpu().eval()
    history = pd.DataFrame([row0, *module.epoch_rows])
    history["epoch"] = history["epoch"].astype(int)
    logger.info(
        f"trained {trainer.current_epoch} epochs in {seconds:.1f} s: train loss "
        f"{history['train_loss'].iloc[0]:.3f} -> {history['train_loss'].iloc[-1]:.3f}"
    )
    return module, history, expr_stats, seconds


def _loader(data: SubgraphBatches, accelerator: str) -> Any:
    """Return a DataLoader of whole subgraph batches, built by ``settings.num_workers`` worker processes.

    Workers are started for each epoch (not persistent), so each gets the epoch's shuffle that
    ``on_train_epoch_start`` has just set; batches are the same as with ``num_workers=0``.
    """
    from torch.utils.data import DataLoader

    workers = max(int(settings.num_workers), 0)
    return DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=accelerator == "gpu",
        persistent_workers=False,
    )


def _node_batches(
    module: SigmmaModule, batcher: SubgraphBatcher, *, batch_size: int, expression: bool
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(level, side, node ids, (n, d) float32 embeddings)`` of every node, in three passes.

    1. The meso subgraphs, ``batch_size`` at a time, with all their cells: micro embeddings and
       each meso node's local (pre-GNN) state, kept as one ``(n_meso, d)`` array per side.
    2. The inter-subgraph GNN over the stored states of each batch's graph ball: meso embeddings.
    3. The regions (the parents of the meso nodes), pooled from their members' stored states.

    Each cell is encoded once. A training-style batch (the targets with their ball and regions)
    would encode the cells of its context again: 1.6x the cells of a 10k-cell slide, 3.5x at 100k.
    The values are those of ``module(batch)`` on such batches, since a local state depends only on
    its own subgraph (the intra-subgraph graph never leaves it). Micro nodes outside every subgraph
    and regions that are nobody's parent are not yielded.
    """
    from tqdm.auto import tqdm

    module = module.eval()
    device = next(module.parameters()).device
    sides = _sides(module, expression)
    encoders = {side: module.img if side == "img" else module.expr for side in sides}
    d = module.img.head[Levels.MESO].in_features
    n = batcher.n_meso
    chunks = [np.arange(a, min(a + batch_size, n), dtype=np.int64) for a in range(0, n, batch_size)]
    regions = batcher.regions()
    region_chunks = [regions[a : a + batch_size] for a in range(0, regions.size, batch_size)]
    local = {side: np.zeros((n, d), dtype=np.float32) for side in sides}

    def rows(side: str, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(local[side][ids]).to(device)

    total = 2 * len(chunks) + len(region_chunks)
    with torch.no_grad(), tqdm(total=total, desc="embedding", disable=not settings.progress_bar or total < 2) as bar:
        for ids in chunks:
            batch = batcher.batch(ids, max_micro_pairs=None, context=False)
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            for side, enc in encoders.items():
                z, h = enc.local_states(batch, side)
                local[side][ids] = h.float().cpu().numpy()
                if Levels.MICRO in z:
                    micro = batch["micro_ids"][batch["micro_target"]].cpu().numpy()
                    yield Levels.MICRO, side, micro, z[Levels.MICRO].float().cpu().numpy()
            del batch
            release_memory()  # batches differ in size: keep the heap at one batch (see SigmmaModule)
            bar.update()
        for ids in chunks:
            ball, edges = batcher.meso_context(ids)
            edges_t = torch.as_tensor(edges).to(device)
            for side, enc in encoders.items():
                z = enc.meso_embedding(rows(side, ball), edges_t, ids.size)
                yield Levels.MESO, side, ids, z.float().cpu().numpy()
            bar.update()
        for ids in region_chunks:
            reg = batcher.region_batch(ids)
            dst = torch.as_tensor(reg["region_dst"]).to(device)
            for side, enc in encoders.items():
                if Levels.MACRO not in enc.levels:
                    continue
                x = torch.as_tensor(reg[f"macro_{side}"]).to(device)
                z = enc.macro_embedding(x, rows(side, reg["region_src"]), dst)
                yield Levels.MACRO, side, ids, z.float().cpu().numpy()
            bar.update()


def _sides(module: SigmmaModule, expression: bool) -> tuple[str, ...]:
    return ("img", "expr") if (expression and module.expr is not None) else ("img",)


def _embedded(module: SigmmaModule, batcher: SubgraphBatcher, expression: bool) -> dict[str, dict[str, bool]]:
    """``{level: {side: whether the module embeds it}}`` for the batcher's levels."""
    sides = _sides(module, expression)
    out: dict[str, dict[str, bool]] = {}
    for lv in batcher.use_levels:
        out[lv] = {}
        for side in ("img", "expr"):
            enc = module.img if side == "img" else module.expr
            out[lv][side] = side in sides and enc is not None and lv in enc.levels
    return out


def embed_nodes(
    module: SigmmaModule, batcher: SubgraphBatcher, *, batch_size: int, expression: bool
) -> dict[str, dict[str, np.ndarray | None]]:
    """Embeddings of every node of the used levels, ``{level: {"img": (n, d), "expr": (n, d) | None}}``.

    Every node's row is held at once (what :func:`embed_units` avoids). Nodes never reached (a
    micro node outside every subgraph, a region that is nobody's parent) stay at zero.
    """
    d = module.img.head[Levels.MESO].out_features
    has = _embedded(module, batcher, expression)
    out = {
        lv: {side: np.zeros((batcher.levels[lv].n, d), dtype=np.float32) if ok else None for side, ok in s.items()}
        for lv, s in has.items()
    }
    for lv, side, ids, emb in _node_batches(module, batcher, batch_size=batch_size, expression=expression):
        out[lv][side][ids] = emb
    return out


def embed_units(
    module: SigmmaModule,
    batcher: SubgraphBatcher,
    unit_level: str,
    n_units: int,
    *,
    batch_size: int,
    expression: bool,
    context_weight: float = 1.0,
) -> dict[str, np.ndarray | None]:
    """Per-unit embeddings straight from the subgraph batches (what ``Sigmma.get_embeddings`` returns).

    The outputs are allocated once (float32) and filled batch by batch: each batch's node
    embeddings go to the rows of their units and are dropped, so memory is the output plus one
    batch, never a per-level array of every node. Same values as :func:`unit_embeddings` of
    :func:`embed_nodes`.
    """
    d = module.img.head[Levels.MESO].out_features
    writer = UnitEmbeddingWriter(batcher.levels, unit_level, n_units, _embedded(module, batcher, expression), d)
    for lv, side, ids, emb in _node_batches(module, batcher, batch_size=batch_size, expression=expression):
        writer.add(lv, side, ids, emb)
    return writer.finish(context_weight=context_weight)


def unit_node_index(levels: dict[str, LevelInput], unit_level: str, n_units: int) -> dict[str, np.ndarray]:
    """``{level: (n_units,) node index}`` for the unit level and every coarser level (``-1``: none).

    The unit level's ``members`` gives each unit's node; ``parent`` arrays lead upwards.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> meso = LevelInput("meso", 2, np.zeros((2, 0), "int64"), np.array([0, 0]), None, sp.identity(2, format="csr"))
    >>> macro = LevelInput("macro", 1, np.zeros((2, 0), "int64"), None, None, None)
    >>> unit_node_index({"meso": meso, "macro": macro}, "meso", 2)["macro"].tolist()
    [0, 0]
    """
    members = levels[unit_level].members
    if members is None:
        raise ValueError(f"the unit level {unit_level!r} has no members: cannot map table units to nodes.")
    coo = sp.coo_matrix(members)
    node = np.full(n_units, -1, dtype=np.int64)
    node[coo.col] = coo.row
    out = {unit_level: node}
    order = [lv for lv in Levels.ALL if lv in levels]
    for finer, coarser in zip(order[order.index(unit_level) :], order[order.index(unit_level) + 1 :]):
        parent = levels[finer].parent
        if parent is None:
            break
        prev = out[finer]
        out[coarser] = np.where(prev >= 0, parent[np.maximum(prev, 0)], -1)
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _units_of_nodes(node: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, units)``: the units of node ``i`` are ``units[indptr[i]:indptr[i + 1]]`` (``-1``: no node)."""
    ok = node >= 0
    indptr = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(node[ok], minlength=n_nodes), out=indptr[1:])
    return indptr, np.flatnonzero(ok)[np.argsort(node[ok], kind="stable")]


def _expand(indptr: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``indptr[i] .. indptr[i + 1]`` of every ``i`` in ``ids``, and which entry of ``ids`` each came from."""
    start, count = indptr[ids], indptr[ids + 1] - indptr[ids]
    which = np.repeat(np.arange(len(ids)), count)
    return np.repeat(start - np.cumsum(count) + count, count) + np.arange(int(count.sum())), which


class UnitEmbeddingWriter:
    """Per-unit embedding arrays, filled from node embeddings as they come (the contract of ``Sigmma.get_embeddings``).

    ``"{level}_{img|expr}"``: the embedding of the unit's node at that level (unit norm); for levels
    finer than the units (nuclei inside spots) the normalised mean of the unit's children, which
    must all come in one :meth:`add`. ``"img"`` / ``"expr"`` (:meth:`finish`): the concatenation of
    the unit-level block and the coarser blocks (each unit norm, the coarser ones scaled by
    ``context_weight``), re-normalised. ``"joint"``: normalised ``img + expr`` (``img`` alone
    without expression). A node given twice keeps the last embedding.

    Parameters
    ----------
    levels
        The model's level inputs (``members`` of the unit level, ``parent`` arrays).
    unit_level
        Level whose nodes are the units.
    n_units
        Units (table rows).
    embedded
        ``{level: {side: bool}}``: which blocks exist (the others are ``None``).
    dim
        Embedding size of a block.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> meso = LevelInput("meso", 2, np.zeros((2, 0), "int64"), None, None, sp.identity(2, format="csr"))
    >>> w = UnitEmbeddingWriter({"meso": meso}, "meso", 2, {"meso": {"img": True, "expr": False}}, 2)
    >>> w.add("meso", "img", np.array([1, 0]), np.array([[0.0, 2.0], [3.0, 4.0]], np.float32))
    >>> w.finish()["img"]
    array([[0.6, 0.8],
           [0. , 1. ]], dtype=float32)
    """

    #: Units per block of the final concatenation (bounds its temporaries).
    CHUNK = 65_536

    def __init__(
        self,
        levels: dict[str, LevelInput],
        unit_level: str,
        n_units: int,
        embedded: dict[str, dict[str, bool]],
        dim: int,
    ) -> None:
        self.levels, self.unit_level, self.n_units = levels, unit_level, int(n_units)
        idx = unit_node_index(levels, unit_level, self.n_units)
        self._order = [lv for lv in Levels.ALL if lv in embedded]
        # node -> its units (CSR): each batch's rows are scattered to the units without a per-node array.
        self._units: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for lv in idx:
            if lv in embedded or lv == unit_level:
                self._units[lv] = _units_of_nodes(idx[lv], levels[lv].n)
        self.out: dict[str, np.ndarray | None] = {}
        for lv in self._order:
            for side in ("img", "expr"):
                self.out[f"{lv}_{side}"] = np.zeros((self.n_units, dim), np.float32) if embedded[lv][side] else None
        self._concat = [lv for lv in self._order if lv in idx and self.out[f"{lv}_img"] is not None]

    def add(self, level: str, side: str, ids: np.ndarray, emb: np.ndarray) -> None:
        """Write the embeddings ``emb`` ``(n, d)`` of the nodes ``ids`` of ``level`` into their units' rows."""
        target = self.out[f"{level}_{side}"]
        if target is None or len(ids) == 0:
            return
        ids = np.asarray(ids, dtype=np.int64)
        if level in self._units:
            indptr, units = self._units[level]
            pos, which = _expand(indptr, ids)
            target[units[pos]] = _normalize(emb)[which]
            return
        # Finer than the units: the mean of each unit node's children (summed in node order, float64).
        parent = self.levels[level].parent
        order = np.argsort(ids, kind="stable")
        ids, emb = ids[order], emb[order]
        ok = parent[ids] >= 0
        nodes, inverse = np.unique(parent[ids[ok]], return_inverse=True)
        acc = np.zeros((len(nodes), emb.shape[1]), dtype=np.float64)
        np.add.at(acc, inverse, emb[ok])
        indptr, units = self._units[self.unit_level]
        pos, which = _expand(indptr, nodes)
        target[units[pos]] = _normalize(acc)[which]

    def finish(self, *, context_weight: float = 1.0) -> dict[str, np.ndarray | None]:
        """Return the per-level blocks and their concatenations ``img`` / ``expr`` / ``joint`` (built by blocks of units)."""
        out = self.out
        concat = self._concat
        # The finest block is the unit's own view; a model without the unit level (the single-scale
        # baseline on cells) has its meso block there, which must not be weighted away as context.
        own = concat[0] if concat else self.unit_level
        width = len(concat) * (out[f"{concat[0]}_img"].shape[1] if concat else 0)
        for side in ("img", "expr"):
            blocks = [out[f"{lv}_{side}"] for lv in concat]
            out[side] = (
                np.zeros((self.n_units, width), np.float32) if blocks and all(b is not None for b in blocks) else None
            )
        both = out["img"] is not None and out["expr"] is not None
        if both:
            out["joint"] = np.zeros((self.n_units, width), np.float32)
        for r0 in range(0, self.n_units, self.CHUNK):
            rows = slice(r0, min(r0 + self.CHUNK, self.n_units))
            for side in ("img", "expr"):
                if out[side] is not None:
                    blocks = [out[f"{lv}_{side}"][rows] for lv in concat]
                    blocks = [b if lv == own else context_weight * b for lv, b in zip(concat, blocks)]
                    out[side][rows] = _normalize(np.concatenate(blocks, axis=1))
            if both:
                out["joint"][rows] = _normalize(out["img"][rows] + out["expr"][rows])
        if not both:
            out["joint"] = out["img"]
        return out


def unit_embeddings(
    node_emb: dict[str, dict[str, np.ndarray | None]],
    levels: dict[str, LevelInput],
    unit_level: str,
    n_units: int,
    *,
    context_weight: float = 1.0,
) -> dict[str, np.ndarray | None]:
    """Per-unit embeddings from every node's embedding (see :class:`UnitEmbeddingWriter`)."""
    dim = next((e.shape[1] for s in node_emb.values() for e in s.values() if e is not None), 0)
    embedded = {lv: {side: e is not None for side, e in s.items()} for lv, s in node_emb.items()}
    writer = UnitEmbeddingWriter(levels, unit_level, n_units, embedded, dim)
    for lv, sides in node_emb.items():
        for side, emb in sides.items():
            if emb is not None:
                writer.add(lv, side, np.arange(len(emb)), emb)
    return writer.finish(context_weight=context_weight)
