"""Faults a service meets in production (issue 15): a subscriber that never reads, a stop under
load, socket-level garbage interleaved with valid ticks.  Real sockets, real processes."""

import json
import random
import signal
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import SYMBOLS, Svc
from tests.test_service import _client, _finish, _kill_all
from tests.wire_clients import BASE_NS, tick


def test_a_subscriber_that_never_reads_loses_only_its_own_scores(tmp_path):
    """One stalled subscriber must not cost the others (no XPUB_NODROP in the service)."""
    n = 30_000
    svc = Svc(tmp_path, '[engine]\npin = "none"\n'
              f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/t.ipc"\n'
              f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\nsndhwm = 2000\n')
    ctx = zmq.Context()
    slow = ctx.socket(zmq.SUB)
    slow.setsockopt(zmq.RCVHWM, 10)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.setsockopt(zmq.SUBSCRIBE, b"")
    slow.setsockopt(zmq.LINGER, 0)
    slow.connect(f"ipc://{tmp_path}/s.ipc")
    fast = pub = None
    try:
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1, 10)
        fast = _client("subscribe", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/s.ipc", "expect": n,
                                     "out": str(tmp_path / "fast.json")}, tmp_path, "fast")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 2, 10)
        pub = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/t.ipc", "n": n, "first": 10,
                                  "rate": 10_000}, tmp_path, "pub")  # a pace the fast one keeps up with
        _finish(pub)
        _finish(fast, timeout=120)
        got_slow = 0
        while slow.poll(200):
            slow.recv_multipart()
            got_slow += 1
        st_ = svc.status()
    finally:
        _kill_all(fast, pub)
        slow.close(0)
        ctx.term()
        svc.stop()
    rep = json.loads((tmp_path / "fast.json").read_text())
    assert rep["count"] == n and rep["seqs_sorted_contiguous"], rep  # the fast one lost nothing
    assert got_slow < n  # the stalled one lost its own (it sees seq gaps)
    assert st_["scores_out"] == n and st_["sinks"]["zmq"]["drop_policy"] == "per-subscriber"


def test_a_stop_under_load_counts_what_was_received_but_not_scored(tmp_path):
    """drain_timeout_ms = 0: the backlog at stop is counted by reason, never silently discarded."""
    n = 100_000
    svc = Svc(tmp_path, '[engine]\npin = "none"\ndrain_timeout_ms = 0\n[model]\nbackend = "ort"\n'
              f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/t.ipc"\nrcvhwm = 0\n'
              f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n')
    pub = None
    try:
        pub = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/t.ipc", "n": n, "first": 10},
                      tmp_path, "pub")
        _finish(pub)
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=120) == 0
    finally:
        _kill_all(pub)
        svc.stop()
    s = svc.summary()
    unscored = s["unscored_at_stop"]
    assert unscored.get("drain_timeout", 0) > 0, (s["ticks"], unscored)
    assert s["ticks"] + sum(unscored.values()) <= n
    assert "received but not scored at stop (drain_timeout)" in svc.log.read_text()


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    svc = Svc(tmp, '[engine]\npin = "none"\nidle = "backoff"\n'
              f'[sources.zmq]\nendpoint = "ipc://{tmp}/t.ipc"\n'
              f'[sinks.zmq]\nendpoint = "ipc://{tmp}/s.ipc"\n')
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 1000)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    pub.connect(f"ipc://{tmp}/t.ipc")
    sub.connect(f"ipc://{tmp}/s.ipc")
    svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1, 10)
    svc.pub, svc.sub, svc.next_i = pub, sub, 50_000_000
    # PUB connect: the service's subscription must reach us before the first tick counts
    deadline = time.monotonic() + 10
    probe = 0
    while time.monotonic() < deadline:
        pub.send_multipart([SYMBOLS[0].encode(), tick(svc.next_i, SYMBOLS)])
        svc.next_i += 4  # keep to quotes
        probe += 1
        if sub.poll(100):
            break
    while sub.poll(300):
        sub.recv_multipart()
    try:
        yield svc
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()
        svc.stop()


