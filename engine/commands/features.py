"""``tickscore features``: the feature matrix of a whole file to Parquet."""

from __future__ import annotations

import argparse
import json

import replay.batch_features as _batch_features
from engine.argtypes import add_input_arguments
from replay.batch_features import compute_features
from replay.mapping import mapping_from_cli


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    f = sub.add_parser(
        "features",
        help="compute the feature matrix of a whole file (batch, same kernels as live) to Parquet",
        description=_batch_features.__doc__.split("\n\n")[0],
    )
    f.add_argument("--data", required=True, help="input file (Parquet / CSV / CSV.gz)")
    f.add_argument("--out", required=True, help="output .parquet file")
    f.add_argument("--feature-set", default=None, help="feature-set id or family (l1, trades, l3)")
    f.add_argument("--model", default=None, help="take the feature set from this model's metadata")
    f.add_argument("--threads", type=int, default=None, help="compute threads (default: usable cores)")
    f.add_argument("--drop-rejected", action="store_true", help="leave rejected events out of the output")
    f.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    f.add_argument("--json", action="store_true", help="print the run summary as JSON")
    add_input_arguments(f)
    f.set_defaults(chunk_rows_default=1_000_000)
    f.set_defaults(handler=cmd_features)


def cmd_features(args: argparse.Namespace) -> int:
    """Run ``tickscore features``; print a summary (or JSON)."""
    mapping = mapping_from_cli(args.map, args.map_file, args.shape)
    res = compute_features(
        args.data, args.out, feature_set=args.feature_set, model=args.model, mapping=mapping,
        shape=args.shape, sort_by_exchange_time=args.sort_by_exchange_time,
        chunk_rows=args.chunk_rows or 1_000_000, threads=args.threads,
        drop_rejected=args.drop_rejected, progress=not args.no_progress,
    )  # fmt: skip
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    rej = ", ".join(f"{k} {v:,}" for k, v in res["rejected_by_reason"].items()) or "none"
    an = ", ".join(f"{k} {v:,}" for k, v in res["anomalies"].items()) or "none"
    print(
        f"tickscore features: {res['data']} -> {res['out']}\n"
        f"  shape {res['shape']}, feature set {res['feature_set']} ({len(res['features'])} features)\n"
        f"  rows {res['rows']:,}  events {res['events']:,}  accepted {res['accepted']:,}  "
        f"written {res['written']:,}\n"
        f"  rejected: {rej}\n  anomalies: {an}\n"
        f"  {res['wall_s']:.2f} s wall ({res['events_per_s']:,.0f} events/s), kernels "
        f"{res['kernel_s']:.2f} s ({res['kernel_events_per_s']:,.0f} events/s, {res['threads']} thread(s))"
    )
    return 0
