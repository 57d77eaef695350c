"""The SIGMMA model: subgraph batches, GNN layers, contrastive losses, the Lightning module and the Sigmma class."""
