"""Readouts from a query's image embedding to expression, chosen on held-out reference units.

Three readouts share one interface: retrieval (the ``k`` reference units whose expression embeddings
are nearest, averaged with softmax weights), a ridge head (a linear map from image embeddings to
expression, fitted on the reference's image-side embeddings) and their blend (the mean of the two
predictions). Which one, and with which ``k`` /
temperature / penalty, is decided on the reference itself: reference units are held out by section
(by spatial quadrant when the reference has one section), predicted from the other units only, and
scored by the mean per-gene Pearson r. Spots favour retrieval blended with the ridge (her2st); noisy fine bins
favour averaging many units, where a ridge or a large ``k`` wins (Visium HD kidney,
``benchmarks/README.md``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Choices, Defaults
from ._metrics import pearson_per_gene, subsample
from ._retrieve import nearest


def neighbour_weights(scores: np.ndarray, *, temperature: float = Defaults.READOUT_TEMPERATURE) -> np.ndarray:
    """Weights of the retrieved reference units: softmax over ``cosine / temperature`` per query.

    A small temperature trusts the closest matches; a large one approaches the plain mean of the
    ``k`` neighbours (BLEEP's average). Weights are positive and sum to one per row.

    Parameters
    ----------
    scores
        ``(n, k)`` cosine similarities of each query's neighbours.
    temperature
        Softmax temperature, > 0.

    Returns
    -------
    ``(n, k)`` float64 weights.

    Examples
    --------
    >>> import numpy as np
    >>> neighbour_weights(np.array([[0.5, 0.5]]))
    array([[0.5, 0.5]])
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    logits = np.asarray(scores, dtype=np.float64) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def _as_rows(expression: Any) -> Any:
    return sp.csr_matrix(expression) if sp.issparse(expression) else np.asarray(expression)


def neighbour_average(idx: np.ndarray, weights: np.ndarray, expression: Any) -> np.ndarray:
    """Row-weighted sums ``sum_j weights[i, j] * expression[idx[i, j]]`` as float32.

    One sparse ``(n, m)`` weight matrix times the expression: memory is the output plus ``n x k``
    weights, never ``n x k x n_genes``.

    Examples
    --------
    >>> import numpy as np
    >>> neighbour_average(np.array([[0, 1]]), np.array([[0.25, 0.75]]), np.array([[4.0], [8.0]]))
    array([[7.]], dtype=float32)
    """
    n, k = idx.shape
    expr = _as_rows(expression)
    w = sp.csr_matrix(
        (np.asarray(weights, np.float64).ravel(), np.asarray(idx, np.int64).ravel(), np.arange(0, n * k + 1, k)),
        shape=(n, expr.shape[0]),
    )
    out = w @ expr
    out = out.toarray() if sp.issparse(out) else np.asarray(out)
    return out.astype(np.float32)


def weighted_average(
    queries: np.ndarray,
    ref_embeddings: np.ndarray,
    ref_expression: np.ndarray,
    *,
    k: int,
    temperature: float = Defaults.READOUT_TEMPERATURE,
) -> np.ndarray:
    """Similarity-weighted mean expression of the ``k`` nearest reference units of each query.

    Parameters
    ----------
    queries
        ``(n, d)`` image embeddings of the query units.
    ref_embeddings
        ``(m, d)`` expression embeddings of the reference units.
    ref_expression
        ``(m, n_genes)`` log1p expression of the reference units (dense or sparse).
    k
        Neighbours averaged (capped at ``m``).
    temperature
        See :func:`neighbour_weights`.

    Returns
    -------
    ``(n, n_genes)`` float32 predictions on the reference's log1p scale.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.eye(3)
    >>> weighted_average(np.array([[1.0, 0.0, 0.0]]), ref, 10 * ref, k=1)
    array([[10.,  0.,  0.]], dtype=float32)
    """
    k = int(min(k, len(ref_embeddings)))
    idx, scores = nearest(queries, ref_embeddings, k)
    return neighbour_average(idx, neighbour_weights(scores, temperature=temperature), ref_expression)


def _design(x: np.ndarray) -> np.ndarray:
    # The last column is the intercept, which the penalty leaves alone.
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((len(x), 1))])


def _solve(gram: np.ndarray, cross: np.ndarray, alpha: float) -> np.ndarray:
    penalty = np.full(gram.shape[0], float(alpha))
    penalty[-1] = 0.0
    return np.linalg.solve(gram + np.diag(penalty), cross)


