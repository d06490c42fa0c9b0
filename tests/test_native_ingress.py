"""The compiled ZeroMQ ingress (engine.native_ingress) decides every message as the msgspec source does.

One PUB sends the same messages to a :class:`engine.sources.ZmqTickSource` and a
:class:`engine.native_ingress.NativeZmqTickSource` (real ipc sockets, each with its
own instrument slot admitting new symbols up to a capacity); both must accept the
same ticks, byte for byte and in order, count the same rejects by reason and admit
the same instruments in the same order.  The messages: valid ticks, drawn ticks
with fields of wrong types and ranges (the decoder property test's strategy),
mutated and truncated bytes, one-frame and three-frame messages, new symbols
beyond the capacity, implausible times and absurd values.
"""

from __future__ import annotations

import mmap
import resource
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.native_ingress import (
    I_T_MODE,
    N_TF,
    T_ARMED,
    T_LOOKING,
    T_PENDING,
    T_REFUSED,
    T_SLOTS,
    TF_BASE,
    TF_MAPPED,
    TF_STATE,
    TF_TERM_LEN,
    NativeAeronTickSource,
    NativeZmqTickSource,
    SymbolIndex,
    fnv1a,
    mapping_of,
)
from engine.sources import TickSlot, ZmqTickSource
from tests.test_tick_decode import MAX_EVENT_NS, SYMBOLS, _tick_bytes

CAPACITY = len(SYMBOLS) + 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ep = f"ipc://{tmp_path_factory.mktemp('ingress')}/ticks.ipc"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(ep)
    srcs = []
    for cls in (ZmqTickSource, NativeZmqTickSource):
        slot = TickSlot(SYMBOLS, capacity=CAPACITY)
        slot.max_event_ns = MAX_EVENT_NS
        srcs.append(cls(ctx, ep, bind=False, slot=slot, rcvhwm=0))
    time.sleep(0.3)  # subscriptions reach the PUB
    yield pub, srcs
    for s in srcs:
        s.close()
    pub.close(0)
    ctx.term()


def _drain(src, expect: int, out: list, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    native = hasattr(src, "window")
    while time.monotonic() < deadline:
        if native:
            a, b = src.window(64)
            if b > a:
                out.extend(bytes(src.ticks[a:b].tobytes()[k * 80:(k + 1) * 80]) for k in range(b - a))
                src.consumed(b - a)
                continue
        else:
            i = src.poll()
            if i >= 0:
                out.append(bytes(src.ticks[i : i + 1].tobytes()))
                continue
        if src.received >= expect:
            return
        time.sleep(0.001)
    raise AssertionError(f"{type(src).__name__} received {src.received} of {expect}")


def _send_and_compare(pair, messages: list[list[bytes]]) -> int:
    pub, (ref, nat) = pair
    return _compare(ref, nat, len(messages), lambda: [pub.send_multipart(frames) for frames in messages])


def _compare(ref, nat, n_messages: int, send) -> int:
    """``send()`` the messages; both sources must accept the same ticks, reject alike, admit alike."""
    r0, n0 = ref.received, nat.received
    c_ref0, c_nat0 = ref.counters.copy(), nat.counters.copy()
    send()
    got_ref: list[bytes] = []
    got_nat: list[bytes] = []
    _drain(ref, r0 + n_messages, got_ref)
    _drain(nat, n0 + n_messages, got_nat)
    assert got_nat == got_ref
    assert (nat.counters - c_nat0).tolist() == (ref.counters - c_ref0).tolist()
    assert nat.slot.ids == ref.slot.ids
    return len(got_ref)


def _tick(sym: str, ts: int, **kw) -> bytes:
    f = {"kind": 1, "recv": ts, "bid": 100.0, "bsz": 1.0, "ask": 100.25, "asz": 2.0, "px": 0.0, "sz": 0.0,
         "side": 0, "oid": 0} | kw  # fmt: skip
    return msgpack.packb([1, f["kind"], sym, ts, f["recv"], f["bid"], f["bsz"], f["ask"], f["asz"], f["px"],
                          f["sz"], f["side"], f["oid"]])  # fmt: skip


def test_native_ingress_decides_a_mixed_stream_as_the_msgspec_source(pair):
    rng = np.random.default_rng(7)
    ts = 1_700_000_000_000_000_000
    msgs: list[list[bytes]] = []
    for j in range(3000):
        ts += int(rng.integers(0, 10_000))
        sym = SYMBOLS[j % len(SYMBOLS)] if rng.random() < 0.9 else f"NEW{rng.integers(0, 8)}"
        p = _tick(sym, ts)
        r = rng.random()
        if r < 0.05:
            p = bytes(p[: rng.integers(0, len(p))])  # truncated
        elif r < 0.10:
            b = bytearray(p)
            b[rng.integers(0, len(b))] = rng.integers(0, 256)
            p = bytes(b)
        elif r < 0.12:
            p = _tick(sym, 0)  # implausible time
        elif r < 0.14:
            p = _tick(sym, ts, bid=1e301)  # absurd value
        elif r < 0.16:
            p = _tick(sym, ts, kind=300)  # out of the dtype's range
        elif r < 0.17:
            p = _tick(sym, ts, oid=2**64 - 1)
        frames = [sym.encode(), p]
        if rng.random() < 0.02:
            frames = [p]  # one frame
        elif rng.random() < 0.02:
            frames = [sym.encode(), p, b"x"]  # three frames
        msgs.append(frames)
    accepted = _send_and_compare(pair, msgs)
    assert accepted > 2000
    pub, (ref, nat) = pair
    assert len(ref.slot.ids) == CAPACITY  # new symbols admitted up to the capacity, the rest refused


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])  # fmt: skip
@given(st.lists(_tick_bytes(), min_size=1, max_size=60))
def test_native_ingress_decides_drawn_ticks_as_the_msgspec_source(pair, payloads):
    _send_and_compare(pair, [[b"t", p] for p in payloads])


