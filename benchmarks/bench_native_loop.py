"""Benchmark: the native duty cycle against the python loop, publishing to a draining subscriber.

One run, this 2-core machine: the hot loop pinned to core 1, ZeroMQ PUB over ipc to
an independent subscriber process on core 0 that drains every Score, checks that
``seq`` is contiguous from 0 and that every payload is exactly msgspec's encoding of
its decoded row, and digests the Scores without their two clock fields and the run's epoch (so the
loops' outputs can be compared score by score).  The subscriber (``--subscriber``):

* ``compiled`` (default, ``benchmarks/drain_sub.py``): a numba loop of ``zmq_recv`` calls that
  copies each message and its CLOCK_MONOTONIC arrival time into preallocated memory, and
  runs the checks once the stream has ended.  It costs core 0 a few hundred nanoseconds per
  Score, so what it measures is the transport's delivery rather than Python's.  It also
  reports what the subscriber saw: the wire-to-wire time of each Score (arrival minus the
  Score's ``ts_out_ns``, the publisher's clock just before its send; for the bare sends,
  arrival minus the send's own clock reading) and the rate the stream arrived at.
* ``python``: ``recv_multipart`` + decode + checks per message in Python (several
  microseconds each: at 2M Scores/s it falls seconds behind and keeps core 0 busy).

Configurations, alternated ``--repeats`` times (medians of the per-run figures are reported):

* ``native``: ``--loop native`` (fused backend, one compiled call per batch);
* ``python``: ``--loop python`` with the same fused backend (per-tick Python);
* ``python_ort``: ``--loop python --backend ort``: a per-row Python loop with
  onnxruntime (the numba feature kernel, then ``session.run``): the peer baseline.

Latency is each tick's own ingress-to-publish-returned time (t_out - t_in), first
``--warmup`` ticks excluded; throughput is scores / (last t_out - first t_in).  The
subscriber's figures (``wire_*_ns``, ``recv_per_s``) are beside them: a send returns once
libzmq has queued the message, and ZeroMQ queues without bound here (no high-water mark),
so a loop that sends faster than the transport delivers builds a backlog the subscriber
sees as wire-to-wire time.

    python benchmarks/bench_native_loop.py --json benchmarks/results/native_loop.json
    python benchmarks/bench_native_loop.py --events 5000000 --repeats 1 \
        --json benchmarks/results/native_loop_5m.json

* ``native_aeron``: ``--loop native --publish aeron:ipc`` to a subscriber on core 0
  that embeds the media driver and busy-polls at ``SCHED_IDLE`` (checks as above, but
  Aeron carries the payload only): the same loop on a transport whose send is a
  write into shared memory, no system call and no thread to wake.
* ``native_nopub``: ``--loop native --publish none``: the same loop without a socket
  (validate, features, model, Score encode, clock readings): what the loop costs
  apart from the transport.
* ``bare_send``: the transport floor in the same run: a numba loop that only reads
  the clock, ``zmq_send``s a fixed Score-sized payload on the same kind of socket to
  the same draining subscriber, and reads the clock again (no features, no model,
  no encode).  What the native loop adds is its latency minus this one.
* ``bare_send_paced``: the same, with the sends spaced by the loop's own time per tick
  (``native_nopub``'s of the same repeat): the transport at the rate the loop sends.
* ``bare_send_sweep`` (not in the default set): the bare send spaced by each of
  ``--sweep-gaps`` ns in turn (one subscriber each): the transport's send rate and the
  rate a draining subscriber receives at, as a function of the work per tick before
  each send.  Where the native loop's time per tick without a socket lies on this curve
  tells what ZeroMQ itself allows the loop at that pace on this machine.

    python benchmarks/bench_native_loop.py --repeats 5 --configs \
        bare_send,native_nopub,bare_send_paced,native,native_aeron,python,python_ort,bare_send_sweep \
        --json benchmarks/results/native_loop_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DRAIN_SUB = str(ROOT / "benchmarks" / "drain_sub.py")  # the compiled subscriber; its checks serve all three
sys.path.insert(0, str(ROOT))

_SUB = r"""
import os, sys, time, zmq
sys.path.insert(0, os.path.dirname(sys.argv[3]))
from drain_sub import ScoreChecker
os.sched_setaffinity(0, {0})
ep, out = sys.argv[1], sys.argv[2]
ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.RCVHWM, 0); s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(ep)
print("ready", flush=True)
check = ScoreChecker(); first = None
while True:
    if not s.poll(3000 if first else 120000):
        break
    topic, p = s.recv_multipart()
    first = first or time.monotonic()
    check.add(p, topic)
