"""Stain normalisation (Macenko, Reinhard) and H&E colour augmentation, in plain numpy.

A normaliser is fitted once per section image (on a thumbnail) and then applied tile by tile, so
that the tiles of one slide share one colour transform (no seams between tiles).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sigmma_sc._constants import Keys
from sigmma_sc.io import validate

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

# Reference H&E optical-density stain vectors (columns: hematoxylin, eosin) and 99th-percentile
# concentrations of Macenko et al. 2009, the usual default target.
_MACENKO_REF_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
_MACENKO_REF_MAXC = np.array([1.9705, 1.0308])
# Reinhard target: mean / std of L*a*b* channels of a typical H&E (tissue pixels).
_REINHARD_REF = (np.array([62.0, 30.0, -12.0]), np.array([15.0, 10.0, 7.0]))
_IO = 255.0  # transmitted light intensity
_OD_BACKGROUND = 0.15  # optical density below which a pixel is glass
# Ruifrok & Johnston H, E, DAB stain vectors: the colour space of HED jitter.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_GLASS_L = 88.0  # L* above which a pixel is glass (Reinhard statistics)
_THUMB_PX = 2048  # side of the thumbnail a per-slide normaliser is fitted on


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)


def _tissue(od: np.ndarray) -> np.ndarray:
    return np.all(od > _OD_BACKGROUND, axis=1)


def _macenko_fit(rgb: np.ndarray, *, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Stain matrix (3 x 2, H then E) and 99th-percentile concentrations of an H&E image."""
    od = _od(rgb)
    od = od[_tissue(od)]
    if len(od) < 100:
        raise ValueError(
            "too few tissue pixels to fit Macenko stain vectors (optical density > 0.15 in every channel); "
            "is this an H&E image with tissue?"
        )
    # The two main directions of tissue OD span the H&E plane; the extreme angles in it are the stains.
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Hematoxylin absorbs more red than eosin does: order the vectors H, E.
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains *= np.sign(stains.sum(axis=0, keepdims=True))
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, np.percentile(conc, 99, axis=1)


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
    # Statistics of tissue only (glass would dominate them); lightness decides, not colour, so the
    # same tissue stained differently keeps the same pixels.
    tissue = lab[:, 0] < _GLASS_L
    if tissue.sum() >= 100:
        lab = lab[tissue]
    return lab.mean(axis=0), lab.std(axis=0) + 1e-6


