"""Wire-mode replay: publisher process -> service -> subscriber process, wire-to-wire latency.

``tickscore replay --via zmq|aeron [--service-config FILE | --spawn]`` measures
what a trading system on the same host sees: three processes besides the
coordinator,

* a **publisher** (a worker process, :func:`worker_main` ``publish``) that sends the ticks of
  the data file as ``Tick`` messages at the chosen pace,
* the **service** (``tickscore serve``): a running one (``--service-config``) or
  one spawned for the run (``--spawn``, the default),
* a **subscriber** (:func:`worker_main` ``subscribe``) that receives the
  scores,

and reports **wire-to-wire latency = subscriber receive time - the tick's
intended send time**, both read from CLOCK_MONOTONIC (``time.perf_counter_ns``)
on the same host.  The intended send time of tick ``i`` is fixed before the run
(``start + i / rate``, or ``start + (ts_event[i] - ts_event[0]) / speed``), so a
stall anywhere (publisher, service, subscriber) shows in every tick queued behind
it: coordinated omission is not hidden.  With ``--rate max`` ticks are sent back
to back and the intended time is the actual send time.

Event times are shifted so the first tick's ``ts_event_ns`` is the wall-clock
time at the start of the run, or 1 s after the latest event the service has
accepted (``last_event_ns`` of its ``status``) if that is later; differences,
hence features and scores, are unchanged, and a long-running service never
sees a replayed tick as going backwards in time.  A score is matched to its tick by (instrument,
``ts_event_ns``) in send order, so ticks the service rejected or scores that
were lost are counted, not mismatched.

Outputs (``--out DIR``), same files as the in-process replay:
``summary.json`` (run-summary contract, ``mode`` = ``zmq`` / ``aeron``,
``latency_ns`` = wire-to-wire from the intended send time), ``latency.hgrm``,
``latency.png`` and ``latency_raw.npz`` with ``t_in`` = intended send time and
``t_out`` = receive time (so ``tickscore report`` recomputes the same numbers),
plus ``t_sent``, ``t_svc_in``, ``t_svc_out``, ``seq`` of every matched score.

Ctrl-C or SIGTERM: the workers and a spawned service run in process groups of their own,
so a terminal's Ctrl-C reaches the coordinator only.  It has the publisher stop sending
(SIGINT: :func:`replay.publish.publish_ticks` returns what it sent), waits for the scores
in flight (the subscriber's idle timeout), stops the service, writes the report with
``interrupted: true`` and re-raises (exit 130 / 143).  A second Ctrl-C aborts.

CPU placement on a small machine: the service's hot loop is pinned to
``--pin`` (default core 1); the publisher and the subscriber are pinned to the
other cores and, when idle, yield the CPU (``sched_yield``) instead of spinning,
so on one shared core they hand it to each other within microseconds.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from engine.argtypes import client_keys_of
from engine.config import SCORE_STREAM_ID, TICK_STREAM_ID, load_config
from engine.control import ControlError, request, status_or_none
from engine.security import ClientKeys, apply_client
from engine.wire import decode_score
from replay.generator import default_data_path
from replay.inputs import default_model_for_shape
from replay.latency import (
    format_table,
    latency_stats,
    plot_percentiles,
    summarise,
    warmup_excluded,
    write_hgrm,
)
from replay.mapping import mapping_from_cli
from replay.publish import (
    check_service_shape,
    cluster_targets,
    first_event_after,
    first_ticks_for_wire,
    pin_self,
    publish_ticks,
)
from replay.scores import write_scores

__all__ = ["WireRun", "WireRunError", "run_wire", "match_scores"]

DEFAULT_RATE = 2_000.0


class WireRunError(RuntimeError):
    """A wire run could not be made: no service answers, a process failed (its stderr's tail says why)."""


# ------------------------------------------------------------------------ helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lowest_priority() -> str:
    """Make this process SCHED_IDLE (runs only when its core has nothing else to do)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (OSError, AttributeError):
        try:
            os.nice(19)
            return "nice 19"
        except OSError:
            return "default priority"


# ------------------------------------------------------------------------ publisher process


def _publisher(spec: dict) -> int:
    """Send the ticks at the pace (:func:`replay.publish.publish_ticks`); write intended/sent times."""
    try:
        res = publish_ticks(spec, on_ready=lambda: print("ready", flush=True))
    except TimeoutError as exc:
        print(f"publisher: {exc}", file=sys.stderr)
        return 3
    np.savez(spec["out"], intended=res["intended"], sent=res["sent_ns"], ts_event=res["ts_event"],
             inst=res["inst"])
    keys = ("sent", "retries", "pin", "timer_slack_1ns", "sleep_margin_us", "scheduler")
    print(json.dumps({**{k: res[k] for k in keys}, "interrupted": res["interrupt"] is not None}), flush=True)
    return 0


# ------------------------------------------------------------------------ subscriber process


def _subscriber(spec: dict) -> int:
    """Receive scores until ``expected`` arrived or ``idle_s`` passed without one; write them."""
    pin = pin_self(spec.get("cpus"))
    mode = spec.get("client_idle", "spin")
    prio = "default priority"
    expected = int(spec["expected"])
    idle_ns = int(spec.get("idle_s", 3.0) * 1e9)
    max_wait_ns = int(spec.get("max_wait_s", 600) * 1e9)
    clock = time.perf_counter_ns
    recv_ns = np.zeros(expected + 1024, dtype=np.int64)
    payloads: list[bytes] = []
    cap = len(recv_ns)
    k = 0
    yield_ = os.sched_yield
    via = spec["via"]
    if via == "zmq":
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        apply_client(sock, ClientKeys.from_text(spec.get("curve")))  # a CURVE service
        if spec["bind"]:
            sock.bind(spec["endpoint"])
        else:
            for e in spec.get("endpoints") or [spec["endpoint"]]:  # a cluster: every shard's
                sock.connect(e)
        print("ready", flush=True)
        if mode == "spin":  # this thread only: the I/O thread keeps its normal priority
            prio = _lowest_priority()
        gc.disable()
        recv, get = sock.recv, sock.get
        NB, EV, POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
        Again = zmq.Again
        t_last = t_start = clock()
        try:  # until the expected count, idle, or the coordinator's SIGINT (Ctrl-C)
            block = mode == "block"
            misses = 0
            while k < expected:
                if not (sock.poll(200) if block else get(EV) & POLLIN):
                    if mode == "yield":
                        yield_()
                    misses += 1
                    if block or not misses & 4095:
                        now = clock()
                        if (k and now - t_last > idle_ns) or now - t_start > max_wait_ns:
                            break
                    continue
                while True:  # drain what is there without readiness checks
                    try:
                        recv(NB)
                    except Again:
                        break
                    p = recv(NB)
                    t = clock()
                    if k < cap:
                        recv_ns[k] = t
                    payloads.append(p)
                    k += 1
                    t_last = t
                misses = 0
        except KeyboardInterrupt:  # stopped: keep what arrived
            pass
        sock.close(0)
        ctx.term()
    else:
        # deferred: loads the Aeron C client, only where Aeron is used
        from engine.aeron_io import connect_client

        aeron = connect_client(spec["aeron_dir"], on_error=lambda c, m: None)
        sub = aeron.add_subscription(spec["channel"], spec["stream_id"])
        try:
            sub.await_connected(timeout=spec.get("connect_timeout_s", 30))
        except Exception as exc:  # noqa: BLE001
            print(f"subscriber: no publication on {spec['channel']} stream {spec['stream_id']}: {exc}",
                  file=sys.stderr)
            return 3
        print("ready", flush=True)
        if mode == "spin":  # this thread only: the client conductor keeps its normal priority
            prio = _lowest_priority()
        gc.disable()
        box = [0]

        def handler(buf, header):
            t = clock()
            j = box[0]
            if j < cap:
                recv_ns[j] = t
            payloads.append(buf.tobytes())
            box[0] = j + 1

        poll = sub.poll
        try:  # until the expected count, idle, or the coordinator's SIGINT (Ctrl-C)
            t_last = t_start = clock()
            misses = 0
            spin = mode != "yield"
            while box[0] < expected:
                if poll(handler, 16):
                    t_last = clock()
                    misses = 0
                    continue
                if not spin:
                    yield_()
                misses += 1
                if not misses & 4095:
                    now = clock()
                    if (box[0] and now - t_last > idle_ns) or now - t_start > max_wait_ns:
                        break
        except KeyboardInterrupt:  # stopped: keep what arrived
            pass
        k = box[0]
        aeron.close()

    gc.enable()

    sym_index = {s: i for i, s in enumerate(spec["symbols"])}
    m = min(k, cap)
    seq = np.zeros(m, dtype=np.int64)
    ts_event = np.zeros(m, dtype=np.int64)
    inst = np.full(m, -1, dtype=np.int32)
    ts_in = np.zeros(m, dtype=np.int64)
    ts_out = np.zeros(m, dtype=np.int64)
    score = np.zeros(m, dtype=np.float64)
    versions: dict[str, int] = {}
    bad = 0
    for j in range(m):
        try:
            s = decode_score(payloads[j])
        except Exception:  # noqa: BLE001 - counted
            bad += 1
            continue
        seq[j], ts_event[j], score[j] = s.seq, s.ts_event_ns, s.score
        ts_in[j], ts_out[j] = s.ts_in_ns, s.ts_out_ns
        inst[j] = sym_index.get(s.instrument, -1)
        versions[s.model_version] = versions.get(s.model_version, 0) + 1
    np.savez(spec["out"], recv_ns=recv_ns[:m], seq=seq, ts_event=ts_event, inst=inst, ts_in=ts_in,
             ts_out=ts_out, score=score)
    if spec.get("record"):  # --record-scores: every score as received

        write_scores(spec["record"], payloads[:k])
    print(json.dumps({"received": k, "bad": bad, "model_versions": versions, "pin": pin, "priority": prio,
                      "idle": mode}), flush=True)
    return 0


# ------------------------------------------------------------------------ matching


def match_scores(pub_inst: np.ndarray, pub_ts: np.ndarray, sub_inst: np.ndarray,
                 sub_ts: np.ndarray, *, merged: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return (tick index, score index) pairs matching scores to sent ticks in send order.

    Scores arrive in the order the ticks were sent (one publisher, one service
    loop); a tick without a score (rejected, dropped) is skipped.  Scores that
    match no remaining tick (another publisher's) are ignored.  ``merged``: the
    scores of several shards, each in send order but interleaved among them: each
    (instrument, event time) takes its first unmatched tick, pairs sorted by tick.
    """
    n, m = len(pub_ts), len(sub_ts)
    if n == m and np.array_equal(pub_inst, sub_inst) and np.array_equal(pub_ts, sub_ts):
        idx = np.arange(n, dtype=np.int64)
        return idx, idx
    keys = {}
    for i, key in enumerate(zip(pub_inst.tolist(), pub_ts.tolist(), strict=True)):
        keys.setdefault(key, []).append(i)
    if merged:
        pairs = []
        taken = {k: 0 for k in keys}
        for j, key in enumerate(zip(sub_inst.tolist(), sub_ts.tolist(), strict=True)):
            cands = keys.get(key)
            if cands and taken[key] < len(cands):
                pairs.append((cands[taken[key]], j))
                taken[key] += 1
        pairs.sort()
        return (np.asarray([p[0] for p in pairs], dtype=np.int64),
                np.asarray([p[1] for p in pairs], dtype=np.int64))
    ti, si = [], []
    last = -1
    for j, key in enumerate(zip(sub_inst.tolist(), sub_ts.tolist(), strict=True)):
        cands = keys.get(key)
        if not cands:
            continue
        i = next((c for c in cands if c > last), None)
        if i is None:
            continue
        ti.append(i)
        si.append(j)
        last = i
    return np.asarray(ti, dtype=np.int64), np.asarray(si, dtype=np.int64)


# ------------------------------------------------------------------------ coordinator


def _spawn_config(args, symbols: list[str], tmp: Path, *, model: str, crossing_add: str = ""
                  ) -> tuple[Path, dict]:
    """Write a service config for this run (``model``: the file's shape's); return it and the endpoints."""
    ctl = f"tcp://127.0.0.1:{_free_port()}"
    lines = [f"instruments = {json.dumps(symbols)}", "", "[engine]",
             f"pin = {json.dumps('none' if args.pin is None else args.pin)}",
             f"idle = {json.dumps(args.idle)}", f"warmup_ticks = {int(args.warmup_ticks)}",
             f"keep_warm_us = {int(args.keep_warm_us)}",
             f"loop = {json.dumps(getattr(args, 'loop', 'auto'))}",
             *([f"batch = {int(args.batch)}"] if getattr(args, "batch", None) else []),
             "",
             "[model]", f"path = {json.dumps(str(Path(model).resolve()))}",
             f"backend = {json.dumps(args.backend)}", "",
             "[book]", f"crossing_add = {json.dumps(crossing_add)}", "",
             "[control]", f"endpoint = {json.dumps(ctl)}", ""]
    if args.via == "zmq":
        t_ep, s_ep = f"ipc://{tmp}/ticks.ipc", f"ipc://{tmp}/scores.ipc"
        lines += ["[sources.zmq]", f"endpoint = {json.dumps(t_ep)}", "",
                  "[sinks.zmq]", f"endpoint = {json.dumps(s_ep)}", f"sndhwm = {int(args.hwm)}", ""]
        ep = {"ticks": {"endpoint": t_ep, "bind": False}, "scores": {"endpoint": s_ep, "bind": False}}
    else:
        adir = f"/dev/shm/tickscore-wire-{os.getpid()}" if os.path.isdir("/dev/shm") else str(tmp / "aeron")
        t_ch = s_ch = "aeron:ipc"
        if args.aeron_udp:
            t_ch = f"aeron:udp?endpoint=127.0.0.1:{_free_udp_port()}"
            s_ch = f"aeron:udp?endpoint=127.0.0.1:{_free_udp_port()}"
        lines += ["[sources.aeron]", f"channel = {json.dumps(t_ch)}", f"stream_id = {TICK_STREAM_ID}", "",
                  "[sinks.aeron]", f"channel = {json.dumps(s_ch)}", f"stream_id = {SCORE_STREAM_ID}", "",
                  "[aeron]", "embedded = true", f"dir = {json.dumps(adir)}", ""]
        ep = {"aeron_dir": adir,
              "ticks": {"channel": t_ch, "stream_id": TICK_STREAM_ID},
              "scores": {"channel": s_ch, "stream_id": SCORE_STREAM_ID}}
    ep["control"] = ctl
    path = tmp / "service.toml"
    path.write_text("\n".join(lines))
    return path, ep


def _endpoints_from_cluster(cfg, via: str) -> dict:
    """The endpoints of a running cluster's shards: ticks as ``publish --cluster`` sends them."""
    if via != "zmq":
        raise ValueError("--via aeron with a cluster config: not supported (each shard's embedded driver "
                         "is its own; use --via zmq, or tickscore publish/subscribe --cluster)")
    shards = [cfg.for_shard(k) for k in range(cfg.cluster.shards)]
    if any(sc.effective_sinks.zmq is None or sc.effective_sinks.zmq.bind is False for sc in shards):
        raise ValueError("--via zmq with a cluster config: every shard needs a bound [sinks.zmq]")
    return {"ticks": cluster_targets(cfg, "zmq"),
            "scores": {"endpoints": [sc.effective_sinks.zmq.endpoint for sc in shards], "bind": False},
            "controls": [sc.control.endpoint for sc in shards]}


def _cluster_status(controls: list[str], keys) -> dict | None:
    """Every shard's status folded into one (counts summed), or None when a shard does not answer."""
    sts = [status_or_none(c, 5.0, keys) for c in controls]
    if any(st is None for st in sts):
        return None
    out = dict(sts[0])
    for k in ("rejected", "drops", "ticks_in", "scores_out"):
        out[k] = sum(int(st.get(k, 0)) for st in sts)
    reasons: dict[str, int] = {}
    for st in sts:
        for r, v in st.get("rejected_by_reason", {}).items():
            reasons[r] = reasons.get(r, 0) + v
    out["rejected_by_reason"] = reasons
    out["last_event_ns"] = max(int(st.get("last_event_ns") or 0) for st in sts)
    out["sinks"] = {"zmq": {"subscribers": min(st.get("sinks", {}).get("zmq", {}).get("subscribers", 0)
                                               for st in sts)}}  # fmt: skip
    out["shards"] = len(sts)
    return out


def _endpoints_from_config(cfg, via: str) -> dict:
    src, snk = cfg.effective_sources, cfg.effective_sinks
    if via == "zmq":
        if src.zmq is None or snk.zmq is None:
            raise ValueError("--via zmq: the service config needs [sources.zmq] and [sinks.zmq]")
        ep = {"ticks": {"endpoint": src.zmq.endpoint, "bind": not src.zmq.bind},
              "scores": {"endpoint": snk.zmq.endpoint, "bind": not snk.zmq.bind}}
    else:
        if src.aeron is None or snk.aeron is None:
            raise ValueError("--via aeron: the service config needs [sources.aeron] and [sinks.aeron]")
        ep = {"aeron_dir": cfg.aeron_dir,
              "ticks": {"channel": src.aeron.channel, "stream_id": src.aeron.stream_id},
              "scores": {"channel": snk.aeron.channel, "stream_id": snk.aeron.stream_id}}
    ep["control"] = cfg.control.endpoint or None
    return ep


class WireRun:
    """Result of a wire-mode run: summary JSON, arrays, output files."""

    def __init__(self, summary: dict, series: dict, out_files: dict,
                 interrupt: BaseException | None = None) -> None:
        self.summary = summary
        self.series = series
        self.out_files = out_files
        #: Ctrl-C / SIGTERM stopped the run: the caller re-raises it once the report is out
        self.interrupt = interrupt

    def table(self) -> str:
        """Return the percentile table (µs) of the wire and service series."""
        stats = {k: latency_stats(v) for k, v in self.series.items()}
        tps = {k: self.summary["throughput_tps"] for k in stats}
        return format_table(stats, throughput=tps)


def _wait_service(proc, endpoint: str, timeout_s: float, log: Path) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WireRunError(f"the spawned service exited with code {proc.returncode}:\n"
                               f"{log.read_text()[-3000:]}")
        st = status_or_none(endpoint, 1.0)
        if st is not None and st.get("state") == "running":
            return st
        time.sleep(0.1)
    raise WireRunError(f"the spawned service did not become ready within {timeout_s:g}s:\n"
                       f"{log.read_text()[-3000:]}")


def _client(role: str, spec: dict, spec_path: Path) -> subprocess.Popen:
    spec_path.write_text(json.dumps(spec))
    # the worker process runs worker_main directly (as the chunk reader does): no command line to parse
    code = ("import sys; from replay.wire_mode import worker_main; "
            f"sys.exit(worker_main({role!r}, {str(spec_path)!r}))")
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(Path(__file__).resolve().parents[1]),
        process_group=0,  # a terminal's Ctrl-C reaches the coordinator only: it stops the workers in order
    )


