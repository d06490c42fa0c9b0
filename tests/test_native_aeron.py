"""The Aeron C client bound for compiled code (engine.native_aeron), over a real embedded driver.

Scores offered through :class:`NativeAeronPublisher` (the function the native loop
calls) arrive at a pyaeron subscription byte for byte; with nobody subscribed they
are counted ``unsent_no_subscriber`` after the retries, as :class:`AeronPublisher`
counts them; the start-up check names a missing library.
"""

from __future__ import annotations

import time

import pytest

pa = pytest.importorskip("pyaeron")

from engine.aeron_io import AeronRuntime  # noqa: E402
from engine.native_aeron import NativeAeronPublisher, bind_aeron_c  # noqa: E402


@pytest.fixture()
def runtime(tmp_path):
    rt = AeronRuntime(str(tmp_path / "aeron"), embedded=True)
    yield rt
    rt.close()


def test_bind_reads_the_version_of_the_client_pyaeron_loaded():
    c = bind_aeron_c()
    assert c.version >= (1, 40, 0) and c.path.endswith(".so")


def test_offers_arrive_byte_for_byte_at_a_subscriber(runtime):
    pub = NativeAeronPublisher(runtime.dir, "aeron:ipc", 1002, not_connected_retries=0)
    try:
        sub = runtime.client.add_subscription("aeron:ipc", 1002)
        deadline = time.monotonic() + 10
        while not pub.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.connected
        sent = [bytes([k % 256]) * (1 + k % 90) for k in range(500)]
        for p in sent:
            assert pub.publish(b"", bytearray(p))
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            sub.poll(lambda buf, header: got.append(bytes(buf)), 100)
        assert got == sent
        assert (pub.sent, pub.drops, pub.unsent_no_subscriber, pub.errors) == (500, 0, 0, 0)
        sub.close()
    finally:
        pub.close()


def test_nobody_subscribed_is_counted_apart_from_drops_after_the_retries(runtime):
    pub = NativeAeronPublisher(runtime.dir, "aeron:ipc", 1003, not_connected_retries=2)
    try:
        assert not pub.publish(b"", bytearray(b"x" * 40))
        c = pub.counters()
        assert (c["sent"], c["drops"], c["unsent_no_subscriber"], c["not_connected"]) == (0, 0, 1, 3)
    finally:
        pub.close()
    pub.close()  # idempotent


def test_a_driver_directory_without_a_driver_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="Aeron"):
        NativeAeronPublisher(str(tmp_path / "nothing"), "aeron:ipc", 1002, driver_timeout_ms=500, timeout_s=2)


def test_a_replay_publishing_on_aeron_delivers_every_score_as_recorded(runtime, tmp_path):
    """``replay --publish aeron:ipc --aeron-dir DIR``: a running driver there is used; an independent
    subscription gets every Score, contiguous seq, the very bytes the loop recorded; the counters and
    where it published are in the summary."""
    import threading

    from engine.wire import decode_score
    from replay.run import ReplayOptions
    from tests.test_native_loop import _run_recording

    sub = runtime.client.add_subscription("aeron:ipc", 1077)
    got: list[bytes] = []
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            if not sub.poll(lambda buf, header: got.append(bytes(buf)), 256):
                time.sleep(0.0005)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        s, recorded = _run_recording(ReplayOptions(publish="aeron:ipc", aeron_dir=runtime.dir, stream_id=1077,
                                                   wait_subscribers=1, progress=False, pin=None, limit=20_000,
                                                   record_scores=True))  # fmt: skip
        deadline = time.monotonic() + 20
        while len(got) < s["scores"] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(5)
        sub.close()
    assert s["loop"] == "native" and s["scores"] > 19_000
    assert got == recorded
    assert [decode_score(p).seq for p in got] == list(range(s["scores"]))
    a = s["aeron"]
    assert (a["dir"], a["stream_id"], a["embedded"]) == (runtime.dir, 1077, False)
    assert (a["sent"], a["drops"], a["errors"]) == (s["scores"], 0, 0) and s["dropped"] == 0


def test_replay_aeron_options_without_an_aeron_channel_are_refused(capsys):
    from engine.cli import main

    assert main(["replay", "--aeron-dir", "/tmp/x", "--publish", "none", "--no-progress"]) != 0
    assert "--aeron-dir / --stream-id need --publish aeron:ipc" in capsys.readouterr().err


def _conductor_threads() -> dict[int, float]:
    """CPU time (ms) used so far by each Aeron client conductor thread of this process, by thread id."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "aeron-client":
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) * 1000.0 / ticks  # utime + stime
    return out


def test_the_runtime_client_holding_nothing_else_does_not_search_the_counters_forever(tmp_path):
    """Its anchor subscription registers it with the driver, so its conductor finds its heartbeat.

    A client that never adds a resource has no heartbeat counter in the driver, and the Aeron
    C client's conductor then searches all 8,192 counter records on every duty cycle: ~1 ms of
    CPU every ~16 ms (~35 ms per second here).  Measured: the conductor thread(s) this runtime
    started (not other tests' clients), over 2 s.
    """
    before = set(_conductor_threads())
    rt = AeronRuntime(str(tmp_path / "aeron"), embedded=True)
    try:
        time.sleep(0.5)  # the conductor thread named itself; the driver registered the client
        mine = set(_conductor_threads()) - before
        assert mine and rt.anchor is not None
        t0 = _conductor_threads()
        time.sleep(2.0)
        t1 = _conductor_threads()
    finally:
        rt.close()
    assert sum(t1.get(t, 0.0) - t0.get(t, 0.0) for t in mine) < 30.0
