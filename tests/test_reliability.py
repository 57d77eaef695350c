"""Reliability: atomic, verified model folders (format 2, format 1 still read), NaN guards, resumable training.

Array-level training on a small hand-built grid of spots (a few seconds a run); the format-1 model
folder in ``tests/data`` was written by the code before saved-model format 2 (see
``tests/data/make_format1_model.py``) and is embedded on ``datasets.synthetic(300, n_genes=40)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _shared import (
    TINY_ENCODER,
    _must_not_run,
    assert_unchanged,
    quiet_single_thread,
    snapshot,
    spot_grid,
    tiny_patch_encoder,
    tiny_patch_registered,
)

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.model._data import ExpressionSource, LevelInput

DATA = Path(__file__).parent / "data"
FORMAT1 = DATA / "format1_model"


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    with quiet_single_thread():
        yield


@pytest.fixture(scope="module")
def tiny_encoder():
    """The 8-channel encoder of the format-1 folder, registered for the module's tests."""
    spec = importlib.util.spec_from_file_location("make_format1_model", DATA / "make_format1_model.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    sg.pp.register_encoder(maker.ENCODER, maker.tiny_conv8)
    yield maker.ENCODER
    from sigmma_sc.pp import _encoders

    _encoders._REGISTRY.pop(maker.ENCODER, None)


@pytest.fixture
def saved(tiny_encoder, tmp_path) -> Path:
    """The format-1 model saved again by today's code (format 2)."""
    path = tmp_path / "model"
    sg.Sigmma.load(FORMAT1).save(path)
    return path


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _write_config(path: Path, config: dict) -> None:
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _rehash(path: Path, name: str) -> None:
    # A consistent edit: the file changed and its record with it (only the content checks can object).
    from sigmma_sc.model._sigmma import _sha256

    config = _config(path)
    config["files"][name] = {"sha256": _sha256(path / name), "bytes": (path / name).stat().st_size}
    _write_config(path, config)


# ---------------------------------------------------------------------------------------------
# saved-model folders
# ---------------------------------------------------------------------------------------------
def test_format1_folder_loads_and_embeds_as_when_it_was_saved(tiny_encoder):
    model = sg.Sigmma.load(FORMAT1)
    assert len(model.genes) == 20 and model.encoder == tiny_encoder and model.reference is None
    assert "files" not in model.params and "format_version" not in model.params
    sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
    emb = model.get_embeddings(sdata)
    expected = np.load(DATA / "format1_embeddings.npz")
    for key in ("img", "expr", "joint"):
        np.testing.assert_allclose(emb[key], expected[key], atol=1e-5)


def test_save_is_atomic_and_records_format_and_checksums(saved, monkeypatch):
    import torch

    from sigmma_sc.model._sigmma import _FORMAT_VERSION, _sha256

    config = _config(saved)
    assert config["format_version"] == _FORMAT_VERSION == 2
    names = {"weights.pt", "genes.txt", "stats.npz", "history.csv"}
    assert set(config["files"]) == names
    for name, record in config["files"].items():
        assert record == {"sha256": _sha256(saved / name), "bytes": (saved / name).stat().st_size}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]  # no temporary folders left
    model = sg.Sigmma.load(saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(saved, overwrite=False)
    # A save that fails half-way leaves the previous folder untouched and nothing beside it.
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model.history = pd.concat([model.history, model.history.tail(1)])  # a different model
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        model.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]
    monkeypatch.undo()
    model.save(saved)  # overwrite (default): the new model, whole
    assert len(pd.read_csv(saved / "history.csv")) == len(model.history)
    assert sg.Sigmma.load(saved).history.shape == model.history.shape
    # Never replace a folder holding something else.
    (saved / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        model.save(saved)
    other = saved.parent / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(FileExistsError, match="holds no saved model"):
        model.save(other)
    assert torch.load(saved / "weights.pt", weights_only=True).keys() == model.module.state_dict().keys()


def _drop_file(path):
    (path / "weights.pt").unlink()


def _truncate(path):
    data = (path / "weights.pt").read_bytes()
    (path / "weights.pt").write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray((path / "stats.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "stats.npz").write_bytes(bytes(data))


def _newer_format(path):
    config = _config(path)
    config["format_version"] = 99
    _write_config(path, config)


def _genes_mismatch(path):
    genes = (path / "genes.txt").read_text().splitlines()
    (path / "genes.txt").write_text("\n".join(genes[:-1]) + "\n")
    _rehash(path, "genes.txt")


def _stats_mismatch(path):
    with np.load(path / "stats.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["feature_meso_mean"] = np.zeros(5, np.float32)
    arrays["feature_meso_std"] = np.ones(5, np.float32)
    np.savez(path / "stats.npz", **arrays)
    _rehash(path, "stats.npz")


def _unknown_encoder(path):
    config = _config(path)
    config["encoder"] = "uni2-h-custom"
    _write_config(path, config)


def _broken_config(path):
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[: len(text) // 2])


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (_drop_file, FileNotFoundError, r"lacks weights\.pt.*incomplete"),
        (_truncate, ValueError, r"weights\.pt is truncated \(\d+ bytes, \d+ written"),
        (_flip_byte, ValueError, r"stats\.npz is corrupted: its sha256 differs"),
        (_newer_format, ValueError, r"format 99.*reads formats up to 2: upgrade"),
        (_genes_mismatch, ValueError, r"genes\.txt lists 19 genes but .* expr_dims"),
        (_stats_mismatch, ValueError, r"stats\.npz: .*level 'meso' have 5 channels .* img_dims\['meso'\]"),
        (_unknown_encoder, ValueError, r"'uni2-h-custom' \(config\.json field 'encoder'\).*register_encoder"),
        (_broken_config, ValueError, r"config\.json is not valid JSON"),
    ],
    ids=["missing", "truncated", "corrupted", "newer-format", "genes", "feature-dims", "encoder", "config"],
)
def test_load_verifies_every_file_and_names_it(saved, damage, error, match):
    damage(saved)
    with pytest.raises(error, match=match) as info:
        sg.Sigmma.load(saved)
    assert (
        "save the model again" in str(info.value)
        or "register_encoder" in str(info.value)
        or "upgrade" in str(info.value)
    )


def test_load_points_to_the_previous_model_after_an_interrupted_swap(saved):
    # A crash between the two renames of Sigmma.save: the old model sits in a hidden sibling.
    aside = saved.parent / ".model.replaced-0123abcd"
    os.replace(saved, aside)
    with pytest.raises(FileNotFoundError, match=r"previous model in .*\.model\.replaced-0123abcd: rename"):
        sg.Sigmma.load(saved)
    os.replace(aside, saved)
    assert sg.Sigmma.load(saved).genes


def test_format1_folder_missing_a_file_is_refused(tiny_encoder, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(FORMAT1, copy)
    (copy / "stats.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks stats\.npz"):
        sg.Sigmma.load(copy)


# ---------------------------------------------------------------------------------------------
# training: non-finite losses, resume, interrupts
# ---------------------------------------------------------------------------------------------
def grid_levels(n_side: int = 8, n_sec: int = 2, n_nuc: int = 3, n_feat: int = 12, n_genes: int = 20, seed: int = 0):
    """Spots on a grid with nuclei and ring regions (a smaller ``test_model.spot_levels``)."""
    rng = np.random.default_rng(seed)
    edges, region, kind = spot_grid(n_side, n_sec)
    n = len(kind)
    f_meso = rng.normal(size=(4, n_feat))[kind] + rng.normal(size=(n, n_feat))
    counts = sp.csr_matrix(rng.poisson(rng.gamma(1.0, 1.0, size=(4, n_genes))[kind] * 5 + 0.5).astype(np.float32))
    parent = np.repeat(np.arange(n), n_nuc)
    f_micro = f_meso[parent] + rng.normal(size=(len(parent), n_feat))
    pairs = np.array(
        [
            (a, b)
            for i in range(n)
            for a in range(i * n_nuc, (i + 1) * n_nuc)
            for b in range(i * n_nuc, (i + 1) * n_nuc)
            if a != b
        ]
    ).T
    f_macro = np.asarray(region @ f_meso) / np.asarray(region.sum(1))
    levels = {
        "micro": LevelInput("micro", len(parent), pairs, parent, f_micro.astype(np.float32), None),
        "meso": LevelInput("meso", n, edges, np.arange(n), f_meso.astype(np.float32), sp.identity(n, format="csr")),
        "macro": LevelInput("macro", n, edges, None, f_macro.astype(np.float32), region),
    }
    return levels, ExpressionSource.from_counts(counts, np.arange(n_genes), log_normalized=False)


FAST = {"max_epochs": 4, "batch_size": 16, "embed_dim": 8, "hidden_dim": 16}


class _Count:
    """A Lightning callback counting finished training batches (built lazily: lightning is heavy)."""

    def __new__(cls):
        import lightning as L

        class Counter(L.Callback):
            batches = 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.batches += 1

        return Counter()


def test_nan_features_stop_training_at_once_naming_the_input():
    from sigmma_sc.model._core import NonFiniteLossError, TrainConfig, train

    levels, src = grid_levels()
    levels["meso"].features[7, 2] = np.nan
    counter = _Count()
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch \d+: the training loss is not finite") as info:
        train(levels, src, TrainConfig(**FAST), callbacks=[counter])
    err = info.value
    assert isinstance(err, NonFiniteLossError)
    assert "meso_img" in str(err) and "image features" in str(err) and "counts" in str(err)
    assert "no checkpoint" in str(err) and err.checkpoint is None
    assert counter.batches == err.batch  # the failing batch never finished, no later one ran


def test_nan_loss_later_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch

    from sigmma_sc.model._core import NonFiniteLossError, TrainConfig, train
    from sigmma_sc.model._losses import ContrastiveLoss

    levels, src = grid_levels()
    forward = ContrastiveLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 10:  # the second batch of the second epoch (8 training batches an epoch)
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(ContrastiveLoss, "forward", poisoned)
    counter = _Count()
    with pytest.raises(
        NonFiniteLossError, match=r"epoch 2, batch 1: .*lr=0\.001.*epoch 1\) is .*resume from it"
    ) as info:
        train(levels, src, TrainConfig(**FAST, checkpoint_dir=str(tmp_path)), callbacks=[counter])
    err = info.value
    assert counter.batches == 9 and calls["n"] == 10  # stopped at once
    assert err.checkpoint == str(tmp_path / "last.ckpt") and err.checkpoint in str(err)
    ckpt = torch.load(err.checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0  # the first epoch, finished
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def _embed(module, levels, src, stats):
    from sigmma_sc.model._core import TrainConfig, embed_nodes, make_batcher, unit_embeddings

    b = make_batcher(levels, TrainConfig(**FAST), src, stats)
    nodes = embed_nodes(module, b, batch_size=16, expression=True)
    return unit_embeddings(nodes, levels, "meso", levels["meso"].n)["joint"]


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    import lightning as L

    from sigmma_sc.model._core import TrainConfig, train

    levels, src = grid_levels()
    full, hist_full, stats, _ = train(levels, src, TrainConfig(**FAST, checkpoint_dir=str(tmp_path / "a")))

    class Interrupt(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # the end of epoch 2
                raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted in epoch 2; the last checkpoint is .*last\.ckpt"):
        train(levels, src, TrainConfig(**FAST, checkpoint_dir=str(tmp_path / "b")), callbacks=[Interrupt()])
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning had set SIG_IGN
    assert (tmp_path / "b" / "last.ckpt").is_file()
    resumed, hist_resumed, stats2, _ = train(
        levels, src, TrainConfig(**FAST, checkpoint_dir=str(tmp_path / "b"), resume=True)
    )
    for key, value in full.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), resumed.state_dict()[key].numpy(), err_msg=key)
    pd.testing.assert_frame_equal(hist_full, hist_resumed)
    np.testing.assert_array_equal(_embed(full, levels, src, stats), _embed(resumed, levels, src, stats2))


def test_resume_arguments(tmp_path, caplog):
    from sigmma_sc.model import TrainConfig
    from sigmma_sc.model._core import resolve_resume

    assert TrainConfig(resume=False).resume is None
    assert TrainConfig(resume=tmp_path / "x.ckpt").resume == str(tmp_path / "x.ckpt")
    with pytest.raises(TypeError, match="resume must be"):
        TrainConfig(resume=3)
    with pytest.raises(ValueError, match="checkpoint_dir is None"):
        resolve_resume(TrainConfig(resume=True))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resolve_resume(TrainConfig(resume=str(tmp_path / "missing.ckpt")))
    assert resolve_resume(TrainConfig(resume=True, checkpoint_dir=str(tmp_path))) == (None, str(tmp_path))
    (tmp_path / "last.ckpt").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert resolve_resume(TrainConfig(resume=True, checkpoint_dir=str(tmp_path))) == (
        str(tmp_path / "last.ckpt"),
        str(tmp_path),
    )
    # A path alone: new checkpoints go beside it.
    assert resolve_resume(TrainConfig(resume=str(tmp_path / "last.ckpt")))[1] == str(tmp_path)
    import inspect

    assert inspect.signature(sg.tl.fit).parameters["resume"].default is None


def test_nan_gradient_with_a_finite_loss_stops_before_the_step():
    import lightning as L

    from sigmma_sc.model._core import NonFiniteLossError, TrainConfig, train

    class PoisonGradient(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3 and not hasattr(self, "hook"):
                self.weight = pl_module.img.mlp["meso"].net[0].weight
                self.before = self.weight.detach().clone()
                self.hook = self.weight.register_hook(lambda g: g * float("nan"))

    poison = PoisonGradient()
    with pytest.raises(
        NonFiniteLossError, match=r"batch 3: the gradient is not finite \(in img\.mlp\.meso\.net\.0\.weight"
    ):
        train(*grid_levels(), TrainConfig(**FAST), callbacks=[poison])
    assert np.array_equal(poison.weight.detach().numpy(), poison.before.numpy())  # no optimiser step


# ---------------------------------------------------------------------------------------------
# tl.fit: trainer_kwargs, the interrupt-and-resume bar on her2st C3, reproducibility across processes
# ---------------------------------------------------------------------------------------------
TINY = TINY_ENCODER
FIT = {"encoder": TINY, "embed_dim": 8, "hidden_dim": 16, "n_genes": 20, "batch_size": 16, "seed": 0}


@pytest.fixture(scope="module")
def tiny_fit_encoder():
    with tiny_patch_registered() as name:
        yield name


@pytest.fixture
def cachedir(tmp_path):
    old = sg.settings._cachedir
    sg.settings.cachedir = tmp_path / "cache"
    yield sg.settings.cachedir
    sg.settings.cachedir = old


class _StopAt:
    """A Lightning callback raising KeyboardInterrupt (as Ctrl+C does) at the end of an epoch (built lazily)."""

    def __new__(cls, epoch: int):
        import lightning as L

        class StopAt(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == epoch - 1:
                    raise KeyboardInterrupt

        return StopAt()


def test_trainer_kwargs_callbacks_logger_and_options_reach_lightning(tiny_fit_encoder, cachedir, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
    counter = _Count()
    csv = CSVLogger(tmp_path / "logs", name="run")
    sg.tl.fit(
        sdata,
        max_epochs=2,
        **FIT,
        trainer_kwargs={"callbacks": counter, "logger": csv, "limit_train_batches": 1},
    )
    assert counter.batches == 2  # one batch an epoch (limit_train_batches), through the user's callback
    metrics = pd.read_csv(Path(csv.log_dir) / "metrics.csv")
    assert "train_loss" in metrics.columns and len(metrics)  # the user's logger got the package's metrics
    assert not any(cachedir.glob("checkpoints/*/*.ckpt"))  # the run's checkpoints are gone after success
    # The options the package sets itself are refused before any work, naming the keyword to use.
    monkeypatch.setattr(sg.pp, "ensure_hierarchy", _must_not_run)
    for key, fix in (
        ("max_epochs", "pass max_epochs= to tl.fit"),
        ("accelerator", "pass accelerator= to tl.fit"),
        ("devices", "pass devices= to tl.fit"),
        ("precision", "pass precision= to tl.fit"),
        ("default_root_dir", "pass checkpoint_dir="),
        ("enable_progress_bar", r"set sigmma_sc.settings.progress_bar"),
    ):
        with pytest.raises(ValueError, match=rf"trainer_kwargs\['{key}'\] is set by sigmma-sc itself: {fix}"):
            sg.tl.fit(sdata, **FIT, trainer_kwargs={key: 1})
    with pytest.raises(ValueError, match=r"trainer_kwargs \['max_epoch'\] are not lightning.Trainer arguments"):
        sg.tl.fit(sdata, **FIT, trainer_kwargs={"max_epoch": 1})
    with pytest.raises(TypeError, match=r"must be lightning.Callback objects, got \['str'\]"):
        sg.tl.fit(sdata, **FIT, trainer_kwargs={"callbacks": ["early_stopping"]})


def _interrupt_resume_and_compare(sdata, kw: dict, cachedir: Path) -> None:
    """Ctrl+C (a callback) in epoch 2 of ``tl.fit``: ``sdata`` unchanged; ``resume=True`` then equals a fit from scratch."""
    before = snapshot(sdata)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted in epoch 2; .*continue with resume=.*resume=True\)"):
        sg.tl.fit(sdata, **kw, trainer_kwargs={"callbacks": [_StopAt(2)]})
    assert signal.getsignal(signal.SIGINT) is handler
    assert_unchanged(sdata, before)  # no nuclei, graph, hierarchy, features or embeddings
    assert len(list(cachedir.glob("checkpoints/*/last.ckpt"))) == 1  # kept for the resume

    model = sg.tl.fit(sdata, **kw, resume=True)  # the same call, resumed: epochs 3 and 4
    assert model.history["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert not any(cachedir.glob("checkpoints/*/*.ckpt"))  # removed once the run succeeded
    table = sdata["table"]
    resumed = {k: v.copy() for k, v in table.obsm.items() if k.startswith(Keys.X_SIGMMA)}
    # The uninterrupted run (the hierarchy and features are cached now: only training runs again).
    sg.tl.fit(sdata, **kw)
    assert sorted(k for k in table.obsm if k.startswith(Keys.X_SIGMMA)) == sorted(resumed)
    for key, value in resumed.items():
        np.testing.assert_array_equal(table.obsm[key], value, err_msg=key)  # bit for bit


@pytest.mark.slow
def test_fit_interrupted_on_her2st_c3_leaves_sdata_unchanged_and_resumes_bit_for_bit(
    her2st_dir, tiny_fit_encoder, cachedir
):
    """The bar of issue 15 on her2st section C3 (180 spots, nuclei segmented from the H&E; ~50 s)."""
    _interrupt_resume_and_compare(sg.datasets.her2st(her2st_dir, sections=["C3"]), {**FIT, "max_epochs": 4}, cachedir)


def test_fit_interrupted_leaves_sdata_unchanged_and_resumes_bit_for_bit(tiny_fit_encoder, cachedir):
    """The fast twin of the her2st C3 test: 300 synthetic cells."""
    _interrupt_resume_and_compare(sg.datasets.synthetic(300, n_genes=40, seed=0), {**FIT, "max_epochs": 4}, cachedir)


_REPRO = """
import sys, numpy as np, torch
import sigmma_sc as sg
sys.path.insert(0, {tests!r})
from _shared import tiny_patch_encoder
from test_reliability import TINY, FIT
torch.set_num_threads(1)
sg.settings.progress_bar = False
sg.settings.verbosity = 0
sg.settings.cachedir = {cache!r}
sg.pp.register_encoder(TINY, tiny_patch_encoder)
sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
model = sg.tl.fit(sdata, max_epochs=2, **FIT)
loaded = sg.Sigmma.load({model!r})
np.savez({out!r}, fit=sdata["table"].obsm["X_sigmma"], loaded=loaded.get_embeddings(sdata)["joint"])
"""


def test_same_seed_gives_bit_identical_embeddings_across_processes_and_after_save_load(
    tiny_fit_encoder, cachedir, tmp_path
):
    """A fit here, then in a fresh process (~30 s, most of it the imports): the same bits; the saved model too.

    Both use one torch thread (the module's fixture here, ``torch.set_num_threads(1)`` there): CPU
    reductions split by thread, so bit-identical reruns need the same thread count.
    """
    import subprocess
    import sys

    import torch

    assert torch.get_num_threads() == 1
    sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
    model = sg.tl.fit(sdata, max_epochs=2, **FIT)
    model.save(tmp_path / "model")
    assert sdata["table"].uns[Keys.UNS][Keys.PARAMS]["torch_threads"] == 1
    out = tmp_path / "second.npz"
    code = _REPRO.format(
        tests=str(Path(__file__).parent), cache=str(cachedir), model=str(tmp_path / "model"), out=str(out)
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        second = {k: f[k] for k in f.files}
    first = sdata["table"].obsm[Keys.X_SIGMMA]
    assert first.shape == (300, 24) and np.isfinite(first).all()
    np.testing.assert_array_equal(second["fit"], first)  # the same fit in another process
    np.testing.assert_array_equal(second["loaded"], model.get_embeddings(sdata)["joint"])  # save / load
    np.testing.assert_array_equal(second["loaded"], first)  # get_embeddings of a fit = what the fit wrote


def test_interrupted_image_features_resume_from_the_finished_sections(tiny_fit_encoder, cachedir, monkeypatch):
    """Ctrl+C in the second section: the first section's features wait on disk; the rerun encodes only the second."""
    from sigmma_sc.pp import _features

    sdata = sg.datasets.synthetic(400, n_genes=20, n_sections=2, seed=0)
    reference = sg.datasets.synthetic(400, n_genes=20, n_sections=2, seed=0)
    sg.pp.image_features(reference, encoder=TINY)
    encode = _features.section_features
    calls = []

    def interrupted_in_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(_features, "section_features", interrupted_in_second)
    with pytest.raises(KeyboardInterrupt):
        sg.pp.image_features(sdata, encoder=TINY)
    assert Keys.UNS not in sdata["table"].uns  # neither the hierarchy nor any feature reached the table
    assert len(list((cachedir / "features").glob("*.npz"))) == 1  # the finished section, on disk

    calls.clear()
    key = sg.pp.image_features(sdata, encoder=TINY)
    assert len(calls) == 1  # the second section only
    assert not list((cachedir / "features").glob("*.npz"))  # removed: the features are in the table now
    for level, value in sg.pp.get_features(reference).items():
        np.testing.assert_array_equal(sg.pp.get_features(sdata, key=key)[level], value, err_msg=level)


@pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")  # ome_zarr, on write
@pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")
def test_zarr_round_trip_after_fit_keeps_hierarchy_features_and_embeddings(tiny_fit_encoder, tmp_path):
    import spatialdata as sd

    sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
    model = sg.tl.fit(sdata, max_epochs=1, **FIT)
    sdata.write(tmp_path / "s.zarr")
    back = sd.read_zarr(tmp_path / "s.zarr")
    table, read = sdata["table"], back["table"]
    for key in (k for k in table.obsm if k.startswith(Keys.X_SIGMMA)):
        np.testing.assert_array_equal(read.obsm[key], table.obsm[key], err_msg=key)
    a, b = sg.pp.get_hierarchy(sdata), sg.pp.get_hierarchy(back)
    assert list(a.levels) == list(b.levels) and a.unit_level == b.unit_level
    for level in a.levels:
        np.testing.assert_array_equal(a.levels[level].centers_um, b.levels[level].centers_um)
        assert (a.levels[level].members != b.levels[level].members).nnz == 0
    for level, value in sg.pp.get_features(sdata, key=model.feature_key).items():
        np.testing.assert_array_equal(sg.pp.get_features(back, key=model.feature_key)[level], value, err_msg=level)
    assert read.uns[Keys.UNS][Keys.PARAMS]["fingerprint"]["counts"] == model.params["fingerprint"]["counts"]
    # The model embeds the read-back object from its cached hierarchy and features: the same bits.
    np.testing.assert_array_equal(model.get_embeddings(back)["joint"], table.obsm[Keys.X_SIGMMA])


def test_a_model_saved_with_another_encoder_under_the_same_name_is_refused(tiny_fit_encoder, tmp_path):
    import torch

    sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
    sg.tl.fit(sdata, max_epochs=1, **FIT).save(tmp_path / "model")

    def wider(**kwargs):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 32, stride=32), torch.nn.ReLU())
        return sg.pp.encoder_from_module(net, id=TINY, feature_map=lambda m, x: m(x))

    sg.pp.register_encoder(TINY, wider)
    try:
        with pytest.raises(
            ValueError,
            match=rf"registered here as '{TINY}' gives 16 features, but the model was trained on \[8\]",
        ):
            sg.Sigmma.load(tmp_path / "model")
    finally:
        sg.pp.register_encoder(TINY, tiny_patch_encoder)


def test_num_workers_build_the_same_batches(tiny_fit_encoder):
    """settings.num_workers=2: batches built in worker processes, every epoch's shuffle kept: the same bits."""
    runs = []
    for workers in (0, 2):
        sg.settings.num_workers = workers
        try:
            sdata = sg.datasets.synthetic(300, n_genes=40, seed=0)
            model = sg.tl.fit(sdata, max_epochs=3, **FIT)
        finally:
            sg.settings.num_workers = 0
        runs.append((sdata["table"].obsm[Keys.X_SIGMMA], model.history["train_loss"].to_numpy()))
    np.testing.assert_array_equal(runs[1][1], runs[0][1])
    np.testing.assert_array_equal(runs[1][0], runs[0][0])
