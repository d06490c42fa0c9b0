"""Aeron's C client for compiled code: the native loop offers each Score itself.

pyaeron wraps the Aeron C client (``aeronc.h``) and its extension exports the
client's symbols, but it exposes no handle of its publications.  So
:class:`NativeAeronPublisher` makes a client of its own, from the very library
pyaeron loaded (the extension module), on the service's driver directory (the
embedded driver of :class:`engine.aeron_io.AeronRuntime`, or an external one),
and adds an exclusive publication on the score channel.  Its handle goes into
the native loop's context; the loop offers each Score through
:func:`offer_with_retries`, which counts exactly as
:meth:`engine.aeron_io.AeronPublisher.publish` does: bounded retries after
back-pressure / admin action and after not-connected, ``unsent_no_subscriber``
apart from ``drops``, a closed publication or an error an ``errors`` + ``drops``.

At start-up :func:`bind_aeron_c` checks that the library is the one mapped into
the process, that every symbol used is there and reads its version; prototypes
are spelled out here (ctypes) and in the ``call_*`` intrinsics (compiled code).
Aeron has no transport authentication (see the README's Security section).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from engine.log import log
from engine.native_zmq import NativeBindError, call_address, fn_address, mapped_paths

__all__ = ["AeronC", "AeronCClient", "bind_aeron_c", "NativeAeronPublisher", "offer_with_retries", "A_SENT",
           "A_DROPS", "A_UNSENT", "A_BP", "A_NC", "A_ADMIN", "A_ERRORS", "A_LAST_CODE", "N_A_COUNTERS"]

REQUIRED_SYMBOLS = (
    "aeron_context_init",
    "aeron_context_set_dir",
    "aeron_context_set_driver_timeout_ms",
    "aeron_context_set_pre_touch_mapped_memory",
    "aeron_context_close",
    "aeron_init",
    "aeron_start",
    "aeron_close",
    "aeron_async_add_exclusive_publication",
    "aeron_async_add_exclusive_publication_poll",
    "aeron_exclusive_publication_offer",
    "aeron_exclusive_publication_close",
    "aeron_exclusive_publication_is_connected",
    "aeron_errmsg",
    "aeron_version_major",
    "aeron_version_minor",
    "aeron_version_patch",
    "aeron_context_set_error_handler",
    "aeron_async_add_subscription",
    "aeron_async_add_subscription_poll",
    "aeron_subscription_controlled_poll",
    "aeron_subscription_is_connected",
    "aeron_subscription_close",
    "aeron_controlled_fragment_assembler_create",
    "aeron_controlled_fragment_assembler_delete",
    "aeron_controlled_fragment_assembler_handler",
    # the native ingress's touch-ahead of the tick log (engine.native_ingress)
    "aeron_header_values",
    "aeron_header_context",
    "aeron_header_position",
    "aeron_image_constants",
    "aeron_image_position",
    "aeron_subscription_image_by_session_id",
    "aeron_subscription_image_release",
    "aeron_subscription_image_count",
)  # fmt: skip

#: ``void (*aeron_error_handler_t)(void *clientd, int errcode, const char *message)``
_ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)

# offer results (aeronc.h): a new position >= 0, or one of these
NOT_CONNECTED, BACK_PRESSURED, ADMIN_ACTION = -1, -2, -3
# counters of a publisher (an int64 array the kernel writes)
A_SENT, A_DROPS, A_UNSENT, A_BP, A_NC, A_ADMIN, A_ERRORS, A_LAST_CODE = range(8)
N_A_COUNTERS = 8


@dataclass(frozen=True)
class AeronC:
    """The Aeron C client functions (ctypes, explicit prototypes) and the library's version."""

    path: str
    version: tuple[int, int, int]
    lib: ctypes.CDLL


def _proto(lib, name: str, restype, *argtypes) -> None:
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


