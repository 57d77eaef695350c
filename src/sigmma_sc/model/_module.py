"""The Lightning module and the datasets that feed it.

Imported only from inside functions (torch and lightning at module level).
"""

from __future__ import annotations

import math
from collections import defaultdict

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from ._data import SubgraphBatcher
from ._layers import SideEncoder
from ._losses import ContrastiveLoss


class SubgraphBatches(Dataset):
    """Map-style dataset whose items are whole mini-batches of meso subgraphs.

    Items are batches (not nodes) so that Lightning's distributed sampler splits batches across
    devices, and each device builds its own subgraph tensors. The node order is reshuffled every
    epoch from ``(seed, epoch)``: deterministic for a given seed.

    Parameters
    ----------
    batcher
        Builds the tensors of one batch.
    nodes
        Meso node ids to iterate over.
    batch_size
        Meso subgraphs per batch.
    shuffle
        Reshuffle every epoch (training) or keep the order (validation, embedding).
    seed
        Base seed of the shuffles.
    """

    def __init__(
        self,
        batcher: SubgraphBatcher,
        nodes: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        max_micro_pairs: int | None = None,
        max_children: int | None = None,
    ) -> None:
        self.batcher = batcher
        self.nodes = np.asarray(nodes, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.max_micro_pairs = max_micro_pairs
        self.max_children = max_children
        n = self.nodes.size
        n_batches = max(1, math.ceil(n / self.batch_size))
        # A training batch of one subgraph has no negatives: fold a tiny tail into the previous batch.
        if shuffle and n_batches > 1 and n - (n_batches - 1) * self.batch_size < 2:
            n_batches -= 1
        self.n_batches = n_batches

    def __len__(self) -> int:
        return self.n_batches

    def _bounds(self, i: int) -> tuple[int, int]:
        start = i * self.batch_size
        stop = self.nodes.size if i == self.n_batches - 1 else start + self.batch_size
        return start, stop

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        order = self.nodes
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.nodes)
        start, stop = self._bounds(i)
        seed = int(np.random.default_rng([self.seed, self.epoch, i]).integers(2**31))
        return self.batcher.batch(
            order[start:stop], seed=seed, max_micro_pairs=self.max_micro_pairs, max_children=self.max_children
        )


class SigmmaModule(L.LightningModule):
    """Image and expression hierarchy encoders trained with the multi-scale contrastive loss.

    Parameters
    ----------
    img_dims
        ``{level: image feature dimension}``.
    expr_dims
        ``{level: number of genes}`` for the levels with expression.
    pair_levels
        Levels with image/expression pairs (the InfoNCE terms).
    embed_dim, hidden_dim, graph, intra_layers, inter_layers, heads, dropout
        See :class:`~sigmma_sc.model._layers.SideEncoder`.
    lr, weight_decay
        AdamW parameters.
    consistency_weight, soft_levels, disjoint_levels, level_weights
        See :class:`~sigmma_sc.model._losses.ContrastiveLoss`.
    """

    def __init__(
        self,
        img_dims: dict[str, int],
        expr_dims: dict[str, int],
        pair_levels: tuple[str, ...],
        *,
        embed_dim: int,
        hidden_dim: int,
        graph: bool,
        intra_layers: int = 1,
        inter_layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        consistency_weight: float = 0.1,
        soft_levels: tuple[str, ...] = (),
        disjoint_levels: tuple[str, ...] = (),
        level_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        kw = {
            "embed_dim": embed_dim,
            "hidden_dim": hidden_dim,
            "graph": graph,
            "intra_layers": intra_layers,
            "inter_layers": inter_layers,
            "heads": heads,
            "dropout": dropout,
        }
        self.img = SideEncoder(img_dims, **kw)
        self.expr = SideEncoder(expr_dims, **kw) if expr_dims else None
        self.criterion = ContrastiveLoss(
            pair_levels,
            level_weights=level_weights,
            consistency_weight=consistency_weight,
            soft_levels=soft_levels,
            disjoint_levels=disjoint_levels,
        )
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_data: SubgraphBatches | None = None
        self.epoch_rows: list[dict[str, float]] = []
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "val": defaultdict(float)}
        self._counts: dict[str, int] = {"train": 0, "val": 0}

    def forward(self, batch: dict[str, torch.Tensor], *, expression: bool = True) -> dict[str, dict]:
        """``{"img": {level: z}, "expr": {level: z}}`` for the batch's target nodes."""
        out = {"img": self.img(batch, "img")}
        out["expr"] = self.expr(batch, "expr") if (expression and self.expr is not None) else {}
        return out

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        z = self(batch)
        terms = self.criterion(z["img"], z["expr"], batch)
        bs = int(batch["n_target"])
        for name, value in terms.items():
            self._sums[stage][name] += float(value.detach())
        self._counts[stage] += 1
        self.log(f"{stage}_loss", terms["loss"], prog_bar=True, batch_size=bs, sync_dist=stage == "val")
        return terms["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        if self.train_data is not None:
            self.train_data.epoch = self.current_epoch

    def on_train_epoch_end(self) -> None:
        # Validation runs inside the training epoch in Lightning 2: both sums are complete here.
        row: dict[str, float] = {"epoch": float(self.current_epoch + 1)}
        for stage in ("train", "val"):
            n = self._counts[stage]
            for name, total in self._sums[stage].items():
                row[f"{stage}_{name}"] = total / max(n, 1)
            self._sums[stage] = defaultdict(float)
            self._counts[stage] = 0
        for lv in self.criterion.pair_levels:
            row[f"temperature_{lv}"] = float(1.0 / self.criterion.scale(lv).detach())
        self.epoch_rows.append(row)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
