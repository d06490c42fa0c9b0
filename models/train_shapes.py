"""Train the default models of the trade-only and L3 event shapes.

A thin use of the one training pipeline of :mod:`models.train` (the one
``tickscore train --shape trades|l3`` runs on a user's file): features and
labels by :func:`models.dataset.dataset_from_ticks`, split, fit and export by
:func:`models.train.train_on_dataset`, on synthetic data of the shape
(:mod:`replay.generator_l3`) read back through :func:`replay.reader.read_ticks`.

Label: the large-move label of :mod:`models.label` ("the reference price moves
by more than k sigma_H within H ms"), where the reference price is

* ``trades``: the last trade price (bid = ask = trade price);
* ``l3``: the mid of the rebuilt book after the event (undefined while the book
  is one-sided).

The shipped files were built with::

    OMP_NUM_THREADS=1 python -m models.train_shapes --shape trades --out-dir models/default
    OMP_NUM_THREADS=1 python -m models.train_shapes --shape l3 --out-dir models/default

which write ``risk_<shape>_fp32.onnx``, ``risk_<shape>_int8.onnx`` and
``train_report_<shape>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from features.featureset import DEFAULT_BY_SHAPE
from models.dataset import dataset_from_ticks
from models.label import LabelSpec
from models.train import train_on_dataset
from replay.generator_l3 import write_l3, write_trades
from replay.reader import read_ticks

__all__ = ["build_shape_dataset", "train_shape", "main", "DEFAULTS"]

#: Per shape: generated events, data seed, label horizon (ms), label k.
DEFAULTS: dict[str, dict[str, Any]] = {
    "trades": {"events": 400_000, "seed": 7, "horizon_ms": 5_000.0, "k": 2.0, "hidden": (16, 8)},
    "l3": {"events": 1_500_000, "seed": 7, "horizon_ms": 500.0, "k": 2.0, "hidden": (16, 8)},
}


def _generate(shape: str, n_events: int, seed: int, path: Path) -> None:
    if shape == "l3":
        write_l3(path, n_events, seed=seed)
    else:
        write_trades(path, n_events, seed=seed)


def build_shape_dataset(shape: str, n_events: int, seed: int, label: Any):
    """Return ``(Dataset, timing, feature set)`` of a generated market of ``shape``.

    The generated file is read back and labelled by the one pipeline of every
    shape (:func:`models.dataset.dataset_from_ticks`).
    """
    fs = DEFAULT_BY_SHAPE[shape]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tickscore-train-") as tmp:
        path = Path(tmp) / f"{shape}.parquet"
        _generate(shape, n_events, seed, path)
        td = read_ticks(path, shape=shape)
    timing = {"generate_read_s": time.perf_counter() - t0}
    ds, t = dataset_from_ticks(td.ticks, tuple(td.symbols), label, fs)
    timing.update(t)
    return ds, timing, fs


def train_shape(shape: str, out_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Train and write the default model files of ``shape``; return the report."""
    cfg = {**DEFAULTS[shape], **{k: v for k, v in overrides.items() if v is not None}}
    label = LabelSpec(horizon_ms=float(cfg["horizon_ms"]), k=float(cfg["k"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ds, timing, fs = build_shape_dataset(shape, int(cfg["events"]), int(cfg["seed"]), label)
    gen = "replay.generator_l3.write_l3" if shape == "l3" else "replay.generator_l3.write_trades"
    report = train_on_dataset(
        ds, out_dir / f"risk_{shape}_fp32.onnx", out_dir / f"risk_{shape}_int8.onnx",
        data_info={"generator": gen, "data_seed": int(cfg["seed"]), "n_events": int(cfg["events"]),
                   "shape": shape},
        label=label, hidden=tuple(cfg["hidden"]), feature_set=fs, timing=timing,
    )  # fmt: skip
    report["timing_s"]["total_s"] = round(time.perf_counter() - t_start, 3)
    report = {
        "command": f"OMP_NUM_THREADS=1 python -m models.train_shapes --shape {shape} --out-dir {out_dir}",
        **report,
    }
    (out_dir / f"train_report_{shape}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m models.train_shapes``."""
    ap = argparse.ArgumentParser(prog="python -m models.train_shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(DEFAULTS), required=True)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "default")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--label-horizon-ms", type=float, default=None, dest="horizon_ms")
    ap.add_argument("--label-k", type=float, default=None, dest="k")
    args = ap.parse_args(argv)
    rep = train_shape(args.shape, args.out_dir, events=args.events, seed=args.seed,
                      horizon_ms=args.horizon_ms, k=args.k)  # fmt: skip
    keys = ("positive_rate", "fp32", "int8")
    print(json.dumps({k: rep.get(k) for k in keys if k in rep}, indent=2, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
