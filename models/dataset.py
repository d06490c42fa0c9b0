"""Training datasets built chunk by chunk: features, labels, a bounded row sample, the time split.

A tick file of any size becomes a :class:`Dataset` in memory bounded by the
chunk and by ``max_rows``, not by the file:

1. the reader yields chunks of validated ticks (:func:`replay.reader.iter_tick_chunks`,
   exactly as a replay of a big file reads them);
2. the shape's feature kernels compute each chunk in batch mode, their state
   carried from chunk to chunk (the same per-event core as the live path);
3. :class:`models.label.StreamingLabels` labels every row once its horizon has
   closed (it holds about one horizon of rows per instrument);
4. usable rows (accepted, finite features, defined label, past the feature
   warm-up) go to a :class:`RowSample`: all of them up to ``max_rows``, beyond
   that the ``max_rows`` rows with the smallest hash of their row number: a
   uniform sample that does not depend on the chunking.

The split (:func:`time_split`) cuts the event-time span of *all* events, so a
sampled dataset keeps the periods of the whole file.  Below ``max_rows``
usable rows nothing is sampled and the dataset equals the one built from the
whole file at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.schema import FLAG_WARMUP, KIND_QUOTE, N_REJECT_REASONS, empty_ticks
from features.kernels_l3 import compute_batch_top
from features.registry import kernels_for
from models.label import LabelSpec, StreamingLabels
from replay.reader import DEFAULT_CHUNK_ROWS, iter_tick_chunks

__all__ = [
    "Dataset",
    "Split",
    "SPLIT_FRACTIONS",
    "DEFAULT_MAX_ROWS",
    "DatasetBuilder",
    "RowSample",
    "dataset_from_ticks",
    "dataset_from_file",
    "reference_quotes",
    "time_split",
]

#: Train / validation / test fractions of the event-time span.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
#: Usable rows kept for fitting and evaluation; beyond, a uniform sample of this many.
DEFAULT_MAX_ROWS = 2_000_000


@dataclass(frozen=True, slots=True)
class Dataset:
    """Usable rows of a tick stream (all of them, or a uniform sample), in row order.

    Attributes
    ----------
    ts : ndarray, int64, (n,)
        ``ts_event_ns`` per row.
    X : ndarray, float32, (n, F)
        Features.
    flags : ndarray, int32, (n,)
        Kernel flags (all >= 0: usable rows only).
    y : ndarray, int8, (n,)
        Label (1/0).
    row : ndarray, int64, (n,)
        Row number of each kept row among the accepted ticks.
    symbols : tuple of str
        Instrument table.
    n_events : int
        Ticks seen.
    span : tuple of int
        ``(min, max)`` ``ts_event_ns`` over all ticks (the split cuts this span).
    rows : dict of str to int
        Counts over the whole stream: generated, accepted, labelled, positive,
        warmup_flagged, usable, kept, max_rows (0 = no limit).
    """

    ts: np.ndarray
    X: np.ndarray
    flags: np.ndarray
    y: np.ndarray
    row: np.ndarray
    symbols: tuple[str, ...]
    n_events: int
    span: tuple[int, int]
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        """True when fewer rows were kept than were usable."""
        return self.rows.get("kept", 0) < self.rows.get("usable", 0)


@dataclass(frozen=True, slots=True)
class Split:
    """Row masks of the time-based split and their time ranges (ns)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    ranges: dict[str, list[int]]


def time_split(
    ts: np.ndarray,
    usable: np.ndarray,
    gap_ns: int,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
    span: tuple[int, int] | None = None,
) -> Split:
    """Return train/validation/test masks over event time with a gap between parts.

    The span ``[t0, t1]`` (``span``, default ``[ts.min(), ts.max()]``) is cut
    at the given fractions; the first ``gap_ns`` of the validation and test
    periods are dropped, so with ``gap_ns >= H`` no label of an earlier part
    depends on events of a later one.  ``usable`` (bool) masks rows that may be
    used at all.
    """
    t0, t1 = (int(ts.min()), int(ts.max())) if span is None else (int(span[0]), int(span[1]))
    width = t1 - t0
    c1 = t0 + int(width * fractions[0])
    c2 = t0 + int(width * (fractions[0] + fractions[1]))
    train = usable & (ts < c1)
    val = usable & (ts >= c1 + gap_ns) & (ts < c2)
    test = usable & (ts >= c2 + gap_ns)
    ranges = {}
    for name, m in (("train", train), ("val", val), ("test", test)):
        sel = ts[m]
        ranges[name] = [int(sel.min()), int(sel.max())] if sel.size else [0, 0]
    return Split(train=train, val=val, test=test, ranges=ranges)


