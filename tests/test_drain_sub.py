"""The benchmarks' compiled subscriber (benchmarks/drain_sub.py) counts and checks what it was sent.

The native-loop benchmark's "every Score received, no gap, canonical bytes" rests on it, so
it gets real messages over a real ipc socket: a gap, a non-canonical payload, a wrong topic
and a one-frame message must each be counted, and the digest must be the one a plain
Python subscriber computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import zmq

from engine.wire import Score, ScoreEncoder

ROOT = Path(__file__).resolve().parents[1]


def _digest(payloads: list[bytes]) -> str:
    dec, enc = msgspec.msgpack.Decoder(), msgspec.msgpack.Encoder()
    h = hashlib.blake2b(digest_size=16)
    for p in payloads:
        m = dec.decode(p)
        m[4] = m[5] = m[10] = 0
        h.update(enc.encode(m))
    return h.hexdigest()


@contextlib.contextmanager
def _connected(tmp_path, *outputs):
    """Run drain_sub.py on an ipc endpoint; yield (its process, a PUB socket it subscribes to)."""
    ep = f"ipc://{tmp_path}/s.ipc"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "drain_sub.py"), ep, *map(str, outputs)]
    sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    try:
        assert sub.stdout.readline().strip() == "ready"
        pub.bind(ep)
        time.sleep(0.5)  # the subscription reaches the publisher
        yield sub, pub
    finally:
        sub.kill()
        pub.close(linger=0)
        ctx.term()


def test_the_compiled_subscriber_counts_every_message_and_each_fault(tmp_path):
    out, recv = tmp_path / "sub.json", tmp_path / "recv.npy"
    with _connected(tmp_path, out, recv) as (sub, pub):
        enc = ScoreEncoder()
        payloads, t_sent = [], []
        for seq in [*range(0, 1500), *range(1501, 3000)]:  # seq 1500 is missing: one gap
            t = time.perf_counter_ns()
            enc.encode(Score("ESZ6" if seq % 2 else "NQZ6", seq, 1, t, t, 0.5, "m", 0, 1, 7))
            p = bytes(enc.buf)
            payloads.append(p)
            t_sent.append(t)
            pub.send_multipart([b"ESZ6" if seq % 2 else b"NQZ6", p])
        ok = payloads[-1]
        m = msgspec.msgpack.decode(ok)
        m[2] = 3000
        loose = b"\xdc\x00\x0b" + b"".join(msgspec.msgpack.encode(x) for x in m)  # array16: not canonical
        pub.send_multipart([m[1].encode(), loose])
        m[2] = 3001
        pub.send_multipart([b"XXXX", msgspec.msgpack.encode(m)])  # topic is not the instrument
        pub.send(b"one frame")
        assert sub.wait(timeout=60) == 0
    got = json.loads(out.read_text())
    assert got["count"] == 3002
    assert got["seq_gaps"] == 1
    assert got["noncanonical"] == 1
    assert got["topic_mismatch"] == 1
    assert got["truncated"] == 1
    assert got["digest"] != _digest(payloads)  # the last two were digested too
    arrivals = np.load(recv)
    assert arrivals.shape == (3002,) and np.all(np.diff(arrivals) >= 0)
    assert np.all(arrivals[:2999] > np.asarray(t_sent))  # a Score arrives after its send
    assert 0 < got["wire_ns"]["p50"] < 10_000_000_000 and got["recv_per_s"] > 0


def test_the_compiled_subscriber_digest_is_the_python_subscribers(tmp_path):
    out = tmp_path / "sub.json"
    with _connected(tmp_path, out) as (sub, pub):
        enc, payloads = ScoreEncoder(), []
        for seq in range(2000):
            t = time.perf_counter_ns()
            enc.encode(Score("ESZ6", seq, 1, t, t, seq / 2000, "risk-int8-x", 0, 0, 11))
            payloads.append(bytes(enc.buf))
            pub.send_multipart([b"ESZ6", payloads[-1]])
        assert sub.wait(timeout=60) == 0
    got = json.loads(out.read_text())
    assert (got["count"], got["seq_gaps"], got["noncanonical"], got["topic_mismatch"], got["truncated"]) == (
        2000, 0, 0, 0, 0)  # fmt: skip
    assert got["digest"] == _digest(payloads)
