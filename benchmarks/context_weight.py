"""The unit embedding's context weight on Visium HD bins: one fit, every weight read out of it.

``context_weight`` only scales the coarser levels' blocks when the units' embeddings are assembled
(``model._core.UnitEmbeddingWriter.finish``); training never sees it. So one fit per block and seed
serves every weight: the reference (training bins) and the test bins are embedded again with each
weight and scored by ``tl.evaluate`` as ``quality.py`` does (same blocks, buffer, cache and seed):

    python benchmarks/context_weight.py --data ../shared/data/visiumhd_kidney --block 0 --seed 0 \
        --weights 0,0.25,0.5,1 --out benchmarks/results_kidney_block0_context_weight.json

Writes ``{"protocol": {...}, "weights": {weight: {row: {metric: value}}}}`` after each weight, rows
``sigmma`` (the default readout), ``knn`` and ``blend``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import quality

import sigmma_sc as sg
from sigmma_sc._constants import Keys

METRICS = ("pcc_hvg50", "pcc_hvg50_det1", "pcc_heg50", "r5_img2expr", "r10_img2expr", "r10_expr2img")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_kidney_block_arguments(p)
    p.add_argument("--weights", default="0,0.25,0.5,1")
    p.add_argument("--out", default="context_weight.json")
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",") if w]
    if not weights or min(weights) < 0:
        raise SystemExit(f"--weights must be non-negative numbers, got {args.weights!r}.")

    train, test = quality.kidney_block(args)
    t0 = time.perf_counter()
    model = sg.tl.fit(train, seed=args.seed, max_epochs=args.epochs)
    out = {
        "protocol": {
            "command": " ".join(["benchmarks/context_weight.py", *(argv if argv is not None else sys.argv[1:])]),
            "block": args.block,
            "seed": args.seed,
            "epochs": args.epochs,
            "n_train": int(train.tables[Keys.TABLE].n_obs),
            "n_test": int(test.tables[Keys.TABLE].n_obs),
            "fit_seconds": round(time.perf_counter() - t0, 1),
        },
        "weights": {},
    }
    for weight in weights:
        t1 = time.perf_counter()
        model._config["context_weight"] = weight
        # The reference's embeddings are the training bins' at this weight, as a fit with it would store.
        emb = model.get_embeddings(train)
        for key, side in ((Keys.X_SIGMMA_IMG, "img"), (Keys.X_SIGMMA_EXPR, "expr"), (Keys.X_SIGMMA, "joint")):
            model.reference.obsm[key] = emb[side]
        df = sg.tl.evaluate(
            model,
            test,
            train_sdata=train,
            baselines=(),
            seed=args.seed,
            readouts={"knn": {"method": "knn"}, "blend": {"method": "blend"}},
        )
        out["weights"][str(weight)] = {row: {m: float(df.loc[row, m]) for m in METRICS} for row in df.index}
        print(f"weight {weight}: {round(time.perf_counter() - t1)} s", json.dumps(out["weights"][str(weight)]))
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
