"""``tickscore serve`` (the live service) and ``tickscore control`` (talk to its control socket)."""

from __future__ import annotations

import json
import os
import sys
import time

import msgspec

from engine.argtypes import add_client_key_arguments, client_keys_of, positive_int
from engine.cluster import Supervisor, cluster_status, format_cluster_status, with_shards
from engine.config import DEFAULT_CONTROL_ENDPOINT, load_config, to_toml
from engine.control import ControlError, request
from engine.log import FORMATS
from engine.service import AERON_LOST, AERON_TRUNCATED, run_service


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    s = sub.add_parser(
        "serve",
        help="run the live scoring service (ticks in over ZeroMQ/Aeron, scores out)",
        description=(
            "Score every tick received over ZeroMQ and/or Aeron and publish the scores over "
            "ZeroMQ and/or Aeron, as configured in a TOML file (see engine/examples/service.toml). "
            "SIGTERM/SIGINT or 'tickscore control stop' stop it gracefully."
        ),
    )
    s.add_argument("--config", metavar="FILE", help="service TOML (default: built-in defaults)")
    s.add_argument("--check", action="store_true",
                   help="validate the config, print the effective config and exit")
    s.add_argument("--json", action="store_true", help="print the final report JSON on stdout at exit")
    s.add_argument("--log-format", choices=FORMATS, default=None,
                   help="log lines on stderr: text (default) or json (one object per line); "
                        "overrides [log] format")
    s.add_argument("--shards", type=positive_int, default=None, metavar="N",
                   help="start N shard processes of the --config cluster on this host, each pinned to "
                        "its own core; restart one that dies; SIGTERM stops them all (README, Scale-out)")
    s.add_argument("--only", default=None, metavar="K[,K...]",
                   help="with --shards: start only these shards here (the others run on other hosts)")
    s.add_argument("--shard", type=int, default=None, metavar="K",
                   help="run shard K of the --config cluster (overrides [cluster] shard)")
    s.add_argument("--of", type=positive_int, default=None, metavar="N",
                   help="with --shard: the cluster has N shards (overrides [cluster] shards)")
    s.add_argument("--pin", default=None, metavar="CORE|none", help="hot core (overrides [engine] pin)")

    c = sub.add_parser(
        "control",
        help="send status / reload MODEL / stop to a running service",
        description="Talk to a running service's control socket; prints the JSON reply.",
    )
    c.add_argument("action", choices=["status", "reload", "stop"], help="what to ask")
    c.add_argument("model", nargs="?", help="model file for 'reload'")
    c.add_argument("--config", metavar="FILE", help="take the control endpoint from this service config")
    c.add_argument("--cluster", metavar="FILE",
                   help="status of every shard of this cluster config (each shard's control endpoint)")
    c.add_argument("--endpoint", help="control endpoint (default: the config's, else tcp://127.0.0.1:5590)")
    c.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait (default 10); a reload is followed until it is swapped or rejected")
    add_client_key_arguments(c)
    s.set_defaults(handler=cmd_serve)
    c.set_defaults(handler=cmd_control)


def _pin(cfg, text: str | None):
    if text is None:
        return cfg
    if text != "none" and not text.isdigit():
        raise ValueError(f"--pin {text!r}: a core number or none")
    pin = text if text == "none" else int(text)
    return msgspec.structs.replace(cfg, engine=msgspec.structs.replace(cfg.engine, pin=pin))


def cmd_serve(args) -> int:
    """Run ``tickscore serve``."""
    cfg = load_config(args.config)
    if args.shards is not None:
        if not args.config:
            raise ValueError("serve --shards N needs --config FILE, a cluster config whose endpoints carry "
                             "{shard} (see engine/examples/cluster.toml)")
        if args.shard is not None:
            raise ValueError("--shards starts every shard; --shard K runs one of them")
        only = None
        if args.only:
            try:
                only = [int(x) for x in args.only.split(",")]
            except ValueError:
                raise ValueError(f"--only {args.only!r}: shard numbers separated by commas") from None
        sup = Supervisor(with_shards(cfg, args.shards), args.config, log_format=args.log_format, only=only)
        if args.check:
            for k in [s.k for s in sup.shards]:
                print(f"# shard {k}\n{to_toml(sup.cfg.for_shard(k))}")
            return 0
        return sup.run()
    if args.of is not None:
        cfg = with_shards(cfg, args.of)
    if args.shard is not None or cfg.cluster.shards > 1:
        cfg = cfg.for_shard(cfg.cluster.shard if args.shard is None else args.shard)
    cfg = _pin(cfg, args.pin)
    if args.check:
        print(to_toml(cfg), end="")
        print(f"# {args.config or 'defaults'}: OK", file=sys.stderr)
        return 0
    final = run_service(cfg, args.config, log_format=args.log_format)
    if args.json:
        print(json.dumps(final, indent=2, default=str))
    reason = final.get("stop_reason")
    if reason == AERON_TRUNCATED:  # Aeron's C threads fault on every access: no cleanup can run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 1 if reason == AERON_LOST else 0


def cmd_control(args) -> int:
    """Run ``tickscore control``."""
    if args.cluster:
        if args.action != "status":
            raise ValueError(f"--cluster: only status goes to every shard (stop: SIGTERM to serve --shards, "
                             f"or {args.action} each shard with --endpoint)")
        ccfg = load_config(args.cluster)
        rep = cluster_status(ccfg, timeout_s=min(args.timeout, 5.0), keys=client_keys_of(args, ccfg))
        print(format_cluster_status(rep), file=sys.stderr)
        print(json.dumps(rep, indent=2))
        return 0 if rep["ok"] else 1
    endpoint = args.endpoint
    cfg = load_config(args.config) if args.config else None
    keys = client_keys_of(args, cfg)
    if endpoint is None and cfg is not None:
        endpoint = cfg.control.endpoint
        if not endpoint:
            raise ValueError(f"{args.config}: the control channel is disabled ([control] endpoint = \"\")")
    endpoint = endpoint or DEFAULT_CONTROL_ENDPOINT
    text = args.action
    if args.action == "reload":
        if not args.model:
            raise ValueError("reload needs a model file: tickscore control reload MODEL.onnx")
        text = json.dumps({"command": "reload", "path": os.path.abspath(args.model)})
    deadline = time.monotonic() + args.timeout
    try:
        reply = request(endpoint, text, timeout_s=args.timeout, keys=keys)
        if args.action == "reload" and reply.get("status") == "pending":
            reply = _follow_reload(endpoint, reply, deadline, keys)
    except ControlError as exc:
        print(f"tickscore control: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def _follow_reload(endpoint: str, reply: dict, deadline: float, keys) -> dict:
    """Poll ``status`` until the reload ticket of ``reply`` is swapped or rejected (or the deadline)."""
    while time.monotonic() < deadline:
        time.sleep(0.1)
        st = request(endpoint, "status", timeout_s=max(0.5, deadline - time.monotonic()), keys=keys)
        for t in reversed(st.get("reloads", [])):
            if t.get("path") == reply.get("path") and t.get("requested_seq") == reply.get("requested_seq"):
                if t.get("status") != "pending":
                    return {"ok": t["status"] == "swapped", "command": "reload", **t}
                break
    return reply
