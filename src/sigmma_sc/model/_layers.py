"""Network blocks: per-level MLPs, GATv2 blocks, attention pooling and the two-sided encoder.

Imported only from inside functions (it imports torch and torch_geometric at module level).
Pooling uses ``torch.Tensor.index_add_`` and ``torch_geometric.utils.softmax``: no pyg-lib,
torch-scatter or torch-sparse.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    # torch_geometric's import triggers torch.jit deprecation warnings that are not ours to fix.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", UserWarning)
    from torch_geometric.nn import GATv2Conv
    from torch_geometric.utils import softmax

from sigmma_sc._constants import Levels


class MLP(nn.Module):
    """Two-layer projection ``in -> hidden -> out`` with LayerNorm, GELU and dropout."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, n_hidden),
            nn.LayerNorm(n_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(n_hidden, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GATBlock(nn.Module):
    """Residual GATv2 layer: ``x + GELU(GATv2(LayerNorm(x)))``.

    Multi-head attention with concatenated heads of size ``dim // heads``; self loops are added so
    isolated nodes keep their own signal.
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by the number of attention heads ({heads}).")
        self.norm = nn.LayerNorm(dim)
        self.conv = GATv2Conv(dim, dim // heads, heads=heads, concat=True, dropout=dropout, add_self_loops=True)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.conv(self.norm(x), edges))


class AttentionPool(nn.Module):
    """Gated attention pooling of child nodes into parents (softmax over each parent's children)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, index: torch.Tensor, n_out: int) -> torch.Tensor:
        """Pool rows ``x`` into ``n_out`` parents; ``index[i]`` is the parent of row ``i``."""
        out = torch.zeros(n_out, x.shape[1], dtype=x.dtype, device=x.device)
        if x.shape[0] == 0:
            return out
        w = softmax(self.gate(x).squeeze(-1).float(), index, num_nodes=n_out).to(x.dtype)
        return out.index_add_(0, index, w[:, None] * self.value(x))


class SideEncoder(nn.Module):
    """One modality's hierarchy encoder (image or expression).

    micro: MLP, then ``intra_layers`` GATv2 blocks over the cells of each subgraph;
    meso: MLP + attention pooling of its micro nodes, then ``inter_layers`` residual GATv2 blocks
    over the meso graph; macro: MLP + attention pooling of the local (pre-GNN) states of the
    region's meso nodes. A linear head per level
    gives the output, L2-normalised.

    Parameters
    ----------
    in_dims
        ``{level: input dimension}`` for the levels this side reads (a level absent here has no
        input on this side and no output).
    embed_dim
        Width of every hidden state and of the outputs.
    graph
        Use the GNN blocks (``False``: MLPs and pooling only).
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        *,
        embed_dim: int,
        hidden_dim: int,
        graph: bool,
        intra_layers: int,
        inter_layers: int,
        heads: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.levels = tuple(lv for lv in Levels.ALL if lv in in_dims)
        self.graph = graph
        self.mlp = nn.ModuleDict({lv: MLP(in_dims[lv], hidden_dim, embed_dim, dropout) for lv in self.levels})
        self.head = nn.ModuleDict({lv: nn.Linear(embed_dim, embed_dim) for lv in self.levels})
        if Levels.MICRO in self.levels and Levels.MESO in self.levels:
            self.pool_micro = AttentionPool(embed_dim)
        if Levels.MACRO in self.levels and Levels.MESO in self.levels:
            self.pool_meso = AttentionPool(embed_dim)
        if graph:
            if Levels.MICRO in self.levels:
                self.intra = nn.ModuleList([GATBlock(embed_dim, heads, dropout) for _ in range(intra_layers)])
            self.inter = nn.ModuleList([GATBlock(embed_dim, heads, dropout) for _ in range(inter_layers)])

    def forward(self, batch: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
        """Normalised embeddings ``{level: (n, d)}`` of the batch's target nodes.

        Targets: the first ``n_target`` meso nodes, the micro nodes at ``micro_target`` and every
        macro node of the batch.
        """
        out, local = self.local_states(batch, suffix)
        out[Levels.MESO] = self.meso_embedding(local, batch.get("meso_edges"), int(batch["n_target"]))
        if Levels.MACRO in self.levels:
            out[Levels.MACRO] = self.macro_embedding(
                batch[f"macro_{suffix}"], local[batch["region_src"]], batch["region_dst"]
            )
        return out

    def local_states(self, batch: dict[str, torch.Tensor], suffix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({"micro": z of the micro targets}, local states of every meso node of the batch)``.

        A meso node's local state depends on its own features and cells only (the intra-subgraph
        graph never leaves a subgraph), so it can be computed once per node and reused as context.
        """
        out: dict[str, torch.Tensor] = {}
        hm = None
        if Levels.MICRO in self.levels:
            hm = self.mlp[Levels.MICRO](batch[f"micro_{suffix}"])
            if self.graph:
                for blk in self.intra:
                    hm = blk(hm, batch["micro_edges"])
            out[Levels.MICRO] = F.normalize(self.head[Levels.MICRO](hm[batch["micro_target"]]).float(), dim=-1)
        hs = self.mlp[Levels.MESO](batch[f"meso_{suffix}"])
        if hm is not None:
            hs = hs + self.pool_micro(hm, batch["micro_parent"], hs.shape[0])
        return out, hs

    def meso_embedding(self, local: torch.Tensor, edges: torch.Tensor | None, n_target: int) -> torch.Tensor:
        """Normalised embeddings of the first ``n_target`` rows of ``local`` after the inter-subgraph GNN over ``edges``."""
        hs = local
        if self.graph:
            for blk in self.inter:
                hs = blk(hs, edges)
        return F.normalize(self.head[Levels.MESO](hs[:n_target]).float(), dim=-1)

    def macro_embedding(self, x: torch.Tensor, members: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Normalised region embeddings from their features ``x`` and their members' local states.

        ``members[i]`` is the local state of a member of region ``region[i]`` (the region already
        spans the neighbourhood the inter-subgraph GNN would add).
        """
        h = self.mlp[Levels.MACRO](x)
        h = h + self.pool_meso(members, region, h.shape[0])
        return F.normalize(self.head[Levels.MACRO](h).float(), dim=-1)
