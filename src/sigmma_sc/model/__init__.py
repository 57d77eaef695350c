"""The SIGMMA model: subgraph batches, GNN layers, contrastive losses, the Lightning module and the Sigmma class.

Only the light pieces are imported here (numpy / scipy / pandas); torch and lightning load inside
the methods that train or embed.
"""

from ._data import select_genes
from ._sigmma import Sigmma

__all__ = ["Sigmma", "select_genes"]
