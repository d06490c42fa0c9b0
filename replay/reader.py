"""Read market files (Parquet, CSV, CSV.gz) into tick arrays, whole or in bounded chunks.

:func:`read_ticks` loads a whole file; :func:`iter_tick_chunks` streams a file
larger than memory in chunks of at most ``chunk_rows`` rows (pyarrow streaming
readers: Parquet row groups / batches, CSV and gzip CSV blocks), so memory
stays bounded by the chunk size whatever the file size.  Both normalise rows
into numpy arrays of :data:`engine.schema.TICK_DTYPE` without a per-row Python
loop, with the same code, so reading in chunks gives exactly the ticks of one
whole read.  Bad rows never raise: they are counted by reject reason.

A file in another vendor's layout is read through a column mapping
(:mod:`replay.mapping`: column names, timestamp units, price encodings, event
and side codes); without one the file must be in the normalised schema below.

Event shapes (``shape``)
------------------------

* ``l1`` (default): quotes and trades.  The reader applies the single
  acceptance rule of :func:`features.validate.validate_tick` (in file order,
  carried across chunks): the ticks it returns are exactly the ones the L1 live
  loop would accept, every other row is counted by reason.
* ``trades``: trade-only feeds (time, price, size, optional aggressor side); a
  missing ``kind`` means every row is a trade.
* ``l3``: order-by-order events (add / modify / delete / trade-or-fill by order
  id, clear).  Whether an event is acceptable depends on the book (an unknown
  order id, a price far from the mid), so for ``trades`` and ``l3`` the reader
  only rejects what cannot become a tick at all (``malformed``, a non-finite
  timestamp) and the feature kernel counts the rest when it applies the event.

Normalised file schema
----------------------
One row per market event, rows in file order (normally event-time order);
columns are matched by name (case-insensitive), extra columns are ignored.

=============  ==========  =========================================================
column         type        meaning
=============  ==========  =========================================================
ts_event_ns    int64       exchange (event) time, ns since the Unix epoch; required
ts_recv_ns     int64       local receive time, ns; optional, missing or null ->
                           ``ts_event_ns``
symbol         str         instrument symbol, e.g. ``ESZ6``; required
kind           int or str  1 or ``"quote"``, 2 or ``"trade"`` (case-insensitive);
                           3/4/5 or ``add``/``modify``/``delete`` (also
                           ``book_add``/``book_modify``/``book_delete``) for L3
                           order events (rejected as ``bad_kind`` in the ``l1``
                           shape); required
bid_px         float64     best bid price (quotes; null on trades)
bid_sz         float64     best bid size (quotes; null on trades)
ask_px         float64     best ask price (quotes; null on trades)
ask_sz         float64     best ask size (quotes; null on trades)
price          float64     trade price (trades), order price (L3 events)
size           float64     trade size (trades), order size (add, modify: the new
                           size; delete: the quantity cancelled, 0/null = all)
side           int8        trade aggressor: +1 buyer-initiated, -1 seller-initiated,
                           0 unknown (``"buy"``/``"b"``, ``"sell"``/``"s"`` also
                           read); L3 order side (+1 bid, -1 ask); optional -> 0
order_id       uint64      order id (L3); optional, missing or null -> 0
=============  ==========  =========================================================

``ts_event_ns``, ``symbol`` and ``kind`` must be present.  The quote columns
(``bid_px bid_sz ask_px ask_sz``) and the trade columns (``price size``) come as
groups: a file may leave out a whole group (e.g. a trades-only file), but not
part of one, and not both.  Fields that do not apply to a row's kind are ignored
and set to 0 in the tick.  Parquet may use any integer/float widths (and
Datetime for the timestamps); CSV values are parsed from text.  ``.csv.gz`` is
decompressed on the fly; a file without a known suffix is recognised by its
first bytes.

Rejected rows, by reason name of :data:`engine.schema.REJECT_NAMES`:

* ``malformed``: the row cannot be normalised: null or unparsable required
  field (``ts_event_ns``, ``symbol``, ``kind``, and the fields of its kind:
  quote prices and sizes; trade price and size; add price, size, side and
  order id; modify price, size and order id; delete order id), unknown kind
  string, invalid ``side`` or ``order_id``; a CSV line with the wrong number of
  fields when streaming (whole reads fill a short line with nulls);
* ``nonfinite``: NaN/inf in a timestamp, and (``l1``) in a price or size;
* ``nonpositive``, ``crossed``, ``time_backwards``, ``unknown_instrument``,
  ``bad_kind`` (``l1`` only here; the kernels count them for the other shapes):
  price or size <= 0, quote with bid > ask (locked is accepted), ``ts_event_ns``
  earlier than the previous accepted event of the same instrument, symbol not in
  the given instrument table, a kind other than quote/trade.

Anomalies (rows kept, counted in ``anomalies``): ``skipped`` (rows whose kind
maps to ``skip``), ``recv_backwards`` (a ``ts_recv_ns`` earlier than the
previous row's, in file order: kept, receive time is never used for ordering or
features), ``reordered`` (rows moved by ``sort_by_exchange_time``), ``late``
(rows displaced by more than the sort window, handed on out of order: the
kernels then reject them as ``time_backwards``).

Sorting by exchange time (``sort_by_exchange_time=True``) is a stable sort on
``ts_event_ns`` (file order kept for equal times).  A whole read sorts exactly;
a chunked read sorts with a window: rows are held back until the next chunk
shows no earlier time, so it is exact as long as no row is displaced by more
than one chunk (``chunk_rows``), and memory stays bounded (at most about three
chunks are held).

Known limit: a CSV line with *more* fields than the header is truncated to the
header's columns rather than rejected in a whole read.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
from numba import njit

from engine.schema import (
    KIND_BOOK_ADD,
    KIND_BOOK_DELETE,
    KIND_BOOK_MODIFY,
    KIND_QUOTE,
    KIND_TRADE,
    N_REJECT_REASONS,
    REJECT_MALFORMED,
    REJECT_NAMES,
    REJECT_NONFINITE,
    REJECT_OK,
    TICK_DTYPE,
    empty_ticks,
)
from features.validate import validate_tick
from replay.mapping import IDENTITY, KIND_CLEAR, KIND_PRINT, KIND_SKIP, ColumnMapping, norm_code

__all__ = [
    "REQUIRED_COLUMNS",
    "QUOTE_COLUMNS",
    "TRADE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "SHAPES",
    "TickData",
    "TickChunk",
    "TickChunks",
    "read_ticks",
    "iter_tick_chunks",
    "detect_shape",
]

#: Rows per chunk when a file is read chunk by chunk (replay of big files, training).
DEFAULT_CHUNK_ROWS = 1_000_000

#: Columns every file must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("ts_event_ns", "symbol", "kind")
#: Quote columns (all or none).
QUOTE_COLUMNS: tuple[str, ...] = ("bid_px", "bid_sz", "ask_px", "ask_sz")
#: Trade columns (all or none).
TRADE_COLUMNS: tuple[str, ...] = ("price", "size")
#: Optional columns and their default.
OPTIONAL_COLUMNS: tuple[str, ...] = ("ts_recv_ns", "side", "order_id")
#: Event shapes.
SHAPES: tuple[str, ...] = ("l1", "trades", "l3")

_SCHEMA_HINT = (
    "expected columns: ts_event_ns (int64 ns), symbol (str), kind (1/'quote' or "
    "2/'trade'), quote columns bid_px, bid_sz, ask_px, ask_sz and/or trade columns "
    "price, size (float64); optional ts_recv_ns (int64), side (int8 +1/-1/0), "
    "order_id (uint64); a file in another layout needs a column mapping "
    "(--map / --map-file, see 'Bringing your own data' in the README)"
)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".gz", ".tsv", ".txt")
# field -> normalised column name
_NORM_COL = {"ts_event": "ts_event_ns", "ts_recv": "ts_recv_ns", "symbol": "symbol", "kind": "kind",
             "side": "side", "price": "price", "size": "size", "bid_px": "bid_px", "bid_sz": "bid_sz",
             "ask_px": "ask_px", "ask_sz": "ask_sz", "order_id": "order_id"}  # fmt: skip
_UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class TickData:
    """Accepted ticks of one file and the account of what was read.

    Attributes
    ----------
    ticks : ndarray of TICK_DTYPE
        Accepted rows only (``l1``; for ``trades``/``l3``: every row that could be
        normalised, for the kernel to judge), in file order (or exchange-time order).
    symbols : list of str
        Instrument table: ``symbols[tick["instrument"]]`` is the symbol.
    rows : int
        Rows read from the file (accepted + rejected + skipped).
    rejected : dict of str to int
        Rejected rows per reason name of ``engine.schema.REJECT_NAMES``; only
        non-zero counts, never ``"ok"``.
    path : str
        The file read.
    anomalies : dict of str to int
        Rows kept or dropped by a documented rule (see the module docstring).
    shape : str
        Event shape the file was read as.
    """

    ticks: np.ndarray
    symbols: list[str]
    rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    path: str = ""
    anomalies: dict[str, int] = field(default_factory=dict)
    shape: str = "l1"

    @property
    def rejected_total(self) -> int:
        """Return the number of rejected rows (all reasons)."""
        return sum(self.rejected.values())


@dataclass
class TickChunk:
    """One chunk of :func:`iter_tick_chunks`: ticks and what the reader rejected in it."""

    ticks: np.ndarray
    rejected: dict[str, int]


# =========================================================================== file access
def _format_of(path: Path, mp: ColumnMapping) -> str:
    if mp.format != "auto":
        return mp.format
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    with path.open("rb") as f:
        head = f.read(4)
    return "parquet" if head == b"PAR1" else "csv"


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"tick file not found: {path}")
    if not path.is_file():
        raise ValueError(f"tick file {path} is not a regular file")


def _read_error(path: Path, label: str, e: Exception) -> ValueError:
    return ValueError(
        f"cannot read {path} as {label} (corrupt or not a {label} file): {type(e).__name__}: {e}"
    )


def _read_frame(path: Path, mp: ColumnMapping = IDENTITY) -> pl.DataFrame:
    """Read a whole file into a frame (CSV: every column as text)."""
    _check_file(path)
    fmt = _format_of(path, mp)
    label = {"parquet": "Parquet", "csv": "CSV"}[fmt]
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        # All columns as text: unparsable values become per-row nulls below
        # (counted as malformed) instead of failing the whole file.
        frame = pl.read_csv(
            path, infer_schema=False, encoding="utf8-lossy", truncate_ragged_lines=True,
            has_header=mp.header, separator=mp.separator,
        )  # fmt: skip
        if not mp.header:
            frame.columns = [f"column_{i + 1}" for i in range(frame.width)]
        return frame
    except (FileNotFoundError, PermissionError):
        raise
    except pl.exceptions.NoDataError as e:
        raise ValueError(f"cannot read {path} as {label}: file is empty ({e})") from e
    except Exception as e:
        raise _read_error(path, label, e) from e


def _csv_header(path: Path, mp: ColumnMapping) -> list[str]:
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            line = f.readline()
    except (OSError, EOFError) as e:
        raise _read_error(path, "CSV", e) from e
    if not line.strip():
        raise ValueError(f"cannot read {path} as CSV: file is empty")

    fields = next(csv.reader([line.rstrip("\r\n")], delimiter=mp.separator))
    if mp.header:
        return [c.strip() for c in fields]
    return [f"column_{i + 1}" for i in range(len(fields))]


class _BadRows:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, row) -> str:
        self.n += 1
        return "skip"


def _iter_frames(
    path: Path, mp: ColumnMapping, chunk_rows: int, columns: list[str] | None = None, bad=None
) -> Iterator[pl.DataFrame]:
    """Yield frames of at most ``chunk_rows`` rows (CSV: text columns), in bounded memory."""
    import pyarrow as pa  # deferred: pyarrow only on this file-format path

    _check_file(path)
    fmt = _format_of(path, mp)
    if fmt == "parquet":
        import pyarrow.parquet as pq  # deferred: pyarrow only on this file-format path

        try:
            # pre_buffer=False: with pre-buffering, iter_batches keeps every row group's
            # buffers until the end (memory grows with the file); without, it stays flat
            pf = pq.ParquetFile(path, pre_buffer=False)
        except Exception as e:
            raise _read_error(path, "Parquet", e) from e
        cols = None
        if columns is not None:
            have = set(pf.schema_arrow.names)
            cols = [c for c in columns if c in have]
        try:
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=cols):
                yield pl.from_arrow(pa.Table.from_batches([batch]))  # type: ignore[misc]
        except Exception as e:
            raise _read_error(path, "Parquet", e) from e
        return
    import pyarrow.csv as pcsv  # deferred: pyarrow only on this file-format path

    names = _csv_header(path, mp)
    stream = pa.input_stream(str(path), compression="gzip" if _is_gzip(path) else None)
    include = names if columns is None else [c for c in names if c in set(columns)]
    read_opts = pcsv.ReadOptions(column_names=names, skip_rows=1 if mp.header else 0,
                                 block_size=8 << 20, use_threads=True)  # fmt: skip
    parse_opts = pcsv.ParseOptions(delimiter=mp.separator, invalid_row_handler=bad or _BadRows())
    conv_opts = pcsv.ConvertOptions(
        column_types={c: pa.string() for c in names}, include_columns=include,
        strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True,
    )  # fmt: skip
    try:
        reader = pcsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts,
                               convert_options=conv_opts)  # fmt: skip
    except pa.ArrowInvalid as e:
        if "Empty CSV" in str(e):
            return
        raise _read_error(path, "CSV", e) from e
    except Exception as e:
        raise _read_error(path, "CSV", e) from e
    pending: list[pl.DataFrame] = []
    held = 0
    try:
        for batch in reader:
            df = pl.from_arrow(pa.Table.from_batches([batch]))
            assert isinstance(df, pl.DataFrame)
            pending.append(df)
            held += df.height
            while held >= chunk_rows:
                big = pl.concat(pending) if len(pending) > 1 else pending[0]
                yield big.head(chunk_rows)
                rest = big.slice(chunk_rows)
                pending = [rest] if rest.height else []
                held = rest.height
    except Exception as e:
        if isinstance(e, GeneratorExit):
            raise
        raise _read_error(path, "CSV", e) from e
    if held:
        yield pl.concat(pending) if len(pending) > 1 else pending[0]


# =========================================================================== column plan
@dataclass
class _Plan:
    """Which frame columns (or constants) feed each field, decided once per file."""

    cols: dict[str, list[str]]
    const: dict[str, str]
    shape: str
    default_kind: int | None = None
    ts_unit: str | None = None
    ts_recv_unit: str | None = None
    oid_hash: bool | None = None
    #: code tables of the fast path (:func:`_code_lut`), built on first use per dtype
    luts: dict | None = None


def _find(columns: list[str], name: str) -> str | None:
    if name in columns:
        return name
    low = name.strip().lower()
    hits = [c for c in columns if c.strip().lower() == low]
    return hits[0] if len(hits) == 1 else None


def _make_plan(columns: list[str], mp: ColumnMapping, shape: str, path: Path) -> _Plan:
    cols: dict[str, list[str]] = {}
    const = dict(mp.constants)
    if not mp.explicit:
        # normalised schema: the field's own column name (case-insensitive)
        for fld, name in _NORM_COL.items():
            c = _find(columns, name)
            if c is not None:
                cols[fld] = [c]
        have = {_NORM_COL[f] for f in cols}
        problems = []
        need = list(REQUIRED_COLUMNS)
        if shape == "trades":
            need = [c for c in need if c != "kind"]
        missing = [c for c in need if c not in have]
        if missing:
            problems.append(f"missing required columns {missing}")
        groups = [(QUOTE_COLUMNS, "quote"), (TRADE_COLUMNS, "trade")]
        for group, label in groups:
            got = [c for c in group if c in have]
            if got and len(got) < len(group):
                lack = [c for c in group if c not in have]
                problems.append(f"incomplete {label} columns: missing {lack} (have {got})")
        if not any(c in have for c in QUOTE_COLUMNS + TRADE_COLUMNS):
            problems.append(
                f"neither quote columns {list(QUOTE_COLUMNS)} nor trade columns "
                f"{list(TRADE_COLUMNS)} present"
            )
        if problems:
            raise ValueError(
                f"{path}: not in the normalised tick schema: {'; '.join(problems)}. "
                f"Found columns {columns}; {_SCHEMA_HINT}"
            )
    else:
        for fld in _NORM_COL:
            names = mp.source(fld)
            if not names:
                if fld in const:
                    continue
                c = _find(columns, _NORM_COL[fld]) or (_find(columns, fld) if fld != _NORM_COL[fld] else None)
                if c is not None:
                    cols[fld] = [c]
                continue
            found = [c for c in (_find(columns, n) for n in names) if c is not None]
            if not found:
                raise ValueError(
                    f"{path}: mapping: column {'|'.join(names)!r} for {fld} not found; "
                    f"the file has columns {columns}"
                    + ("" if mp.header else " (no header: columns are column_1, column_2, ...)")
                )
            cols[fld] = found
        if "ts_event" not in cols and "ts_event" not in const:
            raise ValueError(
                f"{path}: mapping: no column for ts_event (map it, e.g. --map ts_event=time); "
                f"the file has columns {columns}"
            )
        if "symbol" not in cols and "symbol" not in const:
            stem = path.name
            for suf in (".gz", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
                if stem.lower().endswith(suf):
                    stem = stem[: -len(suf)]
            const["symbol"] = stem
        groups = ((("bid_px", "bid_sz", "ask_px", "ask_sz"), "quote"), (("price", "size"), "trade"))
        for group, label in groups:
            got = [f for f in group if f in cols or f in const]
            if got and len(got) < len(group):
                lack = [f for f in group if f not in got]
                raise ValueError(
                    f"{path}: mapping: {label} field(s) {lack} not mapped (mapped: {got}); "
                    f"map all of {list(group)}, e.g. --map {lack[0]}=COLUMN; the file has columns {columns}"
                )
        if not any(f in cols for f in ("price", "bid_px")):
            raise ValueError(
                f"{path}: mapping: neither price/size nor bid/ask columns are mapped; "
                f"the file has columns {columns}"
            )
    plan = _Plan(cols=cols, const=const, shape=shape)
    if "kind" not in cols and "kind" not in const:
        has_quotes = "bid_px" in cols
        if shape == "trades" or (mp.explicit and not has_quotes and shape != "l3"):
            plan.default_kind = KIND_TRADE
        else:
            raise ValueError(
                f"{path}: no kind column; map it (--map kind=COLUMN) or use --shape trades "
                f"for a trade-only file; the file has columns {columns}"
            )
    return plan


# =========================================================================== column parsing
def _where(ok: pl.Series, v: pl.Series, other: pl.Series | None = None) -> pl.Series:
    """Return ``v`` where ``ok`` is true, else ``other`` (default null)."""
    return pl.select(pl.when(ok.fill_null(False)).then(v).otherwise(other)).to_series()


def _text(s: pl.Series) -> pl.Series:
    """Return ``s`` as stripped strings, empty -> null (null if not castable)."""
    try:
        t = s.cast(pl.String, strict=False)
    except Exception:  # e.g. nested types: nothing usable
        return pl.repeat(None, len(s), dtype=pl.String, eager=True).alias(s.name)
    t = t.str.strip_chars()
    return _where(t != "", t)


def _nonfinite_text(t: pl.Series) -> pl.Series:
    """Return True where text parses as a NaN/inf float."""
    f = t.cast(pl.Float64, strict=False)
    return (f.is_nan() | f.is_infinite()).fill_null(False)


def _column(frame: pl.DataFrame, plan: _Plan, fld: str) -> pl.Series | None:
    """Return the field's raw series (constants repeated; alternatives coalesced) or None."""
    if fld in plan.const:
        return pl.repeat(plan.const[fld], frame.height, dtype=pl.String, eager=True).alias(fld)
    names = plan.cols.get(fld)
    if not names:
        return None
    if len(names) == 1:
        return frame[names[0]]
    parts = [frame[n] for n in names]
    if len({p.dtype for p in parts}) > 1:
        parts = [_text(p) for p in parts]
    return pl.select(pl.coalesce(parts)).to_series().alias(fld)


