"""Plots of tables: training curves (``history``) and the evaluation table (``evaluation``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sigmma_sc._constants import Keys, Levels
from sigmma_sc._logging import logger

from . import _docs as d
from . import _utils as u

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_SPLITS = ("train", "val")
_STD_SUFFIX = "_std"
_CHANCE_PREFIX = "chance_"
# Names of the columns that may carry the method / metric in a long-format evaluation table.
_METHOD_COLS = ("method", "model", "baseline")
_METRIC_COLS = ("metric",)
_VALUE_COLS = ("value", "mean", "score")


# ---------------------------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------------------------
def _history_frame(model_or_df: Any) -> pd.DataFrame:
    """Get the history DataFrame of a model, a DataFrame, an AnnData / SpatialData table's ``uns``."""
    if isinstance(model_or_df, pd.DataFrame):
        return model_or_df
    hist = getattr(model_or_df, "history", None)
    if isinstance(hist, pd.DataFrame):
        return hist
    try:
        adata = u.as_table(model_or_df, Keys.TABLE)
    except (TypeError, KeyError):
        adata = None
    if adata is not None:
        stored = adata.uns.get(Keys.UNS, {}).get(Keys.HISTORY)
        if stored is not None:
            return stored if isinstance(stored, pd.DataFrame) else pd.DataFrame(stored)
    raise TypeError(
        f"history needs a fitted Sigmma, a DataFrame, or an AnnData / SpatialData with uns[{Keys.UNS!r}]"
        f"[{Keys.HISTORY!r}]; got {type(model_or_df).__name__} without a history. Run sg.tl.fit first."
    )


def _split_of(col: str) -> str | None:
    tokens = re.split(r"[^a-z0-9]+", col.lower())
    for s in _SPLITS:
        if s in tokens or (s == "val" and "valid" in tokens) or (s == "val" and "validation" in tokens):
            return s
    return None


