"""libzmq bound for compiled code (issue 16): real sockets, clear errors at bind time."""

import errno
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq

from engine.native_zmq import REQUIRED_SYMBOLS, NativeBindError, bind_libzmq, make_sender


@pytest.fixture(scope="module")
def sender():
    return make_sender(bind_libzmq())


@contextmanager
def _pub_sub(endpoint: str, *, pub_opts: dict, sub_opts: dict):
    """An XPUB bound to ``endpoint`` and a SUB of everything connected to it, once subscribed."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    for opt, v in pub_opts.items():
        pub.setsockopt(opt, v)
    pub.bind(endpoint)
    sub = ctx.socket(zmq.SUB)
    for opt, v in sub_opts.items():
        sub.setsockopt(opt, v)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        assert pub.poll(5000) and pub.recv() == b"\x01"  # the subscription
        yield pub, sub
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def test_compiled_sends_arrive_byte_identical_and_in_order_over_ipc(sender, tmp_path):
    endpoint = f"ipc://{tmp_path}/n.ipc"
    with _pub_sub(endpoint, pub_opts={zmq.SNDHWM: 0}, sub_opts={zmq.RCVHWM: 0}) as (pub, sub):
        time.sleep(0.05)
        rng = np.random.default_rng(0)
        sent = []
        buf = np.zeros(512, np.uint8)
        for i in range(2000):
            n = int(rng.integers(0, 300))
            buf[:n] = rng.integers(0, 256, n, dtype=np.uint8)
            topic = np.frombuffer(f"S{i % 7}".encode(), np.uint8)
            assert sender(pub.underlying, topic, len(topic), buf, n) == 0
            sent.append([bytes(topic), bytes(buf[:n])])
        got = []
        while len(got) < len(sent) and sub.poll(2000):
            got.append(sub.recv_multipart())
        assert got == sent


def test_a_full_queue_returns_eagain_never_blocks(sender, tmp_path):
    with _pub_sub(f"ipc://{tmp_path}/f.ipc", pub_opts={zmq.SNDHWM: 2, zmq.XPUB_NODROP: 1},
                  sub_opts={zmq.RCVHWM: 2, zmq.RCVBUF: 1024}) as (pub, sub):
        topic = np.frombuffer(b"T", np.uint8)
        payload = np.zeros(4096, np.uint8)
        rcs = [sender(pub.underlying, topic, 1, payload, 4096) for _ in range(20_000)]
        assert errno.EAGAIN in rcs  # the sub never reads: sends are refused, counted by the caller
        assert set(rcs) <= {0, errno.EAGAIN}


def test_bad_lengths_are_refused_in_the_kernel(sender, tmp_path):
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        t = np.frombuffer(b"AB", np.uint8)
        assert sender(pub.underlying, t, 3, t, 1) == -1  # longer than the topic array
        assert sender(pub.underlying, t, 1, t, -1) == -1
    finally:
        pub.close(0)
        ctx.term()


def test_a_missing_symbol_or_library_is_a_clear_error_at_bind_time(tmp_path):
    with pytest.raises(NativeBindError, match="lacks the symbol.*zmq_no_such_symbol"):
        bind_libzmq(symbols=(*REQUIRED_SYMBOLS, "zmq_no_such_symbol"))
    with pytest.raises(NativeBindError, match="cannot load libzmq"):
        bind_libzmq(str(tmp_path / "libzmq-nothere.so"))
    copy = tmp_path / "libzmq-copy.so"  # the same bytes, another file: another library instance
    copy.write_bytes(Path(bind_libzmq().path).read_bytes())
    with pytest.raises(NativeBindError, match="not the library pyzmq loaded"):
        bind_libzmq(str(copy))
    lib = bind_libzmq()
    assert lib.version == tuple(int(x) for x in zmq.zmq_version().split("."))
