"""Parameter text shared by the ``sigmma_sc.pl`` functions, written once (as scanpy's ``_docs.py``).

Each ``doc_*`` string is plain numpydoc text. :func:`shared_docs` puts ``doc_<name>`` into a
docstring where a line holds only ``{<name>}``, indented like that line, when the module is
imported. The result is an ordinary docstring: Sphinx napoleon renders it and
``pytest --doctest-modules`` collects its examples. Only whole-line slots are replaced, so
docstrings keep literal braces such as ``uns["{key}_colors"]`` without escaping.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T", bound=Callable[..., Any])
_SLOT = re.compile(r"^(?P<indent>[ \t]*)\{(?P<name>\w+)\}[ \t]*$", re.MULTILINE)


def fill_slots(doc: str, blocks: dict[str, str], *, owner: str = "docstring") -> str:
    r"""Replace each line of ``doc`` that holds only ``{name}`` by ``blocks[name]``, indented like that line.

    Examples
    --------
    >>> fill_slots("Do it.\n\n    {show}\n", {"show": "show\n    Show the figure."})
    'Do it.\n\n    show\n        Show the figure.\n'
    """

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            raise KeyError(f"{owner}: docstring slot {{{name}}} has no shared text; add doc_{name} to pl/_docs.py.")
        return textwrap.indent(blocks[name], match["indent"])

    return _SLOT.sub(fill, doc)


def shared_docs(obj: _T) -> _T:
    """Fill the ``{name}`` slots of ``obj``'s docstring with the ``doc_<name>`` texts of this module (a decorator).

    A slot without text raises ``KeyError`` at import time, so a renamed block cannot vanish from
    the docs unnoticed.
    """
    if obj.__doc__ is not None:  # python -OO strips docstrings
        obj.__doc__ = fill_slots(obj.__doc__, _SHARED, owner=obj.__qualname__)
    return obj


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
doc_table_key = """\
table_key
    Table annotating the units (``sdata.tables[table_key]``)."""

doc_library_id = """\
library_id, sections
    Section(s) to draw, one panel each: a section name or a list. ``library_id`` is scanpy's
    name for a section, ``sections`` the same argument under this package's name (pass one).
    Default: every section that has units to draw, in table order."""

# ---------------------------------------------------------------------------------------------
# Maps over the H&E
# ---------------------------------------------------------------------------------------------
doc_img = """\
img
    Draw the H&E under the units.
img_key
    Which image to draw. ``None`` (default): the section's H&E, read at the coarsest pyramid
    level that still gives about 1,200 pixels across the panel. An ``int`` or ``"scaleN"``: that
    pyramid level (``0`` = full resolution). ``"hires"`` / ``"lowres"`` (scanpy's names): the
    image element ending in ``_hires_image`` / ``_lowres_image`` (``spatialdata_io.visium``)
    when there is one, else the finest / coarsest pyramid level. Any other string, or a dict
    ``{section: name}``: an element of ``sdata.images`` (``image_key=`` of
    :func:`sigmma_sc.io.validate`).
img_alpha
    Opacity of the H&E."""

doc_size = """\
size
    Unit diameter as a multiple of the true diameter (``0.5`` leaves the tissue visible between
    Visium spots)."""

doc_map_frame = """\
frameon
    Draw axes with micron ticks instead of a bare image.
scalebar
    Draw a scale bar in microns."""

# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------
doc_cmap = """\
cmap
    Colormap for continuous values.
vmin, vmax
    Colour limits: a number, ``None`` (the data's minimum / maximum) or a percentile such as
    ``"p99"`` (one saturated unit then cannot wash out the map)."""

doc_share_scale = """\
share_scale
    Panels that show the same quantity (one continuous key over several sections; the observed
    and predicted maps of one gene) share one colour scale, with ``vmin`` / ``vmax`` resolved
    over all their units, so equal colours mean equal values. ``False``: each panel gets its own
    limits (compares patterns rather than levels)."""

doc_palette = """\
palette
    Categorical colours: dict category -> colour, list (cycled) or a colormap name. Default: the
    colours scanpy stored in ``uns["<key>_colors"]``, else scanpy's default palettes.
groups
    Categories to colour; the others are drawn in ``na_color``.
na_color
    Colour of missing values and of categories outside ``groups``."""

doc_legend_loc = """\
legend_loc
    ``"right margin"`` (beside the panel), ``None`` / ``"none"`` (no legend), or a matplotlib
    legend location such as ``"upper right"``."""

# ---------------------------------------------------------------------------------------------
# Figure: panels and output
# ---------------------------------------------------------------------------------------------
doc_panels = """\
ncols
    Panels per row.
wspace, hspace
    Width / height between panels as a fraction of a panel (matplotlib's ``GridSpec``). ``None``:
    room for the legends and colour bars."""

doc_save_show = """\
save
    Write the figure to this path; the format follows the suffix (PNG without one).
show
    Show the figure. ``None``: only when nothing is saved and the backend can open windows
    (scripts and tests on the Agg backend never block)."""

doc_ax_save_show = (
    """\
ax
    Draw into this matplotlib axes instead of a new figure (one panel only).
return_fig
    Return the :class:`~matplotlib.figure.Figure` instead of the axes.
"""
    + doc_save_show
)

doc_returns_panels = """\
Returns
-------
The :class:`~matplotlib.axes.Axes` when there is one panel (or ``ax`` was given), else the
:class:`~matplotlib.figure.Figure`; always the figure with ``return_fig=True``."""

doc_returns_figure = """\
Returns
-------
The :class:`~matplotlib.figure.Figure`."""

_SHARED = {name.removeprefix("doc_"): text for name, text in dict(globals()).items() if name.startswith("doc_")}
