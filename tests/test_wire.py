"""Wire format: round trips, documented layout, rejection of malformed payloads."""

import math
import struct

import msgpack
import msgspec
import pytest

from engine.wire import (
    SCORE_FIELDS,
    SCORE_SCHEMA_ID,
    TICK_FIELDS,
    TICK_SCHEMA_ID,
    Score,
    ScoreEncoder,
    Tick,
    decode_score,
    decode_tick,
    encode_tick,
)


def _score(**kw):
    base = dict(
        instrument="ESZ6", seq=7, ts_event_ns=1_790_000_000_123_456_789, ts_in_ns=11,
        ts_out_ns=22, score=0.125, model_version="risk-int8-abc", flags=3, shard=1,
        epoch=1_790_000_000_000_000_000,
    )
    base.update(kw)
    return Score(**base)


def test_score_round_trips_through_reused_buffer():
    enc = ScoreEncoder(capacity=8)
    a = _score()
    assert decode_score(bytes(enc.encode(a))) == a
    b = _score(instrument="CLF7", seq=2**40, score=math.pi)
    assert decode_score(bytes(enc.encode(b))) == b


def test_score_payload_is_a_plain_msgpack_array_in_documented_order():
    payload = bytes(ScoreEncoder().encode(_score()))
    arr = msgpack.unpackb(payload, raw=False)
    assert arr == [SCORE_SCHEMA_ID, "ESZ6", 7, 1_790_000_000_123_456_789, 11, 22, 0.125, "risk-int8-abc", 3,
                   1, 1_790_000_000_000_000_000]
    assert SCORE_SCHEMA_ID == 3
    assert list(SCORE_FIELDS) == [
        "instrument", "seq", "ts_event_ns", "ts_in_ns", "ts_out_ns", "score", "model_version", "flags",
        "shard", "epoch",
    ]
    # score is a float64 (0xcb) so non-Python decoders get a fixed type
    assert b"\xcb" + struct.pack(">d", 0.125) in payload


@pytest.mark.parametrize("kw", [
    {}, {"seq": 0, "score": 0.0, "flags": 0}, {"seq": 2**40, "score": 1.0, "ts_in_ns": 2**62},
    {"instrument": "X" * 40, "model_version": "m" * 300, "score": math.pi},
])
def test_hot_path_row_encoding_gives_the_same_bytes_as_the_score_struct(kw):
    """The scorer encodes (SCORE_SCHEMA_ID, *fields) tuples; subscribers must not see a difference."""
    enc = ScoreEncoder(capacity=8)
    sc = _score(**kw)
    want = bytes(ScoreEncoder().encode(sc))
    row = (SCORE_SCHEMA_ID, *(getattr(sc, f) for f in SCORE_FIELDS))
    assert bytes(enc.encode_row(row)) == want
    buf = enc.buf
    enc.encode_row_into(row, buf)
    assert bytes(buf) == want and buf is enc.buf  # same reused buffer, resized in place
    assert decode_score(want) == sc


def test_tick_written_by_plain_msgpack_decodes_into_tick():
    raw = msgpack.packb([TICK_SCHEMA_ID, 1, "NQZ6", 10, 12, 99.5, 3.0, 99.75, 4.0, 0.0, 0.0, 0, 0])
    t = decode_tick(raw)
    assert t == Tick(kind=1, instrument="NQZ6", ts_event_ns=10, ts_recv_ns=12, bid_px=99.5,
                     bid_sz=3.0, ask_px=99.75, ask_sz=4.0)
    assert decode_tick(encode_tick(t)) == t
    assert len(TICK_FIELDS) == 12


def test_tick_with_integer_prices_is_accepted_as_float():
    raw = msgpack.packb([TICK_SCHEMA_ID, 2, "CLF7", 10, 12, 0, 0, 0, 0, 75, 2, 1, 0])
    t = decode_tick(raw)
    assert t.price == 75.0 and isinstance(t.price, float)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([TICK_SCHEMA_ID, 1, "X"]),  # too short
        msgpack.packb([TICK_SCHEMA_ID, "quote", "X", 1, 1, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0, 0]),
        msgpack.packb([SCORE_SCHEMA_ID, "ESZ6", 1, 1, 1, 1, 0.5, "v", 0]),  # a Score, not a Tick
        msgpack.packb({"kind": 1}),
    ],
)
def test_malformed_tick_payload_raises_msgspec_error(payload):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode_tick(payload)


def test_a_score_v1_of_an_older_service_still_decodes_as_shard_0_epoch_0():
    raw = msgpack.packb([2, "ESZ6", 7, 1, 2, 3, 0.5, "v", 1])
    assert decode_score(raw) == Score("ESZ6", 7, 1, 2, 3, 0.5, "v", 1, 0, 0)
