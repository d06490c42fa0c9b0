"""``tickscore evaluate``: models side by side on the held-out test period."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import models.evaluate as _evaluate_module
from engine.argtypes import TRAIN_CHUNK_HELP, add_input_arguments, add_max_rows_argument
from models.evaluate import evaluate, format_table, plot
from models.label import LabelSpec
from replay.mapping import mapping_from_cli


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    e = sub.add_parser(
        "evaluate",
        help="compare models on the held-out test period: AUC, log-loss, Brier, calibration, latency",
        description=_evaluate_module.__doc__.split("\n", 2)[2].strip().replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("models", nargs="+", metavar="MODEL.onnx", help="model files to compare (fp32 and int8)")
    e.add_argument("--data", help="Parquet/CSV tick file (default: the embedded dataset)")
    e.add_argument("--out", metavar="DIR", help="write evaluation.json and evaluation.png here")
    e.add_argument("--latency-calls", type=int, default=20_000, help="timed calls per backend")
    e.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    e.add_argument("--label-horizon-ms", type=float, default=None, metavar="H",
                   help="the label of models whose metadata has none (adopted models): a move within H ms")
    e.add_argument("--label-k", type=float, default=None, metavar="K", help="... of more than K sigma_H")

    add_input_arguments(e, TRAIN_CHUNK_HELP)  # as replay reads the file

    add_max_rows_argument(e)
    e.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: Any) -> int:
    """Run ``tickscore evaluate``."""
    if (args.label_horizon_ms is None) != (args.label_k is None):
        raise ValueError("give both --label-horizon-ms and --label-k, or neither")
    label = None if args.label_k is None else LabelSpec(horizon_ms=args.label_horizon_ms, k=args.label_k)
    res = evaluate(args.data, args.models, latency_calls=args.latency_calls,
                   mapping=mapping_from_cli(args.map, args.map_file, args.shape), shape=args.shape,
                   sort_by_exchange_time=args.sort_by_exchange_time, label=label,
                   chunk_rows=args.chunk_rows, max_rows=args.max_rows)  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(res, indent=2) + "\n")
        plot(res, out / "evaluation.png")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    d = res["data"]
    print(f"tickscore evaluate: {d['path']} ({d['rows']:,} rows), test period = last 20 % of event time")
    print()
    print(format_table(res))
    if args.out:
        print(f"\n  wrote {Path(args.out) / 'evaluation.json'} and {Path(args.out) / 'evaluation.png'}")
    return 0
