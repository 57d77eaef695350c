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

from sigmma_sc._constants import Defaults
from sigmma_sc._utils import release_memory

from ._data import SubgraphBatcher
from ._layers import SideEncoder
from ._losses import ContrastiveLoss


class SubgraphBatches(Dataset):
    """Map-style dataset whose items are whole mini-batches of meso subgraphs.

    Items are batches (not nodes) so that Lightning's distributed sampler splits batches across
    devices, and each device builds its own subgraph tensors. The node order is reshuffled every
    epoch from ``(seed, epoch)``: deterministic for a given seed. With ``groups``, every batch
    holds the nodes of one group (a section, a patient): the group's nodes are shuffled and cut
    into batches, and the batches of all groups are shuffled together, so that a batch's negatives
    share its section.

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
    max_micro_pairs, max_children, max_context_children
        See :meth:`SubgraphBatcher.batch`.
    groups
        ``(len(nodes),)`` int group of each node, or ``None`` (one group).
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
        max_context_children: int | None = None,
        groups: np.ndarray | None = None,
    ) -> None:
        self.batcher = batcher
        self.nodes = np.asarray(nodes, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.max_micro_pairs = max_micro_pairs
        self.max_children = max_children
        self.max_context_children = max_context_children
        codes = np.zeros(self.nodes.size, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
        if codes.shape != self.nodes.shape:
            raise ValueError(f"groups must give one code per node ({self.nodes.size}), got shape {codes.shape}.")
        self.group_nodes = [self.nodes[codes == g] for g in np.unique(codes)]
        self.group_batches = [self._n_batches(g.size) for g in self.group_nodes]
        self.n_batches = max(1, sum(self.group_batches))
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def _n_batches(self, n: int) -> int:
        n_batches = max(1, math.ceil(n / self.batch_size))
        # A training batch of one subgraph has no negatives: fold a tiny tail into the previous batch.
        if self.shuffle and n_batches > 1 and n - (n_batches - 1) * self.batch_size < 2:
            n_batches -= 1
        return n_batches

    def __len__(self) -> int:
        return self.n_batches

    def batches(self) -> list[np.ndarray]:
        """Node ids of every batch of the current epoch, in the order they are served."""
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        out: list[np.ndarray] = []
        for nodes, n_batches in zip(self.group_nodes, self.group_batches):
            order = rng.permutation(nodes) if rng is not None else nodes
            starts = [b * self.batch_size for b in range(n_batches)]
            out += [order[a : (starts[j + 1] if j + 1 < n_batches else order.size)] for j, a in enumerate(starts)]
        if rng is not None and len(self.group_nodes) > 1:
            out = [out[j] for j in rng.permutation(len(out))]
        out = out or [self.nodes]
        self._plan = (self.epoch, out)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seed = int(np.random.default_rng([self.seed, self.epoch, i]).integers(2**31))
        return self.batcher.batch(
            self.batches()[i],
            seed=seed,
            max_micro_pairs=self.max_micro_pairs,
            max_children=self.max_children,
            max_context_children=self.max_context_children,
            augment=self.shuffle,  # training batches only: validation and embeddings see the data as it is
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
        intra_layers: int = Defaults.INTRA_LAYERS,
        inter_layers: int = Defaults.INTER_LAYERS,
        heads: int = Defaults.HEADS,
        dropout: float = Defaults.DROPOUT,
        lr: float = Defaults.LR,
        weight_decay: float = Defaults.WEIGHT_DECAY,
        consistency_weight: float = Defaults.CONSISTENCY_WEIGHT,
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

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        # Subgraph batches differ in size: without a trim glibc keeps every freed size class and
        # the process grows over the epochs (her2st demo: 1.5 -> 3.5 GB in 8 epochs). ~4 ms a batch.
        release_memory()

    def on_validation_batch_end(self, outputs: object, batch: object, batch_idx: int, dataloader_idx: int = 0) -> None:
        release_memory()

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
