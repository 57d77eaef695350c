"""Global settings: verbosity, seed and progress bars."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ._constants import Defaults
from ._logging import logger

_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}
# Names as scanpy accepts them (``sc.settings.verbosity = "info"``).
_NAMES = {"error": 0, "warning": 1, "info": 2, "debug": 3}


class Settings:
    """Package-wide settings, in the spirit of :data:`scanpy.settings`.

    Attributes
    ----------
    verbosity
        0 errors, 1 warnings, 2 info (default), 3 debug; or the names ``"error"``, ``"warning"``,
        ``"info"``, ``"debug"`` (as scanpy's). Sets the level of the ``sigmma_sc`` logger, whose
        records propagate to the root logger (see :mod:`sigmma_sc._logging`).
    seed
        Default random seed used when a function's ``seed`` is ``None``.
    progress_bar
        Show tqdm / Lightning progress bars.
    num_workers
        Worker processes that build the training and validation subgraph batches (a PyTorch
        ``DataLoader``'s ``num_workers``); 0: in the main process. The batches, and so the model,
        are the same for every value.
    cachedir
        Folder for what must survive an interrupted run: the checkpoints of a :func:`sigmma_sc.tl.fit`
        without ``checkpoint_dir`` (so ``resume=True`` finds them) and the per-section image features
        of an unfinished :func:`sigmma_sc.pp.image_features`. Both are removed when their run
        succeeds. Also the decoded image pyramids of the data-set loaders (``images/``, see
        :func:`sigmma_sc.io.read_rgb_pyramid`), kept so loaded slides read their pixels lazily.
        Default: ``$SIGMMA_CACHE_DIR``, else ``$XDG_CACHE_HOME/sigmma_sc``
        (``~/.cache/sigmma_sc``). Safe to delete between runs (not while a loaded slide still reads from it).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sg.settings.verbosity = 1
    >>> sg.settings.progress_bar = False
    """

    def __init__(self) -> None:
        self._verbosity = 2
        self.seed: int = Defaults.SEED
        self.progress_bar: bool = True
        self.num_workers: int = 0
        self._cachedir: Path | None = None

    @property
    def verbosity(self) -> int:
        """Logging verbosity, 0 (errors only) to 3 (debug)."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        level = _NAMES.get(value.lower()) if isinstance(value, str) else value
        if isinstance(level, bool) or level not in _LEVELS:
            raise ValueError(f"verbosity must be one of {sorted(_LEVELS)} or {sorted(_NAMES)}, got {value!r}.")
        self._verbosity = int(level)
        logger.setLevel(_LEVELS[self._verbosity])

    @property
    def cachedir(self) -> Path:
        """Folder of the interrupt-safe caches (checkpoints, per-section features)."""
        if self._cachedir is not None:
            return self._cachedir
        env = os.environ.get(Defaults.CACHE_DIR_ENV)
        if env:
            return Path(env).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base).expanduser() / "sigmma_sc"

    @cachedir.setter
    def cachedir(self, value: str | os.PathLike | None) -> None:
        self._cachedir = None if value is None else Path(os.fspath(value)).expanduser()

    def __repr__(self) -> str:
        return (
            f"Settings(verbosity={self.verbosity}, seed={self.seed}, "
            f"progress_bar={self.progress_bar}, num_workers={self.num_workers}, cachedir={str(self.cachedir)!r})"
        )


settings = Settings()