def _auto_unit(mag: float) -> str | None:
    if mag >= 1e17:
        return "ns"
    if mag >= 1e14:
        return "us"
    if mag >= 1e11:
        return "ms"
    if mag >= 1e8:
        return "s"
    return None


def _midnight_ns(mp: ColumnMapping) -> int:
    d = _dt.date.fromisoformat(mp.ts_date)  # type: ignore[arg-type]

    tz = _dt.UTC if mp.ts_tz.upper() == "UTC" else ZoneInfo(mp.ts_tz)
    return int(_dt.datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()) * 1_000_000_000


def _epoch_of_datetime(s: pl.Series, mp: ColumnMapping) -> pl.Series:
    if s.dtype.time_zone is None and mp.ts_tz.upper() != "UTC":  # type: ignore[union-attr]
        s = s.dt.replace_time_zone(mp.ts_tz, ambiguous="earliest", non_existent="null")
    return s.dt.epoch("ns")


def _to_ns(
    s: pl.Series, unit: str, mp: ColumnMapping, plan: _Plan, which: str
) -> tuple[pl.Series, pl.Series]:
    """Return (Int64 ns since epoch, null where unusable; bool nonfinite flag)."""
    n = len(s)
    no = pl.repeat(False, n, dtype=pl.Boolean, eager=True)
    dt = s.dtype
    base = _midnight_ns(mp) if mp.ts_date else 0
    if isinstance(dt, pl.Datetime):
        return _epoch_of_datetime(s, mp), no
    if isinstance(dt, pl.Date):
        return s.cast(pl.Datetime("ns")).dt.epoch("ns"), no
    if unit == "ns" and not mp.ts_date:
        # the normalised schema: integers (or integral floats / integer text) in ns
        if dt.is_integer():
            return s.cast(pl.Int64, strict=False), no
        if dt.is_float():
            f = s.cast(pl.Float64)
            nonfinite = (f.is_nan() | f.is_infinite()).fill_null(False)
            ok = f.is_finite() & (f == f.floor())
            return _where(ok, f.cast(pl.Int64, strict=False)), nonfinite
    if dt.is_numeric():
        f = s.cast(pl.Float64)
        nonfinite = (f.is_nan() | f.is_infinite()).fill_null(False) if dt.is_float() else no
        u = _resolve_unit(unit, f.abs().median(), plan, which)
        U = _UNIT_NS[u]
        if dt.is_integer():
            v = s.cast(pl.Int64, strict=False)
            lim = _INT64_MAX // U
            v = _where(v.abs() <= lim, v * U)
        else:
            # whole units and the fraction separately: f * 1e9 alone would round to 256 ns
            ok = f.is_finite() & (f.abs() < 9.2e18 / U)
            whole = _where(ok, f.floor())
            frac = ((f - whole) * U).round(0).cast(pl.Int64, strict=False)
            v = _where(ok, whole.cast(pl.Int64, strict=False) * U + frac)
        return (v + base if base else v), nonfinite
    # text: exact decimal numbers, or datetimes
    t = _text(s)
    m = t.str.extract_groups(r"^([+-]?)(\d+)(?:\.(\d*))?$")
    sign = m.struct.field("1")
    ip = m.struct.field("2").cast(pl.Int64, strict=False)
    numeric = ip.is_not_null()
    nonfinite = _nonfinite_text(t)
    out = pl.repeat(None, n, dtype=pl.Int64, eager=True)
    if numeric.any():
        if unit == "datetime":
            u = "s"
        else:
            mag = ip.filter(numeric).abs().median()
            u = _resolve_unit(unit, float(mag) if mag is not None else 0.0, plan, which)
        U = _UNIT_NS[u]
        ftxt = m.struct.field("3").fill_null("")
        frac = ftxt.str.pad_end(9, "0").str.slice(0, 9).cast(pl.Int64)
        lim = (_INT64_MAX - 10**9) // U
        mag_ns = ip * U + frac * U // 1_000_000_000
        ok = ip <= lim
        if U == 1:  # a fraction of a nanosecond is not a time
            ok = ok & ~ftxt.str.contains("[1-9]")
        val = _where(ok, pl.select(pl.when(sign == "-").then(-mag_ns).otherwise(mag_ns)).to_series())
        out = _where(numeric, val + base if base else val, out)
    rest = t.is_not_null() & ~numeric & ~nonfinite
    if rest.any():
        # scientific notation and the like: float seconds in the unit
        f = t.cast(pl.Float64, strict=False)
        is_num = rest & f.is_not_null()
        if is_num.any():
            u = _resolve_unit(unit, float(f.filter(is_num).abs().median()), plan, which)
            U = _UNIT_NS[u]
            v = (f * U).round(0).cast(pl.Int64, strict=False)
            out = _where(is_num, v + base if base else v, out)
        is_dt = rest & ~is_num
        if is_dt.any() and (unit in ("auto", "datetime") or mp.ts_date):
            txt = t
            if mp.ts_date:
                txt = _where(t.str.contains(r"^\d{1,2}:\d\d"), pl.lit(mp.ts_date + " ") + t, t)  # type: ignore[arg-type]
            try:
                d = txt.str.to_datetime(
                    format=mp.ts_format, time_unit="ns", strict=False, ambiguous="earliest"
                )
            except Exception:
                d = pl.repeat(None, n, dtype=pl.Datetime("ns"), eager=True)
            out = _where(is_dt, _epoch_of_datetime(d, mp), out)
    return out, nonfinite


