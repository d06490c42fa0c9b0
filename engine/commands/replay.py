"""``tickscore replay``: in-process replay, or through a live service with ``--via zmq|aeron``."""

from __future__ import annotations

import argparse
import json
import sys

from engine.argtypes import add_client_key_arguments, add_input_arguments
from engine.argtypes import non_negative_int as _non_negative_int
from engine.argtypes import pin as _pin
from engine.argtypes import positive_int as _positive_int
from engine.argtypes import speed as _speed
from engine.config import SCORE_STREAM_ID
from engine.zmq_io import DEFAULT_PUBLISH_ENDPOINT
from replay.mapping import mapping_from_cli
from replay.publish import parse_rate
from replay.run import ReplayOptions, run_inprocess
from replay.wire_mode import DEFAULT_RATE, WireRunError, run_wire


def _reload_at(text: str):
    seq, sep, path = text.partition("=")
    try:
        if not sep or not path:
            raise ValueError
        return int(seq), path
    except ValueError:
        raise argparse.ArgumentTypeError(f"--reload-at takes SEQ=MODEL.onnx, got {text!r}") from None


def register(sub) -> None:
    """Register the command's parser on the ``tickscore`` subparsers."""
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
        "(default ipc:///tmp/tickscore-replay-scores.ipc, apart from the service's), or an Aeron "
        "channel (aeron:ipc, aeron:udp?endpoint=HOST:PORT; see --aeron-dir, --stream-id); 'none' "
        "to measure without a socket",
    )
    r.add_argument(
        "--aeron-dir", default=None, metavar="DIR",
        help="with --publish aeron:...: the Aeron driver directory; a driver running there is used, "
        "else one is embedded (default /dev/shm/tickscore-replay-aeron-USER)",
    )
    r.add_argument(
        "--stream-id", type=int, default=None, metavar="ID",
        help="with --publish aeron:...: the stream id of the scores (default 1002, the service's)",
    )
    r.add_argument(
        "--rt-priority", type=int, default=None, metavar="1-99",
        help="run the hot loop SCHED_FIFO at this priority (needs privilege; refusal is reported)",
    )
    r.add_argument(
        "--loop", default="auto", choices=["auto", "native", "python"],
        help="duty cycle: native = one compiled call scores a batch of ticks (decode, features, model, "
        "Score encode, zmq_send, clock readings; fused backend), python = per-tick Python, auto "
        "(default) = native where the backend is fused and the sinks allow; --via: the spawned service's",
    )
    r.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                   help=f"ticks per native duty cycle at most (default {ReplayOptions.batch} in-process; "
                        "--via: the service's [engine] batch, 16)")
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
    r.add_argument("--linger-ms", type=int, default=30_000, metavar="MS",
                   help="at the end, how long the ZeroMQ publisher may go on delivering Scores a subscriber "
                        "has not taken yet (default 30000; -1: as long as it takes); the summary's "
                        "zmq.drained says whether everything went")  # fmt: skip
    r.add_argument("--limit", type=int, default=None, metavar="N",
                   help="replay only the file's first N rows (ticks, rejects and scores count those rows)")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    r.add_argument("--json", action="store_true", help="print the summary JSON instead of the table")
    r.add_argument("--record-scores", action="store_true",
                   help="also write OUT/scores.parquet: every score (seq, instrument, ts_event_ns, score, "
                        "flags, model_version); in wire mode, as the subscriber received them (needs --out)")
    add_input_arguments(r)  # --map, --map-file, --shape, --sort-by-exchange-time, --chunk-rows
    add_wire_arguments(r)
    add_client_key_arguments(r)  # --client-key / --server-key for --via with a CURVE --service-config
    r.set_defaults(handler=run)


def add_wire_arguments(r) -> None:
    """Add the wire-mode flags to the ``tickscore replay`` parser."""
    g = r.add_argument_group(
        "wire mode",
        "--via sends the ticks from a separate publisher process to a service and receives the "
        "scores in a separate subscriber process; latency is wire-to-wire from the intended send time",
    )
    g.add_argument("--via", choices=["zmq", "aeron"], default=None,
                   help="replay over the wire instead of in-process")
    g.add_argument("--service-config", metavar="FILE",
                   help="use the running service of this config (default: spawn one)")
    g.add_argument("--spawn", action="store_true",
                   help="start a service for the run and stop it after "
                   "(the default without --service-config)")
    g.add_argument("--rate", type=parse_rate, default=DEFAULT_RATE, metavar="TPS|max",
                   help=f"send rate in ticks/s when --speed is not given (default {DEFAULT_RATE:,.0f}; "
                   "'max' = back to back)")
    g.add_argument("--aeron-udp", action="store_true",
                   help="with --via aeron --spawn: use aeron:udp on 127.0.0.1 instead of aeron:ipc")
    g.add_argument("--client-cpus", metavar="LIST",
                   help="cores for the publisher and subscriber (default: all but --pin)")
    g.add_argument("--client-idle", choices=["auto", "spin", "yield", "block"], default="auto",
                   help="subscriber while waiting: spin = busy-poll at the lowest priority (SCHED_IDLE, "
                   "so it never delays the publisher or I/O threads on its core), yield, block "
                   "(ZeroMQ only: blocking receive); auto (default) = spin for Aeron, block for ZeroMQ "
                   "(whose I/O threads need the shared core: measured lower p99)")
    g.add_argument("--client-rt-priority", type=int, default=10, metavar="0-99",
                   help="run the publisher's send loop SCHED_FIFO at this priority while paced, so "
                   "it wakes up on time next to the spinning subscriber (it sleeps between ticks; "
                   "not used when ticks are closer than 2 x --sleep-margin-us; needs CAP_SYS_NICE, "
                   "a refusal is reported); 0 = off; default 10")
    g.add_argument("--sleep-margin-us", type=float, default=150.0, metavar="US",
                   help="publisher sleeps until this long before each send time, then spins (default 150)")
    g.add_argument("--idle-timeout", type=float, default=3.0, metavar="S",
                   help="subscriber stops after S seconds without a score (default 3)")
    g.add_argument("--service-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for a spawned service to warm up (default 120)")