def _group_of(col: str) -> str:
    """Name the panel of a loss column: its level (``micro`` / ``meso`` / ``macro``), else the term name, else total."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", col.lower()) if t]
    for lv in Levels.ALL:
        if lv in tokens:
            return lv
    rest = [t for t in tokens if t not in (*_SPLITS, "valid", "validation", "loss", "epoch", "step")]
    return "_".join(rest) if rest else "total"


@d.shared_docs
def history(
    model_or_df: Any,
    *,
    keys: Sequence[str] | None = None,
    logy: bool = False,
    title: str | None = None,
    palette: dict[str, Any] | None = None,
    frameon: bool = True,
    ncols: int = 4,
    wspace: float | None = None,
    hspace: float | None = None,
    ax: Axes | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Training curves: one panel per hierarchy level (and the total), train and validation losses.

    Columns are grouped by the level named in them (``micro`` / ``meso`` / ``macro``); columns
    naming no level are the total loss (or a term such as ``consistency``). Train curves are
    solid, validation curves dashed; epochs are whole numbers on the x axis. Given ``ax``, every
    curve goes into that one axes (levels coloured, splits by line style).

    Parameters
    ----------
    model_or_df
        A fitted :class:`sigmma_sc.Sigmma` (its ``history``), the history DataFrame (one row per
        epoch), or an AnnData / SpatialData whose table holds ``uns["sigmma"]["history"]``.
    keys
        Columns to draw (default: every numeric column with ``loss`` in its name).
    logy
        Logarithmic y axis.
    title
        Figure title.
    palette
        Dict split (``"train"``, ``"val"``) -> colour.
    frameon
        Draw the axes frame.
    {panels}
    {ax_save_show}

    {returns_panels}

    Examples
    --------
    A history table, one row per epoch:

    >>> import pandas as pd
    >>> import sigmma_sc as sg
    >>> hist = pd.DataFrame({"epoch": range(4), "train_loss": [3.1, 2.4, 2.0, 1.9], "val_loss": [3.3, 2.7, 2.4, 2.4]})
    >>> ax = sg.pl.history(hist)
    >>> all(tick.is_integer() for tick in ax.get_xticks())  # whole epochs
    True

    The curves of a fitted model (training takes minutes on a CPU), one panel per level:

    >>> model = sg.tl.fit(sdata, max_epochs=20)  # doctest: +SKIP
    >>> fig = sg.pl.history(model)  # doctest: +SKIP

    The same with ``model``, one epoch on 200 synthetic cells (see :class:`sigmma_sc.Sigmma`):

    >>> fig = sg.pl.history(model)
    """
    from matplotlib.ticker import MaxNLocator

    df = _history_frame(model_or_df)
    if df.empty:
        raise ValueError("the training history is empty: the model was not trained for a single epoch.")
    x = df["epoch"].to_numpy() if "epoch" in df.columns else np.arange(len(df))
    if keys is None:
        cols = [c for c in df.columns if "loss" in str(c).lower() and pd.api.types.is_numeric_dtype(df[c])]
        if not cols:
            cols = [c for c in df.columns if c != "epoch" and pd.api.types.is_numeric_dtype(df[c])]
    else:
        missing = [k for k in keys if k not in df.columns]
        if missing:
            raise KeyError(f"history has no columns {missing}; it has {list(df.columns)}.")
        cols = list(keys)
    if not cols:
        raise ValueError(f"history has no numeric column to draw; columns are {list(df.columns)}.")
    groups: dict[str, list[str]] = {}
    for c in cols:
        groups.setdefault(_group_of(str(c)), []).append(c)
    # Panels fine to coarse after the total: the order a reader of the hierarchy expects.
    rank = {"total": -1, **{lv: i for i, lv in enumerate(Levels.ALL)}}
    names = sorted(groups, key=lambda g: (rank.get(g, 10), g))
    split_colors = {"train": "#1f77b4", "val": "#d62728", None: "#555555", **(palette or {})}
    if ax is not None or len(names) == 1:
        axs = [u.single_axes(ax, figsize=(5.0, 3.5))] * len(names)
        fig = axs[0].figure
    else:
        wspace, hspace = 0.3 if wspace is None else wspace, 0.45 if hspace is None else hspace
        fig, axs = u.panel_grid(len(names), ncols=ncols, panel_size=(4.2, 3.2), wspace=wspace, hspace=hspace)
    shared = len(set(map(id, axs))) == 1 and len(names) > 1
    level_colors = u.palette_for(names) if shared else {}
    for a, g in zip(axs, names):
        for c in groups[g]:
            split = _split_of(str(c))
            y = df[c].to_numpy(dtype=float)
            ok = np.isfinite(y)  # validation runs every n epochs: skip the gaps
            color = level_colors.get(g, split_colors[split])
            label = f"{g} {split or c}" if shared else (split or str(c))
            a.plot(
                x[ok],
                y[ok],
                ls="--" if split == "val" else "-",
                marker="o" if ok.sum() < 15 else None,
                ms=3,
                color=color,
                label=label,
            )
        if not shared:
            a.set_title(f"{g} level" if g in Levels.ALL else g, fontsize=11)
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 2.5"
        a.set_ylabel("loss")
        if logy:
            a.set_yscale("log")
        a.legend(fontsize=8, frameon=False)
        a.spines[["top", "right"]].set_visible(False)
        if not frameon:
            a.spines[["left", "bottom"]].set_visible(False)
    if title is not None:
        fig.suptitle(title)
    return u.finish(axs, save=save, show=show, return_fig=return_fig)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
# Column names of tl.evaluate / benchmarks/quality.py, read as words.
_PCC = re.compile(r"pcc_(?P<set>hvg|heg)(?P<n>\d+)(?P<det>_det1)?(?P<per_slide>_per_slide)?")
_RECALL = re.compile(r"r(?P<k>\d+)_(?P<dir>img2expr|expr2img)")
_RANK = re.compile(r"median_rank_(?P<dir>img2expr|expr2img)")
_CHANCE_COL = re.compile(r"chance_r(?P<k>\d+)")
_DIRECTIONS = {"img2expr": "H&E → expression", "expr2img": "expression → H&E"}
_GENE_SETS = {"hvg": "HVG", "heg": "expressed genes"}
# Kind of metric -> (y label, panel title); each kind gets its own axes, in this order.
_KINDS = {
    "pcc": ("Pearson r", "Expression prediction"),
    "recall": ("Recall@k", "Cross-modal retrieval"),
    "rank": ("Median rank", "Retrieval rank"),
    "spearman": ("Spearman ρ", "Confidence as a guide"),
    "other": ("score", ""),
}


