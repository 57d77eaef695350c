"""Contrastive and cross-scale losses.

Imported only from inside functions (torch at module level).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: CLIP's initial temperature (logit scale 1 / 0.07) and its upper clamp (scale 100).
INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all devices, keeping the gradient; identity on one device.

    Ranks may hold different numbers of rows (micro nodes per batch vary): rows are padded to the
    largest count for the collective and the padding is dropped afterwards.

    Examples
    --------
    >>> import torch
    >>> gather_with_grad(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0)
    parts = all_gather(x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def info_nce(
    z_img: torch.Tensor,
    z_expr: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    soft: bool = False,
    mask: torch.Tensor | None = None,
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

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> z = F.normalize(torch.randn(8, 4), dim=-1)
    >>> float(info_nce(z, z, torch.tensor(100.0))) < float(info_nce(z, z.roll(1, 0), torch.tensor(100.0)))
    True
    """
    if mask is not None:
        z_img, z_expr = z_img[mask], z_expr[mask]
    z_img, z_expr = gather_with_grad(z_img), gather_with_grad(z_expr)
    n = z_img.shape[0]
    if n < 2:
        return z_img.sum() * 0.0
    logits = logit_scale * z_img @ z_expr.T
    if soft:
        with torch.no_grad():
            within = 0.5 * (z_img @ z_img.T + z_expr @ z_expr.T)
            target = F.softmax(logit_scale * within, dim=-1)
        loss_i = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        loss_e = torch.sum(-target.T * F.log_softmax(logits.T, dim=-1), dim=-1).mean()
    else:
        target = torch.arange(n, device=logits.device)
        loss_i = F.cross_entropy(logits, target)
        loss_e = F.cross_entropy(logits.T, target)
    return 0.5 * (loss_i + loss_e)


def consistency(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between normalised child embeddings and their parents' (``1 - cos``).

    Examples
    --------
    >>> import torch
    >>> float(consistency(torch.eye(2), torch.eye(2)))
    0.0
    """
    if child.shape[0] == 0:
        return child.sum() * 0.0
    return (1.0 - (child * parent).sum(-1)).mean()


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
            terms[f"loss_{lv}"] = info_nce(img[lv], expr[lv], self.scale(lv), soft=lv in self.soft_levels, mask=mask)
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
