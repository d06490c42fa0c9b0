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