def metric_label(metric: str) -> tuple[str, str, str]:
    """Read a metric column: ``(kind, full name, name within its panel)``.

    Examples
    --------
    >>> metric_label("pcc_hvg50_per_slide")
    ('pcc', 'Pearson r, top-50 HVG (per slide)', 'top-50 HVG (per slide)')
    >>> metric_label("pcc_hvg50_det1")[2]
    'top-50 HVG detected in ≥ 1%'
    >>> metric_label("r5_img2expr")[1]
    'Recall@5, H&E → expression'
    """
    if m := _PCC.fullmatch(metric):
        short = f"top-{m['n']} {_GENE_SETS[m['set']]}" + (" detected in ≥ 1%" if m["det"] else "")
        short += " (per slide)" if m["per_slide"] else ""
        return "pcc", f"Pearson r, {short}", short
    if m := _RECALL.fullmatch(metric):
        direction = _DIRECTIONS[m["dir"]]
        return "recall", f"Recall@{m['k']}, {direction}", f"{direction}, k = {m['k']}"
    if m := _RANK.fullmatch(metric):
        direction = _DIRECTIONS[m["dir"]]
        return "rank", f"Median rank, {direction}", direction
    if metric == "confidence_spearman":
        return "spearman", "Spearman ρ, confidence vs per-unit r", "confidence vs per-unit r"
    return "other", metric, metric


