"""The native duty cycle of the fused backend: one compiled call scores a batch of ticks.

``ScoringAgent`` with ``loop="native"`` replaces its per-tick Python (poll,
dispatch, msgspec encode, pyzmq send, clock reads) by one numba call per duty
cycle, :func:`loop_kernel` ``(ctx_addr, lctx_addr, start, stop)``,
which for every tick ``i`` of ``[start, stop)``, in compiled code:

1. waits for nothing: a paced replay stops the batch at the first tick not yet
   due (its intended time is written, as the Python path does);
2. reads ``CLOCK_MONOTONIC`` (libc ``clock_gettime``, the clock of
   ``time.perf_counter_ns``) as ``t_in``, or takes the ingress time a native
   source recorded at receive; in an unpaced replay from memory the next tick
   of a batch is taken when the previous one is published, so its ``t_in`` is
   that tick's ``t_out`` reading (the latencies of a batch tile its time);
3. runs the fused tick kernel (validate, features, model);
4. encodes the ``Score`` (:func:`encode_score`, byte-identical to msgspec's
   encoding of the same row: a property test compares them);
5. publishes ``[topic, payload]`` with libzmq's ``zmq_send`` on the ZeroMQ
   sink's socket handle (:mod:`engine.native_zmq`; ``EAGAIN`` is a counted drop
   as in :meth:`engine.zmq_io.ZmqPublisher.publish`), offers the payload to an
   Aeron publication (:func:`engine.native_aeron.offer_with_retries`, counted as
   :class:`engine.aeron_io.AeronPublisher` counts), and copies it into a tap
   arena when Python sinks (the score recorder) want every payload;
6. stores ``t_in`` / ``t_out`` (and 1 in ``stage_every`` the model time) into
   the :class:`engine.recorder.LatencyRecorder` rings.

Rejected ticks are counted by the tick kernel (per reason, as before) and their
indices are handed back so the source keeps its bookkeeping.  A batch stops
early when the tap arena or the reject list is full; the next call goes on.

Everything the kernel touches is addressed through ``lctx``, an int64 array of
addresses and sizes (as :class:`models.tick_kernels.TickContext` does for the
tick): a call costs one numba dispatch of four integers.  Every index that comes
from data or from a count is checked or masked in the kernel: ring and stage
indices are masked, ``stop`` is clamped to the tick buffer, the reject list, the
tap arena and the intended-time array are checked before a write, and an
instrument id beyond the symbol table or a payload beyond its buffer is a
counted error, never a write out of bounds.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from engine.native_aeron import N_A_COUNTERS, offer_with_retries
from engine.native_zmq import (
    ZMQ_DONTWAIT,
    ZMQ_SNDMORE,
    NativeBindError,
    bind_libzmq,
    call_address,
    call_clock_gettime,
    call_errno,
    call_send_recv,
    fn_address,
)
from engine.recorder import LatencyRecorder
from engine.wire import SCORE_SCHEMA_ID
from models.tick_kernels import _ctx_of, _ptr, _ticks_of, tick_cfunc_address

__all__ = ["NativeLoop", "loop_kernel", "encode_score", "bind_clock", "native_loop_refusal",
           "SymbolTable", "MAX_SCORE_BYTES"]

#: Longest Score payload the kernel writes: 1 + 1 + (5 + 255) + 4 x 9 + 9 + (3 + 255) + 3 x 9 bytes
#: (symbols and model versions up to 255 bytes are encoded; longer ones are refused at bind).
MAX_SCORE_BYTES = 1 + 1 + 260 + 4 * 9 + 9 + 258 + 3 * 9
_MAX_STR = 255

# lctx slots ----------------------------------------------------------------------------
(L_SEQ, L_T_IN, L_T_OUT, L_RING_MASK, L_ST_F, L_ST_M, L_ST_SHIFT, L_ST_MASK, L_ST_EVERY_MASK,
 L_STR, L_STR_LEN, L_SYM_OFF, L_N_SYM, L_VER_OFF, L_VER_LEN, L_PAYLOAD, L_PAYLOAD_CAP,
 L_SOCK, L_SENT, L_DROPS, L_SEND_ERRORS, L_LAST_ERRNO,
 L_TAP, L_TAP_CAP, L_TAP_USED, L_TAP_OFF, L_TAP_MAX, L_TAP_N,
 L_REJ, L_REJ_CAP, L_REJ_N,
 L_PACED, L_PACE_START, L_PACE_TS0, L_PACE_INV, L_INTENDED, L_INTENDED_N,
 L_INGRESS, L_INGRESS_N, L_TIMESPEC, L_ERRORS, L_FN_CLOCK, L_FN_SEND, L_FN_ERRNO, L_FN_TICK,
 L_FLAGS_OUT, L_APUB, L_FN_OFFER, L_A_C, L_A_BP_RETRIES, L_A_NC_RETRIES, L_SHARD, L_EPOCH) = range(53)
LCTX_LEN = 53
_EAGAIN = 11


def bind_clock():
    """Return libc's ``clock_gettime`` bound for numba (``CLOCK_MONOTONIC`` is read through it).

    Raises :class:`NativeBindError` where libc lacks it (the native loop then is unavailable).
    """
    try:
        libc = ctypes.CDLL(None)
        fn = libc.clock_gettime
    except (OSError, AttributeError) as exc:
        raise NativeBindError(f"libc clock_gettime is not available: {exc}") from None
    fn.argtypes = [ctypes.c_int, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


# --------------------------------------------------------------------------- Score encoder
def _store_be(nbits: int):
    """An intrinsic ``store(addr, v)``: the low ``nbits`` of uint64 ``v`` big-endian at byte address ``addr``.

    One byte-swapped unaligned store (``bswap`` + ``mov``) instead of a loop of byte
    writes.  The callers check the buffer's room first (:func:`encode_score`).
    """

    @intrinsic
    def store(typingctx, addr, v):
        sig = types.void(types.int64, types.uint64)

        def codegen(context, builder, signature, args):
            ity = ir.IntType(nbits)
            val = builder.trunc(args[1], ity) if nbits < 64 else args[1]
            builder.store(builder.bswap(val), builder.inttoptr(args[0], ity.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    return store


_st_be16, _st_be32, _st_be64 = _store_be(16), _store_be(32), _store_be(64)


@intrinsic
def _f64_bits(typingctx, x):
    """The IEEE 754 bits of float64 ``x`` as uint64 (NaN payloads kept)."""
    sig = types.uint64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@njit(cache=True, nogil=True, _nrt=False, inline="always")
def _put_be(buf, pos, v, size):
    """Write the low ``size`` bytes (1, 2, 4, 8) of uint64 ``v`` big-endian at ``pos``; return pos + size."""
    a = buf.ctypes.data + pos
    if size == 8:
        _st_be64(a, v)
    elif size == 4:
        _st_be32(a, v)
    elif size == 2:
        _st_be16(a, v)
    else:
        buf[pos] = np.uint8(v & np.uint64(0xFF))
    return pos + size


@njit(cache=True, nogil=True, _nrt=False, inline="always")
def _put_int(buf, pos, x):
    """MessagePack integer ``x`` (int64) in msgspec's choice of the smallest encoding."""
    if x >= 0:
        if x < 128:
            buf[pos] = np.uint8(x)
            return pos + 1
        u = np.uint64(x)
        if x < 256:
            buf[pos] = 0xCC
            return _put_be(buf, pos + 1, u, 1)
        if x < 65536:
            buf[pos] = 0xCD
            return _put_be(buf, pos + 1, u, 2)
        if x < 4294967296:
            buf[pos] = 0xCE
            return _put_be(buf, pos + 1, u, 4)
        buf[pos] = 0xCF
        return _put_be(buf, pos + 1, u, 8)
    if x >= -32:
        buf[pos] = np.uint8(x & 0xFF)
        return pos + 1
    u = np.uint64(x)  # two's complement bits
    if x >= -128:
        buf[pos] = 0xD0
        return _put_be(buf, pos + 1, u, 1)
    if x >= -32768:
        buf[pos] = 0xD1
        return _put_be(buf, pos + 1, u, 2)
    if x >= -2147483648:
        buf[pos] = 0xD2
        return _put_be(buf, pos + 1, u, 4)
    buf[pos] = 0xD3
    return _put_be(buf, pos + 1, u, 8)


