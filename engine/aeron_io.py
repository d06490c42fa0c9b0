"""Aeron for the service: media-driver lifecycle and the score publisher (sink).

Driver: by default the service embeds the Aeron C media driver
(:class:`pyaeron.MediaDriver`, the driver ``pyaeron.Aeron(embedded=True)``
starts) in a *known* directory, ``/dev/shm/tickscore-aeron-USER`` unless
configured, so other processes on the host (publishers of ticks, subscribers of
scores) join it with ``pyaeron.Aeron(dir=...)``; ``aeron:ipc`` only works
between clients of the same driver.  With ``embedded = false`` the service
connects to a running driver (``aeronmd`` or another process's embedded one) in
the configured directory.

Clients are created with an error handler: without one the Aeron C client
*exits the process* when its driver goes away.  Here the error is counted and
reported, and publications/subscriptions then raise or return NOT_CONNECTED.

Publisher: :class:`AeronPublisher` offers each score once and, on a retryable
result, retries a bounded number of times (``back_pressure_retries`` for
BACK_PRESSURED / ADMIN_ACTION, ``not_connected_retries`` for NOT_CONNECTED);
then the score is a counted drop (after NOT_CONNECTED: counted apart as
``unsent_no_subscriber``, no reader lost it).  Every non-success result is counted by kind.
It never blocks the loop and never raises (a closed publication is counted as
an error and a drop).
"""

from __future__ import annotations

import logging
import os
import threading as _threading
import time

from engine.log import log

__all__ = ["AeronRuntime", "AeronPublisher", "connect_client"]

#: Aeron C client error codes meaning the media driver is gone: AERON_CLIENT_ERROR_DRIVER_TIMEOUT,
#: AERON_CLIENT_ERROR_CLIENT_TIMEOUT, AERON_CLIENT_ERROR_CONDUCTOR_SERVICE_TIMEOUT (pyaeron passes them
#: positive: "error 1000: MediaDriver keepalive: age=2376ms > timeout=2000ms").
_DRIVER_LOST_CODES = (-1000, -1001, -1002, 1000, 1001, 1002)

#: The stream of the runtime client's anchor subscription ("tick" in ASCII; nothing publishes on it).
ANCHOR_STREAM_ID = 0x7469636B


def _pyaeron():
    try:
        import pyaeron  # deferred: loads the Aeron C client, only where Aeron is used
    except ImportError as exc:  # pragma: no cover - pyaeron is a dependency
        raise ImportError("Aeron support needs pyaeron: pip install 'pyaeron>=0.1'") from exc
    return pyaeron


def connect_client(dir: str, *, timeout_ms: int = 10_000, name: str = "tickscore", on_error=None):
    """Return an Aeron client of the driver in ``dir`` that survives the driver going away.

    ``on_error(code, message)`` receives client errors (default: print to stderr).
    Raises OSError with a clear message if no driver answers within ``timeout_ms``.
    """
    pa = _pyaeron()

    def _default(code, message):
        log("aeron", f"client error {code}: {message}", event="aeron_error", level=logging.ERROR)

    handler = on_error or _default
    try:
        ctx = pa.Context(dir=dir, driver_timeout_ms=timeout_ms, client_name=name, error_handler=handler)
        return pa.Aeron(context=ctx)
    except pa.AeronError as exc:
        raise OSError(
            f"cannot connect to an Aeron media driver in {dir!r}: {str(exc).splitlines()[0]}"
        ) from None


def driver_active(dir: str, timeout_ms: int = 1_000) -> bool:
    """Return whether a media driver is running in ``dir`` (its heartbeat is recent)."""
    return bool(_pyaeron().is_driver_active(dir, timeout_ms))


