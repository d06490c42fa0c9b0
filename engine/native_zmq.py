"""libzmq's ``zmq_send`` bound for compiled (numba) code: the publish step of a native loop.

pyzmq ships libzmq as a shared library (``pyzmq.libs/libzmq-*.so``, or linked
into its extension).  :func:`bind_libzmq` finds that very library (the one
pyzmq's sockets live in), checks at start-up that every symbol needed exists
and that its version is the one pyzmq reports, and returns ctypes function
objects with explicit prototypes, which numba calls directly from nopython
code.  A missing library or symbol, or a version mismatch, is a clear
:class:`NativeBindError` at start-up, never a crash in the hot loop.

:func:`send_two_frames` publishes ``[topic, payload]`` on a socket handle
(``zmq.Socket.underlying``) without Python: ``zmq_send`` with
``ZMQ_SNDMORE | ZMQ_DONTWAIT``, then the payload; it returns 0, or the
``errno`` of a refused send (``EAGAIN``: the queue is full, counted by the
caller as today's drop).  Lengths are checked against the arrays in the kernel.

Pointers go through ctypes as ``size_t`` (same width and calling convention as
``void *`` on the 64-bit hosts tickscore runs on; checked at bind time).

The native loop (:mod:`engine.native_loop`) and ingress (:mod:`engine.native_ingress`)
call libzmq through the ``call_*`` intrinsics below with these addresses; the python
loop publishes through pyzmq.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass

import zmq
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["NativeBindError", "LibZmq", "bind_libzmq", "libzmq_path", "REQUIRED_SYMBOLS", "make_sender",
           "fn_address", "mapped_paths", "proc_maps", "call_address", "call_send_recv", "call_errno",
           "call_getsockopt", "call_clock_gettime"]

#: Symbols a native loop needs from libzmq (publishing, and the compiled ingress of engine.native_ingress).
REQUIRED_SYMBOLS = ("zmq_send", "zmq_recv", "zmq_getsockopt", "zmq_errno", "zmq_version")
ZMQ_DONTWAIT = 1
ZMQ_SNDMORE = 2


class NativeBindError(RuntimeError):
    """libzmq could not be bound for compiled code (library, symbol or version); the message says which."""


@dataclass(frozen=True)
class LibZmq:
    """libzmq bound with explicit prototypes (ctypes function objects numba can call)."""

    path: str
    version: tuple[int, int, int]
    zmq_send: object
    zmq_errno: object
    zmq_recv: object
    zmq_getsockopt: object


def libzmq_path() -> str:
    """Return the path of the libzmq pyzmq loaded (its bundled copy, or the system one it links)."""
    base = os.path.dirname(os.path.dirname(zmq.__file__))
    patterns = (os.path.join(base, "pyzmq.libs", "libzmq*.so*"), os.path.join(base, "zmq", "libzmq*.so*"))
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    # linked dynamically against a system libzmq: find it among the loaded libraries
    for _, _, _, name in proc_maps() or ():
        path = name.split()[-1] if "/" in name else ""
        if os.path.basename(path).startswith("libzmq"):
            return path
    raise NativeBindError("cannot find the libzmq that pyzmq uses (no pyzmq.libs/libzmq*.so, none loaded)")


def proc_maps() -> list[tuple[int, int, int, str]] | None:
    """The mappings of this process, ``(start, end, file offset, name)`` per line of
    ``/proc/self/maps`` (name ``""``: anonymous), or None where it cannot be read or has a
    line not as proc(5) says (every caller then refuses rather than guesses)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
        rows = []
        for line in lines:
            parts = line.split(maxsplit=5)
            lo, hi = parts[0].split("-")
            name = parts[5].strip() if len(parts) > 5 else ""
            rows.append((int(lo, 16), int(hi, 16), int(parts[2], 16), name))
    except (OSError, ValueError, IndexError):
        return None
    return rows


def mapped_paths() -> set[str] | None:
    """Return the real paths of the files mapped into this process (None where /proc is absent)."""
    maps = proc_maps()
    if maps is None:
        return None
    return {os.path.realpath(name.split()[-1]) for _, _, _, name in maps if name and "/" in name.split()[-1]}


