"""Network tick sources for the live service: ZeroMQ SUB and Aeron subscription.

Both follow the source protocol of :mod:`engine.scorer` with a one-row buffer:
``poll()`` reads at most one message, decodes the ``Tick`` (schema id 1, see
:mod:`engine.wire`), maps its symbol to the instrument id of the configured
instrument table, writes it into the preallocated 1-row :data:`TICK_DTYPE`
buffer ``ticks`` (and ``inst_list[0]`` / ``ts_list[0]``) and returns 0; it
returns -1 when no acceptable tick is ready.  A network source is never
``done``.

What a source rejects itself (the feature kernel rejects the rest: NaN/inf,
non-positive, crossed, time going backwards, unknown kind):

* ``malformed`` (:data:`REJECT_MALFORMED`): not a MessagePack array, schema id
  other than 1, not exactly 13 elements, a field of the wrong type (e.g. a str
  price, a float timestamp), an integer out of range of the tick dtype (kind
  outside 0..255, side outside -128..127, timestamps outside int64, negative
  order id), a ZeroMQ message that is not exactly two frames;
* ``unknown_instrument`` (:data:`REJECT_UNKNOWN_INSTRUMENT`): a symbol not in
  the instrument table;
* ``implausible_time`` (:data:`REJECT_IMPLAUSIBLE_TIME`): ``ts_event_ns <= 0`` or
  more than ``[engine] max_event_ahead_s`` ahead of the wall clock (a tick at
  ``2**63-1`` would otherwise make every later tick of its instrument
  ``time_backwards``);
* ``absurd_value`` (:data:`REJECT_ABSURD_VALUE`): a finite price or size above
  :data:`engine.schema.MAX_ABS_VALUE` (1e300, a uint64-max sentinel).

Both are counted in ``counters`` (an int64 array indexed by reject reason; the
service binds it to the agent's ``counters`` with :meth:`bind_counters`, so the
agent's reject totals include them) and never raise out of ``poll``.

Timing: the agent reads ``t_in`` right after ``poll()`` returns, so the service
time it records (``ts_out - ts_in``) excludes the socket read and the decode
done here (about 2-3 us for ZeroMQ, 1 us for Aeron on the reference machine);
wire-to-wire latency, measured by an external subscriber, includes them.

Allocates: per message, the received bytes (ZeroMQ) and the decoded ``Tick``
struct; no arrays.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np
import zmq

from engine.schema import (
    MAX_ABS_VALUE,
    N_REJECT_REASONS,
    REJECT_ABSURD_VALUE,
    REJECT_IMPLAUSIBLE_TIME,
    REJECT_INSTRUMENTS_FULL,
    REJECT_MALFORMED,
    REJECT_UNKNOWN_INSTRUMENT,
    TICK_DTYPE,
)
from engine.wire import TICK_SCHEMA_ID
from engine.zmq_io import ensure_ipc_free

__all__ = ["TickSlot", "ZmqTickSource", "AeronTickSource", "MultiSource", "StrictTick"]

#: Largest ZeroMQ frame a tick source accepts (``ZMQ_MAXMSGSIZE``); a Tick is a few hundred bytes.
MAX_TICK_FRAME_BYTES = 64 * 1024


class StrictTick(
    msgspec.Struct, array_like=True, tag=TICK_SCHEMA_ID, frozen=True, forbid_unknown_fields=True
):
    """``engine.wire.Tick`` as the service accepts it: all 13 elements required, none extra.

    Same layout as :class:`engine.wire.Tick` (whose trailing fields have defaults
    for convenience of Python senders); on the wire a Tick is exactly 13 elements.
    Prices and sizes may be MessagePack floats or integers.
    """

    kind: int
    instrument: str
    ts_event_ns: int
    ts_recv_ns: int
    bid_px: float
    bid_sz: float
    ask_px: float
    ask_sz: float
    price: float
    size: float
    side: int
    order_id: int


def _tick_struct() -> struct.Struct:
    """Return a ``struct.Struct`` that writes one TICK_DTYPE row, checked against the dtype."""
    codes = {
        "ts_event_ns": "q", "ts_recv_ns": "q", "instrument": "i", "kind": "B", "side": "b",
        "bid_px": "d", "bid_sz": "d", "ask_px": "d", "ask_sz": "d", "price": "d", "size": "d",
        "order_id": "Q",
    }
    fmt = "<"
    pos = 0
    for name in TICK_DTYPE.names:
        dt, off = TICK_DTYPE.fields[name][:2]
        if off > pos:
            fmt += f"{off - pos}x"
            pos = off
        fmt += codes[name]
        pos += dt.itemsize
    if TICK_DTYPE.itemsize > pos:
        fmt += f"{TICK_DTYPE.itemsize - pos}x"
    s = struct.Struct(fmt)
    if s.size != TICK_DTYPE.itemsize:  # pragma: no cover - schema changed
        raise RuntimeError(f"tick packer {fmt!r} is {s.size} bytes, TICK_DTYPE {TICK_DTYPE.itemsize}")
    order = ("ts_event_ns", "ts_recv_ns", "instrument", "kind", "side", "bid_px", "bid_sz",
             "ask_px", "ask_sz", "price", "size", "order_id")
    if tuple(TICK_DTYPE.names) != order:  # pragma: no cover - schema changed
        raise RuntimeError(f"TICK_DTYPE field order changed: {TICK_DTYPE.names}")
    return s


class TickSlot:
    """The one-row tick buffer a network source writes into, with the decode and checks.

    Several sources may share one slot (:class:`MultiSource`): each ``poll``
    fills it and the agent consumes it before the next ``poll``.

    Parameters
    ----------
    instruments : sequence of str
        Instrument table: symbol -> id = position.
    capacity : int, optional
        Instrument slots (>= ``len(instruments)``): a symbol not in the table
        takes the next free slot on first sight (ids in arrival order) and
        ``on_new(id, symbol)`` is called; beyond ``capacity`` its ticks are
        rejected as ``instruments_full``.  Default: only the table's symbols
        (others are ``unknown_instrument``).
    """

    #: longest symbol a slot takes on first sight (longer ones are malformed)
    MAX_SYMBOL_BYTES = 64

    #: foreign symbols remembered (for the compiled sources' cheap skip); beyond, they are hashed each time
    MAX_FOREIGN = 65_536

    def __init__(self, instruments: Sequence[str], capacity: int | None = None,
                 on_new: Callable[[int, str], None] | None = None, max_ahead_ns: int = 0,
                 owns: Callable[[str], bool] | None = None) -> None:
        #: a tick whose ts_event_ns is above this is ``implausible_time`` (0 = no bound); the
        #: service moves it with the wall clock in housekeeping (:meth:`advance_clock`)
        self.max_ahead_ns = int(max_ahead_ns)
        self.max_event_ns = (1 << 63) - 1
        self.advance_clock()
        self.ticks = np.zeros(1, dtype=TICK_DTYPE)
        self.inst_list = [0]
        self.ts_list = [0]
        self.ids = {s: i for i, s in enumerate(instruments)}
        self.capacity = len(self.ids) if capacity is None else max(int(capacity), len(self.ids))
        self.dynamic = capacity is not None
        self.on_new = on_new
        #: a shard of a cluster: ``owns(symbol)`` says whether this shard scores it; the
        #: ticks of the others are skipped and counted here, not rejected
        self.owns = owns
        self.skipped = 0
        self.foreign: dict[str, None] = {}
        self.counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        self._decode = msgspec.msgpack.Decoder(StrictTick).decode
        self._pack_into = _tick_struct().pack_into
        self._mv = memoryview(self.ticks.view(np.uint8))

    def advance_clock(self) -> None:
        """Move the event-time bound to now + ``max_ahead_ns`` (off the per-tick path)."""
        if self.max_ahead_ns > 0:
            self.max_event_ns = time.time_ns() + self.max_ahead_ns

    def bind_counters(self, counters: np.ndarray) -> None:
        """Count rejects into ``counters`` (the agent's array) from now on; carry over counts so far."""
        if counters.shape != self.counters.shape:
            raise ValueError(f"counters must have shape {self.counters.shape}, got {counters.shape}")
        counters += self.counters
        self.counters = counters

    def ingest(self, payload) -> bool:
        """Decode ``payload`` into the slot; return False (counted) if it is rejected.

        Allocates: the decoded Tick struct.  Never raises for bad input.
        """
        try:
            t = self._decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counters[REJECT_MALFORMED] += 1
            return False
        if not 0 < t.ts_event_ns <= self.max_event_ns:
            self.counters[REJECT_IMPLAUSIBLE_TIME] += 1
            return False
        lim = MAX_ABS_VALUE
        if (t.bid_px > lim or t.ask_px > lim or t.price > lim or t.bid_sz > lim or t.ask_sz > lim
                or t.size > lim) and self._absurd(t):  # fmt: skip
            return False
        inst = self.ids.get(t.instrument, -1)
        if inst < 0 and (inst := self._admit(t.instrument)) < 0:
            return False
        try:
            self._pack_into(
                self._mv, 0, t.ts_event_ns, t.ts_recv_ns, inst, t.kind, t.side, t.bid_px,
                t.bid_sz, t.ask_px, t.ask_sz, t.price, t.size, t.order_id,
            )
        except struct.error:  # an integer out of the dtype's range
            self.counters[REJECT_MALFORMED] += 1
            return False
        self.inst_list[0] = inst
        self.ts_list[0] = t.ts_event_ns
        return True

    def _absurd(self, t) -> bool:
        """Rare path: count an absurd finite value; +inf is left to the kernel (``nonfinite``)."""
        if math.inf in (t.bid_px, t.ask_px, t.price, t.bid_sz, t.ask_sz, t.size):
            return False
        self.counters[REJECT_ABSURD_VALUE] += 1
        return True

    def _admit(self, symbol: str) -> int:
        """Give ``symbol`` the next free slot (first sight) or count the reject or skip; return id or -1."""
        if self.owns is not None and not self.owns(symbol):  # another shard's instrument
            self.skipped += 1
            if len(self.foreign) < self.MAX_FOREIGN:
                self.foreign[symbol] = None
            return -1
        if not self.dynamic:
            self.counters[REJECT_UNKNOWN_INSTRUMENT] += 1
            return -1
        if not symbol or len(symbol.encode()) > self.MAX_SYMBOL_BYTES:
            self.counters[REJECT_MALFORMED] += 1
            return -1
        if len(self.ids) >= self.capacity:
            self.counters[REJECT_INSTRUMENTS_FULL] += 1
            return -1
        inst = len(self.ids)
        self.ids[symbol] = inst
        if self.on_new is not None:
            self.on_new(inst, symbol)
        return inst

    def reject_malformed(self) -> None:
        """Count one malformed message (framing errors seen by a transport)."""
        self.counters[REJECT_MALFORMED] += 1


class _LiveSource:
    """What every live source shares: rejects need no bookkeeping beyond the kernel's counters."""

    def on_reject(self, i: int) -> None:
        """The agent rejected the tick in slot ``i``: counted by reason already; nothing to align."""


class ZmqTickSource(_LiveSource):
    """Ticks from a ZeroMQ SUB socket, two frames ``[topic, payload]`` per message.

    Parameters
    ----------
    ctx : zmq.Context
        Context to create the socket in (its I/O thread should sit off the hot core).
    endpoint : str
        ``ipc://...`` or ``tcp://host:port``.
    instruments : sequence of str
        Instrument table (ignored when ``slot`` is given).
    bind : bool
        Bind (publishers connect) or connect to a publisher.
    subscribe : sequence of str
        Topic prefixes ("" = everything).
    rcvhwm : int
        Receive queue bound in messages (0 = none).
    slot : TickSlot, optional
        Buffer shared with other sources.
    configure : callable, optional
        ``configure(sock)`` before bind/connect (CURVE server keys, :mod:`engine.security`).

    Notes
    -----
    Polling: an empty non-blocking ``recv`` costs ~5 us in pyzmq (a syscall plus
    an exception), a ``ZMQ_EVENTS`` check ~2 us.  After a miss the source checks
    ``ZMQ_EVENTS`` until a message is there; after a hit it reads directly, so a
    burst costs no readiness checks.  Frames are received without copying so the
    "more" flag is free: a message of one frame, or of three or more, is drained
    whole and counted as malformed, so a bad sender never shifts the framing of
    the next message.  A frame over :data:`MAX_TICK_FRAME_BYTES` never arrives:
    libzmq drops it, and the connection that sent it, without allocating it.
    """

    name = "zmq"

    def __init__(
        self,
        ctx,
        endpoint: str,
        instruments: Sequence[str] = (),
        *,
        bind: bool = True,
        subscribe: Sequence[str] = ("",),
        rcvhwm: int = 100_000,
        slot: TickSlot | None = None,
        configure=None,
    ) -> None:
        self.endpoint = endpoint
        self.slot = slot if slot is not None else TickSlot(instruments)
        self.ticks = self.slot.ticks
        self.inst_list = self.slot.inst_list
        self.ts_list = self.slot.ts_list
        self.done = False
        self.received = 0
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops a longer frame (and the connection that sent it) before allocating it
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_TICK_FRAME_BYTES)
        for prefix in subscribe:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        if configure is not None:  # e.g. CURVE server keys (engine.security)
            configure(self.sock)
        try:
            if bind:
                ensure_ipc_free(endpoint)
                self.sock.bind(endpoint)
            else:
                self.sock.connect(endpoint)
        except (zmq.ZMQError, OSError) as exc:
            self.sock.close(0)
            verb = "bind" if bind else "connect"
            raise OSError(f"cannot {verb} ZeroMQ SUB for ticks to {endpoint!r}: {exc}") from exc
        self._recv = self.sock.recv
        self._get = self.sock.get
        self._nb = int(zmq.NOBLOCK)
        self._events = int(zmq.EVENTS)
        self._pollin = int(zmq.POLLIN)
        self._again = zmq.Again
        self._idle = True

    @property
    def counters(self) -> np.ndarray:
        """Return the reject counters this source writes (shared with its slot)."""
        return self.slot.counters

    def bind_counters(self, counters: np.ndarray) -> None:
        """Count rejects into the agent's ``counters``."""
        self.slot.bind_counters(counters)

    def poll(self) -> int:
        """Return 0 when a tick was written into ``ticks[0]``, else -1.  Never raises on bad input."""
        if self._idle:
            if not self._get(self._events) & self._pollin:
                return -1
            self._idle = False
        try:
            topic = self._recv(self._nb, copy=False)
        except self._again:
            self._idle = True
            return -1
        self.received += 1
        if not topic.more:  # one-frame message
            self.slot.reject_malformed()
            return -1
        payload = self._recv(self._nb, copy=False)  # later frames of a message are already here
        if payload.more:  # three or more frames: drain the rest of this message
            while self._recv(self._nb, copy=False).more:
                pass
            self.slot.reject_malformed()
            return -1
        return 0 if self.slot.ingest(payload) else -1

    def discard_pending(self, limit: int = 10_000_000) -> int:
        """Read and drop the messages already queued (at stop); return how many (for the report)."""
        n = 0
        try:
            while n < limit:
                frame = self._recv(self._nb, copy=False)
                while frame.more:
                    frame = self._recv(self._nb, copy=False)
                n += 1
        except (zmq.Again, zmq.ZMQError):
            pass
        return n

    def close(self) -> None:
        """Close the socket (unread messages are discarded)."""
        self.sock.close(0)