def test_symbol_index_finds_every_symbol_and_nothing_else():
    ids = {f"S{k}": k for k in range(300)} | {"é€": 300, "": 301}
    idx = SymbolIndex(ids)
    from engine.native_ingress import _lookup

    for s, i in ids.items():
        b = np.frombuffer(s.encode() or b"\0", np.uint8)
        assert _lookup(b, 0, len(s.encode()), idx.table, idx.table.shape[0] - 1, idx.sym, idx.off) == i
    b = np.frombuffer(b"S300", np.uint8)
    assert _lookup(b, 0, 4, idx.table, idx.table.shape[0] - 1, idx.sym, idx.off) == -1
    assert fnv1a(np.frombuffer(b"a", np.uint8), 0, 1) == np.int64(np.uint64(0xAF63DC4C8601EC8C))


# ----------------------------------------------------------------------------- Aeron
@pytest.fixture(scope="module")
def aeron_pair(tmp_path_factory):
    pa = pytest.importorskip("pyaeron")
    from engine.aeron_io import AeronRuntime
    from engine.native_aeron import AeronCClient
    from engine.native_ingress import NativeAeronTickSource
    from engine.sources import AeronTickSource

    rt = AeronRuntime(str(tmp_path_factory.mktemp("aeron") / "driver"), embedded=True)
    cc = AeronCClient(rt.dir)
    slots = []
    for _ in range(2):
        slot = TickSlot(SYMBOLS, capacity=CAPACITY)
        slot.max_event_ns = MAX_EVENT_NS
        slots.append(slot)
    srcs = [AeronTickSource(rt.client, "aeron:ipc", 1001, slot=slots[0]),
            NativeAeronTickSource(cc, "aeron:ipc", 1001, slot=slots[1], rows=64)]
    pub = rt.client.add_exclusive_publication("aeron:ipc", 1001)
    deadline = time.monotonic() + 10
    while not (srcs[0].connected and srcs[1].connected) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield pub, srcs, pa
    for s in srcs:
        s.close()
    pub.close()
    cc.close()
    rt.close()


def _send_aeron_and_compare(aeron_pair, payloads: list[bytes]) -> int:
    pub, (ref, nat), pa = aeron_pair

    def send():
        for p in payloads:
            while pub.offer(p) is not True:  # back-pressure: the readers drain below
                time.sleep(0.0001)

    return _compare(ref, nat, len(payloads), send)


