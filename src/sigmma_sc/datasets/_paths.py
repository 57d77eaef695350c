"""Where the public data sets live: an explicit path, ``$SIGMMA_DATA_DIR``, ``../shared/data``, or a download.

Resolution order for a data set folder (e.g. ``her2st``):

1. ``path=`` given by the user: the data set's own folder (or a folder holding it);
2. the environment variable ``SIGMMA_DATA_DIR``: a folder holding the data set folders;
3. ``../shared/data`` next to the repository (a development checkout);
4. a pooch cache, filled from the public source when the data set has one; every download is
   checked against the SHA-256 in the data set's pooch registry (a changed or corrupt file raises).

Offline (or for data sets without a public file-level source) the error names every place that
was looked at and how to point at the data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sigmma_sc._logging import logger

if TYPE_CHECKING:  # pragma: no cover
    import pooch

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
    """Public files of one data set: ``(local relative path, url, sha256)`` triples.

    The hashes were computed from the copies in ``../shared/data``, which are the files of the
    pinned public commits (text files compared with the public repository: ``NCBI858.json``
    byte for byte, her2st ``spots/*_selection.tsv`` by size and content; binary files are the
    copies as downloaded).
    """

    source: str
    files: tuple[tuple[str, str, str], ...]

    @property
    def registry(self) -> dict[str, str]:
        """Pooch registry: ``{relative path: "sha256:<hex>"}``."""
        return {rel: f"sha256:{sha}" for rel, _, sha in self.files}

    @property
    def urls(self) -> dict[str, str]:
        """``{relative path: url}``."""
        return {rel: url for rel, url, _ in self.files}


_HER2ST_SHA256 = {
    "counts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "counts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "counts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "counts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "counts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "spots/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "spots/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "spots/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "spots/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "spots/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    "images/C2_5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "images/C3_5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "images/C4_5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "images/C5_5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "images/C6_5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
}


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
    files: list[tuple[str, str, str]] = []
    for s, img in images.items():
        for rel, url in (
            (f"counts/{s}.tsv.gz", f"{base}/ST-cnts/{s}.tsv.gz"),
            (f"spots/{s}_selection.tsv", f"{base}/ST-spotfiles/{s}_selection.tsv"),
            (f"images/{s}_{img}", f"{base}/ST-imgs/{s[0]}/{s}/{img}"),
        ):
            files.append((rel, url, _HER2ST_SHA256[rel]))
    return _Remote("github.com/almaan/her2st @85df741 (Andersson et al., Nat Commun 2021)", tuple(files))


_REMOTES: dict[str, _Remote] = {
    "her2st": _her2st_remote(),
    "deepspot_NCBI858": _Remote(
        "github.com/ratschlab/DeepSpot @b1aeaed example_data/ (HEST-1k NCBI858 subsample)",
        (
            (
                "NCBI858.h5ad",
                "https://github.com/ratschlab/DeepSpot/raw/b1aeaed/example_data/data/h5ad/NCBI858.h5ad",
                "4c1c428d0f14e5c6a47716652a91dadfa26c1c6c349093bbb4b45c1f10f445aa",
            ),
            (
                "NCBI858.jpg",
                "https://github.com/ratschlab/DeepSpot/raw/b1aeaed/example_data/data/image/NCBI858.jpg",
                "7ad9ac065f89c57ec62d9010e8352e56f99cb4fc47359f46ab3db0ccc2b21123",
            ),
            (
                "NCBI858.json",
                "https://github.com/ratschlab/DeepSpot/raw/b1aeaed/example_data/data/meta/NCBI858.json",
                "6b12f3e2cedda9ec1fb6c251ff08206ea428edde0b7397c500bef29dcaf6f1bd",
            ),
        ),
    ),
    "squidpy_tests": _Remote(
        "github.com/scverse/squidpy @be17fcf tests/_data/ (10x V1_Adult_Mouse_Brain crop)",
        (
            (
                "test_data.h5ad",
                "https://github.com/scverse/squidpy/raw/be17fcf/tests/_data/test_data.h5ad",
                "f0227d2639b803401afd65c432ac047c6f04710221dbdf7f3d70a18eff1a3766",
            ),
            (
                "test_img.jpg",
                "https://github.com/scverse/squidpy/raw/be17fcf/tests/_data/test_img.jpg",
                "b87670003e05039f8c924d53fe98f3606991c78ffc629a3ee8f56bc5dd134269",
            ),
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


def registry(name: str, target: str | os.PathLike) -> pooch.Pooch:
    """Return the pooch registry of a downloadable data set, caching into ``target``.

    Every file has its SHA-256: pooch checks each download against it (and re-downloads a cached
    file whose hash no longer matches).

    Examples
    --------
    >>> from sigmma_sc.datasets._paths import registry
    >>> sorted(registry("squidpy_tests", "/tmp/x").registry)
    ['test_data.h5ad', 'test_img.jpg']
    """
    import pooch

    if name not in _REMOTES:
        raise KeyError(f"'{name}' has no public file-level source; downloadable: {sorted(_REMOTES)}.")
    remote = _REMOTES[name]
    return pooch.create(path=Path(target), base_url="", registry=remote.registry, urls=remote.urls)


def _download(name: str, remote: _Remote, target: Path, *, downloader=None) -> None:
    logger.info(f"Downloading '{name}' from {remote.source} into {target} (SHA-256 checked).")
    files = registry(name, target)
    for rel in remote.urls:
        files.fetch(rel, downloader=downloader, progressbar=False)


def _local_candidates(name: str) -> list[str]:
    places = []
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        places.append(f"${DATA_DIR_ENV}/{name} = {Path(env).expanduser() / name}")
    places.append(f"../shared/data/{name} next to the repository = {repo_data_dir() / name}")
    return places


def display_path(folder: str | os.PathLike) -> str:
    """Name a data folder relative to the place it was found in, for logs that travel (notebooks, reports).

    Parameters
    ----------
    folder
        A data set folder, e.g. the one :func:`resolve_dataset_dir` returned.

    Returns
    -------
    ``$SIGMMA_DATA_DIR/<rel>``, ``../shared/data/<rel>`` or ``<cache>/<rel>`` when the folder lies under one of
    the package's data places; otherwise the folder as given (a path the user chose).

    Examples
    --------
    >>> from sigmma_sc.datasets._paths import display_path, repo_data_dir
    >>> display_path(repo_data_dir() / "her2st")
    '../shared/data/her2st'
    """
    folder = Path(folder).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    places = [(f"${DATA_DIR_ENV}", Path(env).expanduser())] if env else []
    places += [("../shared/data", repo_data_dir()), ("<cache>", cache_dir())]
    for label, root in places:
        try:
            rel = folder.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        return f"{label}/{rel.as_posix()}" if rel.parts else label
    return str(folder)


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
