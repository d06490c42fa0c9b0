"""A compiled draining ZeroMQ subscriber for the benchmarks: receive now, check afterwards.

    python benchmarks/drain_sub.py ENDPOINT OUT.json

Pinned to core 0, it connects a SUB socket (no high-water mark) to ``ENDPOINT``, prints
``ready`` and receives every ``[topic, payload]`` message with libzmq's ``zmq_recv`` from a
numba loop (blocking receives with a 3 s timeout once the first message came, so it sleeps
when the publisher is ahead and batches nothing by hand).  Each frame is copied into a
preallocated buffer; that costs a few hundred nanoseconds of core 0 per message, against
several microseconds for a Python ``recv_multipart`` + decode + hash.  The checks
(:class:`ScoreChecker`, which the benchmark's Python and Aeron subscribers use too) run
once the stream ended: ``seq`` contiguous from 0, every
payload exactly msgspec's encoding of its decoded row, the topic equal to the row's
instrument, and a digest of the Scores without their clock fields and epoch.  Writes
``{"count", "seq_gaps", "noncanonical", "topic_mismatch", "truncated", "digest"}`` to OUT.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import msgspec
import numpy as np
import zmq
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.native_loop import bind_clock  # noqa: E402
from engine.native_zmq import bind_libzmq  # noqa: E402

CHUNK = 1 << 20  # messages per buffer
FRAME = 256  # the longest frame kept whole (a Score is ~60 bytes, a topic an instrument name)
ZMQ_RCVMORE = 13


class ScoreChecker:
    """The benchmark subscribers' checks of a Score stream, one message at a time.

    ``seq`` contiguous from 0, every payload exactly msgspec's encoding of its decoded row,
    the topic equal to the instrument (where the transport has topics), and a digest of the
    Scores without their two clock fields and the run's epoch (so runs compare score by
    score).  Given arrival times, also each Score's wire-to-wire time (arrival - ts_out_ns).
    """

    def __init__(self) -> None:
        self.dec, self.enc = msgspec.msgpack.Decoder(), msgspec.msgpack.Encoder()
        self.h = hashlib.blake2b(digest_size=16)
        self.n = self.gaps = self.noncanonical = self.topic_bad = self.truncated = self.expect = 0
        self.wire: list[int] = []

    def add(self, payload: bytes, topic: bytes | None = None, t_recv: int | None = None) -> None:
        m = self.dec.decode(payload)
        self.n += 1
        if m[2] != self.expect:
            self.gaps += 1
        self.expect = m[2] + 1
        if self.enc.encode(m) != payload:
            self.noncanonical += 1
        if topic is not None and topic != m[1].encode():
            self.topic_bad += 1
        if t_recv is not None:
            self.wire.append(t_recv - m[5])  # ts_out_ns: the publisher's CLOCK_MONOTONIC just before its send
        m[4] = m[5] = 0  # ts_in_ns / ts_out_ns: clock readings, differ between runs
        if len(m) > 10:
            m[10] = 0  # epoch (Score v2): the run's start time
        self.h.update(self.enc.encode(m))

    def add_truncated(self) -> None:
        """Count a message that was not one whole ``[topic, payload]`` (kept out of the checks)."""
        self.n += 1
        self.truncated += 1

    def result(self) -> dict:
        r = {"count": self.n, "seq_gaps": self.gaps, "noncanonical": self.noncanonical,
             "topic_mismatch": self.topic_bad, "truncated": self.truncated,
             "digest": self.h.hexdigest()}  # fmt: skip
        if self.wire:
            w = np.asarray(self.wire[1000:] or self.wire, np.int64)  # the first 1000: the publisher's warm-up
            pcts = (("p50", 50), ("p99", 99), ("p999", 99.9))
            r["wire_ns"] = {q: int(np.percentile(w, p)) for q, p in pcts}
        return r


def make_drain(lib):
    recv, getsockopt, clock = lib.zmq_recv, lib.zmq_getsockopt, bind_clock()

    @njit(nogil=True)
    def _more(sock, more):
        more[0] = 0
        getsockopt(sock, ZMQ_RCVMORE, more.ctypes.data, more.ctypes.data + 8)
        return more[0] != 0

    @njit(nogil=True)
    def drain(sock, buf, rows, start, stop, more, ts):
        """Receive messages into rows ``start..stop`` until one times out; return the next free row.

        Frames go one after the other into ``buf``; ``rows[i] = (offset, topic length, payload
        length, CLOCK_MONOTONIC when its last frame came), the payload length -1 where the
        message had not exactly two frames.  A frame longer than FRAME keeps its first FRAME
        bytes (its length says so).
        """
        off = (
            rows[start - 1, 0] + min(rows[start - 1, 1], FRAME) + max(min(rows[start - 1, 2], FRAME), 0)
            if start > 0
            else 0
        )
        i = start
        while i < stop and off + 2 * FRAME <= buf.shape[0]:
            n1 = recv(sock, buf.ctypes.data + off, FRAME, 0)
            if n1 < 0:
                return i  # timed out (or the context ended)
            rows[i, 0], rows[i, 1], rows[i, 2] = off, n1, -1
            if _more(sock, more):
                n2 = recv(sock, buf.ctypes.data + off + min(n1, FRAME), FRAME, 0)
                rows[i, 2] = n2
                while _more(sock, more):  # a third frame: not a Score message; drop the rest
                    rows[i, 2] = -1
                    recv(sock, buf.ctypes.data, 0, 0)
            clock(1, ts.ctypes.data)
            rows[i, 3] = ts[0] * 1_000_000_000 + ts[1]
            off += min(n1, FRAME) + max(min(rows[i, 2], FRAME), 0)
            i += 1
        return i

    return drain


def main() -> None:
    os.sched_setaffinity(0, {0})
    ep, out = sys.argv[1], sys.argv[2]
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(ep)
    drain = make_drain(bind_libzmq())
    more = np.zeros(2, np.int64)  # [value, size_t length] for zmq_getsockopt
    more[1] = 8
    ts = np.zeros(2, np.int64)
    chunks = []  # (buffer, rows, rows used)
    buf, rows = np.zeros(CHUNK * 96, np.uint8), np.zeros((CHUNK, 4), np.int64)
    s.setsockopt(zmq.RCVTIMEO, 1)
    drain(s.underlying, buf, rows, 0, 1, more, ts)  # compiles; nothing is sent yet
    print("ready", flush=True)
    s.setsockopt(zmq.RCVTIMEO, 120_000)
    k = drain(s.underlying, buf, rows, 0, 1, more, ts)  # the first message
    s.setsockopt(zmq.RCVTIMEO, 3000)  # then: the stream ended after 3 s of silence
    while k:
        k2 = drain(s.underlying, buf, rows, k, CHUNK, more, ts)
        if k2 == k:  # timed out with nothing new: the end
            break
        k = k2
        if k == CHUNK or rows[k - 1, 0] + 4 * FRAME > buf.shape[0]:  # full: a new chunk
            chunks.append((buf, rows, k))
            buf, rows, k = np.zeros(CHUNK * 96, np.uint8), np.zeros((CHUNK, 4), np.int64), 0
            k = drain(s.underlying, buf, rows, 0, 1, more, ts)
    chunks.append((buf, rows, k))
    s.close(linger=0)
    ctx.term()
    check = ScoreChecker()
    recv_ns = []
    for buf, rows, used in chunks:
        for i in range(used):
            off, tl, pl, t_recv = (int(x) for x in rows[i])
            recv_ns.append(t_recv)
            if pl < 0 or tl > FRAME or pl > FRAME:
                check.add_truncated()
                continue
            check.add(buf[off + tl : off + tl + pl].tobytes(), buf[off : off + tl].tobytes(), t_recv)
    result = check.result()
    if len(recv_ns) > 1:  # the rate the stream reached this process, first to last message
        result["recv_per_s"] = (len(recv_ns) - 1) / max((recv_ns[-1] - recv_ns[0]) / 1e9, 1e-9)
    if len(sys.argv) > 3:  # every receive time, for the caller to pair with its own send times
        np.save(sys.argv[3], np.asarray(recv_ns, np.int64))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