_ints = st.integers(-2**63, 2**64 - 1)  # what MessagePack can carry
_frames = st.one_of(
    st.lists(st.binary(max_size=64), min_size=0, max_size=4),  # arbitrary bytes, any frame count
    st.builds(lambda sym, body: [sym, msgpack.packb(body)],      # msgpack of the wrong structure
              st.sampled_from([s.encode() for s in SYMBOLS] + [b"", b"ZZZ"]),
              st.one_of(st.lists(st.one_of(_ints, st.floats(), st.text(max_size=5),
                                           st.none()), max_size=16),
                        st.dictionaries(st.text(max_size=3), _ints, max_size=3),
                        _ints, st.text(max_size=10))),
)


@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(_frames, min_size=1, max_size=30), seed=st.integers(0, 2**16))
def test_fuzzed_frames_among_valid_ticks_every_valid_tick_scored_exactly_once(fuzz_service, garbage, seed):
    svc = fuzz_service
    before = svc.status()
    valid = 40
    order = [("v", k) for k in range(valid)]  # valid ticks keep their order (event time rises)
    rng = random.Random(seed)
    for g in garbage:  # garbage anywhere among them
        order.insert(rng.randint(0, len(order)), ("g", g))
    first = svc.next_i
    for kind, item in order:
        if kind == "v":
            i = first + 4 * item  # quotes only, event times strictly rising: each must be accepted
            svc.pub.send_multipart([SYMBOLS[0].encode(), tick(i, SYMBOLS)])
        elif item:
            svc.pub.send_multipart(item)
    svc.next_i = first + 4 * valid
    got = []
    deadline = time.monotonic() + 20
    while len(got) < valid and time.monotonic() < deadline:
        if svc.sub.poll(200):
            frames = svc.sub.recv_multipart()
            got.append(msgpack.unpackb(frames[1]))
    time.sleep(0.2)
    while svc.sub.poll(100):  # nothing more: no duplicate and no score of garbage
        got.append(msgpack.unpackb(svc.sub.recv_multipart()[1]))
    after = svc.status()
    valid_ts = {BASE_NS + (first + 4 * k) * 1_000 for k in range(valid)}
    scored_ts = [g[3] for g in got]
    assert after["state"] == "running" and after["errors"] == before["errors"]
    assert sorted(scored_ts) == sorted(valid_ts), (len(scored_ts), before["rejected_by_reason"],
                                                   after["rejected_by_reason"])
    # every message reached a counter: scored, or rejected by reason
    delta_in = after["ticks_in"] - before["ticks_in"]
    delta_msgs = after["messages_received"] - before["messages_received"]
    assert delta_in == delta_msgs == valid + sum(1 for g in garbage if g)


def test_implausible_times_and_absurd_values_are_rejected_and_poison_nothing(fuzz_service):
    """A tick at 2**63-1 used to make every later tick of its instrument time_backwards."""
    svc = fuzz_service
    before = svc.status()["rejected_by_reason"]
    sym = SYMBOLS[0]
    i = (svc.next_i + 11) // 12 * 12  # i % 3 == 0: SYMBOLS[0]; i % 4 == 0: a quote
    ts = BASE_NS + i * 1_000
    bad = [
        [1, 1, sym, 2**63 - 1, ts, 100.0, 5.0, 100.25, 7.0, 0.0, 0.0, 0, 0],    # the far future
        [1, 1, sym, 0, ts, 100.0, 5.0, 100.25, 7.0, 0.0, 0.0, 0, 0],            # no time at all
        [1, 1, sym, ts, ts, 1e300, 5.0, 1e301, 7.0, 0.0, 0.0, 0, 0],            # absurd prices
        [1, 2, sym, ts, ts, 0.0, 0.0, 0.0, 0.0, 100.0, 2**64 - 1, 1, 0],        # uint64-max size
    ]
    for b in bad:
        svc.pub.send_multipart([sym.encode(), msgpack.packb(b)])
    # then valid ticks of the same instrument: every one scored
    valid = [i + 12 * k for k in range(10)]
    for j in valid:
        svc.pub.send_multipart([sym.encode(), tick(j, SYMBOLS)])
    svc.next_i = valid[-1] + 12
    got = []
    deadline = time.monotonic() + 20
    while len(got) < len(valid) and time.monotonic() < deadline:
        if svc.sub.poll(200):
            got.append(msgpack.unpackb(svc.sub.recv_multipart()[1]))
    after = svc.status()["rejected_by_reason"]
    assert [g[3] for g in got] == [BASE_NS + j * 1_000 for j in valid]
    assert after.get("implausible_time", 0) - before.get("implausible_time", 0) == 2
    assert after.get("absurd_value", 0) - before.get("absurd_value", 0) == 2
    assert after.get("time_backwards", 0) == before.get("time_backwards", 0)