@dataclass
class StainNormalizer:
    """A fitted stain normaliser: source statistics of one slide and the reference's.

    Use :func:`fit_stain_normalizer` to build one; :meth:`transform` applies it to any tile of
    that slide.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> img = rng.integers(80, 230, (64, 64, 3), dtype=np.uint8)
    >>> norm = fit_stain_normalizer(img, method="reinhard")
    >>> norm.transform(img).shape
    (64, 64, 3)
    """

    method: str
    source: tuple[np.ndarray, np.ndarray]
    target: tuple[np.ndarray, np.ndarray]
    id: str = field(default="")

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Normalise ``(..., 3)`` uint8 RGB pixels."""
        shape = rgb.shape
        if self.method == "macenko":
            stains, maxc = self.source
            ref_stains, ref_maxc = self.target
            od = _od(rgb)
            conc = np.linalg.pinv(stains) @ od.T
            conc *= (ref_maxc / np.maximum(maxc, 1e-6))[:, None]
            out = _IO * np.exp(-(ref_stains @ conc)).T - 1.0
        else:
            from skimage.color import lab2rgb, rgb2lab

            (mu, sd), (mu_t, sd_t) = self.source, self.target
            lab = rgb2lab(rgb.reshape(-1, 1, 3)).reshape(-1, 3)
            lab = (lab - mu) / sd * sd_t + mu_t
            out = lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3) * 255.0
        return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(shape)


def stain_target_id(method: str, reference: np.ndarray | None) -> str:
    """Short id of a stain normalisation target (part of the feature cache key)."""
    return _target(method, reference)[1]


def _target(method: str, reference: np.ndarray | None) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    if reference is None:
        return ((_MACENKO_REF_STAINS, _MACENKO_REF_MAXC) if method == "macenko" else _REINHARD_REF), "default"
    ref = np.asarray(reference)
    if ref.ndim != 3 or ref.shape[-1] != 3:
        raise ValueError(f"reference must be an (height, width, 3) RGB image, got shape {ref.shape}.")
    ref = _thumbnail(ref)
    stats = _macenko_fit(ref) if method == "macenko" else _lab_stats(ref)
    digest = np.round(np.concatenate([np.ravel(s) for s in stats]), 3)
    return stats, "ref" + hashlib.sha1(digest.tobytes()).hexdigest()[:6]


def _thumbnail(rgb: Any) -> np.ndarray:
    step = max(1, int(np.ceil(max(rgb.shape[:2]) / _THUMB_PX)))
    return np.asarray(rgb[::step, ::step])


def fit_stain_normalizer(
    image: Any, *, method: str = "macenko", reference: np.ndarray | None = None
) -> StainNormalizer:
    """Fit a stain normaliser on one slide.

    Parameters
    ----------
    image
        ``(height, width, 3)`` uint8 RGB (numpy or dask; a strided thumbnail of about 2,000 px is used).
    method
        ``"macenko"`` (stain vectors by optical-density SVD, Macenko et al. 2009) or ``"reinhard"``
        (L*a*b* mean / std matching, Reinhard et al. 2001).
    reference
        Target image; default: the standard H&E reference of the method.

    Returns
    -------
    The fitted normaliser.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).integers(60, 200, (32, 32, 3), dtype=np.uint8)
    >>> fit_stain_normalizer(img, method="macenko").method
    'macenko'
    """
    if method not in ("macenko", "reinhard"):
        raise ValueError(f"method must be 'macenko' or 'reinhard', got {method!r}.")
    target, ref_id = _target(method, reference)
    thumb = _thumbnail(image)
    source = _macenko_fit(thumb) if method == "macenko" else _lab_stats(thumb)
    return StainNormalizer(method=method, source=source, target=target, id=f"{method}-{ref_id}")


def normalize_stain(
    image_or_sdata: np.ndarray | SpatialData,
    *,
    method: str = "macenko",
    reference: np.ndarray | None = None,
    table_key: str = Keys.TABLE,
    level: int | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """Normalise H&E colours to a reference (Macenko or Reinhard).

    Parameters
    ----------
    image_or_sdata
        An ``(height, width, 3)`` uint8 RGB array, or a SpatialData whose section images are normalised.
    method
        ``"macenko"`` or ``"reinhard"``.
    reference
        Target RGB image; default: the method's standard H&E reference.
    table_key
        Table annotating the units (SpatialData input).
    level
        Pyramid level returned for SpatialData input (default: the finest level whose longer side
        is at most 4,096 px, to bound memory). The data are not modified.

    Returns
    -------
    The normalised uint8 array, or ``{section: normalised array}`` for SpatialData. To normalise
    before encoding, pass ``stain_normalize=method`` to :func:`sigmma_sc.pp.image_features` instead:
    it fits once per slide and normalises tile by tile.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(300, n_genes=20, n_sections=2, seed=0)
    >>> thumbs = sg.pp.normalize_stain(sdata, method="macenko")
    >>> {section: img.shape for section, img in thumbs.items()}
    {'S0': (440, 440, 3), 'S1': (440, 440, 3)}
    >>> he = sg.pp.normalize_stain(thumbs["S0"], method="reinhard", reference=thumbs["S1"])
    >>> he.shape, he.dtype
    ((440, 440, 3), dtype('uint8'))
    """
    if isinstance(image_or_sdata, np.ndarray):
        return fit_stain_normalizer(image_or_sdata, method=method, reference=reference).transform(image_or_sdata)
    slide = validate(image_or_sdata, table_key=table_key)
    out = {}
    for name, img in slide.images.items():
        lv = level
        if lv is None:
            fits = [i for i in range(img.n_levels) if max(img.shape) / img.level_factors[i] <= 4096]
            lv = fits[0] if fits else img.n_levels - 1
        arr = np.asarray(img.level_array(lv))
        out[name] = fit_stain_normalizer(arr, method=method, reference=reference).transform(arr)
    return out


def hed_jitter(
    images: np.ndarray, *, sigma: float = 0.03, bias: float = 0.03, seed: int | np.random.Generator | None = None
) -> np.ndarray:
    """Colour augmentation for training views: random scaling and shift of each H, E, DAB channel.

    Parameters
    ----------
    images
        ``(..., h, w, 3)`` uint8 RGB (one image or a batch; each image gets its own draw).
    sigma
        Multiplicative jitter: factor drawn from ``U(1 - sigma, 1 + sigma)`` per channel.
    bias
        Additive jitter in optical density: ``U(-bias, bias)`` per channel.
    seed
        Random seed or generator.

    Returns
    -------
    Augmented uint8 images of the same shape.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.full((2, 8, 8, 3), 150, np.uint8)
    >>> hed_jitter(x, seed=0).shape
    (2, 8, 8, 3)
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    arr = np.asarray(images)
    batch = arr.reshape((-1, *arr.shape[-3:]))
    n = batch.shape[0]
    od = -np.log((batch.astype(np.float64) + 1.0) / _IO)
    hed = od @ _HED_FROM_RGB
    alpha = rng.uniform(1 - sigma, 1 + sigma, (n, 1, 1, 3))
    beta = rng.uniform(-bias, bias, (n, 1, 1, 3))
    od_aug = (hed * alpha + beta) @ _RGB_FROM_HED
    out = _IO * np.exp(-od_aug) - 1.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(arr.shape)
