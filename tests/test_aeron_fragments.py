"""Aeron ingress: a message in several fragments is one message (issue: operable service, defect 1)."""

from __future__ import annotations

import time

import pytest

from engine.aeron_io import AeronRuntime
from engine.schema import KIND_QUOTE, REJECT_MALFORMED
from engine.sources import AeronTickSource
from engine.wire import Tick, encode_tick
from tests.conftest import _aeron_dir

pyaeron = pytest.importorskip("pyaeron")


def _offer(pub, payload: bytes, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pub.offer(payload) < 0:
        assert time.monotonic() < deadline, "offer kept failing"
        time.sleep(0.001)


def test_a_multi_fragment_message_never_rescores_the_previous_tick():
    rt = AeronRuntime(_aeron_dir(), embedded=True)
    try:
        src = AeronTickSource(rt.client, "aeron:ipc", 1001, ["ESZ6"])
        pub = rt.client.add_publication("aeron:ipc", 1001)
        deadline = time.monotonic() + 10
        while not (pub.is_connected and src.connected):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tick = Tick(KIND_QUOTE, "ESZ6", 1_000, 1_000, 99.0, 1.0, 101.0, 1.0)
        big = b"\x91" + b"\xc4" + bytes([200]) + b"x" * 200 + b"y" * 1_800  # > one IPC fragment
        _offer(pub, encode_tick(tick))
        _offer(pub, big)
        _offer(pub, b"z" * 7_000)  # several fragments of garbage
        _offer(pub, encode_tick(Tick(KIND_QUOTE, "ESZ6", 2_000, 2_000, 99.0, 1.0, 101.0, 1.0)))
        scored = []
        deadline = time.monotonic() + 10
        while len(scored) < 2 and time.monotonic() < deadline:
            i = src.poll()
            if i >= 0:
                scored.append(int(src.ticks[i]["ts_event_ns"]))
        for _ in range(200):  # nothing more to come: every further poll is empty
            assert src.poll() < 0
        assert scored == [1_000, 2_000]  # each valid tick once; the big messages never re-score one
        assert src.received == 4  # messages, not fragments
        assert src.counters[REJECT_MALFORMED] == 2
        src.close()
        pub.close()
    finally:
        rt.close()
