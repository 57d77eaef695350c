"""Seconds and peak memory of every pipeline stage as the slide grows (synthetic cells, one CPU process per stage).

Run::

    OPENBLAS_NUM_THREADS=1 python benchmarks/scale.py --cells 10000,100000 --feature-cells 10000,30000 \
        --slide-px 10000,30000 --nearest 20000x1000000x128 --out benchmarks/results_scale.json

Stages, each measured in a fresh subprocess (so peaks never mix); the slide is ``sg.datasets.synthetic(N)``
(0.5 µm/px, its image a lazy pyramid drawn tile by tile on read):

- ``hierarchy``: ``pp.build_hierarchy`` (unit graph, niches, regions);
- ``features``: ``pp.image_features`` with the default encoder (dense maps on the CPU), the hierarchy
  restored from the ``hierarchy`` stage (``--feature-cells``: the sizes, default ``--cells``);
- ``epoch``: one training epoch at array level (``model._core.train`` with ``max_epochs=1``: the
  epoch, its validation pass and the initial losses; no embedding pass) on precomputed features;
- ``inference``: ``Sigmma.get_embeddings`` (image and expression side, every unit) of a model
  trained once on 300 cells; ``output_mb`` is the size of the embeddings it returns;
- ``slide_features`` (``--slide-px``): ``pp.image_features`` on a synthetic slide of that many pixels a
  side at 0.25 µm/px of which the table keeps 9 units on a 3 x 3 grid spread over the tissue (the
  same encoder work at every size: only the slide grows);
- ``--real kidney``: the whole pipeline on the Visium HD kidney (165,184 bins) in one process,
  each step timed with its own peak: ``kidney_hierarchy`` (``pp.build_hierarchy``),
  ``kidney_features`` (``pp.image_features``, default encoder), ``kidney_fit`` (``tl.fit``,
  ``--real-epochs`` epochs, embeddings of every bin written); ``kidney_pipeline`` holds the
  process's peak RSS (loading included) and ``output_mb``, the embeddings' size;
- ``nearest`` (``--nearest QxGxD``): ``tl._retrieve.nearest`` (k = 10) of Q random queries against a
  G-row gallery of dimension D (float32 inputs).

The epoch and inference stages read seeded random "precomputed" image features of the default
encoder's shape (1,280 channels per level) under the encoder's cache key: their cost does not
depend on the feature values, and the real encoder would take ~15 min per 100k cells here.

Features stages also record ``encoder_seconds``, the time inside the encoder's forward passes, and
``seconds_over_encoder``, the stage's wall time over it (the bar: at most 2x; the rest is reading,
cutting and pooling). ``seconds`` is the stage's wall time; ``peak_rss_mb`` the process's resident-set high-water mark
during the stage (``VmHWM``, reset by ``/proc/self/clear_refs`` after the setup: it includes what the
setup left resident, ``base_rss_mb``); ``process_peak_rss_mb`` the whole subprocess's (setup
included, from ``wait4``). Every run records the machine's load average: timings on a shared
machine are noisy. The JSON is rewritten after every stage, with growth ratios between sizes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("hierarchy", "features", "epoch", "inference")
SEED = 0
N_GENES = 200
TRAIN_CELLS = 300  # the model embedded by the inference stage is trained once on this many cells
UNITS_PER_SLIDE_SIDE = 3  # slide_features: a 3 x 3 grid of units over the tissue
SLIDE_MPP = 0.25
K_NEAREST = 10
# Imported during the setup of every stage: squidpy alone takes ~10 s, which would swamp small sizes.
_HEAVY = ("squidpy", "torch", "lightning", "timm", "torch_geometric")


# ---------------------------------------------------------------------------------------------
# memory helpers (Linux)
# ---------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# stage bodies (run inside the child process)
# ---------------------------------------------------------------------------------------------
def _quiet() -> None:
    import sigmma_sc as sg

    sg.settings.progress_bar = False
    sg.settings.verbosity = 1


def _slide(n_cells: int):
    import sigmma_sc as sg

    return sg.datasets.synthetic(n_cells, n_genes=N_GENES, seed=SEED)


def _restore_hierarchy(sdata, work: Path, n_cells: int) -> None:
    """Put the hierarchy of the ``hierarchy`` stage back into the table (built now when it is missing)."""
    import sigmma_sc as sg
    from sigmma_sc._constants import Keys

    path = work / f"hierarchy_{n_cells}.pkl"
    if path.exists():
        with open(path, "rb") as fh:
            saved = pickle.load(fh)
        table = sdata[Keys.TABLE]
        table.uns.setdefault(Keys.UNS, {})[Keys.HIERARCHY] = saved["uns"]
        for key, value in saved["obsp"].items():
            table.obsp[key] = value
        table.uns.update(saved["uns_graph"])
        sg.pp.get_hierarchy(sdata)  # refuses a hierarchy of other units
    else:
        sg.pp.build_hierarchy(sdata)


def _inject_features(sdata, work: Path) -> str:
    """Seeded random float32 features of the default encoder's shape under its cache key."""
    import sigmma_sc as sg
    from sigmma_sc._constants import Keys

    meta = json.loads((work / "feature_key.json").read_text())
    hier = sg.pp.get_hierarchy(sdata)
    rng = np.random.default_rng(SEED)
    feats = {
        lv: rng.standard_normal((len(hier.levels[lv].centers_um), meta["dims"][lv]), dtype=np.float32)
        for lv in meta["dims"]
        if lv in hier.levels
    }
    root = sdata[Keys.TABLE].uns.setdefault(Keys.UNS, {})
    root.setdefault(Keys.FEATURES, {})[meta["key"]] = feats
    root[Keys.FEATURES_LATEST] = meta["key"]
    return meta["key"]


