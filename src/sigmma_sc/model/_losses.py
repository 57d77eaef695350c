"""Contrastive and cross-scale losses.

Imported only from inside functions (torch at module level).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sigmma_sc._constants import Levels

from ._data import SubgraphBatcher

#: CLIP's initial temperature (logit scale 1 / 0.07) and its upper clamp (scale 100).
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def world_size() -> int:
    """Return the number of processes of the default ``torch.distributed`` group (1 when not initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1


def _gather(x: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """Rows of ``x`` from every rank, in rank order (ranks may hold different row counts)."""
    import torch.distributed as dist

    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:
        return x
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0)
    x = x.contiguous()
    if grad:
        parts = _AllGatherRows.apply(x).split(x.shape[0], dim=0)
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class _AllGatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks whose backward sums every rank's gradient of this rank's block.

    Public collectives only (``all_gather`` forward, ``all_reduce`` backward): works with gloo and NCCL.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows[0] : ctx.rows[1]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all devices, keeping the gradient; identity on one device.

    Ranks may hold different numbers of rows (micro nodes per batch vary): rows are padded to the
    largest count for the collective and the padding is dropped afterwards. The backward pass sums
    the gradients every rank sends to a rank's rows: with every rank computing the same loss on the
    gathered rows, the gradients DDP averages are those of that loss on one device.

    Examples
    --------
    >>> import torch
    >>> gather_with_grad(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """
    return _gather(x, grad=True)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Concatenate an integer tensor over all devices (no gradient); identity on one device.

    Examples
    --------
    >>> import torch
    >>> gather_ids(torch.arange(3)).tolist()
    [0, 1, 2]
    """
    return _gather(x, grad=False)


def coarse_rows(batch: dict[str, torch.Tensor], level: str, *, disjoint: bool) -> torch.Tensor:
    """Rows of the gathered ``level`` embeddings that the loss of the global batch uses.

    Coarse nodes (regions) are the parents of each rank's targets, so two ranks may hold the same
    region: the global batch counts each region once (its first copy; every copy embeds the same).
    Rows come in increasing node id, as on one device. With ``disjoint``, the greedy set of regions
    that share no member is drawn on the global batch, from the gathered region memberships and
    rank 0's batch seed (:meth:`~sigmma_sc.model._data.SubgraphBatcher._disjoint`): identical on
    every rank, and on one device the batcher's own ``{level}_loss_mask``.

    Returns
    -------
    Index (on the device of the batch) into the rows of ``gather_with_grad(z)``.

    Examples
    --------
    >>> import torch
    >>> b = {"macro_ids": torch.tensor([2, 5]), "meso_ids": torch.tensor([7, 8, 9]),
    ...      "region_src": torch.tensor([0, 1, 1, 2]), "region_dst": torch.tensor([0, 0, 1, 1]),
    ...      "macro_mask_seed": 0}
    >>> coarse_rows(b, "macro", disjoint=False).tolist()
    [0, 1]
    >>> len(coarse_rows(b, "macro", disjoint=True))  # the two regions share meso node 8
    1
    """
    ids_local = batch[f"{level}_ids"]
    device = ids_local.device
    ids = gather_ids(ids_local).cpu().numpy()
    uniq, first = np.unique(ids, return_index=True)
    if disjoint:
        node = gather_ids(ids_local[batch["region_dst"]]).cpu().numpy()
        member = gather_ids(batch["meso_ids"][batch["region_src"]]).cpu().numpy()
        seed = gather_ids(torch.tensor([int(batch[f"{level}_mask_seed"])], device=device)).cpu().numpy()
        import scipy.sparse as sp

        reg = sp.coo_matrix(
            (np.ones(node.size, dtype=np.float32), (np.searchsorted(uniq, node), member)),
            shape=(uniq.size, int(member.max(initial=-1)) + 1),
        )
        first = first[SubgraphBatcher._disjoint(reg, uniq.size, int(seed[0]))]
    return torch.as_tensor(first, dtype=torch.long, device=device)


def info_nce(
    z_img: torch.Tensor,
    z_expr: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    soft: bool = False,
    mask: torch.Tensor | None = None,
    gather: bool = True,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between paired, L2-normalised rows.

    Parameters
    ----------
    z_img, z_expr
        ``(n, d)`` normalised embeddings; row ``i`` of both is a positive pair.
    logit_scale
        Scalar, ``1 / temperature``.
    soft
        BLEEP-style soft targets: each row's target distribution is the softmax of the mean
        within-modality similarity (image-image and expression-expression, detached) at the same
        temperature, so near-duplicate neighbours are not pushed apart as hard negatives.
    mask
        ``(n,)`` bool: rows to keep (e.g. non-overlapping regions); all kept when ``None``.
    gather
        Gather the (kept) rows of every device first, for negatives across devices; ``False`` when
        the rows are already the global batch's.
    groups
        ``(n,)`` int batch code of each row (its section, its patient), or ``None``: a row's
        negatives are then the rows of its own group only. Rows of other groups would otherwise be
        told apart by whatever marks their batch in both modalities (stain, depth, section-wide
        composition), and the loss would reward embedding the batch.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> z = F.normalize(torch.randn(8, 4), dim=-1)
    >>> float(info_nce(z, z, torch.tensor(100.0))) < float(info_nce(z, z.roll(1, 0), torch.tensor(100.0)))
    True
    >>> # Two groups of four: each row's negatives are the three other rows of its group.
    >>> g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    >>> float(info_nce(z, z, torch.tensor(1.0), groups=g)) < float(info_nce(z, z, torch.tensor(1.0)))
    True
    """
    if mask is not None:
        z_img, z_expr = z_img[mask], z_expr[mask]
        groups = None if groups is None else groups[mask]
    if gather:
        z_img, z_expr = gather_with_grad(z_img), gather_with_grad(z_expr)
        groups = None if groups is None else gather_ids(groups)
    n = z_img.shape[0]
    if n < 2:
        return z_img.sum() * 0.0
    logits = logit_scale * z_img @ z_expr.T
    other = None
    if groups is not None and bool((groups != groups[0]).any()):
        other = groups[:, None] != groups[None, :]
        logits = logits.masked_fill(other, float("-inf"))
    if soft:
        with torch.no_grad():
            within = logit_scale * 0.5 * (z_img @ z_img.T + z_expr @ z_expr.T)
            if other is not None:
                within = within.masked_fill(other, float("-inf"))
            target = F.softmax(within, dim=-1)
        logp_i, logp_e = F.log_softmax(logits, dim=-1), F.log_softmax(logits.T, dim=-1)
        if other is not None:
            # Masked pairs have target 0 and log-probability -inf: 0 * -inf would be NaN.
            logp_i, logp_e = logp_i.masked_fill(other, 0.0), logp_e.masked_fill(other, 0.0)
        loss_i = torch.sum(-target * logp_i, dim=-1).mean()
        loss_e = torch.sum(-target.T * logp_e, dim=-1).mean()
    else:
        target = torch.arange(n, device=logits.device)
        loss_i = F.cross_entropy(logits, target)
        loss_e = F.cross_entropy(logits.T, target)
    return 0.5 * (loss_i + loss_e)


def consistency(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between normalised child embeddings and their parents' (``1 - cos``).

    The mean runs over the rows of every device (the distances are gathered), so that under DDP
    it is the mean of the global batch, whatever the number of rows per device.

    Examples
    --------
    >>> import torch
    >>> float(consistency(torch.eye(2), torch.eye(2)))
    0.0
    """
    dist = gather_with_grad(1.0 - (child * parent).sum(-1))
    if dist.shape[0] == 0:
        return child.sum() * 0.0
    return dist.mean()


class ContrastiveLoss(nn.Module):
    """Weighted sum of per-level symmetric InfoNCE plus cross-scale consistency.

    Parameters
    ----------
    pair_levels
        Levels with image/expression pairs; one learnable, log-parametrised temperature each.
    level_weights
        Weight of each level's InfoNCE (missing levels weigh 1).
    consistency_weight
        Weight of the child-parent term (both modalities, micro->meso and meso->macro).
    soft_levels
        Levels whose InfoNCE uses soft targets.
    disjoint_levels
        Levels whose InfoNCE uses only the batch's non-overlapping nodes (``macro_loss_mask``).
        Under DDP the macro rows are gathered first and the mask is drawn once on the global batch
        (:func:`coarse_rows`), so the loss and its gradients are those of one device on the
        concatenated batches.
    """

    def __init__(
        self,
        pair_levels: tuple[str, ...],
        *,
        level_weights: dict[str, float] | None = None,
        consistency_weight: float = 0.1,
        soft_levels: tuple[str, ...] = (),
        disjoint_levels: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.pair_levels = tuple(pair_levels)
        self.level_weights = {lv: float((level_weights or {}).get(lv, 1.0)) for lv in self.pair_levels}
        self.consistency_weight = float(consistency_weight)
        self.soft_levels = tuple(soft_levels)
        self.disjoint_levels = tuple(disjoint_levels)
        self.log_scale = nn.ParameterDict(
            {lv: nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE))) for lv in self.pair_levels}
        )

    def scale(self, level: str) -> torch.Tensor:
        """Return the logit scale (1 / temperature) of a level, clamped to ``[1, 100]``."""
        return self.log_scale[level].clamp(0.0, math.log(MAX_LOGIT_SCALE)).exp()

    def forward(
        self,
        img: dict[str, torch.Tensor],
        expr: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Loss terms: ``"loss"`` (total), ``"loss_{level}"`` and ``"loss_consistency"``."""
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for lv in self.pair_levels:
            mask = batch.get(f"{lv}_loss_mask") if lv in self.disjoint_levels else None
            soft = lv in self.soft_levels
            groups = batch.get(f"{lv}_batch")
            if lv == Levels.MACRO and world_size() > 1:
                # Regions: deduplicated (and masked) on the global batch, after the gather.
                rows = coarse_rows(batch, lv, disjoint=mask is not None)
                zi, ze = gather_with_grad(img[lv])[rows], gather_with_grad(expr[lv])[rows]
                groups = None if groups is None else gather_ids(groups)[rows]
                terms[f"loss_{lv}"] = info_nce(zi, ze, self.scale(lv), soft=soft, gather=False, groups=groups)
            else:
                terms[f"loss_{lv}"] = info_nce(img[lv], expr[lv], self.scale(lv), soft=soft, mask=mask, groups=groups)
            total = total + self.level_weights[lv] * terms[f"loss_{lv}"]
        if self.consistency_weight > 0:
            cons = []
            for side in (img, expr):
                if "micro" in side and "meso" in side:
                    parent = batch["micro_parent"][batch["micro_target"]]
                    cons.append(consistency(side["micro"], side["meso"][parent]))
                if "meso" in side and "macro" in side:
                    cons.append(consistency(side["meso"], side["macro"][batch["macro_of_target"]]))
            if cons:
                terms["loss_consistency"] = torch.stack(cons).mean()
                total = total + self.consistency_weight * terms["loss_consistency"]
        terms["loss"] = total if isinstance(total, torch.Tensor) else torch.zeros(())
        return terms
