"""``tickscore subscribe``: print or record the scores of a running service.

A small client meant to be copied: it needs only ``msgspec`` (or any MessagePack
decoder, see the README's wire format) plus ``pyzmq`` or ``pyaeron``.

    tickscore subscribe ipc:///tmp/tickscore-scores.ipc               # ZeroMQ, every instrument
    tickscore subscribe tcp://127.0.0.1:5556 --topic ESZ6             # ZeroMQ, one instrument
    tickscore subscribe aeron:ipc --aeron-dir /dev/shm/tickscore-aeron-$USER   # Aeron, stream 1002
    tickscore subscribe aeron:udp?endpoint=127.0.0.1:40124 --out scores.parquet --count 10000

    tickscore subscribe --cluster cluster.toml                        # every shard of a cluster, merged

Each printed line is ``instrument seq score flags model_version wire_us`` (and the
``shard`` in a cluster) where
``wire_us`` = this process's CLOCK_MONOTONIC at receipt minus the service's
``ts_out_ns`` (meaningful on the same host only).  ``--out FILE.parquet``
records every score with its receive time ``recv_ns``.  Gaps (``seq``) and
restarts (``epoch``) of each shard are reported on stderr as they are seen, and
summed up at exit.  Stops on Ctrl-C / SIGTERM, after ``--count`` scores or
``--duration`` seconds.
"""

from __future__ import annotations

import sys
import time

import msgspec
import zmq

from engine.security import apply_client

__all__ = ["Score", "ShardTracker", "subscribe_zmq", "subscribe_aeron"]


class ScoreV1(msgspec.Struct, array_like=True, tag=2, frozen=True):
    """A score of a service before sharding (schema id 2): no shard, no epoch (read as 0)."""

    instrument: str
    seq: int
    ts_event_ns: int
    ts_in_ns: int
    ts_out_ns: int
    score: float
    model_version: str
    flags: int
    shard = 0
    epoch = 0


class Score(ScoreV1, tag=3, frozen=True):
    """A score as on the wire: MessagePack array, schema id 3 first, v1's fields + shard, epoch (README)."""

    shard: int = 0
    epoch: int = 0


FLAG_NAMES = {1: "warmup", 2: "stale_quote", 4: "no_book", 8: "clipped", 16: "no_trades"}
COLUMNS = ("instrument", "seq", "ts_event_ns", "ts_in_ns", "ts_out_ns", "score", "model_version",
           "flags", "shard", "epoch", "recv_ns")


class ShardTracker:
    """Gaps and restarts of every shard, from the Scores alone (``shard``, ``epoch``, ``seq``).

    ``seq`` is contiguous per shard process; a new ``epoch`` is a restart (its ``seq``
    starts again at 0).  Meaningful when subscribed to every instrument: a topic filter
    makes gaps of the scores filtered out.
    """

    def __init__(self) -> None:
        #: shard -> [epoch, next seq, scores, missing, restarts]
        self.shards: dict[int, list[int]] = {}

    def see(self, s) -> str | None:
        """Account for Score ``s``; return a line to report (a gap or a restart), else None."""
        st = self.shards.get(s.shard)
        if st is None:
            self.shards[s.shard] = [s.epoch, s.seq + 1, 1, 0, 0]
            return None
        st[2] += 1
        if s.epoch != st[0]:
            restarted = s.epoch > st[0]
            st[0], st[1] = s.epoch, s.seq + 1
            st[4] += 1
            return (f"shard {s.shard}: {'restarted' if restarted else 'epoch changed'} "
                    f"(epoch {s.epoch}, first seq {s.seq})")
        if s.seq != st[1]:
            if s.seq > st[1]:
                n = s.seq - st[1]
                st[3] += n
                line = f"shard {s.shard}: gap of {n:,} scores (seq {st[1]} .. {s.seq - 1})"
            else:
                line = f"shard {s.shard}: seq {s.seq} after {st[1] - 1} (duplicate or reordered)"
            st[1] = s.seq + 1
            return line
        st[1] = s.seq + 1
        return None

    def summary(self) -> dict:
        """Return ``{shard: {scores, missing, restarts, epoch}}``."""
        return {k: {"scores": v[2], "missing": v[3], "restarts": v[4], "epoch": v[0]}
                for k, v in sorted(self.shards.items())}


class StopFlag:
    def __init__(self) -> None:
        self.flag = False

    def __call__(self, signum, frame) -> None:
        self.flag = True


def subscribe_zmq(endpoint: str | list[str], topics=("",), on_score=None, stop=None, timeout_ms: int = 100,
                  keys=None) -> None:  # fmt: skip
    """Call ``on_score(score, recv_ns)`` for every score on ZeroMQ endpoint(s) until ``stop()``.

    Several endpoints (the shards of a cluster) are merged by one SUB socket connected
    to all of them.  ``keys`` (:class:`engine.security.ClientKeys`): connect as a CURVE client.
    """
    decode = msgspec.msgpack.Decoder(Score | ScoreV1).decode
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    apply_client(sock, keys)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    for e in [endpoint] if isinstance(endpoint, str) else endpoint:
        sock.connect(e)
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

    decode = msgspec.msgpack.Decoder(Score | ScoreV1).decode
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
