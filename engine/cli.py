"""``tickscore`` command line: replay, generate (and more as they land).

Errors a user can fix (missing file, bad model, bad flag value) end with a one-line
message and exit code 2, never a traceback; ``--debug`` shows the traceback.

This module is the top layer (``pyproject.toml``, import-linter contract): it
imports every command's module, and nothing imports it.  Those imports sit in
the functions on purpose (deferred): a command loads only its own modules and
their dependencies (numba kernels, onnxruntime, polars, matplotlib, pyaeron).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib.metadata import PackageNotFoundError, version

from engine.argtypes import non_negative_int as _non_negative_int
from engine.argtypes import pin as _pin
from engine.argtypes import speed as _speed

__all__ = ["main", "build_parser"]


def _reload_at(text: str):
    seq, sep, path = text.partition("=")
    try:
        if not sep or not path:
            raise ValueError
        return int(seq), path
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reload-at takes SEQ=MODEL.onnx, got {text!r}") from None


def _version() -> str:
    try:
        return version("tickscore")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``tickscore`` command."""
    p = argparse.ArgumentParser(
        prog="tickscore",
        description="Low-latency per-tick risk scoring: replay, serve, train, report.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="version", version=f"tickscore {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "replay",
        help="replay historical ticks through the hot path and report tick-to-decision latency",
        description=(
            "Replay a file (default: the embedded dataset) through features + model, publish "
            "every score on ZeroMQ, and print the tick-to-decision latency percentiles."
        ),
    )
    r.add_argument("--data", help="Parquet/CSV file in the normalised tick schema (default: embedded)")
    r.add_argument("--model", help="ONNX model file (default: the shipped int8 model)")
    r.add_argument(
        "--backend", default="auto", choices=["auto", "ort", "fused"],
        help="model runtime: fused (numba, features + model in one call; checked against ort "
        "first), ort (onnxruntime), auto = fused when supported and parity passes, else ort "
        "(default auto)",
    )
    r.add_argument(
        "--reload-at", action="append", default=[], type=_reload_at, metavar="SEQ=MODEL",
        help="hot-reload MODEL once SEQ scores were published (repeatable)",
    )
    r.add_argument(
        "--watch-model", metavar="PATH",
        help="hot-reload PATH whenever it changes (replace it atomically, e.g. mv)",
    )
    r.add_argument(
        "--speed", type=_speed, default=None, metavar="max|1|N",
        help="'max' (default) = as fast as possible; N = N x recorded speed",
    )
    r.add_argument(
        "--pin", type=_pin, default=1, metavar="CORE",
        help="core for the hot loop (default 1; 'none' to leave unpinned)",
    )
    r.add_argument(
        "--publish", default=None, metavar="ENDPOINT",
        help="ZeroMQ PUB endpoint to bind, e.g. ipc:///tmp/x.ipc or tcp://127.0.0.1:5556 "
        "(default ipc:///tmp/tickscore-replay-scores.ipc, apart from the service's; 'none' to "
        "measure without a socket)",
    )
    r.add_argument(
        "--rt-priority", type=int, default=None, metavar="1-99",
        help="run the hot loop SCHED_FIFO at this priority (needs privilege; refusal is reported)",
    )
    r.add_argument("--out", metavar="DIR", help="write summary.json, latency.hgrm, latency.png here")
    r.add_argument("--warmup-ticks", type=int, default=1000, help="first N latencies excluded (default 1000)")
    r.add_argument(
        "--idle", default="busy-spin", choices=["busy-spin", "yield", "backoff", "sleep"],
        help="idle strategy while waiting for the next paced tick (default busy-spin)",
    )
    r.add_argument(
        "--keep-warm-us", type=_non_negative_int, default=100, metavar="US",
        help="while waiting, run a synthetic tick through features + model on throwaway state "
        "every US microseconds so the next real tick is not slowed by a cold path (0 = off; "
        "default 100; the spawned service of --via gets the same)",
    )
    r.add_argument(
        "--wait-subscribers", type=int, default=0, metavar="N", help="wait for N subscribers first"
    )
    r.add_argument(
        "--wait-timeout", type=float, default=10.0, metavar="S", help="seconds to wait (default 10)"
    )
    r.add_argument("--hwm", type=int, default=100_000, help="per-subscriber queue bound in messages")
    r.add_argument("--limit", type=int, default=None, metavar="N",
                   help="replay only the file's first N rows (ticks, rejects and scores count those rows)")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    r.add_argument("--json", action="store_true", help="print the summary JSON instead of the table")
    r.add_argument("--record-scores", action="store_true",
                   help="also write OUT/scores.parquet: every score (seq, instrument, ts_event_ns, score, "
                        "flags, model_version); in wire mode, as the subscriber received them (needs --out)")

    from replay.report import add_report_parser

    add_report_parser(sub)

    from replay.features_cli import add_features_parser
    from replay.mapping import add_input_arguments

    add_input_arguments(r)  # --map, --map-file, --shape, --sort-by-exchange-time, --chunk-rows
    add_features_parser(sub)

    from engine.service import add_serve_parser  # serve, control
    from engine.subscribe import add_subscribe_parser
    from replay.publish import add_publish_parser
    from replay.wire_mode import add_wire_arguments

    add_serve_parser(sub)
    add_subscribe_parser(sub)
    add_publish_parser(sub)
    add_wire_arguments(r)

    from models.train import add_train_parser

    add_train_parser(sub)

    from models.evaluate import add_evaluate_parser

    add_evaluate_parser(sub)

    from models.adopt import add_adopt_parser

    add_adopt_parser(sub)

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
    return p


def _mapping(args: argparse.Namespace):
    from replay.mapping import mapping_from_cli

    return mapping_from_cli(args.map, args.map_file, args.shape)


def _cmd_replay(args: argparse.Namespace) -> int:
    if getattr(args, "via", None):  # wire mode: publisher + service + subscriber processes
        from replay.wire_mode import cmd_replay_wire

        return cmd_replay_wire(args)
    from engine.zmq_io import DEFAULT_PUBLISH_ENDPOINT
    from replay.run import ReplayOptions, run_inprocess

    opts = ReplayOptions(
        data=args.data,
        model=args.model,
        speed=args.speed,
        pin=args.pin,
        publish=args.publish or DEFAULT_PUBLISH_ENDPOINT,
        out=args.out,
        backend=args.backend,
        warmup_ticks=args.warmup_ticks,
        idle=args.idle,
        keep_warm_us=args.keep_warm_us,
        wait_subscribers=args.wait_subscribers,
        wait_timeout_s=args.wait_timeout,
        sndhwm=args.hwm,
        progress=not args.no_progress,
        limit=args.limit,
        rt_priority=args.rt_priority,
        reload_at=args.reload_at,
        watch_model=args.watch_model,
        shape=args.shape,
        mapping=_mapping(args),
        sort_by_exchange_time=args.sort_by_exchange_time,
        chunk_rows=args.chunk_rows,
        record_scores=args.record_scores,
    )
    if args.record_scores and not args.out:
        raise ValueError("--record-scores writes OUT/scores.parquet: give --out DIR")
    res = run_inprocess(opts)
    s = res.summary
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(
        f"tickscore replay: {s['data']['path']}\n"
        f"  model {s['model']['version']} ({s['model']['quantization']}, backend {s['backend']}), "
        f"{s['pin']}, {s['scheduler']}, publish {s['publish']}\n"
        f"  ticks {s['ticks']:,}  scores {s['scores']:,}  rejected {s['rejected']:,}  "
        f"dropped {s['dropped']:,}  wall {s['wall_s']:.2f}s  "
        f"(first {s['warmup_ticks_excluded']:,} latencies excluded as warm-up)"
    )
    for t in s.get("reloads", []):
        print(f"  reload {t['path']}: {t['status']} at seq {t['swap_seq']} -> {t['version']}"
              f" ({t['backend']}) {t['message']}")
    if s["rejected_by_reason"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["rejected_by_reason"].items())
        print(f"  rejected by reason: {reasons}")
    print()
    print(res.table())
    if res.out_files:
        print()
        for name, path in res.out_files.items():
            print(f"  {name:<8} {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from replay.generator import write_market

    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    path = write_market(args.out, args.events, symbols, args.seed)
    print(f"wrote {args.events:,} events for {len(symbols)} instruments to {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from replay.report import cmd_report

    return cmd_report(args)


def _lazy(module: str, func: str):
    """Return a command that imports ``module.func`` only when it runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return run


_COMMANDS = {
    "replay": _cmd_replay,
    "generate": _cmd_generate,
    "report": _cmd_report,
    "features": _lazy("replay.features_cli", "cmd_features"),
    "serve": _lazy("engine.service", "cmd_serve"),
    "control": _lazy("engine.service", "cmd_control"),
    "subscribe": _lazy("engine.subscribe", "cmd_subscribe"),
    "publish": _lazy("replay.publish", "cmd_publish"),
    "train": _lazy("models.train", "cmd_train"),
    "evaluate": _lazy("models.evaluate", "cmd_evaluate"),
    "adopt": _lazy("models.adopt", "cmd_adopt"),
}


#: commands that compile numba kernels on a first run (they say so when it takes long)
_COMPILING = frozenset({"replay", "features", "serve", "train", "evaluate", "generate", "adopt"})


def main(argv: list[str] | None = None) -> int:
    """Run the ``tickscore`` command; return the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command in _COMPILING:
            from features.compile_notice import compile_notice

            with compile_notice(f"tickscore {args.command}"):
                return _COMMANDS[args.command](args)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("tickscore: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"tickscore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        name = type(exc).__name__
        if name in ("ModelError",):
            print(f"tickscore {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
