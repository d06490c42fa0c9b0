"""ZeroMQ score publisher (sink) for the hot path.

The socket is an **XPUB** (wire-compatible with PUB: any SUB connects to it).
With ``drop_policy="count"`` (the replay's) ``ZMQ_XPUB_NODROP`` is set, so when a
subscriber's queue is full (``sndhwm``) the non-blocking send fails with
``EAGAIN`` and the message is *counted* as a drop instead of being silently
discarded or blocking the loop; but then one slow subscriber costs every
subscriber that message.  With ``"per-subscriber"`` (the service's default)
libzmq drops for the full subscriber alone; it sees the loss as a ``seq`` gap.  XPUB also
lets the publisher see subscriptions, so a replay can wait for its subscribers
before it starts.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import zmq

__all__ = ["ZmqPublisher", "DEFAULT_PUBLISH_ENDPOINT", "raw_send", "ensure_ipc_free"]

#: Default score endpoint of ``tickscore replay``: an ipc socket of its own, apart from the
#: service's (``ipc:///tmp/tickscore-scores.ipc``), so a replay never takes a service's place.
DEFAULT_PUBLISH_ENDPOINT = "ipc:///tmp/tickscore-replay-scores.ipc"


def ensure_ipc_free(endpoint: str) -> None:
    """Raise OSError if ``endpoint`` is an ``ipc://`` path that a live process serves.

    libzmq binds an ipc path by unlinking whatever socket file is there: a second
    process would silently take the path over and the first one's clients would
    receive nothing, with neither side saying a word.  A socket file nobody
    listens on (left by a killed process) is fine to take.
    """
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@") or not os.path.exists(path):
        return  # (abstract sockets fail to bind by themselves when taken)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return  # refused / not a socket: nobody serves it
    finally:
        probe.close()
    raise OSError(
        f"{endpoint} is served by a running process (another tickscore replay or serve?); binding "
        "it would take the path over and that process's subscribers would receive nothing. Stop "
        "it, or choose another endpoint"
    )


def raw_send(sock: zmq.Socket):
    """Return ``sock``'s send method without pyzmq's Python-level wrapper.

    ``zmq.Socket.send`` (pyzmq's "sugar" layer) is a Python function that checks
    ``routing_id``/``group`` (SERVER and RADIO sockets only) and then calls the
    Cython ``zmq.backend.Socket.send``; that layer alone costs ~0.35 µs per frame
    here, 0.7 µs of a two-frame publish.  The Cython method has the same
    signature and semantics (``send(data, flags=0, copy=True, track=False)``).
    Falls back to the normal method where the backend class is not available.
    """
    base = getattr(zmq.backend, "Socket", None)
    fn = getattr(base, "send", None)
    if fn is None or not isinstance(sock, base):
        return sock.send
    return fn.__get__(sock)


class ZmqPublisher:
    """Publish ``[topic, payload]`` on an XPUB socket without ever blocking.

    Parameters
    ----------
    endpoint : str
        ``ipc://...`` or ``tcp://host:port`` to bind (``connect=True`` to connect).
    sndhwm : int
        Per-subscriber queue bound, in messages; beyond it sends are counted drops.
    io_cpu : int or None
        Core for ZeroMQ's I/O thread (``ZMQ_THREAD_AFFINITY_CPU_ADD``), keeping it
        off the hot core.  Must be set before the first socket is created.
    drop_policy : str
        ``"count"`` (``ZMQ_XPUB_NODROP``: a full subscriber queue refuses the send for
        every subscriber and the score is counted in ``drops``; the replay's default)
        or ``"per-subscriber"`` (libzmq drops for the full subscriber only, which sees a
        ``seq`` gap; ``drops`` stays 0; the service's default).
    configure : callable, optional
        ``configure(sock)`` before bind/connect (CURVE server keys).
    """

    name = "zmq"
    #: the native loop publishes on this socket with libzmq's zmq_send (engine.native_loop)
    native = "zmq"

    def __init__(
        self,
        endpoint: str = DEFAULT_PUBLISH_ENDPOINT,
        *,
        sndhwm: int = 100_000,
        io_cpu: int | None = 0,
        connect: bool = False,
        linger_ms: int = 2_000,
        drop_policy: str = "count",
        configure=None,
    ) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context(io_threads=1)
        if io_cpu is not None:
            try:
                self.ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, io_cpu)
            except (zmq.ZMQError, AttributeError):
                pass  # older libzmq: affinity is inherited; reported nowhere critical
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        if drop_policy not in ("count", "per-subscriber"):
            raise ValueError(f"drop_policy {drop_policy!r}: choose count or per-subscriber")
        self.drop_policy = drop_policy
        # "count": a full queue refuses the send (for every subscriber) and it is counted here;
        # "per-subscriber": libzmq drops for the full subscriber only, which sees a seq gap
        self.sock.setsockopt(zmq.XPUB_NODROP, 1 if drop_policy == "count" else 0)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.linger_ms = linger_ms
        #: after :meth:`close`: True if libzmq delivered everything queued before the linger ran
        #: out, False if it ran out (what a subscriber had not taken was discarded), None if unknown
        self.drained: bool | None = None
        #: seconds :meth:`close` took (libzmq sending what was still queued)
        self.close_s = 0.0
        if configure is not None:  # e.g. CURVE server keys (engine.security)
            configure(self.sock)
        try:
            if connect:
                self.sock.connect(endpoint)
            else:
                ensure_ipc_free(endpoint)
                self.sock.bind(endpoint)
        except (zmq.ZMQError, OSError) as exc:
            self.sock.close(0)
            self.ctx.term()
            verb = "connect" if connect else "bind"
            raise OSError(f"cannot {verb} ZeroMQ PUB to {endpoint!r}: {exc}") from exc
        self.sent = 0
        self.drops = 0
        #: sends refused for another reason than a full queue (native loop; the python path raises)
        self.send_errors = 0
        self.subscriptions = 0
        self._send = raw_send(self.sock)  # per tick: skip pyzmq's Python wrapper
        self._flags_more = zmq.SNDMORE | zmq.NOBLOCK
        self._flags_last = zmq.NOBLOCK

    def publish(self, topic: bytes, payload: bytes | bytearray) -> bool:
        """Send one two-frame message; return False (and count a drop) if it would block.

        Allocates: no Python objects beyond pyzmq's own per-send bookkeeping.
        """
        try:
            self._send(topic, self._flags_more)
        except zmq.Again:
            self.drops += 1
            return False
        # Later frames of a multipart message are never refused once the first is queued.
        self._send(payload, self._flags_last)
        self.sent += 1
        return True

    def poll_subscriptions(self) -> int:
        """Drain subscription messages (off the hot path); return the number of subscribers seen."""
        while True:
            try:
                msg = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.subscriptions
            if msg[:1] == b"\x01":
                self.subscriptions += 1
            elif msg[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)

    def wait_for_subscribers(self, n: int, timeout_s: float) -> int:
        """Block until ``n`` subscriptions arrived or ``timeout_s`` passed; return the count."""
        deadline = time.monotonic() + timeout_s
        while self.poll_subscriptions() < n and time.monotonic() < deadline:
            self.sock.poll(50, zmq.POLLIN)
        # A subscription message arrives before the pipe is fully attached on the
        # publisher side; a short grace period avoids losing the first messages.
        time.sleep(0.05)
        return self.poll_subscriptions()

    def close(self, notice=None) -> bool | None:
        """Close the socket; libzmq goes on sending what is still queued for up to ``linger_ms``.

        Returns (and sets) :attr:`drained`: True when the queue emptied in time, False when
        the linger ran out first (libzmq then discards what a subscriber had not taken, and
        does not say how much), None with ``linger_ms`` 0 (discarded at once, if anything
        was queued).  ``notice(text)`` is told once when closing takes more than a second
        (a subscriber slower than the run).
        """
        self.sock.close()
        t0 = time.monotonic()
        term = threading.Thread(target=self.ctx.term, name="tickscore-zmq-close", daemon=True)
        term.start()
        term.join(1.0)
        if term.is_alive() and notice is not None:
            limit = "as long as it takes" if self.linger_ms < 0 else f"up to {self.linger_ms / 1000:g} s"
            notice(f"delivering the Scores still queued for subscribers on {self.endpoint} ({limit})")
        term.join()
        self.close_s = time.monotonic() - t0
        if self.linger_ms == 0:
            self.drained = None
        else:
            self.drained = self.linger_ms < 0 or self.close_s < 0.95 * self.linger_ms / 1000
        return self.drained
