"""Compiled ingress for the native duty cycle: ZeroMQ and Aeron ticks received and decoded without Python.

:class:`NativeZmqTickSource` is the live ZeroMQ tick source of a service whose
agent runs the native loop (:mod:`engine.native_loop`).  Its ``window(limit)``
makes one numba call that, for up to ``limit`` messages already queued on the
SUB socket:

1. receives the two frames ``[topic, payload]`` with libzmq's ``zmq_recv``
   (``ZMQ_DONTWAIT``) into a preallocated buffer, checks the framing with
   ``zmq_getsockopt(ZMQ_RCVMORE)`` (a message of one frame, or of three or more,
   is drained whole and counted ``malformed``, as :class:`engine.sources.ZmqTickSource` does);
2. reads ``CLOCK_MONOTONIC`` as the tick's ingress time (the native loop's
   ``t_in``: so the service time includes the decode, unlike the python loop's);
3. decodes the ``Tick`` with :func:`engine.tick_decode.decode_tick` (same
   decision, by the same reason, as msgspec's path: property-tested);
4. maps the symbol to its instrument id through an open-addressing hash table of
   the instrument table (FNV-1a over the UTF-8 bytes);
5. writes the row into a preallocated multi-row ``TICK_DTYPE`` buffer.

Rejects are counted by reason into the agent's counters.  A symbol not in the
table stops the batch with the message still in the buffer: Python hands it to
:meth:`engine.sources.TickSlot.ingest` (the msgspec path, which admits a new
instrument on first sight or counts ``unknown_instrument`` / ``instruments_full``),
then the table is rebuilt; so every decision stays the msgspec path's.

``poll()`` (the python loop, e.g. after a hot reload to an ``ort`` model) takes
the same compiled route one tick at a time.

:class:`NativeAeronTickSource` does the same for an Aeron subscription (of an
:class:`engine.native_aeron.AeronCClient`): ``aeron_subscription_controlled_poll``
with Aeron's controlled fragment assembler, whose delegate
(:func:`_on_aeron_message`, a numba ``cfunc``) runs steps 2-5 on each whole
message; a symbol not in the table is copied for Python and ends the poll
(``BREAK``), a full batch ends it with ``ABORT`` (the message comes again).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from engine.log import log
from engine.native_loop import bind_clock, now_ns
from engine.native_zmq import (
    ZMQ_DONTWAIT,
    bind_libzmq,
    call_address,
    call_errno,
    call_getsockopt,
    call_send_recv,
    fn_address,
    proc_maps,
)
from engine.schema import REJECT_MALFORMED, TICK_DTYPE
from engine.sources import MAX_TICK_FRAME_BYTES, TickSlot, ZmqTickSource, _LiveSource
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
from models.tick_kernels import _ptr

__all__ = ["NativeZmqTickSource", "NativeAeronTickSource", "NativeMultiSource", "SymbolIndex", "fnv1a"]

_ZMQ_RCVMORE = 13
_EAGAIN = 11

# ictx slots
(I_SOCK, I_BUF, I_BUF_CAP, I_TICKS, I_ROWS, I_INGRESS, I_COUNTERS, I_N_COUNTERS, I_HASH, I_HASH_MASK,
 I_SYM, I_SYM_LEN_TOTAL, I_SYM_OFF, I_N_SYM, I_PENDING, I_PENDING_T, I_RECEIVED, I_OUT_I, I_OUT_F,
 I_MORE, I_MORE_LEN, I_TIMESPEC, I_ERRNO, I_FN_RECV, I_FN_GETSOCKOPT, I_FN_ERRNO, I_FN_CLOCK, I_MAX_EVENT,
 I_K, I_LIMIT, I_SUB, I_FN_POLL, I_FN_ASSEMBLE, I_ASSEMBLER, I_DISCARD, I_SKIPPED,
 # the Aeron ingress's touch-ahead of the tick logs (see NativeAeronTickSource); per image: the slots
 I_T_MODE, I_T_LOOK, I_T_SLOTS, I_T_NEXT, I_T_SINK, I_T_VALS, I_T_IDLE, I_FN_HDR_VALUES, I_FN_HDR_CONTEXT,
 I_FN_IMG_CONSTANTS, I_FN_IMG_BY_SESSION, I_FN_IMG_RELEASE, I_FN_IMG_POSITION, I_FN_HDR_POSITION,
 I_FN_IMG_COUNT, I_T_WINDOW) = range(52)
ICTX_LEN = 52
#: the symbol index's id of another shard's instrument (skipped and counted, not rejected)
FOREIGN = -2


@njit(cache=True, nogil=True)
def fnv1a(buf, start, length):
    """64-bit FNV-1a of ``buf[start:start+length]`` (as int64 bits)."""
    h = np.uint64(0xCBF29CE484222325)
    for k in range(length):
        h = (h ^ np.uint64(buf[start + k])) * np.uint64(0x100000001B3)
    return np.int64(h)


class SymbolIndex:
    """Open-addressing hash table of an instrument table, for the compiled symbol lookup.

    ``foreign`` symbols (other shards' instruments) map to :data:`FOREIGN`.
    """

    def __init__(self, ids: dict[str, int], foreign: Sequence[str] = ()) -> None:
        raw = [(s.encode(), i) for s, i in ids.items()] + [(s.encode(), FOREIGN) for s in foreign]
        blob = b"".join(r for r, _ in raw)
        self.sym = np.frombuffer(blob or b"\0", np.uint8).copy()
        self.n = len(raw)
        self.off = np.zeros(3 * max(self.n, 1), np.int64)  # start, length, id
        size = 8
        while size < 2 * max(self.n, 1):
            size <<= 1
        self.table = np.full(size, -1, np.int64)  # entry index, -1 empty
        pos = 0
        for e, (r, inst) in enumerate(raw):
            self.off[3 * e : 3 * e + 3] = (pos, len(r), inst)
            h = int(fnv1a(self.sym, pos, len(r))) & (size - 1)
            while self.table[h] >= 0:
                h = (h + 1) & (size - 1)
            self.table[h] = e
            pos += len(r)


@njit(cache=True, nogil=True, inline="always")
def _lookup(buf, start, length, table, mask, sym, off):
    h = fnv1a(buf, start, length) & mask
    while True:
        e = table[h]
        if e < 0:
            return -1
        s0, sl = off[3 * e], off[3 * e + 1]
        if sl == length:
            same = True
            for k in range(length):
                if sym[s0 + k] != buf[start + k]:
                    same = False
                    break
            if same:
                return off[3 * e + 2]
        h = (h + 1) & mask


@njit(cache=True, nogil=True)
def _more(C):
    """``ZMQ_RCVMORE`` of the last frame received (through ``zmq_getsockopt``)."""
    more_len = carray(_ptr(C[I_MORE_LEN], np.int64), (1,))
    more_len[0] = 4
    call_getsockopt(C[I_FN_GETSOCKOPT], C[I_SOCK], _ZMQ_RCVMORE, C[I_MORE], C[I_MORE_LEN])
    return carray(_ptr(C[I_MORE], np.int32), (1,))[0] != 0


@njit(cache=True, nogil=True)
def _ingest(C, buf, n, t, k):
    """Decode the Tick in ``buf[:n]`` (received at ``t``) into row ``k``.

    Returns 1 (row written), 0 (rejected, counted by reason) or -1: the symbol is not in
    the table, the message must go to Python (``buf`` is the ictx buffer then, or the
    caller copies it there).
    """
    counters = carray(_ptr(C[I_COUNTERS], np.int64), (C[I_N_COUNTERS],))
    out_i = carray(_ptr(C[I_OUT_I], np.int64), (8,))
    out_f = carray(_ptr(C[I_OUT_F], np.float64), (6,))
    r = decode_tick(buf, n, C[I_MAX_EVENT], out_i, out_f)
    if r != 0:
        counters[r] += 1
        return 0
    table = carray(_ptr(C[I_HASH], np.int64), (C[I_HASH_MASK] + 1,))
    sym = carray(_ptr(C[I_SYM], np.uint8), (C[I_SYM_LEN_TOTAL],))
    off = carray(_ptr(C[I_SYM_OFF], np.int64), (3 * max(C[I_N_SYM], 1),))
    inst = _lookup(buf, out_i[I_SYM_START], out_i[I_SYM_LEN], table, C[I_HASH_MASK], sym, off)
    if inst == FOREIGN:  # another shard's instrument
        C[I_SKIPPED] += 1
        return 0
    if inst < 0:  # Python decides (admission on first sight, or the reject)
        C[I_PENDING] = n
        C[I_PENDING_T] = t
        return -1
    if out_i[I_RANGE_OK] == 0:
        counters[REJECT_MALFORMED] += 1
        return 0
    rows = C[I_ROWS]
    if k < 0 or k >= rows:  # never write past the buffer (callers keep k < rows)
        return 0
    ticks = carray(_ptr(C[I_TICKS], TICK_DTYPE), (rows,))
    row = ticks[k : k + 1]
    row[0].ts_event_ns = out_i[I_TS_EVENT]
    row[0].ts_recv_ns = out_i[I_TS_RECV]
    row[0].instrument = np.int32(inst)
    row[0].kind = np.uint8(out_i[I_KIND])
    row[0].side = np.int8(out_i[I_SIDE])
    row[0].bid_px = out_f[0]
    row[0].bid_sz = out_f[1]
    row[0].ask_px = out_f[2]
    row[0].ask_sz = out_f[3]
    row[0].price = out_f[4]
    row[0].size = out_f[5]
    row[0].order_id = np.uint64(out_i[I_ORDER_ID])
    carray(_ptr(C[I_INGRESS], np.int64), (rows,))[k] = t
    return 1


@njit(cache=True, nogil=True)
def recv_ticks(ictx_addr, limit, max_event_ns):
    """Receive, decode and map up to ``limit`` queued ZeroMQ ticks into the rows of the ictx; return how many.

    The C functions are called through the addresses in the ictx (filled after
    :func:`engine.native_zmq.bind_libzmq`'s start-up checks), so this kernel is cached on disk.
    """
    C = carray(_ptr(ictx_addr, np.int64), (ICTX_LEN,))
    C[I_MAX_EVENT] = max_event_ns
    fn_recv, fn_errno, fn_clock = C[I_FN_RECV], C[I_FN_ERRNO], C[I_FN_CLOCK]
    sock = C[I_SOCK]
    cap = C[I_BUF_CAP]
    buf = carray(_ptr(C[I_BUF], np.uint8), (cap,))
    counters = carray(_ptr(C[I_COUNTERS], np.int64), (C[I_N_COUNTERS],))
    ts = carray(_ptr(C[I_TIMESPEC], np.int64), (2,))
    limit = min(limit, C[I_ROWS])
    received = C[I_RECEIVED]
    k = 0
    while k < limit:
        n1 = call_send_recv(fn_recv, sock, C[I_BUF], cap, ZMQ_DONTWAIT)
        if n1 < 0:
            e = call_errno(fn_errno)
            if e != _EAGAIN:
                C[I_ERRNO] = e
            break
        received += 1
        if not _more(C):  # one-frame message
            counters[REJECT_MALFORMED] += 1
            continue
        # later frames of a message are already here
        n = call_send_recv(fn_recv, sock, C[I_BUF], cap, ZMQ_DONTWAIT)
        t = now_ns(fn_clock, ts)
        if _more(C):  # three or more frames: drain the rest of this message
            while True:
                if call_send_recv(fn_recv, sock, C[I_BUF], cap, ZMQ_DONTWAIT) < 0 or not _more(C):
                    break
            counters[REJECT_MALFORMED] += 1
            continue
        if n < 0 or n > cap:  # truncated (cannot happen under ZMQ_MAXMSGSIZE) or failed
            counters[REJECT_MALFORMED] += 1
            continue
        r = _ingest(C, buf, n, t, k)
        if r > 0:
            k += 1
        elif r < 0:  # the message stays in buf for Python
            break
    C[I_RECEIVED] = received
    return k


class _NativeRows(_LiveSource):
    """What the compiled sources share: the ictx, the multi-row tick buffer, the window, the python poll.

    A subclass calls :meth:`_init_rows` and provides ``_receive(limit) -> rows``.
    """

    slot: TickSlot

    def _init_rows(self, rows: int) -> None:
        rows = max(1, int(rows))
        self.rows = rows
        self.ticks = np.zeros(rows, dtype=TICK_DTYPE)
        self.ingress_ns = np.zeros(rows, dtype=np.int64)
        self.inst_list = [0] * rows
        self.ts_list = [0] * rows
        self.C = np.zeros(ICTX_LEN, np.int64)
        self.addr = int(self.C.ctypes.data)
        self._buf = np.zeros(MAX_TICK_FRAME_BYTES + 1, np.uint8)
        self._out_i, self._out_f = new_outputs()
        self._ts = np.zeros(2, np.int64)
        C = self.C
        C[I_BUF], C[I_BUF_CAP] = self._buf.ctypes.data, self._buf.shape[0]
        C[I_TICKS], C[I_ROWS] = self.ticks.ctypes.data, rows
        C[I_INGRESS] = self.ingress_ns.ctypes.data
        C[I_OUT_I], C[I_OUT_F] = self._out_i.ctypes.data, self._out_f.ctypes.data
        C[I_TIMESPEC] = self._ts.ctypes.data
        C[I_FN_CLOCK] = fn_address(bind_clock())
        self._bind_counters_ptr()
        self._index_symbols()
        self._pos = self._n = 0

    def _bind_counters_ptr(self) -> None:
        c = self.slot.counters
        self._counters = c
        self.C[I_COUNTERS], self.C[I_N_COUNTERS] = c.ctypes.data, c.shape[0]

    def _index_symbols(self) -> None:
        idx = SymbolIndex(self.slot.ids, list(self.slot.foreign))
        self._index = idx
        C = self.C
        C[I_HASH], C[I_HASH_MASK] = idx.table.ctypes.data, idx.table.shape[0] - 1
        C[I_SYM], C[I_SYM_LEN_TOTAL] = idx.sym.ctypes.data, idx.sym.shape[0]
        C[I_SYM_OFF], C[I_N_SYM] = idx.off.ctypes.data, idx.n

    @property
    def native_skipped(self) -> int:
        """Ticks of other shards' instruments skipped in compiled code (the slot counts the rest)."""
        return int(self.C[I_SKIPPED])

    @property
    def counters(self) -> np.ndarray:
        """Return the reject counters this source writes (shared with its slot)."""
        return self.slot.counters

    def bind_counters(self, counters: np.ndarray) -> None:
        """Count rejects into the agent's ``counters`` (the compiled receive too)."""
        self.slot.bind_counters(counters)
        self._bind_counters_ptr()

    def _receive(self, limit: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def _fill(self, limit: int) -> int:
        k = self._receive(limit)
        if self.C[I_PENDING]:
            k = self._pending(k, self)
        self._pos, self._n = 0, k
        return k

    def _pending(self, k: int, src: _NativeRows) -> int:
        """The message in ``src``'s buffer names a symbol not in the table: the msgspec path decides
        (the tick goes to row ``k`` of this source's rows)."""
        C = src.C
        n, t = int(C[I_PENDING]), int(C[I_PENDING_T])
        C[I_PENDING] = 0
        slot = self.slot
        if slot.ingest(src._buf[:n].tobytes()) and k < self.rows:
            self.ticks[k] = slot.ticks[0]
            self.ingress_ns[k] = t
            k += 1
        if len(slot.ids) + len(slot.foreign) != src._index.n:  # a new instrument (or another shard's)
            for s in self._receivers():
                s._index_symbols()
        return k

    def _receivers(self) -> list[_NativeRows]:
        """The sources whose compiled receive looks symbols up (each has its own index)."""
        return [self]

    def compile_receive(self) -> None:
        """Compile the receive kernel now (or load it from numba's cache), during the agent's
        warm-up: else the first poll does it in the hot loop (~0.4 s cold, ~4 ms cached, here)."""
        self._receive(0)

    # -- the native loop's window ------------------------------------------------------
    def window(self, limit: int) -> tuple[int, int]:
        """Return ``(start, stop)`` of received ticks (receiving a new batch when all were taken)."""
        if self._pos < self._n:
            return self._pos, self._n
        k = self._fill(min(limit, self.rows))
        return 0, k

    def consumed(self, k: int) -> None:
        """The native loop took ``k`` ticks of the window."""
        self._pos += k

    # -- the python loop ---------------------------------------------------------------
    def poll(self) -> int:
        """Return the index of the next tick (received through the compiled route), or -1."""
        if self._pos >= self._n and not self._fill(1):
            return -1
        i = self._pos
        self._pos = i + 1
        self.inst_list[i] = int(self.ticks[i]["instrument"])
        self.ts_list[i] = int(self.ticks[i]["ts_event_ns"])
        return i


class NativeZmqTickSource(_NativeRows, ZmqTickSource):
    """:class:`engine.sources.ZmqTickSource` received and decoded in compiled code (see the module doc).

    ``rows``: ticks per ``window`` at most (the native loop's ``batch``).
    """

    def __init__(self, ctx, endpoint: str, instruments: Sequence[str] = (), *, rows: int = 256,
                 **kw) -> None:  # fmt: skip
        ZmqTickSource.__init__(self, ctx, endpoint, instruments, **kw)
        lib = bind_libzmq()  # checked at start-up: the library pyzmq loaded, its symbols and version
        self._init_rows(rows)
        self._more = np.zeros(1, np.int32)
        self._more_len = np.zeros(1, np.int64)
        C = self.C
        C[I_SOCK] = int(self.sock.underlying)
        C[I_MORE], C[I_MORE_LEN] = self._more.ctypes.data, self._more_len.ctypes.data
        C[I_FN_RECV], C[I_FN_GETSOCKOPT] = fn_address(lib.zmq_recv), fn_address(lib.zmq_getsockopt)
        C[I_FN_ERRNO] = fn_address(lib.zmq_errno)

    @property
    def received(self) -> int:  # type: ignore[override]
        """Messages read from the socket."""
        return int(self.C[I_RECEIVED]) if hasattr(self, "C") else 0

    @received.setter
    def received(self, value: int) -> None:  # ZmqTickSource.__init__ sets 0
        pass

    def _receive(self, limit: int) -> int:
        return recv_ticks(self.addr, limit, self.slot.max_event_ns)


# ----------------------------------------------------------------------------- Aeron
def mapping_of(addr: int, size: int) -> tuple[int, int, str] | None:
    """``(start, file offset, path)`` of the one mapping of this process holding
    ``[addr, addr+size)`` (path ``""``: anonymous), or None (none does, or ``/proc/self/maps``
    cannot be read)."""
    for lo, hi, offset, name in proc_maps() or ():  # unreadable or unparsable: none, refused
        if lo <= addr and addr + size <= hi:
            return lo, offset, name
    return None


_ACTION_ABORT, _ACTION_BREAK, _ACTION_CONTINUE = 1, 2, 4  # aeron_controlled_fragment_handler_action_t
#: ``aeron_controlled_fragment_handler_action_t handler(void *clientd, const uint8_t *buffer, size_t length,
#: aeron_header_t *header)``; pointers as int64 (same registers on the 64-bit hosts tickscore runs on)
_FRAGMENT_SIG = types.int32(types.int64, types.int64, types.int64, types.int64)


def _on_aeron_message(clientd, buffer, length, header):
    """Called by the fragment assembler once per whole message: decode it into the next row."""
    C = carray(_ptr(clientd, np.int64), (ICTX_LEN,))
    C[I_RECEIVED] += 1
    if C[I_DISCARD]:
        return _ACTION_CONTINUE
    if C[I_T_LOOK]:
        _find_log(C, buffer, length, header)
    k = C[I_K]
    if k >= C[I_LIMIT] or k >= C[I_ROWS]:
        C[I_RECEIVED] -= 1
        return _ACTION_ABORT  # delivered again at the next poll
    t = now_ns(C[I_FN_CLOCK], carray(_ptr(C[I_TIMESPEC], np.int64), (2,)))
    n = length
    if n > C[I_BUF_CAP]:  # longer than any Tick: malformed (never read past the message)
        carray(_ptr(C[I_COUNTERS], np.int64), (C[I_N_COUNTERS],))[REJECT_MALFORMED] += 1
        return _ACTION_CONTINUE
    msg = carray(_ptr(buffer, np.uint8), (max(n, 1),))
    r = _ingest(C, msg, n, t, k)
    if r > 0:
        C[I_K] = k + 1
        return _ACTION_CONTINUE
    if r < 0:  # the symbol is not in the table: copy it for Python and stop this poll
        buf = carray(_ptr(C[I_BUF], np.uint8), (C[I_BUF_CAP],))
        for j in range(n):
            buf[j] = msg[j]
        return _ACTION_BREAK
    return _ACTION_CONTINUE


# ---- touch-ahead of the tick logs: their pages are faulted into this process while the loop is idle
#: states: of the touch-ahead as a whole (``C[I_T_MODE]``: off, on = looking, refused) and of a
#: slot (``TF_STATE``: looking = free, pending, touching, done)
T_OFF, T_LOOKING, T_PENDING, T_ARMED, T_DONE, T_REFUSED = range(6)
T_STATE_NAMES = ("off", "looking", "pending", "touching", "done", "refused")
#: images whose logs are touched at once (one per publisher of the stream; a fifth faults as before)
T_SLOTS = 4
#: a slot's fields (one int64 row of the slot table per image)
(TF_STATE, TF_IMAGE, TF_SESSION, TF_CORR, TF_BASE, TF_TERM_LEN, TF_SHIFT, TF_MAPPED, TF_END,
 TF_TOUCHED) = range(10)
N_TF = 10
_PAGE = 4096
#: how far ahead of the reader the touch-ahead goes at most (bytes): ~64k tick-sized messages
TOUCH_WINDOW = 8 << 20
#: bytes of the scratch buffer for ``aeron_header_values_t`` (44 bytes, at 0) and
#: ``aeron_image_constants_t`` (72 bytes in Aeron 1.4x-1.5x, at :data:`_K_OFF`; room to grow)
_T_VALS_BYTES, _K_OFF = 1024, 256
_FRAME_HEADER = 32  # AERON_DATA_HEADER_LENGTH
_UNFRAGMENTED = 0xC0  # BEGIN | END


@intrinsic
def _call_p_p(typingctx, fn, a):
    """``int64 f(void *)`` at ``fn`` (``aeron_header_context``, ``aeron_image_position``)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        return call_address(builder, args[0], i64, [i64], [args[1]])

    return sig, codegen


@intrinsic
def _call_i32_pp(typingctx, fn, a, b):
    """``int f(void *, void *)`` at ``fn`` (``aeron_header_values``, ``aeron_image_constants``,
    ``aeron_subscription_image_release``)."""
    sig = types.int32(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        return call_address(builder, args[0], ir.IntType(32), [i64, i64], [args[1], args[2]])

    return sig, codegen


@intrinsic
def _call_i32_p(typingctx, fn, a):
    """``int f(void *)`` at ``fn`` (``aeron_subscription_image_count``)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        return builder.sext(call_address(builder, args[0], ir.IntType(32), [i64], [args[1]]), i64)

    return sig, codegen


@intrinsic
def _call_image_by_session(typingctx, fn, sub, session_id):
    """``aeron_image_t *aeron_subscription_image_by_session_id(sub, int32_t session_id)`` at ``fn``."""
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        return call_address(builder, args[0], i64, [i64, i32], [args[1], builder.trunc(args[2], i32)])

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def _slots(C):
    return carray(_ptr(C[I_T_SLOTS], np.int64), (T_SLOTS, N_TF))


@njit(cache=True, nogil=True)
def _recount(C, S):
    """Look for a new image's log (``C[I_T_LOOK]``) while the subscription has more images than
    slots in use and a slot is free."""
    used = 0
    for s in range(T_SLOTS):
        if S[s, TF_STATE] != T_LOOKING:
            used += 1
    C[I_T_LOOK] = 1 if used < T_SLOTS and _call_i32_p(C[I_FN_IMG_COUNT], C[I_SUB]) > used else 0


@njit(cache=True, nogil=True)
def _find_log(C, buffer, length, header):
    """Locate the log of the image that delivered this (unfragmented) message; Python checks it.

    Only for an image no slot holds yet, into a free slot.  Aeron hands an unfragmented
    message's payload at its place in the term buffer: the frame starts ``_FRAME_HEADER`` bytes
    before it, ``term_offset`` bytes into its term, and the three terms of the log are
    contiguous.  A reassembled message (in the assembler's own buffer) also comes with the flags
    of a whole one, so the message must fit one MTU and end where ``aeron_header_position`` says
    the frame ends.  Values that do not agree with each other (another layout of Aeron's
    structs) refuse the touch-ahead for good; it never guesses.
    """
    image = _call_p_p(C[I_FN_HDR_CONTEXT], header)
    if image == 0:
        return
    S = _slots(C)
    free = -1
    for s in range(T_SLOTS):
        if S[s, TF_STATE] == T_LOOKING:
            if free < 0:
                free = s
        elif S[s, TF_IMAGE] == image:
            return  # this image's log is held already
    if free < 0:
        C[I_T_LOOK] = 0
        return
    vals = C[I_T_VALS]
    if _call_i32_pp(C[I_FN_HDR_VALUES], header, vals) != 0:
        return
    v32 = carray(_ptr(vals, np.int32), (11,))
    flags = carray(_ptr(vals, np.uint8), (8,))[5]
    frame_length, term_offset, session, term_id, initial = v32[0], v32[2], v32[3], v32[5], v32[8]
    if (flags & _UNFRAGMENTED) != _UNFRAGMENTED:
        return  # reassembled in the assembler's buffer: wait for a whole one
    if _call_i32_pp(C[I_FN_IMG_CONSTANTS], image, vals + _K_OFF) != 0:
        return
    k64 = carray(_ptr(vals + _K_OFF, np.int64), (9,))
    k32 = carray(_ptr(vals + _K_OFF, np.int32), (18,))
    corr, shift, term_len, mtu = k64[2], k64[4], k64[5], k64[6]
    if length + _FRAME_HEADER > mtu:
        return  # it may have come in fragments: wait for one that cannot have
    if (frame_length != length + _FRAME_HEADER or k32[14] != session or k32[15] != initial
            or shift < 16 or shift > 30 or term_len != (1 << shift) or term_offset < 0
            or term_offset + frame_length > term_len):  # fmt: skip
        C[I_T_MODE] = T_REFUSED
        C[I_T_LOOK] = 0
        return
    d = (np.int64(term_id) - np.int64(initial)) & 0xFFFFFFFF  # terms since the start (int32 wrap)
    if d >= 0x80000000:
        return
    pos = (d << shift) + term_offset + ((frame_length + 31) & ~31)
    if _call_p_p(C[I_FN_HDR_POSITION], header) != pos:
        return  # not a frame of its own in the term
    S[free, TF_IMAGE] = image
    S[free, TF_SESSION] = session
    S[free, TF_CORR] = corr
    S[free, TF_TERM_LEN] = term_len
    S[free, TF_SHIFT] = shift
    S[free, TF_BASE] = buffer - _FRAME_HEADER - term_offset - (d % 3) * term_len
    S[free, TF_MAPPED] = pos
    S[free, TF_END] = pos + 3 * term_len  # every page of the three terms once
    S[free, TF_STATE] = T_PENDING
    _recount(C, S)


@njit(cache=True, nogil=True)
def _touch_slot(C, S, s):
    """Slot ``s`` (touching or done): check its image is still there; touching, touch its next page."""
    sub = C[I_SUB]
    image = _call_image_by_session(C[I_FN_IMG_BY_SESSION], sub, S[s, TF_SESSION])
    if image == 0:  # the image went (its publisher stopped): the slot is free again
        S[s, TF_STATE] = T_LOOKING
        _recount(C, S)
        return
    kaddr = C[I_T_VALS] + _K_OFF
    if _call_i32_pp(C[I_FN_IMG_CONSTANTS], image, kaddr) != 0 \
            or carray(_ptr(kaddr, np.int64), (3,))[2] != S[s, TF_CORR]:  # fmt: skip
        S[s, TF_STATE] = T_LOOKING  # another image of this session
        _recount(C, S)
    elif S[s, TF_STATE] == T_ARMED:
        reader = _call_p_p(C[I_FN_IMG_POSITION], image)
        m = max(S[s, TF_MAPPED], reader)
        if m >= S[s, TF_END]:
            S[s, TF_STATE] = T_DONE
        elif m < reader + C[I_T_WINDOW]:  # never further ahead of the reader than the window
            tl = S[s, TF_TERM_LEN]
            off = ((m >> S[s, TF_SHIFT]) % 3) * tl + ((m & (tl - 1)) & ~(_PAGE - 1))
            if 0 <= off < 3 * tl:  # never outside the log (Python checked it is one mapping)
                C[I_T_SINK] += carray(_ptr(S[s, TF_BASE] + off, np.uint8), (1,))[0]
                S[s, TF_TOUCHED] += 1
            S[s, TF_MAPPED] = (m & ~(_PAGE - 1)) + _PAGE
    _call_i32_pp(C[I_FN_IMG_RELEASE], sub, image)


@njit(cache=True, nogil=True)
def _touch_ahead(C):
    """Idle: touch the next page not yet mapped of one image's tick log (one page per call, the
    images in turn), at most ``C[I_T_WINDOW]`` bytes ahead of its reader, until every page of
    each log has been.

    An image is retained (``aeron_subscription_image_by_session_id``) while its log is read, so
    its mapping cannot go away meanwhile; an image gone (a publisher stopped) frees its slot.
    Each idle poll counts the subscription's images: more than the slots in use starts the
    search for a log in the messages that follow; every 1,024 idle polls the logs already
    touched are checked.
    """
    if C[I_T_MODE] != T_LOOKING or C[I_DISCARD]:
        return
    S = _slots(C)
    C[I_T_IDLE] += 1
    if not C[I_T_IDLE] & 1023:
        for s in range(T_SLOTS):
            if S[s, TF_STATE] == T_DONE:
                _touch_slot(C, S, s)
    _recount(C, S)
    for j in range(T_SLOTS):
        s = (C[I_T_NEXT] + j) % T_SLOTS
        if S[s, TF_STATE] == T_ARMED:
            C[I_T_NEXT] = s + 1
            _touch_slot(C, S, s)
            return


_AERON_HANDLER = None


def _aeron_handler_address() -> int:
    """The C address of :func:`_on_aeron_message` compiled as a cfunc (cached on disk)."""
    global _AERON_HANDLER
    if _AERON_HANDLER is None:
        _AERON_HANDLER = cfunc(_FRAGMENT_SIG, cache=True, nogil=True)(_on_aeron_message)
    return int(_AERON_HANDLER.address)


@intrinsic
def _call_controlled_poll(typingctx, fn, sub, handler, clientd, limit):
    """``int aeron_subscription_controlled_poll(sub, handler, clientd, size_t fragment_limit)`` at ``fn``."""
    sig = types.int32(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        return call_address(builder, args[0], ir.IntType(32), [ir.IntType(64)] * 4, list(args[1:]))

    return sig, codegen


@njit(cache=True, nogil=True)
def poll_aeron_ticks(ictx_addr, limit, max_event_ns):
    """Poll up to ``limit`` Aeron messages into the ictx rows (through the assembler); return how many."""
    C = carray(_ptr(ictx_addr, np.int64), (ICTX_LEN,))
    seen = C[I_RECEIVED]
    k = _poll_aeron(C, limit, max_event_ns)
    if C[I_RECEIVED] == seen:  # idle
        _touch_ahead(C)
    return k


@njit(cache=True, nogil=True)
def _poll_aeron(C, limit, max_event_ns):
    C[I_MAX_EVENT] = max_event_ns
    C[I_K] = 0
    C[I_LIMIT] = min(limit, C[I_ROWS])
    _call_controlled_poll(C[I_FN_POLL], C[I_SUB], C[I_FN_ASSEMBLE], C[I_ASSEMBLER], C[I_LIMIT])
    return C[I_K]


class NativeAeronTickSource(_NativeRows):
    """Ticks from an Aeron subscription, polled, reassembled and decoded in compiled code.

    The subscription belongs to an :class:`engine.native_aeron.AeronCClient` (pyaeron exposes
    no handle of its own); messages in several fragments are reassembled by Aeron's controlled
    fragment assembler, whose delegate is :func:`_on_aeron_message` compiled as a C function.
    Same decisions and counters as :class:`engine.sources.AeronTickSource`.

    ``touch_ahead`` (default): each first read of a 4 KiB page of the tick log is a page fault
    in this process, on the hot thread (~10-30 µs on the 2-vCPU reference VM, one tick-sized
    message in ~30).  So while the loop is idle (a poll that read nothing), it touches the next
    page of the log not yet mapped, one per poll, at most ``touch_window`` bytes ahead of the
    reader (what a publisher has not written yet is allocated at most that far ahead of it),
    until all three terms have been touched once; after that no read faults.  The log's
    address comes from the first whole message of an image (Aeron hands it in place in the
    term buffer) and is checked against ``/proc/self/maps`` (the start of a mapping of a
    ``.logbuffer`` file) before any page is touched; while touching, the image is retained
    so its log stays mapped.  Each image (one per publisher of the stream) has its log in a
    slot of its own, up to :data:`T_SLOTS`, touched in turn; an image that goes frees its slot.
    """

    name = "aeron"

    def __init__(self, client, channel: str, stream_id: int, *, slot: TickSlot, rows: int = 256,
                 touch_ahead: bool = True, touch_window: int = TOUCH_WINDOW) -> None:  # fmt: skip
        self.channel = channel
        self.stream_id = stream_id
        self.slot = slot
        self.done = False
        self._client = client
        self._init_rows(rows)
        self._t_vals = np.zeros(_T_VALS_BYTES // 8, np.int64)  # scratch for Aeron's header/image structs
        #: the touch-ahead's slots, one image each (rows of TF_* fields)
        self.T = np.zeros((T_SLOTS, N_TF), np.int64)
        self.T[:, TF_STATE] = T_LOOKING
        self._t_misses = 0
        self._t_said = False
        C = self.C
        C[I_T_VALS] = self._t_vals.ctypes.data
        C[I_T_SLOTS] = self.T.ctypes.data
        C[I_FN_HDR_VALUES] = client.fn("aeron_header_values")
        C[I_FN_HDR_CONTEXT] = client.fn("aeron_header_context")
        C[I_FN_HDR_POSITION] = client.fn("aeron_header_position")
        C[I_FN_IMG_CONSTANTS] = client.fn("aeron_image_constants")
        C[I_FN_IMG_POSITION] = client.fn("aeron_image_position")
        C[I_FN_IMG_BY_SESSION] = client.fn("aeron_subscription_image_by_session_id")
        C[I_FN_IMG_RELEASE] = client.fn("aeron_subscription_image_release")
        C[I_FN_IMG_COUNT] = client.fn("aeron_subscription_image_count")
        C[I_T_MODE] = T_LOOKING if touch_ahead else T_OFF
        C[I_T_LOOK] = 1 if touch_ahead else 0
        C[I_T_WINDOW] = max(_PAGE, int(touch_window))
        self._sub, self._assembler = client.add_subscription(channel, stream_id, _aeron_handler_address(),
                                                             self.addr)  # fmt: skip
        C[I_SUB], C[I_ASSEMBLER] = self._sub, self._assembler
        C[I_FN_POLL] = client.fn("aeron_subscription_controlled_poll")
        C[I_FN_ASSEMBLE] = client.fn("aeron_controlled_fragment_assembler_handler")

    @property
    def received(self) -> int:
        """Whole messages read."""
        return int(self.C[I_RECEIVED])

    def _receive(self, limit: int) -> int:
        k = poll_aeron_ticks(self.addr, limit, self.slot.max_event_ns)
        if k == 0:
            self._idle_check()
        return k

    def _idle_check(self) -> None:
        """Idle: check the logs just found before any page of them is touched; say once when the
        compiled code refused one (values of Aeron's structs that do not agree)."""
        for k in range(T_SLOTS):
            if self.T[k, TF_STATE] == T_PENDING and self.C[I_T_MODE] == T_LOOKING:
                self._check_log(k)
        if self.C[I_T_MODE] == T_REFUSED and not self._t_said:
            self._t_said = True
            log("aeron", "no touch-ahead of the tick log: Aeron's header and image values do not agree "
                "(another struct layout?); its first reads of each page fault as before",
                event="touch_ahead", level=logging.WARNING)  # fmt: skip

    def _check_log(self, k: int) -> None:
        """Arm slot ``k`` when the log found is a mapping of an Aeron ``.logbuffer`` file from its
        start (the C client maps each log whole, its three terms first)."""
        C, T = self.C, self.T
        base, size = int(T[k, TF_BASE]), 3 * int(T[k, TF_TERM_LEN])
        m = mapping_of(base, size)
        path = m[2] if m is not None else None
        if m is not None and m[0] == base and m[1] == 0 and path.endswith(".logbuffer"):
            T[k, TF_STATE] = T_ARMED
            log("aeron", f"touching the tick log {path} ({size >> 20} MiB) ahead of the reader while idle",
                event="touch_ahead", path=path)  # fmt: skip
            return
        self._t_misses += 1  # the image may have gone between the message and this check: look again
        T[k, TF_STATE] = T_LOOKING
        if self._t_misses < 3:
            C[I_T_LOOK] = 1
            return
        C[I_T_MODE], C[I_T_LOOK] = T_REFUSED, 0
        self._t_said = True
        log("aeron", f"no touch-ahead of the tick log: {base:#x}+{size} is not one mapping of a "
            f".logbuffer file ({path or 'not mapped'}); its first reads of each page fault as before",
            event="touch_ahead", level=logging.WARNING)  # fmt: skip

    @property
    def touch_ahead(self) -> dict:
        """The touch-ahead's state, pages touched and images held (for ``status``).

        ``state``: ``off``, ``refused``, else the busiest of the slots: ``touching`` (a log
        being touched), ``pending`` (one just found), ``looking`` (an image whose log is not
        found yet, or none yet), ``done`` (every image's log touched).
        """
        mode = int(self.C[I_T_MODE])
        states = [int(x) for x in self.T[:, TF_STATE]]
        held = [x for x in states if x != T_LOOKING]
        if mode != T_LOOKING:
            state = T_STATE_NAMES[mode]
        elif T_ARMED in held:
            state = "touching"
        elif T_PENDING in held:
            state = "pending"
        elif held and not self.C[I_T_LOOK]:
            state = "done"
        else:
            state = "looking"
        return {"state": state, "pages": int(self.T[:, TF_TOUCHED].sum()), "images": len(held)}

    @property
    def connected(self) -> bool:
        """Return whether at least one publisher's image is connected."""
        return self._client.subscription_connected(self._sub)

    def discard_pending(self, limit: int = 10_000_000) -> int:
        """Consume the messages already in the log (at stop); return how many (for the report)."""
        C = self.C
        before = int(C[I_RECEIVED])
        C[I_DISCARD] = 1
        try:
            while int(C[I_RECEIVED]) - before < limit:
                seen = int(C[I_RECEIVED])
                poll_aeron_ticks(self.addr, self.rows, 0)
                if int(C[I_RECEIVED]) == seen:  # nothing more in the log
                    break
        finally:
            C[I_DISCARD] = 0
        return int(C[I_RECEIVED]) - before

    def close(self) -> None:
        """Close the subscription (the client is closed by its owner)."""
        if self._sub:
            self._client.close_subscription(self._sub, self._assembler)
            self._sub = self._assembler = 0


# ----------------------------------------------------------------------------- both
_TICK_BYTES = TICK_DTYPE.itemsize


@njit(cache=True, nogil=True)
def _point_rows(C, ticks_addr, ingress_addr, rows, k):
    """Aim a source's ictx at the shared rows from row ``k`` on."""
    C[I_TICKS] = ticks_addr + k * _TICK_BYTES
    C[I_INGRESS] = ingress_addr + k * 8
    C[I_ROWS] = rows - k


@njit(cache=True, nogil=True)
def recv_zmq_and_aeron(zaddr, aaddr, limit, max_event_ns, aeron_first, ticks_addr, ingress_addr, rows):
    """Receive up to ``limit`` ticks from a ZeroMQ and an Aeron source into one set of rows.

    One source, then the other (``aeron_first`` alternates it between calls, so neither starves
    the other); a message naming a symbol not in the table stops the call (the source that holds
    it has ``I_PENDING`` set).  Returns how many rows were written.
    """
    Z = carray(_ptr(zaddr, np.int64), (ICTX_LEN,))
    A = carray(_ptr(aaddr, np.int64), (ICTX_LEN,))
    limit = min(limit, rows)
    seen = Z[I_RECEIVED] + A[I_RECEIVED]
    k = 0
    for turn in range(2):
        zmq_turn = (turn == 0) != (aeron_first != 0)
        C = Z if zmq_turn else A
        _point_rows(C, ticks_addr, ingress_addr, rows, k)
        if zmq_turn:
            k += recv_ticks(zaddr, limit - k, max_event_ns)
        else:
            k += _poll_aeron(A, limit - k, max_event_ns)
        if C[I_PENDING] or k >= limit:
            break
    if Z[I_RECEIVED] + A[I_RECEIVED] == seen:  # idle on both: touch the tick log ahead
        _touch_ahead(A)
    return k


class NativeMultiSource(_NativeRows):
    """A ZeroMQ and an Aeron tick source, both received and decoded in compiled code, as one.

    The native loop's window over both: one compiled call per duty cycle receives from one
    source then the other (the first alternates) into shared rows, up to the batch; the two
    sources share one :class:`engine.sources.TickSlot` (one instrument table, one set of reject
    counters), so decisions are the single-source ones.  What ``MultiSource`` is to the Python
    sources.
    """

    name = "multi"

    def __init__(self, sources: Sequence[_NativeRows]) -> None:
        kinds = sorted(type(s).__name__ for s in sources)
        if kinds != ["NativeAeronTickSource", "NativeZmqTickSource"]:
            raise ValueError(f"NativeMultiSource takes one NativeZmqTickSource and one "
                             f"NativeAeronTickSource, not {kinds}")  # fmt: skip
        slot = sources[0].slot
        if any(s.slot is not slot for s in sources):
            raise ValueError("the sources of a NativeMultiSource must share one TickSlot")
        self.zmq = next(s for s in sources if isinstance(s, NativeZmqTickSource))
        self.aeron = next(s for s in sources if isinstance(s, NativeAeronTickSource))
        self.sources = [self.zmq, self.aeron]
        self.slot = slot
        self.done = False
        self._init_rows(max(s.rows for s in sources))
        self._aeron_first = 0

    def _receivers(self) -> list[_NativeRows]:
        return [self, *self.sources]

    def _receive(self, limit: int) -> int:
        self._aeron_first ^= 1
        return recv_zmq_and_aeron(self.zmq.addr, self.aeron.addr, limit, self.slot.max_event_ns,
                                  self._aeron_first, self.ticks.ctypes.data, self.ingress_ns.ctypes.data,
                                  self.rows)  # fmt: skip

    def _fill(self, limit: int) -> int:
        k = self._receive(limit)
        for s in self.sources:
            if s.C[I_PENDING]:
                k = self._pending(k, s)
        if k == 0:
            self.aeron._idle_check()
        self._pos, self._n = 0, k
        return k

    def bind_counters(self, counters: np.ndarray) -> None:
        """Count rejects into the agent's ``counters`` (both compiled receives too)."""
        self.slot.bind_counters(counters)
        for s in self._receivers():
            s._bind_counters_ptr()

    @property
    def received(self) -> int:
        """Messages read by both sources."""
        return self.zmq.received + self.aeron.received

    @property
    def native_skipped(self) -> int:
        return self.zmq.native_skipped + self.aeron.native_skipped

    def discard_pending(self, limit: int = 10_000_000) -> int:
        """Drop what both sources have queued (at stop); return how many messages."""
        return sum(s.discard_pending(limit) for s in self.sources)

    def close(self) -> None:
        """Close both sources."""
        for s in self.sources:
            s.close()