class AeronTickSource(_LiveSource):
    """Ticks from an Aeron subscription: one Tick per (reassembled) message, payload only.

    Parameters
    ----------
    aeron : pyaeron.Aeron
        Connected client.
    channel : str
        ``aeron:ipc`` or ``aeron:udp?endpoint=HOST:PORT``.
    stream_id : int
        Stream of Tick messages (default 1001, :data:`engine.config.TICK_STREAM_ID`).
    instruments : sequence of str
        Instrument table (ignored when ``slot`` is given).
    slot : TickSlot, optional
        Buffer shared with other sources.

    Notes
    -----
    ``poll`` asks the subscription for at most one fragment (``fragment_limit=1``,
    fragments reassembled), so the agent scores one tick per duty cycle and the
    rest wait in the log; a message in several fragments is scored once, on the
    poll that completes it.  An empty poll costs ~0.1 us.  ``received`` counts
    whole messages.
    """

    name = "aeron"

    def __init__(
        self,
        aeron,
        channel: str,
        stream_id: int,
        instruments: Sequence[str] = (),
        *,
        slot: TickSlot | None = None,
    ) -> None:
        self.channel = channel
        self.stream_id = stream_id
        self.slot = slot if slot is not None else TickSlot(instruments)
        self.ticks = self.slot.ticks
        self.inst_list = self.slot.inst_list
        self.ts_list = self.slot.ts_list
        self.done = False
        self.received = 0
        self.sub = aeron.add_subscription(channel, stream_id)
        self._poll = self.sub.poll
        self._ingest = self.slot.ingest
        self._handler = self._on_fragment
        self._ok = False

    @property
    def counters(self) -> np.ndarray:
        """Return the reject counters this source writes (shared with its slot)."""
        return self.slot.counters

    def bind_counters(self, counters: np.ndarray) -> None:
        """Count rejects into the agent's ``counters``."""
        self.slot.bind_counters(counters)

    def _on_fragment(self, buf, header) -> None:
        # Called once per whole (reassembled) message, never for a partial fragment.
        self.received += 1
        self._ok = self._ingest(buf)

    def poll(self) -> int:
        """Return 0 when a tick was written into ``ticks[0]``, else -1.  Never raises on bad input.

        The poll may consume one fragment of a message still being reassembled:
        the handler is then not called, so ``_ok`` is reset first and a tick is
        reported only when this poll completed a valid message (it used to keep
        the previous tick's flag and score that tick again per fragment).
        """
        self._ok = False
        self._poll(self._handler, 1)
        return 0 if self._ok else -1

    @property
    def connected(self) -> bool:
        """Return whether at least one publisher's image is connected."""
        return bool(self.sub.is_connected)

    def discard_pending(self, limit: int = 10_000_000) -> int:
        """Consume the messages already in the log (at stop); return how many (for the report)."""
        seen = [0]

        def count(buf, header) -> None:
            seen[0] += 1

        try:
            while seen[0] < limit and self._poll(count, 1024) > 0:
                pass
        except Exception:  # noqa: BLE001 - the driver may be gone at stop
            pass
        return seen[0]

    def close(self) -> None:
        """Close the subscription."""
        try:
            self.sub.close()
        except Exception:  # noqa: BLE001 - the client may already be closed
            pass