def heldout_groups(sections: Any, xy: np.ndarray | None) -> np.ndarray:
    """Label the groups reference units are held out by: their section, or a quadrant of a single section.

    Parameters
    ----------
    sections
        ``(m,)`` section of each reference unit (``None``: one section).
    xy
        ``(m, 2)`` unit centres (microns), used to split a single section into quadrants at the
        median x and y; ``None`` with one section gives one group (nothing can be held out).

    Returns
    -------
    ``(m,)`` integer group codes.

    Examples
    --------
    >>> import numpy as np
    >>> heldout_groups(np.array(["a", "b", "a"]), None)
    array([0, 1, 0])
    >>> heldout_groups(None, np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    array([0, 1, 2, 3])
    """
    if sections is not None:
        codes = pd.factorize(np.asarray(sections, dtype=object))[0]
        if codes.max(initial=0) >= 1:
            return codes.astype(np.int64)
    if xy is None:
        m = len(sections) if sections is not None else 0
        return np.zeros(m, np.int64)
    xy = np.asarray(xy, dtype=np.float64)
    right = xy[:, 0] > np.median(xy[:, 0])
    low = xy[:, 1] > np.median(xy[:, 1])
    return (right.astype(np.int64) + 2 * low.astype(np.int64)).astype(np.int64)


@dataclass
class Readout:
    """A chosen readout: how query image embeddings become expression, and how well it did held out.

    Attributes
    ----------
    method
        ``"knn"`` (retrieval), ``"ridge"`` (linear head on the image embedding) or ``"blend"``
        (the mean of the two predictions).
    k, temperature
        Retrieval neighbours and softmax temperature (``method="knn"`` or ``"blend"``).
    alpha
        Ridge penalty (``method="ridge"`` or ``"blend"``).
    coef
        ``(d + 1, n_genes)`` ridge weights, intercept last (``method="ridge"`` or ``"blend"``).
    gene_r
        Held-out Pearson r of each gene on the reference (NaN: constant or not measured).
    heldout_r
        Mean of ``gene_r`` (NaN when nothing could be held out).
    candidates
        Every readout tried, with its held-out mean r, best first.
    n_heldout, heldout_units
        Reference units held out, and which: ``"validation"`` (never seen in training), ``"any"``
        or ``"none"`` (nothing could be held out).
    """

    method: str
    k: int | None = None
    temperature: float | None = None
    alpha: float | None = None
    coef: np.ndarray | None = None
    gene_r: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heldout_r: float = float("nan")
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_heldout: int = 0
    heldout_units: str = "none"

    def predict(self, queries: np.ndarray, ref_embeddings: np.ndarray, ref_expression: Any) -> np.ndarray:
        """``(n, n_genes)`` float32 expression of image-embedded queries."""
        if self.method == "ridge":
            return (_design(queries) @ self.coef).astype(np.float32)
        knn = weighted_average(
            queries, ref_embeddings, ref_expression, k=int(self.k), temperature=float(self.temperature)
        )
        if self.method == "blend":
            return blend(knn, (_design(queries) @ self.coef).astype(np.float32))
        return knn

    def params(self) -> dict[str, Any]:
        """Return what a prediction records in ``uns["sigmma"]["params"]`` (values anndata can write)."""
        out: dict[str, Any] = {
            "method": self.method,
            "heldout_r": float(self.heldout_r),
            "n_heldout": int(self.n_heldout),
            "heldout_units": self.heldout_units,
        }
        if self.method in ("knn", "blend"):
            out.update(k=int(self.k), temperature=float(self.temperature))
        if self.method in ("ridge", "blend"):
            out["alpha"] = float(self.alpha)
        return out

    def describe(self) -> str:
        """Return a short name of the readout and its parameters, e.g. ``"knn k=100 T=0.1"``."""
        knn = f"knn k={int(self.k)} T={self.temperature:g}" if self.method in ("knn", "blend") else ""
        ridge = f"ridge alpha={self.alpha:.3g}" if self.method in ("ridge", "blend") else ""
        return f"blend of {knn} and {ridge}" if self.method == "blend" else (knn or ridge)


def blend(knn: np.ndarray, ridge: np.ndarray) -> np.ndarray:
    """Return the ``"blend"`` readout: the mean of the retrieval's and the ridge head's predictions.

    Retrieval averages whole reference units (profiles that exist, but only as many as there are
    neighbours); the ridge is smooth in the embedding but linear. Their errors differ, so their mean
    can beat both: her2st leave-one-section-out, 3 seeds, r 0.462 against retrieval 0.456 and ridge
    0.445 (``benchmarks/README.md``, "Readout").

    Examples
    --------
    >>> import numpy as np
    >>> blend(np.array([[1.0, 2.0]]), np.array([[3.0, 2.0]]))
    array([[2., 2.]], dtype=float32)
    """
    return (0.5 * (np.asarray(knn, np.float32) + np.asarray(ridge, np.float32))).astype(np.float32)


