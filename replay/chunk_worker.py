"""Decode a tick file's chunks in a child process, into a small pool of shared-memory slots.

A chunked replay (:class:`replay.source.ChunkedReplaySource`) must not share the
interpreter with its reader: reading and normalising a chunk takes the GIL for
milliseconds at a time, and every GIL hand-over stalls the single-threaded hot
loop.  :class:`ChunkWorker` runs :func:`replay.reader.iter_tick_chunks` in a
separate Python process instead, kept on the non-hot cores, which copies each
chunk's ticks (``TICK_DTYPE``) into one of ``slots`` fixed slots of one anonymous
shared-memory file (``memfd``, no name in ``/dev/shm``).  The hot thread maps a
ready slot as a numpy array (zero copy) at the chunk boundary and hands the
previous slot back.

Protocol (pickled tuples over a socket pair, :class:`multiprocessing.connection.Connection`):

* parent → child: the spec (the unstarted :class:`replay.reader.TickChunks`, limit,
  slot layout), then ``("free", slot)`` for every slot handed back; EOF = stop;
* child → parent: ``("chunk", slot, n, rejected, totals)`` (``slot`` -1 when the
  chunk has no accepted tick), then ``("end", totals)`` or ``("error", text, tb)``;
  ``totals`` = ``(rows_read, rejected, anomalies)`` of the reader so far.

Memory: ``slots * slot_rows * 80`` bytes of shared memory plus the child's reader
(about one chunk being decoded).  The shared memory has no name: the kernel frees
it once both processes have unmapped it or exited, on every exit path (normal end,
error, Ctrl-C, a killed process); the child exits on EOF from the parent.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from engine.schema import TICK_DTYPE

__all__ = ["ChunkWorker", "ChunkReadError"]

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; not exported by the mmap module of Python 3.12
_ROOT = str(Path(__file__).resolve().parents[1])


class ChunkReadError(ValueError):
    """Reading a chunked file failed (in the reader process); says which file and where.

    ``child_traceback`` holds the reader process's traceback text, when there was one.
    """

    def __init__(self, message: str, child_traceback: str = "") -> None:
        super().__init__(message)
        self.child_traceback = child_traceback


def _shared_fd(size: int) -> int:
    """Return the fd of a nameless shared-memory file of ``size`` bytes (memfd, else an unlinked file)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tickscore-chunks", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux
        d = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryFile(dir=d) as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _populate(mm: mmap.mmap) -> None:
    """Fault every page in now (so the hot thread never takes a page fault on a slot)."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
        return
    except (OSError, ValueError):
        pass
    a = np.frombuffer(mm, dtype=np.uint8)
    a[::_PAGE] = 0
    del a


def _slot_bytes(slot_rows: int, itemsize: int) -> int:
    b = slot_rows * itemsize
    return -(-b // _PAGE) * _PAGE


def _stop_process(proc: subprocess.Popen, conn: Connection) -> None:
    """Close the pipe (the child exits on EOF) and reap the child; kill it if it lingers."""
    try:
        conn.close()
    except OSError:
        pass
    if proc.poll() is None:
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:  # decoding a chunk: no need to let it finish
            proc.kill()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass


class ChunkWorker:
    """Parent side: start the reader process, receive ready slots, hand slots back.

    Parameters
    ----------
    chunks : replay.reader.TickChunks
        The file's chunk iterator, not yet started (it is pickled to the child;
        the parent's copy gets the running totals ``rows_read`` / ``rejected`` /
        ``anomalies`` as chunks arrive).
    limit : int, optional
        Stop after this many accepted ticks.
    slot_rows : int
        Ticks per slot; a larger chunk arrives as several slots.
    slots : int
        Slots in the pool (>= 2: one being read by the hot thread, one being written).
    cpus : set of int, optional
        Cores for the reader process (keep it off the hot core); it needs about
        an eighth to a quarter of one.  Set before the interpreter imports
        anything, so every thread it starts stays there too.

    Not thread-safe: one consumer thread calls :meth:`next` / :meth:`release`.
    """

    def __init__(self, chunks, *, limit: int | None = None, slot_rows: int, slots: int = 2,
                 cpus: set[int] | None = None) -> None:  # fmt: skip

        if slots < 2:
            raise ValueError(f"slots must be >= 2, got {slots}")
        self.chunks = chunks
        self.path = str(chunks.path)
        self.slot_rows = max(1, int(slot_rows))
        self.n_slots = int(slots)
        self.ended = False
        self._stride = _slot_bytes(self.slot_rows, TICK_DTYPE.itemsize)
        size = self._stride * self.n_slots
        fd = _shared_fd(size)
        child_sock = None
        try:
            self._mm = mmap.mmap(fd, size)
            _populate(self._mm)
            parent_sock, child_sock = socket.socketpair()
            cpu_list = sorted(cpus) if cpus else []
            code = (
                "import os, sys\n"
                f"cpus = {cpu_list!r}\n"
                "if cpus:\n"
                "    try:\n"
                "        os.sched_setaffinity(0, cpus)\n"
                "    except (AttributeError, OSError, ValueError):\n"
                "        pass\n"
                f"sys.path.insert(0, {_ROOT!r})\n"
                "from replay.chunk_worker import _child_main\n"
                f"_child_main({child_sock.fileno()}, {fd}, {size})\n"
            )
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(child_sock.fileno(), fd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            if child_sock is not None:
                child_sock.close()
                parent_sock.close()
            os.close(fd)
            raise
        child_sock.close()
        os.close(fd)  # the mapping (and the child's fd) keep the memory
        self._conn = Connection(parent_sock.detach())
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, self._conn)
        self._views = [
            np.frombuffer(self._mm, dtype=TICK_DTYPE, count=self.slot_rows, offset=k * self._stride)
            for k in range(self.n_slots)
        ]
        spec = {"chunks": chunks, "limit": limit, "slot_rows": self.slot_rows,
                "slots": self.n_slots, "stride": self._stride}  # fmt: skip
        try:
            self._conn.send_bytes(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            self.close()
            raise ChunkReadError(f"reading {self.path} failed: cannot start the reader process: {e}") from e

    @property
    def pid(self) -> int:
        """Return the reader process's pid."""
        return self._proc.pid

    def next(self) -> tuple[np.ndarray | None, int, dict[str, int]] | None:
        """Return ``(ticks, slot, rejected)`` of the next chunk, or None at the end (blocks).

        ``ticks`` is a view of shared slot ``slot`` (None and -1 for a chunk without
        accepted ticks), valid until :meth:`release` of that slot.  Updates the
        parent's ``chunks`` totals.  Raises :class:`ChunkReadError` when the reader
        failed or died.
        """
        if self.ended:
            return None
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            rc = self._proc.poll()
            if rc is None:
                try:
                    rc = self._proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    rc = None
            self.ended = True
            raise ChunkReadError(
                f"reading {self.path} failed after {self.chunks.rows_read:,} rows: the reader "
                f"process exited unexpectedly (exit code {rc})"
            ) from None
        tag = msg[0]
        if tag == "chunk":
            _, slot, n, rejected, totals = msg
            self._totals(totals)
            return (self._views[slot][:n] if slot >= 0 else None), slot, rejected
        self.ended = True
        if tag == "end":
            self._totals(msg[1])
            return None
        _, text, tb = msg
        raise ChunkReadError(f"reading {self.path} failed after {self.chunks.rows_read:,} rows: {text}", tb)

    def _totals(self, totals) -> None:
        ch = self.chunks
        ch.rows_read, ch.rejected, ch.anomalies = totals[0], totals[1], totals[2]

    def release(self, slot: int) -> None:
        """Hand ``slot`` back to the reader (its view must not be read any more)."""
        if slot < 0 or self.ended:
            return
        try:
            self._conn.send(("free", slot))
        except OSError:  # the reader is gone; next() reports why
            pass

    def close(self) -> None:
        """Stop the reader process and drop this side's mapping (idempotent).

        The mapping itself goes when the last view of it is dropped; views handed
        out by :meth:`next` stay readable until then.
        """
        self.ended = True
        self._finalizer()
        self._views = []
        try:
            self._mm.close()
        except BufferError:  # views still exported: unmapped when the last one goes
            pass

    @property
    def alive(self) -> bool:
        """Return True while the reader process runs."""
        return self._proc.poll() is None


