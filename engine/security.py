"""ZeroMQ CURVE for the service and its client tools: keys, server sockets, refusals.

Everything here is pyzmq's: key pairs are written and read by :mod:`zmq.auth`
(``NAME.key`` public, ``NAME.key_secret`` secret, Z85 in ZPL text), the handshake
and encryption are libzmq's CURVE (libsodium bundled with pyzmq), and clients
are checked by :class:`zmq.auth.thread.ThreadAuthenticator` (a ZAP handler on a
helper thread, never the hot one) against the public keys in an
authorized-keys directory.

* :func:`keygen` writes a key pair (secret file mode 0600).
* :class:`CurveServer` makes a socket a CURVE server with the service's secret
  key and a ZAP domain naming it (``ticks``, ``scores``, ``control``), runs one
  authenticator per ZeroMQ context, and counts every refused handshake per
  domain: a client with no key (or plain ZeroMQ) fails the mechanism check, a
  client that does not know the server key fails decryption, an unknown key is
  refused by ZAP.  Counts come from libzmq's socket monitor
  (``HANDSHAKE_FAILED_*`` events) read on a helper thread; refusals are logged
  with the key or the peer address.
* :func:`client_keys` / :func:`apply_client` are the client side (``subscribe``,
  ``publish``, ``control``, ``replay --via``).

A refused client gets nothing: no subscription reaches the publisher, no tick
reaches the source, no request reaches the control socket.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

__all__ = ["keygen", "load_key_pair", "load_public_key", "ClientKeys", "client_keys", "apply_client",
           "CurveServer", "SecurityError", "DOMAINS"]

#: ZAP domains: one per service socket, so refusals are counted per socket.
DOMAINS = ("ticks", "scores", "control")

_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
}
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # fmt: skip


class SecurityError(ValueError):
    """A key file or key directory is missing or unreadable (message names it)."""


def keygen(out: str | os.PathLike) -> tuple[Path, Path]:
    """Write a CURVE key pair ``OUT.key`` (public) and ``OUT.key_secret`` (secret, 0600).

    ``out`` is ``DIR/NAME``; DIR is created (0700) if missing.  An existing pair is
    never overwritten.  Returns ``(public_file, secret_file)``.
    """
    out = Path(out)
    name = out.name
    if not name or name in (".", ".."):
        raise SecurityError(f"--out {str(out)!r}: give DIR/NAME (the files are NAME.key and NAME.key_secret)")
    d = out.parent
    pub, sec = d / f"{name}.key", d / f"{name}.key_secret"
    for f in (pub, sec):
        if f.exists():
            raise SecurityError(f"{f} exists: remove it first or choose another name (keys are never "
                                "overwritten)")  # fmt: skip
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        pub_s, sec_s = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(sec_s, 0o600)
    os.chmod(pub_s, 0o644)
    return Path(pub_s), Path(sec_s)


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    p = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{p}: not a readable CURVE key file (tickscore keygen writes them): "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    if public is None or len(public) != 40:
        raise SecurityError(f"{p}: no public-key line in this key file")
    return public, secret


def load_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """Return ``(public, secret)`` (Z85) of a ``NAME.key_secret`` file."""
    public, secret = _load(path)
    if not secret:
        raise SecurityError(f"{path}: a public key file; a secret key file (NAME.key_secret) is needed here")
    if (os.stat(Path(path).expanduser()).st_mode & 0o077) != 0:
        raise SecurityError(f"{path}: the secret key file is readable by group/others; chmod 600 it")
    return public, secret


def load_public_key(path: str | os.PathLike) -> bytes:
    """Return the public key (Z85) of a ``NAME.key`` (or ``NAME.key_secret``) file."""
    return _load(path)[0]


class ClientKeys(NamedTuple):
    """A client's key pair and the server's public key (all Z85)."""

    public: bytes
    secret: bytes
    server_public: bytes

    def as_text(self) -> list[str]:
        """Return ``[public, secret, server public]`` as text (for a JSON spec of a worker process)."""
        return [k.decode() for k in self]

    @classmethod
    def from_text(cls, keys) -> ClientKeys | None:
        """Return the keys of :meth:`as_text` (``None``/empty: no CURVE)."""
        return cls(*(k.encode() for k in keys)) if keys else None


def client_keys(client_key: str | None, server_key: str | None) -> ClientKeys | None:
    """Return the client's CURVE keys from its secret file and the server's public key file.

    Both or neither: one without the other is an error.  ``None`` = plain ZeroMQ.
    """
    if not client_key and not server_key:
        return None
    if not (client_key and server_key):
        missing = ("--server-key (the service's NAME.key)" if client_key
                   else "--client-key (your NAME.key_secret)")
        raise SecurityError(f"CURVE needs both keys: {missing} is missing")
    public, secret = load_key_pair(client_key)
    return ClientKeys(public, secret, load_public_key(server_key))


def apply_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make ``sock`` a CURVE client with ``keys`` (before connect); no-op for ``None``."""
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