def support(queries: np.ndarray, ref_embeddings: np.ndarray, *, k: int = Defaults.CONFIDENCE_NEIGHBOURS) -> np.ndarray:
    """Per-query confidence: mean cosine similarity to its ``k`` nearest reference expression embeddings.

    A query whose image embeds far from every reference unit is predicted from units that do not
    resemble it; on her2st the per-unit prediction r rises with this value (``benchmarks/README.md``).

    Examples
    --------
    >>> import numpy as np
    >>> support(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), k=1)
    array([1.], dtype=float32)
    """
    k = int(min(k, len(ref_embeddings)))
    _, scores = nearest(queries, ref_embeddings, k)
    return np.nan_to_num(scores, nan=-1.0).mean(axis=1).astype(np.float32)


def default_readout(
    unit_kind: str,
    *,
    technology: str | None = None,
    k: int | None = None,
    temperature: float | None = None,
    has_images: bool = True,
) -> str:
    """Return the readout kind used when none is asked for: by the model's units (spots, bins or cells).

    Retrieval whatever the units when ``k`` or ``temperature`` is given (they are the retrieval's
    parameters) or when the reference has no image embeddings (the ridge head learns from them).

    Retrieval averages whole reference spots, which suits spots (many cells each, a smooth
    expression profile); single cells are sparse, and averaging over the ``k`` retrieved ones
    blurs the few genes each expresses, where a ridge head on the image embedding predicts better
    (kidney 16 µm bins embedded without their niche: ridge 0.198 vs retrieval 0.186). On spots the
    mean of the two beats either (her2st leave-one-section-out, 3 seeds: blend 0.462, retrieval
    0.456, ridge 0.445; the re-stained, thinned C6: 0.196 vs 0.190), so spots default to the
    blend. Visium HD bins (``technology`` in ``Choices.BIN_TECHNOLOGIES``) are embedded with their
    niche, which makes retrieval informative again: the blend beats the ridge in every kidney
    block and seed (``benchmarks/README.md``, "Visium HD kidney: the bins' context weight").

    The retrieval's ``k`` and temperature, or the ridge's penalty, are still chosen on held-out
    reference units; what differs is which kind. Measured in ``benchmarks/README.md`` ("Readout").

    Examples
    --------
    >>> default_readout("spot"), default_readout("cell"), default_readout("cell", technology="visium_hd")
    ('blend', 'ridge', 'blend')
    >>> default_readout("cell", k=30), default_readout("cell", has_images=False)
    ('knn', 'knn')
    """
    if k is not None or temperature is not None or not has_images:
        return "knn"
    if unit_kind == "spot":
        return str(Defaults.READOUT_SPOT)
    return str(Defaults.READOUT_BINS if technology in Choices.BIN_TECHNOLOGIES else Defaults.READOUT_CELL)


def check_readout_options(method: str | None, k: int | None, temperature: float | None) -> None:
    """Refuse an unknown readout, ``k < 1`` or a non-positive temperature, naming the argument (``None``: the default kind).

    Examples
    --------
    >>> check_readout_options("auto", None, None)
    """
    if method is not None and method not in Choices.READOUTS:
        raise ValueError(f"method must be one of {Choices.READOUTS}, got {method!r}.")
    if k is not None and int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")


def _mean_r(gene_r: np.ndarray) -> float:
    finite = gene_r[np.isfinite(gene_r)]
    return float(finite.mean()) if finite.size else float("nan")


