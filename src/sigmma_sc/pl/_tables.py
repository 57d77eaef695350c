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


def history(
    model_or_df: Any,
    *,
    keys: Sequence[str] | None = None,
    logy: bool = False,
    ncols: int = 4,
    title: str | None = None,
    palette: dict[str, Any] | None = None,
    frameon: bool = True,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes | Figure:
    """Training curves: one panel per hierarchy level (and the total), train and validation losses.

    Columns are grouped by the level named in them (``micro`` / ``meso`` / ``macro``); columns
    naming no level are the total loss (or a term such as ``consistency``). Train curves are
    solid, validation curves dashed.

    Parameters
    ----------
    model_or_df
        A fitted :class:`sigmma_sc.Sigmma` (its ``history``), the history DataFrame (one row per
        epoch), or an AnnData / SpatialData whose table holds ``uns["sigmma"]["history"]``.
    keys
        Columns to draw (default: every numeric column with ``loss`` in its name).
    logy
        Logarithmic y axis.
    ncols
        Panels per row.
    title
        Figure title.
    palette
        Dict split (``"train"``, ``"val"``) -> colour.
    frameon
        Draw the axes frame.
    ax
        Draw every curve into this one axes (levels coloured, splits by line style).
    save
        Write the figure to this path.
    show
        Show the figure (default: only when not saving and the backend is interactive).

    Returns
    -------
    The axes when ``ax`` is given or there is one panel, else the figure.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> model = sg.tl.fit(sdata, max_epochs=20)
    >>> fig = sg.pl.history(model)
    >>> ax = sg.pl.history(model.history, keys=["train_loss", "val_loss"])
    """
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
        fig, axs = u.panel_grid(len(names), ncols=ncols, panel_size=(4.2, 3.2), wspace=0.3, hspace=0.45)
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
        a.set_ylabel("loss")
        if logy:
            a.set_yscale("log")
        a.legend(fontsize=8, frameon=False)
        a.spines[["top", "right"]].set_visible(False)
        if not frameon:
            a.spines[["left", "bottom"]].set_visible(False)
    if title is not None:
        fig.suptitle(title)
    u.savefig_or_show(fig, save=save, show=show)
    return axs[0] if ax is not None or len(names) == 1 else fig


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def _first(cols: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((c for c in wanted if c in cols), None)


def tidy_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Reshape an evaluation table to long form: columns ``method``, ``metric``, ``value``, ``std``, ``chance``.

    Accepts the wide table of :func:`sigmma_sc.tl.evaluate` (one row per method, one column per
    metric; ``{metric}_std`` columns become error bars and ``chance_{prefix}`` columns the chance
    level of the metrics named ``{prefix}_*``, e.g. ``chance_r5`` for ``r5_img2expr``; the method
    is the index or a ``method`` column) and long tables (``method`` / ``metric`` / ``value``
    columns, optional ``std``).
    """
    cols = [str(c) for c in df.columns]
    metric_col, value_col = _first(cols, _METRIC_COLS), _first(cols, _VALUE_COLS)
    method_col = _first(cols, _METHOD_COLS)
    if metric_col is not None and value_col is not None:
        std_col = _first(cols, ("std", f"{value_col}{_STD_SUFFIX}", "sd"))
        methods = df[method_col].astype(str) if method_col else pd.Series("sigmma", index=df.index)
        return pd.DataFrame(
            {
                "method": methods.to_numpy(),
                "metric": df[metric_col].astype(str).to_numpy(),
                "value": df[value_col].to_numpy(dtype=float),
                "std": df[std_col].to_numpy(dtype=float) if std_col else np.nan,
                "chance": np.nan,
            }
        )
    wide = df.set_index(method_col) if method_col else df
    numeric = [str(c) for c in wide.columns if pd.api.types.is_numeric_dtype(wide[c])]
    metrics = [c for c in numeric if not c.endswith(_STD_SUFFIX) and not c.startswith(_CHANCE_PREFIX)]
    if not metrics:
        raise ValueError(f"the evaluation table has no numeric metric column; columns are {cols}.")
    rows = []
    for method, row in wide.iterrows():
        for m in metrics:
            std = row.get(f"{m}{_STD_SUFFIX}", np.nan)
            chance = row.get(f"{_CHANCE_PREFIX}{m.split('_')[0]}", np.nan)
            rows.append((str(method), m, float(row[m]), float(std), float(chance)))
    return pd.DataFrame(rows, columns=["method", "metric", "value", "std", "chance"])


def evaluation(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    chance: str | None = "chance",
    palette: str | Sequence[Any] | dict[str, Any] | None = None,
    title: str | None = None,
    ylabel: str = "score",
    legend_loc: str | None = "right margin",
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool | None = None,
) -> Axes:
    """Draw the metric table of :func:`sigmma_sc.tl.evaluate` as grouped bars, with error bars.

    One group of bars per metric, one bar per method; ``{metric}_std`` columns (or a ``std``
    column in long tables) become error bars. A method named ``chance`` is drawn as a dashed
    tick over each group rather than as a bar.

    Parameters
    ----------
    df
        Wide table (one row per method, one column per metric, optional ``{metric}_std``; methods
        in the index or a ``method`` column) or long table (``method``, ``metric``, ``value``,
        optional ``std``).
    metrics
        Metrics to draw, in this order (default: all).
    methods
        Methods to draw, in this order (default: all).
    chance
        Name of the chance-level row, drawn as a dashed tick (``None``: a method like the others).
    palette
        Colours of the methods: dict, list or colormap name.
    title
        Axes title.
    ylabel
        y-axis label.
    legend_loc
        ``"right margin"``, ``"none"`` or a matplotlib location.
    figsize
        Figure size when a new figure is made.
    ax
        Draw into this axes.
    save
        Write the figure to this path.
    show
        Show the figure (default: only when not saving and the backend is interactive).

    Returns
    -------
    The axes.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> scores = sg.tl.evaluate(model, test_sdata)
    >>> ax = sg.pl.evaluation(scores)
    """
    long = tidy_scores(df)
    all_metrics = list(dict.fromkeys(long["metric"]))
    if metrics is None:
        # Scores on another scale (median ranks, counts) would flatten the bars: keep [-1, 1] metrics.
        in_unit = long.groupby("metric", sort=False)["value"].apply(lambda v: bool((v.abs() <= 1.0 + 1e-9).all()))
        metrics = [m for m in all_metrics if in_unit[m]]
        dropped = [m for m in all_metrics if not in_unit[m]]
        if dropped:
            logger.info(f"evaluation: not drawing {dropped} (values outside [-1, 1]); pass metrics= to draw them")
        if not metrics:
            metrics = all_metrics
    all_methods = list(dict.fromkeys(long["method"]))
    metrics = _pick(metrics, all_metrics, "metrics")
    methods = _pick(methods, all_methods, "methods")
    bars = [m for m in methods if m != chance]
    if not bars:
        raise ValueError(f"no method left to draw besides the chance row {chance!r}.")
    colors = u.palette_for(bars, palette)
    width = 0.8 / len(bars)
    ax = u.single_axes(ax, figsize=figsize or (max(4.0, 0.5 + len(metrics) * (0.35 * len(bars) + 0.5)), 3.8))
    idx = long.set_index(["method", "metric"])
    for j, meth in enumerate(bars):
        vals = np.array([idx["value"].get((meth, m), np.nan) for m in metrics], dtype=float)
        errs = np.array([idx["std"].get((meth, m), np.nan) for m in metrics], dtype=float)
        pos = np.arange(len(metrics)) - 0.4 + width * (j + 0.5)
        ax.bar(pos, vals, width=width * 0.92, color=colors[meth], label=meth)
        ok = np.isfinite(errs) & (errs > 0)  # a metric without spread gets no error bar, not a flat cap
        if ok.any():
            ax.errorbar(pos[ok], vals[ok], yerr=errs[ok], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    labelled = False
    for i, m in enumerate(metrics):
        # Chance from a "chance" row, else from the table's chance_* columns.
        v = idx["value"].get((chance, m), np.nan) if chance in methods else np.nan
        if not np.isfinite(v):
            v = (
                float(np.nanmax(idx["chance"].xs(m, level="metric")))
                if idx["chance"].xs(m, level="metric").notna().any()
                else np.nan
            )
        if np.isfinite(v):
            ax.hlines(
                v, i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1, label=None if labelled else "chance"
            )
            labelled = True
    ax.grid(False)  # scanpy's figure params switch grids on, which clutter the bars
    ax.set_xticks(np.arange(len(metrics)))
    tilt = len(metrics) > 3 or max(len(m) for m in metrics) * len(metrics) > 30  # long names would collide
    ax.set_xticklabels(metrics, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", lw=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    if title is not None:
        ax.set_title(title)
    if legend_loc not in (None, "none"):
        if legend_loc == "right margin":
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=9)
        else:
            ax.legend(loc=legend_loc, fontsize=9)
    u.savefig_or_show(ax.figure, save=save, show=show)
    return ax


def _pick(wanted: Sequence[str] | None, available: list[str], what: str) -> list[str]:
    if wanted is None:
        return available
    missing = [w for w in wanted if w not in available]
    if missing:
        raise KeyError(f"{what} {missing} not in the evaluation table; it has {available}.")
    return list(wanted)
