"""Read normalised market files (Parquet, CSV, CSV.gz) into tick arrays.

:func:`read_ticks` loads a whole file with polars, normalises it into a numpy
array of :data:`engine.schema.TICK_DTYPE` without a per-row Python loop, and
applies the single acceptance rule of :func:`features.validate.validate_batch`:
the ticks it returns are exactly the ones the live loop would accept, and every
other row is counted by reject reason.  Bad rows never raise.

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
kind           int or str  1 or ``"quote"``, 2 or ``"trade"`` (case-insensitive;
                           ``book_add``/``book_modify``/``book_delete`` = 3/4/5 are
                           read but rejected as ``bad_kind``); required
bid_px         float64     best bid price (quotes; null on trades)
bid_sz         float64     best bid size (quotes; null on trades)
ask_px         float64     best ask price (quotes; null on trades)
ask_sz         float64     best ask size (quotes; null on trades)
price          float64     trade price (trades; null on quotes)
size           float64     trade size (trades; null on quotes)
side           int8        trade aggressor: +1 buyer-initiated, -1 seller-initiated,
                           0 unknown (``"buy"``/``"b"``, ``"sell"``/``"s"`` also
                           read); optional, missing or null -> 0
order_id       uint64      optional, missing or null -> 0
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
  field (``ts_event_ns``, ``symbol``, ``kind``, and the price/size fields of
  its kind), unknown kind string, invalid ``side`` or ``order_id``;
* ``nonfinite``: NaN/inf in a price or size (or in a float timestamp);
* ``nonpositive``: price or size <= 0;
* ``crossed``: quote with bid > ask (a locked quote bid == ask is accepted);
* ``time_backwards``: ``ts_event_ns`` earlier than the previous accepted event
  of the same instrument;
* ``unknown_instrument``: symbol not in the given instrument table;
* ``bad_kind``: an integer kind other than quote/trade.

Known limit: a CSV line with *more* fields than the header is truncated to the
header's columns rather than rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from engine.schema import (
    KIND_NAMES,
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
from features.validate import validate_batch

__all__ = [
    "REQUIRED_COLUMNS",
    "QUOTE_COLUMNS",
    "TRADE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "TickData",
    "read_ticks",
]

#: Columns every file must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("ts_event_ns", "symbol", "kind")
#: Quote columns (all or none).
QUOTE_COLUMNS: tuple[str, ...] = ("bid_px", "bid_sz", "ask_px", "ask_sz")
#: Trade columns (all or none).
TRADE_COLUMNS: tuple[str, ...] = ("price", "size")
#: Optional columns and their default.
OPTIONAL_COLUMNS: tuple[str, ...] = ("ts_recv_ns", "side", "order_id")

_SCHEMA_HINT = (
    "expected columns: ts_event_ns (int64 ns), symbol (str), kind (1/'quote' or "
    "2/'trade'), quote columns bid_px, bid_sz, ask_px, ask_sz and/or trade columns "
    "price, size (float64); optional ts_recv_ns (int64), side (int8 +1/-1/0), "
    "order_id (uint64)"
)
_KIND_BY_NAME = {name: k for k, name in KIND_NAMES.items()}
_SIDE_BY_NAME = {"buy": 1, "b": 1, "sell": -1, "s": -1}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".gz")


@dataclass
class TickData:
    """Accepted ticks of one file and the account of what was read.

    Attributes
    ----------
    ticks : ndarray of TICK_DTYPE
        Accepted rows only, in file order.
    symbols : list of str
        Instrument table: ``symbols[tick["instrument"]]`` is the symbol.
    rows : int
        Rows read from the file (accepted + rejected).
    rejected : dict of str to int
        Rejected rows per reason name of ``engine.schema.REJECT_NAMES``; only
        non-zero counts, never ``"ok"``.
    path : str
        The file read.
    """

    ticks: np.ndarray
    symbols: list[str]
    rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    path: str = ""

    @property
    def rejected_total(self) -> int:
        """Return the number of rejected rows (all reasons)."""
        return sum(self.rejected.values())


# --------------------------------------------------------------------------- file access
def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    with path.open("rb") as f:
        head = f.read(4)
    return "parquet" if head == b"PAR1" else "csv"


def _read_frame(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"tick file not found: {path}")
    if not path.is_file():
        raise ValueError(f"tick file {path} is not a regular file")
    fmt = _format_of(path)
    label = {"parquet": "Parquet", "csv": "CSV"}[fmt]
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        # All columns as text: unparsable values become per-row nulls below
        # (counted as malformed) instead of failing the whole file.
        return pl.read_csv(
            path, infer_schema=False, encoding="utf8-lossy", truncate_ragged_lines=True
        )
    except (FileNotFoundError, PermissionError):
        raise
    except pl.exceptions.NoDataError as e:
        raise ValueError(f"cannot read {path} as {label}: file is empty ({e})") from e
    except Exception as e:
        raise ValueError(
            f"cannot read {path} as {label} (corrupt or not a {label} file): "
            f"{type(e).__name__}: {e}"
        ) from e


def _normalise_names(frame: pl.DataFrame) -> pl.DataFrame:
    """Rename columns to the lower-case schema names they match, if unambiguous."""
    known = set(REQUIRED_COLUMNS + QUOTE_COLUMNS + TRADE_COLUMNS + OPTIONAL_COLUMNS)
    mapping: dict[str, str] = {}
    for c in frame.columns:
        k = c.strip().lower()
        if k in known and k != c and k not in frame.columns and k not in mapping.values():
            mapping[c] = k
    return frame.rename(mapping) if mapping else frame


def _check_columns(frame: pl.DataFrame, path: Path) -> None:
    cols = set(frame.columns)
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        problems.append(f"missing required columns {missing}")
    for group, label in ((QUOTE_COLUMNS, "quote"), (TRADE_COLUMNS, "trade")):
        have = [c for c in group if c in cols]
        if have and len(have) < len(group):
            lack = [c for c in group if c not in cols]
            problems.append(f"incomplete {label} columns: missing {lack} (have {have})")
    if not any(c in cols for c in QUOTE_COLUMNS + TRADE_COLUMNS):
        problems.append(
            f"neither quote columns {list(QUOTE_COLUMNS)} nor trade columns "
            f"{list(TRADE_COLUMNS)} present"
        )
    if problems:
        raise ValueError(
            f"{path}: not in the normalised tick schema: {'; '.join(problems)}. "
            f"Found columns {frame.columns}; {_SCHEMA_HINT}"
        )


# --------------------------------------------------------------------------- column parsing
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


def _as_int(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Return (Int64 values, null where unusable; bool nonfinite flag) of a timestamp column."""
    dt = s.dtype
    no = pl.repeat(False, len(s), dtype=pl.Boolean, eager=True)
    if dt.is_integer():
        return s.cast(pl.Int64, strict=False), no
    if dt.is_float():
        f = s.cast(pl.Float64)
        nonfinite = (f.is_nan() | f.is_infinite()).fill_null(False)
        ok = f.is_finite() & (f == f.floor())
        return _where(ok, f.cast(pl.Int64, strict=False)), nonfinite
    if isinstance(dt, pl.Datetime):
        return s.dt.epoch("ns"), no
    t = _text(s)
    return t.cast(pl.Int64, strict=False), _nonfinite_text(t)