def _expect_ready(proc: subprocess.Popen, role: str, timeout_s: float) -> None:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(0.2):
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise WireRunError(f"the {role} process did not get ready: {err.strip()[-2000:]}")


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    return {}


def run_wire(args) -> WireRun:
    """Run a wire-mode replay as configured by the ``tickscore replay`` arguments."""
    data_path = str(Path(args.data).resolve()) if args.data else str(default_data_path())
    read_opts = {"map": list(args.map or []), "shape": args.shape,
                 "map_file": str(Path(args.map_file).resolve()) if args.map_file else None,
                 "sort_by_exchange_time": bool(args.sort_by_exchange_time),
                 "chunk_rows": getattr(args, "chunk_rows", None)}
    # the file's shape, instruments and size (one chunk read: bounded memory); the publisher
    # process reads and sends it chunk by chunk
    td, _, _ = first_ticks_for_wire(data_path, read_opts["map"], read_opts["map_file"], read_opts["shape"],
                                    read_opts["sort_by_exchange_time"], read_opts["chunk_rows"])  # fmt: skip
    n = td.total_rows if args.limit is None else min(args.limit, td.total_rows)  # at most; see "sent"
    speed = args.speed
    rate = None if speed is not None else args.rate
    hot = args.pin
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        allowed = []
    if args.client_cpus:
        clients = [int(c) for c in args.client_cpus.split(",")]
    else:
        clients = [c for c in allowed if c != hot] or allowed

    tmpdir = tempfile.TemporaryDirectory(prefix="tickscore-wire-")
    tmp = Path(tmpdir.name)
    service = None
    log_path = tmp / "service.log"
    procs: list[subprocess.Popen] = []
    interrupt = None  # Ctrl-C / SIGTERM once the ticks were being sent: re-raised after the report
    spawned = args.service_config is None
    keys = None  # CURVE client keys, for a running service with [security] curve
    try:
        if spawned:
            model = args.model or str(default_model_for_shape(td.shape))
            mapping = mapping_from_cli(read_opts["map"], read_opts["map_file"], read_opts["shape"])
            crossing = getattr(mapping, "crossing_add", None) or ""
            cfg_path, ep = _spawn_config(args, td.symbols, tmp, model=model, crossing_add=crossing)
            log = open(log_path, "w")  # noqa: SIM115 - closed below
            service = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "serve", "--config", str(cfg_path)],
                stdout=subprocess.DEVNULL, stderr=log, cwd=str(Path(__file__).resolve().parents[1]),
                process_group=0,  # not stopped by a terminal's Ctrl-C: the coordinator stops it
            )
            _progress(args, f"spawned service pid {service.pid} ({cfg_path}); waiting for warm-up ...")
            before = _wait_service(service, ep["control"], args.service_timeout, log_path)
        else:
            cfg = load_config(args.service_config)
            cluster = cfg.cluster.shards > 1
            keys = client_keys_of(args, cfg)
            if cluster:  # every shard: ticks sent as publish --cluster does, scores merged
                ep = _endpoints_from_cluster(cfg, args.via)
                ep["control"] = None
                before = _cluster_status(ep["controls"], keys)
                if before is None:
                    raise WireRunError(f"a shard of {args.service_config} does not answer on its control "
                                       f"socket ({', '.join(ep['controls'])}): is the cluster running?")
            else:
                ep = _endpoints_from_config(cfg, args.via)
                before = status_or_none(ep["control"], 5.0, keys)
            if before is None and ep["control"]:
                raise WireRunError(f"the service of {args.service_config} does not answer on "
                                   f"{ep['control']} (is it running?)")
            check_service_shape(before, td.shape, f"tickscore replay --via {args.via}")
            missing = set(td.symbols) - set(cfg.instruments)
            if missing and not cfg.max_instruments:
                print(f"tickscore replay: warning: the service does not know {sorted(missing)}; "
                      f"those ticks will be rejected", file=sys.stderr)

        client_idle = args.client_idle
        if client_idle == "auto":
            client_idle = "block" if args.via == "zmq" else "spin"
        if client_idle == "block" and args.via == "aeron":
            raise ValueError("--client-idle block is for ZeroMQ (Aeron has no blocking receive)")
        common = {"via": args.via, "symbols": td.symbols, "connect_timeout_s": 30,
                  "client_idle": client_idle, "cpus": clients}
        if args.via == "zmq":
            sub_spec = {**common, **ep["scores"]}
            pub_spec = {**common, **ep["ticks"]}
            if keys is not None:
                sub_spec["curve"] = pub_spec["curve"] = keys.as_text()
        else:
            sub_spec = {**common, **ep["scores"], "aeron_dir": ep["aeron_dir"]}
            pub_spec = {**common, **ep["ticks"], "aeron_dir": ep["aeron_dir"]}
        sub_spec.update(expected=n, out=str(tmp / "sub.npz"), idle_s=args.idle_timeout)
        if getattr(args, "record_scores", False):
            if not args.out:
                raise ValueError("--record-scores writes OUT/scores.parquet: give --out DIR")
            sub_spec["record"] = str(Path(args.out).resolve() / "scores.parquet")
        pub_spec.update(data=data_path, **read_opts, limit=n, speed=speed, rate=rate,
                        out=str(tmp / "pub.npz"),
                        sleep_margin_us=args.sleep_margin_us, rt_priority=args.client_rt_priority,
                        min_event_ns=first_event_after(before))

        controls = ep.get("controls")

        def status_now(timeout_s: float = 5.0):
            if controls:
                return _cluster_status(controls, keys)
            return status_or_none(ep["control"], timeout_s, keys)

        subs0 = (before or {}).get("sinks", {}).get("zmq", {}).get("subscribers", 0)
        sub = _client("subscribe", sub_spec, tmp / "sub.json")
        procs.append(sub)
        _expect_ready(sub, "subscriber", 60)
        if args.via == "zmq" and (ep["control"] or controls):  # the service's XPUB saw the subscription
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                st = status_now(1.0) or {}
                if st.get("sinks", {}).get("zmq", {}).get("subscribers", 0) > subs0:
                    break
                time.sleep(0.05)
        time.sleep(0.2)
        pace = f"speed {speed:g}x" if speed is not None else (f"{rate:,.0f} ticks/s" if rate else "max rate")
        _progress(args, f"sending {n:,} ticks via {args.via} at {pace} ...")
        pub = _client("publish", pub_spec, tmp / "pub.json")
        procs.append(pub)
        expected_s = (n / rate if rate else 0) + 120
        try:
            pub_out, pub_err = pub.communicate(timeout=expected_s + 600)
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: stop sending, report what was sent
            interrupt = exc
            _progress(args, "stopping: the publisher stops sending; the scores in flight are still "
                            f"collected (up to {args.idle_timeout:g} s; Ctrl-C again to abort) ...")
            pub.send_signal(signal.SIGINT)
            pub_out, pub_err = pub.communicate(timeout=120)
        if pub.returncode != 0:
            if interrupt is not None:  # stopped before its first send: nothing to report
                _progress(args, "stopped before the first tick was sent: no report")
                raise interrupt
            raise WireRunError(f"the publisher failed ({pub.returncode}): {pub_err.strip()[-2000:]}")
        try:
            sub_out, sub_err = sub.communicate(timeout=args.idle_timeout + 600)
        except KeyboardInterrupt as exc:  # while the last scores come in: stop waiting for them
            if interrupt is not None:
                raise  # the second one: abort
            interrupt = exc
            sub.send_signal(signal.SIGINT)
            sub_out, sub_err = sub.communicate(timeout=120)
        if sub.returncode != 0:
            raise WireRunError(f"the subscriber failed ({sub.returncode}): {sub_err.strip()[-2000:]}")
        after = status_now()
        final = None
        if spawned:
            final = _stop_service(service, ep["control"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if service is not None and service.poll() is None:
            service.kill()
            service.wait()
        keep_log = log_path.read_text() if log_path.exists() else ""
        tmp_files = {}
        if (tmp / "pub.npz").exists() and (tmp / "sub.npz").exists():
            tmp_files = {"pub": dict(np.load(tmp / "pub.npz")), "sub": dict(np.load(tmp / "sub.npz"))}
        tmpdir.cleanup()
    if not tmp_files:
        raise WireRunError(f"no results (service log: {keep_log[-2000:]})")

    pubd, subd = tmp_files["pub"], tmp_files["sub"]
    ti, si = match_scores(pubd["inst"], pubd["ts_event"], subd["inst"], subd["ts_event"],
                          merged=bool(ep.get("controls")))
    if interrupt is not None and len(ti) == 0:  # stopped before a score came back: nothing to report
        _progress(args, f"stopped after {pubd['sent'].size:,} ticks, before a score came back: no report")
        raise interrupt
    intended, sent = pubd["intended"][ti], pubd["sent"][ti]
    recv = subd["recv_ns"][si]
    svc_in, svc_out = subd["ts_in"][si], subd["ts_out"][si]
    wire = recv - intended
    warm = warmup_excluded(args.warmup_ticks, len(wire))  # < len(wire) whenever a score came back
    stats = latency_stats(wire[warm:])
    from_send = latency_stats((recv - sent)[warm:])
    service_t = latency_stats((svc_out - svc_in)[warm:])
    send_lag = latency_stats((sent - intended)[warm:])
    wall_s = (int(recv[-1]) - int(sent[0])) / 1e9 if len(recv) else 0.0
    d_rej = d_drop = None
    status = after or before or {}
    if before is not None and after is not None:
        d_rej = after["rejected"] - before["rejected"]
        d_drop = after["drops"] - before["drops"]
    elif final is not None:
        d_rej, d_drop = final.get("rejected"), final.get("dropped")
    rejected = int(d_rej or 0)
    model = status.get("model", {})
    pub_info, sub_info = _last_json(pub_out), _last_json(sub_out)
    n = int(pub_info.get("sent", n))  # the ticks actually sent (the file's accepted rows, or --limit)
    summary = summarise(
        ticks=n,
        scores=len(ti),
        dropped=n - rejected - len(ti),
        rejected=rejected,
        rejected_by_reason=_delta(before, after),
        wall_s=wall_s,
        stats=stats,
        mode=args.via,
        backend=str(model.get("backend", args.backend)),
        model_path=str(model.get("path", args.model or "")),
        model_version=str(model.get("version", "")),
        quantization=str(model.get("quantization", "")),
        data_path=data_path,
        data_rows=td.total_rows,
        pinned=[] if hot is None else [hot],
        extra={
            "latency_definition": "wire-to-wire: subscriber receive CLOCK_MONOTONIC - intended send time",
            "interrupted": interrupt is not None,
            "warmup_ticks_excluded": warm,
            "speed": speed if speed is not None else "max",
            "rate_tps": rate,
            "latency_from_send_ns": from_send.as_contract(),
            "service_time_ns": service_t.as_contract(),
            "send_lag_ns": send_lag.as_contract(),
            "service_sink_drops": d_drop,
            "received": int(sub_info.get("received", len(subd["recv_ns"]))),
            "unmatched_scores": int(len(subd["recv_ns"]) - len(si)),
            "service": "spawned" if spawned else str(args.service_config),
            "service_final": final,
            "client_cpus": clients,
            "client_idle": client_idle,
            "publisher": pub_info,
            "subscriber": sub_info,
            "out_of_range": stats.out_of_range,
        },
    )
    series = {
        "wire (intended)": wire[warm:],
        "wire (sent)": (recv - sent)[warm:],
        "service": (svc_out - svc_in)[warm:],
    }
    files = {}
    if args.out:
        files = _write(summary, args.out, intended, recv, sent, svc_in, svc_out, subd["seq"][si], warm,
                       series)
    return WireRun(summary, series, files, interrupt)


def _delta(before: dict | None, after: dict | None) -> dict:
    if not after:
        return {}
    b = (before or {}).get("rejected_by_reason", {})
    out = {k: v - b.get(k, 0) for k, v in after.get("rejected_by_reason", {}).items()}
    return {k: v for k, v in out.items() if v}


def _stop_service(proc: subprocess.Popen, endpoint: str) -> dict | None:
    report = None
    try:
        reply = request(endpoint, "stop", timeout_s=30)
        report = reply.get("report")
    except ControlError:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return report


def _write(summary, out_dir, intended, recv, sent, svc_in, svc_out, seq, warm, series) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": str(out / "summary.json")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    files["hgrm"] = str(write_hgrm(recv[warm:] - intended[warm:], out / "latency.hgrm"))
    labels = {"wire (intended)": "wire-to-wire from intended send time",
              "wire (sent)": "wire-to-wire from actual send time",
              "service": "service time (ts_out - ts_in)"}
    files["png"] = str(plot_percentiles({labels[k]: v for k, v in series.items()}, out / "latency.png",
                                        title=f"wire-to-wire latency ({summary['mode']}) by percentile"))
    np.savez_compressed(out / "latency_raw.npz", t_in=intended, t_out=recv, warmup=np.int64(warm),
                        t_sent=sent, t_svc_in=svc_in, t_svc_out=svc_out, seq=seq)
    files["raw"] = str(out / "latency_raw.npz")
    return files


def _progress(args, msg: str) -> None:
    if not args.no_progress:
        print(f"tickscore replay: {msg}", file=sys.stderr, flush=True)


def worker_main(role: str, spec_path: str) -> int:
    """Entry of a wire-mode worker process: ``role`` publish or subscribe, its spec in a JSON file."""
    if role not in ("publish", "subscribe"):
        raise ValueError(f"unknown wire-mode worker role {role!r}")
    spec = json.loads(Path(spec_path).read_text())
    return _publisher(spec) if role == "publish" else _subscriber(spec)
