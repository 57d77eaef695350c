"""Encoders, dense / crop image features, the feature cache, standardisation and stain normalisation."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.pp._features import dense_feature_map, section_features
from sigmma_sc.pp._patches import as_section_image
from sigmma_sc.pp._pooling import needed_cells, pool_windows, window_cells


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setattr(sg.settings, "progress_bar", False)


class TinyCNN(torch.nn.Module):
    """Stride-32 CNN that counts its forward calls (stands in for a real encoder)."""

    calls = 0

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dim, kernel_size=32, stride=32)

    def forward_features(self, x):
        TinyCNN.calls += 1
        return torch.relu(self.conv(x))

    def forward(self, x):
        return self.forward_features(x).mean(dim=(2, 3))


class TinyViT(torch.nn.Module):
    """Pooled features only (no spatial map), like a transformer."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 5)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def kidney_image():
    sdata = sg.datasets.visium_hd_kidney(crop=True)
    return sg.io.validate(sdata).images["kidney"]


@pytest.fixture(scope="module")
def lite0():
    return sg.pp.get_encoder("efficientnet_lite0", device="cpu")


# -- encoders --------------------------------------------------------------------------------
def test_default_encoder_loads_imagenet_weights(lite0):
    from PIL import Image
    from skimage import data

    cat = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)))
    x = lite0._prepare(cat[None])
    with torch.inference_mode():
        top = lite0.module(x).softmax(-1).topk(3).indices[0].tolist()
    assert set(top) & {281, 282, 285}  # tabby / tiger / Egyptian cat
    assert lite0.dim == 1280 and lite0.dense and lite0.id == "efficientnet_lite0"


def test_user_module_encoders():
    enc = sg.pp.get_encoder(TinyCNN(), id="tiny")
    assert enc.dense and enc.dim == 8 and enc.id == "tiny"
    vit = sg.pp.get_encoder(TinyViT(), input_size=64)
    assert not vit.dense and vit.dim == 5 and vit.id.startswith("tinyvit-")
    # Different weights -> different cache ids.
    other = TinyViT()
    with torch.no_grad():
        other.lin.weight.add_(1.0)
    assert sg.pp.get_encoder(other, input_size=64).id != vit.id
    img = np.full((64, 64, 3), 200, np.uint8)
    with pytest.raises(ValueError, match="method='crop'"):
        section_features(
            img, {"meso": np.array([[10.0, 10.0]])}, {"meso": 30.0}, encoder=vit, method="dense", px_from_um=np.eye(3)
        )
    feats = section_features(img, {"meso": np.array([[10.0, 10.0]])}, {"meso": 30.0}, encoder=vit, px_from_um=np.eye(3))
    assert feats["meso"].shape == (1, 5)
    with pytest.raises(ValueError, match="unknown encoder"):
        sg.pp.get_encoder("no-such-encoder")
    with pytest.raises(ValueError, match="obsm_key"):
        sg.pp.get_encoder("precomputed")


def test_registry_roundtrip():
    sg.pp.register_encoder("tiny_test", lambda **kw: sg.pp.encoder_from_module(TinyCNN(), id="tiny_test"))
    assert "tiny_test" in sg.pp.available_encoders()
    assert sg.pp.get_encoder("tiny_test").dim == 8


def _fake_timm(created: list):
    timm = types.ModuleType("timm")
    timm.data = types.SimpleNamespace(
        resolve_data_config=lambda cfg, model: {
            "mean": (0.1, 0.2, 0.3),
            "std": (0.5, 0.5, 0.5),
            "input_size": (3, 96, 96),
        }
    )

    def create_model(name, pretrained=False, **kwargs):
        created.append((name, pretrained, kwargs))
        if "offline" in name:
            raise OSError("couldn't connect to huggingface.co")
        return TinyCNN()

    timm.create_model = create_model
    return timm


def test_timm_path_with_local_module(monkeypatch):
    created: list = []
    monkeypatch.setitem(sys.modules, "timm", _fake_timm(created))
    enc = sg.pp.get_encoder("timm:resnet_local")
    assert created[-1][:2] == ("resnet_local", True)
    assert enc.id == "timm-resnet_local" and enc.input_size == 96 and enc.mean == (0.1, 0.2, 0.3)
    assert enc.dense and enc.dim == 8  # forward_features gives a stride-32 map
    out = enc.encode(np.full((2, 96, 96, 3), 128, np.uint8))
    assert out.shape == (2, 8) and np.isfinite(out).all()
    uni = sg.pp.get_encoder("uni")
    assert created[-1][0] == "hf-hub:MahmoodLab/UNI" and created[-1][2]["init_values"] == 1e-5
    assert "/" not in uni.id  # ids become zarr group names
    with pytest.raises(RuntimeError, match="huggingface"):
        sg.pp.get_encoder("hf-hub:org/offline-model")