def _resolve_unit(unit: str, mag: float | None, plan: _Plan, which: str) -> str:
    attr = "ts_unit" if which == "event" else "ts_recv_unit"
    if unit in _UNIT_NS:
        return unit
    fixed = getattr(plan, attr)
    if fixed is not None:
        return fixed
    if unit == "datetime":
        return "s"
    u = _auto_unit(float(mag or 0.0))
    if u is None:
        raise ValueError(
            f"cannot infer the unit of timestamps like {mag:g}: set ts_unit (ns, us, ms, s) "
            "or ts_date for times of day"
        )
    setattr(plan, attr, u)  # same unit for every chunk of the file
    return u


def _scale(v: pl.Series, scale: float) -> pl.Series:
    if scale == 1.0:
        return v
    inv = 1.0 / scale
    k = round(math.log10(inv)) if inv > 0 else 0
    if k > 0 and abs(inv - 10.0**k) < 1e-9 * inv:
        # exact decimal: a correctly rounded division (numpy; polars multiplies by
        # the reciprocal, which is off by one ulp for e.g. 1234567 / 10000)
        q = pl.Series(v.name, v.fill_null(0.0).to_numpy() / float(10**k))
        return _where(v.is_not_null(), q)
    return v * scale


def _as_float(s: pl.Series) -> pl.Series:
    """Return a Float64 price/size column, null where missing or unparsable (NaN stays NaN)."""
    if s.dtype.is_numeric():
        return s.cast(pl.Float64, strict=False)
    return _text(s).cast(pl.Float64, strict=False)


