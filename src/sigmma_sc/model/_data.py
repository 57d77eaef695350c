"""Model inputs: gene selection, per-level expression and mini-batches of subgraphs.

Everything here is index arithmetic on numpy / scipy arrays; torch appears only in
:meth:`SubgraphBatcher.batch`, which returns a dict of tensors. A mini-batch is a set of meso
subgraphs (spots or niches) with

- their micro children (cells or nuclei) and the micro edges inside each subgraph,
- the meso nodes their inter-subgraph GNN reads (the ``inter_hops``-hop ball around the batch), and
- their macro parents with the meso members each region pools (regions pool the members' local
  embeddings, before the inter-subgraph GNN, so members need no neighbours of their own).

Memory is bounded by the batch size times the neighbourhood size, never by the slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sigmma_sc._constants import Defaults, Keys, Levels

if TYPE_CHECKING:
    import torch

#: At most this many micro nodes per batch enter the micro-level contrastive loss.
MAX_MICRO_PAIRS = 2048


@dataclass
class ExpressionSource:
    """Unit-level expression of the model genes in linear scale, aggregated per node on demand.

    Attributes
    ----------
    units
        ``(n_units, n_genes)`` CSR: raw counts of the model genes, or ``expm1`` of log1p-normalised
        values when ``log_normalized``.
    library
        ``(n_units,)`` total counts over all genes (the normalisation denominator); ``None`` when
        ``log_normalized`` (nodes then average their units in linear scale).
    """

    units: sp.csr_matrix
    library: np.ndarray | None

    @classmethod
    def from_counts(cls, counts: sp.spmatrix, gene_idx: np.ndarray, *, log_normalized: bool) -> ExpressionSource:
        """Build from a ``(n_units, n_vars)`` matrix and the column index of each model gene.

        Examples
        --------
        >>> import numpy as np, scipy.sparse as sp
        >>> src = ExpressionSource.from_counts(sp.csr_matrix(np.eye(3)), np.array([0, 2]), log_normalized=False)
        >>> src.units.shape
        (3, 2)
        """
        counts = sp.csr_matrix(counts, dtype=np.float32)
        sub = sp.csr_matrix(counts[:, gene_idx])
        if log_normalized:
            sub.data = np.expm1(sub.data)
            return cls(units=sub, library=None)
        return cls(units=sub, library=np.asarray(counts.sum(axis=1)).ravel().astype(np.float64))

    def node_expression(
        self, members: sp.csr_matrix, *, keep: np.ndarray | None = None, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """log1p-normalised expression of nodes that sum the units in ``members`` rows.

        ``keep``: ``(n_nodes,)`` share of each node's counts kept by binomial thinning (with ``rng``),
        as if the node had been sequenced that much less deeply (raw counts only).

        Examples
        --------
        >>> import numpy as np, scipy.sparse as sp
        >>> src = ExpressionSource(units=sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0]])), library=np.array([1.0, 1.0]))
        >>> src.node_expression(sp.csr_matrix(np.ones((1, 2)))).round(3)
        array([[8.517, 8.517]], dtype=float32)
        """
        members = sp.csr_matrix(members, dtype=np.float32)
        agg = np.asarray((members @ self.units).todense(), dtype=np.float64)
        if self.library is None:
            n = np.asarray(members.sum(axis=1)).ravel()
            agg /= np.maximum(n, 1)[:, None]
            return np.log1p(agg).astype(np.float32)
        total = members @ self.library
        if keep is not None and rng is not None:
            agg = rng.binomial(np.rint(agg).astype(np.int64), keep[:, None]).astype(np.float64)
            total = total * keep
        scale = np.divide(Defaults.TARGET_SUM, total, out=np.zeros_like(total), where=total > 0)
        return np.log1p(agg * scale[:, None]).astype(np.float32)


@dataclass
class LevelInput:
    """One hierarchy level as the model consumes it.

    Attributes
    ----------
    name
        ``"micro"``, ``"meso"`` or ``"macro"``.
    n
        Number of nodes.
    edges
        ``(2, E)`` int64 edges, both directions.
    parent
        ``(n,)`` index into the next coarser level of the hierarchy, or ``None``.
    features
        ``(n, F)`` standardised image features (an array, or a :class:`~sigmma_sc.model._inputs.ScaledFeatures`
        that scales the rows a batch reads), or ``None`` (the level then has no image input).
    members
        ``(n, n_units)`` 0/1 CSR, or ``None`` for image-only levels.
    """

    name: str
    n: int
    edges: np.ndarray
    parent: np.ndarray | None
    features: Any
    members: sp.csr_matrix | None


def csr_from_edges(edges: np.ndarray, n: int) -> sp.csr_matrix:
    """Binary ``(n, n)`` adjacency from a ``(2, E)`` edge list (duplicates merged, self loops dropped).

    Examples
    --------
    >>> csr_from_edges(np.array([[0, 1], [1, 2]]), 3).toarray().astype(int)
    array([[0, 1, 0],
           [0, 0, 1],
           [0, 0, 0]])
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(2, -1)
    keep = edges[0] != edges[1]
    a = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (edges[0, keep], edges[1, keep])),
        shape=(n, n),
    )
    a.sum_duplicates()
    a.data[:] = 1.0
    return a