def _as_float(s: pl.Series) -> pl.Series:
    """Return a Float64 price/size column, null where missing or unparsable (NaN stays NaN)."""
    if s.dtype.is_numeric():
        return s.cast(pl.Float64, strict=False)
    return _text(s).cast(pl.Float64, strict=False)


def _as_code(s: pl.Series, names: dict[str, int]) -> pl.Series:
    """Return an Int64 code column from integers, integral floats or names (null if neither)."""
    dt = s.dtype
    if dt.is_integer():
        return s.cast(pl.Int64, strict=False)
    if dt.is_float():
        f = s.cast(pl.Float64)
        return _where(f.is_finite() & (f == f.floor()), f.cast(pl.Int64, strict=False))
    t = _text(s).str.to_lowercase()
    named = t.replace_strict(names, default=None, return_dtype=pl.Int64)
    return named.fill_null(t.cast(pl.Int64, strict=False))


def _as_order_id(s: pl.Series) -> pl.Series:
    """Return a UInt64 order id column, null where present but invalid."""
    if s.dtype.is_integer():
        return s.cast(pl.UInt64, strict=False)
    if s.dtype.is_float():
        f = s.cast(pl.Float64)
        return _where(f.is_finite() & (f == f.floor()), f.cast(pl.UInt64, strict=False))
    return _text(s).cast(pl.UInt64, strict=False)


def _np(s: pl.Series, fill: float | int, dtype: type) -> np.ndarray:
    return s.fill_null(fill).to_numpy().astype(dtype, copy=False)


