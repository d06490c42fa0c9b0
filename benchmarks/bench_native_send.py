"""Cost of one two-frame publish: libzmq's zmq_send from a numba loop vs pyzmq (issue 16).

An XPUB socket bound to an ipc path with no subscriber (libzmq drops each message
at once, so this measures the call path to libzmq, not the transport):

* ``pyzmq_send``: ``sock.send(topic, SNDMORE|NOBLOCK); sock.send(payload, NOBLOCK)``;
* ``pyzmq_raw_send``: the same through Cython ``zmq.backend.Socket.send`` (what the hot
  path uses today, :func:`engine.zmq_io.raw_send`);
* ``native_loop``: :func:`engine.native_zmq.make_sender` called from one numba loop over
  every message (what a native duty cycle would do).

``python benchmarks/bench_native_send.py --json benchmarks/results/native_send.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.native_zmq import bind_libzmq, make_sender  # noqa: E402
from engine.zmq_io import raw_send  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.messages
    send2 = make_sender(bind_libzmq())

    @njit(nogil=True, _nrt=False)
    def native_loop(sock, topic, payload, n):
        bad = 0
        for _ in range(n):
            if send2(sock, topic, topic.shape[0], payload, payload.shape[0]) != 0:
                bad += 1
        return bad

    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(f"ipc://{tempfile.mkdtemp()}/native-send.ipc")
    topic_b, payload_b = b"ESZ6", bytes(range(80))
    topic, payload = np.frombuffer(topic_b, np.uint8), np.frombuffer(payload_b, np.uint8)
    native_loop(sock.underlying, topic, payload, 10)  # compile
    more, last = zmq.SNDMORE | zmq.NOBLOCK, zmq.NOBLOCK
    send, rsend = sock.send, raw_send(sock)
    clock = time.perf_counter_ns
    res: dict[str, list[float]] = {"pyzmq_send": [], "pyzmq_raw_send": [], "native_loop": []}
    for _ in range(args.repeat):
        t0 = clock()
        for _ in range(n):
            send(topic_b, more)
            send(payload_b, last)
        res["pyzmq_send"].append((clock() - t0) / n)
        t0 = clock()
        for _ in range(n):
            rsend(topic_b, more)
            rsend(payload_b, last)
        res["pyzmq_raw_send"].append((clock() - t0) / n)
        t0 = clock()
        assert native_loop(sock.underlying, topic, payload, n) == 0
        res["native_loop"].append((clock() - t0) / n)
    sock.close(0)
    ctx.term()
    med = {k: float(np.median(v)) for k, v in res.items()}
    doc = {"benchmark": "bench_native_send", "messages": n, "repeat": args.repeat,
           "what": "two-frame send on an XPUB with no subscriber: the call path to libzmq",
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "ns_per_message_median": med, "runs_ns_per_message": res,
           "ratio_raw_send_over_native": med["pyzmq_raw_send"] / med["native_loop"]}
    for k, v in med.items():
        print(f"{k:<15} {v:7.1f} ns/message (median of {args.repeat})", file=sys.stderr)
    print(f"raw_send / native: {doc['ratio_raw_send_over_native']:.2f}x", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
