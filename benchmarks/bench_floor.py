"""Benchmark: what this machine allows, below tickscore (the floor under the wire-to-wire numbers).

Five measurements; the first four with the placement and pace of ``bench_wire.py`` (hot
core 1, clients on core 0, 2,000 messages/s):

* ``hiccups``: a thread spinning on core 1 reading the clock; every gap > 5 µs
  is time the vCPU did not run it (timer ticks, host preemption).  Run once with
  core 0 idle and once with core 0 spinning too.  Reported: stalls > 60 µs per
  second and the share of uniformly arriving ticks that would wait > 60 µs.
* ``ort_paced``: one onnxruntime int8 ``run`` on core 1 every 500 µs, with the
  core spinning in between, cold (nothing else) and kept warm (one extra run on
  the same input every 100 µs while waiting, as the service's ``keep_warm_us``).
* ``zmq_hop``: the wire path with the service replaced by a bare relay: a
  publisher on core 0 (SCHED_FIFO, sleeping then spinning to each send time like
  the wire-mode publisher) -> pyzmq PUB/SUB over ipc -> a relay process
  busy-polling on core 1 (its I/O thread on core 0) that re-sends each message ->
  a subscriber on core 0 (busy-polling at SCHED_IDLE, or blocking in ``recv``).
* ``aeron_hop``: the same path over bare pyaeron ``aeron:ipc`` (embedded driver
  in the subscriber process, busy-polling subscriber at SCHED_IDLE).
* ``zmq_pingpong``: the issue's reference, a blocking pyzmq PUB/SUB ping-pong
  over ipc between two unpinned processes (round trip = two hops), back to back
  and with one round trip every 500 µs.  It calibrates this machine's ZeroMQ
  against the figure the targets were set from.

    python benchmarks/bench_floor.py --json benchmarks/results/floor.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PCTS = (50, 90, 99, 99.9)


def _pcts_us(x: np.ndarray) -> dict:
    return {f"p{p:g}".replace(".", ""): round(float(np.percentile(x, p)) / 1e3, 2) for p in PCTS} | {
        "max": round(float(x.max()) / 1e3, 1), "n": int(len(x))}


def _spin(cpu: int, seconds: float, out=None) -> None:
    os.sched_setaffinity(0, {cpu})
    c = time.perf_counter_ns
    end = c() + int(seconds * 1e9)
    last = c()
    gaps = []
    while True:
        t = c()
        if t - last > 5000:
            gaps.append(t - last)
        last = t
        if t > end:
            break
    if out is not None:
        out.put(gaps)


def hiccups(seconds: float) -> dict:
    res = {}
    for label, other_busy in (("core0_idle", False), ("core0_spinning", True)):
        other = None
        if other_busy:
            other = mp.Process(target=_spin, args=(0, seconds + 0.5))
            other.start()
            time.sleep(0.2)
        q = mp.Queue()
        p = mp.Process(target=_spin, args=(1, seconds, q))
        p.start()
        g = np.asarray(q.get(), dtype=np.int64)
        p.join()
        if other is not None:
            other.join()
        big = g[g > 60_000]
        res[label] = {
            "seconds": seconds,
            "stalls_over_60us_per_s": round(len(big) / seconds, 1),
            "share_of_arrivals_waiting_over_60us_pct": round(
                100 * float(np.clip(g - 60_000, 0, None).sum()) / (seconds * 1e9), 3),
            "stall_time_pct": round(100 * float(g.sum()) / (seconds * 1e9), 2),
            "max_stall_us": round(float(g.max()) / 1e3, 1) if len(g) else 0.0,
        }
    return res


def _ort_paced(q, n: int, period_ns: int, warm_ns: int) -> None:
    import gc

    import onnxruntime as ort

    from models.loader import default_model_path
    from models.ort_backend import make_session_options

    os.sched_setaffinity(0, {1})
    sess = ort.InferenceSession(str(default_model_path("int8")), make_session_options(),
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).random((1, inp.shape[1])).astype(np.float32)
    out = np.zeros((1, 1), np.float32)
    b = sess.io_binding()
    b.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x))
    b.bind_ortvalue_output(sess.get_outputs()[0].name, ort.OrtValue.ortvalue_from_numpy(out))
    run, cb = sess._sess.run_with_iobinding, b._iobinding
    for _ in range(5000):
        run(cb, None)
    c = time.perf_counter_ns
    lat = np.zeros(n, np.int64)
    gc.disable()
    nxt = c()
    for i in range(n):
        nxt += period_ns
        last_warm = c()
        while True:
            t = c()
            if t >= nxt:
                break
            if warm_ns and t - last_warm >= warm_ns:
                run(cb, None)
                last_warm = c()
        t0 = c()
        run(cb, None)
        lat[i] = c() - t0
    q.put(lat)


def ort_paced(n: int, repeat: int) -> dict:
    res: dict = {"period_us": 500, "warm_every_us": 100, "cold": [], "warm": []}
    for _ in range(repeat):  # interleaved
        for label, warm in (("cold", 0), ("warm", 100_000)):
            q = mp.Queue()
            p = mp.Process(target=_ort_paced, args=(q, n, 500_000, warm))
            p.start()
            res[label].append(_pcts_us(q.get()[500:]))
            p.join()
    for label in ("cold", "warm"):
        res[f"{label}_median"] = {k: float(np.median([r[k] for r in res[label]])) for k in res[label][0]}
    return res


def _fifo() -> str:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO 10"
    except OSError as exc:
        return f"default (SCHED_FIFO refused: {exc})"


def _paced_send(send, n: int, period_ns: int, margin_ns: int = 150_000) -> str:
    ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # 1 ns timer slack
    sched = _fifo()
    c = time.perf_counter_ns
    nxt = c() + 2_000_000
    pad = b"x" * 120
    for _ in range(n):
        while True:
            now = c()
            if now >= nxt:
                break
            if nxt - now > margin_ns:
                time.sleep((nxt - now - margin_ns) / 1e9)
        send(now.to_bytes(8, "little") + pad)
        nxt += period_ns
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return sched


def _zmq_sub(ep: str, n: int, mode: str, ready, q) -> None:
    import zmq

    os.sched_setaffinity(0, {0})
    ctx = zmq.Context(1)
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(ep)
    if mode == "spin":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    ready.set()
    c = time.perf_counter_ns
    lat = np.zeros(n, np.int64)
    k = 0
    while k < n:
        if mode == "spin":
            try:
                m = s.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
        else:
            m = s.recv()
        lat[k] = c() - int.from_bytes(m[:8], "little")
        k += 1
    q.put(lat)


def _zmq_relay(ep_in: str, ep_out: str, n: int, ready) -> None:
    """Core 1 busy-polls ``ep_in`` and re-sends each message on ``ep_out`` (I/O thread on core 0)."""
    import zmq

    os.sched_setaffinity(0, {0})
    ctx = zmq.Context(1)  # I/O thread created here, on core 0
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(ep_in)
    p = ctx.socket(zmq.PUB)
    p.bind(ep_out)
    os.sched_setaffinity(0, {1})
    ready.set()
    for _ in range(n):
        while True:
            try:
                m = s.recv(zmq.NOBLOCK)
                break
            except zmq.Again:
                pass
        p.send(m)


def zmq_hop(n: int, mode: str) -> dict:
    import zmq

    os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        ep_in, ep_out = f"ipc://{tmp}/in.ipc", f"ipc://{tmp}/out.ipc"
        ctx = zmq.Context(1)
        pub = ctx.socket(zmq.PUB)
        pub.bind(ep_in)
        r_ready, ready, q = mp.Event(), mp.Event(), mp.Queue()
        relay = mp.Process(target=_zmq_relay, args=(ep_in, ep_out, n, r_ready))
        relay.start()
        r_ready.wait(30)
        p = mp.Process(target=_zmq_sub, args=(ep_out, n, mode, ready, q))
        p.start()
        ready.wait(30)
        time.sleep(0.5)
        sched = _paced_send(pub.send, n, 500_000)
        lat = q.get()
        p.join()
        relay.join()
        pub.close(0)
        ctx.term()
    return {"path": "publisher core 0 -> relay core 1 (busy-poll) -> subscriber core 0",
            "subscriber": mode, "publisher": sched, **_pcts_us(lat[500:])}


def _aeron_sub(adir: str, n: int, ready, q) -> None:
    import pyaeron

    os.sched_setaffinity(0, {0})
    driver = pyaeron.MediaDriver(dir=adir, threading="shared", dir_delete_on_start=True,
                                 dir_delete_on_shutdown=True)
    client = pyaeron.Aeron(context=pyaeron.Context(dir=adir, error_handler=_quiet))
    sub = client.add_subscription("aeron:ipc", 1001)
    ready.set()
    sub.await_connected(timeout=60)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    c = time.perf_counter_ns
    lat = np.zeros(n, np.int64)
    box = [0]

    def handler(buf, header):
        lat[box[0]] = c() - int.from_bytes(buf.tobytes()[:8], "little")
        box[0] += 1

    while box[0] < n:
        sub.poll(handler, 16)
    q.put(lat)
    client.close()
    driver.close()


def _quiet(code, message) -> None:
    """Aeron client error handler: without one the C client exits the process when the driver stops."""


def _aeron_relay(adir: str, n: int, ready) -> None:
    """Core 1 busy-polls stream 1000 and re-offers each message on stream 1001."""
    import pyaeron

    os.sched_setaffinity(0, {0})
    # the client's conductor thread is created here, on core 0
    client = pyaeron.Aeron(context=pyaeron.Context(dir=adir, error_handler=_quiet))
    sub = client.add_subscription("aeron:ipc", 1000)
    pub = client.add_exclusive_publication("aeron:ipc", 1001)
    os.sched_setaffinity(0, {1})
    ready.set()
    box = [0]

    def handler(buf, header):
        b = buf.tobytes()
        while pub.offer(b) is not True:
            pass
        box[0] += 1

    while box[0] < n:
        sub.poll(handler, 16)
    time.sleep(0.5)
    client.close()


def aeron_hop(n: int) -> dict:
    import pyaeron

    os.sched_setaffinity(0, {0})
    adir = f"/dev/shm/tickscore-floor-{os.getpid()}"
    ready, r_ready, q = mp.Event(), mp.Event(), mp.Queue()
    p = mp.Process(target=_aeron_sub, args=(adir, n, ready, q))
    p.start()
    ready.wait(30)
    relay = mp.Process(target=_aeron_relay, args=(adir, n, r_ready))
    relay.start()
    r_ready.wait(30)
    time.sleep(0.3)
    client = pyaeron.Aeron(context=pyaeron.Context(dir=adir, error_handler=_quiet))
    pub = client.add_exclusive_publication("aeron:ipc", 1000)
    pub.await_connected(timeout=30)
    time.sleep(0.2)

    def send(b: bytes) -> None:
        while pub.offer(b) is not True:
            pass

    sched = _paced_send(send, n, 500_000)
    lat = q.get()
    p.join()
    relay.join()
    client.close()
    return {"path": "publisher core 0 -> relay core 1 (busy-poll) -> subscriber core 0",
            "subscriber": "spin", "publisher": sched, **_pcts_us(lat[500:])}


def _zmq_echo(ep_in: str, ep_out: str, n: int, ready) -> None:
    import zmq

    ctx = zmq.Context(1)
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(ep_in)
    p = ctx.socket(zmq.PUB)
    p.connect(ep_out)
    ready.set()
    for _ in range(n):
        p.send(s.recv())


def zmq_pingpong(n: int, period_us: int) -> dict:
    """Round trips of a blocking PUB/SUB ping-pong over ipc, unpinned (the issue's reference setup)."""
    import zmq

    os.sched_setaffinity(0, {0, 1})
    with tempfile.TemporaryDirectory() as tmp:
        a, b = f"ipc://{tmp}/a.ipc", f"ipc://{tmp}/b.ipc"
        ctx = zmq.Context(1)
        pub = ctx.socket(zmq.PUB)
        pub.bind(a)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind(b)
        ready = mp.Event()
        echo = mp.Process(target=_zmq_echo, args=(a, b, 1 << 30, ready))
        echo.start()
        ready.wait(30)
        while True:  # until both subscriptions are through
            pub.send(b"x")
            if sub.poll(100):
                sub.recv()
                break
        c = time.perf_counter_ns
        rtt = np.zeros(n, np.int64)
        msg = b"y" * 128
        for i in range(n):
            if period_us:
                time.sleep(period_us / 1e6)
            t = c()
            pub.send(msg)
            sub.recv()
            rtt[i] = c() - t
        echo.kill()
        echo.join()
        pub.close(0)
        sub.close(0)
        ctx.term()
    return {"path": "ping-pong, two unpinned processes, blocking recv; round trip (two hops)",
            "period_us": period_us, **_pcts_us(rtt[500:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="hiccup measurement per case (default 10)")
    ap.add_argument("--messages", type=int, default=10_000,
                    help="messages / model calls per case (default 10000)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats of the ort cases (default 2)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("bench_floor: needs 2 cores (0 and 1)", file=sys.stderr)
        return 2
    out = {
        "benchmark": "machine floor: vCPU stalls, paced onnxruntime cold vs warm, bare ZeroMQ and Aeron hops"
                     ", ZeroMQ ping-pong",
        "command": "python benchmarks/bench_floor.py " + " ".join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "created_unix": time.time(),
    }
    out["hiccups"] = hiccups(args.seconds)
    print("hiccups", json.dumps(out["hiccups"]), flush=True)
    out["ort_paced"] = ort_paced(args.messages, args.repeat)
    print("ort cold", out["ort_paced"]["cold_median"], flush=True)
    print("ort warm", out["ort_paced"]["warm_median"], flush=True)
    out["zmq_hop"] = [zmq_hop(args.messages, "spin"), zmq_hop(args.messages, "block")]
    print("zmq hop", json.dumps(out["zmq_hop"]), flush=True)
    out["aeron_hop"] = aeron_hop(args.messages)
    print("aeron hop", json.dumps(out["aeron_hop"]), flush=True)
    out["zmq_pingpong"] = [zmq_pingpong(args.messages, 0), zmq_pingpong(args.messages, 500)]
    print("zmq ping-pong", json.dumps(out["zmq_pingpong"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
