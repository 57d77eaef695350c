"""Bad inputs: validate first, write last.

Every public entry (``tl.fit``, ``pp.build_hierarchy``, ``pp.image_features``, ``tl.predict_expression``,
``tl.evaluate``) runs its cheap checks before any hierarchy, feature or training work: a bad input fails
in seconds with a message naming the element or key and the fix, and the user's SpatialData is exactly
as before (compared with a deep copy taken before the call). Inputs the package can read (RGBA, float and
uint16 images, genes without counts, a section smaller than a batch, a second fit) are accepted.

Data: the 300-cell synthetic tissue (copies share its images, which nothing writes) and the her2st
section C3 (180 spots, 15k genes) where a late failure used to cost the nuclei segmentation and the
image features first (16 s with a tiny encoder, minutes with a real one). Fit-level cases use a tiny
registered encoder and one epoch. Saved-model folders (truncated, corrupted, unknown encoder) are
covered by ``tests/test_reliability.py``; the H&E-only / missing-gene embedding paths by
``tests/test_genes_across_slides.py``.

Run with ``-s`` to print one ``BAD-INPUT`` line per refused call (case, entry, error, message, seconds).
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _shared import (
    TINY_ENCODER,
    _must_not_run,
    assert_unchanged,
    quiet_single_thread,
    snapshot,
    tiny_patch_encoder,
    tiny_patch_registered,
)

import sigmma_sc as sg
from sigmma_sc._constants import Keys

ENCODER = TINY_ENCODER
FAST = {
    "encoder": ENCODER,
    "max_epochs": 1,
    "seed": 0,
    "batch_size": 16,
    "embed_dim": 8,
    "hidden_dim": 16,
    "n_genes": 20,
}
# A refused input fails in well under a second; the bound leaves room for a loaded CI machine.
FAIL_SECONDS = 10.0


@pytest.fixture(autouse=True, scope="module")
def _tiny_encoder_single_thread():
    with quiet_single_thread(), tiny_patch_registered():
        yield


# ---------------------------------------------------------------------------------------------
# data and copies (the deep snapshot: tests/_shared.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth():
    """300 synthetic cells x 40 genes, one section "S0"; read only (tests work on ``fresh`` copies)."""
    return sg.datasets.synthetic(300, n_genes=40, seed=0)


@pytest.fixture(scope="module")
def c3(her2st_dir):
    """her2st section C3 alone (180 spots); read only."""
    return sg.datasets.her2st(her2st_dir, sections=["C3"])


@pytest.fixture(scope="module")
def model(synth):
    return sg.tl.fit(fresh(synth), **FAST)


def fresh(base, table=None, *, images=None, shapes=None, tables=None):
    """A new SpatialData over ``base``: its own table and shapes, the (never written) images shared."""
    from spatialdata import SpatialData

    if tables is None:
        tables = {Keys.TABLE: base[Keys.TABLE].copy() if table is None else table}
    return SpatialData(
        images=dict(base.images) if images is None else images,
        shapes={k: v.copy() for k, v in base.shapes.items()} if shapes is None else shapes,
        tables=tables,
    )


def entries(model, **kw) -> dict:
    """The five public entries, each a call on one SpatialData."""
    return {
        "fit": lambda s: sg.tl.fit(s, **{**FAST, **kw}),
        "build_hierarchy": lambda s: sg.pp.build_hierarchy(s, **kw),
        "image_features": lambda s: sg.pp.image_features(s, encoder=ENCODER, **kw),
        "predict_expression": lambda s: sg.tl.predict_expression(model, s, k=5, **kw),
        "evaluate": lambda s: sg.tl.evaluate(model, s, baselines=(), n_genes=5, **kw),
    }


def refused(case: str, sdata, calls: dict, error: type[BaseException], match: str) -> None:
    """Each call raises ``error`` matching ``match`` in under FAIL_SECONDS and leaves ``sdata`` as it was."""
    before = snapshot(sdata)
    for name, call in calls.items():
        t0 = time.perf_counter()
        with pytest.raises(error, match=match) as info:
            call(sdata)
        seconds = time.perf_counter() - t0
        print(f"BAD-INPUT | {case} | {name} | {info.type.__name__} | {str(info.value)[:90]!r} | {seconds:.3f}")
        assert seconds < FAIL_SECONDS, f"{case}: {name} took {seconds:.1f} s to refuse"
        assert_unchanged(sdata, before)


def _set_counts(sdata, change) -> None:
    """Apply ``change`` to the stored values of the counts (X and layers["counts"]), structure kept."""
    table = sdata[Keys.TABLE]
    counts = sp.csr_matrix(table.layers[Keys.COUNTS_LAYER], dtype=np.float32)
    change(counts)
    table.layers[Keys.COUNTS_LAYER] = counts
    table.X = counts.copy()


# ---------------------------------------------------------------------------------------------
# tables and shapes
# ---------------------------------------------------------------------------------------------
def test_no_table(synth, model):
    sdata = fresh(synth, tables={})
    refused("no table", sdata, entries(model), KeyError, r"table 'table' not found in sdata.tables \(has \[\]\)")


def test_several_tables_without_table_key(synth, model):
    table = synth[Keys.TABLE]
    sdata = fresh(synth, tables={"cells": table.copy(), "cells_qc": table.copy()})
    refused(
        "several tables, no table_key",
        sdata,
        entries(model),
        KeyError,
        r"table 'table' not found in sdata.tables \(has \['cells', 'cells_qc'\]\)\. Pass table_key=",
    )
    assert sg.pp.build_hierarchy(sdata, table_key="cells").unit_level == "micro"  # the fix works


def test_table_annotating_no_shapes(synth, model):
    # A sigmma_sc object whose shapes element is gone, and a spatialdata table annotating nothing there.
    sdata = fresh(synth, shapes={})
    refused(
        "table annotates no shapes (sigmma_sc object)",
        sdata,
        entries(model),
        KeyError,
        r"shapes element 'S0_cells' of section 'S0' .* not found in sdata.shapes \(has \[\]\)\. Restore it",
    )
    table = synth[Keys.TABLE].copy()
    del table.uns[Keys.DATASET]
    sdata = fresh(synth, table, shapes={})
    refused(
        "table annotates no shapes (spatialdata table)",
        sdata,
        entries(model),
        KeyError,
        r"region 'S0_cells' annotated by the table is not a shapes element .* add circles / polygons",
    )


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _rgb(synth) -> np.ndarray:
    return np.asarray(sg.io.image_levels(synth.images["S0_he"])[0].values)


def _with_image(synth, array, *, c_coords=None, transformations="same"):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    tr = get_transformation(synth.images["S0_he"], get_all=True) if transformations == "same" else transformations
    kw = {} if c_coords is None else {"c_coords": c_coords}
    el = Image2DModel.parse(array, dims=("c", "y", "x"), transformations=tr, **kw)
    return fresh(synth, images={"S0_he": el})


def test_image_missing_or_without_transformation(synth, model):
    sdata = fresh(synth, images={})
    calls = entries(model)
    hierarchy = calls.pop("build_hierarchy")  # cells need no image for their hierarchy
    refused(
        "image missing",
        sdata,
        calls,
        KeyError,
        r"image 'S0_he' of section 'S0' not found in sdata.images \(has \[\]\)\. Add the H&E image",
    )
    assert hierarchy(sdata).unit_level == "micro"

    sdata = _with_image(synth, _rgb(synth), transformations=None)  # Identity to "global" only
    refused(
        "image without transformation to the section",
        sdata,
        entries(model),
        ValueError,
        r"image 'S0_he' has no transformation to coordinate system 'S0' .*\.set_transformation\(sdata\.images\['S0_he'\]",
    )


def test_grayscale_and_out_of_range_images_are_refused(synth, model):
    rgb = _rgb(synth)
    refused(
        "grayscale image",
        _with_image(synth, rgb[:1]),
        entries(model),
        ValueError,
        r"image 'S0_he' has 1 channel\(s\); an RGB H&E image .* is required",
    )
    refused(
        "float image in [0, 1000]",
        _with_image(synth, rgb.astype(np.float32) * 4),
        entries(model),
        ValueError,
        r"image 'S0_he' is float32 with values in \[\d+, \d+\], neither \[0, 1\] nor \[0, 255\]\. Convert",
    )


@pytest.fixture(scope="module")
def rgb_features(synth):
    # The same uint8 RGB pixels as a single-scale element, as the converted images below are built.
    sdata = _with_image(synth, _rgb(synth))
    return sg.pp.get_features(sdata, key=sg.pp.image_features(sdata, encoder=ENCODER))


@pytest.mark.parametrize("kind", ["rgba", "float01", "uint16"])
def test_rgba_float_and_uint16_images_give_the_uint8_features(synth, rgb_features, kind):
    rgb = _rgb(synth)
    if kind == "rgba":
        sdata = _with_image(synth, np.concatenate([rgb, np.full_like(rgb[:1], 255)]), c_coords=["r", "g", "b", "a"])
    elif kind == "float01":
        sdata = _with_image(synth, rgb.astype(np.float32) / 255)
    else:
        sdata = _with_image(synth, rgb.astype(np.uint16) * 257)
    image = sdata.images["S0_he"]
    feats = sg.pp.get_features(sdata, key=sg.pp.image_features(sdata, encoder=ENCODER))
    assert set(feats) == set(rgb_features)
    for level, f in feats.items():
        np.testing.assert_array_equal(f, rgb_features[level], err_msg=level)  # converted on the fly, exactly
    assert sdata.images["S0_he"] is image  # the user's image is not converted in place


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "match"),
    [
        (1e6, r"1 of 300 unit\(s\) of section 'S0' lie outside image 'S0_he' \(560 x 560 px\).* Check the image's"),
        (np.nan, r"table 'table' obsm\['spatial'\] must be a finite \(n_units, 2\) array of microns.* 1 non-finite"),
    ],
    ids=["outside", "nan"],
)
def test_units_outside_the_image_or_without_coordinates(synth, model, value, match):
    table = synth[Keys.TABLE].copy()
    xy = np.array(table.obsm[Keys.SPATIAL], dtype=np.float64)
    xy[2, 0] = value
    table.obsm[Keys.SPATIAL] = xy
    refused(f"unit coordinates {value}", fresh(synth, table), entries(model), ValueError, match)


def test_duplicated_obs_names_or_genes(synth, model):
    table = synth[Keys.TABLE].copy()
    names = list(table.obs_names)
    names[1] = names[0]
    table.obs_names = names
    refused(
        "duplicated obs names",
        fresh(synth, table),
        entries(model),
        ValueError,
        r"table 'table' has 1 duplicated obs name\(s\), e.g. \['S0_0'\]\. Make them unique",
    )
    table = synth[Keys.TABLE].copy()
    genes = list(table.var_names)
    genes[1] = genes[0]
    table.var_names = genes
    refused(
        "duplicated genes",
        fresh(synth, table),
        entries(model),
        ValueError,
        r"table 'table' has 1 duplicated gene name\(s\), e.g. \['gene0'\]\. Sum or drop",
    )


def test_fewer_units_than_one_batch(synth, model):
    # 12 cells, batch_size 16: one short batch, trained and embedded.
    sdata = fresh(synth, synth[Keys.TABLE][:12].copy())
    sg.tl.fit(sdata, **FAST)
    emb = sdata[Keys.TABLE].obsm[Keys.X_SIGMMA]
    assert emb.shape[0] == 12 and np.isfinite(emb).all()
    # A single unit has no contrastive negatives at all: refused.
    one = fresh(synth, synth[Keys.TABLE][:1].copy())
    refused(
        "one unit",
        one,
        {"fit": entries(model)["fit"]},
        ValueError,
        r"table 'table' has 1 unit\(s\); at least 2 are needed",
    )


# ---------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------
def _nan(c):
    c.data[5] = np.nan


def _negative(c):
    c.data[5] = -1


def _fraction(c):
    c.data[5] = 0.5


def _log1p(c):
    c.data = np.log1p(c.data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_nan, r"table 'table' layers\['counts'\] contains 1 NaN / infinite value\(s\)\. Raw counts must be finite"),
        (_negative, r"layers\['counts'\] contains 1 negative value\(s\) \(min -1\); raw counts are non-negative"),
        (_fraction, r"layers\['counts'\] contains 1 non-integer value\(s\) \(e.g. 0.5\); raw integer counts"),
        (
            _log1p,
            r"layers\['counts'\] contains \d+ non-integer value\(s\).*uns\['sigmma_dataset'\]\['log_normalized'\]",
        ),
    ],
    ids=["nan", "negative", "non-integer", "log-normalised"],
)
def test_bad_counts_fail_before_nuclei_and_features(c3, model, monkeypatch, change, match):
    # Before validate-first, fit on C3 segmented nuclei and computed image features first (6-16 s with the
    # tiny encoder, minutes with a real one): now it must not reach the hierarchy at all.
    monkeypatch.setattr(sg.pp, "ensure_hierarchy", _must_not_run)
    sdata = fresh(c3)
    _set_counts(sdata, change)
    calls = entries(model)
    refused(
        f"counts: {change.__name__[1:]}", sdata, {"fit": calls["fit"], "evaluate": calls["evaluate"]}, ValueError, match
    )


def test_all_zero_units_are_refused_and_all_zero_genes_are_not_modelled(synth, model):
    sdata = fresh(synth)
    _set_counts(sdata, lambda c: c.data.__setitem__(slice(c.indptr[3], c.indptr[4]), 0))  # unit 3 empty
    calls = entries(model)
    refused(
        "all-zero unit",
        sdata,
        {"fit": calls["fit"], "evaluate": calls["evaluate"]},
        ValueError,
        r"1 of 300 unit\(s\) in table 'table' have no counts \(layers\['counts'\] all zero\)\. Filter them first",
    )
    # A gene without counts is common (a panel's controls, a section loaded alone): never selected.
    sdata = fresh(synth)
    gene = sdata[Keys.TABLE].var_names[5]
    _set_counts(sdata, lambda c: c.data.__setitem__(c.indices == 5, 0))
    fitted = sg.tl.fit(sdata, **FAST)
    assert gene not in fitted.genes and len(fitted.genes) == FAST["n_genes"]


# ---------------------------------------------------------------------------------------------
# models and queries
# ---------------------------------------------------------------------------------------------
def test_query_lacking_genes_of_a_saved_model(synth, model, tmp_path):
    model.save(tmp_path / "model")
    loaded = sg.Sigmma.load(tmp_path / "model")
    table = synth[Keys.TABLE]
    half = table[:, ~table.var_names.isin(loaded.genes[:10])].copy()  # 50% of the model's 20 genes
    query = fresh(synth, half)
    match = r"table 'table' lacks 10 of the model's 20 genes \(50.0%.* max_missing_genes=10.0%"
    refused(
        "query lacks model genes",
        query,
        {"get_embeddings": loaded.get_embeddings, "evaluate": entries(loaded)["evaluate"]},
        ValueError,
        match,
    )
    # As a prediction reference it is refused before the query is embedded.
    refused(
        "reference lacks model genes",
        fresh(synth),
        {"predict_expression": lambda s: sg.tl.predict_expression(loaded, s, reference=fresh(synth, half))},
        KeyError,
        r"the reference lacks 10 of the model's 20 genes \(50.0%.* raise max_missing_genes=",
    )
    # Prediction reads the query's image only: the genes it lacks do not matter.
    assert sg.tl.predict_expression(loaded, query, k=5).shape == (table.n_obs, len(loaded.genes))


def test_one_device_rule_for_features_and_training(monkeypatch):
    """With one visible GPU (simulated): auto / gpu / cuda:0 pick it; a second device is refused at once, by both paths."""
    from sigmma_sc._utils import torch_device
    from sigmma_sc.model._core import resolve_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert torch_device("auto") == torch_device("gpu") == torch_device("cuda:0") == "cuda:0"
    assert torch_device("cpu", 4) == "cpu"
    for accelerator, devices in (("gpu", 2), ("cuda:1", "auto"), ("gpu", [1])):
        with pytest.raises(ValueError, match=r"asks for more GPUs than the 1 torch sees"):
            torch_device(accelerator, devices)
        with pytest.raises(ValueError, match=r"asks for more GPUs than the 1 torch sees"):
            resolve_accelerator(accelerator, devices)
    with pytest.raises(ValueError, match=r"accelerator must be one of \('auto', 'cpu', 'gpu', 'cuda'\)"):
        torch_device("tpu")


def test_bad_options_fail_before_any_work(synth, model, monkeypatch):
    monkeypatch.setattr(sg.pp, "ensure_hierarchy", _must_not_run)
    monkeypatch.setattr("sigmma_sc.pp._features.ensure_hierarchy", _must_not_run)
    sdata = fresh(synth)
    for option, value in (("feature_norm", "batch"), ("feature_method", "tiles"), ("stain_normalize", "vahadane")):
        refused(
            f"fit {option}={value!r}",
            sdata,
            {"fit": lambda s, o=option, v=value: sg.tl.fit(s, **{**FAST, o: v})},
            ValueError,
            rf"{option} must be one of .*, got '{value}'",
        )
    for option, value in (
        ("depth_augment", 1.0),
        ("feature_jitter", -0.1),
        ("max_context_cells", "all"),
        ("context_weight", -1.0),
    ):
        refused(
            f"fit {option}={value!r}",
            sdata,
            {"fit": lambda s, o=option, v=value: sg.tl.fit(s, **{**FAST, o: v})},
            ValueError,
            rf"{option} must be",
        )
    refused(
        "image_features stain_normalize",
        sdata,
        {"image_features": lambda s: sg.pp.image_features(s, encoder=ENCODER, stain_normalize="vahadane")},
        ValueError,
        r"stain_normalize must be None or one of \('macenko', 'reinhard'\), got 'vahadane'",
    )
    if not torch.cuda.is_available():
        refused(
            "GPU asked for, none visible",
            sdata,
            {
                "fit": lambda s: sg.tl.fit(s, **FAST, accelerator="gpu"),
                "image_features": lambda s: sg.pp.image_features(s, encoder=ENCODER, device="cuda"),
            },
            ValueError,
            r"asks for a GPU, but torch .* sees none .* pass accelerator='auto' or 'cpu'",
        )
    monkeypatch.undo()
    # predict_expression and evaluate cache the query's hierarchy and features: bad options come first.
    refused(
        "predict/evaluate options",
        sdata,
        {
            "predict temperature=0": lambda s: sg.tl.predict_expression(model, s, temperature=0),
            "predict max_missing_genes=2": lambda s: sg.tl.predict_expression(model, s, max_missing_genes=2),
            "predict method='mean'": lambda s: sg.tl.predict_expression(model, s, method="mean"),
            "evaluate temperature=0": lambda s: sg.tl.evaluate(model, s, baselines=(), temperature=0),
            "evaluate baseline_feature_norm": lambda s: sg.tl.evaluate(model, s, baseline_feature_norm="slide"),
        },
        ValueError,
        r"(temperature must be > 0|max_missing_genes must be a share between 0 and 1|baseline_feature_norm must be one of"
        r"|method must be one of \('auto', 'knn', 'ridge', 'blend'\))",
    )
    refused(
        "evaluate counts",
        sdata,
        {
            "evaluate k=0": lambda s: sg.tl.evaluate(model, s, baselines=(), k=0),
            "evaluate max_units=0": lambda s: sg.tl.evaluate(model, s, baselines=(), max_units=0),
            "evaluate ks=(0,)": lambda s: sg.tl.evaluate(model, s, baselines=(), ks=(0,)),
        },
        ValueError,
        r"(k|max_units|ks) must be",
    )
    monkeypatch.setattr(model, "reference", None)  # a model saved before references existed
    refused(
        "model without reference",
        sdata,
        {"predict_expression": lambda s: sg.tl.predict_expression(model, s)},
        ValueError,
        r"the model holds no reference .* pass reference=",
    )


def test_a_second_fit_replaces_the_first(synth):
    sdata = fresh(synth)
    table = sdata[Keys.TABLE]
    sg.tl.fit(sdata, **FAST)
    first = {k: v.copy() for k, v in table.obsm.items()}
    keys = (sorted(table.obsm), sorted(table.obsp), sorted(table.uns), sorted(table.uns[Keys.UNS]))
    second = sg.tl.fit(sdata, **{**FAST, "seed": 1})
    assert (sorted(table.obsm), sorted(table.obsp), sorted(table.uns), sorted(table.uns[Keys.UNS])) == keys
    own = sorted(k for k in table.obsm if k.startswith(Keys.X_SIGMMA))
    assert sorted(table.uns[Keys.UNS][Keys.OBSM_KEYS]) == own
    assert len(table.uns[Keys.UNS][Keys.FEATURES]) == 1  # the cached features were reused, not duplicated
    assert table.uns[Keys.UNS][Keys.PARAMS]["seed"] == 1 == second.params["seed"]
    assert not np.array_equal(table.obsm[Keys.X_SIGMMA], first[Keys.X_SIGMMA])  # replaced by the new model
    np.testing.assert_array_equal(table.obsm[Keys.SPATIAL], first[Keys.SPATIAL])


# ---------------------------------------------------------------------------------------------
# interrupts
# ---------------------------------------------------------------------------------------------
def test_interrupt_during_features(synth, model, monkeypatch):
    from sigmma_sc.pp import _encoders

    def interrupted(x):
        raise KeyboardInterrupt

    with_hierarchy = fresh(synth)
    sg.pp.build_hierarchy(with_hierarchy)
    # The registered encoder, its network interrupted (dense maps and pooled crops both run it).
    encoder = tiny_patch_encoder()
    monkeypatch.setattr(encoder.module, "forward", interrupted)
    monkeypatch.setitem(_encoders._REGISTRY, ENCODER, lambda **kw: encoder)
    refused("interrupt in features", fresh(synth), {"fit": entries(model)["fit"]}, KeyboardInterrupt, "")
    refused(
        "interrupt in features (hierarchy built)",
        with_hierarchy,
        {"image_features": entries(model)["image_features"]},
        KeyboardInterrupt,
        "",
    )


def test_interrupt_after_nuclei_segmentation_leaves_no_nuclei(c3, monkeypatch):
    """her2st C3: the nuclei (12 s of segmentation) reach sdata with the hierarchy, not before."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    sdata = fresh(c3)
    before = snapshot(sdata)
    monkeypatch.setattr("sigmma_sc.pp._hierarchy.spot_hierarchy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sg.pp.build_hierarchy(sdata)
    assert_unchanged(sdata, before)  # no "C3_nuclei", no graph, no hierarchy


def test_interrupt_during_training(synth, model, monkeypatch):
    from sigmma_sc.model._losses import ContrastiveLoss

    forward = ContrastiveLoss.forward

    def interrupted(self, *args, **kwargs):
        if self.training:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ContrastiveLoss, "forward", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    refused(
        "interrupt in training",
        fresh(synth),
        {"fit": entries(model)["fit"]},
        KeyboardInterrupt,
        r"training interrupted in epoch 1",
    )
    assert signal.getsignal(signal.SIGINT) is handler