class MultiSource(_LiveSource):
    """Poll several sources sharing one :class:`TickSlot`, alternating after each tick."""

    name = "multi"

    def __init__(self, sources: Sequence) -> None:
        if not sources:
            raise ValueError("MultiSource needs at least one source")
        slot = sources[0].slot
        if any(s.slot is not slot for s in sources):
            raise ValueError("the sources of a MultiSource must share one TickSlot")
        self.sources = list(sources)
        self.slot = slot
        self.ticks = slot.ticks
        self.inst_list = slot.inst_list
        self.ts_list = slot.ts_list
        self.done = False
        self._polls = [s.poll for s in self.sources]
        self._n = len(self._polls)
        self._next = 0

    @property
    def counters(self) -> np.ndarray:
        """Return the shared reject counters."""
        return self.slot.counters

    def bind_counters(self, counters: np.ndarray) -> None:
        """Count rejects into the agent's ``counters``."""
        self.slot.bind_counters(counters)

    @property
    def received(self) -> int:
        """Return the messages read by all sources."""
        return sum(s.received for s in self.sources)

    def discard_pending(self, limit: int = 10_000_000) -> int:
        """Drop what every source has queued (at stop); return how many messages."""
        return sum(s.discard_pending(limit) for s in self.sources)

    def poll(self) -> int:
        """Return 0 when one of the sources wrote a tick, else -1 (fair: the next poll starts after it)."""
        polls = self._polls
        n = self._n
        start = self._next
        for k in range(n):
            j = start + k
            if j >= n:
                j -= n
            if polls[j]() >= 0:
                self._next = j + 1 if j + 1 < n else 0
                return 0
        return -1

    def close(self) -> None:
        """Close every source."""
        for s in self.sources:
            s.close()
