"""benchmarks/quality.py: joining result files of a protocol run apart (--folds / --seeds, --merge)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("_sigmma_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _file(tmp_path, name, rows):
    runs = []
    for fold, seed, method, r in rows:
        run = {"fold": fold, "seed": seed, "method": method, "chance_r5": 0.005}
        run.update({key: r for key in ("pcc_hvg50", "pcc_hvg50_det1", "pcc_heg50", "pcc_hvg50_per_slide")})
        run.update({key: r / 10 for key in ("r1_img2expr", "r5_img2expr", "r10_img2expr")})
        run.update({key: r / 10 for key in ("r1_expr2img", "r5_expr2img", "r10_expr2img")})
        runs.append(run)
    path = tmp_path / name
    path.write_text(json.dumps({"protocol": {"runs": runs, "folds": [{"fold": f} for f in {r[0] for r in rows}]}}))
    return str(path)


def test_merge_joins_folds_and_seeds_and_reports_the_chosen_readout(quality, tmp_path):
    # Seed 0 in two files (folds 0 and 1), the baseline once per fold; seed 1 in a third file.
    a = _file(tmp_path, "a.json", [(0, 0, "sigmma", 0.9), (0, 0, "sigmma_ridge", 0.3), (0, 0, "ridge_cv", 0.2)])
    b = _file(tmp_path, "b.json", [(1, 0, "sigmma", 0.9), (1, 0, "sigmma_ridge", 0.5), (1, 0, "ridge_cv", 0.1)])
    c = _file(tmp_path, "c.json", [(0, 1, "sigmma", 0.9), (0, 1, "sigmma_ridge", 0.4), (1, 1, "sigmma_ridge", 0.6)])
    merged = quality.merge_runs([a, b, c], sigmma_row="sigmma_ridge")
    methods = merged["methods"]
    assert set(methods) == {"sigmma", "ridge_cv"}  # the files' own sigmma rows are dropped
    # Mean over folds per seed (0.4 and 0.5), then over seeds; the baseline's only seed.
    assert methods["sigmma"]["pcc_hvg50"] == pytest.approx(0.45)
    assert methods["sigmma"]["pcc_hvg50_std"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert methods["ridge_cv"]["pcc_hvg50"] == pytest.approx(0.15)
    assert list(quality.fold_differences(merged["protocol"]["runs"], "ridge_cv").round(3)) == [0.15, 0.45]
    assert merged["protocol"]["merged_from"] == [a, b, c]
    # Without sigmma_row the files' sigmma rows stand.
    assert quality.merge_runs([a, b])["methods"]["sigmma"]["pcc_hvg50"] == pytest.approx(0.9)
    # The same fold, seed and method twice is refused, naming both files.
    with pytest.raises(ValueError, match="both"):
        quality.merge_runs([a, a])


def test_merge_from_the_command_line(quality, tmp_path, capsys):
    a = _file(tmp_path, "a.json", [(0, 0, "sigmma", 0.5), (0, 0, "single_scale", 0.4)])
    out = tmp_path / "merged.json"
    quality.main(["--merge", a, "--out", str(out)])
    assert json.loads(out.read_text())["methods"]["sigmma"]["pcc_hvg50"] == pytest.approx(0.5)
    assert "SIGMMA vs single_scale" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        quality.main(["--out", str(out)])  # neither --dataset nor --merge


# -- benchmarks/shift.py: the foreign section's fixed transforms ---------------------------------
@pytest.fixture(scope="module")
def shift():
    path = QUALITY.with_name("shift.py")
    spec = importlib.util.spec_from_file_location("_sigmma_shift", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_restain_is_the_identity_without_shift_and_moves_the_stains_with_it(shift, monkeypatch):
    rng = np.random.default_rng(0)
    # H&E-like pixels: white background plus mixtures of the two stains
    hed_from_rgb, _ = shift.stain_matrices()
    conc = rng.uniform(0, 0.6, (64, 64, 3)) * np.array([1.0, 1.0, 0.0])
    m = shift.RGB_FROM_HED / np.linalg.norm(shift.RGB_FROM_HED, axis=1, keepdims=True)
    rgb = np.clip(np.rint(256 * 10 ** (-(conc @ m)) - 1), 0, 255).astype(np.uint8)
    shifted = shift.restain(rgb)
    assert shifted.shape == rgb.shape and shifted.dtype == np.uint8
    # the fixed transform: hematoxylin weaker, eosin stronger (deconvolved with the original vectors)
    od = lambda x: -np.log10((x.astype(float) + 1) / 256)  # noqa: E731
    before, after = od(rgb) @ hed_from_rgb, od(shifted) @ hed_from_rgb
    assert after[..., 0].mean() < before[..., 0].mean() and after[..., 1].mean() > before[..., 1].mean()
    assert np.abs(shifted.astype(int) - rgb).mean() > 3
    monkeypatch.setattr(shift, "STAIN_ROTATION_DEG", 0.0)
    monkeypatch.setattr(shift, "STAIN_SCALE", (1.0, 1.0, 1.0))
    assert np.abs(shift.restain(rgb).astype(int) - rgb).max() <= 1  # float32 rounding only


def test_thinning_reaches_the_target_median(shift):
    from scipy import sparse

    rng = np.random.default_rng(1)
    counts = sparse.random(300, 500, density=0.3, random_state=2, data_rvs=lambda n: rng.integers(1, 40, n)).tocsr()
    counts.data = counts.data.astype(np.int32)
    thinned, p = shift.thin(counts, 650, np.random.default_rng(0))
    med = np.median(np.asarray(thinned.sum(axis=1)).ravel())
    assert 0 < p < 1 and abs(med - 650) < 0.05 * 650
    assert (thinned.data > 0).all() and (thinned.toarray() <= counts.toarray()).all()
    same, p1 = shift.thin(counts, 1e9, np.random.default_rng(0))
    assert p1 == 1.0 and (same != counts).nnz == 0


def test_shift_summary_pairs_every_readout_row_with_the_baselines(shift):
    rows = []
    for seed, (sig, blend, cv, single) in enumerate([(0.20, 0.22, 0.19, 0.16), (0.18, 0.21, 0.19, 0.17)]):
        for method, r in (("sigmma", sig), ("sigmma_blend", blend), ("ridge_cv", cv), ("single_scale", single)):
            rows.append({"seed": seed, "method": method, "clean": False, "pcc_hvg50": r})
    rows.append({"seed": 0, "method": "sigmma", "clean": True, "pcc_hvg50": 0.9})  # unshifted: not paired
    out = shift.summarize(rows)
    assert out["paired"]["pcc_hvg50"]["sigmma_minus_ridge_cv"] == [0.01, -0.01]
    assert out["paired"]["pcc_hvg50"]["above_ridge_cv_seeds"] == 1
    blend = out["paired_readouts"]["sigmma_blend"]["pcc_hvg50"]
    assert blend["sigmma_minus_ridge_cv"] == [0.03, 0.02] and blend["above_ridge_cv_seeds"] == 2
    assert blend["ratio_single_scale_mean"] == pytest.approx((0.22 / 0.16 + 0.21 / 0.17) / 2, abs=1e-3)
    assert out["methods"]["sigmma"]["pcc_hvg50"]["mean"] == pytest.approx(0.19)