class AeronRuntime:
    """The service's Aeron driver (embedded or external) and its one client.

    Parameters
    ----------
    dir : str
        Driver directory.
    embedded : bool
        Start the C media driver in this process (refused if a live driver already
        uses ``dir``); else connect to the running driver there.
    threading : str
        Embedded driver threading mode (``shared``, ``dedicated``, ``shared_network``).
    driver_timeout_ms : int
        Client's driver timeout.
    """

    def __init__(
        self,
        dir: str,
        *,
        embedded: bool = True,
        threading: str = "shared",
        driver_timeout_ms: int = 10_000,
    ) -> None:
        pa = _pyaeron()
        self.dir = dir
        self.embedded = embedded
        self.driver = None
        self.errors = 0
        self.last_error = ""
        #: why the driver is gone (driver or client timeout), "" while it is fine
        self.lost = ""
        self._lock = _threading.Lock()
        if embedded:
            if pa.is_driver_active(dir, 1_000):
                raise OSError(
                    f"an Aeron media driver is already running in {dir!r}: stop it, set "
                    f"[aeron] dir to another directory, or set [aeron] embedded = false to use it"
                )
            parent = os.path.dirname(dir.rstrip("/")) or "."
            if not os.path.isdir(parent):
                raise OSError(f"cannot start the Aeron media driver: {parent!r} does not exist")
            # Owner-only: Aeron has no authentication, so the driver's files (cnc.dat, the log
            # buffers) must not be writable, or even readable, by other users.
            old_umask = os.umask(0o077)
            try:
                self.driver = pa.MediaDriver(
                    dir=dir, threading=threading, dir_delete_on_start=True, dir_delete_on_shutdown=True
                )
            except pa.AeronError as exc:
                raise OSError(f"cannot start the Aeron media driver in {dir!r}: {exc}") from None
            finally:
                os.umask(old_umask)
            try:
                os.chmod(dir, 0o700)
            except OSError:
                pass
        elif not pa.is_driver_active(dir, driver_timeout_ms):
            raise OSError(
                f"no Aeron media driver is running in {dir!r}: start one (aeronmd, or another "
                f"process's embedded driver) or set [aeron] embedded = true"
            )
        try:
            self.client = connect_client(dir, timeout_ms=driver_timeout_ms, on_error=self._on_error)
        except OSError:
            if self.driver is not None:
                self.driver.close()
            raise
        # The driver registers a client, and the heartbeat counter its conductor looks for, only
        # when the client adds a resource; until then the Aeron C client's conductor searches the
        # metadata of every counter for it on each duty cycle (aeron_client_conductor_check_liveness:
        # 8,192 records of 512 bytes by default; ~1 ms of core 0 every ~16 ms here, measured with
        # perf).  This client holds nothing when the native loop publishes, and receives, through
        # its own C client (engine.native_aeron.AeronCClient): a subscription on a stream nothing
        # publishes on registers it (no image, no log buffer).
        try:
            self.anchor = self.client.add_subscription("aeron:ipc", ANCHOR_STREAM_ID)
        except Exception as exc:  # noqa: BLE001 - pyaeron's own error types; costs CPU, not correctness
            self.anchor = None
            log("aeron", f"cannot add the client's anchor subscription ({exc}): its conductor will search "
                "the driver's counters on every duty cycle", event="aeron_anchor", level=logging.WARNING)

    def _on_error(self, code, message) -> None:
        # Called on the Aeron client conductor thread.
        with self._lock:
            self.errors += 1
            self.last_error = f"{code}: {message}"
            if code in _DRIVER_LOST_CODES or "timeout" in str(message).lower():
                self.lost = f"{code}: {message}"  # the service stops cleanly at its next housekeeping
        log("aeron", f"error {code}: {message}", event="aeron_error", level=logging.ERROR, code=code)

    def close(self) -> None:
        """Close the client, then stop an embedded driver (its directory is deleted)."""
        try:
            self.client.close()
        finally:
            if self.driver is not None:
                self.driver.close()
                self.driver = None