def test_timm_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install"):
        sg.pp.get_encoder("hf-hub:MahmoodLab/UNI")


# -- dense path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_side", [2.5, 5.0])  # small windows: direct overlap weights; large: summed-area table
def test_pool_windows_is_exact_area_mean(max_side):
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(7, 9, 3)).astype(np.float32)
    side = rng.uniform(0.3, max_side, 20)
    v0 = rng.uniform(-0.25, 5, 20)  # some windows stick out of the map: they are clipped to it
    u0 = rng.uniform(-0.25, 7, 20)
    got = pool_windows(fmap, (v0, v0 + side, u0, u0 + side))
    # Brute force: supersample each window on a fine grid (clipped to the map).
    for k in range(20):
        ys = np.linspace(max(v0[k], 0), min(v0[k] + side[k], 7), 400, endpoint=False)
        xs = np.linspace(max(u0[k], 0), min(u0[k] + side[k], 9), 400, endpoint=False)
        dy, dx = (ys[1] - ys[0]) / 2, (xs[1] - xs[0]) / 2
        vals = fmap[np.floor(ys + dy).astype(int)][:, np.floor(xs + dx).astype(int)]
        np.testing.assert_allclose(got[k], vals.mean(axis=(0, 1)), atol=0.02)


def test_needed_cells_cover_windows():
    mask = needed_cells([(np.array([1.2]), np.array([2.5]), np.array([0.1]), np.array([0.4]))], (5, 5))
    assert mask.sum() == 2 and mask[1, 0] and mask[2, 0]
    # A window off the map still reads its nearest cell.
    assert needed_cells([(np.array([9.0]), np.array([10.0]), np.array([-3.0]), np.array([-2.0]))], (5, 5))[4, 0]


def test_dense_map_has_no_seams(kidney_image, lite0):
    # 512 px of tissue: four 256 px tiles vs one 512 px tile, both with the default context margin.
    img = np.asarray(kidney_image.read(0, 512, 0, 512))
    tiled = dense_feature_map(img, lite0, px_from_um=np.eye(3), tile_px=256)
    whole = dense_feature_map(img, lite0, px_from_um=np.eye(3), tile_px=512)
    assert tiled.shape == (16, 16, 1280) and np.isfinite(tiled).all()

    def cos(a, b):
        return ((a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1)))[2:-2, 2:-2]

    # Map cells next to the seams match the single tile (the margin covers the receptive field)...
    assert cos(tiled, whole).min() > 0.99
    # ...while a 64 px margin leaves visible seams.
    seams = dense_feature_map(img, lite0, px_from_um=np.eye(3), tile_px=256, margin_px=64)
    assert cos(seams, whole).min() < 0.9


def test_dense_skips_tiles_without_nodes():
    img = np.full((512, 512, 3), 120, np.uint8)
    img[..., 0] = 200
    enc = sg.pp.get_encoder(TinyCNN(), id="tiny")
    TinyCNN.calls = 0
    feats = section_features(
        img,
        {"micro": np.array([[20.0, 20.0]])},
        {"micro": 32.0},
        encoder=enc,
        px_from_um=np.eye(3),
        tile_px=128,
        margin_px=32,
    )
    assert feats["micro"].shape == (1, 8)
    assert TinyCNN.calls == 1  # one tile of 16 holds the node


def test_dense_downsample_equals_a_downsampled_image():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
    small = np.round(img.reshape(128, 2, 160, 2, 3).astype(np.float32).mean(axis=(1, 3))).astype(np.uint8)
    enc = sg.pp.get_encoder(TinyCNN(), id="tiny")
    centres = {"meso": rng.uniform(20, 100, (6, 2)), "macro": rng.uniform(20, 100, (3, 2))}
    fov = {"meso": 40.0, "macro": 400.0}
    kw = {"encoder": enc, "tile_px": 64, "margin_px": 32}
    a = section_features(img, centres, fov, px_from_um=np.eye(3), downsample=2, **kw)
    b = section_features(small, centres, fov, px_from_um=np.diag([0.5, 0.5, 1.0]), **kw)
    np.testing.assert_allclose(a["meso"], b["meso"], rtol=1e-5, atol=1e-6)
    # macro: 4x blocks of the full image vs 2x blocks of the rounded 2x image (uint8 rounding twice).
    np.testing.assert_allclose(a["macro"], b["macro"], atol=0.01)
    with pytest.raises(ValueError, match="downsample"):
        section_features(img, centres, fov, px_from_um=np.eye(3), downsample=0, **kw)