@intrinsic
def _copy8(typingctx, dst, src):
    """Copy 8 bytes from byte address ``src`` to ``dst`` (unaligned load and store)."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        p64 = ir.IntType(64).as_pointer()
        v = builder.load(builder.inttoptr(args[1], p64), align=1)
        builder.store(v, builder.inttoptr(args[0], p64), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, _nrt=False, inline="always")
def _put_bytes(buf, pos, src, start, length):
    """Copy ``src[start:start+length]`` to ``buf[pos:]`` (8 bytes at a time; callers check the room).

    A tail shorter than 8 bytes is one more 8-byte copy that ends where the item ends
    (it rewrites a few bytes already copied, with the same values) when the item is at
    least 8 bytes long; shorter items go byte by byte.
    """
    d, s = buf.ctypes.data + pos, src.ctypes.data + start
    if length >= 8:
        k = 0
        while k + 8 <= length:
            _copy8(d + k, s + k)
            k += 8
        if k < length:
            _copy8(d + length - 8, s + length - 8)
    else:
        for k in range(length):
            buf[pos + k] = src[start + k]
    return pos + length


@njit(cache=True, nogil=True, _nrt=False)
def encode_score(buf, strtab, sym_start, sym_len, seq, ts_event, ts_in, ts_out, score,
                 ver_start, ver_len, flags, shard, epoch):  # fmt: skip
    """Encode ``Score(instrument, seq, ts_event, ts_in, ts_out, score, model_version, flags, shard, epoch)``.

    ``strtab[sym_start:sym_start+sym_len]`` and ``strtab[ver_start:ver_start+ver_len]`` are
    the *already MessagePack-encoded* str items (header + UTF-8) of the symbol and model
    version.  Returns the payload length, or -1 when ``buf`` cannot hold the longest
    encoding of these fields (checked before any write: the wide stores are unchecked).
    """
    need = 2 + sym_len + 4 * 9 + 9 + ver_len + 3 * 9
    if (need > buf.shape[0] or sym_start < 0 or ver_start < 0 or sym_len < 0 or ver_len < 0
            or sym_start + sym_len > strtab.shape[0] or ver_start + ver_len > strtab.shape[0]):  # fmt: skip
        return -1
    buf[0] = 0x9B  # fixarray of 11: schema id + 10 fields
    buf[1] = SCORE_SCHEMA_ID
    pos = _put_bytes(buf, 2, strtab, sym_start, sym_len)
    pos = _put_int(buf, pos, seq)
    pos = _put_int(buf, pos, ts_event)
    pos = _put_int(buf, pos, ts_in)
    pos = _put_int(buf, pos, ts_out)
    buf[pos] = 0xCB  # float 64, big-endian
    pos = _put_be(buf, pos + 1, _f64_bits(score), 8)
    pos = _put_bytes(buf, pos, strtab, ver_start, ver_len)
    pos = _put_int(buf, pos, flags)
    pos = _put_int(buf, pos, shard)
    return _put_int(buf, pos, epoch)


def msgpack_str(text: str) -> bytes:
    """Return ``text`` as a MessagePack str item (msgspec's header choice), for the symbol table."""
    raw = text.encode()
    n = len(raw)
    if n < 32:
        return bytes([0xA0 | n]) + raw
    if n < 256:
        return bytes([0xD9, n]) + raw
    raise ValueError(f"{text[:40]!r}...: symbols and model versions over {_MAX_STR} bytes are not "
                     "supported by the native loop (use --loop python)")  # fmt: skip


class SymbolTable:
    """The symbols' topic bytes and encoded str items, and the model version's, in one uint8 table.

    ``off[2*k]`` / ``off[2*k+1]``: start and length of instrument ``k``'s str item; its topic
    (raw UTF-8) is the item without its header.
    """

    def __init__(self, symbols: Sequence[str], version: str) -> None:
        parts, off, pos = [], [], 0
        for s in symbols:
            item = msgpack_str(s)
            parts.append(item)
            off += [pos, len(item)]
            pos += len(item)
        ver = msgpack_str(version)
        parts.append(ver)
        self.ver_off, self.ver_len = pos, len(ver)
        self.n = len(symbols)
        self.table = np.frombuffer(b"".join(parts) or b"\0", dtype=np.uint8).copy()
        self.off = np.asarray(off or [0, 0], dtype=np.int64)


# --------------------------------------------------------------------------- the loop kernel
@njit(cache=True, nogil=True)
def now_ns(fn, ts):
    """``CLOCK_MONOTONIC`` in ns via libc's ``clock_gettime`` at address ``fn`` (``ts``: int64[2] scratch)."""
    call_clock_gettime(fn, 1, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


_MORE, _LAST = ZMQ_SNDMORE | ZMQ_DONTWAIT, ZMQ_DONTWAIT


@intrinsic
def _call_tick(typingctx, fn, i, ctx_addr, flags_out):
    """``double tick(int64 i, int64 ctx_addr, int64 *flags)`` at address ``fn`` (:data:`TICK_CFUNC_SIG`)."""
    sig = types.float64(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        flags = builder.inttoptr(args[3], i64.as_pointer())
        proto = [i64, i64, i64.as_pointer()]
        return call_address(builder, args[0], ir.DoubleType(), proto, [args[1], args[2], flags])

    return sig, codegen


@njit(nogil=True, cache=True)
def loop_kernel(ctx_addr, lctx_addr, start, stop):
    """Score ticks ``[start, stop)`` of the tick context at ``ctx_addr``; see the module docstring.

    The fused tick kernel and the C functions (``clock_gettime``, ``zmq_send``,
    ``zmq_errno``) are called through the addresses in ``lctx`` (filled by
    :class:`NativeLoop` after :func:`engine.native_zmq.bind_libzmq`'s start-up
    checks), so this one kernel serves every feature set and is cached on disk.
    """
    L = carray(_ptr(lctx_addr, np.int64), (LCTX_LEN,))
    ticks = _ticks_of(_ctx_of(ctx_addr))
    ts = carray(_ptr(L[L_TIMESPEC], np.int64), (2,))
    fn_clock, fn_send, fn_errno, fn_tick = L[L_FN_CLOCK], L[L_FN_SEND], L[L_FN_ERRNO], L[L_FN_TICK]
    flags_out = L[L_FLAGS_OUT]
    apub = L[L_APUB]
    a_c = carray(_ptr(L[L_A_C], np.int64), (N_A_COUNTERS,))
    flags_arr = carray(_ptr(flags_out, np.int64), (1,))
    mask = L[L_RING_MASK]
    t_in_ring = carray(_ptr(L[L_T_IN], np.int64), (mask + 1,))
    t_out_ring = carray(_ptr(L[L_T_OUT], np.int64), (mask + 1,))
    st_mask = L[L_ST_MASK]
    st_f = carray(_ptr(L[L_ST_F], np.int64), (st_mask + 1,))
    st_m = carray(_ptr(L[L_ST_M], np.int64), (st_mask + 1,))
    st_shift, st_every_mask = L[L_ST_SHIFT], L[L_ST_EVERY_MASK]
    strtab = carray(_ptr(L[L_STR], np.uint8), (L[L_STR_LEN],))
    n_sym = L[L_N_SYM]
    sym_off = carray(_ptr(L[L_SYM_OFF], np.int64), (2 * n_sym + 2,))
    ver_off, ver_len = L[L_VER_OFF], L[L_VER_LEN]
    payload = carray(_ptr(L[L_PAYLOAD], np.uint8), (L[L_PAYLOAD_CAP],))
    sock = L[L_SOCK]
    tap_cap = L[L_TAP_CAP]
    tap = carray(_ptr(L[L_TAP], np.uint8), (max(tap_cap, 1),))
    tap_max = L[L_TAP_MAX]
    tap_off = carray(_ptr(L[L_TAP_OFF], np.int64), (max(tap_max, 0) + 1,))
    rej_cap = L[L_REJ_CAP]
    rej = carray(_ptr(L[L_REJ], np.int64), (rej_cap,))
    paced = L[L_PACED] != 0
    n_int = L[L_INTENDED_N]
    intended = carray(_ptr(L[L_INTENDED], np.int64), (max(n_int, 1),))
    n_ing = L[L_INGRESS_N]
    ingress = carray(_ptr(L[L_INGRESS], np.int64), (max(n_ing, 1),))
    pace_start, pace_ts0 = L[L_PACE_START], L[L_PACE_TS0]
    inv_speed = carray(_ptr(L[L_PACE_INV], np.float64), (1,))[0]
    seq = L[L_SEQ]
    shard, epoch = L[L_SHARD], L[L_EPOCH]
    n_rej = L[L_REJ_N]
    tap_n, tap_used = L[L_TAP_N], L[L_TAP_USED]
    sent, drops, errors = L[L_SENT], L[L_DROPS], L[L_SEND_ERRORS]
    bad = L[L_ERRORS]
    stop = min(stop, ticks.shape[0])
    # an unpaced replay from memory: tick i+1 is taken the moment tick i is published, so the
    # clock reading that ends tick i (t_out) is also tick i+1's t_in (one reading fewer per tick)
    chain = not paced and n_ing == 0
    t_next = np.int64(-1)
    i = start
    while i < stop:
        if n_rej >= rej_cap:
            break  # the caller hands the rejects to the source, then goes on
        if tap_cap > 0 and (tap_n >= tap_max or tap_used + MAX_SCORE_BYTES > tap_cap):
            break
        if paced:
            if i >= n_int:
                bad += 1
                break
            t_now = now_ns(fn_clock, ts)
            due = pace_start + np.int64((ticks[i].ts_event_ns - pace_ts0) * inv_speed)
            if t_now < due:
                break
            intended[i] = due
        if n_ing > 0 and i < n_ing:
            t_in = ingress[i]
        elif t_next >= 0:
            t_in = t_next
        else:
            t_in = now_ns(fn_clock, ts)
        t_next = -1
        score = _call_tick(fn_tick, i, ctx_addr, flags_out)
        flags = flags_arr[0]
        if flags < 0:
            rej[n_rej] = i
            n_rej += 1
            i += 1
            continue
        inst = np.int64(ticks[i].instrument)
        if inst < 0 or inst >= n_sym:  # cannot happen for a validated tick; never index out of bounds
            bad += 1
            i += 1
            continue
        if not seq & st_every_mask:  # stage sample: features and model are one call here
            t_model = now_ns(fn_clock, ts)
            k = (seq >> st_shift) & st_mask
            st_f[k] = t_model
            st_m[k] = t_model
        s0, sl = sym_off[2 * inst], sym_off[2 * inst + 1]
        ts_out = now_ns(fn_clock, ts)
        plen = encode_score(payload, strtab, s0, sl, seq, ticks[i].ts_event_ns, t_in, ts_out, score,
                            ver_off, ver_len, np.int64(flags), shard, epoch)  # fmt: skip
        if plen < 0:
            bad += 1
            i += 1
            continue
        if sock != 0 and fn_send != 0:
            h = s0 + 2 if strtab[s0] == 0xD9 else s0 + 1  # the topic: the str item without header
            if call_send_recv(fn_send, sock, strtab.ctypes.data + h, s0 + sl - h, _MORE) < 0:
                e = call_errno(fn_errno)
                if e == _EAGAIN:
                    drops += 1
                else:
                    errors += 1
                    L[L_LAST_ERRNO] = e
            else:
                # the second frame of a message is never refused once the first is queued
                call_send_recv(fn_send, sock, payload.ctypes.data, plen, _LAST)
                sent += 1
        if apub != 0:  # Aeron: the payload only, one message per Score
            offer_with_retries(L[L_FN_OFFER], apub, payload.ctypes.data, plen, a_c, L[L_A_BP_RETRIES],
                               L[L_A_NC_RETRIES])  # fmt: skip
        if tap_cap > 0:
            for b in range(plen):
                tap[tap_used + b] = payload[b]
            tap_used += plen
            tap_n += 1
            tap_off[tap_n] = tap_used
        t_out = now_ns(fn_clock, ts)
        if chain:
            t_next = t_out
        r = seq & mask
        t_in_ring[r] = t_in
        t_out_ring[r] = t_out
        seq += 1
        i += 1
    L[L_SEQ] = seq
    L[L_REJ_N] = n_rej
    L[L_TAP_N] = tap_n
    L[L_TAP_USED] = tap_used
    L[L_SENT], L[L_DROPS], L[L_SEND_ERRORS] = sent, drops, errors
    L[L_ERRORS] = bad
    return i - start


def native_loop_refusal(backend, sinks) -> str | None:
    """Return why the native loop cannot serve this backend and these sinks, or None when it can."""
    if getattr(backend, "kind", "") != "fused":
        kind = getattr(backend, "kind", "?")
        return f"the {kind} backend runs per tick in Python (the native loop needs fused)"
    if sys.byteorder != "little":
        return "the native Score encoder assumes a little-endian host"
    kinds = [getattr(s, "native", None) for s in sinks]
    others = [s for s, k in zip(sinks, kinds, strict=True) if k not in ("zmq", "aeron", "none", "tap")]
    if kinds.count("zmq") > 1 or kinds.count("aeron") > 1:
        return "the native loop publishes to one ZeroMQ socket and one Aeron publication; this run has more"
    if others:
        names = ", ".join(sorted({getattr(s, "name", type(s).__name__) for s in others}))
        return f"the {names} sink publishes from Python (no compiled path for it yet)"
    return None


class NativeLoop:
    """The lctx of :func:`loop_kernel` with everything it points to (kept alive here).

    Parameters
    ----------
    tick : the fused tick kernel; ``tick_ctx`` is its :class:`~models.tick_kernels.TickContext`
    symbols, version : the instrument symbols (id order) and the model version written in Scores
    sinks : the agent's sinks; one with ``native == "zmq"`` is published with ``zmq_send``;
        those with ``native == "tap"`` get every payload after the batch
    recorder : the agent's latency rings
    """

    REJ_CAP = 4096

    def __init__(self, tick, symbols: Sequence[str], version: str, sinks, recorder: LatencyRecorder) -> None:
        self.sinks = list(sinks)
        self.zmq_sink = next((s for s in self.sinks if getattr(s, "native", None) == "zmq"), None)
        self.aeron_sink = next((s for s in self.sinks if getattr(s, "native", None) == "aeron"), None)
        self.taps = [s for s in self.sinks if getattr(s, "native", None) == "tap"]
        self.version = version
        #: one cached kernel serves every feature set (the tick kernel is called by address)
        self.kernel = loop_kernel
        self.L = np.zeros(LCTX_LEN, dtype=np.int64)
        #: what the kernel takes (valid while this object lives)
        self.addr = int(self.L.ctypes.data)
        self._keep: dict[str, np.ndarray] = {}
        L = self.L
        L[L_FN_CLOCK] = fn_address(bind_clock())
        L[L_FN_TICK] = tick_cfunc_address(tick)
        a = self.aeron_sink
        if a is not None:  # its counters are written by the kernel in place
            L[L_APUB], L[L_FN_OFFER] = a.handle, a.fn_offer
            L[L_A_BP_RETRIES], L[L_A_NC_RETRIES] = a.bp_retries, a.nc_retries
            self._hold("a_c", a.c, L_A_C)
        else:
            self._hold("a_c", np.zeros(N_A_COUNTERS, np.int64), L_A_C)
        self._flags_out = self._hold("flags_out", np.zeros(1, np.int64), L_FLAGS_OUT)
        z = self.zmq_sink
        if z is not None:  # checked at start-up: the library, its symbols and version
            lib = bind_libzmq()
            L[L_FN_SEND], L[L_FN_ERRNO] = fn_address(lib.zmq_send), fn_address(lib.zmq_errno)
            L[L_SOCK] = int(z.sock.underlying)
            self._sent0, self._drops0 = z.sent, z.drops
        self._timespec = self._hold("timespec", np.zeros(2, np.int64), L_TIMESPEC)
        self._inv = self._hold("inv", np.zeros(1, np.float64), L_PACE_INV)
        self.payload = self._hold("payload", np.zeros(MAX_SCORE_BYTES, np.uint8), L_PAYLOAD)
        L[L_PAYLOAD_CAP] = MAX_SCORE_BYTES
        self.rejects = self._hold("rej", np.zeros(self.REJ_CAP, np.int64), L_REJ)
        L[L_REJ_CAP] = self.REJ_CAP
        self.bind_recorder(recorder)
        self.set_symbols(symbols, version)
        if self.taps:
            cap = 1 << 20
            self.tap = self._hold("tap", np.zeros(cap, np.uint8), L_TAP)
            L[L_TAP_CAP] = cap
            L[L_TAP_MAX] = 8192
            self.tap_off = self._hold("tap_off", np.zeros(8192 + 1, np.int64), L_TAP_OFF)
        self._intended = None
        self._ingress = None

    def throwaway(self, tick) -> NativeLoop:
        """Return a loop on this kernel that publishes nothing and records into its own small rings.

        For warm-up and keep-warm: run it on a throwaway :class:`~models.tick_kernels.TickContext`
        over one-instrument synthetic ticks.
        """
        return NativeLoop(tick, ["W"], self.version, [], LatencyRecorder(64, 64))

    def _hold(self, name: str, a: np.ndarray, slot: int) -> np.ndarray:
        self._keep[name] = a
        self.L[slot] = a.ctypes.data
        return a

    def bind_recorder(self, rec: LatencyRecorder) -> None:
        """Write into ``rec``'s rings."""
        L = self.L
        self._rec = rec
        L[L_T_IN], L[L_T_OUT], L[L_RING_MASK] = rec.t_in.ctypes.data, rec.t_out.ctypes.data, rec.mask
        L[L_ST_F], L[L_ST_M] = rec.stage_t_features.ctypes.data, rec.stage_t_model.ctypes.data
        L[L_ST_SHIFT], L[L_ST_MASK], L[L_ST_EVERY_MASK] = rec.stage_shift, rec.stage_mask, rec.stage_every - 1

    def set_symbols(self, symbols: Sequence[str], version: str) -> None:
        """(Re)build the symbol table: at start, after a new instrument or a model swap."""
        st = SymbolTable(symbols, version)
        self.symbols = st
        L = self.L
        self._hold("str", st.table, L_STR)
        L[L_STR_LEN] = st.table.shape[0]
        self._hold("sym_off", st.off, L_SYM_OFF)
        L[L_N_SYM] = st.n
        L[L_VER_OFF], L[L_VER_LEN] = st.ver_off, st.ver_len

    def set_pacing(self, start_ns: int, ts0: int, inv_speed: float, intended: np.ndarray | None) -> None:
        """Pace the batch (replay at a speed): tick i is due at ``start + (ts_i - ts0) * inv_speed``."""
        L = self.L
        if intended is None:
            L[L_PACED] = 0
            return
        L[L_PACED] = 1
        L[L_PACE_START], L[L_PACE_TS0] = int(start_ns), int(ts0)
        self._inv[0] = inv_speed
        self._intended = intended
        L[L_INTENDED], L[L_INTENDED_N] = intended.ctypes.data, intended.shape[0]

    def set_ingress(self, ingress: np.ndarray | None) -> None:
        """Take ``t_in`` of tick i from ``ingress[i]`` (a native source's receive times)."""
        self._ingress = ingress
        L = self.L
        if ingress is None:
            L[L_INGRESS], L[L_INGRESS_N] = 0, 0
        else:
            L[L_INGRESS], L[L_INGRESS_N] = ingress.ctypes.data, ingress.shape[0]

    def set_origin(self, shard: int, epoch: int) -> None:
        """Write ``shard`` and ``epoch`` into every Score from now on."""
        self.L[L_SHARD], self.L[L_EPOCH] = int(shard), int(epoch)

    @property
    def seq(self) -> int:
        return int(self.L[L_SEQ])

    @seq.setter
    def seq(self, value: int) -> None:
        self.L[L_SEQ] = int(value)

    @property
    def errors(self) -> int:
        """Internal errors counted by the kernel (an instrument beyond the table, a full payload)."""
        return int(self.L[L_ERRORS])

    def sync_sink_counters(self) -> None:
        """Fold the kernel's send counts into the ZeroMQ sink's ``sent`` / ``drops`` (off the tick path)."""
        z = self.zmq_sink
        if z is not None:
            z.sent = self._sent0 + int(self.L[L_SENT])
            z.drops = self._drops0 + int(self.L[L_DROPS])
            z.send_errors = int(self.L[L_SEND_ERRORS])

    def take_rejects(self) -> np.ndarray | None:
        """Return the indices rejected in the last batches (and forget them), or None."""
        n = int(self.L[L_REJ_N])
        if not n:
            return None
        self.L[L_REJ_N] = 0
        return self.rejects[:n].copy()

    def drain_tap(self) -> None:
        """Hand the batch's payloads to the tap sinks (the score recorder), in seq order."""
        n = int(self.L[L_TAP_N])
        if not n:
            return
        off = self.tap_off
        buf = self.tap
        for j in range(n):
            p = buf[off[j]:off[j + 1]].tobytes()
            for s in self.taps:
                s.publish(b"", p)
        self.L[L_TAP_N] = 0
        self.L[L_TAP_USED] = 0

    def run(self, ctx_addr: int, start: int, stop: int) -> int:
        """Score ticks ``[start, stop)`` (fewer when paced or an arena fills); return how many were taken."""
        return self.kernel(ctx_addr, self.addr, start, stop)