def k_hop(adjacency: sp.csr_matrix, seeds: np.ndarray, hops: int) -> np.ndarray:
    """Sorted node ids within ``hops`` edges of ``seeds`` (seeds included).

    Examples
    --------
    >>> a = csr_from_edges(np.array([[0, 1, 1, 2], [1, 0, 2, 1]]), 4)
    >>> k_hop(a, np.array([0]), 1)
    array([0, 1])
    """
    mask = np.zeros(adjacency.shape[0], dtype=bool)
    mask[seeds] = True
    frontier = np.unique(seeds)
    for _ in range(hops):
        if frontier.size == 0:
            break
        nb = np.unique(adjacency[frontier].indices)
        frontier = nb[~mask[nb]]
        mask[frontier] = True
    return np.flatnonzero(mask)


def subgraph_edges(adjacency: sp.csr_matrix, nodes: np.ndarray) -> np.ndarray:
    """``(2, E)`` edges of ``adjacency`` among ``nodes``, renumbered to positions in ``nodes``.

    Examples
    --------
    >>> a = csr_from_edges(np.array([[0, 1, 1, 2], [1, 0, 2, 1]]), 3)
    >>> subgraph_edges(a, np.array([2, 1]))
    array([[0, 1],
           [1, 0]])
    """
    sub = sp.coo_matrix(adjacency[nodes][:, nodes])
    return np.vstack([sub.row, sub.col]).astype(np.int64)


def _targets_first(targets: np.ndarray, ball: np.ndarray) -> np.ndarray:
    """``targets`` (unique) followed by the other ids of the sorted ``ball``."""
    return np.concatenate([targets, np.setdiff1d(ball, targets, assume_unique=True)])