def test_dense_and_crop_features_agree(kidney_image, lite0):
    # Same windows, same pixels per micron: 224 px views (the encoder input, no resizing) of 48 nodes.
    rng = np.random.default_rng(1)
    um = kidney_image.um_per_px
    fov = 224 * um
    centres = rng.uniform(fov / 2, np.array(kidney_image.shape[::-1]) * um - fov / 2, (48, 2))
    kw = {"encoder": lite0, "coarse_fov_um": 1e9}
    dense = section_features(kidney_image, {"meso": centres}, {"meso": fov}, method="dense", **kw)["meso"]
    crop = section_features(kidney_image, {"meso": centres}, {"meso": fov}, method="crop", **kw)["meso"]
    assert np.isfinite(dense).all() and np.isfinite(crop).all()
    # Across nodes, the channels of the dense features track the per-crop ones, clearly above chance
    # (node-shuffled pairs). Agreement is partial by nature: a lone 224 px crop is all border for
    # EfficientNet, whose zero padding reaches ~250 px inward, while the dense map sees real context.
    alive = (dense.std(0) > 1e-3) & (crop.std(0) > 1e-3)

    def chan_r(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        return ((a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0) + 1e-12))[alive]

    matched = chan_r(dense, crop).mean()
    shuffled = max(chan_r(dense, crop[rng.permutation(len(crop))]).mean() for _ in range(5))
    assert matched > 0.1 and matched > shuffled + 0.08, (matched, shuffled)


def test_crop_equals_dense_without_context_and_is_deterministic(kidney_image, lite0):
    # The dense map of a lone 224 px tile (no margin) pooled over the whole tile is the crop feature.
    crop = np.asarray(kidney_image.read(100, 324, 50, 274))
    fmap = dense_feature_map(crop, lite0, px_from_um=np.eye(3), tile_px=224, margin_px=0)
    np.testing.assert_allclose(fmap.mean(axis=(0, 1)), lite0.encode(crop[None])[0], rtol=1e-4, atol=1e-5)
    # Deterministic: the same pixels give the same map, bit for bit.
    again = dense_feature_map(crop, lite0, px_from_um=np.eye(3), tile_px=224, margin_px=0)
    np.testing.assert_array_equal(fmap, again)


def test_window_cells_centred_with_mirror():
    img = as_section_image(np.zeros((640, 640, 3), np.uint8), np.array([[-2.0, 0, 640], [0, 2.0, 0], [0, 0, 1]]))
    v0, v1, u0, u1 = window_cells(img, np.array([[100.0, 50.0]]), 64.0, 1)
    # x = 100 um -> column 640 - 200 = 440 -> cell 13.75; y = 50 um -> row 100 -> cell 3.125.
    np.testing.assert_allclose([(v0 + v1) / 2, (u0 + u1) / 2], [[100 / 32], [440 / 32]])
    np.testing.assert_allclose(v1 - v0, 128 / 32)


# -- SpatialData entry points and the cache --------------------------------------------------------
@pytest.fixture(scope="module")
def kidney_sdata():
    sdata = sg.datasets.visium_hd_kidney(crop=True)
    sg.pp.build_hierarchy(sdata)
    return sdata