class AeronPublisher:
    """Publish each score as one Aeron message (payload only), never blocking.

    Parameters
    ----------
    aeron : pyaeron.Aeron
    channel : str
    stream_id : int
        Score stream (default 1002, :data:`engine.config.SCORE_STREAM_ID`).
    back_pressure_retries : int
        Extra offers after BACK_PRESSURED or ADMIN_ACTION before the score is dropped.
    not_connected_retries : int
        Extra offers after NOT_CONNECTED (no subscriber) before the score is dropped.

    Attributes
    ----------
    sent, drops : int
        Scores appended to the log / given up.
    back_pressured, not_connected, admin_action : int
        Offer results of each retryable kind (every attempt counts).
    errors : int
        Offers that raised (closed publication, max position); each is also a drop.
    """

    name = "aeron"

    def __init__(
        self,
        aeron,
        channel: str,
        stream_id: int,
        *,
        back_pressure_retries: int = 16,
        not_connected_retries: int = 1,
        linger_ms: int = 250,
    ) -> None:
        pa = _pyaeron()
        self.channel = channel
        self.stream_id = stream_id
        self.pub = aeron.add_exclusive_publication(channel, stream_id)
        self.bp_retries = back_pressure_retries
        self.nc_retries = not_connected_retries
        self.linger_ms = linger_ms
        self.sent = 0
        self.drops = 0
        #: scores not sent because no subscriber was connected (after the retries): apart from drops
        self.unsent_no_subscriber = 0
        self.back_pressured = 0
        self.not_connected = 0
        self.admin_action = 0
        self.errors = 0
        self.last_error = ""
        self._offer = self.pub.offer
        self._BP = pa.BACK_PRESSURED
        self._NC = pa.NOT_CONNECTED
        self._AeronError = pa.AeronError

    def publish(self, topic: bytes, payload) -> bool:
        """Offer ``payload`` (the topic is not sent: Aeron carries the payload only).

        Returns True if appended; False (counted drop) after the bounded retries.
        Allocates: nothing on success.
        """
        try:
            r = self._offer(payload)
        except self._AeronError as exc:
            return self._failed(exc)
        if r is True:
            self.sent += 1
            return True
        return self._retry(payload, r)

    def _retry(self, payload, r) -> bool:
        bp_left = self.bp_retries
        nc_left = self.nc_retries
        offer = self._offer
        while True:
            if r is self._BP:
                self.back_pressured += 1
                if bp_left <= 0:
                    break
                bp_left -= 1
            elif r is self._NC:
                self.not_connected += 1
                if nc_left <= 0:
                    break
                nc_left -= 1
            else:  # ADMIN_ACTION: the log rotated, retry at once
                self.admin_action += 1
                if bp_left <= 0:
                    break
                bp_left -= 1
            try:
                r = offer(payload)
            except self._AeronError as exc:
                return self._failed(exc)
            if r is True:
                self.sent += 1
                return True
        if r is self._NC:  # nobody subscribed: not a loss to any reader, counted apart
            self.unsent_no_subscriber += 1
        else:
            self.drops += 1
        return False

    def _failed(self, exc: BaseException) -> bool:
        self.errors += 1
        self.drops += 1
        self.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False

    @property
    def connected(self) -> bool:
        """Return whether at least one subscriber is connected."""
        try:
            return bool(self.pub.is_connected)
        except Exception:  # noqa: BLE001 - closed
            return False

    def counters(self) -> dict[str, int]:
        """Return the counters as a dict (for status and the final report)."""
        return {
            "sent": self.sent,
            "drops": self.drops,
            "unsent_no_subscriber": self.unsent_no_subscriber,
            "back_pressured": self.back_pressured,
            "not_connected": self.not_connected,
            "admin_action": self.admin_action,
            "errors": self.errors,
            "connected": self.connected,
        }

    def flush(self) -> None:
        """Give subscribers ``linger_ms`` to read what was published (called at stop)."""
        if self.linger_ms and self.connected:
            time.sleep(self.linger_ms / 1000.0)

    def close(self) -> None:
        """Close the publication."""
        try:
            self.pub.close()
        except Exception:  # noqa: BLE001 - the client may already be closed
            pass