def bind_libzmq(path: str | None = None, symbols: tuple[str, ...] = REQUIRED_SYMBOLS) -> LibZmq:
    """Bind libzmq for compiled code; raise :class:`NativeBindError` naming what is missing or wrong."""
    if ctypes.sizeof(ctypes.c_void_p) != ctypes.sizeof(ctypes.c_size_t):
        raise NativeBindError("pointers are not size_t wide on this host: native publishing is unsupported")
    path = path or libzmq_path()
    loaded = mapped_paths()
    if loaded is not None and os.path.exists(path) and os.path.realpath(path) not in loaded:
        # another copy of libzmq would have its own globals: a socket handle of pyzmq's must
        # never reach it
        raise NativeBindError(f"libzmq {path!r} is not the library pyzmq loaded in this process")
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise NativeBindError(f"cannot load libzmq {path!r}: {exc}") from None
    missing = [s for s in symbols if not hasattr(lib, s)]
    if missing:
        raise NativeBindError(f"libzmq {path!r} lacks the symbol(s) {', '.join(missing)}: this libzmq cannot "
                              "serve a native loop (use --loop python)")  # fmt: skip
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.zmq_version.argtypes = [ctypes.POINTER(ctypes.c_int)] * 3
    lib.zmq_version.restype = None
    lib.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    version = (major.value, minor.value, patch.value)
    want = tuple(int(x) for x in zmq.zmq_version().split("."))
    if version != want:
        raise NativeBindError(f"libzmq {path!r} is version {'.'.join(map(str, version))} but pyzmq's sockets "
                              f"live in {zmq.zmq_version()}: a socket handle of one must not go to the other")
    if version < (4, 0, 0):
        raise NativeBindError(f"libzmq {'.'.join(map(str, version))} is too old (need 4.x)")
    send = lib.zmq_send
    # zmq_send(void *socket, const void *buf, size_t len, int flags) -> int
    send.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    send.restype = ctypes.c_int
    errno_ = lib.zmq_errno
    errno_.argtypes = []
    errno_.restype = ctypes.c_int
    recv = lib.zmq_recv
    # zmq_recv(void *socket, void *buf, size_t len, int flags) -> int (the frame's full length)
    recv.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    recv.restype = ctypes.c_int
    getsockopt = lib.zmq_getsockopt
    # zmq_getsockopt(void *socket, int option, void *value, size_t *len) -> int
    getsockopt.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t]
    getsockopt.restype = ctypes.c_int
    return LibZmq(path, version, send, errno_, recv, getsockopt)


def fn_address(fn) -> int:
    """Return the address of a bound ctypes function (what the ``call_*`` intrinsics take)."""
    addr = ctypes.cast(fn, ctypes.c_void_p).value
    if not addr:
        raise NativeBindError(f"{getattr(fn, '__name__', fn)!r} has no address")
    return int(addr)


# Calls through a function address read at run time, with the C prototype spelled out here
# (the same prototypes bind_libzmq gives ctypes).  A kernel that takes its functions this way
# closes over no ctypes object, so numba can cache it on disk; the addresses come from the
# context array the caller fills after bind_libzmq's start-up checks.
_I32, _I64 = ir.IntType(32), ir.IntType(64)


def call_address(builder, addr, ret, argtys, args):
    """Emit a call of the C function at ``addr`` (an i64) with the prototype ``ret(argtys)`` (llvmlite)."""
    fnty = ir.FunctionType(ret, argtys)
    return builder.call(builder.inttoptr(addr, fnty.as_pointer()), args)


@intrinsic
def call_send_recv(typingctx, fn, sock, buf, n, flags):
    """``int zmq_send/zmq_recv(void *socket, void *buf, size_t len, int flags)`` at address ``fn``."""
    sig = types.int32(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        a = list(args)
        flags = builder.trunc(a[4], _I32)
        return call_address(builder, a[0], _I32, [_I64, _I64, _I64, _I32], [a[1], a[2], a[3], flags])

    return sig, codegen


@intrinsic
def call_errno(typingctx, fn):
    """``int zmq_errno(void)`` at address ``fn``."""
    sig = types.int32(types.int64)

    def codegen(context, builder, signature, args):
        return call_address(builder, args[0], _I32, [], [])

    return sig, codegen


@intrinsic
def call_getsockopt(typingctx, fn, sock, option, value, length):
    """``int zmq_getsockopt(void *socket, int option, void *value, size_t *len)`` at address ``fn``."""
    sig = types.int32(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        a = list(args)
        option = builder.trunc(a[2], _I32)
        return call_address(builder, a[0], _I32, [_I64, _I32, _I64, _I64], [a[1], option, a[3], a[4]])

    return sig, codegen


@intrinsic
def call_clock_gettime(typingctx, fn, clock_id, timespec):
    """``int clock_gettime(clockid_t clock_id, struct timespec *tp)`` at address ``fn``."""
    sig = types.int32(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        a = list(args)
        return call_address(builder, a[0], _I32, [_I32, _I64], [builder.trunc(a[1], _I32), a[2]])

    return sig, codegen


def make_sender(lib: LibZmq):
    """Return ``send_two_frames(sock, topic, topic_len, payload, payload_len) -> 0 | errno`` (numba).

    ``sock`` is ``zmq.Socket.underlying``; ``topic`` / ``payload`` are uint8 arrays; the lengths are
    checked against them (a bad length is ``-1``, nothing sent).
    """
    zsend, zerrno = lib.zmq_send, lib.zmq_errno
    more = ZMQ_SNDMORE | ZMQ_DONTWAIT

    @njit(nogil=True, _nrt=False)
    def send_two_frames(sock, topic, topic_len, payload, payload_len):
        if topic_len < 0 or topic_len > topic.shape[0] or payload_len < 0 or payload_len > payload.shape[0]:
            return -1
        if zsend(sock, topic.ctypes.data, topic_len, more) < 0:
            return zerrno()
        # the second frame of a message is never refused once the first is queued
        if zsend(sock, payload.ctypes.data, payload_len, ZMQ_DONTWAIT) < 0:
            return zerrno()
        return 0

    return send_two_frames
