"""Where the public data sets live: an explicit path, ``$SIGMMA_DATA_DIR``, ``../shared/data``, or a download.

Resolution order for a data set folder (e.g. ``her2st``):

1. ``path=`` given by the user: the data set's own folder (or a folder holding it);
2. the environment variable ``SIGMMA_DATA_DIR``: a folder holding the data set folders;
3. ``../shared/data`` next to the repository (a development checkout);
4. a pooch cache, filled from the public source when the data set has one.

Offline (or for data sets without a public file-level source) the error names every place that
was looked at and how to point at the data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sigmma_sc._logging import logger

DATA_DIR_ENV = "SIGMMA_DATA_DIR"
_CACHE_NAME = "sigmma-sc"

# Files (glob patterns) a data set folder must hold for its loader.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "her2st": ("counts/*.tsv.gz", "spots/*_selection.tsv", "images/*"),
    "deepspot_NCBI858": ("NCBI858.h5ad", "NCBI858.jpg"),
    "squidpy_tests": ("test_data.h5ad", "test_img.jpg"),
    "visiumhd_kidney": ("kidney_16um_hvg1000.h5ad", "he_2um.jpg"),
}
KIDNEY_CROP_FILES: tuple[str, ...] = ("fixture_16um_crop.h5ad", "fixture_he_crop.png")


@dataclass(frozen=True)
class _Remote:
    """Public files of one data set: ``(local relative path, url)`` pairs."""

    source: str
    files: tuple[tuple[str, str], ...]


def _her2st_remote() -> _Remote:
    # The public almaan/her2st repository holds H&E images for patient C (sections C2-C6) only.
    base = "https://github.com/almaan/her2st/raw/85df741/data"
    images = {
        "C2": "5714_HE_BT_C2.jpg",
        "C3": "5714_HE_BT_D1.jpg",
        "C4": "5714_HE_BT_D2.jpg",
        "C5": "5714_HE_BT_E1.jpg",
        "C6": "5714_HE_BT_E2.jpg",
    }
    files: list[tuple[str, str]] = []
    for s, img in images.items():
        files.append((f"counts/{s}.tsv.gz", f"{base}/ST-cnts/{s}.tsv.gz"))
        files.append((f"spots/{s}_selection.tsv", f"{base}/ST-spotfiles/{s}_selection.tsv"))
        files.append((f"images/{s}_{img}", f"{base}/ST-imgs/{s[0]}/{s}/{img}"))
    return _Remote("github.com/almaan/her2st @85df741 (Andersson et al., Nat Commun 2021)", tuple(files))


_REMOTES: dict[str, _Remote] = {
    "her2st": _her2st_remote(),
    "deepspot_NCBI858": _Remote(
        "github.com/ratschlab/DeepSpot @b1aeaed example_data/ (HEST-1k NCBI858 subsample)",
        (
            ("NCBI858.h5ad", "https://github.com/ratschlab/DeepSpot/raw/b1aeaed/example_data/data/h5ad/NCBI858.h5ad"),
            ("NCBI858.jpg", "https://github.com/ratschlab/DeepSpot/raw/b1aeaed/example_data/data/image/NCBI858.jpg"),
            ("NCBI858.json", "https://github.com/ratschlab/DeepSpot/raw/b1aeaed/example_data/data/meta/NCBI858.json"),
        ),
    ),
    "squidpy_tests": _Remote(
        "github.com/scverse/squidpy @be17fcf tests/_data/ (10x V1_Adult_Mouse_Brain crop)",
        (
            ("test_data.h5ad", "https://github.com/scverse/squidpy/raw/be17fcf/tests/_data/test_data.h5ad"),
            ("test_img.jpg", "https://github.com/scverse/squidpy/raw/be17fcf/tests/_data/test_img.jpg"),
        ),
    ),
    # visiumhd_kidney: bins re-binned and registered from the Celldega web-viewer tiles of the 10x
    # "Visium HD FFPE Human Kidney" data set; there is no public file-level copy to download.
}


def repo_data_dir() -> Path:
    """``../shared/data`` relative to the repository holding this package (a development checkout).

    Returns
    -------
    The path; it may not exist (e.g. for an installed wheel).

    Examples
    --------
    >>> from sigmma_sc.datasets._paths import repo_data_dir
    >>> repo_data_dir().name
    'data'
    """
    # src/sigmma_sc/datasets/_paths.py -> parents[3] is the repository root.
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def cache_dir() -> Path:
    """Return the pooch cache folder downloads go to (``~/.cache/sigmma-sc`` on Linux).

    Examples
    --------
    >>> from sigmma_sc.datasets._paths import cache_dir
    >>> cache_dir().name
    'sigmma-sc'
    """
    import pooch

    return Path(pooch.os_cache(_CACHE_NAME))


def _has_all(folder: Path, required: Sequence[str]) -> bool:
    return folder.is_dir() and all(any(folder.glob(pattern)) for pattern in required)


def _download(name: str, remote: _Remote, target: Path) -> None:
    import pooch

    logger.info(f"Downloading '{name}' from {remote.source} into {target}.")
    for rel, url in remote.files:
        dest = target / rel
        pooch.retrieve(url, known_hash=None, fname=dest.name, path=dest.parent, progressbar=False)


def _local_candidates(name: str) -> list[str]:
    places = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        places.append(f"${DATA_DIR_ENV}/{name} = {Path(env).expanduser() / name}")
    places.append(f"../shared/data/{name} next to the repository = {repo_data_dir() / name}")
    return places


def local_dataset_dir(name: str, *, required: Sequence[str]) -> Path | None:
    """Return the data set folder under ``$SIGMMA_DATA_DIR`` or ``../shared/data``, without downloading.

    Parameters
    ----------
    name
        Folder name of the data set, e.g. ``"her2st"``.
    required
        Glob patterns, relative to the data set folder, that must each match at least one file.

    Returns
    -------
    The folder, or ``None`` when neither place holds the data set (tests skip on ``None``).

    Examples
    --------
    >>> from sigmma_sc.datasets import local_dataset_dir
    >>> folder = local_dataset_dir("her2st", required=["counts/*.tsv.gz"])
    """
    env = os.environ.get(DATA_DIR_ENV)
    candidates = [Path(env).expanduser() / name] if env else []
    candidates.append(repo_data_dir() / name)
    for candidate in candidates:
        if _has_all(candidate, required):
            return candidate
    return None


def resolve_dataset_dir(name: str, path: str | os.PathLike | None = None, *, required: Sequence[str]) -> Path:
    """Find the folder of the public data set ``name``, downloading it into a cache if needed.

    Parameters
    ----------
    name
        Folder name of the data set, e.g. ``"her2st"``.
    path
        Explicit folder of the data set (or a folder holding a ``name`` folder). When given, nothing
        else is tried.
    required
        Glob patterns, relative to the data set folder, that must each match at least one file.

    Returns
    -------
    The data set folder.

    Raises
    ------
    FileNotFoundError
        When the data are nowhere to be found and cannot be downloaded; the message lists the
        places looked at and how to point at the data (``path=`` or ``$SIGMMA_DATA_DIR``).

    Examples
    --------
    >>> from sigmma_sc.datasets._paths import resolve_dataset_dir
    >>> folder = resolve_dataset_dir("her2st", required=["counts/*.tsv.gz"])
    """
    pattern_text = ", ".join(required)
    if path is not None:
        folder = Path(path).expanduser()
        for candidate in (folder, folder / name):
            if _has_all(candidate, required):
                return candidate
        raise FileNotFoundError(
            f"path={str(folder)!r} does not hold the '{name}' data set (expected files matching {pattern_text}); "
            f"pass the '{name}' folder itself or a folder that contains it."
        )

    found = local_dataset_dir(name, required=required)
    if found is not None:
        return found
    tried = _local_candidates(name)

    remote = _REMOTES.get(name)
    if remote is not None:
        target = cache_dir() / name
        if _has_all(target, required):
            return target
        try:
            _download(name, remote, target)
        except Exception as err:  # any network / HTTP failure means "offline" to the user
            tried.append(f"download from {remote.source} into {target} failed: {type(err).__name__}: {err}")
        else:
            if _has_all(target, required):
                return target
            tried.append(f"download into {target} did not produce files matching {pattern_text}")
    else:
        tried.append(f"'{name}' has no public file-level source to download from")

    places = "\n  - ".join(tried)
    raise FileNotFoundError(
        f"Could not find the '{name}' data set (files matching {pattern_text}). Looked at:\n  - {places}\n"
        f"Point at it with `path='/folder/{name}'`, or set the environment variable {DATA_DIR_ENV} to a folder "
        f"that holds a '{name}' folder."
    )