def _as_price(s: pl.Series, mp: ColumnMapping) -> pl.Series:
    if mp.price_int_scale != 1.0:
        if s.dtype.is_integer():
            v = _scale(s.cast(pl.Float64), mp.price_int_scale)
        elif s.dtype.is_float():
            v = s.cast(pl.Float64)
        else:
            t = _text(s)
            f = t.cast(pl.Float64, strict=False)
            is_int = t.str.contains(r"^[+-]?\d+$").fill_null(False)
            v = _where(is_int, _scale(f, mp.price_int_scale), f)
    else:
        v = _as_float(s)
    return _scale(v, mp.price_scale)


def _codes(s: pl.Series, table: dict[str, int], keep_ints: bool) -> pl.Series:
    """Return Int64 codes of a kind/side column via ``table`` (null if unknown)."""
    dt = s.dtype
    if dt.is_integer():  # fast path: integer keys of the table, no text round trip
        ints = {}
        for k, v in table.items():
            try:
                ints[int(norm_code(k))] = v
            except ValueError:
                continue
        v = s.cast(pl.Int64, strict=False)
        if keep_ints:
            return v.replace(ints)
        return v.replace_strict(ints, default=None, return_dtype=pl.Int64)
    if dt == pl.Boolean:
        t = s.cast(pl.String).str.to_lowercase()
    elif dt.is_integer():
        t = s.cast(pl.Int64, strict=False).cast(pl.String)
    elif dt.is_float():
        f = s.cast(pl.Float64)
        t = _where(f.is_finite() & (f == f.floor()), f.cast(pl.Int64, strict=False).cast(pl.String))
    else:
        t = _text(s).str.to_lowercase()
        f = t.cast(pl.Float64, strict=False)
        t = _where(f.is_not_null() & f.is_finite() & (f == f.floor()) & ~t.str.contains("e"),
                   f.cast(pl.Int64, strict=False).cast(pl.String), t)  # fmt: skip
    keys = list(table)
    if keys and all(k == norm_code(k) for k in keys):
        named = t.replace_strict(table, default=None, return_dtype=pl.Int64)
    else:
        named = t.replace_strict({norm_code(k): v for k, v in table.items()}, default=None,
                                 return_dtype=pl.Int64)  # fmt: skip
    if keep_ints:
        named = named.fill_null(t.cast(pl.Int64, strict=False))
    return named