# --------------------------------------------------------------------------- public API
def read_ticks(path: str | Path, *, symbols: Sequence[str] | None = None) -> TickData:
    """Read a Parquet/CSV/CSV.gz market file and return its accepted ticks.

    Parameters
    ----------
    path : str or Path
        File in the normalised schema (see the module docstring).
    symbols : sequence of str, optional
        Instrument table: symbol ``symbols[i]`` gets instrument id ``i`` and
        rows of any other symbol are rejected as ``unknown_instrument``.  If
        omitted, the table is the sorted unique symbols of the file.

    Returns
    -------
    TickData
        Accepted ticks (:data:`engine.schema.TICK_DTYPE`, file order), the
        instrument table, rows read and rejected counts per reason.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file cannot be read (corrupt, empty, wrong format) or lacks required
        columns; the message names the file, the problem and the expected schema.
        Bad *rows* never raise: they are counted in ``TickData.rejected``.
    """
    p = Path(path)
    frame = _normalise_names(_read_frame(p))
    _check_columns(frame, p)
    n = frame.height
    cols = set(frame.columns)

    # Instrument table.
    sym = _text(frame["symbol"])
    if symbols is None:
        table = sorted(sym.drop_nulls().unique().to_list())
    else:
        if isinstance(symbols, str):
            raise TypeError("symbols must be a sequence of str, not one str")
        table = [str(s) for s in symbols]
        if len(set(table)) != len(table):
            raise ValueError(f"symbols table has duplicates: {table}")
    inst = sym.replace_strict({s: i for i, s in enumerate(table)}, default=-1,
                              return_dtype=pl.Int32)  # fmt: skip

    ts_event, ts_nonfinite = _as_int(frame["ts_event_ns"])
    if "ts_recv_ns" in cols:
        ts_recv, recv_nonfinite = _as_int(frame["ts_recv_ns"])
        ts_nonfinite = ts_nonfinite | recv_nonfinite
        ts_recv = _where(ts_recv.is_not_null(), ts_recv, ts_event)
    else:
        ts_recv = ts_event
    kind = _as_code(frame["kind"], _KIND_BY_NAME)
    is_q = (kind == KIND_QUOTE).fill_null(False)
    is_t = (kind == KIND_TRADE).fill_null(False)

    malformed = sym.is_null() | kind.is_null() | (ts_event.is_null() & ~ts_nonfinite)
    empty = pl.repeat(None, n, dtype=pl.Float64, eager=True)
    fields: dict[str, pl.Series] = {}
    for group, on in ((QUOTE_COLUMNS, is_q), (TRADE_COLUMNS, is_t)):
        for c in group:
            v = _as_float(frame[c]) if c in cols else empty
            fields[c] = v
            malformed = malformed | (on & v.is_null())
    if "side" in cols:
        raw = frame["side"]
        side = _as_code(raw, _SIDE_BY_NAME)
        present = _text(raw).is_not_null() if not raw.dtype.is_numeric() else raw.is_not_null()
        bad_side = (present & (side.is_null() | ~side.is_in([-1, 0, 1]).fill_null(False)))
        malformed = malformed | bad_side
        side = side.fill_null(0)
    else:
        side = pl.repeat(0, n, dtype=pl.Int64, eager=True)
    if "order_id" in cols:
        raw = frame["order_id"]
        oid = _as_order_id(raw)
        present = _text(raw).is_not_null() if not raw.dtype.is_numeric() else raw.is_not_null()
        malformed = malformed | (present & oid.is_null())
    else:
        oid = pl.repeat(0, n, dtype=pl.UInt64, eager=True)
    ts_nonfinite = ts_nonfinite & ~malformed  # malformed takes precedence

    # Fill the tick array column by column (numpy, no per-row loop).
    q = is_q.to_numpy()
    t = is_t.to_numpy()
    ticks = empty_ticks(n)
    ticks["ts_event_ns"] = _np(ts_event, 0, np.int64)
    ticks["ts_recv_ns"] = _np(ts_recv, 0, np.int64)
    ticks["instrument"] = _np(inst, -1, np.int32)
    k = _np(kind, 0, np.int64)
    ticks["kind"] = np.where((k >= 0) & (k <= 255), k, 0).astype(np.uint8)
    ticks["side"] = np.where(t, _np(side, 0, np.int64), 0).astype(np.int8)
    for c in QUOTE_COLUMNS:
        ticks[c] = np.where(q, _np(fields[c], 0.0, np.float64), 0.0)
    for c in TRADE_COLUMNS:
        ticks[c] = np.where(t, _np(fields[c], 0.0, np.float64), 0.0)
    ticks["order_id"] = _np(oid, 0, np.uint64)

    # One acceptance rule: everything that could be normalised goes through
    # validate_batch, in file order.
    bad = malformed.to_numpy()
    bad_ts = ts_nonfinite.to_numpy()
    keep = ~(bad | bad_ts)
    cand = ticks if keep.all() else ticks[keep]
    reasons = np.empty(len(cand), dtype=np.uint8)
    counts = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    n_ok = validate_batch(cand, len(table), reasons, counts)
    accepted = cand if n_ok == len(cand) else cand[reasons == REJECT_OK]
    counts[REJECT_MALFORMED] += int(bad.sum())
    counts[REJECT_NONFINITE] += int(bad_ts.sum())
    rejected = {
        REJECT_NAMES[r]: int(counts[r])
        for r in range(N_REJECT_REASONS)
        if r != REJECT_OK and counts[r]
    }
    assert accepted.dtype == TICK_DTYPE
    return TickData(ticks=accepted, symbols=table, rows=n, rejected=rejected, path=str(p))