open(out, "w").write(__import__("json").dumps(check.result()))
"""

_AERON_SUB = r"""
import os, sys, time, pyaeron
sys.path.insert(0, os.path.dirname(sys.argv[3]))
from drain_sub import ScoreChecker
os.sched_setaffinity(0, {0})
adir, out = sys.argv[1], sys.argv[2]
driver = pyaeron.MediaDriver(dir=adir, threading="shared", dir_delete_on_start=True,
                             dir_delete_on_shutdown=True)
client = pyaeron.Aeron(context=pyaeron.Context(dir=adir, error_handler=lambda code, msg: None))
sub = client.add_subscription("aeron:ipc", 1002)
print("ready", flush=True)
sub.await_connected(timeout=120)
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # busy-polls, never delays core 0's others
check = ScoreChecker()
def handler(buf, header):
    check.add(buf.tobytes())  # Aeron carries the payload only: no topic
last = time.monotonic()
while time.monotonic() - last < 3.0:
    if sub.poll(handler, 256):
        last = time.monotonic()
open(out, "w").write(__import__("json").dumps(check.result()))
client.close(); driver.close()
"""

CONFIGS = {
    "bare_send": {"loop": "-", "backend": "-"},
    "bare_send_paced": {"loop": "-", "backend": "-"},
    "bare_send_sweep": {"loop": "-", "backend": "-"},
    "native": {"loop": "native", "backend": "fused"},
    "native_nopub": {"loop": "native", "backend": "fused"},
    "native_aeron": {"loop": "native", "backend": "fused"},
    "python": {"loop": "python", "backend": "fused"},
    "python_ort": {"loop": "python", "backend": "ort"},
}


#: messages per bare-send run; the subscriber also gets the _COMPILE_SENDS sends that compile the loop
_BARE_N = 250_000
_COMPILE_SENDS = 10


def _bare_send(ep: str, n: int, warmup: int, gap_ns: int = 0) -> dict:
    """The transport alone: clock, zmq_send of a fixed 60-byte Score, clock; pinned like the replay.

    ``gap_ns`` > 0 spins that long after each send (outside the measured window), so the sends
    come at the native loop's rate: libzmq's I/O thread then drains its pipe and sleeps between
    them more often, and a send that finds it asleep wakes it (an eventfd write).
    """
    from numba import njit

    from engine.native_loop import bind_clock
    from engine.native_zmq import bind_libzmq, make_sender
    from engine.wire import Score, ScoreEncoder
    from engine.zmq_io import ZmqPublisher

    pub = ZmqPublisher(ep, sndhwm=0, io_cpu=0)
    pub.wait_for_subscribers(1, 30)
    send = make_sender(bind_libzmq())
    clock = bind_clock()
    body = bytes(ScoreEncoder().encode(Score("ESZ6", 123456, 1_750_000_000_000_000_000, 1 << 40, 1 << 40,
                                             0.25, "risk-int8-3f724ad019", 17)))  # fmt: skip
    payload = np.frombuffer(body, np.uint8).copy()
    topic = np.frombuffer(b"ESZ6", np.uint8).copy()

    @njit(nogil=True)
    def run(sock, topic, payload, t_in, t_out, ts, gap_ns):
        for i in range(t_in.shape[0]):
            clock(1, ts.ctypes.data)
            t_in[i] = ts[0] * 1_000_000_000 + ts[1]
            send(sock, topic, topic.shape[0], payload, payload.shape[0])
            clock(1, ts.ctypes.data)
            t_out[i] = ts[0] * 1_000_000_000 + ts[1]
            if gap_ns > 0:
                until = t_out[i] + gap_ns
                while ts[0] * 1_000_000_000 + ts[1] < until:
                    clock(1, ts.ctypes.data)

    t_in, t_out, ts = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(2, np.int64)
    c = _COMPILE_SENDS
    run(pub.sock.underlying, topic, payload, t_in[:c], t_out[:c], ts, 0)  # compiles; the subscriber skips
    os.sched_setaffinity(0, {1})
    try:
        run(pub.sock.underlying, topic, payload, t_in, t_out, ts, gap_ns)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        pub.close()
    lat = (t_out - t_in)[warmup:]
    return {"t_out": t_out, "loop": "bare zmq_send", "backend": "-", "scores": n, "dropped": 0,
            "gap_ns": gap_ns, "p50_ns": int(np.percentile(lat, 50)), "p99_ns": int(np.percentile(lat, 99)),
            "p999_ns": int(np.percentile(lat, 99.9)),
            "ticks_per_s": n / ((t_out[-1] - t_in[0]) / 1e9)}  # fmt: skip


def _code_version() -> dict:
    """The commit the measured code is at and whether the tree had changes (None outside a git checkout)."""
    def git(*a: str) -> str | None:
        try:
            r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": None if status is None else bool(status)}


def _pair_wire(recv_ns: np.ndarray, t_out: np.ndarray, warmup: int) -> dict:
    """Wire-to-wire percentiles of the bare send: receive time minus send time, message by message.

    The subscriber received the _COMPILE_SENDS compile-time sends first, then the run's in order (one
    publisher, one pipe).
    """
    c = _COMPILE_SENDS
    wire = (recv_ns[c : c + t_out.shape[0]] - t_out)[warmup:]
    return {q: int(np.percentile(wire, p)) for q, p in (("p50", 50), ("p99", 99), ("p999", 99.9))}


def _sweep(tmp: Path, k: int, warmup: int, gaps: list[int]) -> dict:
    """``bare_send_paced`` at each spacing of ``gaps`` (ns), each to its own compiled draining subscriber."""
    points = []
    for g in gaps:
        r = _one("bare_send_paced", None, 0, warmup, tmp, f"{k}-sweep-{g}", g)
        got = r["subscriber"]
        points.append({"gap_ns": g, "send_per_s": r["ticks_per_s"], "p50_ns": r["p50_ns"],
                       "p99_ns": r["p99_ns"], "recv_per_s": got["recv_per_s"], "received": got["count"],
                       "sent": _BARE_N + _COMPILE_SENDS})  # fmt: skip
        print(f"  sweep gap {g:4d} ns: sent at {r['ticks_per_s'] / 1e6:.2f} M/s (send p50 {r['p50_ns']} ns), "
              f"received at {got['recv_per_s'] / 1e6:.2f} M/s", file=sys.stderr)  # fmt: skip
    return {"loop": "bare zmq_send", "backend": "-", "points": points, "subscriber": None}


def _one(name: str, data: str | None, events: int, warmup: int, tmp: Path, k: int | str, gap_ns: int = 0,
         subscriber: str = "compiled") -> dict:  # fmt: skip
    from replay.run import ReplayOptions, run_inprocess

    cfg = CONFIGS[name]
    if name == "native_nopub":  # no socket, no subscriber
        opts = ReplayOptions(data=data, publish=None, progress=False, pin=1, warmup_ticks=warmup,
                             loop=cfg["loop"], backend=cfg["backend"], limit=events or None)  # fmt: skip
        s = run_inprocess(opts).summary
        return {"loop": s["loop"], "backend": s["backend"], "scores": s["scores"], "dropped": s["dropped"],
                "p50_ns": s["latency_ns"]["p50"], "p99_ns": s["latency_ns"]["p99"],
                "p999_ns": s["latency_ns"]["p999"],
                "ticks_per_s": s["scores"] / s["wall_s"] if s["wall_s"] else 0.0,
                "subscriber": None}  # fmt: skip
    if name == "native_aeron":  # aeron:ipc to a subscriber on core 0 that embeds the driver
        adir = f"/dev/shm/tickscore-bench-aeron-{os.getpid()}-{k}"
        out = tmp / f"sub-{name}-{k}.json"
        cmd = [sys.executable, "-c", _AERON_SUB, adir, str(out), DRAIN_SUB]
        sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert sub.stdout.readline().strip() == "ready"
        opts = ReplayOptions(data=data, publish="aeron:ipc", aeron_dir=adir, progress=False, pin=1,
                             wait_subscribers=1, warmup_ticks=warmup, loop=cfg["loop"],
                             backend=cfg["backend"], limit=events or None)  # fmt: skip
        s = run_inprocess(opts).summary
        sub.wait(timeout=600)
        return {"loop": s["loop"], "backend": s["backend"], "scores": s["scores"], "dropped": s["dropped"],
                "p50_ns": s["latency_ns"]["p50"], "p99_ns": s["latency_ns"]["p99"],
                "p999_ns": s["latency_ns"]["p999"],
                "ticks_per_s": s["scores"] / s["wall_s"] if s["wall_s"] else 0.0,
                "aeron": s["aeron"], "subscriber": json.loads(out.read_text())}  # fmt: skip
    ep = f"ipc://{tmp}/bench-{name}-{k}.ipc"
    out = tmp / f"sub-{name}-{k}.json"
    recv = tmp / f"recv-{name}-{k}.npy"  # the compiled subscriber's receive times
    cmd = ["-c", _SUB, ep, str(out), DRAIN_SUB] if subscriber == "python" else [DRAIN_SUB, ep, str(out),
                                                                                str(recv)]  # fmt: skip
    sub = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, text=True)
    assert sub.stdout.readline().strip() == "ready"
    if name in ("bare_send", "bare_send_paced"):
        r = _bare_send(ep, _BARE_N, warmup, gap_ns if name == "bare_send_paced" else 0)
        sub.wait(timeout=600)
        r["subscriber"] = json.loads(out.read_text())
        if subscriber == "compiled":  # one fixed payload: pair the receive times with the send times
            r["subscriber"]["wire_ns"] = _pair_wire(np.load(recv), r["t_out"], warmup)
        del r["t_out"]
        r["scores"] = r["subscriber"]["count"]  # the compile-time sends too
        return r
    opts = ReplayOptions(data=data, publish=ep, progress=False, pin=1, wait_subscribers=1, sndhwm=0,
                         warmup_ticks=warmup, loop=cfg["loop"], backend=cfg["backend"],
                         limit=events or None)  # fmt: skip
    res = run_inprocess(opts)
    sub.wait(timeout=600)
    got = json.loads(out.read_text())
    s = res.summary
    return {
        "loop": s["loop"],
        "backend": s["backend"],
        "scores": s["scores"],
        "dropped": s["dropped"],
        "p50_ns": s["latency_ns"]["p50"],
        "p99_ns": s["latency_ns"]["p99"],
        "p999_ns": s["latency_ns"]["p999"],
        "ticks_per_s": s["scores"] / s["wall_s"] if s["wall_s"] else 0.0,
        "subscriber": got,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--events", type=int, default=0, help="generate N events (0 = the default data)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--configs",
                    default="bare_send,native_nopub,bare_send_paced,native,native_aeron,python,python_ort")
    ap.add_argument("--gap-ns", type=int, default=600,
                    help="bare_send_paced's spacing when native_nopub has not run before it")  # fmt: skip
    ap.add_argument("--subscriber", choices=("compiled", "python"), default="compiled",
                    help="the ZeroMQ subscriber: drain_sub.py (compiled receive, checks after) or a Python "
                         "recv/decode/check per message")  # fmt: skip
    ap.add_argument("--sweep-gaps", default="0,100,200,250,300,400",
                    help="bare_send_sweep's spacings in ns (comma-separated)")  # fmt: skip
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sweep_gaps = [int(g) for g in args.sweep_gaps.split(",")]
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="tickscore-bench-native-") as tmp:
        tmp = Path(tmp)
        data = None
        if args.events:
            from replay.generator import write_market  # the seeded L1 market

            data = str(tmp / "big.parquet")
            t = time.time()
            write_market(data, n_events=args.events)
            print(f"generated {args.events:,} events in {time.time() - t:.0f} s", file=sys.stderr)
        for k in range(args.repeats):
            for n in names:
                # the paced bare send spaces its sends by this run's loop time per tick without a socket
                nopub = [1e9 / x["ticks_per_s"] for x in runs.get("native_nopub", []) if x["ticks_per_s"]]
                gap = int(np.median(nopub)) if nopub else args.gap_ns
                if n == "bare_send_sweep":
                    runs[n].append(_sweep(tmp, k, args.warmup, sweep_gaps))
                    continue
                r = _one(n, data, 0, args.warmup, tmp, k, gap, args.subscriber)
                runs[n].append(r)
                sub = dict(r["subscriber"] or {})
                wire, rate = sub.pop("wire_ns", None), sub.pop("recv_per_s", None)
                seen = (f"; subscriber: wire p50 {wire['p50'] / 1e3:.1f} p99 {wire['p99'] / 1e3:.1f} µs, "
                        f"received at {rate / 1e6:.2f} M/s") if wire and rate else ""  # fmt: skip
                print(f"{n:11s} run {k}: p50 {r['p50_ns']} p99 {r['p99_ns']} p99.9 {r['p999_ns']} ns, "
                      f"{r['ticks_per_s'] / 1e6:.2f} M/s{seen}; {sub}", file=sys.stderr)  # fmt: skip

    def med(n: str, key: str) -> float:
        return float(np.median([r[key] for r in runs[n]]))

    sweep = runs.pop("bare_send_sweep", None)
    names = [n for n in names if n != "bare_send_sweep"]
    summary = {n: {k: med(n, k) for k in ("p50_ns", "p99_ns", "p999_ns", "ticks_per_s")} for n in names}
    if sweep:  # per spacing, the medians over the repeats
        summary["bare_send_sweep"] = [
            {"gap_ns": g, **{key: float(np.median([r["points"][j][key] for r in sweep]))
                             for key in ("send_per_s", "recv_per_s", "p50_ns", "p99_ns")}}
            for j, g in enumerate(sweep_gaps)]  # fmt: skip
    for n in names:  # what the subscriber saw: publish-to-receive time and the rate the stream arrived at
        subs = [r["subscriber"] for r in runs[n] if r["subscriber"] and "wire_ns" in r["subscriber"]]
        if subs and len(subs) == len(runs[n]):
            for q in ("p50", "p99", "p999"):
                summary[n][f"wire_{q}_ns"] = float(np.median([x["wire_ns"][q] for x in subs]))
            summary[n]["recv_per_s"] = float(np.median([x["recv_per_s"] for x in subs]))
    subscribed = [n for n in names if n != "native_nopub"]
    digests = {n: sorted({r["subscriber"]["digest"] for r in runs[n]}) for n in subscribed}
    scored = [n for n in subscribed if not n.startswith("bare_send")]  # the bare send repeats one seq
    checks = {
        "every_score_received": all(r["subscriber"]["count"] == r["scores"]
                                    for n in subscribed for r in runs[n]),  # fmt: skip
        "no_seq_gap": all(r["subscriber"]["seq_gaps"] == 0 for n in scored for r in runs[n]),
        "payloads_canonical": all(r["subscriber"]["noncanonical"] == 0 for n in subscribed for r in runs[n]),
        "same_scores_native_python": digests.get("native") == digests.get("python")
        if "native" in names and "python" in names else None,
    }  # fmt: skip
    if sweep:
        checks["every_sweep_message_received"] = all(p["received"] == p["sent"]
                                                     for r in sweep for p in r["points"])  # fmt: skip
    ratios = {}
    if "native" in names and "python" in names:
        ratios["native_over_python_p99"] = summary["native"]["p99_ns"] / summary["python"]["p99_ns"]
        ratios["native_over_python_p50"] = summary["native"]["p50_ns"] / summary["python"]["p50_ns"]
        nat, py = summary["native"], summary["python"]
        ratios["native_throughput_x_python"] = nat["ticks_per_s"] / py["ticks_per_s"]
    if "native" in names and "bare_send" in names:
        for q in ("p50_ns", "p99_ns", "p999_ns"):
            ratios[f"native_above_bare_send_{q}"] = summary["native"][q] - summary["bare_send"][q]
    if "native" in names and "bare_send_paced" in names:
        for q in ("p50_ns", "p99_ns", "p999_ns"):
            ratios[f"native_above_bare_send_paced_{q}"] = summary["native"][q] - summary["bare_send_paced"][q]
    if "native" in names and "native_nopub" in names:
        for q in ("p50_ns", "p99_ns", "p999_ns"):
            ratios[f"native_publish_cost_{q}"] = summary["native"][q] - summary["native_nopub"][q]
    if "native_aeron" in names and "python" in names:
        digests_ok = digests.get("native_aeron") == digests.get("python")
        checks["same_scores_native_aeron_python"] = digests_ok
    if "native" in names and "python_ort" in names:
        ratios["python_ort_p99_over_native"] = summary["python_ort"]["p99_ns"] / summary["native"]["p99_ns"]
    report = {
        "benchmark": "native_loop",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "code": _code_version(),
        "events": args.events or "default data",
        "repeats": args.repeats,
        "median_of_runs": summary,
        "ratios": ratios,
        "checks": checks,
        "runs": runs | ({"bare_send_sweep": sweep} if sweep else {}),
    }
    print(json.dumps({"median_of_runs": summary, "ratios": ratios, "checks": checks}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
