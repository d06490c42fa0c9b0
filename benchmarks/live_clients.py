"""Helpers shared by the live-service benchmarks (bench_ops.py, bench_soak.py)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_core0() -> None:
    """Keep a client process off the service's hot core (1)."""
    try:
        os.sched_setaffinity(0, {0})
    except (AttributeError, OSError):
        pass


def curve_client(sock, keys) -> None:
    """Make ``sock`` a CURVE client: ``keys`` = [public, secret, server public] (Z85 text) or None."""
    if keys:
        pub, sec, srv = (k.encode() for k in keys)
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, srv


def connect_publisher(endpoint: str, keys=None, timeout_ms: int = 30_000):
    """Return ``(ctx, sock)``: an XPUB connected to the service's tick SUB, once it subscribed."""
    import time

    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 5000)
    curve_client(sock, keys)
    sock.connect(endpoint)
    if not sock.poll(timeout_ms):
        raise SystemExit("no service subscribed")
    sock.recv()
    time.sleep(0.2)  # the subscription is seen before the pipe is fully attached
    return ctx, sock


def connect_subscriber(endpoint: str, keys=None):
    """Return ``(ctx, sock)``: a SUB of every score, unbounded queue."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    curve_client(sock, keys)
    sock.connect(endpoint)
    return ctx, sock
