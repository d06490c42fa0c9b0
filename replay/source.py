"""In-process replay sources: hand ticks to the scoring agent, paced or not.

:class:`ReplaySource` serves an in-memory tick array; :class:`ChunkedReplaySource`
serves a file larger than memory chunk by chunk (:func:`replay.reader.iter_tick_chunks`):
a reader *process* (:mod:`replay.chunk_worker`) decodes and normalises the next
chunks into shared memory while the agent works on the current one, and the
source swaps ``ticks`` / ``inst_list`` / ``ts_list`` at the chunk boundary (the
agent re-reads them on every ``do_work``).

Pacing: ``speed=None`` releases ticks as fast as the agent takes them; ``speed=s``
releases tick ``i`` at ``start + (ts_event[i] - ts_event[0]) / s`` on the
monotonic clock (``s=1`` is recorded speed).  The intended release time of every
tick is kept (``intended_ns``) so reports can measure latency from when a tick
*should* have been handled, which keeps coordinated omission visible.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import threading
import time

import numpy as np

from engine.schema import TICK_DTYPE
from replay.chunk_worker import ChunkReadError, ChunkWorker
from replay.latency import LatencyHistogram

__all__ = ["ReplaySource", "ChunkedReplaySource", "ChunkReadError", "parse_speed"]


def parse_speed(text: str | float | None) -> float | None:
    """Return the replay speed factor: ``None`` for ``"max"``, else a positive float."""
    if text is None:
        return None
    if isinstance(text, str):
        if text.strip().lower() in ("max", "inf", "0"):
            return None
        try:
            value = float(text.lower().rstrip("x"))
        except ValueError:
            raise ValueError(
                f"--speed must be 'max' or a positive number like 1, 10, 0.5; got {text!r}"
            ) from None
    else:
        value = float(text)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"--speed must be 'max' or a positive number; got {text!r}")
    return value


class ReplaySource:
    """Source over an in-memory TICK_DTYPE array (see the source protocol in engine.scorer).

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE
    speed : float or None
        None = as fast as possible; else the factor of recorded speed.
    """

    def __init__(self, ticks: np.ndarray, speed: float | None = None) -> None:
        self.ticks = ticks
        self.n = int(ticks.shape[0])
        self.inst_list = ticks["instrument"].tolist()
        self.ts_list = ticks["ts_event_ns"].tolist()
        self.speed = speed
        self.intended_ns = np.zeros(self.n, dtype=np.int64) if speed is not None else None
        #: indices of the ticks the agent rejected (to align intended send times with scores)
        self.rejected_idx: list[int] = []
        self.done = self.n == 0
        self._i = 0
        self._start_ns = 0
        self._ts0 = self.ts_list[0] if self.n else 0
        self._inv_speed = 1.0 / speed if speed else 0.0
        if speed is not None:
            self.poll = self._poll_paced  # type: ignore[method-assign]

    def start(self, now_ns: int | None = None) -> None:
        """Fix the pacing origin; without a call, the first poll fixes it."""
        self._start_ns = time.perf_counter_ns() if now_ns is None else now_ns

    def on_reject(self, i: int) -> None:
        """The agent rejected tick ``i`` (no score): remember it for the intended-time alignment."""
        self.rejected_idx.append(i)

    @property
    def position(self) -> int:
        """Return the number of ticks handed out so far."""
        return self._i

    def poll(self) -> int:
        """Return the next tick index, or -1 once exhausted (sets ``done``)."""
        i = self._i
        if i >= self.n:
            self.done = True
            return -1
        self._i = i + 1
        return i

    # -- batches of the native loop (engine.native_loop) ----------------------------------
    def window(self, limit: int) -> tuple[int, int]:
        """Return ``(start, stop)``: the ticks the native loop may take next (paced: stops at one not due)."""
        i = self._i
        if i >= self.n:
            self.done = True
            return 0, 0
        if self.speed is not None and not self._start_ns:
            self._start_ns = time.perf_counter_ns()
        return i, min(self.n, i + limit)

    def consumed(self, k: int) -> None:
        """The native loop took ``k`` ticks of the window."""
        self._i += k

    def pacing(self) -> tuple[int, int, float, np.ndarray] | None:
        """``(start_ns, ts0, 1/speed, intended_ns)`` for the native loop's pacing, or None (max speed)."""
        if self.speed is None:
            return None
        if not self._start_ns:
            self._start_ns = time.perf_counter_ns()
        return self._start_ns, self._ts0, self._inv_speed, self.intended_ns

    def _poll_paced(self) -> int:
        i = self._i
        if i >= self.n:
            self.done = True
            return -1
        now = time.perf_counter_ns()
        if not self._start_ns:
            self._start_ns = now
        due = self._start_ns + int((self.ts_list[i] - self._ts0) * self._inv_speed)
        if now < due:
            return -1
        self.intended_ns[i] = due
        self._i = i + 1
        return i