def test_native_aeron_ingress_decides_as_the_pyaeron_source(aeron_pair):
    rng = np.random.default_rng(11)
    ts = 1_700_000_000_000_000_000
    payloads = []
    for j in range(2000):
        ts += int(rng.integers(0, 10_000))
        sym = SYMBOLS[j % len(SYMBOLS)] if rng.random() < 0.9 else f"AER{rng.integers(0, 8)}"
        p = _tick(sym, ts)
        r = rng.random()
        if r < 0.05:
            p = bytes(p[: rng.integers(1, len(p))])
        elif r < 0.08:
            p = _tick(sym, ts, bid=1e301)
        elif r < 0.09:
            p = bytes(rng.integers(0, 256, 3000, dtype=np.uint8))  # several fragments, reassembled
        payloads.append(p)
    assert _send_aeron_and_compare(aeron_pair, payloads) > 1500


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])  # fmt: skip
@given(st.lists(_tick_bytes().filter(bool), min_size=1, max_size=60))
def test_native_aeron_ingress_decides_drawn_ticks_as_the_pyaeron_source(aeron_pair, payloads):
    _send_aeron_and_compare(aeron_pair, payloads)


# ----------------------------------------------------------------------------- touch-ahead of the tick log
def _thread_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _read_all(srcs, got: list[list[bytes]], faults: list[int]) -> None:
    """Read every source dry, appending its ticks to ``got[j]`` and its page faults to ``faults[j]``."""
    for j, s in enumerate(srcs):
        while True:
            f0 = _thread_faults()
            start, stop = s.window(64)
            faults[j] += _thread_faults() - f0
            if start >= stop:
                break
            got[j].append(s.ticks[start:stop].tobytes())
            s.consumed(stop - start)


def test_touch_ahead_maps_the_tick_log_while_idle_so_reads_take_no_page_fault(tmp_path):
    """While idle, the native Aeron ingress touches every page of the image's log once; reads
    then fault no more (a source without it faults), the ticks are the same, and a new image
    (the publisher restarted) is found and touched in turn."""
    pytest.importorskip("pyaeron")
    from engine.aeron_io import AeronRuntime
    from engine.native_aeron import AeronCClient

    chan = "aeron:ipc?term-length=64k"  # a 192 KiB log: 48 pages
    rt = AeronRuntime(str(tmp_path / "driver"), embedded=True)
    clients = [AeronCClient(rt.dir, pre_touch=False) for _ in range(2)]  # each maps the log itself
    srcs = []
    for cc, touch in zip(clients, (True, False), strict=True):
        slot = TickSlot(SYMBOLS, capacity=CAPACITY)
        slot.max_event_ns = MAX_EVENT_NS
        srcs.append(NativeAeronTickSource(cc, chan, 1002, slot=slot, rows=64, touch_ahead=touch))
    touched, plain = srcs
    pubs = []
    try:
        assert touched.touch_ahead == {"state": "looking", "pages": 0, "images": 0}
        assert plain.touch_ahead["state"] == "off"
        ts = [1_700_000_000_000_000_000]

        def publish_and_read(pub, n: int) -> tuple[list[bytes], list[int]]:
            """Offer n ticks (reading whenever the log is full); return each source's ticks and faults."""
            got: list[list[bytes]] = [[], []]
            faults = [0, 0]

            def read() -> None:
                _read_all(srcs, got, faults)

            for i in range(n):
                ts[0] += 1000
                p = _tick(SYMBOLS[i % len(SYMBOLS)], ts[0])
                while pub.offer(p) is not True:  # back-pressure: the 64 KiB terms are full
                    read()
            read()
            return [b"".join(g) for g in got], faults

        def idle_until(state: str, timeout_s: float = 20.0) -> None:
            deadline = time.monotonic() + timeout_s
            while touched.touch_ahead["state"] != state and time.monotonic() < deadline:
                touched.window(64)
            assert touched.touch_ahead["state"] == state, touched.touch_ahead

        for restart in range(2):
            pub = rt.client.add_exclusive_publication(chan, 1002)
            pubs.append(pub)
            deadline = time.monotonic() + 10
            while not all(s.connected for s in srcs) and time.monotonic() < deadline:
                time.sleep(0.01)
            before = touched.touch_ahead["pages"]
            for _ in range(3):  # reassembled messages come with whole-message flags, but not in place
                while pub.offer(bytes(range(256)) * 12) is not True:
                    time.sleep(0.001)
                for _ in range(200):
                    for s in srcs:
                        s.window(64)
                assert touched.touch_ahead["state"] == "looking", touched.touch_ahead
            publish_and_read(pub, 1)  # the first whole message locates the log
            idle_until("done")
            assert touched.touch_ahead["pages"] - before >= 40  # most of the 48 pages (the rest were read)
            got, faults = publish_and_read(pub, 4000)  # ~2.6 laps of the log
            assert got[0] == got[1] and len(got[0]) > 0
            assert faults[0] == 0, faults  # every page was mapped before the reader came
            if restart == 0:
                assert faults[1] > 0, faults  # the one without touch-ahead faulted on the first lap
            pub.close()
            # the image goes; the next publisher's image is found and touched in turn
            deadline = time.monotonic() + 30
            while touched.touch_ahead["state"] == "done" and time.monotonic() < deadline:
                touched.window(64)
                time.sleep(0.001)
            assert touched.touch_ahead["state"] == "looking"
    finally:
        for s in srcs:
            s.close()
        for c in clients:
            c.close()
        rt.close()


