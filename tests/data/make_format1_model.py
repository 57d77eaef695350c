"""Write ``format1_model/``: a model folder in saved-model format 1 (before checksums).

Run once with the sigmma-sc of commit 862d293 (the last one writing format 1):

    git worktree add --detach /tmp/sigmma_head 862d293
    PYTHONPATH=/tmp/sigmma_head/src python tests/data/make_format1_model.py

It trains a tiny model (embed_dim 8, hidden_dim 16, 20 genes, a registered 8-channel encoder
``tiny_conv8``) on ``datasets.synthetic(300, n_genes=40, seed=0)``, saves it without its reference
(a few kB) and stores the embeddings it gives that slide in ``format1_embeddings.npz``.
tests/test_reliability.py loads the folder with today's code and checks it embeds the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import sigmma_sc as sg

HERE = Path(__file__).parent
ENCODER = "tiny_conv8"


def tiny_conv8(**kwargs):
    """An 8-channel stride-32 convolution with fixed (seeded) weights."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 32, stride=32), torch.nn.ReLU())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return sg.pp.encoder_from_module(net, id=ENCODER, feature_map=lambda m, x: m(x))


def main() -> None:
    torch.set_num_threads(1)
    sg.settings.progress_bar = False
    sg.pp.register_encoder(ENCODER, tiny_conv8)
    sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
    model = sg.tl.fit(
        sdata, encoder=ENCODER, n_genes=20, embed_dim=8, hidden_dim=16, max_epochs=2, batch_size=16, seed=0
    )
    model.reference = None
    model.save(HERE / "format1_model")
    emb = model.get_embeddings(sdata)
    np.savez_compressed(HERE / "format1_embeddings.npz", **{k: emb[k] for k in ("img", "expr", "joint")})


if __name__ == "__main__":
    main()