def _first(cols: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((c for c in wanted if c in cols), None)


def _chance(metric: str, row: pd.Series) -> float:
    """Chance level of a Recall@k metric: the row's ``chance_r{k}``, else ``k / n`` with ``n`` from any ``chance_r*``."""
    m = _RECALL.fullmatch(metric)
    if m is None:
        return np.nan
    k = int(m["k"])
    given = row.get(f"{_CHANCE_PREFIX}r{k}", np.nan)
    if np.isfinite(given):
        return float(given)
    # Recall@k of a random ranking of n items is k / n: one chance column gives the others.
    for col, val in row.items():
        c = _CHANCE_COL.fullmatch(str(col))
        if c is not None and np.isfinite(val) and val > 0:
            return float(min(1.0, k * val / int(c["k"])))
    return np.nan


def tidy_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Reshape an evaluation table to one row per method and metric, seeds aggregated.

    Accepts the wide table of :func:`sigmma_sc.tl.evaluate` (one row per method, one column per
    metric, the method in the index or a ``method`` column); several of them stacked with a
    ``seed`` (and ``fold``) column, like the runs of ``benchmarks/quality.py``; its aggregated
    ``methods`` table (``{metric}_std`` columns); and long tables (``method`` / ``metric`` /
    ``value`` columns, optional ``std`` and ``seed``). ``chance_r{k}`` columns give the chance
    level of the ``r{k}_*`` metrics.

    Returns
    -------
    Columns ``method``, ``metric``, ``value`` (mean), ``std``, ``chance`` and ``n_seeds``. With
    several seeds, ``value`` and ``std`` are the mean and sample standard deviation over seeds of
    the per-seed means over folds (the aggregation of ``benchmarks/quality.py``); otherwise
    ``std`` is the table's own ``{metric}_std`` / ``std`` column (``NaN`` without one).

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"method": ["sigmma"] * 3, "seed": [0, 1, 2], "r5_img2expr": [0.3, 0.4, 0.5], "chance_r5": 0.05})
    >>> tidy_scores(runs)[["metric", "value", "std", "chance", "n_seeds"]].round(2).to_dict("records")
    [{'metric': 'r5_img2expr', 'value': 0.4, 'std': 0.1, 'chance': 0.05, 'n_seeds': 3}]
    """
    frame = df
    if frame.index.name in _METHOD_COLS or (
        _first([str(c) for c in frame.columns], _METHOD_COLS) is None and not isinstance(frame.index, pd.RangeIndex)
    ):
        frame = frame.rename_axis(frame.index.name or "method").reset_index()
    cols = [str(c) for c in frame.columns]
    method_col = _first(cols, _METHOD_COLS)
    methods = frame[method_col].astype(str) if method_col else pd.Series("sigmma", index=frame.index)
    seeds = frame["seed"] if "seed" in cols else pd.Series(0, index=frame.index)
    metric_col, value_col = _first(cols, _METRIC_COLS), _first(cols, _VALUE_COLS)
    if metric_col is not None and value_col is not None:
        std_col = _first(cols, ("std", f"{value_col}{_STD_SUFFIX}", "sd"))
        long = pd.DataFrame(
            {
                "method": methods.to_numpy(),
                "seed": seeds.to_numpy(),
                "metric": frame[metric_col].astype(str).to_numpy(),
                "value": frame[value_col].to_numpy(dtype=float),
                "std": frame[std_col].to_numpy(dtype=float) if std_col else np.nan,
            }
        )
        long["chance"] = [_chance(m, pd.Series(dtype=float)) for m in long["metric"]]
    else:
        ids = {method_col, "seed", "fold"}
        numeric = [c for c in cols if c not in ids and pd.api.types.is_numeric_dtype(frame[c])]
        metrics = [c for c in numeric if not c.endswith(_STD_SUFFIX) and not c.startswith(_CHANCE_PREFIX)]
        if not metrics:
            raise ValueError(f"the evaluation table has no numeric metric column; columns are {cols}.")
        rows = [
            (method, seed, m, float(row[m]), float(row.get(f"{m}{_STD_SUFFIX}", np.nan)), _chance(m, row))
            for (_, row), method, seed in zip(frame.iterrows(), methods, seeds)
            for m in metrics
        ]
        long = pd.DataFrame(rows, columns=["method", "seed", "metric", "value", "std", "chance"])
    keys = ["method", "metric"]
    if long["seed"].nunique() > 1:
        per_seed = long.groupby([*keys, "seed"], sort=False)[["value", "chance"]].mean()  # mean over folds
        by = per_seed.groupby(level=keys, sort=False)
        out = by.agg(
            value=("value", "mean"), std=("value", "std"), chance=("chance", "mean"), n_seeds=("value", "size")
        )
    else:
        by = long.groupby(keys, sort=False)
        out = by.agg(value=("value", "mean"), std=("std", "mean"), chance=("chance", "mean"))
        out["n_seeds"] = 1
    return out.reset_index()


@d.shared_docs
def evaluation(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    chance: str | None = "chance",
    metric_names: dict[str, str] | None = None,
    palette: str | Sequence[Any] | dict[str, Any] | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    legend_loc: str | None = "right margin",
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Draw the scores of :func:`sigmma_sc.tl.evaluate` as grouped bars, one panel per kind of metric.

    Pearson r of predicted expression and Recall@k of cross-modal retrieval are different
    quantities: each kind gets its own axes, labelled in words (``pcc_hvg50_per_slide`` reads
    "top-50 HVG (per slide)" under "Pearson r"). One bar per method in each metric's group.
    Recall@k has a chance level (``k / n`` for ``n`` retrieval candidates), drawn as a dashed
    line over its group. When the table holds several seeds (a ``seed`` column, e.g. the runs of
    ``benchmarks/quality.py`` or ``tl.evaluate`` tables stacked with ``.assign(seed=s)``), bars are
    the mean over seeds of the per-seed mean over folds and error bars the standard deviation over
    seeds; ``{metric}_std`` columns (a ``std`` column in long tables) give error bars otherwise.
    ``ax=`` takes metrics of one kind only (e.g. ``metrics=["r1_img2expr", "r5_img2expr"]``).

    Parameters
    ----------
    df
        Wide table (one row per method and seed / fold, one column per metric, optional
        ``{metric}_std`` and ``chance_r{k}``; methods in the index or a ``method`` column) or long
        table (``method``, ``metric``, ``value``, optional ``std`` and ``seed``).
    metrics
        Metrics to draw, in this order. Default: every metric within ``[-1, 1]`` (Pearson r,
        Recall@k); median ranks only when named here.
    methods
        Methods to draw, in this order (default: all).
    chance
        Name of a chance-level method row (long tables), drawn as a dashed line rather than a bar
        (``None``: a method like the others).
    metric_names
        Tick labels for some metrics, overriding the names read from the columns.
    palette
        Colours of the methods: dict, list or colormap name.
    title
        Figure title.
    ylabel
        y-axis label of every panel (default: the kind of metric, e.g. ``"Pearson r"``).
    {legend_loc}
    figsize
        Figure size when a new figure is made.
    {ax_save_show}

    {returns_panels}

    Examples
    --------
    Three seeds of two methods (the runs of ``benchmarks/quality.py`` have this shape):

    >>> import pandas as pd
    >>> import sigmma_sc as sg
    >>> runs = pd.DataFrame(
    ...     {
    ...         "method": ["sigmma", "ridge"] * 3,
    ...         "seed": [0, 0, 1, 1, 2, 2],
    ...         "pcc_hvg50": [0.45, 0.30, 0.43, 0.31, 0.46, 0.29],
    ...         "r5_img2expr": [0.33, 0.12, 0.35, 0.10, 0.31, 0.11],
    ...         "chance_r5": 5 / 180,
    ...     }
    ... )
    >>> fig = sg.pl.evaluation(runs)
    >>> [a.get_ylabel() for a in fig.axes]
    ['Pearson r', 'Recall@k']

    With a fitted model and held-out data (training takes minutes on a CPU):

    >>> scores = sg.tl.evaluate(model, test_sdata, train_sdata=train_sdata)  # doctest: +SKIP
    >>> fig = sg.pl.evaluation(scores)  # doctest: +SKIP

    The same with ``model``, fitted on ``train`` (200 synthetic cells), scored on ``test`` (200
    other cells, see :class:`sigmma_sc.Sigmma`) against the ridge probe:

    >>> scores = sg.tl.evaluate(model, test, train_sdata=train, baselines=("ridge",))
    >>> fig = sg.pl.evaluation(scores)
    """
    import matplotlib.pyplot as plt

    long = tidy_scores(df)
    all_metrics = list(dict.fromkeys(long["metric"]))
    if metrics is None:
        # Scores on another scale (median ranks, counts) would flatten the bars: keep [-1, 1] metrics.
        # Missing values (a score only SIGMMA has, NaN for the baselines) do not count against a metric.
        in_unit = long.groupby("metric", sort=False)["value"].apply(
            lambda v: bool(v.notna().any() and (v.dropna().abs() <= 1.0 + 1e-9).all())
        )
        metrics = [m for m in all_metrics if in_unit[m]] or all_metrics
        dropped = [m for m in all_metrics if m not in metrics]
        if dropped:
            logger.info(f"evaluation: not drawing {dropped} (values outside [-1, 1]); pass metrics= to draw them")
    metrics = _pick(metrics, all_metrics, "metrics")
    methods = _pick(methods, list(dict.fromkeys(long["method"])), "methods")
    bars = [m for m in methods if m != chance]
    if not bars:
        raise ValueError(f"no method left to draw besides the chance row {chance!r}.")
    kinds: dict[str, list[str]] = {k: [] for k in _KINDS}
    for m in metrics:
        kinds[metric_label(m)[0]].append(m)
    kinds = {k: ms for k, ms in kinds.items() if ms}
    if ax is not None and len(kinds) > 1:
        raise ValueError(
            f"ax= draws one panel but the metrics are of {len(kinds)} kinds ({list(kinds)}); pass metrics= of one "
            "kind, or no ax."
        )
    if ax is not None:
        axs = [ax]
    else:
        widths = [0.6 + len(ms) * (0.3 * len(bars) + 0.35) for ms in kinds.values()]
        _, grid = plt.subplots(
            1,
            len(kinds),
            figsize=figsize or (max(4.0, sum(widths) + 0.6 * len(kinds)), 4.2),
            squeeze=False,
            gridspec_kw={"width_ratios": widths, "wspace": 0.35},
        )
        axs = list(grid[0])
    idx = long.set_index(["method", "metric"])
    colors = u.palette_for(bars, palette)
    for a, (kind, ms) in zip(axs, kinds.items()):
        names = [(metric_names or {}).get(m, metric_label(m)[2]) for m in ms]
        chance_levels = [_chance_level(idx, m, chance if chance in methods else None) for m in ms]
        _bar_panel(a, idx, bars, ms, names, colors, chance_levels)
        a.set_ylabel(ylabel or _KINDS[kind][0])
        a.set_title(title if title is not None and len(axs) == 1 else _KINDS[kind][1], fontsize=11)
    if title is not None and len(axs) > 1:
        axs[0].figure.suptitle(title)
    n_seeds = int(long.loc[long["method"].isin(bars), "n_seeds"].max())
    has_std = bool(long.loc[long["method"].isin(bars), "std"].gt(0).any())
    what = f"mean ± s.d. over {n_seeds} seeds" if n_seeds > 1 else "mean ± s.d." if has_std else None
    _method_legend(axs, legend_loc, title=what)
    return u.finish(axs, save=save, show=show, return_fig=return_fig)