# --------------------------------------------------------------------------- child side
def _child_main(conn_fd: int, mem_fd: int, size: int) -> None:
    """Entry point of the reader process: decode chunks into free slots until done or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(conn_fd)
    try:
        spec = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    mm = mmap.mmap(mem_fd, size)
    os.close(mem_fd)
    try:
        _produce(conn, mm, spec)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent stopped reading
    # Everything is sent and nothing needs flushing: skip the interpreter's teardown
    # (hundreds of ms with polars / numba loaded) so the parent reaps an exited process.
    os._exit(0)


def _produce(conn: Connection, mm: mmap.mmap, spec: dict) -> None:
    chunks = spec["chunks"]
    slot_rows, n_slots, stride = spec["slot_rows"], spec["slots"], spec["stride"]
    views = [np.frombuffer(mm, dtype=TICK_DTYPE, count=slot_rows, offset=k * stride)
             for k in range(n_slots)]  # fmt: skip
    free = list(range(n_slots))

    def take() -> int:
        while not free:
            msg = conn.recv()
            free.append(msg[1])
        return free.pop(0)

    def totals() -> tuple:
        return (chunks.rows_read, dict(chunks.rejected), dict(chunks.anomalies))

    left = spec["limit"]
    try:
        for ch in chunks:
            t = ch.ticks
            if left is not None:
                t = t[:left]
                left -= len(t)
            if len(t) == 0:
                conn.send(("chunk", -1, 0, ch.rejected, totals()))
            for start in range(0, len(t), slot_rows):
                piece = t[start : start + slot_rows]
                k = take()
                views[k][: len(piece)] = piece
                conn.send(("chunk", k, len(piece), ch.rejected if start == 0 else {}, totals()))
            if left is not None and left <= 0:
                break
    except (EOFError, BrokenPipeError, ConnectionResetError):
        raise
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        text = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        conn.send(("error", text, traceback.format_exc()))
        return
    conn.send(("end", totals()))
