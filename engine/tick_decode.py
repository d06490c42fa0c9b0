"""A compiled decoder of the ``Tick`` wire message (schema id 1), for a native ingress path.

:func:`decode_tick` reads one MessagePack ``Tick`` (the 13-element array of
:mod:`engine.wire`) from a ``uint8`` buffer in numba, without Python objects,
and reaches the same accept / reject decision, by the same reason, as the
msgspec path of the live sources (:meth:`engine.sources.TickSlot.ingest`):

1. anything msgspec's ``StrictTick`` decoder refuses is ``malformed``: not
   exactly one 13-element array (fixarray, array16 or array32) filling the
   buffer, a schema id other than the integer 1, a non-integer where an
   integer belongs (bool, float, nil ...), a non-number where a float belongs,
   a symbol that is not a MessagePack str or not valid UTF-8, truncated input,
   trailing bytes;
2. ``implausible_time``: ``ts_event_ns`` <= 0 or above ``max_event_ns``;
3. ``absurd_value``: a price or size above :data:`engine.schema.MAX_ABS_VALUE`
   while none is +inf;
4. then the caller maps the symbol (``sym_start``, ``sym_len`` in the buffer) to
   an instrument (``unknown_instrument`` ...), and only then checks the integer
   ranges of the tick dtype (``range_ok``: kind 0..255, side -128..127,
   ``ts_recv_ns`` an int64, ``order_id`` 0..2^64-1), whose failure is
   ``malformed`` (the order of :meth:`~engine.sources.TickSlot.ingest`).

Every read is bounds-checked against ``n`` (and ``n`` against the buffer), so
no input reads outside the buffer.  The functions are compiled with ``_nrt=False`` (numba's
reference counting off: they allocate nothing): with it on, every call of a
helper taking the buffer paid two atomic reference-count updates, about 17 ns
per call on the 2-vCPU VM (``benchmarks/bench_decode.py``: 353 -> 106 ns per
tick in a compiled loop that is itself ``_nrt=False``).  ``tests/test_tick_decode.py`` feeds both
decoders the same bytes (hypothesis) and requires identical decisions and
values.  The native ingress (:mod:`engine.native_ingress`) calls it; the python
loop's sources use msgspec.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.schema import MAX_ABS_VALUE, REJECT_ABSURD_VALUE, REJECT_IMPLAUSIBLE_TIME, REJECT_MALFORMED

__all__ = ["decode_tick", "I_KIND", "I_TS_EVENT", "I_TS_RECV", "I_SIDE", "I_ORDER_ID", "I_SYM_START",
           "I_SYM_LEN", "I_RANGE_OK", "N_OUT_I", "N_OUT_F", "new_outputs"]

# out_i slots
I_KIND, I_TS_EVENT, I_TS_RECV, I_SIDE, I_ORDER_ID, I_SYM_START, I_SYM_LEN, I_RANGE_OK = range(8)
N_OUT_I = 8
#: out_f slots: bid_px, bid_sz, ask_px, ask_sz, price, size
N_OUT_F = 6

_INT64_MAX = np.int64(9223372036854775807)


def new_outputs() -> tuple[np.ndarray, np.ndarray]:
    """Return preallocated ``(out_i, out_f)`` for :func:`decode_tick`."""
    return np.zeros(N_OUT_I, np.int64), np.zeros(N_OUT_F, np.float64)


@njit(cache=True, nogil=True, _nrt=False)  # no refcounting: see the module docstring
def _be(buf, pos, size):
    """Big-endian unsigned integer of ``size`` bytes at ``pos`` (as uint64)."""
    v = np.uint64(0)
    for k in range(size):
        v = (v << np.uint64(8)) | np.uint64(buf[pos + k])
    return v


@njit(cache=True, nogil=True, _nrt=False)  # no refcounting: see the module docstring
def _read_int(buf, pos, n):
    """Read a MessagePack integer at ``pos``; return (ok, value as int64 bits, big = >= 2^63, next pos).

    ``ok`` is False if the item there is not an integer (or is truncated).  Helpers return
    tuples rather than writing a scratch array: stores into an array argument cost ~30 ns per
    call here, a returned tuple nothing.
    """
    if pos >= n:
        return False, np.int64(0), False, pos
    b = buf[pos]
    if b <= 0x7F:
        return True, np.int64(b), False, pos + 1
    if b >= 0xE0:
        return True, np.int64(b) - 256, False, pos + 1
    if 0xCC <= b <= 0xCF:  # uint8/16/32/64
        size = 1 << (b - 0xCC)
        if pos + 1 + size > n:
            return False, np.int64(0), False, pos
        u = _be(buf, pos + 1, size)
        return True, np.int64(u), u > np.uint64(_INT64_MAX), pos + 1 + size  # bits kept when big
    if 0xD0 <= b <= 0xD3:  # int8/16/32/64
        size = 1 << (b - 0xD0)
        if pos + 1 + size > n:
            return False, np.int64(0), False, pos
        shift = np.uint64(64 - 8 * size)
        v = np.int64(_be(buf, pos + 1, size) << shift) >> np.int64(shift)  # sign-extend
        return True, v, False, pos + 1 + size
    return False, np.int64(0), False, pos


@njit(cache=True, nogil=True, _nrt=False)  # no refcounting: see the module docstring
def _read_num(buf, pos, n):
    """Read a float (float32/64) or an integer as float64; return (ok, value, next pos)."""
    if pos >= n:
        return False, 0.0, pos
    b = buf[pos]
    if b == 0xCA:
        if pos + 5 > n:
            return False, 0.0, pos
        return True, np.float64(np.uint32(_be(buf, pos + 1, 4)).view(np.float32)), pos + 5
    if b == 0xCB:
        if pos + 9 > n:
            return False, 0.0, pos
        return True, np.uint64(_be(buf, pos + 1, 8)).view(np.float64), pos + 9
    ok, v, big, nxt = _read_int(buf, pos, n)
    if not ok:
        return False, 0.0, pos
    if big:
        return True, np.float64(np.uint64(v)), nxt
    return True, np.float64(v), nxt


@njit(cache=True, nogil=True, _nrt=False)  # no refcounting: see the module docstring
def _utf8_ok(buf, start, length):
    """Return whether buf[start:start+length] is valid UTF-8 (no overlongs, surrogates, > U+10FFFF)."""
    i = start
    end = start + length
    while i < end:
        c = buf[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            need, lo, hi = 2, 0xA0, 0xBF
        elif 0xE1 <= c <= 0xEC or 0xEE <= c <= 0xEF:
            need, lo, hi = 2, 0x80, 0xBF
        elif c == 0xED:
            need, lo, hi = 2, 0x80, 0x9F
        elif c == 0xF0:
            need, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            need, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            need, lo, hi = 3, 0x80, 0x8F
        else:
            return False
        if i + need > end - 1:
            return False
        if not lo <= buf[i + 1] <= hi:
            return False
        for k in range(2, need + 1):
            if not 0x80 <= buf[i + k] <= 0xBF:
                return False
        i += need + 1
    return True


@njit(cache=True, nogil=True, _nrt=False)  # no refcounting: see the module docstring
def decode_tick(buf, n, max_event_ns, out_i, out_f):
    """Decode one Tick from ``buf[:n]``; return 0 (decoded, see ``out_i``/``out_f``) or a reject reason.

    ``out_i``: kind, ts_event_ns, ts_recv_ns, side, order_id (int64 bits), sym_start, sym_len,
    range_ok; ``out_f``: bid_px, bid_sz, ask_px, ask_sz, price, size.  Meaningful only when 0
    is returned (a reject may leave them partly written).
    """
    if n < 0 or n > buf.shape[0]:
        return REJECT_MALFORMED
    if n < 1:
        return REJECT_MALFORMED
    b = buf[0]
    pos = 0
    if b == 0x9D:
        pos = 1
    elif b == 0xDC:
        if n < 3 or _be(buf, 1, 2) != np.uint64(13):
            return REJECT_MALFORMED
        pos = 3
    elif b == 0xDD:
        if n < 5 or _be(buf, 1, 4) != np.uint64(13):
            return REJECT_MALFORMED
        pos = 5
    else:
        return REJECT_MALFORMED
    # schema id: the integer 1
    ok, v, big, pos = _read_int(buf, pos, n)
    if not ok or big or v != 1:
        return REJECT_MALFORMED
    # kind
    ok, kind, kind_big, pos = _read_int(buf, pos, n)
    if not ok:
        return REJECT_MALFORMED
    # instrument: str (fixstr, str8/16/32), valid UTF-8
    if pos >= n:
        return REJECT_MALFORMED
    b = buf[pos]
    if 0xA0 <= b <= 0xBF:
        slen = np.int64(b - 0xA0)
        start = pos + 1
    elif 0xD9 <= b <= 0xDB:
        size = 1 << (b - 0xD9)
        if pos + 1 + size > n:
            return REJECT_MALFORMED
        slen = np.int64(_be(buf, pos + 1, size))
        start = pos + 1 + size
    else:
        return REJECT_MALFORMED
    if slen > n - start:
        return REJECT_MALFORMED
    if not _utf8_ok(buf, start, slen):
        return REJECT_MALFORMED
    pos = start + slen
    # ts_event_ns, ts_recv_ns
    ok, ts_event, ts_event_big, pos = _read_int(buf, pos, n)
    if not ok:
        return REJECT_MALFORMED
    ok, ts_recv, ts_recv_big, pos = _read_int(buf, pos, n)
    if not ok:
        return REJECT_MALFORMED
    # six prices and sizes
    for j in range(6):
        ok, f, pos = _read_num(buf, pos, n)
        if not ok:
            return REJECT_MALFORMED
        out_f[j] = f
    # side, order_id
    ok, side, side_big, pos = _read_int(buf, pos, n)
    if not ok:
        return REJECT_MALFORMED
    ok, oid, oid_big, pos = _read_int(buf, pos, n)
    if not ok:
        return REJECT_MALFORMED
    if pos != n:  # trailing bytes
        return REJECT_MALFORMED
    # plausibility (before the instrument, as TickSlot.ingest)
    if ts_event_big or ts_event <= 0 or ts_event > max_event_ns:
        return REJECT_IMPLAUSIBLE_TIME
    lim = MAX_ABS_VALUE
    big = False
    inf = False
    for j in range(6):
        if out_f[j] > lim:
            big = True
        if out_f[j] == np.inf:
            inf = True
    if big and not inf:
        return REJECT_ABSURD_VALUE
    ok = 1
    if kind_big or kind < 0 or kind > 255:
        ok = 0
    if side_big or side < -128 or side > 127:
        ok = 0
    if ts_recv_big:
        ok = 0
    if not oid_big and oid < 0:
        ok = 0
    out_i[I_KIND] = kind
    out_i[I_TS_EVENT] = ts_event
    out_i[I_TS_RECV] = ts_recv
    out_i[I_SIDE] = side
    out_i[I_ORDER_ID] = oid
    out_i[I_SYM_START] = start
    out_i[I_SYM_LEN] = slen
    out_i[I_RANGE_OK] = ok
    return 0
