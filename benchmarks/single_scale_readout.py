"""The ``single_scale`` baseline (single-scale CLIP, BLEEP-like) read out every way, on a kidney block.

``tl.evaluate`` reads ``single_scale`` out with SIGMMA's readout, so when the bins' default readout
changed (ridge -> blend) the landed ``single_scale`` figures (read with the ridge) stopped being a
matched comparison. This fits the baseline as ``tl.evaluate`` does (``tl._baselines.fit_single_scale``:
the SIGMMA model's genes and encoder, ``levels=("meso",)``, ``graph=False``, same seed and epochs) on
the block and seed of ``quality.py`` and scores it with the ridge, the blend and retrieval:

    python benchmarks/single_scale_readout.py --data ../shared/data/visiumhd_kidney --block 0 --seed 0 \
        --out benchmarks/results_kidney_block0_single_scale_readout.json

The SIGMMA model only supplies the genes and the encoder (the default gene rule on the training
bins), so it is fitted for one epoch. Writes ``{"protocol": {...}, "rows": {row: {metric: value}}}``;
rows ``single_scale_blend`` (the current default for bins), ``single_scale_ridge`` and
``single_scale_knn``.
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
from sigmma_sc.tl._baselines import fit_single_scale
from sigmma_sc.tl._readout import default_readout

METRICS = ("pcc_hvg50", "pcc_hvg50_det1", "pcc_heg50", "r5_img2expr", "r10_img2expr", "r10_expr2img")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quality.add_kidney_block_arguments(p)
    p.add_argument("--out", default="single_scale_readout.json")
    args = p.parse_args(argv)

    train, test = quality.kidney_block(args)
    t0 = time.perf_counter()
    genes_from = sg.tl.fit(train, seed=args.seed, max_epochs=1)
    base = fit_single_scale(genes_from, train, seed=args.seed, max_epochs=args.epochs)
    fit_s = time.perf_counter() - t0
    df = sg.tl.evaluate(
        base,
        test,
        train_sdata=train,
        baselines=(),
        seed=args.seed,
        readouts={"read_ridge": {"method": "ridge"}, "read_knn": {"method": "knn"}},
    )
    names = {"sigmma": "single_scale_blend", "read_ridge": "single_scale_ridge", "read_knn": "single_scale_knn"}
    out = {
        "protocol": {
            "command": " ".join(["benchmarks/single_scale_readout.py", *(argv if argv is not None else sys.argv[1:])]),
            "block": args.block,
            "seed": args.seed,
            "epochs": args.epochs,
            "technology": base.params.get("technology"),
            "default_readout": default_readout(str(base.params["unit_kind"]), technology=base.params.get("technology")),
            "n_genes": len(base.genes),
            "n_train": int(train.tables[Keys.TABLE].n_obs),
            "n_test": int(test.tables[Keys.TABLE].n_obs),
            "fit_seconds": round(fit_s, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "readouts": df.attrs.get("protocol", {}).get("readouts"),
        },
        "rows": {names[row]: {m: float(df.loc[row, m]) for m in METRICS} for row in df.index if row in names},
    }
    print(json.dumps(out["rows"], indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
