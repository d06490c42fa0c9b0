"""Control requests are parsed exactly, and the control socket answers any client (no service needed)."""

from __future__ import annotations

import json
import threading

import pytest
import zmq

from engine.control import MAX_REQUEST_BYTES, ControlServer, parse_request, request


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (b"status", ("status", None)),
        (b"  STOP ", ("stop", None)),
        (b"reload /m/x.onnx", ("reload", "/m/x.onnx")),
        (b'{"command": "reload", "path": "/m/x.onnx"}', ("reload", "/m/x.onnx")),
    ],
)
def test_valid_requests_parse(msg, expected):
    assert parse_request(msg) == expected


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (b"stop now please", "stop takes no argument"),
        (b"status x", "status takes no argument"),
        (b"reload", "needs a model path"),
        (b"explode", "unknown command"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"command": "status", "x": ' + b"[" * 100_000, "nested too deeply"),
        (b'{"command": "stop", "extra": 1}', "unknown request fields"),
        (b"[1, 2]", "unknown command"),
        (b'{"command": 3}', '"command" string'),
    ],
)
def test_bad_requests_are_refused_with_the_reason(msg, why):
    with pytest.raises(ValueError, match=why):
        parse_request(msg)


def test_server_answers_bad_frames_and_recovers_from_any_client(tmp_path):
    ctx = zmq.Context()
    calls = []
    srv = ControlServer(ctx, f"ipc://{tmp_path}/ctl.ipc", lambda c, a: calls.append((c, a)) or {"ok": True})
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(srv.endpoint)

    def serve_until(pred, n=2_000):
        for _ in range(n):
            srv.poll()
            if pred():
                return
        raise AssertionError("no answer")

    try:
        for _ in range(50):  # multi-frame garbage: each answered, the socket stays usable
            dealer.send_multipart([b"", b"status", b"x"])
            serve_until(lambda: dealer.poll(0))
            assert "one frame" in json.loads(dealer.recv_multipart()[1])["error"]
        dealer.send_multipart([b"", b"x" * (MAX_REQUEST_BYTES + 1)])  # dropped by libzmq, never parsed
        dealer.send_multipart([b"", b"status"])  # the same connection was dropped: this one is lost too
        for _ in range(200):
            srv.poll()
        assert srv.bad_requests == 50 and calls == []
        got = {}
        t = threading.Thread(target=lambda: got.update(request(srv.endpoint, "status", timeout_s=10)))
        t.start()
        serve_until(lambda: not t.is_alive(), n=10_000_000)
        assert got == {"ok": True} and calls == [("status", None)]
    finally:
        dealer.close(0)
        srv.close()
        ctx.term()


def test_an_oversized_tick_frame_is_dropped_by_libzmq_never_decoded(tmp_path):
    """A 10 MB frame at the tick socket is never delivered (no allocation of it, nothing to parse)."""
    import time

    from engine.schema import KIND_QUOTE, REJECT_MALFORMED
    from engine.sources import MAX_TICK_FRAME_BYTES, ZmqTickSource
    from engine.wire import Tick, encode_tick

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/ticks.ipc"
    pub.bind(endpoint)
    src = ZmqTickSource(ctx, endpoint, ["ESZ6"], bind=False)

    def drain(seconds):
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            i = src.poll()
            if i >= 0:
                got.append(int(src.ticks[i]["ts_event_ns"]))
        return got

    try:
        assert pub.poll(10_000), "the tick source did not subscribe"
        pub.recv()
        pub.send_multipart([b"ESZ6", encode_tick(Tick(KIND_QUOTE, "ESZ6", 7, 7, 99.0, 1.0, 101.0, 1.0))])
        assert drain(2.0) == [7]  # the pipe works
        pub.send_multipart([b"ESZ6", b"\x00" * (160 * MAX_TICK_FRAME_BYTES)])
        assert drain(2.0) == []
        assert src.received == 1 and src.counters[REJECT_MALFORMED] == 0  # never reached the decoder
    finally:
        pub.close(0)
        src.close()
        ctx.term()


def test_a_reset_whose_rebind_fails_retries_at_the_next_poll(tmp_path, monkeypatch):
    ctx = zmq.Context()
    srv = ControlServer(ctx, f"ipc://{tmp_path}/ctl.ipc", lambda c, a: {"ok": True, "c": c})
    real_bind = srv._bind
    try:
        def taken():
            raise OSError("address in use")

        monkeypatch.setattr(srv, "_bind", taken)
        srv._reset()
        assert srv.sock is None and srv.poll() == 0  # still nothing bound, and no exception
        monkeypatch.setattr(srv, "_bind", real_bind)
        got = {}
        t = threading.Thread(target=lambda: got.update(request(srv.endpoint, "status", timeout_s=10)))
        t.start()
        while t.is_alive():
            srv.poll()
        assert got == {"ok": True, "c": "status"} and srv.socket_errors == 1
    finally:
        srv.close()
        ctx.term()