def test_the_aeron_driver_dying_stops_the_service_cleanly_with_a_summary(tmp_path):
    """An external media driver killed under the service: a message, a summary, exit 1 (no signal)."""
    import subprocess
    import sys

    from tests.conftest import ROOT, _aeron_dir

    d = _aeron_dir()
    drv = subprocess.Popen([sys.executable, "-c", "import pyaeron, sys, time\n"
                            f"d = pyaeron.MediaDriver(dir={d!r})\nprint('up', flush=True)\ntime.sleep(600)"],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True)
    svc = None
    try:
        assert drv.stdout.readline().strip() == "up"
        svc = Svc(tmp_path, '[engine]\npin = "none"\n[sources.aeron]\nchannel = "aeron:ipc"\n'
                  f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n'
                  f'[aeron]\nembedded = false\ndir = "{d}"\ndriver_timeout_ms = 1500\n')
        drv.kill()
        drv.wait(timeout=10)
        assert svc.proc.wait(timeout=60) == 1  # a failure for the supervisor (restart), not a crash
        s = svc.summary()
        assert s["stop_reason"] == "aeron driver lost"
        assert "the Aeron media driver is gone" in svc.log.read_text()
    finally:
        if drv.poll() is None:
            drv.kill()
        if svc is not None:
            svc.stop()


@pytest.fixture(scope="module")
def aeron_fuzz_service(tmp_path_factory):
    pyaeron = pytest.importorskip("pyaeron")
    from tests.conftest import _aeron_dir

    tmp = tmp_path_factory.mktemp("aeronfuzz")
    d = _aeron_dir()
    svc = Svc(tmp, '[engine]\npin = "none"\nidle = "backoff"\n[sources.aeron]\nchannel = "aeron:ipc"\n'
              f'[sinks.zmq]\nendpoint = "ipc://{tmp}/s.ipc"\n[aeron]\ndir = "{d}"\n')
    client = pyaeron.Aeron(context=pyaeron.Context(dir=d, error_handler=lambda code, msg: None))
    pub = client.add_exclusive_publication("aeron:ipc", 1001)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(f"ipc://{tmp}/s.ipc")
    svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1, 10)
    deadline = time.monotonic() + 10
    while not pub.is_connected:
        assert time.monotonic() < deadline, "the service's Aeron subscription never connected"
        time.sleep(0.01)
    svc.pub, svc.sub, svc.next_i = pub, sub, 60_000_000
    try:
        yield svc
    finally:
        sub.close(0)
        ctx.term()
        client.close()
        svc.stop()


def _offer(pub, payload: bytes) -> None:
    deadline = time.monotonic() + 10
    while True:
        r = pub.offer(payload)
        if r is True or (isinstance(r, int) and not isinstance(r, bool) and r > 0):
            return
        assert time.monotonic() < deadline, f"offer kept failing: {r}"
        time.sleep(0.0005)


_payloads = st.one_of(
    st.binary(max_size=3_000),  # arbitrary bytes, some longer than one IPC fragment
    st.builds(msgpack.packb, st.one_of(
        st.lists(st.one_of(_ints, st.floats(), st.text(max_size=5), st.none()), max_size=16),
        st.dictionaries(st.text(max_size=3), _ints, max_size=3), _ints)),
)


