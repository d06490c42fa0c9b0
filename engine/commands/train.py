"""``tickscore train``: train the risk model on a tick file of any shape."""

from __future__ import annotations

import json
from typing import Any

from engine.argtypes import TRAIN_CHUNK_HELP, add_input_arguments, add_max_rows_argument
from models.label import LabelSpec
from models.train import (
    DEFAULT_HIDDEN,
    DEFAULT_INPUT_CLIP,
    DEFAULT_TRAIN_SEED,
    SHAPE_LABELS,
    parse_hidden,
    train_file,
)
from replay.generator import default_data_path
from replay.mapping import mapping_from_cli
from replay.reader import resolve_shape


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    t = sub.add_parser(
        "train",
        help="train the risk model on a tick file; write fp32 and int8 QDQ ONNX models",
        description=(
            "Compute features with the live kernels in batch mode, label large moves, split by "
            "event time (train/validation/test 60/20/20 % with a gap of the label horizon), fit "
            "an MLP (or a logistic regression with --hidden 0), export ONNX: MODEL.onnx (fp32), "
            "MODEL.int8.onnx (static int8 QDQ calibrated on training rows) and MODEL.train.json."
        ),
    )
    t.add_argument("--data", help="Parquet/CSV tick file (default: the embedded dataset)")
    t.add_argument("--out", required=True, metavar="MODEL.onnx", help="fp32 model path")
    t.add_argument("--label-horizon-ms", type=float, default=None, metavar="H",
                   help="label horizon H in event-time ms (default by shape: l1 "
                        f"{SHAPE_LABELS['l1'].horizon_ms:g}, trades {SHAPE_LABELS['trades'].horizon_ms:g}, "
                        f"l3 {SHAPE_LABELS['l3'].horizon_ms:g})")
    t.add_argument("--label-k", type=float, default=None, metavar="K",
                   help="label threshold in sigma_H (default by shape: 2 for trades and l3, "
                        f"{SHAPE_LABELS['l1'].k:g} for l1)")
    t.add_argument("--hidden", default=",".join(map(str, DEFAULT_HIDDEN)),
                   help="hidden layer widths, e.g. 32,16; 0 = logistic regression (default %(default)s)")
    t.add_argument("--seed", type=int, default=DEFAULT_TRAIN_SEED, metavar="S",
                   help="training seed (default %(default)s)")
    t.add_argument("--input-clip", type=float, default=DEFAULT_INPUT_CLIP,
                   help="clip of the standardised input in std units; 0 = none (default %(default)g)")
    add_max_rows_argument(t)
    t.add_argument("--json", action="store_true", help="print the report JSON")

    add_input_arguments(t, TRAIN_CHUNK_HELP)  # as replay reads the file
    t.set_defaults(handler=cmd_train)


def cmd_train(args: Any) -> int:
    """Run ``tickscore train``."""
    mapping = mapping_from_cli(args.map, args.map_file, args.shape)
    shp = resolve_shape(args.data or default_data_path(), mapping, args.shape)  # once: train_file gets it
    label = None
    if args.label_horizon_ms is not None or args.label_k is not None:
        base = SHAPE_LABELS[shp]
        h = args.label_horizon_ms if args.label_horizon_ms is not None else base.horizon_ms
        label = LabelSpec(horizon_ms=h, k=args.label_k if args.label_k is not None else base.k)
    rep = train_file(
        args.data, args.out, label=label, hidden=parse_hidden(args.hidden), seed=args.seed,
        input_clip=args.input_clip or None, mapping=mapping, shape=shp,
        sort_by_exchange_time=args.sort_by_exchange_time, chunk_rows=args.chunk_rows,
        max_rows=args.max_rows or None,
    )
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    r = rep["train_range"]["rows"]
    smp = rep["sample"]
    kept = f"a uniform sample of {smp['kept']:,}: " if smp["sampled"] else ""
    print(f"tickscore train: {rep['rows']['generated']:,} events, usable {rep['rows']['usable']:,} "
          f"({kept}train {r['train']:,} / val {r['val']:,} / test {r['test']:,}), "
          f"positive rate {rep['positive_rate']['all_labelled']:.3f}")
    for q in ("fp32", "int8"):
        m = rep[q]["test"]
        print(f"  {q:<5} {rep['files'][q]}  version {rep[q]['version']}  test AUC {m['auc']:.4f}  "
              f"log-loss {m['log_loss']:.4f}  Brier {m['brier']:.4f}")
    print(f"  int8 vs fp32 on test: max |diff| {rep['int8']['max_abs_diff_vs_fp32']:.4f}, "
          f"mean {rep['int8']['mean_abs_diff_vs_fp32']:.5f}")
    print(f"  report {rep['files']['report']}  ({rep['timing_s']['total_s']:.1f}s)")
    return 0
