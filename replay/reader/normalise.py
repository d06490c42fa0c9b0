"""Normalisers: polars frames -> TICK_DTYPE arrays (a general path and a fast path), and the row checks."""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
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
    TICK_DTYPE,
)
from features.common import drop_stale_numba_cache
from replay.mapping import KIND_CLEAR, KIND_PRINT, KIND_SKIP, ColumnMapping, norm_code
from replay.reader.base import _INT64_MAX, _UNIT_NS, QUOTE_COLUMNS, TRADE_COLUMNS
from replay.reader.plan import _Plan

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
drop_stale_numba_cache(__file__, [os.path.join(_ROOT, "features", "validate.py"),
                                  os.path.join(_ROOT, "engine", "schema.py")])  # fmt: skip


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