def _knn_trials(
    held: np.ndarray,
    groups: np.ndarray,
    ref_img: np.ndarray,
    ref_expr_emb: np.ndarray,
    ref_expr: Any,
    ks: tuple[int, ...],
    temperatures: tuple[float, ...],
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """``(spec, held-out predictions)`` of every retrieval candidate, one at a time."""
    kmax = max(ks)
    idx = np.zeros((len(held), kmax), np.int64)
    scores = np.full((len(held), kmax), -np.inf)
    for g in np.unique(groups[held]):
        rows = np.flatnonzero(groups[held] == g)
        others = np.flatnonzero(groups != g)
        kk = min(kmax, len(others))
        i, s = nearest(ref_img[held[rows]], ref_expr_emb[others], kk)
        idx[rows, :kk] = others[i]
        scores[rows, :kk] = np.nan_to_num(s, nan=-1.0)
    for k in ks:
        for t in temperatures:
            w = neighbour_weights(scores[:, :k], temperature=t)  # -inf (missing) neighbours get weight 0
            yield {"method": "knn", "k": int(k), "temperature": float(t)}, neighbour_average(idx[:, :k], w, ref_expr)


def _ridge_trials(
    held: np.ndarray,
    groups: np.ndarray,
    ref_img: np.ndarray,
    ref_expr: Any,
    n_genes: int,
    alphas: tuple[float, ...],
) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """``(spec, held-out predictions)`` of every ridge candidate."""
    a = _design(ref_img)
    expr = _as_rows(ref_expr)
    gram = a.T @ a
    cross = np.asarray(a.T @ expr)
    scale = float(np.trace(gram[:-1, :-1])) / max(gram.shape[0] - 1, 1)
    preds = {alpha: np.zeros((len(held), n_genes)) for alpha in alphas}
    for g in np.unique(groups[held]):
        inside = np.flatnonzero(groups == g)
        a_g = a[inside]
        gram_g = gram - a_g.T @ a_g
        cross_g = cross - np.asarray(a_g.T @ expr[inside])
        rows = np.flatnonzero(groups[held] == g)
        for alpha in alphas:
            preds[alpha][rows] = a[held[rows]] @ _solve(gram_g, cross_g, alpha * scale)
    for alpha, p in preds.items():
        yield {"method": "ridge", "alpha": float(alpha * scale)}, p


def choose_readout(
    ref_img: np.ndarray,
    ref_expr_emb: np.ndarray,
    ref_expr: Any,
    groups: np.ndarray,
    *,
    method: str = "auto",
    k: int | None = None,
    temperature: float | None = None,
    eligible: np.ndarray | None = None,
    max_units: int = Defaults.READOUT_HELDOUT_UNITS,
    seed: int = Defaults.SEED,
) -> Readout:
    """Choose the readout of a reference by predicting held-out reference units from the other groups.

    Up to ``max_units`` reference units are held out (drawn from ``eligible``: the units training
    never saw, whose image embeddings are as honest as a new slide's); each is predicted from the
    reference units of the other groups only (its image embedding as the query), and every
    candidate is scored by the mean over genes of the Pearson r. Candidates: retrieval with ``k`` in
    ``Defaults.READOUT_KS`` and temperature in ``Defaults.READOUT_TEMPERATURES`` (a given ``k`` or
    ``temperature`` is kept fixed), and ridge heads with penalties ``Defaults.READOUT_ALPHAS``
    (times the mean diagonal of the Gram matrix), and the blend of the best of each kind. The chosen
    readout is refitted on the whole reference.

    Parameters
    ----------
    ref_img, ref_expr_emb
        ``(m, d)`` image- and expression-side embeddings of the reference units.
    ref_expr
        ``(m, n_genes)`` log1p expression of the reference units (dense or sparse).
    groups
        ``(m,)`` hold-out groups (:func:`heldout_groups`). With a single group nothing can be held
        out: retrieval with ``k`` (default ``Defaults.READOUT_K``) and ``temperature`` (default
        ``Defaults.READOUT_TEMPERATURE``) is returned, or the ridge with the middle penalty (alone or
        blended).
    method
        ``"auto"`` (the best candidate of any kind), ``"knn"``, ``"ridge"`` or ``"blend"`` (the mean of
        the best retrieval's and the best ridge's predictions).
    eligible
        ``(m,)`` boolean: units that may be held out (``model.reference.obs["sigmma_validation"]``);
        ``None``, or fewer than ``Defaults.READOUT_MIN_HELDOUT`` of them: any unit.
    k, temperature
        Fix the retrieval's neighbours / temperature instead of choosing them.
    max_units
        Reference units held out (a random subset, ``seed``).
    seed
        Seed of that subset.

    Returns
    -------
    The chosen :class:`Readout`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(300, 8))
    >>> y = z[:, :3] + 0.1 * rng.normal(size=(300, 3))
    >>> r = choose_readout(z, z, y, np.repeat([0, 1, 2], 100))
    >>> r.method, round(r.heldout_r, 2)
    ('ridge', 0.99)
    """
    check_readout_options(method, k, temperature)
    groups = np.asarray(groups, dtype=np.int64)
    m = len(ref_img)
    if not (len(ref_expr_emb) == len(groups) == m == ref_expr.shape[0]):
        raise ValueError(
            f"reference sizes differ: image embeddings {m}, expression embeddings {len(ref_expr_emb)}, "
            f"expression {ref_expr.shape[0]}, groups {len(groups)}."
        )
    ks = (int(k),) if k is not None else tuple(int(v) for v in Defaults.READOUT_KS)
    temps = (float(temperature),) if temperature is not None else tuple(Defaults.READOUT_TEMPERATURES)
    n_groups = len(np.unique(groups))
    smallest_rest = m - int(np.bincount(groups).max()) if m else 0
    ks = tuple(sorted({min(v, max(smallest_rest, 1)) for v in ks}))
    n_genes = ref_expr.shape[1]
    if n_groups < 2:
        fixed = Readout(
            method="knn",
            k=int(min(k or Defaults.READOUT_K, max(m, 1))),
            temperature=float(temperature or Defaults.READOUT_TEMPERATURE),
            gene_r=np.full(n_genes, np.nan),
        )
        if method in ("ridge", "blend"):
            middle = float(Defaults.READOUT_ALPHAS[len(Defaults.READOUT_ALPHAS) // 2])
            fixed.alpha, fixed.coef = _ridge_head(ref_img, ref_expr, middle, scaled=True)
            if method == "ridge":
                fixed.method, fixed.k, fixed.temperature = "ridge", None, None
            else:
                fixed.method = "blend"
        return fixed
    pool = np.arange(m)
    if eligible is not None and int(np.count_nonzero(eligible)) >= Defaults.READOUT_MIN_HELDOUT:
        pool = np.flatnonzero(np.asarray(eligible, dtype=bool))
    held = np.sort(pool[subsample(len(pool), max_n=max_units, seed=seed)])
    y_held = _as_rows(ref_expr)[held]
    y_held = y_held.toarray() if sp.issparse(y_held) else np.asarray(y_held)
    trials: list[tuple[dict[str, Any], np.ndarray]] = []
    # The best candidate of each kind keeps its held-out predictions: the blend is their mean.
    best_pred: dict[str, tuple[float, dict[str, Any], np.ndarray]] = {}
    kinds = {"auto": ("knn", "ridge"), "blend": ("knn", "ridge")}.get(method, (method,))
    candidates = itertools.chain(
        _knn_trials(held, groups, ref_img, ref_expr_emb, ref_expr, ks, temps) if "knn" in kinds else (),
        _ridge_trials(held, groups, ref_img, ref_expr, n_genes, tuple(Defaults.READOUT_ALPHAS))
        if "ridge" in kinds
        else (),
    )
    for spec, pred in candidates:
        gene_r = pearson_per_gene(y_held, pred)
        trials.append((spec, gene_r))
        score = np.nan_to_num(_mean_r(gene_r), nan=-np.inf)
        if spec["method"] not in best_pred or score > best_pred[spec["method"]][0]:
            best_pred[spec["method"]] = (score, spec, pred)
    if method in ("auto", "blend") and len(best_pred) == 2:
        (_, knn_spec, knn_pred), (_, ridge_spec, ridge_pred) = best_pred["knn"], best_pred["ridge"]
        spec = {"method": "blend", **{k: knn_spec[k] for k in ("k", "temperature")}, "alpha": ridge_spec["alpha"]}
        trials.append((spec, pearson_per_gene(y_held, blend(knn_pred, ridge_pred))))
    del best_pred
    table = pd.DataFrame([{**spec, "heldout_r": _mean_r(r)} for spec, r in trials])
    if method == "blend":
        best = len(trials) - 1
    else:
        # Ties (and all-NaN scores) keep the earlier candidate: retrieval before ridge, small k first.
        best = int(np.nanargmax(table["heldout_r"].to_numpy())) if table["heldout_r"].notna().any() else 0
    spec, gene_r = trials[best]
    order = table.sort_values("heldout_r", ascending=False, kind="stable", na_position="last").reset_index(drop=True)
    chosen = Readout(
        method=spec["method"],
        k=spec.get("k"),
        temperature=spec.get("temperature"),
        gene_r=gene_r,
        heldout_r=_mean_r(gene_r),
        candidates=order,
        n_heldout=int(len(held)),
        heldout_units="validation" if len(pool) < m else "any",
    )
    if chosen.method in ("ridge", "blend"):
        chosen.alpha, chosen.coef = _ridge_head(ref_img, ref_expr, spec["alpha"], scaled=False)
    return chosen


def _ridge_head(ref_img: np.ndarray, ref_expr: Any, alpha: float, *, scaled: bool) -> tuple[float, np.ndarray]:
    """``(alpha, coef)`` of the ridge head fitted on the whole reference (``scaled``: ``alpha`` times the mean Gram diagonal)."""
    a = _design(ref_img)
    gram = a.T @ a
    if scaled:
        alpha = alpha * float(np.trace(gram[:-1, :-1])) / max(gram.shape[0] - 1, 1)
    return float(alpha), _solve(gram, np.asarray(a.T @ _as_rows(ref_expr)), alpha)