def _mapping(args: argparse.Namespace):
    return mapping_from_cli(args.map, args.map_file, args.shape)


def run(args: argparse.Namespace) -> int:
    """Run ``tickscore replay`` (wire mode with ``--via``)."""
    if getattr(args, "via", None):  # wire mode: publisher + service + subscriber processes
        if args.aeron_dir or args.stream_id is not None:
            raise ValueError("--aeron-dir / --stream-id are for an in-process replay publishing on Aeron "
                             "(--publish aeron:...); with --via the service's config says where")  # fmt: skip
        return cmd_replay_wire(args)
    if (args.aeron_dir or args.stream_id is not None) and not (args.publish or "").startswith("aeron:"):
        raise ValueError("--aeron-dir / --stream-id need --publish aeron:ipc or aeron:udp?endpoint=HOST:PORT")
    return _run_inprocess(args)


def _run_inprocess(args: argparse.Namespace) -> int:
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
        linger_ms=args.linger_ms,
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
        loop=args.loop,
        batch=args.batch or ReplayOptions.batch,
        aeron_dir=args.aeron_dir,
        stream_id=args.stream_id if args.stream_id is not None else SCORE_STREAM_ID,
    )
    if args.record_scores and not args.out:
        raise ValueError("--record-scores writes OUT/scores.parquet: give --out DIR")
    res = run_inprocess(opts)
    s = res.summary
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print_inprocess(res)
    return _stopped_early(res, args)


def _stopped_early(res, args) -> int:
    """0, or, when Ctrl-C / SIGTERM stopped the run, say what the report covers and re-raise it."""
    if res.interrupt is None:
        return 0
    s = res.summary
    where = f" in {args.out}" if args.out else ""
    print(f"tickscore replay: stopped early, after {s['ticks']:,} ticks and {s['scores']:,} scores; "
          f"the report{where} covers them", file=sys.stderr)  # fmt: skip
    raise res.interrupt


def _print_inprocess(res) -> None:
    s = res.summary
    print(
        f"tickscore replay: {s['data']['path']}\n"
        f"  model {s['model']['version']} ({s['model']['quantization']}, backend {s['backend']}), "
        f"{s['pin']}, {s['scheduler']}, publish {s['publish']}, loop {s['loop']}\n"
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
    _print_table_and_files(res)


def cmd_replay_wire(args) -> int:
    """Run ``tickscore replay --via ...``."""
    if args.spawn and args.service_config:
        raise ValueError("--spawn and --service-config exclude each other")
    try:
        res = run_wire(args)
    except WireRunError as exc:  # a message of its own, not a traceback (--debug shows one)
        if args.debug:
            raise
        print(f"tickscore replay: error: {exc}", file=sys.stderr)
        return 2
    s = res.summary
    if args.json:
        print(json.dumps(s, indent=2))
        return _stopped_early(res, args)
    pace = f"speed {s['speed']}x" if s["rate_tps"] is None and s["speed"] != "max" else (
        f"{s['rate_tps']:,.0f} ticks/s" if s["rate_tps"] else "max rate")
    print(
        f"tickscore replay --via {s['mode']}: {s['data']['path']}\n"
        f"  service {s['service']}: model {s['model']['version']} ({s['model']['quantization']}, "
        f"backend {s['backend']}), hot loop on core {s['host']['pinned'] or 'any'}; "
        f"clients on {s['client_cpus']} ({s['client_idle']}); {pace}\n"
        f"  ticks {s['ticks']:,}  scores {s['scores']:,}  rejected {s['rejected']:,}  "
        f"dropped {s['dropped']:,}  wall {s['wall_s']:.2f}s  "
        f"(first {s['warmup_ticks_excluded']:,} latencies excluded as warm-up)"
    )
    print("  wire (intended) = receive - intended send time (the headline, latency_ns); "
          "wire (sent) = receive - actual send; service = ts_out - ts_in inside the service")
    _print_table_and_files(res)
    return _stopped_early(res, args)


def _print_table_and_files(res) -> None:
    """Print the percentile table and the files written (in-process and wire runs alike)."""
    print()
    print(res.table())
    if res.out_files:
        print()
        for name, path in res.out_files.items():
            print(f"  {name:<8} {path}")