class ChunkedReplaySource:
    """Source over a tick file read in bounded chunks (source protocol of engine.scorer).

    Parameters
    ----------
    chunks : replay.reader.TickChunks
        The file's chunk iterator (not yet started); it runs in a reader process
        (:class:`replay.chunk_worker.ChunkWorker`) and this object's ``rows_read``
        / ``rejected`` / ``anomalies`` follow the chunks received.
    speed : float or None
        None = as fast as possible; else the factor of recorded speed.
    limit : int, optional
        Hand out at most this many ticks.
    warmup : int
        Scored ticks left out of the latency statistics.
    prefetch : int
        Chunks waiting in shared memory for the hot thread (``prefetch + 1`` slots
        of ``chunk_rows`` ticks, 80 bytes each); the reader process decodes one
        more meanwhile.
    cpus : set of int, optional
        Cores for the reader process (keep it off the hot core).

    Why a process: a reader thread takes the GIL for milliseconds while it
    decodes and normalises a chunk, and each GIL hand-over stalls the hot loop.
    In its own process it never blocks the hot thread; it still needs about a
    quarter of another core.  The hot thread's work per chunk is one message, a
    numpy view of the ready slot and two memoryviews (``inst_list`` /
    ``ts_list``: indexing returns Python ints like a list, without building
    one), plus draining the latency ring in place (~8 ms per million ticks).

    ``poll`` at ``speed=None`` is ``functools.partial(next, chain, -1)`` over one
    ``range`` iterator per chunk, a C call per tick; the chunk switch runs inside
    the chain, in :meth:`_ranges`.  ``ticks`` (and the memoryviews) are valid until
    the next chunk boundary: the slot is then handed back and rewritten.

    The agent must be attached (:meth:`attach`) before the run: at every chunk
    boundary the source drains the agent's latency ring into :attr:`latency`
    (and :attr:`latency_intended` when paced) and forgets the chunk's rejected
    indices, so nothing grows with the file.  :meth:`finish` stops
    the reader process and raises :class:`ChunkReadError` if reading failed (the
    run then ends at the failed chunk, with every earlier tick scored).
    """

    def __init__(self, chunks, speed: float | None = None, *, limit: int | None = None,
                 warmup: int = 0, prefetch: int = 1, cpus: set[int] | None = None) -> None:  # fmt: skip
        self.chunks = chunks
        self.symbols = list(chunks.symbols)
        self.total = int(chunks.total_rows) if limit is None else min(int(chunks.total_rows), int(limit))
        self.speed = speed
        self.limit = limit
        self.latency = LatencyHistogram(warmup)
        self.latency_intended = LatencyHistogram(warmup) if speed is not None else None
        self.reader_rejected: dict[str, int] = {}
        self.chunks_served = 0
        self.max_chunk_ticks = 0
        self.done = False
        self.error: Exception | None = None
        self.rejected_idx: list[int] = []  # of the current chunk (see on_reject)
        self._handed = 0
        self._agent = None
        self._drained_seq = 0
        self._first_t_in = 0
        self._last_t_out = 0
        self._start_ns = 0
        self._ts0 = None
        self._inv_speed = 1.0 / speed if speed else 0.0
        self._paced = speed is not None
        self._cpus = set(cpus) if cpus else None
        self.ticks = np.zeros(0, dtype=chunks_dtype())
        self.inst_list = memoryview(self.ticks["instrument"])
        self.ts_list = memoryview(self.ticks["ts_event_ns"])
        self.n = 0
        self._i = 0
        self._it = None
        self._slot = -1
        slot_rows = max(1, min(int(chunks.chunk_rows), max(self.total, 1)))
        self.intended_ns = np.zeros(slot_rows, dtype=np.int64) if speed is not None else None
        self._worker = ChunkWorker(chunks, limit=limit, slot_rows=slot_rows,
                                   slots=max(1, int(prefetch)) + 1, cpus=cpus)  # fmt: skip
        try:
            if not self._next_chunk():  # the first chunk, synchronously
                if self.error is not None:
                    raise self.error
                self.done = True
        except BaseException:
            self._worker.close()
            raise
        if speed is not None:
            self.poll = self._poll_paced
        else:
            self.poll = functools.partial(next, itertools.chain.from_iterable(self._ranges()), -1)
        #: True once the native loop took over: the position is ``_i`` (as paced), not the range iterator
        self._indexed = self._paced

    # -- chunk boundary (hot thread, between two ticks) -----------------------------------
    def _next_chunk(self) -> bool:
        """Swap in the next non-empty chunk; return False at the end or on a read error."""
        self._handed += self.n  # the finished chunk was handed out whole
        self.n = self._i = 0
        self._it = None
        w = self._worker
        while True:
            try:
                item = w.next()
            except ChunkReadError as e:
                self.error = e
                return False
            if item is None:
                return False
            view, slot, rejected = item
            for k, v in rejected.items():
                self.reader_rejected[k] = self.reader_rejected.get(k, 0) + v
            if view is None:
                continue
            old, self._slot = self._slot, slot
            self.ticks = view
            self.inst_list = memoryview(view["instrument"])
            self.ts_list = memoryview(view["ts_event_ns"])
            w.release(old)  # nothing reads the previous slot any more
            self.n = n = len(view)
            self.chunks_served += 1
            if n > self.max_chunk_ticks:
                self.max_chunk_ticks = n
            if self._ts0 is None:
                self._ts0 = self.ts_list[0]
            return True

    def _advance(self) -> bool:
        self._drain()
        if not self._next_chunk():
            self.done = True
            return False
        return True

    def _ranges(self):
        """Yield one ``range`` iterator per chunk; switch chunks in between (see ``poll``).

        An exception at a chunk switch ends the run (a finished generator cannot
        resume): ``done`` is set, so the next ``poll`` returns -1 and the loop stops,
        and :meth:`finish` raises it again.
        """
        try:
            while not self.done:
                self._it = it = iter(range(self.n))
                yield it
                self._advance()
        except BaseException as e:
            self.done = True
            if isinstance(e, Exception) and self.error is None:
                self.error = e
            raise

    def on_reject(self, i: int) -> None:
        """The agent rejected tick ``i`` of the current chunk."""
        self.rejected_idx.append(i)

    def attach(self, agent) -> None:
        """Remember the agent whose latency ring is drained at chunk boundaries.

        Call from the thread that will run the agent, before it pins itself: every
        other thread of the process that exists now (the polars and pyarrow pools
        of the file scan, ...) is moved to ``cpus``, off the hot core.  Loads the
        drain kernels (numba cache) now, not at the first chunk boundary.
        """
        self._agent = agent
        cpus = self._cpus
        if cpus:
            me = threading.get_native_id()
            try:
                tids = [int(t) for t in os.listdir("/proc/self/task")]
            except OSError:
                tids = []
            for tid in tids:
                if tid != me:
                    try:
                        os.sched_setaffinity(tid, cpus)
                    except (OSError, ValueError):
                        pass
        cap = agent.recorder.capacity
        if cap < 2 * max(self.max_chunk_ticks, self.chunks.chunk_rows):
            raise ValueError(f"the agent's latency ring ({cap}) must hold two chunks")
        self.latency.compile()

    def _drain(self) -> None:
        """Move the finished chunk's latencies into the histograms (runs between chunks).

        Reads the ring in place (no copy of the latencies for ``speed=None``).
        """
        agent = self._agent
        if agent is None:
            return
        seq0, seq1 = self._drained_seq, agent.seq
        rec = agent.recorder
        if seq1 > seq0:
            mask = rec.mask
            if seq0 == 0:
                self._first_t_in = int(rec.t_in[0])
            self._last_t_out = int(rec.t_out[(seq1 - 1) & mask])
            self.latency.add_ring(rec.t_in, rec.t_out, mask, seq0, seq1)
            if self.latency_intended is not None:
                idx = np.arange(seq0, seq1, dtype=np.int64) & mask
                t_out = rec.t_out[idx]
                keep = np.ones(self.n, dtype=bool)
                if self.rejected_idx:
                    keep[np.asarray(self.rejected_idx, dtype=np.int64)] = False
                intended = self.intended_ns[: self._i][keep[: self._i]]
                m = min(len(intended), len(t_out))
                self.latency_intended.add(t_out[:m] - intended[:m], seq0)
        self._drained_seq = seq1
        # rejected indices are chunk-local: the agent counts them, the list goes
        del self.rejected_idx[:]

    def wall_s(self) -> float:
        """Return seconds from the first tick's ingress to the last tick's publish."""
        return (self._last_t_out - self._first_t_in) / 1e9 if self._last_t_out else 0.0

    def finish(self) -> None:
        """Drain the last chunk and stop the reader process (after the run).

        Raises
        ------
        ChunkReadError
            Reading the file failed (corrupt data, the reader process died); the
            message names the file and the rows read before the failure.  Any
            other error that ended the run at a chunk switch is raised as is.
        """
        try:
            self._drain()
        finally:
            self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the reader process and drop this side's views of the shared memory (idempotent).

        ``handed`` keeps counting the ticks of the last chunk.  The memory is
        unmapped once nothing else (an agent still bound to the last chunk) holds
        a view of it.
        """
        self._handed += self._pos()
        self.n = self._i = 0
        self._it = None
        self.ticks = np.zeros(0, dtype=chunks_dtype())
        self.inst_list = memoryview(self.ticks["instrument"])
        self.ts_list = memoryview(self.ticks["ts_event_ns"])
        self._slot = -1
        self.done = True
        self.poll = _exhausted
        self._worker.close()

    # -- source protocol ----------------------------------------------------------------
    def start(self, now_ns: int | None = None) -> None:
        """Fix the pacing origin; without a call, the first poll fixes it."""
        self._start_ns = time.perf_counter_ns() if now_ns is None else now_ns

    def _pos(self) -> int:
        """Return the ticks of the current chunk handed out so far."""
        if self._indexed:
            return self._i
        return self._pos_of_iterator()

    @property
    def handed(self) -> int:
        """Return the ticks handed out so far."""
        return self._handed + self._pos()

    @property
    def position(self) -> int:
        """Return the rows consumed so far (handed-out ticks + reader rejects of past chunks)."""
        h = self.handed
        return min(h + sum(self.reader_rejected.values()), max(self.total, h))

    # -- batches of the native loop (engine.native_loop) ----------------------------------
    def window(self, limit: int) -> tuple[int, int]:
        """Return ``(start, stop)`` in the current chunk (switching chunks when it is done), or (0, 0).

        The first call moves the source to index mode: ``poll`` (the python loop, after a
        reload to an ``ort`` backend) then goes on from the same position.
        """
        if not self._indexed:
            self._indexed = True
            self._i = self._pos_of_iterator()
            self._it = None
            self.poll = self._poll_paced if self._paced else self._poll_index
        i = self._i
        if i >= self.n:
            if self.done or not self._advance():
                return 0, 0
            i = 0
        if self._paced and not self._start_ns:
            self._start_ns = time.perf_counter_ns()
        return i, min(self.n, i + limit)

    def consumed(self, k: int) -> None:
        """The native loop took ``k`` ticks of the window."""
        self._i += k

    def pacing(self) -> tuple[int, int, float, np.ndarray] | None:
        """``(start_ns, ts0, 1/speed, intended_ns)`` for the native loop's pacing, or None (max speed)."""
        if not self._paced:
            return None
        if not self._start_ns:
            self._start_ns = time.perf_counter_ns()
        return self._start_ns, self._ts0, self._inv_speed, self.intended_ns

    def _pos_of_iterator(self) -> int:
        it = self._it
        return self.n - operator.length_hint(it) if it is not None else 0

    def _poll_index(self) -> int:
        """``poll`` in index mode at max speed."""
        i = self._i
        if i >= self.n:
            if self.done or not self._advance():
                return -1
            i = 0
        self._i = i + 1
        return i

    def _poll_paced(self) -> int:
        """Return the next tick index once it is due, else -1 (sets ``done`` when exhausted)."""
        i = self._i
        if i >= self.n:
            if self.done or not self._advance():
                return -1
            i = 0
        now = time.perf_counter_ns()
        if not self._start_ns:
            self._start_ns = now
        due = self._start_ns + int((self.ts_list[i] - self._ts0) * self._inv_speed)
        if now < due:
            return -1
        self.intended_ns[i] = due
        self._i = i + 1
        return i


def _exhausted() -> int:
    """``poll`` of a closed source."""
    return -1


def chunks_dtype():
    """Return the tick dtype (TICK_DTYPE) without importing the schema at module import."""
    return TICK_DTYPE