def _binary(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    m.data[:] = 1.0
    return m


def _children(parent: np.ndarray, n_parent: int) -> sp.csr_matrix:
    """``(n_parent, n_child)`` binary CSR of each parent's children."""
    n_child = parent.shape[0]
    ok = parent >= 0
    return sp.csr_matrix(
        (np.ones(int(ok.sum()), dtype=np.float32), (parent[ok], np.flatnonzero(ok))),
        shape=(n_parent, n_child),
    )


@dataclass
class SubgraphBatcher:
    """Builds mini-batches of meso subgraphs from the model's level inputs.

    Parameters
    ----------
    levels
        The hierarchy levels (fine to coarse); must contain ``"meso"``. Levels outside ``use_levels``
        are ignored.
    use_levels
        Levels the model embeds (a subset of ``levels`` keys, containing ``"meso"``).
    expression
        Unit expression source, or ``None`` (image only: H&E-only slides).
    graph
        Whether the GNNs run (otherwise no context nodes and no edges are gathered).
    inter_hops
        Number of inter-subgraph GNN layers: the batch reads the meso ball of this radius.
    expr_stats
        ``{level: (mean, std)}`` per-gene standardisation of the log1p expression fed to the
        expression encoders.
    disjoint_macro
        Mark, per batch, a subset of macro regions whose meso members do not overlap (greedy, in a
        seeded random order) for the macro-level loss (``macro_loss_mask``, with the seed of the
        draw in ``macro_mask_seed``: under DDP the loss redraws the mask on the global batch).
    depth_augment, feature_jitter
        Augmentation of batches drawn with ``augment=True`` (training): counts thinned to a random
        share in ``[1 - depth_augment, 1]`` per node, image features given a random per-channel gain
        ``1 + feature_jitter * N(0, 1)`` and offset ``feature_jitter * N(0, 1)`` per batch and level.
    node_batch
        ``(n_meso,)`` int batch code of every meso node (its section, its patient: see
        :func:`node_batches`), or ``None``. When given, every batch carries the code of each loss
        row (``{level}_batch``), and the loss draws a row's negatives from its own batch only.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> meso = LevelInput("meso", 3, np.array([[0, 1], [1, 0]]), None, np.zeros((3, 4), "float32"), sp.identity(3, format="csr"))
    >>> b = SubgraphBatcher({"meso": meso}, use_levels=("meso",), expression=None, graph=True)
    >>> b.batch(np.array([0]))["meso_ids"].tolist()
    [0, 1]
    """

    levels: dict[str, LevelInput]
    use_levels: tuple[str, ...]
    expression: ExpressionSource | None
    graph: bool = True
    inter_hops: int = 1
    expr_stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    disjoint_macro: bool = False
    node_batch: np.ndarray | None = None
    depth_augment: float = 0.0
    feature_jitter: float = 0.0

    def __post_init__(self) -> None:
        if Levels.MESO not in self.use_levels:
            raise ValueError(f"levels must contain 'meso' (the subgraph level), got {self.use_levels!r}.")
        meso = self.levels[Levels.MESO]
        self.n_meso = meso.n
        self.use_micro = Levels.MICRO in self.use_levels and Levels.MICRO in self.levels
        self.use_macro = Levels.MACRO in self.use_levels and Levels.MACRO in self.levels
        self.meso_adj = csr_from_edges(meso.edges, meso.n)
        if self.use_micro:
            micro = self.levels[Levels.MICRO]
            if micro.parent is None:
                raise ValueError("the micro level has no parent array: cannot attach cells to subgraphs.")
            self.micro_children = _children(np.asarray(micro.parent, dtype=np.int64), meso.n)
            # Intra-subgraph graph: only edges between cells of the same subgraph.
            e = np.asarray(micro.edges, dtype=np.int64).reshape(2, -1)
            same = micro.parent[e[0]] == micro.parent[e[1]]
            self.micro_adj = csr_from_edges(e[:, same], micro.n)
        if self.use_macro:
            macro = self.levels[Levels.MACRO]
            if meso.parent is None:
                raise ValueError("the meso level has no parent array: cannot attach subgraphs to regions.")
            region = _children(np.asarray(meso.parent, dtype=np.int64), macro.n)
            if macro.members is not None and meso.members is not None:
                # Every meso node sharing a unit with the region belongs to it.
                region = region + macro.members @ meso.members.T
            self.region = _binary(region)
        self.meso_parent = None if meso.parent is None else np.asarray(meso.parent, dtype=np.int64)

    # -- what has pairs ------------------------------------------------------------------------------------------
    def has_expression(self, level: str) -> bool:
        """Whether ``level`` nodes carry expression in this batcher."""
        return self.expression is not None and self.levels[level].members is not None

    def pair_levels(self) -> tuple[str, ...]:
        """Levels with paired image and expression embeddings."""
        return tuple(
            lv
            for lv in self.use_levels
            if lv in self.levels and self.has_expression(lv) and self.levels[lv].features is not None
        )

    def _img(self, level: str, nodes: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        x = self.levels[level].features[nodes]
        if rng is None or not self.feature_jitter:
            return x
        d = x.shape[1]
        gain = 1.0 + self.feature_jitter * rng.standard_normal(d, dtype=np.float32)
        offset = self.feature_jitter * rng.standard_normal(d, dtype=np.float32)
        return (x * gain + offset).astype(np.float32, copy=False)

    def _expr(self, level: str, nodes: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        keep = None
        if rng is not None and self.depth_augment > 0:
            keep = rng.uniform(1.0 - self.depth_augment, 1.0, size=len(nodes))
        x = self.expression.node_expression(self.levels[level].members[nodes], keep=keep, rng=rng)
        if level in self.expr_stats:
            mean, std = self.expr_stats[level]
            x = np.clip((x - mean) / std, -10.0, 10.0)
        return x.astype(np.float32)

    # -- one batch -----------------------------------------------------------------------------------------------
    def batch(
        self,
        meso_ids: np.ndarray,
        *,
        seed: int = 0,
        max_micro_pairs: int | None = MAX_MICRO_PAIRS,
        max_children: int | None = None,
        max_context_children: int | None = None,
        augment: bool = False,
        context: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Tensors for the subgraphs ``meso_ids`` (the loss targets come first in every meso array).

        ``micro_target`` lists every micro child of the targets, or a seeded random subset of
        ``max_micro_pairs`` of them (``None``: all, as for embedding). ``max_children`` keeps a
        seeded random subset of at most that many micro nodes per subgraph (training: a bag of
        cells per subgraph, as in multiple-instance learning; ``None``: all). ``max_context_children``:
        the same for the subgraphs that are context only (not targets; ``None``: ``max_children``):
        they only feed the targets' inter-subgraph GNN and region pooling, and outnumber the targets
        ~14:1 on a large slide, so fewer cells there keep a batch's cost near its targets'. ``augment``: apply
        the batcher's training augmentations (``depth_augment``, ``feature_jitter``).
        ``context=False``: the subgraphs ``meso_ids`` (unique) and their cells alone, without the
        graph ball, the regions or any edge between subgraphs (what their local states need).
        """
        import torch

        meso_ids = np.asarray(meso_ids, dtype=np.int64)
        n_b = meso_ids.size
        out: dict[str, Any] = {"n_target": n_b}
        aug = np.random.default_rng([seed, 2]) if augment and (self.depth_augment or self.feature_jitter) else None
        # The inter-subgraph GNN of the targets reads their k-hop ball; regions pool the local
        # (pre-GNN) state of their members, which needs no neighbours: memory ~ batch x ball size.
        ctx = meso_ids
        if context:
            ctx = k_hop(self.meso_adj, meso_ids, self.inter_hops) if self.graph else np.unique(meso_ids)
        if self.use_macro and context:
            macro_ids, macro_of_target = np.unique(self.meso_parent[meso_ids], return_inverse=True)
            reg = sp.coo_matrix(self.region[macro_ids])
            ctx = np.union1d(ctx, reg.col)
        ctx = _targets_first(meso_ids, ctx)
        pos = np.full(self.n_meso, -1, dtype=np.int64)
        pos[ctx] = np.arange(ctx.size)
        out["meso_ids"] = ctx
        meso = self.levels[Levels.MESO]
        if meso.features is not None:
            out["meso_img"] = self._img(Levels.MESO, ctx, aug)
        if self.graph and context:
            out["meso_edges"] = subgraph_edges(self.meso_adj, ctx)
        if self.has_expression(Levels.MESO):
            out["meso_expr"] = self._expr(Levels.MESO, ctx, aug)
        target_batch = None if self.node_batch is None else np.asarray(self.node_batch[meso_ids], dtype=np.int64)
        if target_batch is not None:
            out["meso_batch"] = target_batch

        if self.use_micro:
            ch = sp.coo_matrix(self.micro_children[ctx])
            rng = np.random.default_rng([seed, 1])
            if max_context_children is None:
                max_context_children = max_children
            capped = max_children is not None or max_context_children is not None
            shuffle = rng.permutation(ch.row.size) if capped else np.arange(ch.row.size)
            order = shuffle[np.argsort(ch.row[shuffle], kind="stable")]
            if capped:
                # Rank of each child inside its subgraph (random order): keep the first cap of them.
                rows = ch.row[order]
                first = np.searchsorted(rows, rows, side="left")
                big = np.iinfo(np.int64).max
                cap = np.where(
                    rows < n_b,
                    big if max_children is None else max_children,
                    big if max_context_children is None else max_context_children,
                )
                order = order[np.arange(rows.size) - first < cap]
            micro_ids = ch.col[order].astype(np.int64)
            micro_parent = ch.row[order].astype(np.int64)
            out["micro_ids"] = micro_ids
            out["micro_parent"] = micro_parent
            micro = self.levels[Levels.MICRO]
            if micro.features is not None:
                out["micro_img"] = self._img(Levels.MICRO, micro_ids, aug)
            if self.graph:
                out["micro_edges"] = subgraph_edges(self.micro_adj, micro_ids)
            target = np.flatnonzero(micro_parent < n_b)
            if max_micro_pairs is not None and target.size > max_micro_pairs:
                rng = np.random.default_rng(seed)
                target = np.sort(rng.choice(target, max_micro_pairs, replace=False))
            out["micro_target"] = target
            if target_batch is not None:
                out["micro_batch"] = target_batch[micro_parent[target]]
            if self.has_expression(Levels.MICRO):
                out["micro_expr"] = self._expr(Levels.MICRO, micro_ids, aug)

        if self.use_macro and context:
            macro = self.levels[Levels.MACRO]
            out["macro_ids"] = macro_ids
            out["macro_of_target"] = macro_of_target.astype(np.int64)
            src = pos[reg.col]
            out["region_src"] = src.astype(np.int64)
            out["region_dst"] = reg.row.astype(np.int64)
            if macro.features is not None:
                out["macro_img"] = self._img(Levels.MACRO, macro_ids, aug)
            if self.has_expression(Levels.MACRO):
                out["macro_expr"] = self._expr(Levels.MACRO, macro_ids, aug)
            if target_batch is not None:
                # A region is the parent of targets of one batch (regions never cross sections).
                macro_batch = np.empty(macro_ids.size, dtype=np.int64)
                macro_batch[macro_of_target] = target_batch
                out["macro_batch"] = macro_batch
            if self.disjoint_macro:
                # The mask of this batch alone (one device); under DDP the loss redraws it on the
                # global batch from the gathered regions and rank 0's seed (_losses.coarse_rows).
                out["macro_loss_mask"] = self._disjoint(reg, macro_ids.size, seed)
                out["macro_mask_seed"] = int(seed)

        return {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in out.items()}

    def meso_context(self, meso_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ball, edges)``: the ``inter_hops`` ball of ``meso_ids`` (those first) and its ``(2, E)`` edges by position."""
        meso_ids = np.asarray(meso_ids, dtype=np.int64)
        if not self.graph:
            return meso_ids, np.zeros((2, 0), dtype=np.int64)
        ball = _targets_first(meso_ids, k_hop(self.meso_adj, meso_ids, self.inter_hops))
        return ball, subgraph_edges(self.meso_adj, ball)

    def regions(self) -> np.ndarray:
        """Sorted ids of the macro nodes that are the parent of a meso node (the regions the model embeds)."""
        if not self.use_macro:  # with macro, __post_init__ has checked that meso nodes have parents
            return np.zeros(0, dtype=np.int64)
        return np.unique(self.meso_parent[self.meso_parent >= 0])

    def region_batch(self, macro_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Return the inputs of the regions ``macro_ids``.

        ``macro_img`` / ``macro_expr``, and their members as ``(region_src, region_dst)`` pairs
        (meso node id, position in ``macro_ids``).
        """
        macro_ids = np.asarray(macro_ids, dtype=np.int64)
        reg = sp.coo_matrix(self.region[macro_ids])
        out = {"region_src": reg.col.astype(np.int64), "region_dst": reg.row.astype(np.int64)}
        if self.levels[Levels.MACRO].features is not None:
            out["macro_img"] = self._img(Levels.MACRO, macro_ids, None)
        if self.has_expression(Levels.MACRO):
            out["macro_expr"] = self._expr(Levels.MACRO, macro_ids)
        return out

    @staticmethod
    def _disjoint(reg: sp.coo_matrix, n_macro: int, seed: int) -> np.ndarray:
        """Greedy set of regions sharing no meso member, visited in a seeded random order.

        ``reg`` holds one entry per (region position in ``0..n_macro-1``, meso member id) pair;
        duplicated pairs are harmless. Depends only on the set of pairs, ``n_macro`` and ``seed``.
        """
        shape = (n_macro, int(reg.col.max(initial=-1)) + 1)
        m = sp.csr_matrix((np.ones(reg.row.size, dtype=np.float32), (reg.row, reg.col)), shape=shape)
        m = m[:, np.unique(reg.col)] if reg.col.size else m
        overlap = sp.csr_matrix(m @ m.T)
        keep = np.zeros(n_macro, dtype=bool)
        blocked = np.zeros(n_macro, dtype=bool)
        for i in np.random.default_rng(seed).permutation(n_macro):
            if blocked[i]:
                continue
            keep[i] = True
            blocked[overlap[i].indices] = True
        return keep


def expression_stats(
    batcher_levels: dict[str, LevelInput], expression: ExpressionSource, nodes: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-level gene mean and (floored) std of the log1p expression of the given training nodes.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> src = ExpressionSource(units=sp.csr_matrix(np.eye(2, dtype="float32")), library=np.ones(2))
    >>> lv = {"meso": LevelInput("meso", 2, np.zeros((2, 0), "int64"), None, None, sp.identity(2, format="csr"))}
    >>> m, s = expression_stats(lv, src, {"meso": np.arange(2)})["meso"]
    >>> m.shape, bool((s > 0).all())
    ((2,), True)
    """
    stats = {}
    for name, nd in nodes.items():
        lv = batcher_levels[name]
        if lv.members is None or nd.size == 0:
            continue
        mean = np.zeros(expression.units.shape[1])
        sq = np.zeros_like(mean)
        for start in range(0, nd.size, 4096):
            x = expression.node_expression(lv.members[nd[start : start + 4096]]).astype(np.float64)
            mean += x.sum(0)
            sq += (x**2).sum(0)
        mean /= nd.size
        std = np.sqrt(np.maximum(sq / nd.size - mean**2, 0.0))
        # Floor: a gene almost constant in training would explode on new data otherwise.
        std = np.maximum(std, max(1e-2, 0.1 * float(np.median(std))))
        stats[name] = (mean.astype(np.float32), std.astype(np.float32))
    return stats


def node_batches(members: sp.spmatrix, unit_codes: np.ndarray) -> np.ndarray:
    """Batch code of each node: the most frequent code among the units it sums (``-1`` for nodes without units).

    Parameters
    ----------
    members
        ``(n_nodes, n_units)`` 0/1 membership (a level's ``members``).
    unit_codes
        ``(n_units,)`` int codes ``>= 0`` of each unit's batch (section, patient, ...).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> members = sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]]))
    >>> node_batches(members, np.array([2, 2, 0])).tolist()
    [2, 0, -1]
    """
    codes = np.asarray(unit_codes, dtype=np.int64)
    m = sp.csr_matrix(members, dtype=np.float32)
    if codes.shape != (m.shape[1],) or (codes < 0).any():
        raise ValueError(f"unit_codes must be {m.shape[1]} non-negative ints (one per unit), got shape {codes.shape}.")
    onehot = sp.csr_matrix(
        (np.ones(codes.size, dtype=np.float32), (np.arange(codes.size), codes)),
        shape=(codes.size, int(codes.max(initial=0)) + 1),
    )
    tally = (m @ onehot).toarray()
    out = tally.argmax(axis=1).astype(np.int64)
    out[tally.sum(axis=1) == 0] = -1
    return out


def unit_batch_codes(table: Any, unit_section: np.ndarray, batch_key: str | None) -> np.ndarray | None:
    """Batch code of every unit of a table: its section for ``batch_key="section"``, else the codes of an ``obs`` column.

    ``None`` for ``batch_key=None`` (no batches). The section comes from the validated slide
    (:attr:`sigmma_sc.io.SlideData.unit_section`), so it exists for every table ``io.validate``
    accepts; another key must be a complete ``obs`` column.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> t = ad.AnnData(np.zeros((3, 1)), obs=pd.DataFrame({"patient": ["p1", "p2", "p1"]}, index=list("abc")))
    >>> unit_batch_codes(t, np.zeros(3, int), "patient").tolist()
    [0, 1, 0]
    """
    if batch_key is None:
        return None
    if batch_key == Keys.SECTION:
        return np.asarray(unit_section, dtype=np.int64)
    if batch_key not in table.obs:
        raise KeyError(
            f"batch_key={batch_key!r} is not an obs column of the table (columns: {list(table.obs.columns)}); "
            f"pass an existing column, {Keys.SECTION!r} (the default) or None."
        )
    values = table.obs[batch_key]
    if values.isna().any():
        raise ValueError(f"obs[{batch_key!r}] has missing values: every unit needs a batch (batch_key=).")
    return pd.factorize(values.astype(str))[0].astype(np.int64)
