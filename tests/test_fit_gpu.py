"""tl.fit on GPU: bf16 mixed precision, and DDP over every visible device when there are several.

Skipped without CUDA. Uses the array-level core (synthetic spot grid) so it needs no data files
and runs in seconds on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _spot_inputs():
    # The synthetic spot grid of the CPU tests (tests/ is not a package under importlib mode).
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_sigmma_test_model", Path(__file__).with_name("test_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.spot_levels(n_side=12, n_sec=2)


def test_bf16_training_on_gpu_lowers_loss_and_embeds():
    from sigmma_sc.model._core import (
        TrainConfig,
        embed_nodes,
        make_batcher,
        resolve_accelerator,
        train,
        unit_embeddings,
    )
    from sigmma_sc.model._data import ExpressionSource

    accelerator, devices, strategy, precision = resolve_accelerator("auto", 1)
    assert accelerator == "gpu" and precision in ("bf16-mixed", "16-mixed")
    levels, counts, _, _ = _spot_inputs()
    src = ExpressionSource.from_counts(counts, np.arange(counts.shape[1]), log_normalized=False)
    cfg = TrainConfig(max_epochs=6, batch_size=32, embed_dim=32, hidden_dim=64, devices=1)
    module, history, stats, _ = train(levels, src, cfg)
    assert history["train_loss"].iloc[-1] < 0.8 * history["train_loss"].iloc[0]
    module = module.cuda()
    nodes = embed_nodes(module, make_batcher(levels, cfg, src, stats), batch_size=32, expression=True)
    emb = unit_embeddings(nodes, levels, "meso", counts.shape[0])
    assert np.isfinite(emb["joint"]).all()
    np.testing.assert_allclose(np.linalg.norm(emb["joint"], axis=1), 1.0, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs several GPUs")
def test_ddp_over_all_gpus_gathers_negatives():
    from sigmma_sc.model._core import TrainConfig, resolve_accelerator, train
    from sigmma_sc.model._data import ExpressionSource

    _, devices, strategy, _ = resolve_accelerator("gpu", "auto")
    assert devices == torch.cuda.device_count() and strategy.startswith("ddp")
    levels, counts, _, _ = _spot_inputs()
    src = ExpressionSource.from_counts(counts, np.arange(counts.shape[1]), log_normalized=False)
    cfg = TrainConfig(max_epochs=3, batch_size=16, embed_dim=32, hidden_dim=64, devices="auto")
    module, history, _, _ = train(levels, src, cfg)
    assert np.isfinite(history["train_loss"]).all()
