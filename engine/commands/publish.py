"""``tickscore publish``: send a tick file to a running service."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.argtypes import add_client_key_arguments, add_input_arguments, client_keys_of
from engine.argtypes import speed as _speed
from engine.config import (
    DEFAULT_CONTROL_ENDPOINT,
    DEFAULT_TICK_ENDPOINT,
    TICK_STREAM_ID,
    default_aeron_dir,
    load_config,
)
from engine.control import status_or_none
from replay.generator import default_data_path
from replay.mapping import mapping_from_cli
from replay.publish import check_service_shape, cluster_targets, first_event_after, parse_rate, publish_ticks
from replay.reader import resolve_shape


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    p = sub.add_parser(
        "publish",
        help="send a market file's ticks to a running service (ZeroMQ or Aeron), paced",
        description="Send ticks in the documented Tick wire format to a running service.",
    )
    p.add_argument("endpoint", nargs="?", default=None,
                   help="ZeroMQ endpoint the service's tick SUB is bound to (default "
                        "ipc:///tmp/tickscore-ticks.ipc, the service's default) or an Aeron channel "
                        "(aeron:ipc, aeron:udp?endpoint=HOST:PORT)")
    p.add_argument("--data", default=None, help="market file (default: the embedded dataset)")
    p.add_argument("--rate", type=parse_rate, default=1000.0, metavar="TPS|max",
                   help="ticks per second when --speed is not given (default 1,000; max = back to back)")
    p.add_argument("--speed", type=_speed, default=None, metavar="N",
                   help="N x the file's recorded pace instead of --rate")
    p.add_argument("--limit", type=int, default=None, help="send only the first N ticks")
    p.add_argument("--bind", action="store_true",
                   help="ZeroMQ: bind the endpoint (for a service whose tick source connects)")
    p.add_argument("--stream-id", type=int, default=None, help="Aeron stream id (default 1001)")
    p.add_argument("--aeron-dir", default=None,
                   help="Aeron driver directory (default: the service's embedded driver, "
                        "/dev/shm/tickscore-aeron-USER)")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up when no service takes the ticks within S seconds (default 10)")
    p.add_argument("--keep-times", action="store_true",
                   help="send the recorded event times instead of rebasing them to now")
    p.add_argument("--control", default=None, metavar="ENDPOINT",
                   help="the service's control endpoint, asked for the last event time it saw so "
                        "rebased times start after it (default tcp://127.0.0.1:5590; '' = do not ask)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--cluster", metavar="FILE",
                   help="send to every shard of this cluster config: once for all (the shards connect "
                        "to one endpoint) or routed by instrument (an endpoint or Aeron channel per shard); "
                        "README, Scale-out")
    add_input_arguments(p)
    add_client_key_arguments(p, config=True)
    p.set_defaults(handler=cmd_publish)


def cmd_publish(args) -> int:
    """Run ``tickscore publish``."""
    endpoint = args.endpoint or DEFAULT_TICK_ENDPOINT
    keys = client_keys_of(args)
    if keys is not None and endpoint.startswith("aeron:"):
        raise ValueError("--client-key/--server-key are ZeroMQ CURVE keys; Aeron has no transport "
                         "authentication (README, Security)")
    data = str(Path(args.data).resolve()) if args.data else str(default_data_path())
    shape = resolve_shape(data, mapping_from_cli(args.map, args.map_file, args.shape), args.shape)
    print(f"tickscore publish: {data}: a {shape!r} file", file=sys.stderr)
    speed = args.speed
    spec = {"data": data, "map": list(args.map or []), "shape": shape,  # resolved once, here
            "map_file": str(Path(args.map_file).resolve()) if args.map_file else None,
            "sort_by_exchange_time": bool(args.sort_by_exchange_time), "limit": args.limit,
            "chunk_rows": args.chunk_rows,
            "connect_timeout_s": args.connect_timeout, "keep_times": args.keep_times,
            "speed": speed, "rate": None if speed is not None else args.rate,
            "sleep_margin_us": 150.0, "rt_priority": 0}
    ccfg = load_config(args.cluster) if args.cluster else None
    if ccfg is not None and args.endpoint:
        raise ValueError("--cluster takes the endpoints from the cluster config: give no ENDPOINT")
    controls = [DEFAULT_CONTROL_ENDPOINT if args.control is None else args.control]
    if ccfg is not None:
        controls = [ccfg.for_shard(k).control.endpoint for k in range(ccfg.cluster.shards)]
    for control in controls if not args.keep_times else []:
        if not control:
            continue
        # the service rejects an instrument's tick older than its last one (time_backwards):
        # start the rebased times after whatever it has seen, as replay --via does
        st = status_or_none(control, 2.0, keys)
        if st is None:
            print(f"tickscore publish: warning: no service answered on {control}; event times start "
                  f"now (ticks older than what the service already saw are rejected as time_backwards; "
                  f"--control ENDPOINT names the service's control socket)", file=sys.stderr)
        else:
            check_service_shape(st, shape, "tickscore publish")
            spec["min_event_ns"] = max(spec.get("min_event_ns", 0), first_event_after(st))
    if ccfg is not None:
        via = "aeron" if ccfg.effective_sources.zmq is None else "zmq"
        tg = cluster_targets(ccfg, via)
        spec.update(tg, via=via)
        if via == "aeron":
            spec.update(stream_id=ccfg.effective_sources.aeron.stream_id,
                        aeron_dir=args.aeron_dir or ccfg.for_shard(0).aeron_dir)
        elif keys is not None:
            spec["curve"] = keys.as_text()
        where = f"{ccfg.cluster.shards} shards ({tg['mode']}: {tg.get('endpoint') or tg.get('channel')})"
    elif endpoint.startswith("aeron:"):
        spec.update(via="aeron", channel=endpoint, stream_id=args.stream_id or TICK_STREAM_ID,
                    aeron_dir=args.aeron_dir or default_aeron_dir())
        where = f"{endpoint} stream {spec['stream_id']} (driver {spec['aeron_dir']})"
    else:
        spec.update(via="zmq", endpoint=endpoint, bind=args.bind)
        if keys is not None:
            spec["curve"] = keys.as_text()
        where = endpoint
    pace = (f"{spec['rate']:,.0f} ticks/s" if spec["rate"] else
            f"{spec['speed']:g}x recorded" if spec["speed"] else "back to back")

    def ready() -> None:
        print(f"tickscore publish: connected to {where}; sending at {pace} ...", file=sys.stderr, flush=True)

    res = publish_ticks(spec, on_ready=ready, progress_s=0.0 if args.no_progress else 1.0)
    n, wall = res["sent"], res["wall_s"]
    rate = f", {n / wall:,.0f} ticks/s" if wall > 0 else ""
    stopped = " (stopped early)" if res["interrupt"] is not None else ""
    print(f"tickscore publish: sent {n:,} ticks ({', '.join(res['symbols'])}) in {wall:.2f} s{rate}"
          f"{'; ' + format(res['retries'], ',') + ' Aeron offer retries' if res['retries'] else ''}{stopped}",
          file=sys.stderr)
    if res["reader_rejected"]:
        print("tickscore publish: rows of the file not sent (rejected by the reader): "
              + ", ".join(f"{k} {v:,}" for k, v in res["reader_rejected"].items()), file=sys.stderr)
    if res["interrupt"] is not None:  # the count is out; exit as interrupted (130, or 143 for SIGTERM)
        raise res["interrupt"]
    return 0