def reference_quotes(ticks: np.ndarray, bid: np.ndarray, ask: np.ndarray) -> np.ndarray:
    """Return quote ticks carrying a reference bid/ask per event (for the label kernel)."""
    q = empty_ticks(len(ticks))
    q["ts_event_ns"] = ticks["ts_event_ns"]
    q["ts_recv_ns"] = ticks["ts_recv_ns"]
    q["instrument"] = ticks["instrument"]
    q["kind"] = KIND_QUOTE
    q["bid_px"] = bid
    q["ask_px"] = ask
    q["bid_sz"] = 1.0
    q["ask_sz"] = 1.0
    return q


def _row_keys(row: np.ndarray, seed: int) -> np.ndarray:
    """Return a 64-bit hash of each row number (splitmix64: a bijection, so keys never tie)."""
    with np.errstate(over="ignore"):
        z = row.astype(np.uint64) + np.uint64((int(seed) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class RowSample:
    """Rows kept for fitting: every row up to ``max_rows``, then a uniform sample of ``max_rows``.

    Beyond ``max_rows`` the rows kept are those with the ``max_rows`` smallest
    hashes of their row number (bottom-k sampling): uniform, reproducible for
    a ``seed``, and independent of the order and chunking in which rows come.
    Storage is preallocated for ``max_rows`` plus a quarter (pages are touched
    only as rows arrive); ``max_rows=None`` keeps everything.
    """

    def __init__(self, n_features: int, max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.seed = int(seed)
        self.n_features = int(n_features)
        self.seen = 0
        self._n = 0
        self._threshold: np.uint64 | None = None
        self._parts: list[tuple[np.ndarray, ...]] = []  # unbounded mode
        if max_rows is not None:
            cap = int(max_rows) + max(int(max_rows) // 4, 1024)
            self._key = np.empty(cap, dtype=np.uint64)
            self._row = np.empty(cap, dtype=np.int64)
            self._ts = np.empty(cap, dtype=np.int64)
            self._X = np.empty((cap, self.n_features), dtype=np.float32)
            self._y = np.empty(cap, dtype=np.int8)
            self._flags = np.empty(cap, dtype=np.int32)

    def add(self, row: np.ndarray, ts: np.ndarray, X: np.ndarray, y: np.ndarray, flags: np.ndarray) -> None:
        """Offer rows (usable ones only)."""
        self.seen += int(row.shape[0])
        if self.max_rows is None:
            self._parts.append((row, ts, X, y, flags))
            return
        key = _row_keys(row, self.seed)
        if self._threshold is not None:
            keep = key < self._threshold
            key, row, ts, X, y, flags = key[keep], row[keep], ts[keep], X[keep], y[keep], flags[keep]
        a = 0
        cap = self._key.shape[0]
        while a < key.shape[0]:
            m = min(key.shape[0] - a, cap - self._n)
            b, e = self._n, self._n + m
            self._key[b:e], self._row[b:e], self._ts[b:e] = key[a : a + m], row[a : a + m], ts[a : a + m]
            self._X[b:e], self._y[b:e], self._flags[b:e] = X[a : a + m], y[a : a + m], flags[a : a + m]
            self._n = e
            a += m
            if self._n == cap:
                self._shrink()

    def _shrink(self) -> None:
        """Keep the ``max_rows`` smallest keys at the front of the buffers."""
        n, k = self._n, int(self.max_rows)
        if n <= k:
            return
        idx = np.argpartition(self._key[:n], k - 1)[:k]
        idx.sort()
        for buf in (self._key, self._row, self._ts, self._X, self._y, self._flags):
            buf[:k] = buf[idx]
        self._n = k
        self._threshold = self._key[:k].max()

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Return ``(row, ts, X, y, flags)`` of the kept rows in row order."""
        if self.max_rows is None:
            if not self._parts:
                self._parts = [(np.empty(0, np.int64), np.empty(0, np.int64),
                                np.empty((0, self.n_features), np.float32), np.empty(0, np.int8),
                                np.empty(0, np.int32))]  # fmt: skip
            cols = [np.concatenate(c) for c in zip(*self._parts, strict=True)]
            self._parts = [tuple(cols)]
        else:
            self._shrink()
            n = self._n
            cols = [self._row[:n], self._ts[:n], self._X[:n], self._y[:n], self._flags[:n]]
        order = np.argsort(cols[0], kind="stable")
        if np.all(order[1:] > order[:-1]):
            return tuple(np.ascontiguousarray(c) for c in cols)
        return tuple(np.ascontiguousarray(c[order]) for c in cols)


class DatasetBuilder:
    """Features, labels and the kept rows of a tick stream given chunk by chunk.

    Parameters
    ----------
    n_instruments : int
        Size of the instrument table (ids ``< n_instruments``).
    label : LabelSpec
        The label; its reference price is the shape's (:func:`dataset_from_ticks`).
    feature_set : FeatureSet
        Feature set whose kernels and parameters compute the features.
    crossing_add : str, optional
        The L3 book's crossing-add policy of the data.
    max_rows : int or None
        Usable rows kept (:class:`RowSample`); None keeps all.
    seed : int
        Seed of the sample's row hash.
    """

    def __init__(self, n_instruments: int, label: LabelSpec, feature_set: Any, *,
                 crossing_add: str | None = None, max_rows: int | None = DEFAULT_MAX_ROWS,
                 seed: int = 0) -> None:  # fmt: skip

        self.fs = feature_set
        self.kern = kernels_for(feature_set, crossing_add=crossing_add)
        self.fstate, self.istate = self.kern.new_state(int(n_instruments))
        self.params = feature_set.params_array()
        self.counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
        self.labels = StreamingLabels(n_instruments, label)
        self.sample = RowSample(len(feature_set.names), max_rows, seed)
        self.timing = {"features_s": 0.0, "labels_s": 0.0}
        self.counts = dict.fromkeys(("generated", "accepted", "labelled", "positive", "warmup_flagged"), 0)
        self.max_held = 0
        self._ts_min = np.iinfo(np.int64).max
        self._ts_max = np.iinfo(np.int64).min

    def add(self, ticks: np.ndarray) -> None:
        """Compute features and labels of the next chunk of ticks."""
        t0 = time.perf_counter()
        ticks = np.ascontiguousarray(ticks)
        n = ticks.shape[0]
        if n == 0:
            return
        X = np.empty((n, len(self.fs.names)), dtype=np.float32)
        flags = np.empty(n, dtype=np.int32)
        if self.fs.name == "l3":
            bid, ask = np.empty(n), np.empty(n)
            compute_batch_top(ticks, self.fstate, self.istate, self.params, X, flags, self.counters, bid, ask)
            ref = reference_quotes(ticks, bid, ask)
            lab_flags = np.where(np.isfinite(bid) & np.isfinite(ask) & (bid < ask) & (flags >= 0), 0, -1)
        else:
            self.kern.compute_batch(ticks, self.fstate, self.istate, self.params, X, flags, self.counters)
            ref, lab_flags = ticks, flags
            if self.fs.name == "trades":
                px = ticks["price"].astype(np.float64)
                ref = reference_quotes(ticks, px, px)
                lab_flags = np.where(flags >= 0, 0, -1)
        ts = ticks["ts_event_ns"]
        self._ts_min = min(self._ts_min, int(ts.min()))
        self._ts_max = max(self._ts_max, int(ts.max()))
        c = self.counts
        row0 = c["generated"]
        c["generated"] += n
        c["accepted"] += int((flags >= 0).sum())
        c["warmup_flagged"] += int(((flags >= 0) & ((flags & FLAG_WARMUP) != 0)).sum())
        t1 = time.perf_counter()
        self.timing["features_s"] += t1 - t0
        payload = {"row": np.arange(row0, row0 + n, dtype=np.int64), "X": X, "flags": flags}
        y, p = self.labels.add(ref, np.asarray(lab_flags, dtype=np.int32), payload)
        self.max_held = max(self.max_held, self.labels.held_rows)
        self._take(y, p)
        self.timing["labels_s"] += time.perf_counter() - t1

    def _take(self, y: np.ndarray, p: dict[str, np.ndarray]) -> None:
        if y.size == 0:
            return
        self.counts["labelled"] += int((y >= 0).sum())
        self.counts["positive"] += int((y == 1).sum())
        X, flags = p["X"], p["flags"]
        use = (flags >= 0) & np.isfinite(X).all(axis=1) & (y >= 0) & ((flags & FLAG_WARMUP) == 0)
        self.sample.add(p["row"][use], p["ts"][use], X[use], y[use], flags[use])

    def finish(self, symbols: Iterable[str]) -> Dataset:
        """Label the rows still waiting for their horizon; return the dataset."""
        t0 = time.perf_counter()
        self._take(*self.labels.finish())
        row, ts, X, y, flags = self.sample.arrays()
        self.timing["labels_s"] += time.perf_counter() - t0
        n = self.counts["generated"]
        rows = {**self.counts, "usable": self.sample.seen, "kept": int(row.shape[0]),
                "max_rows": int(self.sample.max_rows or 0), "max_held_rows": int(self.max_held)}  # fmt: skip
        span = (self._ts_min, self._ts_max) if n else (0, 0)
        return Dataset(ts=ts, X=X, flags=flags, y=y, row=row, symbols=tuple(symbols), n_events=n,
                       span=span, rows=rows)  # fmt: skip


def dataset_from_ticks(
    ticks: np.ndarray,
    symbols: tuple[str, ...],
    label: LabelSpec,
    feature_set: Any,
    *,
    crossing_add: str | None = None,
    max_rows: int | None = None,
    chunk_rows: int | None = None,
    seed: int = 0,
) -> tuple[Dataset, dict[str, float]]:
    """Return the dataset of ``ticks`` (in memory) and the seconds each stage took.

    Features come from the feature set's batch kernel (the same per-event core
    as the live path: a row at ``t`` only sees events ``<= t``).  The label is
    the shape's large move of its reference price (:mod:`models.label`): the
    quotes' mid (``l1``), the last trade (``trades``), the rebuilt book's mid
    after the event (``l3``; undefined while the book is one-sided).
    ``chunk_rows`` feeds the ticks in slices (same result, smaller work arrays).
    """
    b = DatasetBuilder(len(symbols), label, feature_set, crossing_add=crossing_add, max_rows=max_rows,
                       seed=seed)  # fmt: skip
    step = int(chunk_rows or max(len(ticks), 1))
    for a in range(0, len(ticks), step):
        b.add(ticks[a : a + step])
    ds = b.finish(symbols)
    return ds, dict(b.timing)


@dataclass
class FileDataset:
    """A dataset read from a file, with what the reader saw (:func:`dataset_from_file`)."""

    dataset: Dataset
    rows_read: int
    rejected: dict[str, int]
    timing: dict[str, float]


def dataset_from_file(
    path: str | Path,
    label: LabelSpec,
    feature_set: Any,
    *,
    mapping: Any = None,
    shape: str,
    sort_by_exchange_time: bool = False,
    chunk_rows: int | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    seed: int = 0,
) -> FileDataset:
    """Read a tick file chunk by chunk as the replay reads a big file; return its dataset.

    The file is read by :func:`replay.reader.iter_tick_chunks` (``chunk_rows``,
    default :data:`replay.reader.DEFAULT_CHUNK_ROWS`) with the replay's mapping,
    rejects and sorting; peak memory is bounded by the chunk, the rows waiting
    for their label horizon and ``max_rows``, whatever the file's size.
    """
    t0 = time.perf_counter()
    chunks = iter_tick_chunks(path, int(chunk_rows or DEFAULT_CHUNK_ROWS), mapping=mapping, shape=shape,
                              sort_by_exchange_time=sort_by_exchange_time)  # fmt: skip
    crossing = getattr(mapping, "crossing_add", None)
    b = DatasetBuilder(len(chunks.symbols), label, feature_set, crossing_add=crossing, max_rows=max_rows,
                       seed=seed)  # fmt: skip
    for ch in chunks:
        b.add(ch.ticks)
    ds = b.finish(chunks.symbols)
    if ds.n_events == 0:
        why = ", ".join(f"{k} {v:,}" for k, v in chunks.rejected.items()) or "the file is empty"
        raise ValueError(f"{path}: no acceptable rows to train on (rejected: {why})")
    timing = {"read_s": time.perf_counter() - t0 - sum(b.timing.values()), **b.timing}
    return FileDataset(dataset=ds, rows_read=int(chunks.rows_read),
                       rejected=dict(chunks.rejected), timing=timing)  # fmt: skip
