"""``tickscore generate``: a seeded synthetic market file."""

from __future__ import annotations

import argparse

from replay.generator import write_market


def register(sub) -> None:
    """Register the command's parser on the ``tickscore`` subparsers."""
    g = sub.add_parser(
        "generate", help="write a synthetic market data file (seeded, reproducible)",
        description="Write a seeded synthetic L1 market (quotes and trades) in the normalised tick "
        "schema: Parquet (.parquet), CSV (.csv) or gzip CSV (.csv.gz), by the --out suffix.",
    )
    g.add_argument("--out", required=True, metavar="PATH",
                   help="output file: .parquet, .csv or .csv.gz (the suffix picks the format)")
    g.add_argument("--events", type=int, default=200_000, metavar="N",
                   help="events to generate, all instruments together (default %(default)s)")
    g.add_argument("--symbols", default="ESZ6,NQZ6,CLF7",
                   help="comma-separated instrument symbols (default %(default)s)")
    g.add_argument("--seed", type=int, default=1, metavar="S",
                   help="random seed: the same seed gives the same file (default %(default)s)")
    g.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    path = write_market(args.out, args.events, symbols, args.seed)
    print(f"wrote {args.events:,} events for {len(symbols)} instruments to {path}")
    return 0
