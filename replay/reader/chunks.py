"""Bounded-memory chunked reading (:class:`TickChunks`), exactly the ticks of a whole read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from engine.schema import (
    N_REJECT_REASONS,
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_OK,
    empty_ticks,
)
from features.validate import validate_rows
from replay.mapping import IDENTITY, ColumnMapping
from replay.reader.base import DEFAULT_CHUNK_ROWS, SHAPES, TickChunk, _add, _reasons
from replay.reader.files import _BadRows, _check_file, _format_of, _iter_frames, _read_error
from replay.reader.normalise import (
    _FAST_FLOAT_FIELDS,
    _column,
    _count_same_ts,
    _fast_plan_ok,
    _normalise,
    _text,
)
from replay.reader.plan import _make_plan, _Plan
from replay.reader.read import _drop_absurd, _symbol_table

_SCAN_ROWS = 1 << 20


def _release_arrow_memory() -> None:
    """Hand pyarrow's freed pool memory back to the OS (the scan's frames: ~200 MB on a big file)."""
    import pyarrow as pa  # deferred: pyarrow only on this file-format path

    try:
        pa.default_memory_pool().release_unused()
    except AttributeError:  # pragma: no cover - pyarrow < 9
        pass


class TickChunks:
    """Iterator over a file's ticks in bounded chunks (see :func:`iter_tick_chunks`).

    Attributes
    ----------
    symbols : list of str
        Instrument table of the whole file (scanned before the first chunk).
    total_rows : int
        Rows in the file (from the Parquet footer or the scan of a CSV).
    rows_read : int
        Rows consumed so far.
    rejected, anomalies : dict of str to int
        Running totals of the reader's rejects / anomalies.
    shape : str
    """

    def __init__(
        self,
        path: str | Path,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        *,
        mapping: ColumnMapping | None = None,
        shape: str | None = None,
        symbols: Sequence[str] | None = None,
        sort_by_exchange_time: bool = False,
        max_rows: int | None = None,
    ) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.path = Path(path)
        self.mapping = mapping or IDENTITY
        self.chunk_rows = int(chunk_rows)
        self.shape = shape or self.mapping.shape or "l1"
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {list(SHAPES)}")
        self.sort = bool(sort_by_exchange_time)
        self.max_rows = None if max_rows is None else max(int(max_rows), 0)
        self.rows_read = 0
        self.rejected: dict[str, int] = {}
        self.anomalies: dict[str, int] = {}
        self._bad_rows = _BadRows()
        self._plan: _Plan | None = None
        table = _symbol_table(symbols)
        self.total_rows, scanned = self._scan(need_symbols=table is None)
        self.symbols: list[str] = table if table is not None else scanned
        self._index = {s: i for i, s in enumerate(self.symbols)}
        if self.max_rows is not None:
            self.total_rows = min(self.total_rows, self.max_rows)
        self._last_ts = np.full(len(self.symbols), np.iinfo(np.int64).min, dtype=np.int64)
        self._same_ts_last = np.full(len(self.symbols), np.iinfo(np.int64).min, dtype=np.int64)
        self._prev_recv = np.iinfo(np.int64).min
        self._run_max = np.iinfo(np.int64).min
        self._run_emitted = np.iinfo(np.int64).min
        self._started = False

    # -- pre-scan: row count and symbol table, reading only what is needed --------------
    def _scan(self, need_symbols: bool) -> tuple[int, list[str]]:
        p = self.path
        _check_file(p)
        fmt = _format_of(p, self.mapping)
        head = next(_iter_frames(p, self.mapping, 1000), None)
        if head is None:
            return 0, []
        self._plan = _make_plan(head.columns, self.mapping, self.shape, p)
        sym_cols = [] if "symbol" in self._plan.const else self._plan.cols.get("symbol", [])
        if fmt == "parquet":
            import pyarrow.parquet as pq  # deferred: pyarrow only on this file-format path

            total = pq.ParquetFile(p).metadata.num_rows
            if not need_symbols or not sym_cols:
                return total, ([self._plan.const["symbol"]] if "symbol" in self._plan.const else [])
        elif not sym_cols:
            cols = [head.columns[0]]
            total = sum(f.height for f in _iter_frames(p, self.mapping, _SCAN_ROWS, cols, _BadRows()))
            return total, [self._plan.const["symbol"]]
        seen: set[str] = set()
        total = 0
        for f in _iter_frames(p, self.mapping, _SCAN_ROWS, sym_cols, _BadRows()):
            total += f.height
            if need_symbols:
                seen.update(_text(_column(f, self._plan, "symbol")).drop_nulls().unique().to_list())  # type: ignore[arg-type]
        _release_arrow_memory()
        return total, sorted(seen)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TickChunk]:
        if self._started:
            raise RuntimeError("a TickChunks iterator can be consumed only once")
        self._started = True
        return self._gen()

    def _fast_parquet_columns(self) -> list[str] | None:
        """Return the columns to read with polars' own Parquet reader, or None.

        Only for a Parquet file whose plan takes the fast path and whose used
        columns have plain Arrow types (64-bit integer times, string symbol, 8/16-bit
        integer kind and side, double prices and sizes): for those types both
        readers give the same frame, and polars' reader decodes about twice as
        cheaply as pyarrow's batches converted to polars (strings especially).
        """
        plan, mp = self._plan, self.mapping
        if plan is None or not _fast_plan_ok(plan, mp) or _format_of(self.path, mp) != "parquet":
            return None
        import pyarrow as pa  # deferred: pyarrow only on this file-format path
        import pyarrow.parquet as pq  # deferred: pyarrow only on this file-format path

        ints = (pa.int8(), pa.uint8(), pa.int16(), pa.uint16())
        allowed = {"ts_event": (pa.int64(),), "ts_recv": (pa.int64(),),
                   "symbol": (pa.string(), pa.large_string()), "kind": ints, "side": ints}  # fmt: skip
        allowed.update({c: (pa.float64(),) for c in _FAST_FLOAT_FIELDS})
        try:
            schema = pq.read_schema(self.path)
        except Exception:
            return None
        if len(set(schema.names)) != len(schema.names):
            return None
        cols = []
        for fld, names in plan.cols.items():
            if fld not in allowed or names[0] not in schema.names:
                return None
            if schema.field(names[0]).type not in allowed[fld]:
                return None
            cols.append(names[0])
        return cols

    def _frames(self) -> Iterator[pl.DataFrame]:
        """Yield the raw frames of ``chunk_rows`` rows each (the last one shorter)."""
        cols = self._fast_parquet_columns()
        if cols is None:
            yield from _iter_frames(self.path, self.mapping, self.chunk_rows, None, self._bad_rows)
            return
        _check_file(self.path)
        try:
            lf = pl.scan_parquet(self.path).select(cols)
            off = 0
            while True:
                frame = lf.slice(off, self.chunk_rows).collect()
                if frame.height:
                    yield frame
                if frame.height < self.chunk_rows:
                    return
                off += frame.height
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:
            raise _read_error(self.path, "Parquet", e) from e

    def _normalised(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (candidate ticks, reader reject counts) per raw chunk, in file order."""
        mp = self.mapping
        for frame in self._frames():
            if self.max_rows is not None:
                if self.rows_read >= self.max_rows:
                    break
                frame = frame.head(self.max_rows - self.rows_read)
            if self._plan is None:
                self._plan = _make_plan(frame.columns, mp, self.shape, self.path)
            norm = _normalise(frame, self._plan, mp, self._index)
            counts = np.zeros(N_REJECT_REASONS, dtype=np.int64)
            counts[REJECT_MALFORMED] += norm.n_malformed
            counts[REJECT_NONFINITE] += norm.n_nonfinite_ts
            self.rows_read += frame.height
            cand = norm.ticks
            an = {"skipped": norm.n_skipped}
            if len(cand):
                recv = cand["ts_recv_ns"]
                # = count_nonzero(recv < [prev_recv, recv[0], ..., recv[-2]]), without the copy
                back = int(recv[0] < self._prev_recv)
                an["recv_backwards"] = back + int(np.count_nonzero(recv[1:] < recv[:-1]))
                self._prev_recv = int(recv[-1])
                if self.sort:
                    ts = cand["ts_event_ns"]
                    runmax = np.maximum.accumulate(np.concatenate(([self._run_max], ts)))[:-1]
                    an["reordered"] = int(np.count_nonzero(ts < runmax))
                    self._run_max = int(max(self._run_max, ts.max()))
            _add(self.anomalies, an)
            yield cand, counts
        if self._bad_rows.n and (self.max_rows is None or self.rows_read < self.max_rows):
            counts = np.zeros(N_REJECT_REASONS, dtype=np.int64)
            counts[REJECT_MALFORMED] = self._bad_rows.n
            self.rows_read += self._bad_rows.n
            self._bad_rows.n = 0
            yield empty_ticks(0), counts

    def _sorted(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Windowed stable sort by exchange time over the normalised chunks."""
        pending = empty_ticks(0)
        limit = 2 * self.chunk_rows
        src = self._normalised()
        cur = next(src, None)
        while cur is not None:
            nxt = next(src, None)
            ticks, counts = cur
            merged = np.concatenate((pending, ticks)) if len(pending) else ticks
            if len(merged):
                merged = merged[np.argsort(merged["ts_event_ns"], kind="stable")]
            if nxt is None:
                out, pending = merged, empty_ticks(0)
            else:
                nts = nxt[0]["ts_event_ns"]
                if len(nts):
                    cut = int(np.searchsorted(merged["ts_event_ns"], nts.min(), side="right"))
                else:
                    cut = 0
                if len(merged) - cut > limit:  # bound the memory: hand on the oldest rows
                    cut = len(merged) - limit
                out, pending = merged[:cut], merged[cut:]
            if len(out):
                late = int(np.count_nonzero(out["ts_event_ns"] < self._run_emitted))
                if late:
                    _add(self.anomalies, {"late": late})
            if len(out):
                self._run_emitted = int(max(self._run_emitted, out["ts_event_ns"].max()))
            yield out, counts
            cur = nxt

    def _gen(self) -> Iterator[TickChunk]:
        src = self._sorted() if self.sort else self._normalised()
        for cand, counts in src:
            cand = _drop_absurd(cand, counts)
            if self.shape == "l1" and len(cand):
                reasons = np.empty(len(cand), dtype=np.uint8)
                n_ok = validate_rows(cand, self._last_ts, reasons, counts)
                ticks = cand if n_ok == len(cand) else cand[reasons == REJECT_OK]
            else:
                ticks = cand
            if self.shape != "l3" and len(ticks):
                _add(self.anomalies, {"same_ts": _count_same_ts(ticks, self._same_ts_last)})
            rej = _reasons(counts)
            _add(self.rejected, rej)
            yield TickChunk(ticks=ticks, rejected=rej)

    @property
    def rejected_total(self) -> int:
        """Return the reader's rejected rows so far."""
        return sum(self.rejected.values())


def iter_tick_chunks(
    path: str | Path,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    *,
    mapping: ColumnMapping | None = None,
    shape: str | None = None,
    symbols: Sequence[str] | None = None,
    sort_by_exchange_time: bool = False,
    max_rows: int | None = None,
) -> TickChunks:
    """Return an iterator over the file's ticks in chunks of at most about ``chunk_rows`` rows.

    Memory is bounded by the chunk size (a handful of chunks at most) whatever
    the file size.  Before the first chunk the file's instrument table and row
    count are determined (Parquet: footer + the symbol column; CSV: one pass
    over the symbol column only).  Concatenating the chunks' ticks gives exactly
    :func:`read_ticks`' ticks (with ``sort_by_exchange_time``: when no row is
    displaced by more than one chunk).

    Parameters are those of :func:`read_ticks` plus ``chunk_rows``.  The
    returned :class:`TickChunks` yields :class:`TickChunk` objects and keeps
    running totals (``rows_read``, ``rejected``, ``anomalies``).
    """
    return TickChunks(path, chunk_rows, mapping=mapping, shape=shape, symbols=symbols,
                      sort_by_exchange_time=sort_by_exchange_time, max_rows=max_rows)  # fmt: skip
