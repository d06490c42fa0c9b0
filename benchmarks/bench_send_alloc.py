"""Where ZeroMQ's per-send tail comes from: the message allocation (issue: native duty cycle).

A numba loop pinned to core 1 publishes a fixed Score-sized ``[topic, payload]`` on an
XPUB bound to an ipc path, to a subscriber process on core 0 that receives every message
(the I/O thread of the publisher on core 0 as well), reading the clock around each send.
Three ways to hand libzmq the ~70-byte payload:

* ``copy``: ``zmq_send``, what tickscore does: libzmq allocates the message (payload over
  33 bytes) in the sending thread, and its I/O thread frees it on the other core;
* ``callback``: ``zmq_msg_init_data`` of a slot of a preallocated ring with a free
  function (a numba ``cfunc``) that marks the slot free again: the payload is not
  allocated, but libzmq still allocates (and its I/O thread frees) the message's
  reference-count block;
* ``constant``: ``zmq_msg_init_data`` with no free function (libzmq allocates nothing):
  a diagnostic only. libzmq never says when it is done with such a message, and a pipe
  can hold one indefinitely (a topic filter, a slow subscriber under per-subscriber
  drops), so no ring size makes this safe for a real publisher.

Each way runs back to back and paced (``--gap-ns`` of spinning after each send, outside
the measured window: about the native loop's own time per tick, so libzmq sees the loop's
rate); the ways alternate ``--repeats`` times and the medians of the per-run figures are
reported.

    python benchmarks/bench_send_alloc.py --json benchmarks/results/send_alloc.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from numba import carray, cfunc, njit, types

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.native_loop import bind_clock  # noqa: E402
from engine.native_zmq import bind_libzmq, libzmq_path  # noqa: E402
from engine.wire import Score, ScoreEncoder  # noqa: E402
from engine.zmq_io import ZmqPublisher  # noqa: E402
from models.tick_kernels import _ptr  # noqa: E402

_SUB = r"""
import os, sys, zmq
os.sched_setaffinity(0, {0})
ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.RCVHWM, 0); s.connect(sys.argv[1])
s.setsockopt(zmq.SUBSCRIBE, b"")
print("ready", flush=True); n = 0; first = True
while s.poll(120000 if first else 2000):
    s.recv_multipart(); n += 1; first = False
