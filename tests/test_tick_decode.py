"""The compiled Tick decoder decides exactly as the msgspec path of the live sources (issue 16).

Both decoders get the same bytes: ticks whose fields are drawn from right and
wrong types and ranges, written with every MessagePack width (int8 .. uint64,
float32/64, fixstr .. str32, fixarray .. array32), mutated encodings and
arbitrary bytes.  The reference is :meth:`engine.sources.TickSlot.ingest`
(msgspec ``StrictTick`` + plausibility + instrument + dtype ranges); the
compiled one is :func:`engine.tick_decode.decode_tick` + the same instrument
lookup.  Decision, reject reason and every decoded value must be identical.
"""

import math
import struct

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.schema import N_REJECT_REASONS, REJECT_MALFORMED, REJECT_NAMES, REJECT_UNKNOWN_INSTRUMENT
from engine.sources import TickSlot
from engine.tick_decode import (
    I_KIND,
    I_ORDER_ID,
    I_RANGE_OK,
    I_SIDE,
    I_SYM_LEN,
    I_SYM_START,
    I_TS_EVENT,
    I_TS_RECV,
    decode_tick,
    new_outputs,
)

SYMBOLS = ["CLF7", "ESZ6", "NQZ6", "ÉTÉ€"]
MAX_EVENT_NS = 1_750_000_000_000_000_000


def _int(v: int, width: str) -> bytes:
    """MessagePack integer ``v`` in the requested family (the smallest of it that holds ``v``)."""
    if width == "fix" and 0 <= v <= 0x7F:
        return bytes([v])
    if width == "fix" and -32 <= v < 0:
        return struct.pack("b", v)
    if v >= 0 and width in ("fix", "u"):
        for code, fmt, hi in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF),
                              (0xCF, ">Q", 2**64 - 1)):
            if v <= hi:
                return bytes([code]) + struct.pack(fmt, v)
    if -(2**63) <= v < 2**63:
        for code, fmt, bits in ((0xD0, ">b", 8), (0xD1, ">h", 16), (0xD2, ">i", 32), (0xD3, ">q", 64)):
            if -(2 ** (bits - 1)) <= v < 2 ** (bits - 1):
                return bytes([code]) + struct.pack(fmt, v)
    return bytes([0xCF]) + struct.pack(">Q", v)  # only for v in [2**63, 2**64)


def _str(b: bytes, width: str) -> bytes:
    n = len(b)
    if width == "fix" and n < 32:
        return bytes([0xA0 | n]) + b
    if width in ("fix", "8") and n < 256:
        return b"\xd9" + bytes([n]) + b
    if width == "16" and n < 65536:
        return b"\xda" + struct.pack(">H", n) + b
    return b"\xdb" + struct.pack(">I", n) + b


def _item(v, width: str) -> bytes:
    if isinstance(v, bool) or v is None:
        return msgpack.packb(v)
    if isinstance(v, int):
        return _int(v, width)
    if isinstance(v, float):
        if width == "f32":
            try:
                return b"\xca" + struct.pack(">f", v)
            except OverflowError:  # not a float32: written as float64
                pass
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        return _str(v.encode("utf-8", "surrogatepass"), width)
    if isinstance(v, bytes):  # raw bytes as a str: possibly invalid UTF-8
        return _str(v, width)
    return msgpack.packb(v, use_bin_type=True)


_ints = st.one_of(st.integers(-300, 300), st.integers(-(2**63), 2**64 - 1),
                  st.sampled_from([0, 1, 255, 256, -128, -129, 127, 128, 2**63 - 1, 2**63, 2**64 - 1,
                                   -(2**63), MAX_EVENT_NS, MAX_EVENT_NS + 1]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(width=32),
                    st.sampled_from([1e15, 1e15 * (1 + 2**-52), 1e300, math.inf, -math.inf, 0.0, -0.0]))
_wrong = st.one_of(st.booleans(), st.none(), st.text(max_size=4), st.binary(max_size=4).map(bytearray),
                   st.lists(st.integers(0, 3), max_size=2))
_symbol = st.one_of(st.sampled_from(SYMBOLS), st.text(max_size=6),
                    st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80",
                                     b"CLF\xe2\x82", b"CLF7" + b"\x80"]), st.integers(0, 5))