def test_image_features_cached(kidney_sdata):
    # Built once, outside the calls, so the counter sees only the encoding work of image_features.
    tiny = sg.pp.encoder_from_module(TinyCNN(), id="tiny_counting")
    sg.pp.register_encoder("tiny_counting", lambda **kw: tiny)
    TinyCNN.calls = 0
    key = sg.pp.image_features(kidney_sdata, encoder="tiny_counting")
    assert TinyCNN.calls > 0
    h = sg.pp.get_hierarchy(kidney_sdata)
    feats = sg.pp.get_features(kidney_sdata, key=key)
    assert set(feats) == set(h.levels)
    for level, f in feats.items():
        assert f.shape == (h.levels[level].n_nodes, 8) and f.dtype == np.float32 and np.isfinite(f).all()
    assert feats["micro"].std(0).max() > 0
    calls = TinyCNN.calls
    assert sg.pp.image_features(kidney_sdata, encoder="tiny_counting") == key
    assert TinyCNN.calls == calls  # cache hit: no encoder work
    table = kidney_sdata.tables["table"]
    assert table.uns[Keys.UNS][Keys.FEATURES_LATEST] == key.id
    # A different method is a different cache entry.
    key_crop = sg.pp.image_features(kidney_sdata, encoder="tiny_counting", method="crop", levels=["macro"])
    assert key_crop != key and TinyCNN.calls > calls
    assert set(sg.pp.get_features(kidney_sdata)) == {"macro"}
    assert set(sg.pp.get_features(kidney_sdata, key=key)) == set(h.levels)
    with pytest.raises(KeyError, match="cached keys"):
        sg.pp.get_features(kidney_sdata, key="nope")


def test_image_features_precomputed(kidney_sdata):
    table = kidney_sdata.tables["table"]
    rng = np.random.default_rng(0)
    table.obsm["X_mine"] = rng.normal(size=(table.n_obs, 6)).astype(np.float32)
    key = sg.pp.image_features(kidney_sdata, encoder="precomputed", obsm_key="X_mine")
    feats = sg.pp.get_features(kidney_sdata, key=key)
    h = sg.pp.get_hierarchy(kidney_sdata)
    unit = h.unit_nodes(h.unit_level)
    np.testing.assert_allclose(feats[h.unit_level][unit], table.obsm["X_mine"], rtol=1e-6)
    m = h.levels["meso"].members
    expect = (m @ table.obsm["X_mine"]) / np.asarray(m.sum(1))
    np.testing.assert_allclose(feats["meso"], expect, rtol=1e-5, atol=1e-6)
    del table.obsm["X_mine"]


def test_cache_key_is_a_zarr_name_and_reads_back():
    key = sg.pp.FeatureKey("timm-hf-hub:MahmoodLab/UNI", "crop", (("meso", 150.0), ("macro", 500.0)), "macenko-default")
    assert "/" not in key.id and "macenko" in key.id and "meso150_macro500" in key.id
    back = sg.pp.FeatureKey.parse(key.id)
    assert back.views == key.views and back.id == key.id
    assert sg.pp.FeatureKey.parse("enc__dense__micro32_meso150__raw").fov_um == (("micro", 32.0), ("meso", 150.0))
    with pytest.raises(ValueError, match="not a feature cache id"):
        sg.pp.FeatureKey.parse("no_underscores_here")


def test_pp_standardize_features_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="moved to sigmma_sc.model"):
        fn = sg.pp.standardize_features
    assert fn is sg.model.standardize_features


def test_standardize_features_clips_constant_channels():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 5))
    train[:, 4] = 3.0 + 1e-9 * rng.normal(size=200)  # near-constant in training
    test = rng.normal(size=(50, 5))
    test[:, 4] = 4.0
    ztr, zte = sg.model.standardize_features(train, test)
    assert np.abs(zte).max() <= 5.0 and np.abs(ztr[:, :4].mean(0)).max() < 1e-6
    np.testing.assert_allclose(ztr[:, :4].std(0), 1.0, rtol=1e-5)
    unclipped = sg.model.standardize_features(train, test, clip=None)[1]
    assert np.abs(unclipped[:, 4]).max() > 5  # the clip is what bounds it


def test_model_feature_stats_apply_the_package_standardisation():
    from sigmma_sc.model._inputs import apply_feature_stats, feature_stats

    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 1e-8]
    test = rng.normal(size=(40, 6)) * 4
    stats = feature_stats(train)
    # A saved model must standardise a new slide exactly as the package does with the training set.
    np.testing.assert_allclose(
        apply_feature_stats(test, stats), sg.model.standardize_features(train, test)[1], atol=1e-5
    )
    with pytest.raises(ValueError, match="trained on 6"):
        apply_feature_stats(test[:, :5], stats)


