"""The package logger, ``logging.getLogger("sigmma_sc")``, and timed steps.

Conventions (as a scverse library): records propagate to the root logger, so an application's
logging configuration (``logging.basicConfig``, a log file, pytest's ``caplog``) sees them once.
Users who configured nothing still see INFO lines, as with scanpy (whose own logger prints to
stderr at ``sc.settings.verbosity``): a fallback stream handler prints a record only when no
handler above the package logger would, so nothing is ever printed twice. The level follows
:attr:`sigmma_sc.settings.verbosity <sigmma_sc._settings.Settings.verbosity>` (INFO by default).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Steps that run at least this many seconds log a start line (once they reach it) and an end
#: line with their time; shorter steps log their end at DEBUG only.
LONG_STEP_SECONDS = 5.0


def _handled_above(record_logger: logging.Logger) -> bool:
    # Whether a handler of an ancestor (reached by propagation) will emit the record.
    parent = record_logger.parent if record_logger.propagate else None
    while parent is not None:
        if parent.handlers:
            return True
        if not parent.propagate:
            return False
        parent = parent.parent
    return False


class _FallbackHandler(logging.StreamHandler):
    """Prints to stderr only when nothing above the package logger handles the record."""

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_above(logging.getLogger(_NAME)):
            return
        super().emit(record)


_NAME = "sigmma_sc"
logger = logging.getLogger(_NAME)
for _h in [h for h in logger.handlers if type(h).__name__ == "_FallbackHandler"]:
    logger.removeHandler(_h)  # a module reload must not stack handlers
_handler = _FallbackHandler()
_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
logger.addHandler(_handler)
logger.setLevel(logging.INFO)
logger.propagate = True


@contextmanager
def timed(step: str, *, min_seconds: float | None = None) -> Iterator[None]:
    """Log a long step's start and end with its time, also when progress bars are off.

    The start line is logged once the step has run ``min_seconds`` (default
    :data:`LONG_STEP_SECONDS`; ``0``: at once), the end line with the elapsed time when it ran at
    least that long (DEBUG otherwise). An exception (also ``KeyboardInterrupt``) logs where the
    step stopped.

    Parameters
    ----------
    step
        What runs, e.g. ``"training"``.
    min_seconds
        Threshold in seconds.

    Examples
    --------
    >>> from sigmma_sc._logging import timed
    >>> with timed("image features"):
    ...     pass
    """
    limit = LONG_STEP_SECONDS if min_seconds is None else float(min_seconds)
    t0 = time.perf_counter()
    timer = None
    if limit <= 0:
        logger.info(f"{step}: started")
    else:
        timer = threading.Timer(limit, lambda: logger.info(f"{step}: running for {limit:.0f} s..."))
        timer.daemon = True
        timer.start()
    try:
        yield
    except BaseException:
        logger.info(f"{step}: stopped after {time.perf_counter() - t0:.1f} s")
        raise
    finally:
        if timer is not None:
            timer.cancel()
    seconds = time.perf_counter() - t0
    logger.log(logging.INFO if seconds >= limit else logging.DEBUG, f"{step}: done in {seconds:.1f} s")