print(n, flush=True)
"""

WAYS = ("copy", "callback", "constant")
SLOTS, SLOT = 1 << 14, 128


@cfunc(types.void(types.int64, types.int64))
def _release(data, hint):  # zmq_free_fn: the slot's flag back to 0
    carray(_ptr(hint, np.int64), (1,))[0] = 0


def _bind():
    lib = ctypes.CDLL(libzmq_path())
    init = lib.zmq_msg_init_data
    init.argtypes, init.restype = [ctypes.c_size_t] * 5, ctypes.c_int
    msend = lib.zmq_msg_send
    msend.argtypes, msend.restype = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return bind_libzmq().zmq_send, init, msend


def _make_run():
    zsend, init, msend = _bind()
    clock = bind_clock()

    @njit(nogil=True)
    def run(way, sock, topic, payload, ring, flags, msg, release, t_in, t_out, ts, gap_ns):
        nb = payload.shape[0]
        copied = 0
        for i in range(t_in.shape[0]):
            clock(1, ts.ctypes.data)
            t_in[i] = ts[0] * 1_000_000_000 + ts[1]
            k = i & (SLOTS - 1)
            if way == 0 or (way == 1 and flags[k] != 0):
                zsend(sock, topic.ctypes.data, topic.shape[0], 3)  # SNDMORE | DONTWAIT
                zsend(sock, payload.ctypes.data, nb, 1)
                copied += way
            else:
                for j in range(nb):
                    ring[k * SLOT + j] = payload[j]
                zsend(sock, topic.ctypes.data, topic.shape[0], 3)
                if way == 1:
                    flags[k] = 1
                    init(msg.ctypes.data, ring.ctypes.data + k * SLOT, nb, release, flags.ctypes.data + 8 * k)
                else:
                    init(msg.ctypes.data, ring.ctypes.data + k * SLOT, nb, 0, 0)
                msend(msg.ctypes.data, sock, 1)
            clock(1, ts.ctypes.data)
            t_out[i] = ts[0] * 1_000_000_000 + ts[1]
            if gap_ns > 0:
                until = t_out[i] + gap_ns
                while ts[0] * 1_000_000_000 + ts[1] < until:
                    clock(1, ts.ctypes.data)
        return copied

    return run


def _one(run, way: str, gap_ns: int, n: int, warmup: int, tmp: Path, k: int) -> dict:
    ep = f"ipc://{tmp}/send-{way}-{gap_ns}-{k}.ipc"
    sub = subprocess.Popen([sys.executable, "-c", _SUB, ep], stdout=subprocess.PIPE, text=True)
    assert sub.stdout.readline().strip() == "ready"
    pub = ZmqPublisher(ep, sndhwm=0, io_cpu=0)
    pub.wait_for_subscribers(1, 30)
    body = bytes(ScoreEncoder().encode(Score("ESZ6", 123456, 1_750_000_000_000_000_000, 1 << 40, 1 << 40,
                                             0.25, "risk-int8-3f724ad019", 17)))  # fmt: skip
    payload = np.frombuffer(body, np.uint8).copy()
    topic = np.frombuffer(b"ESZ6", np.uint8).copy()
    # the ring outlives the context (pub.close terminates it): "constant" messages may still be queued
    ring, flags, msg = np.zeros(SLOTS * SLOT, np.uint8), np.zeros(SLOTS, np.int64), np.zeros(8, np.int64)
    t_in, t_out, ts = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(2, np.int64)
    w = WAYS.index(way)
    args = (pub.sock.underlying, topic, payload, ring, flags, msg, _release.address)
    run(w, *args, t_in[:10], t_out[:10], ts, 0)  # compiled already; the subscriber counts these
    os.sched_setaffinity(0, {1})
    try:
        copied = run(w, *args, t_in, t_out, ts, gap_ns)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        pub.close()
    got = int(sub.communicate(timeout=120)[0].strip())
    lat = (t_out - t_in)[warmup:]
    return {"way": way, "gap_ns": gap_ns, "sent": n + 10, "received": got, "copied": int(copied),
            "p50_ns": int(np.percentile(lat, 50)), "p99_ns": int(np.percentile(lat, 99)),
            "p999_ns": int(np.percentile(lat, 99.9)),
            "sends_per_s": n / ((t_out[-1] - t_in[0]) / 1e9)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=250_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gap-ns", type=int, default=450, help="spacing of the paced runs (~ the loop's time)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    run = _make_run()
    with tempfile.TemporaryDirectory(prefix="tickscore-send-alloc-") as tmp:
        # compile once, outside every measured run
        z, b = np.zeros(2, np.int64), np.zeros(SLOT, np.uint8)
        run(0, 0, b, b, b, z, z, 0, z[:0], z[:0], z, 0)
        runs: dict[str, list[dict]] = {}
        for k in range(args.repeats):
            for gap in (0, args.gap_ns):
                for way in WAYS:
                    r = _one(run, way, gap, args.messages, args.warmup, Path(tmp), k)
                    runs.setdefault(f"{way}_{'paced' if gap else 'b2b'}", []).append(r)
                    print(f"{way:8s} gap {gap:4d} run {k}: p50 {r['p50_ns']} p99 {r['p99_ns']} p99.9 "
                          f"{r['p999_ns']} ns, {r['sends_per_s'] / 1e6:.2f} M/s, received {r['received']:,}"
                          f"{', copied ' + format(r['copied'], ',') if r['copied'] else ''}",
                          file=sys.stderr)  # fmt: skip
    qs = ("p50_ns", "p99_ns", "p999_ns", "sends_per_s")
    med = {name: {q: float(np.median([r[q] for r in rs])) for q in qs} for name, rs in runs.items()}
    ratios = {f"{way}_over_copy_{mode}_{q}": med[f"{way}_{mode}"][q] / med[f"copy_{mode}"][q]
              for way in ("callback", "constant") for mode in ("b2b", "paced")
              for q in ("p50_ns", "p99_ns", "p999_ns")}  # fmt: skip
    checks = {"every_message_received": all(r["received"] == r["sent"] for rs in runs.values() for r in rs)}
    report = {"benchmark": "send_alloc",
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "machine": platform.machine()},
              "messages": args.messages, "repeats": args.repeats, "gap_ns": args.gap_ns,
              "median_of_runs": med, "ratios": ratios, "checks": checks, "runs": runs}  # fmt: skip
    print(json.dumps({"median_of_runs": med, "ratios": ratios, "checks": checks}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
