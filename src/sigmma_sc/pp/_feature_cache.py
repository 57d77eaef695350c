"""Per-section image features on disk, so an interrupted :func:`~sigmma_sc.pp.image_features` resumes.

While :func:`~sigmma_sc.pp.image_features` runs, every finished section's features are written to
``settings.cachedir / "features"``, in a file named after what determines them: the feature key
(encoder, method, fields of view, stain), the image content (:func:`sigmma_sc._utils.image_digest`),
the node centres of each level and the options that shape the encoder's batches. A rerun after an
interrupt reads the finished sections instead of encoding them again; a successful call removes
its files (the features are then in the table).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from sigmma_sc._constants import Defaults
from sigmma_sc._logging import logger
from sigmma_sc._settings import settings
from sigmma_sc._utils import array_digest, image_digest

#: Folder of the per-section feature files inside ``settings.cachedir``.
FEATURES_FOLDER = "features"


class SectionFeatureCache:
    """The disk files of one :func:`~sigmma_sc.pp.image_features` call, one per section.

    Parameters
    ----------
    key_id
        The feature key's id (encoder, method, views, stain).
    options
        Other options that change the features (e.g. ``batch_size``, ``downsample``).
    """

    def __init__(self, key_id: str, **options: Any) -> None:
        self.key_id = key_id
        self.options = dict(sorted(options.items()))
        self.folder = Path(settings.cachedir) / FEATURES_FOLDER
        self._used: list[Path] = []

    def _path(self, image: Any, centers_um: dict[str, np.ndarray], fov_um: dict[str, float]) -> Path:
        pyramid = [image.level_array(lv) for lv in range(image.n_levels)]
        levels = sorted(centers_um)
        digest = array_digest(
            *(np.asarray(centers_um[lv], dtype=np.float64) for lv in levels),
            extra=(
                self.key_id,
                image_digest(pyramid, samples=Defaults.FINGERPRINT_SAMPLES),
                [(lv, float(fov_um[lv])) for lv in levels],
                self.options,
            ),
        )
        return self.folder / f"{digest[:32]}.npz"

    def load(
        self, image: Any, centers_um: dict[str, np.ndarray], fov_um: dict[str, float]
    ) -> dict[str, np.ndarray] | None:
        """Read the section's features of an earlier, interrupted call (``None`` when not on disk or unreadable)."""
        path = self._path(image, centers_um, fov_um)
        self._used.append(path)
        if not path.is_file():
            return None
        try:
            with np.load(path) as f:
                feats = {lv: np.asarray(f[lv], dtype=np.float32) for lv in centers_um}
        except Exception as exc:  # a damaged file is recomputed, never trusted
            logger.info(f"feature cache {path} unreadable ({exc}): recomputing the section")
            return None
        if any(feats[lv].shape[0] != len(centers_um[lv]) for lv in centers_um):
            return None
        logger.info(f"image features of a section read from the interrupted run's cache {path}")
        return feats

    def store(self, feats: dict[str, np.ndarray]) -> None:
        """Write the features of the section last passed to :meth:`load` (atomically: a temporary file, then a rename)."""
        path = self._used[-1]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
            np.savez(tmp, **{lv: np.asarray(f, dtype=np.float32) for lv, f in feats.items()})
            os.replace(tmp, path)
        except OSError as exc:  # a read-only or full cache folder only costs the resume
            logger.warning(f"could not cache the section's image features in {self.folder} ({exc})")

    def clear(self) -> None:
        """Remove the files of this call (after it succeeded: the features are in the table)."""
        for path in self._used:
            path.unlink(missing_ok=True)
        self._used.clear()