def test_section_scaling_standardises_each_section_and_falls_back_for_small_ones():
    from sigmma_sc.model import apply_section_scaling, feature_scaling

    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(0, 1, (100, 3)), rng.normal(10, 4, (100, 3)), rng.normal(5, 1, (5, 3))])
    section = np.repeat([0, 1, 2], [100, 100, 5])
    fallback = feature_scaling(x[:200])
    z, small = apply_section_scaling(x, section, fallback, min_nodes=30)
    assert small == [2]
    for code in (0, 1):
        np.testing.assert_allclose(z[section == code].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(z[section == code].std(0), 1, atol=1e-4)
    np.testing.assert_allclose(z[section == 2], sg.model.standardize_features(x[:200], x[200:])[1], atol=1e-5)
    with pytest.raises(ValueError, match="5 codes for 205"):
        apply_section_scaling(x, section[:5], fallback)


def test_scaled_features_are_the_eager_z_scores_bit_for_bit(monkeypatch):
    from sigmma_sc.model import _inputs, apply_feature_scaling, feature_scaling, feature_stats
    from sigmma_sc.model._inputs import ScaledFeatures, scale_features, section_statistics

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(300, 7)) * 3 + 1).astype(np.float32)
    x[5, 2] = 400.0  # clipped
    section = np.repeat([2, 0, 1], [150, 140, 10])
    fallback = feature_stats(x)
    ref = np.empty_like(x)
    for code in (0, 2):
        rows = section == code
        ref[rows] = apply_feature_scaling(x[rows], *feature_scaling(x[rows]))
    ref[section == 1] = apply_feature_scaling(x[section == 1], *fallback)
    monkeypatch.setattr(ScaledFeatures, "_ROWS", 32)  # several blocks per read
    lazy = scale_features(x, section, fallback, feature_norm="section", sections=["a", "b", "c"], level="meso")
    assert isinstance(lazy, ScaledFeatures) and lazy.shape == x.shape and len(lazy) == 300
    idx = rng.permutation(300)[:77]
    assert np.array_equal(lazy[idx], ref[idx])
    assert np.array_equal(np.asarray(lazy), ref) and np.array_equal(lazy[10:200:3], ref[10:200:3])
    assert np.array_equal(lazy[section == 1], ref[section == 1]) and lazy[idx].dtype == np.float32
    glob = scale_features(x, section, fallback, feature_norm="global", sections=["a", "b", "c"], level="meso")
    assert np.array_equal(glob[idx], apply_feature_scaling(x, *fallback)[idx])
    # large sections: statistics read by row blocks of the slide, no copy of the section
    monkeypatch.setattr(_inputs, "_EXACT_ELEMENTS", 10)
    monkeypatch.setattr(_inputs, "_BLOCK_ROWS", 16)
    group, mean, std, small = section_statistics(x, section, fallback, min_nodes=30)
    assert small == [1] and group.tolist() == np.searchsorted([0, 1, 2], section).tolist()
    for i, code in ((0, 0), (2, 2)):
        mu, sd = feature_scaling(x[section == code].astype(np.float64))
        np.testing.assert_allclose(mean[i], mu, rtol=1e-12)
        np.testing.assert_allclose(std[i], sd, rtol=1e-12)
    with pytest.raises(ValueError, match="5 codes for 300"):
        ScaledFeatures(x, section[:5], mean, std)


# -- stain ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalize_stain_moves_towards_reference(kidney_image, method):
    ref = np.asarray(kidney_image.read(0, 300, 0, 300))
    # The same tissue restained: 50% more hematoxylin, 40% less eosin (in Ruifrok-Johnston HED space).
    from sigmma_sc.pp._stain import _HED_FROM_RGB, _RGB_FROM_HED

    od = -np.log((ref.reshape(-1, 3).astype(float) + 1) / 255)
    od_src = (od @ _HED_FROM_RGB * np.array([1.5, 0.6, 1.0])) @ _RGB_FROM_HED
    src = np.clip(255 * np.exp(-od_src) - 1, 0, 255).astype(np.uint8).reshape(ref.shape)
    out = sg.pp.normalize_stain(src, method=method, reference=ref)
    assert out.shape == src.shape and out.dtype == np.uint8

    def dist(a):
        return np.abs(a.astype(float) - ref.astype(float)).mean()

    # Two stain vectors cannot express every colour, so Macenko does not recover the reference exactly.
    assert dist(out) < 0.75 * dist(src), (dist(out), dist(src))


def test_hed_jitter_is_seeded_and_bounded(kidney_image):
    img = np.asarray(kidney_image.read(0, 64, 0, 64))
    a = sg.pp.hed_jitter(np.stack([img, img]), seed=3)
    b = sg.pp.hed_jitter(np.stack([img, img]), seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # each image gets its own draw
    assert 0 < np.abs(a[0].astype(int) - img).mean() < 20