def _as_order_id(s: pl.Series, plan: _Plan, mp: ColumnMapping) -> pl.Series:
    """Return a UInt64 order id column, null where present but invalid."""
    if s.dtype.is_integer():
        return s.cast(pl.UInt64, strict=False)
    if s.dtype.is_float():
        f = s.cast(pl.Float64)
        return _where(f.is_finite() & (f == f.floor()), f.cast(pl.UInt64, strict=False))
    t = _text(s)
    if plan.oid_hash is None:
        if mp.order_id_hash == "auto":
            as_int = t.cast(pl.UInt64, strict=False)
            plan.oid_hash = bool((t.is_not_null() & as_int.is_null()).any())
        else:
            plan.oid_hash = mp.order_id_hash == "true"
    if plan.oid_hash:
        h = t.hash(seed=0)
        h = pl.select(pl.when(h == 0).then(pl.lit(1, pl.UInt64)).otherwise(h)).to_series()
        h = _where(t.is_not_null(), h)
        return h.cast(pl.UInt64)
    return t.cast(pl.UInt64, strict=False)


def _np(s: pl.Series, fill: float | int, dtype: type) -> np.ndarray:
    return s.fill_null(fill).to_numpy().astype(dtype, copy=False)


# =========================================================================== one frame -> ticks
@dataclass
class _Norm:
    ticks: np.ndarray  # every row that is neither malformed nor skipped, file order
    n_malformed: int
    n_nonfinite_ts: int
    n_skipped: int


def _instruments(raw_sym: pl.Series, index: dict[str, int]) -> tuple[pl.Series, pl.Series]:
    """Return (Int32 instrument ids, -1 where unknown or null; Boolean symbol-null flags)."""
    if raw_sym.dtype == pl.String:  # fast path: clean symbols map without trimming
        inst = raw_sym.replace_strict(index, default=None, return_dtype=pl.Int32)
        if not (inst.is_null() & raw_sym.is_not_null()).any():
            return inst.fill_null(-1), raw_sym.is_null()
    sym = _text(raw_sym)
    return sym.replace_strict(index, default=-1, return_dtype=pl.Int32), sym.is_null()


def _normalise(frame: pl.DataFrame, plan: _Plan, mp: ColumnMapping, index: dict[str, int]) -> _Norm:
    """Return the normalised ticks of a frame (no per-row Python)."""
    if _fast_ok(frame, plan, mp):
        return _normalise_fast(frame, plan, mp, index)
    n = frame.height
    shape = plan.shape
    raw_sym = _column(frame, plan, "symbol")
    assert raw_sym is not None
    inst, sym_null = _instruments(raw_sym, index)

    ts_event, ts_nonfinite = _to_ns(_column(frame, plan, "ts_event"), mp.ts_unit, mp, plan, "event")  # type: ignore[arg-type]
    raw_recv = _column(frame, plan, "ts_recv")
    if raw_recv is not None:
        ts_recv, recv_nonfinite = _to_ns(raw_recv, mp.ts_recv_unit or mp.ts_unit, mp, plan, "recv")
        ts_nonfinite = ts_nonfinite | recv_nonfinite
        ts_recv = _where(ts_recv.is_not_null(), ts_recv, ts_event)
    else:
        ts_recv = ts_event
    raw_kind = _column(frame, plan, "kind")
    if raw_kind is None:
        kind = pl.repeat(plan.default_kind, n, dtype=pl.Int64, eager=True)
    else:
        kind = _codes(raw_kind, mp.kinds, keep_ints=True)
    skip = (kind == KIND_SKIP).fill_null(False)
    is_q = (kind == KIND_QUOTE).fill_null(False)
    is_t = ((kind == KIND_TRADE) | (kind == KIND_PRINT)).fill_null(False)
    is_add = (kind == KIND_BOOK_ADD).fill_null(False)
    is_mod = (kind == KIND_BOOK_MODIFY).fill_null(False)
    is_del = (kind == KIND_BOOK_DELETE).fill_null(False)
    is_clear = (kind == KIND_CLEAR).fill_null(False)
    is_book = is_add | is_mod | is_del

    malformed = sym_null | kind.is_null() | (ts_event.is_null() & ~ts_nonfinite)
    empty = pl.repeat(None, n, dtype=pl.Float64, eager=True)
    fields: dict[str, pl.Series] = {}
    for c in ("bid_px", "ask_px", "price"):
        raw = _column(frame, plan, c)
        fields[c] = _as_price(raw, mp) if raw is not None else empty
    for c in ("bid_sz", "ask_sz", "size"):
        raw = _column(frame, plan, c)
        fields[c] = _scale(_as_float(raw), mp.size_scale) if raw is not None else empty
    for c in QUOTE_COLUMNS:
        malformed = malformed | (is_q & fields[c].is_null())
    for c in TRADE_COLUMNS:
        malformed = malformed | (is_t & fields[c].is_null())
    raw = _column(frame, plan, "side")
    if raw is not None:
        side = _codes(raw, mp.sides, keep_ints=False)
        present = _text(raw).is_not_null() if not raw.dtype.is_numeric() else raw.is_not_null()
        bad_side = present & (side.is_null() | ~side.is_in([-1, 0, 1]).fill_null(False))
        malformed = malformed | bad_side
        side = side.fill_null(0)
    else:
        side = pl.repeat(0, n, dtype=pl.Int64, eager=True)
    raw = _column(frame, plan, "order_id")
    if raw is not None:
        oid = _as_order_id(raw, plan, mp)
        present = _text(raw).is_not_null() if not raw.dtype.is_numeric() else raw.is_not_null()
        malformed = malformed | (present & oid.is_null())
    else:
        oid = pl.repeat(0, n, dtype=pl.UInt64, eager=True)
    if shape == "l3":
        has_oid = (oid.is_not_null() & (oid != 0)).fill_null(False)
        malformed = malformed | (is_book & ~has_oid)
        for c in ("price", "size"):
            malformed = malformed | ((is_add | is_mod) & fields[c].is_null())
        malformed = malformed | (is_add & (side == 0).fill_null(True))
    malformed = malformed & ~skip
    ts_nonfinite = ts_nonfinite & ~malformed & ~skip  # malformed takes precedence

    # One nogil numba pass fills the kept rows (a reader thread then barely holds the GIL).
    bad = malformed.to_numpy()
    bad_ts = ts_nonfinite.to_numpy()
    sk = skip.to_numpy()
    keep = ~(bad | bad_ts | sk)
    n_keep = int(keep.sum())
    ticks = np.empty(n_keep, dtype=TICK_DTYPE)
    l3_kinds = is_book | is_clear if shape == "l3" else is_book
    _fill_ticks(
        ticks, keep, _np(ts_event, 0, np.int64), _np(ts_recv, 0, np.int64), _np(inst, -1, np.int32),
        _np(kind, 0, np.int64), _np(side, 0, np.int64),
        _np(fields["bid_px"], 0.0, np.float64), _np(fields["bid_sz"], 0.0, np.float64),
        _np(fields["ask_px"], 0.0, np.float64), _np(fields["ask_sz"], 0.0, np.float64),
        _np(fields["price"], 0.0, np.float64), _np(fields["size"], 0.0, np.float64),
        _np(oid, 0, np.uint64), is_q.to_numpy(), is_t.to_numpy(), l3_kinds.to_numpy(),
        mp.trade_side == "resting",
    )  # fmt: skip
    return _Norm(ticks, int(bad.sum()), int(bad_ts.sum()), int(sk.sum()))