@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(_payloads, min_size=1, max_size=20), seed=st.integers(0, 2**16))
def test_fuzzed_aeron_messages_among_valid_ticks_every_valid_tick_scored_exactly_once(
        aeron_fuzz_service, garbage, seed):
    svc = aeron_fuzz_service
    before = svc.status()
    valid = 30
    order = [("v", k) for k in range(valid)]
    rng = random.Random(seed)
    for g in garbage:
        order.insert(rng.randint(0, len(order)), ("g", g))
    first = svc.next_i
    for kind, item in order:
        _offer(svc.pub, tick(first + 4 * item, SYMBOLS) if kind == "v" else item)
    svc.next_i = first + 4 * valid
    got = []
    deadline = time.monotonic() + 20
    while len(got) < valid and time.monotonic() < deadline:
        if svc.sub.poll(200):
            got.append(msgpack.unpackb(svc.sub.recv_multipart()[1]))
    time.sleep(0.2)
    while svc.sub.poll(100):
        got.append(msgpack.unpackb(svc.sub.recv_multipart()[1]))
    after = svc.status()
    assert after["state"] == "running" and after["errors"] == before["errors"]
    assert sorted(g[3] for g in got) == sorted(BASE_NS + (first + 4 * k) * 1_000 for k in range(valid))
    delta_in = after["ticks_in"] - before["ticks_in"]
    delta_msgs = after["messages_received"] - before["messages_received"]
    assert delta_in == delta_msgs == valid + len(garbage)


def test_subscriber_and_publisher_killed_mid_stream_and_replaced(tmp_path):
    """SIGKILL of a subscriber and of a publisher mid-stream: the service keeps scoring; a new
    subscriber gets a contiguous run of seqs from when it joined, a new publisher is scored."""
    svc = Svc(tmp_path, '[engine]\npin = "none"\n'
              f'[sources.zmq]\nendpoint = "ipc://{tmp_path}/t.ipc"\n'
              f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n')
    sub1 = sub2 = pub1 = pub2 = None
    try:
        sub1 = _client("subscribe", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/s.ipc",
                                     "out": str(tmp_path / "sub1.json")}, tmp_path, "sub1")
        svc.wait_for(lambda s: s["sinks"]["zmq"]["subscribers"] >= 1, 10)
        pub1 = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/t.ipc", "n": 400_000,
                                   "first": 10, "rate": 20_000}, tmp_path, "pub1")
        svc.wait_for(lambda s: s["scores_out"] > 5_000, 30)
        sub1.kill()
        sub1.wait()
        sub2 = _client("subscribe", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/s.ipc", "idle_s": 3,
                                     "out": str(tmp_path / "sub2.json")}, tmp_path, "sub2")
        n0 = svc.status()["scores_out"]
        svc.wait_for(lambda s: s["scores_out"] > n0 + 5_000, 30)
        pub1.kill()
        pub1.wait()
        pub2 = _client("publish", {"via": "zmq", "endpoint": f"ipc://{tmp_path}/t.ipc", "n": 2_000,
                                   "first": 10_000_000}, tmp_path, "pub2")
        _finish(pub2)
        _finish(sub2)
        st_ = svc.status()
    finally:
        _kill_all(sub1, sub2, pub1, pub2)
        svc.stop()
    rep = json.loads((tmp_path / "sub2.json").read_text())
    assert rep["seqs_sorted_contiguous"] and rep["count"] >= 2_000 + 5_000, rep["count"]
    assert st_["state"] == "running" and st_["errors"] == 0
    assert st_["ticks_in"] == st_["messages_received"] == st_["scores_out"] + st_["rejected"]


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded", "external"])
def test_truncating_the_aeron_cnc_file_stops_the_service_with_a_summary(tmp_path, embedded):
    """Defect 10: cnc.dat truncated under the service used to kill it with SIGBUS and no summary."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, _aeron_dir

    d = _aeron_dir()
    drv = svc = None
    try:
        if not embedded:
            drv = subprocess.Popen([sys.executable, "-c", "import pyaeron, time\n"
                                    f"d = pyaeron.MediaDriver(dir={d!r})\nprint('up', flush=True)\n"
                                    "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert drv.stdout.readline().strip() == "up"
        svc = Svc(tmp_path, '[engine]\npin = "none"\n[sources.aeron]\nchannel = "aeron:ipc"\n'
                  f'[sinks.zmq]\nendpoint = "ipc://{tmp_path}/s.ipc"\n'
                  f'[aeron]\nembedded = {"true" if embedded else "false"}\ndir = "{d}"\n')
        os.truncate(f"{d}/cnc.dat", 0)
        assert svc.proc.wait(timeout=60) == 1  # not -SIGBUS
        s = svc.summary()
        assert s["stop_reason"] == "aeron driver files truncated (SIGBUS)"
        assert "files were truncated" in svc.log.read_text()
    finally:
        if drv is not None and drv.poll() is None:
            drv.kill()
        if svc is not None:
            svc.stop()
