"""Wire schema (contract): ``Tick`` in, ``Score`` out, MessagePack via msgspec.

Every message is one MessagePack **array** (msgspec ``array_like=True``) whose
first element is an integer schema id, so a subscriber written in any language
can tell what it got and whether it understands that version:

====== ======================== ===========================================
id     message                  elements after the id, in order
====== ======================== ===========================================
1      Tick v1   (13 elements)  kind, instrument, ts_event_ns, ts_recv_ns,
                                bid_px, bid_sz, ask_px, ask_sz, price, size,
                                side, order_id
2      Score v1  (9 elements)   instrument, seq, ts_event_ns, ts_in_ns,
                                ts_out_ns, score, model_version, flags
3      Score v2  (11 elements)  Score v1's 8 fields, then shard, epoch
====== ======================== ===========================================

tickscore writes Score v2 (id 3); :func:`decode_score` also reads v1 (id 2, from
older services: ``shard`` and ``epoch`` then read as 0).  ``seq`` counts the
scores of one shard process (contiguous from 0 per process run); ``shard`` is the
publishing shard (0 when not sharded); ``epoch`` is the process's start time (ns
since the Unix epoch), different after every restart.  A subscriber detects a gap
from ``seq`` and a restart from ``epoch``, per ``shard``, from the messages alone.

Types: ``instrument`` and ``model_version`` are MessagePack str (UTF-8);
``kind``, ``side``, ``flags``, ``seq``, ``shard``, ``epoch`` and all ``ts_*`` are MessagePack
integers (any int encoding: msgspec writes the smallest one that fits);
prices, sizes and ``score`` are float 64 (``0xcb``) when written by tickscore;
decoders of Ticks also accept integers there.  Any incompatible change gets a
new schema id; ids 1, 2 and 3 will always mean the layouts above.

ZeroMQ framing: two frames ``[topic, payload]``; topic is the instrument symbol
(UTF-8, no terminator) so SUB sockets can filter by prefix.  Aeron: payload
only, one message per fragment-assembled message; the stream id selects the
kind (see ``engine.config``).

Clocks: ``ts_event_ns``/``ts_recv_ns`` are the tick's own times (ns since the
Unix epoch, as given by the source). ``ts_in_ns``/``ts_out_ns`` are the
service's ``CLOCK_MONOTONIC`` (``time.perf_counter_ns()`` on Linux) at ingress
and just before publish, so a subscriber on the same host can measure
wire-to-wire latency against its own ``CLOCK_MONOTONIC``.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "TICK_SCHEMA_ID",
    "SCORE_SCHEMA_ID",
    "SCORE_V1_SCHEMA_ID",
    "Tick",
    "Score",
    "ScoreV1",
    "encode_tick",
    "decode_tick",
    "decode_score",
    "ScoreEncoder",
    "TICK_FIELDS",
    "SCORE_FIELDS",
]

TICK_SCHEMA_ID = 1
#: the Score tickscore writes (v2: with shard and epoch)
SCORE_SCHEMA_ID = 3
#: the Score of tickscore before sharding (still decoded)
SCORE_V1_SCHEMA_ID = 2


class Tick(msgspec.Struct, array_like=True, tag=TICK_SCHEMA_ID, frozen=True):
    """Market event on the wire (schema id 1). See module docstring for the layout."""

    kind: int
    instrument: str
    ts_event_ns: int
    ts_recv_ns: int
    bid_px: float = 0.0
    bid_sz: float = 0.0
    ask_px: float = 0.0
    ask_sz: float = 0.0
    price: float = 0.0
    size: float = 0.0
    side: int = 0
    order_id: int = 0


class ScoreV1(msgspec.Struct, array_like=True, tag=SCORE_V1_SCHEMA_ID, frozen=True):
    """Risk score of tickscore before sharding (schema id 2): Score without shard and epoch."""

    instrument: str
    seq: int
    ts_event_ns: int
    ts_in_ns: int
    ts_out_ns: int
    score: float
    model_version: str
    flags: int


class Score(ScoreV1, tag=SCORE_SCHEMA_ID, frozen=True):
    """Risk score on the wire (schema id 3): Score v1's fields, then shard and epoch (module docstring)."""

    shard: int = 0
    epoch: int = 0


#: Field names in wire order (after the schema id), for documentation and tests.
TICK_FIELDS = Tick.__struct_fields__
SCORE_FIELDS = Score.__struct_fields__

_tick_encoder = msgspec.msgpack.Encoder()
_tick_decoder = msgspec.msgpack.Decoder(Tick)
_score_decoder = msgspec.msgpack.Decoder(Score | ScoreV1)


def encode_tick(tick: Tick) -> bytes:
    """Return the MessagePack payload of ``tick``."""
    return _tick_encoder.encode(tick)


def decode_tick(payload: bytes | memoryview) -> Tick:
    """Return the ``Tick`` in ``payload``; raise ``msgspec.ValidationError``/``DecodeError``."""
    return _tick_decoder.decode(payload)


def decode_score(payload: bytes | memoryview) -> Score:
    """Return the ``Score`` in ``payload`` (v2, or v1 read as shard 0, epoch 0).

    Raises ``msgspec.ValidationError``/``DecodeError``.
    """
    s = _score_decoder.decode(payload)
    if type(s) is ScoreV1:
        return Score(*msgspec.structs.astuple(s))
    return s


class ScoreEncoder:
    """Encode Scores into one preallocated, reused ``bytearray`` (single writer).

    ``buf`` is resized in place by msgspec to the exact message length; it is
    handed to the sinks, which must copy or send it before the next encode.
    """

    __slots__ = ("buf", "_encode_into", "encode_row_into")

    def __init__(self, capacity: int = 256) -> None:
        self.buf = bytearray(capacity)
        self._encode_into = msgspec.msgpack.Encoder().encode_into
        #: ``encode_row_into((SCORE_SCHEMA_ID, *fields), buf)``: the per-tick form.  A
        #: tuple encodes to the same bytes as the array_like, tagged Score (a msgpack
        #: array, schema id first) and skips building a Struct: ~0.14 µs a tick less.
        #: The caller guarantees the field types (str, int x4, float, str, int x3).
        self.encode_row_into = self._encode_into

    def encode_row(self, row: tuple) -> bytearray:
        """Encode ``(SCORE_SCHEMA_ID, instrument, seq, ..., flags)`` into ``self.buf``."""
        self._encode_into(row, self.buf)
        return self.buf

    def encode(self, score: Score) -> bytearray:
        """Encode ``score`` into ``self.buf`` and return it. Allocates: no (buffer reused)."""
        self._encode_into(score, self.buf)
        return self.buf