_width = st.sampled_from(["fix", "u", "s", "f32", "f64", "8", "16", "32"])


@st.composite
def _tick_bytes(draw) -> bytes:
    # a valid tick with 0-3 of its fields redrawn from right and wrong types and ranges
    fields = [1, draw(st.sampled_from([1, 2, 3, 4, 5])), draw(st.sampled_from(SYMBOLS)),
              draw(st.integers(1, MAX_EVENT_NS)), draw(st.integers(0, 2**62)),
              *[draw(st.floats(0.01, 1e6)) for _ in range(6)], draw(st.integers(-1, 1)),
              draw(st.integers(0, 10**6))]
    pools = [st.one_of(_ints, _wrong, _floats), st.one_of(_ints, _wrong), _symbol,
             st.one_of(_ints, _wrong, _floats), st.one_of(_ints, _wrong),
             *[st.one_of(_floats, _ints, _wrong)] * 6, st.one_of(_ints, _wrong), st.one_of(_ints, _wrong)]
    for k in draw(st.lists(st.integers(0, 12), max_size=3)):
        fields[k] = draw(pools[k])
    n = draw(st.sampled_from([13, 13, 13, 12, 14, 0]))
    fields = (fields + [0])[:n] if n <= 14 else fields
    header = draw(st.sampled_from(["fix", "16", "32"]))
    if header == "fix":
        out = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
    elif header == "16":
        out = b"\xdc" + struct.pack(">H", n)
    else:
        out = b"\xdd" + struct.pack(">I", n)
    for v in fields:
        out += _item(v if not isinstance(v, bytearray) else bytes(v), draw(_width))
    tail = draw(st.sampled_from(["", "", "", "cut", "extra"]))
    if tail == "cut" and out:
        out = out[: draw(st.integers(0, len(out) - 1))]
    elif tail == "extra":
        out += draw(st.binary(min_size=1, max_size=3))
    return out


def _reference(payload: bytes):
    slot = TickSlot(SYMBOLS)
    slot.max_event_ns = MAX_EVENT_NS
    ok = slot.ingest(payload)
    if not ok:
        reasons = np.flatnonzero(slot.counters)
        assert len(reasons) == 1 and slot.counters.sum() == 1
        return REJECT_NAMES[int(reasons[0])], None
    return "ok", slot.ticks[0].copy()


def _native(payload: bytes, outs):
    out_i, out_f = outs
    buf = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(0, np.uint8)
    r = decode_tick(buf, len(payload), MAX_EVENT_NS, out_i, out_f)
    if r:
        return REJECT_NAMES[r], None
    sym = payload[out_i[I_SYM_START]: out_i[I_SYM_START] + out_i[I_SYM_LEN]].decode("utf-8")
    if sym not in SYMBOLS:
        return REJECT_NAMES[REJECT_UNKNOWN_INSTRUMENT], None
    if not out_i[I_RANGE_OK]:
        return REJECT_NAMES[REJECT_MALFORMED], None
    return "ok", (out_i.copy(), out_f.copy(), SYMBOLS.index(sym))


def _same(ref_row, nat) -> None:
    out_i, out_f, inst = nat
    assert int(ref_row["instrument"]) == inst
    assert int(ref_row["kind"]) == out_i[I_KIND] and int(ref_row["side"]) == out_i[I_SIDE]
    assert int(ref_row["ts_event_ns"]) == out_i[I_TS_EVENT] and int(ref_row["ts_recv_ns"]) == out_i[I_TS_RECV]
    assert int(ref_row["order_id"]) == int(np.int64(out_i[I_ORDER_ID]).view(np.uint64))
    for j, name in enumerate(("bid_px", "bid_sz", "ask_px", "ask_sz", "price", "size")):
        a, b = float(ref_row[name]), float(out_f[j])
        same = a == b and math.copysign(1, a) == math.copysign(1, b)
        assert same or (math.isnan(a) and math.isnan(b)), name


