"""``tickscore subscribe``: print or record the scores of a running service.

A small client meant to be copied: it needs only ``msgspec`` (or any MessagePack
decoder, see the README's wire format) plus ``pyzmq`` or ``pyaeron``.

    tickscore subscribe ipc:///tmp/tickscore-scores.ipc               # ZeroMQ, every instrument
    tickscore subscribe tcp://127.0.0.1:5556 --topic ESZ6             # ZeroMQ, one instrument
    tickscore subscribe aeron:ipc --aeron-dir /dev/shm/tickscore-aeron-$USER   # Aeron, stream 1002
    tickscore subscribe aeron:udp?endpoint=127.0.0.1:40124 --out scores.parquet --count 10000

Each printed line is ``instrument seq score flags model_version wire_us`` where
``wire_us`` = this process's CLOCK_MONOTONIC at receipt minus the service's
``ts_out_ns`` (meaningful on the same host only).  ``--out FILE.parquet``
records every score with its receive time ``recv_ns``.  Stops on Ctrl-C /
SIGTERM, after ``--count`` scores or ``--duration`` seconds.
"""

from __future__ import annotations

import sys
import time

import msgspec
import zmq

from engine.security import apply_client

__all__ = ["Score", "subscribe_zmq", "subscribe_aeron"]


class Score(msgspec.Struct, array_like=True, tag=2, frozen=True):
    """A score as on the wire: MessagePack array, schema id 2 first (see README)."""

    instrument: str
    seq: int
    ts_event_ns: int
    ts_in_ns: int
    ts_out_ns: int
    score: float
    model_version: str
    flags: int


FLAG_NAMES = {1: "warmup", 2: "stale_quote", 4: "no_book", 8: "clipped", 16: "no_trades"}
COLUMNS = ("instrument", "seq", "ts_event_ns", "ts_in_ns", "ts_out_ns", "score", "model_version",
           "flags", "recv_ns")


class StopFlag:
    def __init__(self) -> None:
        self.flag = False

    def __call__(self, signum, frame) -> None:
        self.flag = True


def subscribe_zmq(endpoint: str, topics=("",), on_score=None, stop=None, timeout_ms: int = 100,
                  keys=None) -> None:  # fmt: skip
    """Call ``on_score(score, recv_ns)`` for every score on a ZeroMQ endpoint until ``stop()``.

    ``keys`` (:class:`engine.security.ClientKeys`): connect as a CURVE client.
    """
    decode = msgspec.msgpack.Decoder(Score).decode
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    apply_client(sock, keys)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(endpoint)
    try:
        while not (stop and stop()):
            if not sock.poll(timeout_ms):
                continue
            frames = sock.recv_multipart()
            recv_ns = time.perf_counter_ns()
            if len(frames) != 2:
                print(f"skipping a message of {len(frames)} frames", file=sys.stderr)
                continue
            try:
                s = decode(frames[1])
            except msgspec.MsgspecError as exc:
                print(f"skipping an undecodable score: {exc}", file=sys.stderr)
                continue
            on_score(s, recv_ns)
    finally:
        sock.close(0)
        ctx.term()


def subscribe_aeron(channel: str, stream_id: int, aeron_dir: str, topics=("",), on_score=None,
                    stop=None) -> None:
    """Call ``on_score(score, recv_ns)`` for every score on an Aeron stream until ``stop()``."""
    import pyaeron  # deferred: loads the Aeron C client, only where Aeron is used

    decode = msgspec.msgpack.Decoder(Score).decode
    # An error handler keeps the client alive when the service's driver goes away
    # (without one the Aeron C client exits the process).
    errors = []
    ctx = pyaeron.Context(dir=aeron_dir, error_handler=lambda code, msg: errors.append(msg))
    try:
        aeron = pyaeron.Aeron(context=ctx)
    except pyaeron.AeronError as exc:
        raise OSError(f"no Aeron media driver in {aeron_dir!r}: {str(exc).splitlines()[0]}") from None
    wanted = tuple(t for t in topics if t)

    def handler(buf, header):
        recv_ns = time.perf_counter_ns()
        try:
            s = decode(buf)
        except msgspec.MsgspecError as exc:
            print(f"skipping an undecodable score: {exc}", file=sys.stderr)
            return
        if not wanted or s.instrument.startswith(wanted):
            on_score(s, recv_ns)

    try:
        sub = aeron.add_subscription(channel, stream_id)
        idle = pyaeron.IdleStrategy.backoff()
        while not (stop and stop()):
            if errors:
                print(f"aeron: {errors.pop(0)}", file=sys.stderr)
            idle.idle(sub.poll(handler, 64))
    finally:
        aeron.close()
