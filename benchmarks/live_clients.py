"""Helpers shared by the live-service benchmarks (bench_ops.py, bench_soak.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.security import ClientKeys, apply_client

ROOT = Path(__file__).resolve().parents[1]


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
    """Make ``sock`` a CURVE client: ``keys`` = ``ClientKeys.as_text()`` or None."""
    apply_client(sock, ClientKeys.from_text(keys))


def start_service(cfg: Path, log_path: Path, timeout_s: float = 90.0) -> subprocess.Popen:
    """Start ``tickscore serve --config cfg`` (stderr to ``log_path``); return once it logged ``ready:``."""
    with open(log_path, "w") as log:  # the child writes to its own copy of the descriptor
        svc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout_s
    while "ready:" not in log_path.read_text():
        if svc.poll() is not None or time.monotonic() > deadline:
            svc.kill()
            raise RuntimeError(log_path.read_text())
        time.sleep(0.2)
    return svc


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