@njit(cache=True, nogil=True)
def _fill_ticks(out, keep, ts, recv, inst, kind, side, bpx, bsz, apx, asz, px, sz, oid, is_q, is_t, is_b,
                resting):  # fmt: skip
    """Write the kept rows into ``out`` (TICK_DTYPE): fields of other kinds 0, special kinds mapped."""
    j = 0
    for i in range(keep.shape[0]):
        if not keep[i]:
            continue
        r = out[j]
        r.ts_event_ns = ts[i]
        r.ts_recv_ns = recv[i]
        r.instrument = inst[i]
        k = kind[i]
        if k == KIND_PRINT:
            k = KIND_TRADE
        elif k == KIND_CLEAR:
            k = KIND_BOOK_DELETE
        r.kind = k if 0 <= k <= 255 else 0
        q = is_q[i]
        tb = is_t[i] or is_b[i]
        sd = side[i]
        if resting and is_t[i]:
            sd = -sd
        r.side = sd if tb else 0
        r.bid_px = bpx[i] if q else 0.0
        r.bid_sz = bsz[i] if q else 0.0
        r.ask_px = apx[i] if q else 0.0
        r.ask_sz = asz[i] if q else 0.0
        r.price = px[i] if tb else 0.0
        r.size = sz[i] if tb else 0.0
        r.order_id = oid[i]
        if kind[i] == KIND_PRINT or kind[i] == KIND_CLEAR:
            r.order_id = 0
        if kind[i] == KIND_CLEAR:
            r.price = 0.0
            r.size = 0.0
            r.side = 0
        j += 1
    return j


@njit(cache=True, nogil=True)
def _validate_rows(ticks, last_ts, reasons_out, counts_out):
    """Validate rows in order against carried per-instrument ``last_ts``; return n accepted."""
    n_ok = 0
    for i in range(ticks.shape[0]):
        r = validate_tick(ticks, i, last_ts)
        reasons_out[i] = r
        counts_out[r] += 1
        if r == REJECT_OK:
            last_ts[ticks[i].instrument] = ticks[i].ts_event_ns
            n_ok += 1
    return n_ok


@njit(cache=True, nogil=True)
def _count_same_ts(ticks, last_ts):
    """Return how many ticks repeat their instrument's previous timestamp (carried ``last_ts``)."""
    n = 0
    for i in range(ticks.shape[0]):
        inst = ticks[i].instrument
        if inst < 0 or inst >= last_ts.shape[0]:
            continue
        ts = ticks[i].ts_event_ns
        if ts == last_ts[inst]:
            n += 1
        last_ts[inst] = ts
    return n


# =========================================================================== fast path
# A frame already in the normalised schema with native column types (what the
# project's generator writes: Int64 times, String symbol, small-integer kind and
# side, Float64 prices and sizes) is normalised by one nogil numba pass over the
# columns' Arrow buffers (zero copy) instead of ~40 polars expressions.  It is
# taken only when every step of the general path above is, for those types,
# either the identity (the casts, ``_as_price`` / ``_scale`` with scale 1, the
# ``ns`` timestamps) or an elementwise code-table lookup over a small integer
# domain; the lookup tables are built by running the general path's own
# :func:`_codes` over the whole domain (:func:`_code_lut`) and the symbols go
# through the same :func:`_instruments`, so both paths give the same ticks and
# the same counts.  Anything else (other types, mappings with scales or dates,
# coalesced or constant columns, order ids, the ``trades``/``l3`` shapes) takes
# the general path.
_FAST_CODE_TYPES = {pl.Int8: np.int8, pl.UInt8: np.uint8, pl.Int16: np.int16, pl.UInt16: np.uint16}
_FAST_FLOAT_FIELDS = ("bid_px", "bid_sz", "ask_px", "ask_sz", "price", "size")


def _ro(a: np.ndarray) -> np.ndarray:
    """Return a read-only view of ``a``: one numba signature whatever the arrays' origin."""
    v = a.view()
    v.flags.writeable = False
    return v


_EMPTY_U8 = _ro(np.zeros(0, dtype=np.uint8))
_EMPTY_I64 = _ro(np.zeros(0, dtype=np.int64))
_EMPTY_F64 = _ro(np.zeros(0, dtype=np.float64))


def _fast_plan_ok(plan: _Plan, mp: ColumnMapping) -> bool:
    """Return True when the plan and mapping allow :func:`_normalise_fast` (column types aside)."""
    if plan.shape != "l1" or plan.const or plan.default_kind is not None:
        return False
    if "order_id" in plan.cols or "kind" not in plan.cols or "ts_event" not in plan.cols:
        return False
    if any(len(names) != 1 for names in plan.cols.values()):
        return False
    return not (mp.ts_unit != "ns" or (mp.ts_recv_unit or "ns") != "ns" or mp.ts_date
                or mp.price_scale != 1.0 or mp.price_int_scale != 1.0 or mp.size_scale != 1.0)  # fmt: skip


def _fast_ok(frame: pl.DataFrame, plan: _Plan, mp: ColumnMapping) -> bool:
    """Return True when :func:`_normalise_fast` is provably equivalent for ``frame``."""
    if not _fast_plan_ok(plan, mp):
        return False
    schema = frame.schema
    for fld, names in plan.cols.items():
        if len(names) != 1 or names[0] not in schema:
            return False
        dt = schema[names[0]]
        if fld in ("ts_event", "ts_recv"):
            ok = dt == pl.Int64
        elif fld == "symbol":
            ok = dt == pl.String
        elif fld in ("kind", "side"):
            ok = dt.base_type() in _FAST_CODE_TYPES
        elif fld in _FAST_FLOAT_FIELDS:
            ok = dt == pl.Float64
        else:
            ok = False
        if not ok:
            return False
    return True


