"""``tickscore subscribe``: print or record a service's scores."""

from __future__ import annotations

import signal
import sys
import time

import polars as pl

from engine.argtypes import add_client_key_arguments, client_keys_of
from engine.config import SCORE_STREAM_ID, default_aeron_dir, load_config
from engine.subscribe import FLAG_NAMES, Score, ShardTracker, StopFlag, subscribe_aeron, subscribe_zmq


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    p = sub.add_parser(
        "subscribe",
        help="print or record the scores of a running service (ZeroMQ or Aeron)",
        description="Subscribe to a service's scores and print them, or record them to Parquet.",
    )
    p.add_argument("endpoint", nargs="?", default=None,
                   help="ZeroMQ endpoint (ipc://..., tcp://...) or Aeron channel (aeron:ipc, "
                        "aeron:udp?endpoint=HOST:PORT)")
    p.add_argument("--topic", action="append", default=None, metavar="SYM",
                   help="only this instrument (repeatable; prefix match); default all")
    p.add_argument("--out", metavar="FILE.parquet", help="record every score here (written at exit)")
    p.add_argument("--count", type=int, default=0, help="stop after N scores")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds")
    p.add_argument("--quiet", action="store_true", help="do not print each score")
    p.add_argument("--stream-id", type=int, default=None, help="Aeron stream id (default 1002)")
    p.add_argument("--aeron-dir", default=None,
                   help="Aeron driver directory (default: the service's embedded driver, "
                        "/dev/shm/tickscore-aeron-USER)")
    p.add_argument("--cluster", metavar="FILE",
                   help="every shard of this cluster config (their [sinks.zmq] endpoints, merged; or the "
                        "[sinks.aeron] channel they share)")
    add_client_key_arguments(p, config=True)
    p.set_defaults(handler=cmd_subscribe)


def cmd_subscribe(args) -> int:
    """Run ``tickscore subscribe``."""
    topics = tuple(args.topic or ("",))
    keys = client_keys_of(args)
    endpoint: str | list[str] | None = args.endpoint
    aeron_dir = args.aeron_dir
    if args.cluster:
        if endpoint:
            raise ValueError("--cluster takes the endpoints from the cluster config: give no ENDPOINT")
        endpoint, aeron_dir = _cluster_endpoints(load_config(args.cluster), aeron_dir)
    if not endpoint:
        raise ValueError("give the service's score ENDPOINT (or --cluster FILE)")
    first = endpoint if isinstance(endpoint, str) else endpoint[0]
    if keys is not None and first.startswith("aeron:"):
        raise ValueError("--client-key/--server-key are ZeroMQ CURVE keys; Aeron has no transport "
                         "authentication (README, Security)")
    rows: list[tuple] = []
    n = [0]
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    stopper = StopFlag()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopper)

    def stop() -> bool:
        return stopper.flag or (deadline is not None and time.monotonic() >= deadline) or (
            args.count > 0 and n[0] >= args.count)

    tracker = ShardTracker()
    shard_col = bool(args.cluster)

    def on_score(s: Score, recv_ns: int) -> None:
        n[0] += 1
        event = tracker.see(s)
        if event is not None and topics == ("",):  # a topic filter makes gaps of its own
            print(f"tickscore subscribe: {event}", file=sys.stderr, flush=True)
        if args.out:
            rows.append((s.instrument, s.seq, s.ts_event_ns, s.ts_in_ns, s.ts_out_ns, s.score,
                         s.model_version, s.flags, s.shard, s.epoch, recv_ns))
        if not args.quiet:
            flags = "|".join(v for k, v in FLAG_NAMES.items() if s.flags & k) or "-"
            where = f"shard={s.shard} " if shard_col else ""
            print(f"{s.instrument:<8} {where}seq={s.seq:<10} score={s.score:.6f} flags={flags:<12} "
                  f"{s.model_version}  wire_us={(recv_ns - s.ts_out_ns) / 1000:.1f}", flush=True)

    if first.startswith("aeron:"):
        subscribe_aeron(first, args.stream_id or SCORE_STREAM_ID,
                        aeron_dir or default_aeron_dir(), topics, on_score, stop)
    else:
        subscribe_zmq(endpoint, topics, on_score, stop, keys=keys)
    print(f"tickscore subscribe: {n[0]:,} scores", file=sys.stderr)
    for k, v in tracker.summary().items():
        print(f"tickscore subscribe: shard {k}: {v['scores']:,} scores, {v['missing']:,} missing (seq gaps), "
              f"{v['restarts']} restarts", file=sys.stderr)
    if args.out:
        df = pl.DataFrame(rows, schema=[
            ("instrument", pl.Utf8), ("seq", pl.Int64), ("ts_event_ns", pl.Int64), ("ts_in_ns", pl.Int64),
            ("ts_out_ns", pl.Int64), ("score", pl.Float64), ("model_version", pl.Utf8),
            ("flags", pl.Int64), ("shard", pl.Int64), ("epoch", pl.Int64), ("recv_ns", pl.Int64),
        ], orient="row")
        df.write_parquet(args.out)
        print(f"tickscore subscribe: wrote {len(df):,} rows to {args.out}", file=sys.stderr)
    return 0


def _cluster_endpoints(cfg, aeron_dir: str | None) -> tuple[str | list[str], str | None]:
    """Return the score endpoints of every shard of ``cfg`` (ZeroMQ), or their shared Aeron channel."""
    shards = [cfg.for_shard(k) for k in range(cfg.cluster.shards)]
    zs = [sc.effective_sinks.zmq for sc in shards]
    if all(z is not None for z in zs):
        return [z.endpoint for z in zs], aeron_dir
    chans = {sc.effective_sinks.aeron.channel for sc in shards if sc.effective_sinks.aeron is not None}
    if len(chans) == 1:
        return chans.pop(), aeron_dir or shards[0].aeron_dir
    raise ValueError("--cluster: the shards publish neither on ZeroMQ nor on one shared Aeron channel")
