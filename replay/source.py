"""In-process replay sources: hand ticks to the scoring agent, paced or not.

:class:`ReplaySource` serves an in-memory tick array; :class:`ChunkedReplaySource`
serves a file larger than memory chunk by chunk (:func:`replay.reader.iter_tick_chunks`):
a background thread reads and normalises the next chunk while the agent works
on the current one, and the source swaps ``ticks`` / ``inst_list`` / ``ts_list``
at the chunk boundary (the agent re-reads them on every ``do_work``).

Pacing: ``speed=None`` releases ticks as fast as the agent takes them; ``speed=s``
releases tick ``i`` at ``start + (ts_event[i] - ts_event[0]) / s`` on the
monotonic clock (``s=1`` is recorded speed).  The intended release time of every
tick is kept (``intended_ns``) so reports can measure latency from when a tick
*should* have been handled, which keeps coordinated omission visible.
"""

from __future__ import annotations

import array
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

__all__ = ["ReplaySource", "ChunkedReplaySource", "ChunkLatency", "parse_speed"]


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


class ChunkLatency:
    """Latency account of a chunked replay, kept in bounded memory.

    The agent's latency ring is drained at every chunk boundary into a
    log-linear count array with HdrHistogram's bucket layout for 3 significant
    digits (values below 2048 ns exact, above: 1024 sub-buckets per power of
    two), with one vectorised ``bincount`` (a few ms per million ticks), and exact
    count / min / max / mean.  :meth:`stats` records each bucket once into an
    HdrHistogram (1 ns .. 1 h, 3 digits, as :mod:`replay.latency`): every tick
    lands in the bucket it would have landed in if recorded one by one, so the
    percentiles are those of the raw values.  The first ``warmup`` scored ticks
    are left out.
    """

    _SUB = 2048  # sub-buckets per magnitude (3 significant digits)

    def __init__(self, warmup: int) -> None:
        from replay.latency import _HIGHEST_NS, _LOWEST_NS

        self._hi = _HIGHEST_NS
        self._lo = _LOWEST_NS
        self._n_mag = int(_HIGHEST_NS).bit_length() - 10 + 1
        self.counts = np.zeros(self._n_mag * self._SUB, dtype=np.int64)
        self.warmup = int(warmup)
        self.count = 0
        self.total = 0.0
        self.vmax = 0
        self.vmin = 0
        self.out_of_range = 0
        self._hist = None

    def add(self, values: np.ndarray, first_seq: int) -> None:
        """Record latencies (ns, int64) of consecutive seqs starting at ``first_seq``."""
        skip = max(0, self.warmup - first_seq)
        v = values[skip:] if skip else values
        if v.size == 0:
            return
        acc = np.zeros(4, dtype=np.float64)
        oor = _bucket_add(np.ascontiguousarray(v, dtype=np.int64), self.counts, self._lo, self._hi, acc)
        self.out_of_range += int(oor)
        vmax, vmin = int(acc[1]), int(acc[2])
        self.vmax = vmax if self.count == 0 else max(self.vmax, vmax)
        self.vmin = vmin if self.count == 0 else min(self.vmin, vmin)
        self.count += int(v.size)
        self.total += float(acc[0])
        self._hist = None

    @property
    def hist(self):
        """Return the HdrHistogram of everything recorded (built once per change)."""
        if self._hist is None:
            from hdrh.histogram import HdrHistogram

            from replay.latency import _SIG_FIGS

            h = HdrHistogram(self._lo, self._hi, _SIG_FIGS)
            for key in np.flatnonzero(self.counts).tolist():
                e, m = divmod(key, self._SUB)
                h.record_value(m << e, int(self.counts[key]))
            self._hist = h
        return self._hist

    def stats(self):
        """Return :class:`replay.latency.LatencyStats` of everything recorded."""
        from replay.latency import PERCENTILES, LatencyStats

        if self.count == 0:
            return LatencyStats(0, {k: 0 for k in PERCENTILES}, 0, 0.0, 0, 0)
        h = self.hist
        pct = {k: min(int(h.get_value_at_percentile(p)), self.vmax) for k, p in PERCENTILES.items()}
        return LatencyStats(self.count, pct, self.vmax, self.total / self.count, self.vmin, self.out_of_range)

    def write_hgrm(self, path) -> None:
        """Write the percentile distribution (µs), as :func:`replay.latency.write_hgrm` does."""
        import io
        from pathlib import Path

        buf = io.BytesIO()
        self.hist.output_percentile_distribution(buf, output_value_unit_scaling_ratio=1000.0,
                                                 ticks_per_half_distance=5)  # fmt: skip
        Path(path).write_bytes(buf.getvalue())