class _Authenticator(ThreadAuthenticator):
    """ZAP handler that logs who was refused (key or address) before answering."""

    def __init__(self, ctx, log: Callable[[str, dict], None]) -> None:
        super().__init__(ctx)
        self._log_refusal = log
        self._current: tuple[str, str, str] = ("", "", "")

    async def handle_zap_message(self, msg: list[bytes]) -> None:  # noqa: D401 - pyzmq's hook
        if len(msg) >= 7 and msg[5] == b"CURVE":
            key = zmq.utils.z85.encode(msg[6]).decode() if len(msg[6]) == 32 else "?"
            self._current = (msg[2].decode("utf-8", "replace"), msg[3].decode("utf-8", "replace"), key)
        elif len(msg) >= 6:
            self._current = (msg[2].decode("utf-8", "replace"), msg[3].decode("utf-8", "replace"), "")
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous"):
        if status_code != b"200":
            domain, address, key = self._current
            self._log_refusal("refused", {"socket": domain, "peer": address, "client_key": key,
                                          "reason": status_text.decode("utf-8", "replace")})
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class CurveServer:
    """CURVE server side of the service: keys, authenticators and refusal counters.

    Parameters
    ----------
    secret_key : str
        The service's ``NAME.key_secret`` file.
    authorized_keys : str
        Directory of the public keys (``*.key``) of the clients allowed to connect.
    log : callable
        ``log(event, fields)`` for refusals (audit lines).
    """

    def __init__(self, secret_key: str, authorized_keys: str,
                 log: Callable[[str, dict], None] | None = None) -> None:  # fmt: skip
        self.public, self.secret = load_key_pair(secret_key)
        d = Path(authorized_keys).expanduser()
        if not d.is_dir():
            raise SecurityError(f"security.authorized_keys = {authorized_keys!r}: not a directory")
        self.authorized_dir = str(d.resolve())
        self.authorized = len(zmq.auth.load_certificates(self.authorized_dir))
        if self.authorized == 0:
            raise SecurityError(f"security.authorized_keys = {authorized_keys!r}: no public key (*.key) "
                                "in it; copy the clients' NAME.key files there")  # fmt: skip
        self.log = log or (lambda event, fields: None)
        self.refused: dict[str, int] = {d: 0 for d in DOMAINS}
        self._auths: dict[int, _Authenticator] = {}
        self._monitors: list[tuple[zmq.Socket, zmq.Socket, str]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ sockets
    def _authenticator(self, ctx: zmq.Context) -> None:
        if id(ctx) in self._auths:
            return
        auth = _Authenticator(ctx, self.log)
        auth.start()
        for domain in DOMAINS:
            auth.configure_curve(domain=domain, location=self.authorized_dir)
        self._auths[id(ctx)] = auth

    def apply(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` a CURVE server of ``domain`` (before bind/connect) and watch its handshakes."""
        self._authenticator(sock.context)
        sock.zap_domain = domain.encode()
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        mon = sock.get_monitor_socket(_MONITOR_EVENTS)
        with self._lock:
            self._monitors.append((sock, mon, domain))
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="tickscore-curve-mon", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        # Wakes only on an event or once a second (each wake takes the GIL from the hot loop briefly).
        mons: list = []
        poller = zmq.Poller()
        while not self._stop.is_set():
            with self._lock:
                if [m for _, m, _ in mons] != [m for _, m, _ in self._monitors]:
                    mons = list(self._monitors)
                    poller = zmq.Poller()
                    for _, mon, _ in mons:
                        poller.register(mon, zmq.POLLIN)
            if not mons:
                self._stop.wait(0.2)
                continue
            try:
                ready = dict(poller.poll(1000))
            except zmq.ZMQError:
                continue
            for _, mon, domain in mons:
                if mon not in ready:
                    continue
                with self._lock:
                    if mon.closed:
                        continue
                    try:
                        ev = recv_monitor_message(mon, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        continue
                kind = _FAILED.get(ev.get("event"))
                if kind is not None:
                    self.refused[domain] = self.refused.get(domain, 0) + 1
                    if kind != "auth":  # ZAP refusals are logged by the authenticator, with the key
                        endpoint = ev.get("endpoint", b"").decode("utf-8", "replace")
                        self.log("refused", {"socket": domain, "endpoint": endpoint,
                                             "reason": f"handshake failed ({kind}): no or wrong CURVE key"})

    @property
    def refused_total(self) -> int:
        """Return the number of refused handshakes on every socket."""
        return int(sum(self.refused.values()))

    def close(self) -> None:
        """Stop the monitor thread and the authenticators (before the contexts are terminated)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            for s, mon, _ in self._monitors:
                try:
                    s.disable_monitor()
                except zmq.ZMQError:
                    pass
                mon.close(0)
            self._monitors = []
        for auth in self._auths.values():
            auth.stop()
        self._auths = {}
