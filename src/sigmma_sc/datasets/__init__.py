"""Real public data sets as SpatialData objects, and a synthetic tissue generator."""

from ._her2st import her2st, her2st_sections
from ._paths import DATA_DIR_ENV, local_dataset_dir, resolve_dataset_dir
from ._single import visium_hd_kidney, visium_mouse_brain, xenium_lung
from ._synthetic import section_shifts, synthetic

__all__ = [
    "DATA_DIR_ENV",
    "her2st",
    "her2st_sections",
    "local_dataset_dir",
    "resolve_dataset_dir",
    "section_shifts",
    "synthetic",
    "visium_hd_kidney",
    "visium_mouse_brain",
    "xenium_lung",
]