def test_touch_ahead_touches_the_log_of_every_publisher_of_the_stream(tmp_path):
    """Two publishers of the stream are two images with a log each: both logs are found and
    touched while idle (a slot each), then both publishers' ticks are read with no page fault,
    where a source without the touch-ahead faults; and both read the same ticks."""
    pytest.importorskip("pyaeron")
    from engine.aeron_io import AeronRuntime
    from engine.native_aeron import AeronCClient
    from engine.schema import TICK_DTYPE

    chan = "aeron:ipc?term-length=64k"  # two 192 KiB logs
    rt = AeronRuntime(str(tmp_path / "driver"), embedded=True)
    clients = [AeronCClient(rt.dir, pre_touch=False) for _ in range(2)]
    srcs = []
    for cc, touch in zip(clients, (True, False), strict=True):
        slot = TickSlot(SYMBOLS, capacity=CAPACITY)
        slot.max_event_ns = MAX_EVENT_NS
        srcs.append(NativeAeronTickSource(cc, chan, 1005, slot=slot, rows=64, touch_ahead=touch))
    touched = srcs[0]
    pubs = [rt.client.add_exclusive_publication(chan, 1005) for _ in range(2)]
    got: list[list[bytes]] = [[], []]
    faults = [0, 0]

    def read() -> None:
        _read_all(srcs, got, faults)

    try:
        deadline = time.monotonic() + 10
        while not all(p.is_connected for p in pubs) and time.monotonic() < deadline:
            time.sleep(0.01)
        ts = 1_700_000_000_000_000_000
        for k, pub in enumerate(pubs):  # one message each locates its log
            while pub.offer(_tick(SYMBOLS[k], ts + k)) is not True:
                time.sleep(0.001)
        deadline = time.monotonic() + 20
        while touched.touch_ahead != {"state": "done", "pages": touched.touch_ahead["pages"], "images": 2}:
            assert time.monotonic() < deadline, touched.touch_ahead
            read()
        assert touched.touch_ahead["pages"] >= 2 * 40  # most of each log's 48 pages
        faults[:] = [0, 0]
        for _ in range(4000):  # ~2 laps of each log, the publishers interleaved
            ts += 1000
            for k, pub in enumerate(pubs):
                while pub.offer(_tick(SYMBOLS[k], ts)) is not True:  # its log is full: read
                    read()
        read()
        assert faults[0] == 0 and faults[1] > 0, faults
        rows = [np.frombuffer(b"".join(g), TICK_DTYPE) for g in got]
        for k in range(2):  # each publisher's ticks in its order (the images interleave as polled)
            a, b = (r[r["instrument"] == k] for r in rows)
            assert len(a) == 4001 and a.tobytes() == b.tobytes()
    finally:
        for s in srcs:
            s.close()
        for p in pubs:
            p.close()
        for c in clients:
            c.close()
        rt.close()


