"""Integration across sections: the metrics, negatives drawn within a batch, and the default run on shifted sections."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.tl import _metrics as m


# ---------------------------------------------------------------------------------------------
# metrics on hand-made arrays
# ---------------------------------------------------------------------------------------------
def test_other_batch_share_and_uniform_level():
    batches = np.array([0, 0, 0, 1, 1, 1])
    # Neighbours inside the own batch, then all from the other batch.
    own = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    other = np.array([[3, 4], [4, 5], [3, 5], [0, 1], [1, 2], [0, 2]])
    assert m.other_batch_share(own, batches).tolist() == [0.0] * 6
    assert m.other_batch_share(other, batches).tolist() == [1.0] * 6
    # A unit of batch 0 has 3 of its 5 candidates in batch 1.
    assert m.uniform_other_batch_share(batches) == pytest.approx(0.6)
    assert m.uniform_other_batch_share(np.array([0, 0, 0, 0, 1])) == pytest.approx(2 * 4 * 1 / 20)
    with pytest.raises(ValueError, match="neighbors must be"):
        m.other_batch_share(own[:3], batches)


def test_shared_cluster_share_counts_units_of_shared_clusters():
    # Cluster 0: 5 units in each of 3 batches (shared); cluster 1: 5 + 5 + 4 (one batch short);
    # cluster 2: 10 units of one batch.
    clusters = np.array([0] * 15 + [1] * 14 + [2] * 10)
    batches = np.array(["a"] * 5 + ["b"] * 5 + ["c"] * 5 + ["a"] * 5 + ["b"] * 5 + ["c"] * 4 + ["a"] * 10)
    assert m.shared_cluster_share(clusters, batches) == pytest.approx(15 / 39)
    assert m.shared_cluster_share(clusters, batches, min_units=4) == pytest.approx(29 / 39)
    # min_batches is capped at the number of batches: with two batches, two suffice.
    two = np.where(batches == "c", "b", batches)
    assert m.shared_cluster_share(clusters, two) == pytest.approx(29 / 39)
    with pytest.raises(ValueError, match="same length"):
        m.shared_cluster_share(clusters[:-1], batches)


def test_integration_metrics_separated_vs_mixed_and_ari():
    rng = np.random.default_rng(0)
    n_per = 60
    sections = np.repeat(["A", "B", "C"], 2 * n_per)
    truth = np.tile(np.repeat(["x", "y"], n_per), 3)
    centres = {"x": np.zeros(8), "y": np.full(8, 6.0)}
    base = np.stack([centres[t] for t in truth]) + rng.normal(0, 0.5, (sections.size, 8))
    offset = {"A": 0.0, "B": 30.0, "C": 60.0}
    adata = ad.AnnData(np.zeros((sections.size, 1), dtype=np.float32))
    adata.obs["section"] = sections
    adata.obs["truth"] = truth
    adata.obsm["mixed"] = base
    adata.obsm["split"] = base + np.array([offset[s] for s in sections])[:, None]
    mixed = sg.tl.integration_metrics(adata, use_rep="mixed", labels_key="truth", resolution=0.1)
    split = sg.tl.integration_metrics(adata, use_rep="split", labels_key="truth", resolution=0.1)
    assert mixed["knn_other_batch"] > 0.5 and split["knn_other_batch"] == 0.0
    assert mixed["shared_clusters"] == 1.0 and split["shared_clusters"] == 0.0
    assert mixed["ari"] > 0.9
    assert mixed["knn_other_batch_uniform"] == pytest.approx(240 / 359)
    assert list(adata.obsm) == ["mixed", "split"] and list(adata.obs) == ["section", "truth"]  # nothing written
    with pytest.raises(KeyError, match="use_rep='nope'"):
        sg.tl.integration_metrics(adata, use_rep="nope")
    with pytest.raises(KeyError, match="batch_key='patient'"):
        sg.tl.integration_metrics(adata, use_rep="mixed", batch_key="patient")
    with pytest.raises(ValueError, match="n_neighbors"):
        sg.tl.integration_metrics(adata, use_rep="mixed", n_neighbors=0)


# ---------------------------------------------------------------------------------------------
# negatives within a batch: the loss, the batches, the node codes
# ---------------------------------------------------------------------------------------------
def test_info_nce_groups_equals_separate_groups():
    import torch
    import torch.nn.functional as F

    from sigmma_sc.model._losses import info_nce

    torch.manual_seed(0)
    zi = F.normalize(torch.randn(8, 5), dim=-1)
    ze = F.normalize(zi + 0.5 * torch.randn(8, 5), dim=-1)
    scale = torch.tensor(5.0)
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    a, b = groups == 0, groups == 1
    for soft in (False, True):
        masked = info_nce(zi, ze, scale, groups=groups, soft=soft)
        apart = 0.5 * (info_nce(zi[a], ze[a], scale, soft=soft) + info_nce(zi[b], ze[b], scale, soft=soft))
        assert torch.isfinite(masked)
        assert float(masked) == pytest.approx(float(apart), rel=1e-5)
        # One group: the plain loss.
        same = info_nce(zi, ze, scale, groups=torch.zeros(8, dtype=torch.long), soft=soft)
        assert float(same) == pytest.approx(float(info_nce(zi, ze, scale, soft=soft)), rel=1e-6)
    # The gradient flows through the masked logits.
    zi.requires_grad_(True)
    info_nce(zi, ze, scale, groups=groups, soft=True).backward()
    assert torch.isfinite(zi.grad).all() and zi.grad.abs().sum() > 0


def _meso_batcher(n: int):
    from sigmma_sc.model._data import LevelInput, SubgraphBatcher

    meso = LevelInput(
        "meso", n, np.zeros((2, 0), np.int64), None, np.zeros((n, 3), np.float32), sp.identity(n, format="csr")
    )
    return SubgraphBatcher({"meso": meso}, use_levels=("meso",), expression=None, graph=False)


def test_subgraph_batches_groups_one_group_per_batch():
    from sigmma_sc.model._module import SubgraphBatches

    nodes = np.arange(50)
    groups = np.repeat([0, 1, 2], [21, 21, 8])
    data = SubgraphBatches(_meso_batcher(50), nodes, batch_size=10, shuffle=True, seed=3, groups=groups)
    # 21 -> 10 + 11 (a tail of one is folded in), 8 -> 8.
    assert len(data) == 5
    for epoch in (0, 1):
        data.epoch = epoch
        plan = data.batches()
        assert sorted(np.concatenate(plan).tolist()) == nodes.tolist()
        assert all(np.unique(groups[b]).size == 1 for b in plan)
        assert sorted(len(b) for b in plan) == [8, 10, 10, 11, 11]
        assert data[0]["meso_ids"].tolist() == plan[0].tolist()
    data.epoch = 0
    first = [b.tolist() for b in data.batches()]
    data.epoch = 1
    assert [b.tolist() for b in data.batches()] != first  # reshuffled every epoch
    # Without groups: the order of one permutation cut into batches, as before the option.
    plain = SubgraphBatches(_meso_batcher(50), nodes, batch_size=10, shuffle=True, seed=3)
    order = np.random.default_rng([3, 0]).permutation(nodes)
    assert [b.tolist() for b in plain.batches()] == [order[i : i + 10].tolist() for i in range(0, 50, 10)]
    with pytest.raises(ValueError, match="one code per node"):
        SubgraphBatches(_meso_batcher(50), nodes, batch_size=10, shuffle=True, groups=groups[:-1])


def test_batcher_carries_batch_codes_of_every_loss_row():
    from sigmma_sc.model._data import node_batches

    sdata_levels = _meso_batcher(6)
    sdata_levels.node_batch = np.array([0, 0, 1, 1, 2, 2])
    batch = sdata_levels.batch(np.array([5, 2, 3]))
    assert batch["meso_batch"].tolist() == [2, 1, 1]
    members = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]))
    assert node_batches(members, np.array([0, 0, 1, 0])).tolist() == [0, 0, -1]
    with pytest.raises(ValueError, match="unit_codes"):
        node_batches(members, np.array([0, 1]))


def test_fit_batch_key_validated_before_work():
    sdata = sg.datasets.synthetic(200, n_genes=20, n_sections=2, seed=0)
    with pytest.raises(KeyError, match="batch_key='patient'"):
        sg.tl.fit(sdata, batch_key="patient", max_epochs=1)
    # Refused before any work: no hierarchy, features or embeddings were written.
    assert Keys.UNS not in sdata[Keys.TABLE].uns and "X_sigmma" not in sdata[Keys.TABLE].obsm