def _buffers(s: pl.Series, np_dtype: type) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (values, validity bitmap or empty when no null, bit offset) of a numeric series, zero copy."""
    import pyarrow as pa  # deferred: pyarrow only on this file-format path

    a = s.to_arrow()
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    n, off = len(a), a.offset
    bufs = a.buffers()
    if n == 0:
        return _ro(np.zeros(0, dtype=np_dtype)), _EMPTY_U8, 0
    vals = _ro(np.frombuffer(bufs[1], dtype=np_dtype, count=off + n)[off:])
    if a.null_count and bufs[0] is not None:
        return vals, _ro(np.frombuffer(bufs[0], dtype=np.uint8)), off
    return vals, _EMPTY_U8, 0


def _code_lut(plan: _Plan, fld: str, dt: pl.DataType, table: dict[str, int], keep_ints: bool):
    """Return (codes, valid, lowest value) of :func:`_codes` over the whole domain of ``dt``."""
    if plan.luts is None:
        plan.luts = {}
    key = (fld, str(dt))
    if key not in plan.luts:
        info = np.iinfo(_FAST_CODE_TYPES[dt.base_type()])
        dom = pl.Series(fld, np.arange(int(info.min), int(info.max) + 1, dtype=np.int64)).cast(dt)
        codes = _codes(dom, table, keep_ints=keep_ints)
        plan.luts[key] = (
            _ro(codes.fill_null(0).to_numpy().astype(np.int64)),
            _ro(codes.is_not_null().to_numpy().astype(np.uint8)),
            int(info.min),
        )
    return plan.luts[key]


def _normalise_fast(frame: pl.DataFrame, plan: _Plan, mp: ColumnMapping, index: dict[str, int]) -> _Norm:
    """:func:`_normalise` for a frame accepted by :func:`_fast_ok` (same result)."""
    n = frame.height
    cols = plan.cols
    inst, sym_null = _instruments(frame[cols["symbol"][0]], index)
    inst_np = _ro(np.ascontiguousarray(inst.to_numpy(), dtype=np.int32))
    sym_null_np = _ro(np.ascontiguousarray(sym_null.to_numpy(), dtype=np.bool_))
    ts, ts_v, ts_o = _buffers(frame[cols["ts_event"][0]], np.int64)
    if "ts_recv" in cols:
        rc, rc_v, rc_o = _buffers(frame[cols["ts_recv"][0]], np.int64)
    else:
        rc, rc_v, rc_o = _EMPTY_I64, _EMPTY_U8, 0
    raw = frame[cols["kind"][0]]
    klut, klut_v, klo = _code_lut(plan, "kind", raw.dtype, mp.kinds, True)
    kd, kd_v, kd_o = _buffers(raw, _FAST_CODE_TYPES[raw.dtype.base_type()])
    if "side" in cols:
        raw = frame[cols["side"][0]]
        slut, slut_v, slo = _code_lut(plan, "side", raw.dtype, mp.sides, False)
        sd, sd_v, sd_o = _buffers(raw, _FAST_CODE_TYPES[raw.dtype.base_type()])
    else:
        slut, slut_v, slo = _EMPTY_I64, _EMPTY_U8, 0
        sd, sd_v, sd_o = _EMPTY_I64, _EMPTY_U8, 0
    f = {}
    for c in _FAST_FLOAT_FIELDS:
        f[c] = _buffers(frame[cols[c][0]], np.float64) if c in cols else (_EMPTY_F64, _EMPTY_U8, 0)
    ticks = np.zeros(n, dtype=TICK_DTYPE)
    n_keep, n_bad, n_skip = _fill_fast(
        ticks, inst_np, sym_null_np, ts, ts_v, ts_o, rc, rc_v, rc_o, "ts_recv" in cols,
        kd, kd_v, kd_o, klut, klut_v, klo, sd, sd_v, sd_o, slut, slut_v, slo, "side" in cols,
        *f["bid_px"], *f["bid_sz"], *f["ask_px"], *f["ask_sz"], all(c in cols for c in QUOTE_COLUMNS),
        *f["price"], *f["size"], all(c in cols for c in TRADE_COLUMNS), mp.trade_side == "resting",
    )  # fmt: skip
    if n_keep < n:
        ticks = ticks[:n_keep].copy()
    return _Norm(ticks, int(n_bad), 0, int(n_skip))


@njit(cache=True, nogil=True, inline="always")
def _ok(valid, off, i):
    """Return True if row ``i`` is not null (``valid``: Arrow validity bitmap, empty = no null)."""
    if valid.shape[0] == 0:
        return True
    b = off + i
    return (valid[b >> 3] >> (b & 7)) & 1 == 1


@njit(cache=True, nogil=True)
def _fill_fast(out, inst, sym_null, ts, ts_v, ts_o, rc, rc_v, rc_o, has_recv, kd, kd_v, kd_o, klut,
               klut_v, klo, sd, sd_v, sd_o, slut, slut_v, slo, has_side, bpx, bpx_v, bpx_o, bsz, bsz_v,
               bsz_o, apx, apx_v, apx_o, asz, asz_v, asz_o, has_q, px, px_v, px_o, sz, sz_v, sz_o, has_t,
               resting):  # fmt: skip
    """One pass of :func:`_normalise` + :func:`_fill_ticks` (``l1``); return (kept, malformed, skipped)."""
    j = 0
    n_bad = 0
    n_skip = 0
    for i in range(inst.shape[0]):
        bad = sym_null[i]
        t = np.int64(0)
        if _ok(ts_v, ts_o, i):
            t = ts[i]
        else:
            bad = True
        r_t = t
        if has_recv and _ok(rc_v, rc_o, i):
            r_t = rc[i]
        code = np.int64(0)
        code_ok = False
        if _ok(kd_v, kd_o, i):
            c = np.int64(kd[i]) - klo
            code_ok = klut_v[c] == 1
            if code_ok:
                code = klut[c]
        if not code_ok:
            bad = True
        skip = code_ok and code == KIND_SKIP
        is_q = code_ok and code == KIND_QUOTE
        is_t = code_ok and (code == KIND_TRADE or code == KIND_PRINT)
        is_b = code_ok and (code == KIND_BOOK_ADD or code == KIND_BOOK_MODIFY or code == KIND_BOOK_DELETE)
        if is_q and not (has_q and _ok(bpx_v, bpx_o, i) and _ok(bsz_v, bsz_o, i)
                         and _ok(apx_v, apx_o, i) and _ok(asz_v, asz_o, i)):  # fmt: skip
            bad = True
        if is_t and not (has_t and _ok(px_v, px_o, i) and _ok(sz_v, sz_o, i)):
            bad = True
        sd_i = np.int64(0)
        if has_side and _ok(sd_v, sd_o, i):
            c = np.int64(sd[i]) - slo
            if slut_v[c] == 1:
                sd_i = slut[c]
                if sd_i < -1 or sd_i > 1:
                    bad = True
            else:
                bad = True
        if skip:
            n_skip += 1
            continue
        if bad:
            n_bad += 1
            continue
        r = out[j]
        r.ts_event_ns = t
        r.ts_recv_ns = r_t
        r.instrument = inst[i]
        k = code
        if k == KIND_PRINT:
            k = KIND_TRADE
        elif k == KIND_CLEAR:
            k = KIND_BOOK_DELETE
        r.kind = k if 0 <= k <= 255 else 0
        tb = is_t or is_b
        if resting and is_t:
            sd_i = -sd_i
        r.side = sd_i if tb else 0
        if is_q:
            r.bid_px = bpx[i]
            r.bid_sz = bsz[i]
            r.ask_px = apx[i]
            r.ask_sz = asz[i]
        else:
            r.bid_px = 0.0
            r.bid_sz = 0.0
            r.ask_px = 0.0
            r.ask_sz = 0.0
        r.price = px[i] if tb and has_t and _ok(px_v, px_o, i) else 0.0
        r.size = sz[i] if tb and has_t and _ok(sz_v, sz_o, i) else 0.0
        r.order_id = 0
        if code == KIND_CLEAR:
            r.price = 0.0
            r.size = 0.0
            r.side = 0
        j += 1
    return j, n_bad, n_skip


def _reasons(counts: np.ndarray) -> dict[str, int]:
    return {REJECT_NAMES[r]: int(counts[r]) for r in range(N_REJECT_REASONS) if r != REJECT_OK and counts[r]}


def _add(acc: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        if v:
            acc[k] = acc.get(k, 0) + int(v)


# =========================================================================== shape and symbols
def resolve_shape(path: str | Path, mapping: ColumnMapping | None = None, shape: str | None = None) -> str:
    """Return the event shape of a file as every command finds it.

    ``shape`` (``--shape``), else the mapping's ``shape``, else
    :func:`detect_shape` on the file's first rows.
    """
    return shape or (mapping.shape if mapping is not None else None) or detect_shape(path, mapping)


def detect_shape(path: str | Path, mapping: ColumnMapping | None = None, sample_rows: int = 100_000) -> str:
    """Return the event shape of a file from its first rows: ``l3``, ``trades`` or ``l1``.

    ``l3`` if any row is a book event (add / modify / delete / clear), ``trades``
    if there are trade rows only and no quote columns, else ``l1``.
    """
    mp = mapping or IDENTITY
    if mp.shape:
        return mp.shape
    p = Path(path)
    frame = next(_iter_frames(p, mp, sample_rows), None)
    if frame is None or frame.height == 0:
        return "l1"
    try:
        plan = _make_plan(frame.columns, mp, "l3", p)
    except ValueError:
        try:
            plan = _make_plan(frame.columns, mp, "trades", p)
        except ValueError:
            return "l1"
    raw_kind = _column(frame, plan, "kind")
    if raw_kind is None:
        return "trades"
    kind = _codes(raw_kind, mp.kinds, keep_ints=True)
    if kind.is_in([KIND_BOOK_ADD, KIND_BOOK_MODIFY, KIND_BOOK_DELETE, KIND_CLEAR]).any():
        return "l3"
    if "bid_px" not in plan.cols and not (kind == KIND_QUOTE).any():
        return "trades"
    return "l1"


def explain_rejects(
    path: str | Path,
    mapping: ColumnMapping | None,
    shape: str,
    rejected: dict[str, int],
    sample_rows: int = 200_000,
) -> list[str]:
    """Return lines that say why rows were rejected and what to change (for a failed run).

    Off the hot path: it re-reads the first ``sample_rows`` rows and names the
    event / side codes no ``kinds.X`` / ``sides.X`` maps (with counts), the
    mapped fields that are empty, and the flag that fixes the common reasons.
    """
    p = Path(path)
    mp = mapping or IDENTITY
    lines: list[str] = []
    if rejected.get("malformed"):
        try:
            frame = next(_iter_frames(p, mp, sample_rows), None)
            plan = _make_plan(frame.columns, mp, shape, p) if frame is not None else None
        except (ValueError, OSError):
            frame = plan = None
        if frame is not None and plan is not None and frame.height:
            for fld, table, key in (("kind", mp.kinds, "kinds"), ("side", mp.sides, "sides")):
                raw = _column(frame, plan, fld)
                if raw is None:
                    continue
                codes = _codes(raw, table, keep_ints=(fld == "kind"))
                present = _text(raw).is_not_null() if not raw.dtype.is_numeric() else raw.is_not_null()
                unmapped = codes.is_null()
                if fld == "side":
                    unmapped = unmapped | ~codes.is_in([-1, 0, 1]).fill_null(False)
                bad = _text(raw).filter(present & unmapped)
                if len(bad):
                    vc = bad.value_counts(sort=True).head(8)
                    vals = ", ".join(f"{v!r} ({c:,})" for v, c in vc.iter_rows())
                    col = "|".join(plan.cols.get(fld, [])) or fld
                    lines.append(
                        f"column {col!r} ({fld}) has values that no {key}.X maps: {vals} "
                        f"(first {frame.height:,} rows); map them, e.g. --map {key}.{vc.item(0, 0)}=..."
                    )
            need = ["ts_event", "symbol"] + (["price", "size"] if shape != "l1" else [])
            for fld in need:
                raw = _column(frame, plan, fld)
                if raw is not None and raw.null_count() == frame.height:
                    lines.append(f"field {fld} is empty in every row (column {'|'.join(plan.cols[fld])})")
    if rejected.get("time_backwards"):
        lines.append("time_backwards: the file is not in exchange-time order; pass --sort-by-exchange-time")
    if rejected.get("bad_kind"):
        lines.append(
            f"bad_kind: events of a kind the {shape!r} feature set does not consume (e.g. quotes in an "
            "L3 file); check --shape and the kinds.X mapping"
        )
    if rejected.get("unknown_order"):
        lines.append(
            "unknown_order: deletes / changes of orders never added: the file starts mid-book (a "
            "snapshot is missing) or the order_id column is not the venue's order id"
        )
    if rejected.get("unknown_instrument"):
        lines.append("unknown_instrument: symbols outside the instrument table")
    return lines


def _symbol_table(symbols: Sequence[str] | None) -> list[str] | None:
    if symbols is None:
        return None
    if isinstance(symbols, str):
        raise TypeError("symbols must be a sequence of str, not one str")
    table = [str(s) for s in symbols]
    if len(set(table)) != len(table):
        raise ValueError(f"symbols table has duplicates: {table}")
    return table


# =========================================================================== whole file
def read_ticks(
    path: str | Path,
    *,
    symbols: Sequence[str] | None = None,
    mapping: ColumnMapping | None = None,
    shape: str | None = None,
    sort_by_exchange_time: bool = False,
    max_rows: int | None = None,
) -> TickData:
    """Read a Parquet/CSV/CSV.gz market file and return its ticks.

    Parameters
    ----------
    path : str or Path
        File in the normalised schema (see the module docstring) or in the
        layout described by ``mapping``.
    symbols : sequence of str, optional
        Instrument table: symbol ``symbols[i]`` gets instrument id ``i`` and
        rows of any other symbol are rejected as ``unknown_instrument``.  If
        omitted, the table is the sorted unique symbols of the file.
    mapping : ColumnMapping, optional
        Vendor layout (:mod:`replay.mapping`); default: the normalised schema.
    shape : str, optional
        ``l1`` (default), ``trades`` or ``l3``; default: the mapping's shape, else ``l1``.
    sort_by_exchange_time : bool
        Stable sort by ``ts_event_ns`` (file order kept for equal times) before
        validation.
    max_rows : int, optional
        Read only the file's first ``max_rows`` rows (rejects are counted over
        those rows only).

    Returns
    -------
    TickData
        Ticks (:data:`engine.schema.TICK_DTYPE`), the instrument table, rows read,
        rejected counts per reason and anomaly counts.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file cannot be read (corrupt, empty, wrong format), lacks required
        columns or the mapping names columns the file does not have; the message
        names the file, the problem and the expected schema.  Bad *rows* never
        raise: they are counted in ``TickData.rejected``.
    """
    p = Path(path)
    mp = mapping or IDENTITY
    shp = shape or mp.shape or "l1"
    if shp not in SHAPES:
        raise ValueError(f"unknown shape {shp!r}; known: {list(SHAPES)}")
    table_given = _symbol_table(symbols)
    frame = _read_frame(p, mp)
    if max_rows is not None:
        frame = frame.head(max(int(max_rows), 0))
    plan = _make_plan(frame.columns, mp, shp, p)
    if table_given is None:
        sym = _text(_column(frame, plan, "symbol"))  # type: ignore[arg-type]
        table = sorted(sym.drop_nulls().unique().to_list())
    else:
        table = table_given
    index = {s: i for i, s in enumerate(table)}
    norm = _normalise(frame, plan, mp, index)
    counts = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    counts[REJECT_MALFORMED] += norm.n_malformed
    counts[REJECT_NONFINITE] += norm.n_nonfinite_ts
    anomalies: dict[str, int] = {"skipped": norm.n_skipped}
    cand = norm.ticks
    recv = cand["ts_recv_ns"]
    if len(recv) > 1:
        anomalies["recv_backwards"] = int(np.count_nonzero(recv[1:] < recv[:-1]))
    if sort_by_exchange_time and len(cand):
        ts = cand["ts_event_ns"]
        anomalies["reordered"] = int(np.count_nonzero(ts < np.maximum.accumulate(ts)))
        cand = cand[np.argsort(ts, kind="stable")]
    if shp == "l1":
        reasons = np.empty(len(cand), dtype=np.uint8)
        last_ts = np.full(len(table), np.iinfo(np.int64).min, dtype=np.int64)
        n_ok = _validate_rows(cand, last_ts, reasons, counts)
        accepted = cand if n_ok == len(cand) else cand[reasons == REJECT_OK]
    else:
        accepted = cand
    if shp != "l3":  # (the L3 kernel counts its own, per accepted event)
        anomalies["same_ts"] = _count_same_ts(accepted, np.full(len(table), np.iinfo(np.int64).min))
    assert accepted.dtype == TICK_DTYPE
    return TickData(
        ticks=accepted, symbols=table, rows=frame.height, rejected=_reasons(counts), path=str(p),
        anomalies={k: v for k, v in anomalies.items() if v}, shape=shp,
    )  # fmt: skip


# =========================================================================== chunks
#: Rows per frame of the pre-scan (symbol column only): more only holds more memory.
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
            if self.shape == "l1" and len(cand):
                reasons = np.empty(len(cand), dtype=np.uint8)
                n_ok = _validate_rows(cand, self._last_ts, reasons, counts)
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