def test_touch_ahead_refuses_an_address_that_is_not_the_start_of_an_aeron_log_mapping(tmp_path):
    """The compiled code touches nothing Python has not found in /proc/self/maps as a mapping of
    a .logbuffer file from its start: an anonymous buffer, or an address inside a log, is refused
    after three tries; the start of a mapped .logbuffer file is armed."""
    buf = np.zeros(3 << 16, np.uint8)
    assert mapping_of(buf.ctypes.data, buf.nbytes) is not None  # it is mapped ...
    assert not mapping_of(buf.ctypes.data, buf.nbytes)[2].endswith(".logbuffer")  # ... but not a log
    assert mapping_of(8, 4096) is None  # page zero is never mapped
    log_file = tmp_path / "42.logbuffer"
    log_file.write_bytes(bytes((3 << 16) + 4096))  # three 64 KiB terms and a metadata page
    with open(log_file, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    view = np.frombuffer(mm, np.uint8)
    start = view.ctypes.data

    def check(base: int) -> list[int]:
        src = NativeAeronTickSource.__new__(NativeAeronTickSource)  # only the ictx: no client needed
        src.C = np.zeros(64, np.int64)
        src.C[I_T_MODE] = T_LOOKING
        src.T = np.zeros((T_SLOTS, N_TF), np.int64)
        src._t_misses, src._t_said = 0, False
        src.T[1, TF_BASE], src.T[1, TF_TERM_LEN] = base, 1 << 16  # the log found into slot 1
        states = []
        for _ in range(3):
            if src.T[1, TF_STATE] == T_ARMED:
                break
            src.T[1, TF_STATE] = T_PENDING
            src._check_log(1)
            states.append(T_REFUSED if src.C[I_T_MODE] == T_REFUSED else int(src.T[1, TF_STATE]))
        return states

    try:
        assert check(buf.ctypes.data) == [T_LOOKING, T_LOOKING, T_REFUSED]
        assert check(start + 4096) == [T_LOOKING, T_LOOKING, T_REFUSED]  # inside the log, not its start
        assert check(start) == [T_ARMED]
    finally:
        del view
        mm.close()


# ----------------------------------------------------------------------------- both sources
def test_native_multi_source_receives_zmq_and_aeron_as_the_python_multi_source(tmp_path):
    """A ZeroMQ and an Aeron source received in one compiled call (NativeMultiSource) accept the
    same ticks per instrument, in order, and reject alike, as the Python MultiSource of the two."""
    pytest.importorskip("pyaeron")
    from engine.aeron_io import AeronRuntime
    from engine.native_aeron import AeronCClient
    from engine.native_ingress import NativeMultiSource
    from engine.schema import TICK_DTYPE
    from engine.sources import AeronTickSource, MultiSource

    ep = f"ipc://{tmp_path}/ticks.ipc"
    ctx = zmq.Context()
    zpub = ctx.socket(zmq.PUB)
    zpub.setsockopt(zmq.SNDHWM, 0)
    zpub.bind(ep)
    rt = AeronRuntime(str(tmp_path / "driver"), embedded=True)
    cc = AeronCClient(rt.dir, pre_touch=False)
    slots = []
    for _ in range(2):
        slot = TickSlot(SYMBOLS, capacity=len(SYMBOLS) + 1)  # room for one new symbol, then full
        slot.max_event_ns = MAX_EVENT_NS
        slots.append(slot)
    ref = MultiSource([ZmqTickSource(ctx, ep, bind=False, slot=slots[0], rcvhwm=0),
                       AeronTickSource(rt.client, "aeron:ipc", 1003, slot=slots[0])])  # fmt: skip
    nat = NativeMultiSource([NativeZmqTickSource(ctx, ep, bind=False, slot=slots[1], rcvhwm=0, rows=16),
                             NativeAeronTickSource(cc, "aeron:ipc", 1003, slot=slots[1],
                                                   rows=16)])  # fmt: skip
    apub = rt.client.add_exclusive_publication("aeron:ipc", 1003)
    try:
        deadline = time.monotonic() + 10
        while not (ref.sources[1].connected and nat.aeron.connected) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the ZeroMQ subscriptions reach the PUB
        rng = np.random.default_rng(5)
        ts = 1_700_000_000_000_000_000
        n = 0
        for j in range(3000):
            ts += int(rng.integers(0, 10_000))
            on_zmq = j % 2 == 0  # each instrument comes from one source, so its order is defined
            sym = SYMBOLS[j % 4]
            if on_zmq and rng.random() < 0.03:  # new symbols from one source only: one admitted, then full
                sym = f"ZNEW{rng.integers(0, 2)}"
            p = _tick(sym, ts)
            if rng.random() < 0.05:
                p = bytes(p[: rng.integers(1, len(p))])
            if on_zmq:
                zpub.send_multipart([sym.encode(), p])
            else:
                while apub.offer(p) is not True:
                    time.sleep(0.0001)
            n += 1
        time.sleep(0.2)  # the messages are waiting on both transports
        nat.compile_receive()  # the warm-up's call: compiles, reads nothing
        assert nat.received == 0
        got: list[list[bytes]] = [[], []]
        _drain(ref, n, got[0])
        _drain(nat, n, got[1])
        rows = [np.frombuffer(b"".join(g), TICK_DTYPE) for g in got]
        assert len(rows[0]) == len(rows[1]) > 2500
        for inst in range(len(SYMBOLS) + 1):
            a, b = (r[r["instrument"] == inst] for r in rows)
            assert a.tobytes() == b.tobytes(), f"instrument {inst}"
        assert nat.counters.tolist() == ref.counters.tolist()
        assert nat.slot.ids == ref.slot.ids and len(ref.slot.ids) == len(SYMBOLS) + 1
        assert nat.received == ref.received == n
        # the python loop (after a hot reload to an ort model) polls it one tick at a time
        for j in range(20):
            ts += 1000
            if j % 2 == 0:
                zpub.send_multipart([SYMBOLS[0].encode(), _tick(SYMBOLS[0], ts)])
            else:
                while apub.offer(_tick(SYMBOLS[1], ts)) is not True:
                    time.sleep(0.0001)
        polled: list[list[bytes]] = [[], []]
        _drain(ref, n + 20, polled[0])
        deadline = time.monotonic() + 20
        while len(polled[1]) < 20 and time.monotonic() < deadline:
            i = nat.poll()
            if i >= 0:
                polled[1].append(nat.ticks[i : i + 1].tobytes())
        assert sorted(polled[1]) == sorted(polled[0]) and len(polled[1]) == 20
    finally:
        for s in (ref, nat):
            s.close()
        apub.close()
        zpub.close(0)
        cc.close()
        rt.close()
        ctx.term()


def test_touch_ahead_goes_no_further_than_its_window_ahead_of_the_reader(tmp_path):
    """What the publisher has not written yet is touched (so allocated, in a sparse log) at most
    ``touch_window`` bytes ahead of the reader, however long the loop idles."""
    pytest.importorskip("pyaeron")
    from engine.aeron_io import AeronRuntime
    from engine.native_aeron import AeronCClient

    chan = "aeron:ipc?term-length=64k"
    rt = AeronRuntime(str(tmp_path / "driver"), embedded=True)
    cc = AeronCClient(rt.dir, pre_touch=False)
    slot = TickSlot(SYMBOLS, capacity=CAPACITY)
    slot.max_event_ns = MAX_EVENT_NS
    src = NativeAeronTickSource(cc, chan, 1004, slot=slot, rows=64, touch_window=16 << 10)  # 4 pages
    pub = rt.client.add_exclusive_publication(chan, 1004)
    try:
        deadline = time.monotonic() + 10
        while not src.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        ts = 1_700_000_000_000_000_000
        read = 0

        def send_and_idle(n: int) -> None:
            nonlocal ts, read
            deadline = time.monotonic() + 10
            for _ in range(n):
                ts += 1000
                while pub.offer(_tick(SYMBOLS[0], ts)) is not True:  # the log is full: read
                    assert time.monotonic() < deadline
                    a, b = src.window(64)
                    src.consumed(b - a)
            while src.received < read + n and time.monotonic() < deadline:
                a, b = src.window(64)
                src.consumed(b - a)
            read += n
            for _ in range(5000):  # a long idle stretch
                src.window(64)

        frame = (len(_tick(SYMBOLS[0], ts)) + 32 + 31) & ~31  # header + payload, 32-byte aligned
        window = 16 << 10

        def touched_to_the_window_end() -> None:
            # a new publication starts at position 0; after a long idle stretch the touched
            # frontier is the window's end, within the page the window ends in
            reader = read * frame
            frontier = int(src.T[0, TF_MAPPED])
            assert reader + window <= frontier < reader + window + 4096, (reader, frontier)

        send_and_idle(1)
        t = src.touch_ahead
        assert t["state"] == "touching" and t["pages"] == 5, t  # the window (pages 0-4), not the 48
        touched_to_the_window_end()
        send_and_idle(320)  # ~40 KiB more read: the window moves with the reader
        t2 = src.touch_ahead
        assert t2["state"] == "touching" and t["pages"] < t2["pages"] <= 16, t2
        touched_to_the_window_end()
    finally:
        src.close()
        pub.close()
        cc.close()
        rt.close()
