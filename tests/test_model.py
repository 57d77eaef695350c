"""The SIGMMA model (sigmma_sc.model) and tl.fit.

Array-level tests build Level-shaped inputs by hand (fast); slide-level tests run tl.fit on real
her2st sections (hierarchy + features computed once per module), the Xenium fixture, an
AnnData + image, and the synthetic tissue.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _shared import quiet_single_thread, spot_grid

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.io import log1p_normalize
from sigmma_sc.model import select_genes
from sigmma_sc.model._data import (
    ExpressionSource,
    LevelInput,
    SubgraphBatcher,
    csr_from_edges,
    k_hop,
)


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    with quiet_single_thread():
        yield


# ---------------------------------------------------------------------------------------------
# synthetic level arrays (spot-like: a grid of spots with nuclei and ring regions)
# ---------------------------------------------------------------------------------------------
def spot_levels(n_side: int = 10, n_sec: int = 2, n_nuc: int = 4, n_feat: int = 24, n_genes: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    edges, region, kind = spot_grid(n_side, n_sec)
    n = len(kind)
    w_img = rng.normal(size=(4, n_feat))
    w_expr = rng.gamma(1.0, 1.0, size=(4, n_genes))
    f_meso = w_img[kind] + rng.normal(size=(n, n_feat))
    counts = sp.csr_matrix(rng.poisson(w_expr[kind] * 5 + 0.5).astype(np.float32))
    parent = np.repeat(np.arange(n), n_nuc)
    f_micro = w_img[kind][parent] + 2 * rng.normal(size=(len(parent), n_feat))
    pairs = [
        (a, b)
        for i in range(n)
        for a in range(i * n_nuc, (i + 1) * n_nuc)
        for b in range(i * n_nuc, (i + 1) * n_nuc)
        if a != b
    ]
    # One cross-spot micro edge: the intra-subgraph graph must drop it.
    pairs.append((0, n_nuc))
    f_macro = np.asarray(region @ f_meso) / np.asarray(region.sum(1))
    levels = {
        "micro": LevelInput("micro", len(parent), np.array(pairs).T, parent, f_micro.astype(np.float32), None),
        "meso": LevelInput("meso", n, edges, np.arange(n), f_meso.astype(np.float32), sp.identity(n, format="csr")),
        "macro": LevelInput("macro", n, edges, None, f_macro.astype(np.float32), region),
    }
    return levels, counts, [f"g{i}" for i in range(n_genes)], kind


# ---------------------------------------------------------------------------------------------
# gene selection and expression
# ---------------------------------------------------------------------------------------------
def test_select_genes_ranks_by_log_variance_and_filters_detection():
    rng = np.random.default_rng(0)
    x = np.zeros((200, 4))
    x[:, 0] = rng.poisson(20, 200)  # detected, low log-variance
    x[:, 1] = rng.poisson(1.0, 200) * rng.integers(0, 2, 200) * 10  # detected, very variable
    x[:5, 2] = 1000  # detected in 2.5% of units: excluded however variable
    x[:, 3] = rng.poisson(5, 200)
    genes = select_genes(sp.csr_matrix(x), ["a", "b", "c", "d"], n_genes=10)
    assert "c" not in genes
    assert genes[0] == "b"
    assert len(genes) == 3  # capped at the detected genes
    with pytest.raises(ValueError, match="n_genes"):
        select_genes(x, ["a", "b", "c", "d"], n_genes=0)


def test_select_genes_log_normalized_input_is_not_logged_again():
    x = np.abs(np.random.default_rng(1).normal(size=(50, 3))) * np.array([0.1, 1.0, 3.0])
    assert select_genes(x, ["a", "b", "c"], n_genes=1, log_normalized=True) == ["c"]


def test_expression_source_matches_log1p_normalize_of_summed_counts():
    rng = np.random.default_rng(2)
    counts = sp.csr_matrix(rng.poisson(3, size=(6, 5)).astype(np.float32))
    members = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=np.float32))
    src = ExpressionSource.from_counts(counts, np.array([4, 0]), log_normalized=False)
    expected = log1p_normalize(np.asarray((members @ counts).todense()))[:, [4, 0]]
    np.testing.assert_allclose(src.node_expression(members), expected, rtol=1e-5)
    # Already log-normalised tables: nodes average their units in linear scale.
    logx = sp.csr_matrix(np.log1p(counts.toarray()))
    src = ExpressionSource.from_counts(logx, np.arange(5), log_normalized=True)
    np.testing.assert_allclose(src.node_expression(sp.identity(6, format="csr")), logx.toarray(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# subgraph batches
# ---------------------------------------------------------------------------------------------
def test_k_hop_and_subgraph_helpers():
    a = csr_from_edges(np.array([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]]), 5)
    assert k_hop(a, np.array([0]), 2).tolist() == [0, 1, 2]
    assert k_hop(a, np.array([4]), 3).tolist() == [4]


def test_batch_holds_targets_children_context_and_regions():
    levels, counts, var, _ = spot_levels()
    src = ExpressionSource.from_counts(counts, np.arange(10), log_normalized=False)
    b = SubgraphBatcher(levels, use_levels=("micro", "meso", "macro"), expression=src, graph=True)
    ids = np.array([0, 55, 120])
    batch = b.batch(ids)
    meso = batch["meso_ids"].numpy()
    assert meso[:3].tolist() == ids.tolist()  # targets first
    # Context: the 1-hop ball of the targets (inter-subgraph GNN) and their regions' members.
    region_members = np.unique(sp.coo_matrix(b.region[ids]).col)
    needed = np.union1d(k_hop(b.meso_adj, ids, 1), region_members)
    assert set(needed) == set(meso)
    # Micro: exactly the children of the context nodes, parents pointing into the meso array.
    micro_parent = batch["micro_parent"].numpy()
    assert np.array_equal(levels["micro"].parent[batch["micro_ids"].numpy()], meso[micro_parent])
    # Intra-subgraph edges never join two subgraphs.
    e = batch["micro_edges"].numpy()
    assert e.size and np.all(micro_parent[e[0]] == micro_parent[e[1]])
    # Regions pool their meso members.
    src_ = meso[batch["region_src"].numpy()]
    dst = batch["macro_ids"].numpy()[batch["region_dst"].numpy()]
    assert np.all(np.asarray(levels["macro"].members[dst, src_]).ravel() == 1)
    assert batch["meso_expr"].shape == (len(meso), 10)
    # Training bags: at most max_children cells per subgraph, a seeded draw.
    bag = b.batch(ids, max_children=2, seed=3)
    per_parent = np.bincount(bag["micro_parent"].numpy())
    assert per_parent.max() == 2 and len(per_parent) == len(meso)
    np.testing.assert_array_equal(bag["micro_ids"], b.batch(ids, max_children=2, seed=3)["micro_ids"])
    # Context-only subgraphs get their own, smaller bag; the targets keep theirs, and so do the
    # micro targets of the loss (drawn from the targets' cells only).
    small = b.batch(ids, max_children=2, max_context_children=1, seed=3)
    per_parent = np.bincount(small["micro_parent"].numpy(), minlength=len(meso))
    assert per_parent[:3].tolist() == np.bincount(bag["micro_parent"].numpy())[:3].tolist()
    assert per_parent[3:].max() == 1 and per_parent[3:].min() == 1
    np.testing.assert_array_equal(small["micro_target"], bag["micro_target"])
    np.testing.assert_array_equal(small["micro_ids"][small["micro_target"]], bag["micro_ids"][bag["micro_target"]])
    # Capping only the context (targets keep every cell) and equal caps (the bag as before).
    ctx_only = b.batch(ids, max_context_children=1, seed=3)
    full_children = np.bincount(levels["micro"].parent, minlength=levels["meso"].n)[ids]
    assert np.bincount(ctx_only["micro_parent"].numpy())[:3].tolist() == full_children.tolist()
    np.testing.assert_array_equal(
        b.batch(ids, max_children=2, max_context_children=2, seed=3)["micro_ids"], bag["micro_ids"]
    )
    # Memory is bounded by the batch: far fewer than all nodes.
    assert len(meso) < levels["meso"].n / 2


def test_training_augmentations_touch_training_batches_only():
    levels, counts, var, _ = spot_levels()
    src = ExpressionSource.from_counts(counts, np.arange(10), log_normalized=False)
    kw = dict(use_levels=("micro", "meso", "macro"), expression=src, graph=True)
    plain = SubgraphBatcher(levels, **kw)
    aug = SubgraphBatcher(levels, **kw, depth_augment=0.8, feature_jitter=0.5)
    ids = np.array([0, 55, 120])
    ref = plain.batch(ids, seed=4)
    # Without augment=True (validation, embeddings) the batch is exactly the plain one.
    for key, value in aug.batch(ids, seed=4).items():
        assert np.array_equal(np.asarray(value), np.asarray(ref[key])), key
    a, b = aug.batch(ids, seed=4, augment=True), aug.batch(ids, seed=4, augment=True)
    for key in ("meso_img", "micro_img", "macro_img", "meso_expr", "macro_expr"):
        assert np.array_equal(a[key], b[key]), key  # seeded: a rerun draws the same augmentation
        assert not np.array_equal(a[key], ref[key]), key
    assert np.array_equal(a["meso_ids"], ref["meso_ids"]) and np.array_equal(a["micro_ids"], ref["micro_ids"])
    # Thinned counts: fewer UMIs per node (before the log-normalisation, which rescales them)
    keep = np.full(5, 0.3)
    members = levels["meso"].members[:5]
    thinned = src.node_expression(members, keep=keep, rng=np.random.default_rng(0))
    full = src.node_expression(members)
    assert thinned.shape == full.shape and (thinned > 0).sum() < (full > 0).sum()
    with pytest.raises(ValueError, match="depth_augment"):
        sg.model.TrainConfig(depth_augment=1.0)
    with pytest.raises(ValueError, match="feature_jitter"):
        sg.model.TrainConfig(feature_jitter=-0.1)


def test_disjoint_macro_mask_selects_non_overlapping_regions():
    levels, counts, var, _ = spot_levels()
    src = ExpressionSource.from_counts(counts, np.arange(10), log_normalized=False)
    b = SubgraphBatcher(levels, use_levels=("meso", "macro"), expression=src, graph=False, disjoint_macro=True)
    batch = b.batch(np.arange(30))
    keep = batch["macro_loss_mask"].numpy()
    reg = b.region[batch["macro_ids"].numpy()[keep]]
    overlap = (reg @ reg.T).toarray()
    assert keep.sum() >= 2
    assert np.all(overlap[~np.eye(len(overlap), dtype=bool)] == 0)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_info_nce_soft_targets_forgive_near_duplicates():
    import torch
    import torch.nn.functional as F

    from sigmma_sc.model._losses import consistency, info_nce

    torch.manual_seed(0)
    base = F.normalize(torch.randn(4, 16), dim=-1)
    # Rows 0 and 1 are near-duplicates in both modalities.
    z = base.clone()
    z[1] = F.normalize(base[0] + 0.01 * torch.randn(16), dim=0)
    scale = torch.tensor(20.0)

    def grad_norm(soft: bool) -> float:
        # How hard the loss pushes the perfectly aligned pairs apart.
        zi = z.clone().requires_grad_(True)
        info_nce(zi, z, scale, soft=soft).backward()
        return float(zi.grad.norm())

    assert grad_norm(soft=True) < 0.5 * grad_norm(soft=False)
    assert float(info_nce(z, z, scale)) < float(info_nce(z, z.roll(1, 0), scale))
    assert float(consistency(base, base)) == pytest.approx(0.0, abs=1e-6)
    assert float(consistency(base, -base)) == pytest.approx(2.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# training on arrays
# ---------------------------------------------------------------------------------------------
def _train_arrays(level_inputs, counts, **kw):
    from sigmma_sc.model._core import TrainConfig, embed_nodes, make_batcher, train, unit_embeddings

    src = ExpressionSource.from_counts(counts, np.arange(counts.shape[1]), log_normalized=False)
    cfg = TrainConfig(**{"max_epochs": 4, "batch_size": 32, "embed_dim": 32, "hidden_dim": 64, **kw})
    module, history, stats, _ = train(level_inputs, src, cfg)
    b = make_batcher(level_inputs, cfg, src, stats)
    nodes = embed_nodes(module, b, batch_size=32, expression=True)
    return history, unit_embeddings(nodes, level_inputs, "meso", counts.shape[0])


def test_array_training_lowers_loss_aligns_modalities_and_is_deterministic():
    levels, counts, var, kind = spot_levels()
    history, emb = _train_arrays(levels, counts)
    assert history["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert {"train_loss_meso", "train_loss_macro", "train_loss_consistency", "val_loss"} <= set(history.columns)
    n = counts.shape[0]
    for key in ("img", "expr", "joint", "meso_img", "macro_expr", "micro_img"):
        assert emb[key].shape[0] == n
        np.testing.assert_allclose(np.linalg.norm(emb[key], axis=1), 1.0, rtol=1e-4)
    assert emb["micro_expr"] is None  # nuclei carry no expression
    assert emb["img"].shape[1] == 64  # meso + macro blocks
    sim = emb["img"] @ emb["expr"].T
    # The matched expression ranks in the top 5 far more often than chance (5 / n).
    top5 = np.argsort(-sim, axis=1)[:, :5]
    recall5 = float(np.mean([i in top5[i] for i in range(n)]))
    assert recall5 > 4 * 5 / n
    _, emb2 = _train_arrays(levels, counts)
    np.testing.assert_array_equal(emb["joint"], emb2["joint"])


@pytest.mark.parametrize("inter_layers", [1, 2])
def test_embedding_passes_match_the_module_on_context_batches(inter_layers):
    """embed_nodes encodes each subgraph's cells once and reuses the stored local states as context:
    the values are those of module(batch) on training-style batches (targets with ball and regions)."""
    import torch

    from sigmma_sc.model._core import TrainConfig, build_module, embed_nodes, make_batcher, module_dims
    from sigmma_sc.model._module import SubgraphBatches

    levels, counts, _, _ = spot_levels(n_side=9)
    src = ExpressionSource.from_counts(counts, np.arange(counts.shape[1]), log_normalized=False)
    cfg = TrainConfig(batch_size=16, embed_dim=32, hidden_dim=64, inter_layers=inter_layers, seed=0)
    torch.manual_seed(0)
    b = make_batcher(levels, cfg, src, {})
    module = build_module(*module_dims(levels, b, counts.shape[1]), cfg).eval()
    ref = {lv: {s: np.zeros((levels[lv].n, 32), np.float32) for s in ("img", "expr")} for lv in levels}
    seen = {lv: np.zeros(levels[lv].n, bool) for lv in levels}
    data = SubgraphBatches(b, np.arange(b.n_meso), batch_size=16, shuffle=False)
    with torch.no_grad():
        for i in range(len(data)):
            batch = data[i]
            z = module(batch)
            ids = {
                "meso": batch["meso_ids"][: batch["n_target"]],
                "micro": batch["micro_ids"][batch["micro_target"]],
                "macro": batch["macro_ids"],
            }
            for side in ("img", "expr"):
                for lv, e in z[side].items():
                    ref[lv][side][ids[lv].numpy()] = e.numpy()
                    seen[lv][ids[lv].numpy()] = True
    got = embed_nodes(module, b, batch_size=16, expression=True)
    assert got["micro"]["expr"] is None  # nuclei carry no expression
    for lv in levels:
        assert seen[lv].any()
        for side in ("img", "expr"):
            if got[lv][side] is None:
                continue
            np.testing.assert_allclose(got[lv][side][seen[lv]], ref[lv][side][seen[lv]], atol=2e-6)
            assert not got[lv][side][~seen[lv]].any()  # nodes no batch reaches stay at zero


def test_single_scale_baseline_and_coarse_variants_run_from_the_same_core():
    levels, counts, var, _ = spot_levels(n_side=8)
    history, emb = _train_arrays(levels, counts, levels=("meso",), graph=False, max_epochs=2)
    assert emb["img"].shape[1] == 32 and "macro_img" not in emb
    assert "train_loss_macro" not in history
    for variant in ("hard", "soft", "disjoint"):
        history, emb = _train_arrays(levels, counts, coarse_targets=variant, max_epochs=1)
        assert np.isfinite(history["train_loss"]).all()
    with pytest.raises(ValueError, match="coarse_targets"):
        _train_arrays(levels, counts, coarse_targets="nope")
    with pytest.raises(ValueError, match="meso"):
        _train_arrays(levels, counts, levels=("micro",))


# ---------------------------------------------------------------------------------------------
# tl.fit on real slides
# ---------------------------------------------------------------------------------------------
FAST = {"max_epochs": 3, "batch_size": 16, "embed_dim": 32, "hidden_dim": 64, "n_genes": 100}


def _recall_at_5(img: np.ndarray, expr: np.ndarray) -> float:
    sim = img @ expr.T
    top5 = np.argsort(-sim, axis=1)[:, :5]
    return float(np.mean([i in top5[i] for i in range(len(sim))]))


@pytest.fixture(scope="module")
def xenium_fit():
    sdata = sg.datasets.xenium_lung()
    table = sdata["table"]
    before = {
        "obs": list(table.obs.columns),
        "obsm": {k: np.array(v, copy=True) for k, v in table.obsm.items()},
        "uns": set(table.uns),
        "layers": set(table.layers),
        "var": list(table.var.columns),
    }
    model = sg.tl.fit(sdata, seed=0, **FAST)
    return sdata, model, before


def test_fit_writes_every_key_and_keeps_the_table(xenium_fit, tmp_path):
    sdata, model, before = xenium_fit
    table = sdata["table"]
    assert list(table.obs.columns) == before["obs"]
    assert list(table.var.columns) == before["var"]
    assert before["uns"] <= set(table.uns) and before["layers"] <= set(table.layers)
    for k, v in before["obsm"].items():
        np.testing.assert_array_equal(table.obsm[k], v)
    n = table.n_obs
    # Cell data: unit embedding = micro | meso parent | macro parent, both modalities.
    for key in (Keys.X_SIGMMA, Keys.X_SIGMMA_IMG, Keys.X_SIGMMA_EXPR):
        assert table.obsm[key].shape == (n, 3 * 32)
        np.testing.assert_allclose(np.linalg.norm(table.obsm[key], axis=1), 1.0, rtol=1e-4)
    for lv in ("micro", "meso", "macro"):
        for mod in ("img", "expr"):
            assert table.obsm[Keys.level_embedding(lv, mod)].shape == (n, 32)
    uns = table.uns[Keys.UNS]
    assert list(uns[Keys.GENES]) == model.genes and len(model.genes) == 100
    import inspect

    assert uns[Keys.PARAMS]["coarse_targets"] == inspect.signature(sg.tl.fit).parameters["coarse_targets"].default
    # Cells: the coarser blocks weigh 0 in X_sigmma (resolved at training, recorded).
    assert uns[Keys.PARAMS]["context_weight"] == 0.0
    assert "torch" in uns[Keys.VERSIONS]
    assert len(uns[Keys.HISTORY]["train_loss"]) == len(model.history)
    assert model.levels == ("micro", "meso", "macro") and model.encoder == "efficientnet_lite0"
    ref = model.reference
    assert ref.n_obs == n and list(ref.var_names) == model.genes
    np.testing.assert_array_equal(ref.obsm[Keys.X_SIGMMA_IMG], table.obsm[Keys.X_SIGMMA_IMG])
    # Everything written survives a round trip to disk.
    import anndata as ad

    table.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad")
    assert list(back.uns[Keys.UNS][Keys.GENES]) == model.genes
    np.testing.assert_array_equal(back.obsm[Keys.X_SIGMMA], table.obsm[Keys.X_SIGMMA])
    # The written embeddings are what get_embeddings gives.
    emb = model.get_embeddings(sdata)
    np.testing.assert_allclose(emb["joint"], table.obsm[Keys.X_SIGMMA], atol=1e-5)


def test_fit_same_seed_identical_and_save_load_roundtrip(xenium_fit, tmp_path):
    sdata, model, _ = xenium_fit
    first = np.array(sdata["table"].obsm[Keys.X_SIGMMA], copy=True)
    again = sg.tl.fit(sdata, seed=0, **FAST)  # hierarchy and features now cached
    np.testing.assert_array_equal(sdata["table"].obsm[Keys.X_SIGMMA], first)
    emb = again.get_embeddings(sdata)
    again.save(tmp_path / "model")
    loaded = sg.Sigmma.load(tmp_path / "model", sdata=sdata)
    emb2 = loaded.get_embeddings(sdata)
    for key in ("img", "expr", "joint", "micro_img", "macro_expr"):
        np.testing.assert_array_equal(emb[key], emb2[key])
    assert loaded.genes == again.genes and loaded.encoder == again.encoder
    pd.testing.assert_frame_equal(loaded.history, again.history, check_dtype=False)
    assert loaded.reference.n_obs == again.reference.n_obs


def test_get_embeddings_on_he_only_table_and_gene_mismatch(xenium_fit, tmp_path):
    sdata, model, _ = xenium_fit
    table = sdata["table"]
    # An H&E-only table: same units, no genes.
    sdata["table"] = table[:, []].copy()
    try:
        emb = model.get_embeddings(sdata)
        assert emb["expr"] is None and emb["img"].shape == (table.n_obs, 96)
        np.testing.assert_array_equal(emb["joint"], emb["img"])
        # A different gene panel is refused with a clear message.
        sdata["table"] = table[:, table.var_names[:20]].copy()
        with pytest.raises(ValueError, match="gene panel"):
            model.get_embeddings(sdata)
        model.save(tmp_path / "m")
        with pytest.raises(ValueError, match="gene panel"):
            sg.Sigmma.load(tmp_path / "m", sdata=sdata)
        img_only = model.get_embeddings(sdata, expression=False)
        np.testing.assert_allclose(img_only["img"], emb["img"], atol=1e-6)
    finally:
        sdata["table"] = table


def test_section_feature_norm_ignores_a_slide_wide_stain_shift(xenium_fit):
    sdata, model, _ = xenium_fit
    assert model.params["feature_norm"] == "section"
    assert model.params["max_context_cells"] == 4  # "auto" on cells, recorded resolved
    table = sdata["table"]
    store = table.uns[Keys.UNS][Keys.FEATURES]
    key = model.feature_key
    original = dict(store[key])
    emb = model.get_embeddings(sdata, expression=False)["img"]
    rng = np.random.default_rng(0)
    try:
        # A restained / rescanned slide: every channel shifted by its own amount and rescaled, the
        # same everywhere on the slide (one common scale keeps the floored-std channels the same).
        store[key] = {lv: (1.7 * f + rng.normal(0, 3, f.shape[1])).astype(np.float32) for lv, f in original.items()}
        shifted = model.get_embeddings(sdata, expression=False)["img"]
        np.testing.assert_allclose(shifted, emb, atol=2e-4)
        as_global = sg.Sigmma(
            config={**model.params, "feature_norm": "global"},
            module=model.module,
            genes=model.genes,
            feature_stats=model._feature_stats,
            expr_stats=model._expr_stats,
            history=model.history,
        )
        # The same shift moves a model that trusts the training statistics.
        assert np.abs(as_global.get_embeddings(sdata, expression=False)["img"] - emb).max() > 0.1
    finally:
        store[key] = original


def test_fit_rejects_unknown_feature_norm(xenium_fit):
    sdata, _, _ = xenium_fit
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        sg.tl.fit(sdata, feature_norm="slide", **FAST)


def test_single_scale_baseline_from_fit(xenium_fit):
    sdata, _, _ = xenium_fit
    clip = sg.tl.fit(sdata, levels=("meso",), graph=False, **FAST)
    assert clip.levels == ("meso",)
    joint = sdata["table"].obsm[Keys.X_SIGMMA]
    assert joint.shape[1] == 32
    # Cells get their niche's embedding (not a zero context block weighted away).
    np.testing.assert_allclose(np.linalg.norm(joint, axis=1), 1.0, atol=1e-4)
    assert "train_loss_macro" not in clip.history
    # A refit under the same key replaces the earlier fit whole: its macro embedding does not stay beside the new ones.
    assert Keys.level_embedding("macro", "img") not in sdata["table"].obsm


def test_fit_from_anndata_with_log_normalized_spots():
    import anndata as ad

    from sigmma_sc.io import read_rgb

    folder = sg.datasets.resolve_dataset_dir("squidpy_tests", required=["test_data.h5ad", "test_img.jpg"])
    adata = ad.read_h5ad(folder / "test_data.h5ad")
    image = read_rgb(folder / "test_img.jpg")
    sdata = sg.io.from_anndata(adata, image, mpp=100 / 137, spot_diameter=55.0)
    assert sdata["table"].uns[Keys.DATASET][Keys.LOG_NORMALIZED]
    model = sg.tl.fit(sdata, **{**FAST, "batch_size": 8}, hierarchy_kwargs={"nuclei": False})
    assert sdata["table"].obsm[Keys.X_SIGMMA].shape == (sdata["table"].n_obs, 64)
    assert np.isfinite(model.history["train_loss"]).all()


@pytest.mark.slow
def test_fit_synthetic_joint_embedding_separates_niches():
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    sdata = sg.datasets.synthetic(n_cells=3000, seed=0)
    table = sdata["table"]
    # 3,000 cells make ~50 niches: small batches give enough optimiser steps.
    sg.tl.fit(sdata, max_epochs=20, batch_size=8, n_genes=200, seed=0)

    def leiden_ari(rep: np.ndarray) -> float:
        a = sc.AnnData(np.zeros((table.n_obs, 1), dtype=np.float32))
        a.obsm["rep"] = rep
        sc.pp.neighbors(a, use_rep="rep", random_state=0)
        sc.tl.leiden(a, flavor="igraph", n_iterations=2, random_state=0, resolution=0.5)
        return adjusted_rand_score(table.obs[Keys.NICHE], a.obs["leiden"])

    pca = table.copy()
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=30, random_state=0)
    baseline = leiden_ari(pca.obsm["X_pca"])
    assert leiden_ari(table.obsm[Keys.X_SIGMMA]) > baseline + 0.05
    assert leiden_ari(table.obsm[Keys.X_SIGMMA_EXPR]) > baseline + 0.2


@pytest.mark.slow
def test_fit_her2st_loss_falls_and_image_retrieves_expression():
    sdata = sg.datasets.her2st(sections=["C2", "C3"])
    model = sg.tl.fit(sdata, max_epochs=8, seed=0)
    h = model.history
    assert h["train_loss"].iloc[-1] < 0.6 * h["train_loss"].iloc[0]
    table = sdata["table"]
    r5 = _recall_at_5(table.obsm[Keys.X_SIGMMA_IMG], table.obsm[Keys.X_SIGMMA_EXPR])
    assert r5 > 5 * 5 / table.n_obs