OUTS = new_outputs()


@settings(max_examples=3000, deadline=None)
@given(_tick_bytes())
def test_the_compiled_decoder_decides_as_msgspec_on_drawn_ticks(payload):
    ref, nat = _reference(payload), _native(payload, OUTS)
    assert ref[0] == nat[0], (payload, ref[0], nat[0])
    if ref[0] == "ok":
        _same(ref[1], nat[1])


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 2**16))
def test_the_compiled_decoder_decides_as_msgspec_on_mutated_and_arbitrary_bytes(noise, seed):
    rng = np.random.default_rng(seed)
    good = bytearray(msgpack.packb([1, 1, "ESZ6", 1_700_000_000_000_000_000, 5, 100.0, 1.0, 100.25, 2.0,
                                    0.0, 0.0, 0, 7]))
    for payload in (bytes(noise), bytes(good[: rng.integers(0, len(good))]), bytes(good) + noise[:3]):
        ref, nat = _reference(payload), _native(payload, OUTS)
        assert ref[0] == nat[0], (payload, ref[0], nat[0])
    for _ in range(4):  # flip a byte of a valid tick
        g = bytearray(good)
        g[rng.integers(0, len(g))] = rng.integers(0, 256)
        payload = bytes(g)
        ref, nat = _reference(payload), _native(payload, OUTS)
        assert ref[0] == nat[0], (payload, ref[0], nat[0])
        if ref[0] == "ok":
            _same(ref[1], nat[1])


def test_a_length_beyond_the_buffer_is_malformed_never_a_read_past_it():
    out_i, out_f = OUTS
    b = np.frombuffer(msgpack.packb([1, 1, "ESZ6", 5, 5, 1.0, 1.0, 2.0, 1.0, 0.0, 0.0, 0, 0]), np.uint8)
    assert decode_tick(b, len(b), MAX_EVENT_NS, out_i, out_f) == 0
    assert decode_tick(b, len(b) + 1, MAX_EVENT_NS, out_i, out_f) == REJECT_MALFORMED
    assert decode_tick(b, -1, MAX_EVENT_NS, out_i, out_f) == REJECT_MALFORMED
    assert N_REJECT_REASONS > REJECT_MALFORMED


_EDGES = {1: [-1, 0, 255, 256, 2**64 - 1], 3: [-1, 0, 1, MAX_EVENT_NS, MAX_EVENT_NS + 1, 2**63, 2**64 - 1],
          4: [-(2**63), -(2**63) - 1, 2**63 - 1, 2**63], 11: [-129, -128, 127, 128, 2**63],
          12: [-1, 0, 2**63 - 1, 2**63, 2**64 - 1]}


def test_every_integer_range_edge_decides_as_msgspec():
    base = [1, 1, "ESZ6", 5, 5, 1.0, 1.0, 2.0, 1.0, 0.0, 0.0, 0, 0]
    for k, values in _EDGES.items():
        for v in values:
            for width in ("fix", "u", "s"):
                if v < -(2**63) or (width == "s" and v >= 2**63):
                    continue
                fields = list(base)
                fields[k] = v
                items = [_item(f, width if i == k else "fix") for i, f in enumerate(fields)]
                payload = b"\x9d" + b"".join(items)
                ref, nat = _reference(payload), _native(payload, OUTS)
                assert ref[0] == nat[0], (k, v, width, ref[0], nat[0])
                if ref[0] == "ok":
                    _same(ref[1], nat[1])