def bind_aeron_c() -> AeronC:
    """Bind the Aeron C client in pyaeron's extension; raise :class:`NativeBindError` naming what is wrong."""
    try:
        import pyaeron._pyaeron as ext  # deferred: loads the Aeron C client, only where Aeron is used
    except ImportError as exc:
        raise NativeBindError(f"pyaeron is not installed: {exc}") from None
    path = ext.__file__
    loaded = mapped_paths()
    if loaded is not None and os.path.realpath(path) not in loaded:
        raise NativeBindError(f"the Aeron client {path!r} is not the one pyaeron loaded in this process")
    lib = ctypes.CDLL(path)
    missing = [s for s in REQUIRED_SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise NativeBindError(f"{path!r} lacks the Aeron C client symbol(s) {', '.join(missing)}: this "
                              "pyaeron cannot serve a native loop (use --loop python)")  # fmt: skip
    vp, sz, i32, i64, u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64
    for n in ("aeron_version_major", "aeron_version_minor", "aeron_version_patch"):
        _proto(lib, n, ctypes.c_int)
    version = (lib.aeron_version_major(), lib.aeron_version_minor(), lib.aeron_version_patch())
    if version < (1, 40, 0):
        raise NativeBindError(f"Aeron C client {'.'.join(map(str, version))} is too old (need 1.40+)")
    _proto(lib, "aeron_context_init", ctypes.c_int, ctypes.POINTER(vp))
    _proto(lib, "aeron_context_set_dir", ctypes.c_int, vp, ctypes.c_char_p)
    _proto(lib, "aeron_context_set_driver_timeout_ms", ctypes.c_int, vp, u64)
    _proto(lib, "aeron_context_set_pre_touch_mapped_memory", ctypes.c_int, vp, ctypes.c_bool)
    _proto(lib, "aeron_context_close", ctypes.c_int, vp)
    _proto(lib, "aeron_init", ctypes.c_int, ctypes.POINTER(vp), vp)
    _proto(lib, "aeron_start", ctypes.c_int, vp)
    _proto(lib, "aeron_close", ctypes.c_int, vp)
    pp, cs = ctypes.POINTER(vp), ctypes.c_char_p
    _proto(lib, "aeron_async_add_exclusive_publication", ctypes.c_int, pp, vp, cs, i32)
    _proto(lib, "aeron_async_add_exclusive_publication_poll", ctypes.c_int, ctypes.POINTER(vp), vp)
    # int64_t aeron_exclusive_publication_offer(pub, const uint8_t *buf, size_t len, supplier, void *clientd)
    _proto(lib, "aeron_exclusive_publication_offer", i64, sz, sz, sz, sz, sz)
    _proto(lib, "aeron_exclusive_publication_close", ctypes.c_int, vp, vp, vp)
    _proto(lib, "aeron_exclusive_publication_is_connected", ctypes.c_bool, vp)
    _proto(lib, "aeron_errmsg", ctypes.c_char_p)
    _proto(lib, "aeron_context_set_error_handler", ctypes.c_int, vp, _ERROR_HANDLER, vp)
    # int aeron_async_add_subscription(async **, client, uri, stream_id, on_available, clientd,
    #                                  on_unavailable, clientd)
    _proto(lib, "aeron_async_add_subscription", ctypes.c_int, pp, vp, cs, i32, vp, vp, vp, vp)
    _proto(lib, "aeron_async_add_subscription_poll", ctypes.c_int, pp, vp)
    _proto(lib, "aeron_subscription_is_connected", ctypes.c_bool, vp)
    _proto(lib, "aeron_subscription_close", ctypes.c_int, vp, vp, vp)
    # int aeron_controlled_fragment_assembler_create(assembler **, delegate handler, void *delegate_clientd)
    _proto(lib, "aeron_controlled_fragment_assembler_create", ctypes.c_int, pp, sz, sz)
    _proto(lib, "aeron_controlled_fragment_assembler_delete", ctypes.c_int, vp)
    # int aeron_header_values(aeron_header_t *, aeron_header_values_t *); void *aeron_header_context(header)
    _proto(lib, "aeron_header_values", ctypes.c_int, vp, vp)
    _proto(lib, "aeron_header_context", vp, vp)
    _proto(lib, "aeron_header_position", i64, vp)  # int64_t aeron_header_position(aeron_header_t *)
    # int aeron_image_constants(aeron_image_t *, aeron_image_constants_t *);
    # int64_t aeron_image_position(aeron_image_t *)
    _proto(lib, "aeron_image_constants", ctypes.c_int, vp, vp)
    _proto(lib, "aeron_image_position", i64, vp)
    # aeron_image_t *aeron_subscription_image_by_session_id(sub, int32_t session_id) (retains the image);
    # int aeron_subscription_image_release(sub, image)
    _proto(lib, "aeron_subscription_image_by_session_id", vp, vp, i32)
    _proto(lib, "aeron_subscription_image_release", ctypes.c_int, vp, vp)
    _proto(lib, "aeron_subscription_image_count", ctypes.c_int, vp)  # int (aeron_subscription_t *)
    return AeronC(path, version, lib)


@intrinsic
def _call_offer(typingctx, fn, pub, buf, length):
    """``int64_t aeron_exclusive_publication_offer(pub, buf, length, NULL, NULL)`` at address ``fn``."""
    sig = types.int64(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        zero = ir.Constant(i64, 0)
        return call_address(builder, args[0], i64, [i64] * 5, [args[1], args[2], args[3], zero, zero])

    return sig, codegen


@njit(cache=True, nogil=True)
def offer_with_retries(fn, pub, buf, length, c, bp_retries, nc_retries):
    """Offer ``length`` bytes at ``buf`` on ``pub``, retrying as :class:`engine.aeron_io.AeronPublisher`.

    ``c``: the publisher's int64 counters (``A_*``).  Returns True when appended.
    """
    r = _call_offer(fn, pub, buf, length)
    if r >= 0:
        c[A_SENT] += 1
        return True
    bp_left, nc_left = bp_retries, nc_retries
    while True:
        if r == BACK_PRESSURED:
            c[A_BP] += 1
            if bp_left <= 0:
                break
            bp_left -= 1
        elif r == NOT_CONNECTED:
            c[A_NC] += 1
            if nc_left <= 0:
                break
            nc_left -= 1
        elif r == ADMIN_ACTION:  # the log rotated: retry at once
            c[A_ADMIN] += 1
            if bp_left <= 0:
                break
            bp_left -= 1
        else:  # closed, max position exceeded, error: not retryable
            c[A_ERRORS] += 1
            c[A_DROPS] += 1
            c[A_LAST_CODE] = r
            return False
        r = _call_offer(fn, pub, buf, length)
        if r >= 0:
            c[A_SENT] += 1
            return True
    if r == NOT_CONNECTED:  # nobody subscribed: not a loss to any reader, counted apart
        c[A_UNSENT] += 1
    else:
        c[A_DROPS] += 1
    return False


_CODES = {-4: "publication closed", -5: "max position exceeded", -6: "error"}


class AeronCClient:
    """A client of the Aeron C API (pyaeron's library) on a driver directory, owned by tickscore.

    pyaeron exposes no handle of its publications or subscriptions; this client makes the ones
    compiled code uses (:class:`NativeAeronPublisher`, :class:`engine.native_ingress.NativeAeronTickSource`).
    Its conductor's errors (driver timeout ...) become log lines and are counted in ``errors``.

    ``pre_touch`` (default) touches every page of a publication's log when it is added: else
    the first offer into each 4 KiB page takes a page fault in this process (~1-2 µs on this VM,
    one offer in ~30 of Score size: the native loop's p99 over Aeron went from ~2.4 to ~0.9 µs,
    ``benchmarks/bench_native_loop.py``).  It costs the log's size in memory at once (3 x the
    term length: 192 MiB for ``aeron:ipc``'s default 64 MiB terms; ``?term-length=`` bounds it).
    """

    def __init__(self, dir: str, *, driver_timeout_ms: int = 10_000, timeout_s: float = 10.0,
                 pre_touch: bool = True) -> None:  # fmt: skip
        self._c = bind_aeron_c()
        self.dir = dir
        self.timeout_s = timeout_s
        self.errors = 0
        lib = self._c.lib
        self._ctx, self._client = ctypes.c_void_p(), ctypes.c_void_p()
        try:
            self._check(lib.aeron_context_init(ctypes.byref(self._ctx)), "context")
            self._check(lib.aeron_context_set_dir(self._ctx, dir.encode()), "context dir")
            self._check(lib.aeron_context_set_driver_timeout_ms(self._ctx, int(driver_timeout_ms)), "timeout")
            self._check(lib.aeron_context_set_pre_touch_mapped_memory(self._ctx, bool(pre_touch)), "touch")
            self._on_error = _ERROR_HANDLER(self._error)  # kept alive with the client
            self._check(lib.aeron_context_set_error_handler(self._ctx, self._on_error, None), "error handler")
            self._check(lib.aeron_init(ctypes.byref(self._client), self._ctx), f"client on {dir!r}")
            self._check(lib.aeron_start(self._client), f"client on {dir!r}")
        except BaseException:
            self.close()
            raise

    @property
    def lib(self):
        return self._c.lib

    def fn(self, name: str) -> int:
        """Address of the bound function ``name`` (for compiled callers)."""
        return fn_address(getattr(self._c.lib, name))

    def _error(self, clientd, code: int, message: bytes | None) -> None:
        # called on this client's conductor thread
        text = message.decode(errors="replace") if message else ""
        self.errors += 1
        log("aeron", f"native client error {code}: {text}", event="aeron_error", level=logging.ERROR,
            code=code)

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            msg = self._c.lib.aeron_errmsg()
            raise OSError(f"Aeron {what}: {msg.decode(errors='replace') if msg else 'failed'}")

    def _await(self, poll, pending, out, what: str) -> int:
        deadline = time.monotonic() + self.timeout_s
        while True:
            rc = poll(ctypes.byref(out), pending)
            if rc > 0:
                return int(out.value)
            self._check(rc, what)
            if time.monotonic() > deadline:
                raise OSError(f"Aeron {what}: no answer from the driver in {self.timeout_s:g} s")
            time.sleep(0.001)

    def add_exclusive_publication(self, channel: str, stream_id: int) -> int:
        """Return the ``aeron_exclusive_publication_t *`` of a new exclusive publication."""
        lib, pending, what = self._c.lib, ctypes.c_void_p(), f"publication {channel} stream {stream_id}"
        rc = lib.aeron_async_add_exclusive_publication(ctypes.byref(pending), self._client, channel.encode(),
                                                       int(stream_id))  # fmt: skip
        self._check(rc, what)
        return self._await(lib.aeron_async_add_exclusive_publication_poll, pending, ctypes.c_void_p(), what)

    def close_publication(self, pub: int) -> None:
        if pub:
            self._c.lib.aeron_exclusive_publication_close(pub, None, None)

    def publication_connected(self, pub: int) -> bool:
        return bool(pub) and bool(self._c.lib.aeron_exclusive_publication_is_connected(pub))

    def add_subscription(self, channel: str, stream_id: int, handler: int, clientd: int) -> tuple[int, int]:
        """Return ``(subscription, assembler)``: a subscription and a controlled fragment assembler
        delivering whole messages to the C function at ``handler`` with ``clientd``."""
        lib, pending, what = self._c.lib, ctypes.c_void_p(), f"subscription {channel} stream {stream_id}"
        rc = lib.aeron_async_add_subscription(ctypes.byref(pending), self._client, channel.encode(),
                                              int(stream_id), None, None, None, None)  # fmt: skip
        self._check(rc, what)
        sub = self._await(lib.aeron_async_add_subscription_poll, pending, ctypes.c_void_p(), what)
        asm = ctypes.c_void_p()
        self._check(lib.aeron_controlled_fragment_assembler_create(ctypes.byref(asm), handler, clientd),
                    "fragment assembler")  # fmt: skip
        return sub, int(asm.value)

    def subscription_connected(self, sub: int) -> bool:
        return bool(sub) and bool(self._c.lib.aeron_subscription_is_connected(sub))

    def close_subscription(self, sub: int, assembler: int) -> None:
        if sub:
            self._c.lib.aeron_subscription_close(sub, None, None)
        if assembler:
            self._c.lib.aeron_controlled_fragment_assembler_delete(assembler)

    def close(self) -> None:
        """Close the client and its context (idempotent); publications and subscriptions go with it."""
        lib = self._c.lib
        if self._client.value:
            lib.aeron_close(self._client)
            self._client = ctypes.c_void_p()
        if self._ctx.value:
            lib.aeron_context_close(self._ctx)
            self._ctx = ctypes.c_void_p()


class NativeAeronPublisher:
    """An Aeron score sink the native loop offers to from compiled code (see the module docstring).

    Same parameters, counters and methods as :class:`engine.aeron_io.AeronPublisher`, with an
    :class:`AeronCClient` (or a driver directory: the publisher then makes and owns one) in
    place of pyaeron's client.  ``publish`` (the python loop, after a reload to an ``ort``
    model) offers through the same compiled retry function.
    """

    name = "aeron"
    native = "aeron"

    def __init__(self, client: AeronCClient | str, channel: str, stream_id: int, *,
                 back_pressure_retries: int = 16, not_connected_retries: int = 1, linger_ms: int = 250,
                 driver_timeout_ms: int = 10_000, timeout_s: float = 10.0) -> None:  # fmt: skip
        self._owns = isinstance(client, str)
        self.client = AeronCClient(client, driver_timeout_ms=driver_timeout_ms, timeout_s=timeout_s) \
            if isinstance(client, str) else client  # fmt: skip
        self.channel = channel
        self.stream_id = stream_id
        self.bp_retries = int(back_pressure_retries)
        self.nc_retries = int(not_connected_retries)
        self.linger_ms = linger_ms
        #: the counters the kernel writes (A_*)
        self.c = np.zeros(N_A_COUNTERS, np.int64)
        try:
            #: the ``aeron_exclusive_publication_t *`` the kernel offers to
            self.handle = self.client.add_exclusive_publication(channel, stream_id)
        except BaseException:
            if self._owns:
                self.client.close()
            raise
        self.fn_offer = self.client.fn("aeron_exclusive_publication_offer")

    # counters, as AeronPublisher's attributes
    sent = property(lambda self: int(self.c[A_SENT]))
    drops = property(lambda self: int(self.c[A_DROPS]))
    unsent_no_subscriber = property(lambda self: int(self.c[A_UNSENT]))
    back_pressured = property(lambda self: int(self.c[A_BP]))
    not_connected = property(lambda self: int(self.c[A_NC]))
    admin_action = property(lambda self: int(self.c[A_ADMIN]))
    errors = property(lambda self: int(self.c[A_ERRORS]))

    @property
    def last_error(self) -> str:
        code = int(self.c[A_LAST_CODE])
        return f"offer returned {code} ({_CODES.get(code, 'unknown')})" if code else ""

    def publish(self, topic: bytes, payload) -> bool:
        """Offer ``payload`` (python loop; the topic is not sent: Aeron carries the payload only)."""
        buf = np.frombuffer(payload, np.uint8)
        return bool(offer_with_retries(self.fn_offer, self.handle, buf.ctypes.data, buf.shape[0], self.c,
                                       self.bp_retries, self.nc_retries))  # fmt: skip

    @property
    def connected(self) -> bool:
        """Return whether at least one subscriber is connected."""
        return self.client.publication_connected(self.handle)

    def counters(self) -> dict[str, int]:
        """Return the counters as a dict (for status and the final report)."""
        return {"sent": self.sent, "drops": self.drops, "unsent_no_subscriber": self.unsent_no_subscriber,
                "back_pressured": self.back_pressured, "not_connected": self.not_connected,
                "admin_action": self.admin_action, "errors": self.errors,
                "connected": self.connected}  # fmt: skip

    def flush(self) -> None:
        """Give subscribers ``linger_ms`` to read what was published (called at stop)."""
        if self.linger_ms and self.connected:
            time.sleep(self.linger_ms / 1000.0)

    def close(self) -> None:
        """Close the publication, and the client when it made it (idempotent)."""
        if self.handle:
            self.client.close_publication(self.handle)
            self.handle = 0
        if self._owns:
            self.client.close()