def _prepare(work: Path) -> dict:
    """Once: the default encoder's cache key and feature sizes, and a model for the inference stage."""
    import sigmma_sc as sg

    sdata = _slide(TRAIN_CELLS)
    key = sg.pp.image_features(sdata)
    feats = sg.pp.get_features(sdata, key=key)
    (work / "feature_key.json").write_text(
        json.dumps({"key": key.id, "dims": {lv: int(f.shape[1]) for lv, f in feats.items()}})
    )
    config = sg.model.TrainConfig(max_epochs=1, seed=SEED)
    model, _ = sg.Sigmma.train(sdata, config=config)
    model.save(work / "model")
    return {"feature_key": key.id}


def _stage(stage: str, size: int, work: Path, extra: dict) -> dict:
    """Set up (untimed), reset the peak, run the stage (timed); return its measurements."""
    import sigmma_sc as sg
    from sigmma_sc._constants import Defaults, Keys

    out: dict = {}
    if stage == "hierarchy":
        sdata = _slide(size)
        uns_before = set(sdata[Keys.TABLE].uns)

        def run():
            sg.pp.build_hierarchy(sdata)

    elif stage == "features":
        sdata = _slide(size)
        _restore_hierarchy(sdata, work, size)

        def run():
            sg.pp.image_features(sdata)

    elif stage == "slide_features":
        sdata, info = _big_slide(size)
        out.update(info)
        sg.pp.build_hierarchy(sdata)

        def run():
            sg.pp.image_features(sdata)

    elif stage == "epoch":
        from sigmma_sc.model import TrainConfig
        from sigmma_sc.model._core import train
        from sigmma_sc.model._data import ExpressionSource
        from sigmma_sc.model._inputs import (
            default_min_detected,
            expression_matrix,
            feature_stats,
            level_inputs,
            model_genes,
            slide_features,
        )

        sdata = _slide(size)
        _restore_hierarchy(sdata, work, size)
        _inject_features(sdata, work)
        config = TrainConfig(max_epochs=1, seed=SEED)
        # What Sigmma.train does before training (model/_sigmma.py), with the default genes.
        slide, hier, feats, _ = slide_features(
            sdata, table_key=Keys.TABLE, levels=config.levels, encoder=Defaults.ENCODER
        )
        matrix = expression_matrix(slide)
        min_detected = default_min_detected(matrix)
        genes = model_genes(slide, matrix, n_genes=Defaults.N_GENES, min_detected=min_detected)
        expression = ExpressionSource.from_counts(
            matrix, slide.table.var_names.get_indexer(genes), log_normalized=slide.log_normalized
        )
        config.levels = tuple(lv for lv in config.levels if lv in hier.levels)
        f_stats = {lv: feature_stats(feats[lv]) for lv in config.levels if lv in feats}
        levels = level_inputs(hier, feats, f_stats, feature_norm=Defaults.FEATURE_NORM)
        del feats

        def run():
            _, history, _, fit_s = train(levels, expression, config)
            out["fit_seconds"] = round(float(fit_s), 2)
            out["epochs"] = int(history["epoch"].max())
            out["n_niches"] = int(levels["meso"].n)

    elif stage == "inference":
        sdata = _slide(size)
        _restore_hierarchy(sdata, work, size)
        _inject_features(sdata, work)
        model = sg.Sigmma.load(work / "model")

        def run():
            emb = model.get_embeddings(sdata)
            out["output_mb"] = round(sum(v.nbytes for v in emb.values() if v is not None) / 2**20, 1)
            out["outputs"] = {k: list(v.shape) for k, v in emb.items() if v is not None}

    elif stage == "nearest":
        from sigmma_sc.tl._retrieve import nearest

        n_q, n_g, dim = extra["queries"], extra["gallery"], extra["dim"]
        rng = np.random.default_rng(SEED)
        queries = rng.standard_normal((n_q, dim), dtype=np.float32)
        gallery = rng.standard_normal((n_g, dim), dtype=np.float32)
        out.update(
            queries=n_q, gallery=n_g, dim=dim, k=K_NEAREST, input_mb=round((queries.nbytes + gallery.nbytes) / 2**20, 1)
        )

        def run():
            import tracemalloc

            tracemalloc.start()
            idx, _ = nearest(queries, gallery, K_NEAREST)
            out["traced_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            tracemalloc.stop()
            out["output_shape"] = list(idx.shape)

    else:
        raise ValueError(stage)
    if stage != "nearest":  # imports paid once per process stay out of the timed part
        for lib in _HEAVY:
            try:
                importlib.import_module(lib)
            except ImportError:
                pass
    gc.collect()
    out["base_rss_mb"] = round(_status_mb("VmRSS"), 1)
    out["peak_reset"] = _reset_peak()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with _EncoderClock() as clock:
        run()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if stage in ("features", "slide_features"):
        clock.record(out, out["seconds"])
    out["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
    out["load_avg_1m"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    out["table_units"] = int(sdata[Keys.TABLE].n_obs) if stage != "nearest" else None
    if stage == "hierarchy":  # later stages of this size restore it instead of rebuilding
        table = sdata[Keys.TABLE]
        with open(work / f"hierarchy_{size}.pkl", "wb") as fh:
            pickle.dump(
                {
                    "uns": table.uns[Keys.UNS][Keys.HIERARCHY],
                    "uns_graph": {k: table.uns[k] for k in set(table.uns) - uns_before - {Keys.UNS}},
                    "obsp": {k: table.obsp[k] for k in table.obsp.keys()},
                },
                fh,
            )
    return out


def _big_slide(px: int):
    """A synthetic slide about ``px`` pixels a side at 0.25 µm/px whose table keeps a 3 x 3 grid of units."""
    import sigmma_sc as sg
    from sigmma_sc._constants import Keys

    # The tissue of synthetic(10,000) is ~1,330 µm a side; its side grows with sqrt(cells).
    n_cells = int(np.ceil(10_000 * (px * SLIDE_MPP / 1330.0) ** 2))
    sdata = sg.datasets.synthetic(n_cells, n_genes=20, seed=SEED, mpp=SLIDE_MPP)
    table = sdata[Keys.TABLE]
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    steps = (np.arange(UNITS_PER_SLIDE_SIDE) + 0.5) / UNITS_PER_SLIDE_SIDE
    targets = np.array([[lo[0] + fx * (hi[0] - lo[0]), lo[1] + fy * (hi[1] - lo[1])] for fy in steps for fx in steps])
    pick = np.unique([int(np.argmin(((xy - t) ** 2).sum(axis=1))) for t in targets])
    sdata.tables[Keys.TABLE] = table[pick].copy()
    image = next(iter(sdata.images.values()))
    shape = image["scale0"]["image"].shape if hasattr(image, "keys") else image.shape
    return sdata, {"slide_cells_drawn": n_cells, "image_px": [int(shape[-2]), int(shape[-1])], "units": len(pick)}


class _EncoderClock:
    """Seconds spent inside the encoder's forward passes (``Encoder.encode_map`` / ``encode``) while active.

    The rest of a features stage is reading, cutting, stain handling and pooling: the bar asks the
    whole stage to stay within 2x of the encoder's own time on the same tiles.
    """

    def __enter__(self) -> _EncoderClock:
        from sigmma_sc.pp._encoders import Encoder

        self.seconds, self.calls, self._saved = 0.0, 0, {}
        for name in ("encode_map", "encode"):
            original = getattr(Encoder, name)
            self._saved[name] = original

            def timed(enc, images, _original=original):
                t0 = time.perf_counter()
                try:
                    return _original(enc, images)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            setattr(Encoder, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        from sigmma_sc.pp._encoders import Encoder

        for name, original in self._saved.items():
            setattr(Encoder, name, original)

    def record(self, out: dict, seconds: float) -> None:
        out["encoder_seconds"] = round(self.seconds, 2)
        out["encoder_calls"] = self.calls
        out["seconds_over_encoder"] = round(seconds / self.seconds, 3) if self.seconds else None


def _real(name: str, extra: dict) -> dict:
    """The whole pipeline on a real slide, step by step in one process: each step's time and peak RSS."""
    import sigmma_sc as sg
    from sigmma_sc._constants import Keys

    if name != "kidney":
        raise ValueError(f"--real {name!r}: only 'kidney' (the Visium HD kidney, 165k bins) is available.")
    for lib in _HEAVY:
        try:
            importlib.import_module(lib)
        except ImportError:
            pass
    sdata = sg.datasets.visium_hd_kidney(extra.get("data"))
    table = sdata[Keys.TABLE]
    steps = {
        "hierarchy": lambda: sg.pp.build_hierarchy(sdata),
        "features": lambda: sg.pp.image_features(sdata),
        # tl.fit trains and writes the embeddings of every unit (X_sigmma, _img, _expr) into obsm.
        "fit": lambda: sg.tl.fit(sdata, max_epochs=int(extra["epochs"]), seed=SEED),
    }
    out: dict = {"cells": int(table.n_obs), "genes": int(table.n_vars), "steps": {}}
    for step, run in steps.items():
        gc.collect()
        row = {"base_rss_mb": round(_status_mb("VmRSS"), 1), "peak_reset": _reset_peak()}
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        with _EncoderClock() as clock:
            run()
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if step == "features":
            clock.record(row, row["seconds"])
        row["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
        row["load_avg_1m"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
        out["steps"][step] = row
    out["output_mb"] = round(sum(v.nbytes for k, v in table.obsm.items() if k.startswith("X_sigmma")) / 2**20, 1)
    return out


def _child(args) -> None:
    work = Path(args.work)
    _quiet()
    if args.child == "prepare":
        res = _prepare(work)
    elif args.child.startswith("real_"):
        res = _real(args.child[len("real_") :], json.loads(args.extra or "{}"))
    else:
        res = _stage(args.child, args.size, work, json.loads(args.extra or "{}"))
    Path(args.result).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def _spawn(kind: str, size: int, work: Path, extra: dict | None = None, timeout: float | None = None) -> dict:
    result = work / f"result_{kind}_{size}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--size", str(size), "--work", str(work), "--result", str(result)]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    try:
        if timeout is not None:
            deadline = t0 + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.5)
        else:
            pid, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = {
        "process_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "process_seconds": round(time.perf_counter() - t0, 1),
    }
    if proc.returncode == 0 and result.exists():
        res.update(json.loads(result.read_text()))
    else:
        res["error"] = f"exit status {proc.returncode}" + (
            " (timeout)" if timeout and res["process_seconds"] >= timeout else ""
        )
    return res


def growth(runs: list[dict]) -> list[dict]:
    """Ratios between consecutive sizes of each stage: size, time and peak RSS."""
    out = []
    by_stage: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r and r.get("seconds") is not None:
            by_stage.setdefault(r["stage"], []).append(r)
    for stage, rs in by_stage.items():
        size_key = "slide_px" if stage == "slide_features" else ("gallery" if stage == "nearest" else "cells")
        rs = sorted(rs, key=lambda r: r[size_key])
        for a, b in zip(rs, rs[1:], strict=False):
            size_ratio = b[size_key] / a[size_key]
            if stage == "slide_features":
                size_ratio = size_ratio**2  # pixels
            row = {
                "stage": stage,
                "from": a[size_key],
                "to": b[size_key],
                "size_ratio": round(size_ratio, 3),
                "time_ratio": round(b["seconds"] / a["seconds"], 3),
                "peak_rss_ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3),
                "above_base_ratio": round(
                    (b["peak_rss_mb"] - b["base_rss_mb"]) / max(a["peak_rss_mb"] - a["base_rss_mb"], 1.0), 3
                ),
                "time_linear": bool(b["seconds"] / a["seconds"] <= 1.1 * size_ratio),
            }
            if "output_mb" in a:
                row["peak_above_output_ratio"] = round(
                    (b["peak_rss_mb"] - b["output_mb"]) / (a["peak_rss_mb"] - a["output_mb"]), 3
                )
            out.append(row)
    return out


def _ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()] if text else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", default="10000,100000", help="slide sizes in cells (comma-separated; 1000000 is accepted)"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {STAGES}")
    parser.add_argument("--feature-cells", default=None, help="sizes of the features stage (default: --cells)")
    parser.add_argument("--slide-px", default="", help="slide_features: slide sides in pixels at 0.25 um/px")
    parser.add_argument("--nearest", default="", help="QxGxD: nearest() of Q queries against G gallery rows of dim D")
    parser.add_argument("--real", default="", help="whole pipeline on a real slide: 'kidney' (165k Visium HD bins)")
    parser.add_argument("--real-epochs", type=int, default=10, help="--real: training epochs")
    parser.add_argument("--data", default=None, help="--real: the data folder (default: the datasets' search path)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per stage before it is stopped")
    parser.add_argument("--out", default=None, help="JSON written after every stage")
    parser.add_argument("--work", default=None, help="folder for the model and hierarchies shared by stages")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return {}

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="sigmma_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    cells = _ints(args.cells)
    feature_cells = _ints(args.feature_cells) if args.feature_cells is not None else cells
    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "size", "result", "extra")},
        "runs": [],
    }

    def save() -> None:
        res["growth"] = growth(res["runs"])
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")

    def record(stage: str, size_fields: dict, meas: dict) -> None:
        row = {
            **size_fields,
            "stage": stage,
            "seconds": meas.pop("seconds", None),
            "peak_rss_mb": meas.pop("peak_rss_mb", None),
        }
        row.update(meas)
        res["runs"].append(row)
        err = f"  ERROR {row['error']}" if "error" in row else ""
        print(
            f"{stage:<15s} {json.dumps(size_fields):<28s} {row['seconds']} s, peak RSS {row['peak_rss_mb']} MB "
            f"(base {row.get('base_rss_mb')} MB, process {row.get('process_peak_rss_mb')} MB), load {row.get('load_avg_1m')}{err}",
            flush=True,
        )
        save()

    if {"features", "epoch", "inference"} & set(stages) or args.slide_px:
        if not (work / "model").exists() or not (work / "feature_key.json").exists():
            t0 = time.perf_counter()
            prep = _spawn("prepare", 0, work)
            res["prepare"] = {**prep, "seconds": round(time.perf_counter() - t0, 1)}
            print(f"prepared the feature key and the model in {res['prepare']['seconds']} s", flush=True)
            if "error" in prep:
                save()
                raise SystemExit(f"preparation failed: {prep['error']}")
    for n in cells:
        for stage in stages:
            sizes = feature_cells if stage == "features" else cells
            if n not in sizes:
                continue
            record(stage, {"cells": n}, _spawn(stage, n, work, timeout=args.timeout))
    for n in feature_cells:  # feature sizes that are not slide sizes
        if "features" in stages and n not in cells:
            if "hierarchy" in stages:
                record("hierarchy", {"cells": n}, _spawn("hierarchy", n, work, timeout=args.timeout))
            record("features", {"cells": n}, _spawn("features", n, work, timeout=args.timeout))
    for px in _ints(args.slide_px):
        record("slide_features", {"slide_px": px}, _spawn("slide_features", px, work, timeout=args.timeout))
    if args.nearest:
        q, g, d = (int(float(x)) for x in args.nearest.lower().split("x"))
        extra = {"queries": q, "gallery": g, "dim": d}
        record("nearest", {"gallery": g}, _spawn("nearest", g, work, extra=extra, timeout=args.timeout))
    for name in [n for n in args.real.split(",") if n]:
        extra = {"data": args.data, "epochs": args.real_epochs}
        meas = _spawn(f"real_{name}", 0, work, extra=extra, timeout=args.timeout)
        if "error" in meas:
            record(f"{name}_pipeline", {"cells": 0}, meas)
            continue
        for step, row in meas.pop("steps").items():
            record(f"{name}_{step}", {"cells": meas["cells"]}, row)
        whole = {"seconds": round(sum(r["seconds"] for r in res["runs"][-3:]), 2), **meas}
        whole["peak_rss_mb"] = whole["process_peak_rss_mb"]
        record(f"{name}_pipeline", {"cells": meas["cells"]}, whole)
    res["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    return res


if __name__ == "__main__":
    main()