def _chance_level(idx: pd.DataFrame, metric: str, chance_row: str | None) -> float:
    """Chance of a metric: the chance method's value, else the table's chance level (same for every method)."""
    if chance_row is not None and (chance_row, metric) in idx.index:
        return float(idx.loc[(chance_row, metric), "value"])
    levels = idx["chance"].xs(metric, level="metric")
    return float(levels.max()) if levels.notna().any() else np.nan


def _bar_panel(
    ax: Axes,
    idx: pd.DataFrame,
    bars: list[str],
    metrics: list[str],
    names: list[str],
    colors: dict[str, Any],
    chance_levels: list[float],
) -> None:
    """One group of bars per metric (a bar per method), error bars where given, dashed chance lines."""
    width = 0.8 / len(bars)
    for j, meth in enumerate(bars):
        vals = np.array([idx["value"].get((meth, m), np.nan) for m in metrics], dtype=float)
        errs = np.array([idx["std"].get((meth, m), np.nan) for m in metrics], dtype=float)
        pos = np.arange(len(metrics)) - 0.4 + width * (j + 0.5)
        ax.bar(pos, vals, width=width * 0.92, color=colors[meth], label=meth)
        ok = np.isfinite(errs) & (errs > 0)  # a metric without spread gets no error bar, not a flat cap
        if ok.any():
            ax.errorbar(pos[ok], vals[ok], yerr=errs[ok], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    labelled = False
    for i, level in enumerate(chance_levels):
        if np.isfinite(level):
            label = None if labelled else "chance"
            ax.hlines(level, i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1, label=label, gid="chance")
            labelled = True
    ax.grid(False)  # scanpy's figure params switch grids on, which clutter the bars
    ax.set_xticks(np.arange(len(metrics)))
    tilt = len(metrics) > 2 or max(len(n) for n in names) > 14  # long names would collide
    ax.set_xticklabels(names, rotation=30 if tilt else 0, ha="right" if tilt else "center", fontsize=9)
    ax.set_xlim(-0.6, len(metrics) - 0.4)
    ax.axhline(0, color="black", lw=0.6)
    ax.spines[["top", "right"]].set_visible(False)


def _method_legend(axs: list[Axes], loc: str | None, *, title: str | None) -> None:
    """One legend for the figure (methods, chance), right of the last panel."""
    if loc in (None, "none"):
        return
    entries: dict[str, Any] = {}
    for a in axs:
        for handle, label in zip(*a.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    kw = (
        {"loc": "center left", "bbox_to_anchor": (1.01, 0.5), "frameon": False}
        if loc == "right margin"
        else {"loc": loc}
    )
    axs[-1].legend(entries.values(), entries.keys(), title=title, fontsize=9, title_fontsize=8, **kw)


def _pick(wanted: Sequence[str] | None, available: list[str], what: str) -> list[str]:
    if wanted is None:
        return available
    missing = [w for w in wanted if w not in available]
    if missing:
        raise KeyError(f"{what} {missing} not in the evaluation table; it has {available}.")
    return list(wanted)
