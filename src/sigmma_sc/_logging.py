"""The package logger, ``logging.getLogger("sigmma_sc")``."""

from __future__ import annotations

import logging

logger = logging.getLogger("sigmma_sc")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