@njit(cache=True, nogil=True)
def _bucket_add(values, counts, lo, hi, acc):
    """Add ``values`` (ns) to the log-linear ``counts``; acc = [sum, max, min]; return out-of-range count."""
    oor = 0
    s = 0.0
    vmax = values[0]
    vmin = values[0]
    for i in range(values.shape[0]):
        v = values[i]
        s += v
        if v > vmax:
            vmax = v
        if v < vmin:
            vmin = v
        if v > hi:
            oor += 1
            v = hi
        elif v < lo:
            v = lo
        e = 0
        x = v >> 11
        while x > 0:
            x >>= 1
            e += 1
        counts[e * 2048 + (v >> e)] += 1
    acc[0] += s
    acc[1] = vmax
    acc[2] = vmin
    return oor


@dataclass
class _Loaded:
    ticks: np.ndarray
    inst_list: array.array
    ts_list: array.array
    rejected: dict = field(default_factory=dict)
    rows_after: int = 0


class ChunkedReplaySource:
    """Source over a tick file read in bounded chunks (source protocol of engine.scorer).

    Parameters
    ----------
    chunks : replay.reader.TickChunks
        The file's chunk iterator (not yet started).
    speed : float or None
        None = as fast as possible; else the factor of recorded speed.
    limit : int, optional
        Hand out at most this many ticks.
    warmup : int
        Scored ticks left out of the latency statistics.
    prefetch : int
        Chunks read ahead by the background thread (memory: about
        ``prefetch + 2`` chunks).
    cpus : set of int, optional
        Cores for the background reader thread (keep it off the hot core).

    ``inst_list`` / ``ts_list`` are ``array.array`` (int32 / int64): indexing
    returns Python ints like a list, at a fifth of a list's memory, and building
    them is one copy (a list of a million ints would hold the GIL for tens of
    ms on the reader thread while the hot thread waits).

    The agent must be attached (:meth:`attach`) before the run: at every chunk
    boundary the source drains the agent's latency ring into :attr:`latency`
    (and :attr:`latency_intended` when paced) and truncates
    ``agent.rejected_idx``, so nothing grows with the file.
    """

    def __init__(self, chunks, speed: float | None = None, *, limit: int | None = None,
                 warmup: int = 0, prefetch: int = 1, cpus: set[int] | None = None) -> None:  # fmt: skip
        self.chunks = chunks
        self.symbols = list(chunks.symbols)
        self.total = int(chunks.total_rows) if limit is None else min(int(chunks.total_rows), int(limit))
        self.speed = speed
        self.limit = limit
        self.latency = ChunkLatency(warmup)
        self.latency_intended = ChunkLatency(warmup) if speed is not None else None
        self.reader_rejected: dict[str, int] = {}
        self.chunks_served = 0
        self.max_chunk_ticks = 0
        self.done = False
        self.error: BaseException | None = None
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self._handed = 0
        self._rows_done = 0
        self._agent = None
        self._drained_seq = 0
        self._rej_start = 0
        self._first_t_in = 0
        self._last_t_out = 0
        self._start_ns = 0
        self._ts0 = None
        self._inv_speed = 1.0 / speed if speed else 0.0
        self._cpus = set(cpus) if cpus else None
        self._thread = threading.Thread(target=self._produce, name="tickscore-chunks", daemon=True)
        self._thread.start()
        self.ticks = np.zeros(0, dtype=chunks_dtype())
        self.inst_list: array.array = array.array("i")
        self.ts_list: array.array = array.array("q")
        self.intended_ns = None
        self.n = 0
        self._i = 0
        self._next_chunk()  # the first chunk, synchronously
        if speed is not None:
            self.poll = self._poll_paced  # type: ignore[method-assign]

    # -- producer (background thread) -------------------------------------------------
    def _produce(self) -> None:
        if self._cpus:
            try:
                os.sched_setaffinity(0, self._cpus)  # this thread only (Linux)
            except (OSError, ValueError):
                pass
        left = self.limit
        try:
            for ch in self.chunks:
                if self._stop.is_set():
                    return
                t = ch.ticks
                if left is not None:
                    t = t[:left]
                    left -= len(t)
                t = np.ascontiguousarray(t)
                inst = array.array("i", np.ascontiguousarray(t["instrument"], dtype=np.int32).tobytes())
                ts = array.array("q", np.ascontiguousarray(t["ts_event_ns"], dtype=np.int64).tobytes())
                item = _Loaded(t, inst, ts, ch.rejected, self.chunks.rows_read)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if left is not None and left <= 0:
                    break
        except BaseException as e:  # noqa: BLE001 - reported by the consumer
            self.error = e
        finally:
            while not self._stop.is_set():
                try:
                    self._q.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _next_chunk(self) -> bool:
        """Swap in the next non-empty chunk; return False at the end (hot thread, off the clock)."""
        while True:
            item = self._q.get()
            if item is None:
                if self.error is not None:
                    raise RuntimeError(f"reading {self.chunks.path} failed: {self.error}") from self.error
                return False
            for k, v in item.rejected.items():
                self.reader_rejected[k] = self.reader_rejected.get(k, 0) + v
            self._rows_done = item.rows_after
            if len(item.ticks) == 0:
                continue
            self._handed += self._i  # ticks of the finished chunk
            self.ticks = item.ticks
            self.inst_list = item.inst_list
            self.ts_list = item.ts_list
            self.n = len(item.ticks)
            self._i = 0
            self.chunks_served += 1
            self.max_chunk_ticks = max(self.max_chunk_ticks, self.n)
            if self._ts0 is None:
                self._ts0 = self.ts_list[0]
            if self.speed is not None:
                self.intended_ns = np.zeros(self.n, dtype=np.int64)
            return True

    def attach(self, agent) -> None:
        """Remember the agent whose latency ring is drained at chunk boundaries.

        Call from the thread that will run the agent, before it pins itself: every
        other thread of the process that exists now (the reader, the polars and
        pyarrow pools it started) is moved to ``cpus``, off the hot core.
        """
        self._agent = agent
        if self._cpus:
            me = threading.get_native_id()
            try:
                tids = [int(t) for t in os.listdir("/proc/self/task")]
            except OSError:
                tids = []
            for tid in tids:
                if tid != me:
                    try:
                        os.sched_setaffinity(tid, self._cpus)
                    except (OSError, ValueError):
                        pass
        cap = agent.recorder.capacity
        if cap < 2 * max(self.max_chunk_ticks, self.chunks.chunk_rows):
            raise ValueError(f"the agent's latency ring ({cap}) must hold two chunks")

    def _drain(self) -> None:
        """Move the finished chunk's latencies into the histograms (runs between chunks)."""
        agent = self._agent
        if agent is None:
            return
        seq0, seq1 = self._drained_seq, agent.seq
        rec = agent.recorder
        if seq1 > seq0:
            idx = np.arange(seq0, seq1, dtype=np.int64) & rec.mask
            t_out = rec.t_out[idx]
            if seq0 == 0:
                self._first_t_in = int(rec.t_in[idx[0]])
            self._last_t_out = int(t_out[-1])
            self.latency.add(t_out - rec.t_in[idx], seq0)
            if self.latency_intended is not None and self.intended_ns is not None:
                rej = agent.rejected_idx[self._rej_start:]
                keep = np.ones(self.n, dtype=bool)
                if rej:
                    keep[np.asarray(rej, dtype=np.int64)] = False
                intended = self.intended_ns[: self._i][keep[: self._i]]
                m = min(len(intended), len(t_out))
                self.latency_intended.add(t_out[:m] - intended[:m], seq0)
        self._drained_seq = seq1
        # rejected indices are chunk-local: keep the count, drop the list
        del agent.rejected_idx[:]
        self._rej_start = 0

    def wall_s(self) -> float:
        """Return seconds from the first tick's ingress to the last tick's publish."""
        return (self._last_t_out - self._first_t_in) / 1e9 if self._last_t_out else 0.0

    def finish(self) -> None:
        """Drain the last chunk and stop the reader thread (after the run)."""
        self._drain()
        self._stop.set()
        self._thread.join(timeout=5.0)

    # -- source protocol ----------------------------------------------------------------
    def start(self, now_ns: int | None = None) -> None:
        """Fix the pacing origin; without a call, the first poll fixes it."""
        self._start_ns = time.perf_counter_ns() if now_ns is None else now_ns

    @property
    def handed(self) -> int:
        """Return the ticks handed out so far."""
        return self._handed + self._i

    @property
    def position(self) -> int:
        """Return the rows consumed so far (handed-out ticks + reader rejects of past chunks)."""
        h = self.handed
        return min(h + sum(self.reader_rejected.values()), max(self.total, h))

    def _advance(self) -> bool:
        self._drain()
        if not self._next_chunk():
            self.done = True
            return False
        return True

    def poll(self) -> int:
        """Return the next tick index in ``ticks``, or -1 once exhausted (sets ``done``)."""
        i = self._i
        if i >= self.n:
            if self.done or not self._advance():
                return -1
            i = 0
        self._i = i + 1
        return i

    def _poll_paced(self) -> int:
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


def chunks_dtype():
    """Return the tick dtype (TICK_DTYPE) without importing the schema at module import."""
    from engine.schema import TICK_DTYPE

    return TICK_DTYPE
