"""Control channel of the service: a ZeroMQ REP socket polled from housekeeping.

Requests are one frame of UTF-8 text (or a JSON object with the same fields);
replies are one frame holding a JSON object with ``"ok": true|false``:

=====================  =====================================================================
request                reply
=====================  =====================================================================
``status``             counters so far: ticks in, scores out, rejected (by reason), drops and
                       back-pressure per sink, model version, latency percentiles (ns) ...
``reload PATH``        the reload ticket (``status`` pending/swapped/rejected, ``message``,
                       ``swap_seq``, ``version``)
``stop``               graceful stop: stop reading, score what was received, flush the sinks;
                       the reply (sent once that is done) is the final report
``{"command": "reload", "path": "m.onnx"}``   JSON form of the same requests
=====================  =====================================================================

The service polls the socket without blocking from the agent's housekeeping
(every few thousand idle duty cycles, i.e. within milliseconds), never on the
per-tick path.  :func:`request` is the client side (``tickscore control``).

Any client gets an answer or nothing, never a broken socket: a request is one
frame of at most :data:`MAX_REQUEST_BYTES` (libzmq drops a longer one and the
connection that sent it: no large allocation, nothing parsed); a multi-frame
request, bad UTF-8, bad or deeply nested JSON, an unknown command or a command
with words it does not take (``stop now please``) is answered with
``"ok": false`` and the reason; a socket error re-creates the socket.  Nothing
the control channel meets raises into the agent.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import zmq

from engine.security import apply_client
from engine.zmq_io import ensure_ipc_free

__all__ = ["ControlServer", "DEFER", "parse_request", "request", "status_or_none", "ControlError"]

#: Returned by a handler to answer later with :meth:`ControlServer.reply_deferred`.
DEFER = object()

COMMANDS = ("status", "reload", "stop")
#: Largest request accepted (bytes); larger messages are dropped by libzmq (``ZMQ_MAXMSGSIZE``).
MAX_REQUEST_BYTES = 64 * 1024
_JSON_KEYS = {"command", "path", "arg"}


class ControlError(RuntimeError):
    """The control endpoint did not answer (service not running, wrong endpoint, timeout)."""


def parse_request(msg: bytes) -> tuple[str, str | None]:
    """Return ``(command, argument)`` of a request; raise ValueError with a message for the reply."""
    try:
        text = msg.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("request is not UTF-8 text") from None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ValueError(f"request is not valid JSON: {why}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
            raise ValueError('JSON request must be an object with a "command" string')
        extra = sorted(set(obj) - _JSON_KEYS)
        if extra:
            raise ValueError(f"unknown request fields {extra}; fields: command, path")
        cmd = obj["command"].strip().lower()
        arg = obj.get("path", obj.get("arg"))
        arg = None if arg is None else str(arg)
    else:
        cmd, _, rest = text.partition(" ")
        cmd = cmd.lower()
        arg = rest.strip() or None
    if cmd not in COMMANDS:
        raise ValueError(f"unknown command {cmd[:40]!r}; commands: {', '.join(COMMANDS)}")
    if cmd != "reload" and arg is not None:
        raise ValueError(f"{cmd} takes no argument (got {arg[:40]!r})")
    if cmd == "reload" and not arg:
        raise ValueError("reload needs a model path: 'reload /path/to/model.onnx'")
    return cmd, arg


class ControlServer:
    """REP socket answering control requests, polled without blocking.

    Parameters
    ----------
    ctx : zmq.Context
    endpoint : str
        Where to bind (default config: ``tcp://127.0.0.1:5590``).
    handler : callable
        ``handler(command, arg) -> dict | DEFER``; the dict is sent as JSON.
    configure : callable, optional
        ``configure(sock)`` before every bind (CURVE server keys, :mod:`engine.security`).
    audit : callable, optional
        ``audit(who, command, arg, reply)`` after every request (``reply`` None = deferred);
        ``who`` is the client's CURVE public key (``curve:KEY``) when CURVE is on, else its
        peer address.
    """

    def __init__(self, ctx, endpoint: str, handler: Callable[[str, str | None], object], *,
                 configure: Callable | None = None, audit: Callable | None = None) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.handler = handler
        self.configure = configure
        self.audit = audit
        self.ctx = ctx
        ensure_ipc_free(endpoint)
        self.sock = self._bind()
        self.deferred = False
        self.handled = 0
        #: requests answered with ``"ok": false`` because they were malformed
        self.bad_requests = 0
        #: socket errors recovered by re-creating the socket
        self.socket_errors = 0

    def _bind(self):
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if self.configure is not None:
            self.configure(sock)
        try:
            sock.bind(self.endpoint)
        except (zmq.ZMQError, OSError) as exc:
            sock.close(0)
            raise OSError(f"cannot bind the control socket to {self.endpoint!r}: {exc}") from exc
        return sock

    def _reset(self) -> None:
        """Re-create the socket after an error left it unusable (a half-done exchange)."""
        self.socket_errors += 1
        self.deferred = False
        try:
            self.sock.close(0)
        except zmq.ZMQError:
            pass
        self.sock = None
        self._rebind()

    def _rebind(self) -> None:
        try:
            self.sock = self._bind()
        except OSError:  # the address is taken meanwhile: try again at the next poll
            self.sock = None

    def poll(self) -> int:
        """Answer at most one waiting request; return 1 if one was handled, else 0.  Never raises."""
        if self.deferred:
            return 0
        if self.sock is None:
            self._rebind()
            if self.sock is None:
                return 0
        try:
            if not self.sock.get(zmq.EVENTS) & zmq.POLLIN:
                return 0
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return 0
        except zmq.ZMQError:
            self._reset()
            return 0
        self.handled += 1
        who = _who(frames[0])
        try:
            if len(frames) != 1:
                raise ValueError(f"a request is one frame of text or JSON, got {len(frames)} frames")
            cmd, arg = parse_request(frames[0].bytes)
        except ValueError as exc:
            self.bad_requests += 1
            reply = {"ok": False, "error": str(exc)}
            self._audit(who, "bad_request", None, reply)
            self._send(reply)
            return 1
        try:
            reply = self.handler(cmd, arg)
        except Exception as exc:  # noqa: BLE001 - a failing command must not kill the loop
            reply = {"ok": False, "command": cmd, "error": f"{type(exc).__name__}: {exc}"}
        if reply is DEFER:
            self.deferred = True
            self._audit(who, cmd, arg, None)
        else:
            self._audit(who, cmd, arg, reply)
            self._send(reply)
        return 1

    def _audit(self, who: str, cmd: str, arg, reply) -> None:
        if self.audit is not None:
            try:
                self.audit(who, cmd, arg, reply)
            except Exception:  # noqa: BLE001 - an audit line must never break the channel
                pass

    def _send(self, obj) -> None:
        try:
            self.sock.send(json.dumps(obj, default=str).encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            self._reset()

    def reply_deferred(self, obj) -> None:
        """Send the answer of a deferred request (e.g. the final report of ``stop``)."""
        if self.deferred:
            self._send(obj)
            self.deferred = False

    def close(self) -> None:
        """Close the socket (a reply just sent is flushed for up to 1 s)."""
        if self.sock is not None:
            self.sock.close()


def _who(frame) -> str:
    """Return the sender of a request: ``curve:KEY`` (CURVE user id) or its peer address."""
    for prop, prefix in (("User-Id", "curve:"), ("Peer-Address", "")):
        try:
            v = frame.get(prop)
        except (zmq.ZMQError, AttributeError):
            continue
        if v and v != "anonymous":
            return prefix + v
    return "local"


def request(endpoint: str, command: str, timeout_s: float = 5.0, keys=None) -> dict:
    """Send one control request and return the decoded JSON reply.

    Raises
    ------
    ControlError
        No reply within ``timeout_s`` (service not running, wrong endpoint, or refused: a
        CURVE service answers only clients with an authorized key, ``keys``).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    apply_client(sock, keys)
    try:
        sock.connect(endpoint)
        sock.send(command.encode())
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(
                f"no reply from the tickscore control endpoint {endpoint!r} within {timeout_s:g}s"
            )
        return json.loads(sock.recv().decode())
    finally:
        sock.close(0)


def status_or_none(endpoint: str | None, timeout_s: float = 5.0, keys=None) -> dict | None:
    """Return the service's ``status`` reply, or None when ``endpoint`` is empty or nothing answers."""
    if not endpoint:
        return None
    try:
        return request(endpoint, "status", timeout_s, keys)
    except ControlError:
        return None
