"""sigmma-sc as a scverse citizen: output keys and copies, write-last, foreign graphs, genes, logs, downloads.

Every test runs on small data (the 300-cell synthetic tissue, the 200 Xenium lung cells, the 49
Visium mouse-brain spots) with one training epoch; each builds its own objects.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _shared import TINY_ENCODER, _assert_equal, assert_unchanged, quiet_single_thread, snapshot, tiny_patch_registered

import sigmma_sc as sg
from sigmma_sc import _logging
from sigmma_sc._constants import Keys

ENCODER = TINY_ENCODER
ONE_EPOCH = {
    "max_epochs": 1,
    "batch_size": 16,
    "embed_dim": 16,
    "hidden_dim": 32,
    "n_genes": 20,
    "seed": 0,
    "encoder": ENCODER,
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    with quiet_single_thread(), tiny_patch_registered():
        yield


def _synthetic():
    return sg.datasets.synthetic(300, n_genes=40, seed=0)


def _mouse_brain():
    import anndata as ad

    from sigmma_sc.io import read_rgb

    folder = sg.datasets.resolve_dataset_dir("squidpy_tests", required=["test_data.h5ad", "test_img.jpg"])
    adata = ad.read_h5ad(folder / "test_data.h5ad")
    return sg.io.from_anndata(adata, read_rgb(folder / "test_img.jpg"), mpp=100 / 137, spot_diameter=55.0)


# ---------------------------------------------------------------------------------------------
# 1. output keys, copies, foreign keys; 4. genes
# ---------------------------------------------------------------------------------------------
def test_key_added_sits_beside_x_sigmma_and_copy_leaves_the_input_identical():
    sdata = _synthetic()
    table = sdata["table"]
    sg.tl.fit(sdata, **ONE_EPOCH)
    main = {k: v.copy() for k, v in table.obsm.items() if k.startswith(Keys.X_SIGMMA)}
    main_uns = dict(table.uns[Keys.UNS][Keys.PARAMS])
    genes = list(table.var_names[[3, 1, 7, 5, 9, 11, 13, 15, 17, 19]])
    clip = sg.tl.fit(sdata, levels=("meso",), graph=False, key_added="X_clip", genes=genes, **ONE_EPOCH)
    # The single-scale model sits beside the main one; nothing of the main model moved.
    for k, v in main.items():
        np.testing.assert_array_equal(table.obsm[k], v)
    assert table.uns[Keys.UNS][Keys.PARAMS]["levels"].tolist() == main_uns["levels"].tolist()
    assert {"X_clip", "X_clip_img", "X_clip_expr", "X_clip_meso_img", "X_clip_meso_expr"} <= set(table.obsm)
    assert table.obsm["X_clip"].shape == (table.n_obs, 16)
    assert clip.genes == genes and list(table.uns["X_clip"][Keys.GENES]) == genes
    assert sorted(table.uns["X_clip"]["obsm_keys"]) == sorted(k for k in table.obsm if k.startswith("X_clip"))
    assert "genes_requested" not in table.uns[Keys.UNS]

    # copy=True: (model, copy); the input stays bit-identical, the copy holds the results.
    table.var["highly_variable"] = np.arange(table.n_vars) % 4 == 0
    before = snapshot(sdata)
    model, fitted = sg.tl.fit(sdata, copy=True, key_added="X_hvg", genes="highly_variable", **ONE_EPOCH)
    assert_unchanged(sdata, before)
    assert fitted is not sdata and fitted["table"] is not table
    assert model.genes == list(table.var_names[table.var["highly_variable"]])
    assert "X_hvg" in fitted["table"].obsm and "X_hvg" not in table.obsm
    np.testing.assert_array_equal(fitted["table"].obsm[Keys.X_SIGMMA], table.obsm[Keys.X_SIGMMA])


def test_read_only_tools_leave_their_inputs_untouched_unless_inplace():
    train = _synthetic()
    model = sg.tl.fit(train, **ONE_EPOCH)
    query = sg.datasets.synthetic(200, n_genes=40, seed=1)  # no hierarchy, no features yet
    before_query, before_train = snapshot(query), snapshot(train)
    pred = sg.tl.predict_expression(model, query, k=5)
    idx, _ = sg.tl.retrieve(model, query, k=5)
    scores = sg.tl.evaluate(model, query, train_sdata=train, baselines=("ridge",), max_units=100)
    retrieved = sg.tl.retrieve(model, query, direction="expr2img", gallery=_synthetic(), k=3)[0]
    assert_unchanged(query, before_query)  # no nuclei, graph, hierarchy or feature cache written
    assert_unchanged(train, before_train)
    assert pred.shape == (200, 20) and idx.shape == (200, 5) and retrieved.shape == (200, 3)
    assert {"sigmma", "ridge"} <= set(scores.index)
    # inplace=True caches the work in the query: the same prediction, then reused by later calls.
    again = sg.tl.predict_expression(model, query, k=5, inplace=True)
    np.testing.assert_array_equal(again.X, pred.X)
    assert sg.pp.get_hierarchy(query).levels and sg.pp.get_features(query, key=model.feature_key)
    assert Keys.X_SIGMMA not in query["table"].obsm  # caches only: embeddings are tl.fit's to write


def test_foreign_keys_and_bad_genes_are_refused_before_any_work():
    sdata = _synthetic()
    table = sdata["table"]
    table.obsm[Keys.X_SIGMMA] = np.zeros((table.n_obs, 2))  # e.g. the user's own embedding
    table.obsm["X_clip_img"] = np.ones((table.n_obs, 2))
    table.uns["X_mine"] = {"note": "user"}
    table.var["n_cells"] = np.arange(table.n_vars)
    before = snapshot(sdata)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"obsm\['X_sigmma'\] exists and was not written by sigmma-sc.*key_added="):
        sg.tl.fit(sdata, **ONE_EPOCH)
    with pytest.raises(ValueError, match=r"obsm\['X_clip_img'\].*key_added="):
        sg.tl.fit(sdata, key_added="X_clip", **ONE_EPOCH)
    with pytest.raises(ValueError, match=r"uns\['X_mine'\].*key_added="):
        sg.tl.fit(sdata, key_added="X_mine", **ONE_EPOCH)
    with pytest.raises(KeyError, match=r"not in the table's var_names: \['NOPE1', 'NOPE2'\]"):
        sg.tl.fit(sdata, key_added="X_ok", genes=["gene0", "NOPE1", "NOPE2"], **ONE_EPOCH)
    with pytest.raises(KeyError, match="no such column.*highly_variable"):
        sg.tl.fit(sdata, key_added="X_ok", genes="highly_variable", **ONE_EPOCH)
    with pytest.raises(TypeError, match=r"var\['n_cells'\] is int64, not a boolean column"):
        sg.tl.fit(sdata, key_added="X_ok", genes="n_cells", **ONE_EPOCH)
    assert time.perf_counter() - t0 < 5  # refused up front, not after the hierarchy and features
    assert_unchanged(sdata, before)


# ---------------------------------------------------------------------------------------------
# 2. write last
# ---------------------------------------------------------------------------------------------
def test_interrupted_fit_leaves_sdata_exactly_as_before_and_a_fit_writes_everything(monkeypatch, caplog):
    sdata = _mouse_brain()  # spots: the hierarchy segments nuclei into new shapes elements
    before = snapshot(sdata)

    def interrupted(cls, *args, **kwargs):
        raise KeyboardInterrupt

    train = sg.Sigmma.train
    monkeypatch.setattr(sg.Sigmma, "train", classmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        sg.tl.fit(sdata, **{**ONE_EPOCH, "batch_size": 8})
    assert_unchanged(sdata, before)  # no nuclei, graph, hierarchy, features or embeddings

    monkeypatch.setattr(sg.Sigmma, "train", train)
    monkeypatch.setattr(_logging, "LONG_STEP_SECONDS", 0.0)  # log every step as if it were long
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sg.tl.fit(sdata, **{**ONE_EPOCH, "batch_size": 8})
    table = sdata["table"]
    assert "section0_nuclei" in sdata.shapes
    assert {Keys.HIERARCHY, Keys.FEATURES, Keys.GENES} <= set(table.uns[Keys.UNS])
    assert "spatial_connectivities" in table.obsp and Keys.X_SIGMMA in table.obsm
    text = caplog.text
    for line in (
        "hierarchy: started",
        "nuclei segmentation: started",
        "image features: started",
        "training and embedding: started",
        "training and embedding: done in",
    ):
        assert line in text, line


# ---------------------------------------------------------------------------------------------
# 3. graphs
# ---------------------------------------------------------------------------------------------
def test_a_squidpy_graph_is_kept_and_used_when_asked(caplog):
    import squidpy as sq

    sdata = sg.datasets.xenium_lung()
    table = sdata["table"]
    sq.gr.spatial_neighbors(table, n_neighs=12, coord_type="generic")
    users = table.obsp["spatial_connectivities"].copy(), table.obsp["spatial_distances"].copy()
    users_uns = dict(table.uns["spatial_neighbors"])
    assert users[0].nnz == 2400

    def unchanged():
        assert (table.obsp["spatial_connectivities"] != users[0]).nnz == 0
        assert (table.obsp["spatial_distances"] != users[1]).nnz == 0
        _assert_equal(dict(table.uns["spatial_neighbors"]), users_uns, "uns")

    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        h = sg.pp.build_hierarchy(sdata)
    unchanged()
    own = table.obsp["sigmma_spatial_connectivities"]
    assert "did not write" in caplog.text and "sigmma_spatial_connectivities" in caplog.text
    assert h.levels["micro"].edges.shape[1] == own.nnz and own.nnz != 2400
    with pytest.raises(ValueError, match=r"obsp\['spatial_connectivities'\].*key_added="):
        sg.pp.spatial_graphs(sdata, key_added="spatial")

    # Asked for: the hierarchy stands on the user's graph (both directions), which stays as it is.
    obsp_keys = set(table.obsp)
    h = sg.pp.build_hierarchy(sdata, connectivity_key="spatial")
    unchanged()
    assert set(table.obsp) == obsp_keys
    sym = users[0].maximum(users[0].T)
    assert h.levels["micro"].edges.shape[1] == sym.nnz
    assert table.uns[Keys.UNS][Keys.HIERARCHY]["unit_graph"] == "spatial_connectivities"
    with pytest.raises(ValueError, match="one or the other"):
        sg.pp.build_hierarchy(sdata, connectivity_key="spatial", graph_method="knn")

    # Through tl.fit on a table without a hierarchy.
    del table.uns[Keys.UNS][Keys.HIERARCHY]
    sg.tl.fit(sdata, hierarchy_kwargs={"connectivity_key": "spatial"}, **ONE_EPOCH)
    unchanged()
    assert sg.pp.get_hierarchy(sdata).levels["micro"].edges.shape[1] == sym.nnz


def test_section_graphs_come_from_squidpy_library_key_and_equal_each_section_alone():
    from sigmma_sc.pp._graphs import section_graphs

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, (240, 2))
    section = rng.integers(0, 3, 240)  # interleaved in table order
    xy = np.vstack([xy, [[0, 0], [1, 1], [2, 2]]])  # a collinear 3-unit section: the fallback chain
    section = np.concatenate([section, [3, 3, 3]])
    for kwargs in ({"method": "delaunay", "radius_um": 80.0}, {"method": "knn", "n_neighs": 5}):
        adj, dst, params = section_graphs(xy, section, **kwargs)
        assert params["coord_type"] == "generic"
        for s in range(4):
            rows = np.flatnonzero(section == s)
            alone, alone_d, _ = section_graphs(xy[rows], np.zeros(len(rows), int), **kwargs)
            assert (adj[rows][:, rows] != alone).nnz == 0
            np.testing.assert_array_equal(dst[rows][:, rows].toarray(), alone_d.toarray())
            assert adj[rows][:, np.flatnonzero(section != s)].nnz == 0
        assert adj[-3:, -3:].nnz == 6  # three units: all joined, both ways


# ---------------------------------------------------------------------------------------------
# 5. logs and reprs
# ---------------------------------------------------------------------------------------------
_PRINT_ONCE = """
import logging, sys
{setup}
import sigmma_sc as sg
from sigmma_sc._logging import logger
logger.info("hello-from-sigmma")
"""


@pytest.mark.parametrize(
    "setup",
    ["", "logging.basicConfig(stream=sys.stderr)", "import scanpy as sc; sc.settings.verbosity = 'info'"],
    ids=["plain", "root_configured", "under_scanpy"],
)
def test_info_lines_print_once_by_default_and_propagate(setup):
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_ONCE.format(setup=setup)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (out.stdout + out.stderr).count("hello-from-sigmma") == 1


def test_logger_propagates_and_honours_verbosity(caplog):
    assert _logging.logger.propagate
    level = sg.settings.verbosity
    try:
        with caplog.at_level(logging.DEBUG):  # a handler on the root logger: records reach it
            sg.settings.verbosity = "warning"
            _logging.logger.info("quiet-info")
            _logging.logger.warning("loud-warning")
            sg.settings.verbosity = 3
            _logging.logger.debug("debug-now")
        assert "quiet-info" not in caplog.text and "loud-warning" in caplog.text and "debug-now" in caplog.text
        with pytest.raises(ValueError, match="verbosity must be one of"):
            sg.settings.verbosity = "chatty"
    finally:
        sg.settings.verbosity = level


def test_long_steps_log_start_and_end_even_without_progress_bars(caplog):
    with caplog.at_level(logging.DEBUG, logger="sigmma_sc"):
        with _logging.timed("quick step", min_seconds=10):
            pass
        with _logging.timed("slow step", min_seconds=0.05):
            time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt), _logging.timed("cut step", min_seconds=10):
            raise KeyboardInterrupt
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not any("quick step" in m for m in info)
    assert any(m.startswith("slow step: running for") for m in info)
    assert any(m.startswith("slow step: done in 0.3") for m in info)
    assert any(m.startswith("cut step: stopped after") for m in info)


def test_hierarchy_and_level_reprs_are_one_line_per_level():
    from sigmma_sc.pp._hierarchy import spot_hierarchy

    g = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2) * 200.0
    edges = np.array(np.nonzero(np.isclose(np.linalg.norm(g[:, None] - g[None], axis=-1), 200.0)))
    nuclei = np.repeat(g, 20, axis=0) + np.random.default_rng(0).uniform(-40, 40, (len(g) * 20, 2))
    h = spot_hierarchy(
        g,
        np.zeros(len(g), int),
        ["C2"],
        spot_edges=edges,
        nuclei_xy_um=nuclei,
        nuclei_spot=np.repeat(np.arange(len(g)), 20),
        fovs={"micro": 32.0, "meso": 150.0, "macro": 500.0},
        region_radius_um=250.0,
    )
    text = repr(h)
    assert len(text.splitlines()) == 1 + len(h.levels) and len(text) < 500
    assert "meso: 900 nodes, 3,480 edges, fov 150 µm" in text and "<- units" in text
    assert repr(h.levels["micro"]).startswith("Level('micro': 18,000 nodes") and "\n" not in repr(h.levels["micro"])


# ---------------------------------------------------------------------------------------------
# 6. downloads
# ---------------------------------------------------------------------------------------------
def test_every_download_has_a_sha256_matching_the_public_copies(tmp_path):
    import hashlib
    import shutil

    from sigmma_sc.datasets import _paths

    folders = {name: _paths.local_dataset_dir(name, required=_paths.REQUIRED_FILES[name]) for name in _paths._REMOTES}
    checked = 0
    for name, remote in _paths._REMOTES.items():
        for rel, _url, sha in remote.files:
            assert len(sha) == 64 and int(sha, 16) >= 0, (name, rel)
            local = None if folders[name] is None else folders[name] / rel
            if local is not None and local.exists():
                assert hashlib.sha256(local.read_bytes()).hexdigest() == sha, (name, rel)
                checked += 1
    if not checked or folders["squidpy_tests"] is None:
        pytest.skip("no local copies of the downloadable data sets")

    # pooch checks each download against the registry: a faithful copy passes, a changed one is refused.
    def from_shared(url, output_file, pooch_obj):
        rel = next(r for r, u in _paths._REMOTES["squidpy_tests"].urls.items() if u == url)
        shutil.copy(folders["squidpy_tests"] / rel, output_file)

    _paths._download("squidpy_tests", _paths._REMOTES["squidpy_tests"], tmp_path / "ok", downloader=from_shared)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["test_data.h5ad", "test_img.jpg"]

    def tampered(url, output_file, pooch_obj):
        Path(output_file).write_bytes(b"not the file")

    with pytest.raises(ValueError, match="does not match the known hash"):
        _paths._download("squidpy_tests", _paths._REMOTES["squidpy_tests"], tmp_path / "bad", downloader=tampered)
    assert not any((tmp_path / "bad").glob("*.h5ad"))
