"""Working copies: compute into a light copy of a SpatialData, write into the user's object once, at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sigmma_sc._constants import Keys
from sigmma_sc.io import get_table

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def _copy_dicts(value: Any) -> Any:
    # Copies the dict structure (so writes into it stay local) while sharing the arrays inside.
    if isinstance(value, dict):
        return {k: _copy_dicts(v) for k, v in value.items()}
    return value


def light_copy(sdata: SpatialData, *, table_key: str = Keys.TABLE) -> SpatialData:
    """Return a SpatialData sharing images and shapes with ``sdata`` but with its own table object.

    The working copy of :func:`sigmma_sc.tl.fit`, :func:`image_features` and the baselines: writes
    into the copy's ``obs``, ``obsm``, ``obsp``, ``layers``, ``uns`` (dict structure) and element
    dicts do not reach ``sdata``; the large arrays (counts, cached features, images) are shared, not
    duplicated. :func:`write_back` moves what was added into ``sdata`` once everything succeeded.

    Parameters
    ----------
    sdata
        SpatialData with the table.
    table_key
        Table to copy (the other tables are shared).

    Returns
    -------
    The working copy.

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(100, n_genes=20, seed=0)
    >>> tmp = sg.pp.light_copy(sdata)
    >>> tmp["table"].uns["scratch"] = 1
    >>> "scratch" in sdata["table"].uns, tmp["table"].X is sdata["table"].X
    (False, True)
    """
    import anndata as ad
    from spatialdata import SpatialData

    table = get_table(sdata, table_key)
    new = ad.AnnData(
        X=table.X,
        obs=table.obs.copy(),
        var=table.var.copy(),
        uns=_copy_dicts(dict(table.uns)),
        obsm=dict(table.obsm),
        obsp=dict(table.obsp),
        layers=dict(table.layers),
    )
    tables = dict(sdata.tables)
    tables[table_key] = new
    return SpatialData(
        images=dict(sdata.images),
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes=dict(sdata.shapes),
        tables=tables,
    )


def write_back(work: SpatialData, target: SpatialData, *, table_key: str = Keys.TABLE, before: SpatialData) -> None:
    """Move what a computation added to its working copy (:func:`light_copy` of ``before``) into ``target``.

    New or replaced shapes elements (nuclei), ``obsp`` graphs and ``uns`` entries relative to
    ``before`` are written; ``uns["sigmma"]`` is merged entry by entry. ``target`` is ``before``
    itself, or a copy of it (``tl.fit(copy=True)``).

    Examples
    --------
    >>> import sigmma_sc as sg
    >>> sdata = sg.datasets.synthetic(100, n_genes=20, seed=0)
    >>> work = sg.pp.light_copy(sdata)
    >>> h = sg.pp.build_hierarchy(work)
    >>> "sigmma" in sdata["table"].uns
    False
    >>> sg.pp.write_back(work, sdata, before=sdata)
    >>> sg.pp.get_hierarchy(sdata).unit_level
    'micro'
    """
    for name, element in work.shapes.items():
        if before.shapes.get(name) is not element:
            target.shapes[name] = element
    src, old, dst = get_table(work, table_key), get_table(before, table_key), get_table(target, table_key)
    for key, value in src.obsp.items():
        if old.obsp.get(key) is not value:
            dst.obsp[key] = value
    for key, value in src.uns.items():
        if key != Keys.UNS and old.uns.get(key) is not value:
            dst.uns[key] = value
    cache = dict(src.uns.get(Keys.UNS, {}))
    if cache:
        dst.uns.setdefault(Keys.UNS, {}).update(cache)
