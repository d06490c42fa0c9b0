"""``tickscore generate``: a seeded synthetic market file."""

from __future__ import annotations

import argparse
import time

from engine.log import ProgressLine
from replay.generator import write_market
from replay.generator_l3 import write_l3, write_trades

_WRITERS = {"l1": write_market, "trades": write_trades, "l3": write_l3}


def register(sub) -> None:
    """Register the command's parser on the ``tickscore`` subparsers."""
    g = sub.add_parser(
        "generate", help="write a synthetic market data file (seeded, reproducible)",
        description="Write a seeded synthetic market in the normalised tick schema of an event shape "
        "(l1: quotes and trades; trades: trade prints only; l3: order-by-order book events): "
        "Parquet (.parquet), CSV (.csv) or gzip CSV (.csv.gz), by the --out suffix.",
    )
    g.add_argument("--shape", choices=tuple(_WRITERS), default="l1",
                   help="event shape: l1 quotes and trades, trade-only prints, or l3 order-by-order "
                        "book events (default %(default)s)")  # fmt: skip
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
    t0 = time.perf_counter()
    line = ProgressLine("generate", "events", max(int(args.events), 1))
    line.start(time.perf_counter_ns())
    try:
        path = _WRITERS[args.shape](args.out, args.events, symbols, args.seed,
                                    progress=lambda done: line.show(done, time.perf_counter_ns()))
    finally:
        line.finish()
    print(f"wrote {args.events:,} {args.shape} events for {len(symbols)} instruments to {path} "
          f"({path.stat().st_size / 1e6:,.1f} MB in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return 0
