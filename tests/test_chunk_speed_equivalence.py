"""The reader's fast path (native-typed normalised files) gives exactly the general path's result.

The fast path (``replay.reader.normalise._normalise_fast`` + polars' own Parquet reader in
``TickChunks``) is taken only for frames in the normalised schema with native
column types; these tests feed both paths adversarial rows (nulls everywhere,
NaN/inf, unknown / padded / empty symbols, every kind and side code of the
column's domain, remapped codes, missing optional columns) and require
byte-identical ticks, the same reject and anomaly counts and the same chunking.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from replay import reader as R
from replay.mapping import IDENTITY, build_mapping
from replay.reader import normalise as RN
from replay.reader import plan as RP


def _frame(n: int, seed: int, *, kind_dtype=pl.Int8, side_dtype=pl.Int8, drop=(), clean=False):
    rng = np.random.default_rng(seed)
    ts = np.cumsum(rng.integers(-5, 1000, n)) + 1_700_000_000_000_000_000
    recv = ts + rng.integers(-50, 500, n)
    syms = np.array(["ESZ6", "NQZ6", "CLF7", " ESZ6", "ESZ6 ", "", "  ", "XXX", "esz6"], dtype=object)
    if clean:
        syms = syms[:3]
    sym = syms[rng.integers(0, len(syms), n)]
    np_int = {pl.Int8: np.int8, pl.UInt8: np.uint8, pl.Int16: np.int16, pl.UInt16: np.uint16}
    info = np.iinfo(np_int[kind_dtype])
    kind_vals = np.array([1, 2, 1, 2, 1, 2, 3, 4, 5, 0, 6, 7, 9, int(info.min), int(info.max)])
    if info.min < 0:
        kind_vals = np.concatenate([kind_vals, [-1, -2, -3]])
    kind = kind_vals[rng.integers(0, len(kind_vals), n)]
    if clean:
        kind = rng.integers(1, 3, n)
    side_vals = np.array([-1, 0, 1, 1, -1, 2, -2, 5])
    side = side_vals[rng.integers(0, len(side_vals), n)]
    if side_dtype in (pl.UInt8, pl.UInt16):
        side = np.abs(side)
    if clean:
        side = rng.integers(-1, 2, n)
    cols = {
        "ts_event_ns": pl.Series(ts, dtype=pl.Int64),
        "ts_recv_ns": pl.Series(recv, dtype=pl.Int64),
        "symbol": pl.Series(list(sym), dtype=pl.String),
        "kind": pl.Series(kind).cast(kind_dtype, strict=False),
        "side": pl.Series(side).cast(side_dtype, strict=False),
    }
    for c, base in (("bid_px", 100.0), ("bid_sz", 5.0), ("ask_px", 100.5), ("ask_sz", 5.0),
                    ("price", 100.25), ("size", 3.0)):  # fmt: skip
        v = base + rng.integers(-3, 4, n) * 0.25
        if not clean:
            v[rng.random(n) < 0.02] = np.nan
            v[rng.random(n) < 0.01] = np.inf
            v[rng.random(n) < 0.01] = -1.0
        cols[c] = pl.Series(v, dtype=pl.Float64)
    df = pl.DataFrame(cols)
    if not clean:  # nulls in every column, at random rows
        df = df.with_columns(
            [pl.when(pl.Series(rng.random(n) < 0.03)).then(None).otherwise(pl.col(c)).alias(c)
             for c in df.columns]  # fmt: skip
        )
    else:  # nulls where the kind does not use the field, as the generator writes
        q = pl.col("kind") == 1
        df = df.with_columns(
            [pl.when(q).then(pl.col(c)).otherwise(None).alias(c) for c in R.QUOTE_COLUMNS]
            + [pl.when(~q).then(pl.col(c)).otherwise(None).alias(c) for c in R.TRADE_COLUMNS]
        )
    return df.drop(list(drop))


def _general(monkeypatch):
    monkeypatch.setattr(RN, "_fast_ok", lambda frame, plan, mp: False)
    monkeypatch.setattr(R.TickChunks, "_fast_parquet_columns", lambda self: None)


def _both(monkeypatch, fn):
    """Return (fast result, general result) of ``fn()``."""
    fast = fn()
    with monkeypatch.context() as m:
        _general(m)
        slow = fn()
    return fast, slow


def _fields(t: np.ndarray) -> bytes:
    """Return the bytes of every field (the dtype's 2 padding bytes are not data)."""
    return b"".join(np.ascontiguousarray(t[f]).tobytes() for f in t.dtype.names)


def _same_norm(a, b):
    assert a.ticks.dtype == b.ticks.dtype
    assert _fields(a.ticks) == _fields(b.ticks)
    assert (a.n_malformed, a.n_nonfinite_ts, a.n_skipped) == (b.n_malformed, b.n_nonfinite_ts, b.n_skipped)


_MAPPINGS = {
    "identity": IDENTITY,
    "codes": build_mapping({"ts_event": "ts_event_ns", "ts_recv": "ts_recv_ns", "symbol": "symbol",
                            "kind": "kind", "side": "side", "bid_px": "bid_px", "bid_sz": "bid_sz",
                            "ask_px": "ask_px", "ask_sz": "ask_sz", "price": "price", "size": "size",
                            "ts_unit": "ns", "trade_side": "resting",
                            "kinds": {"7": "skip", "9": "print", "6": "clear", "0": "quote"},
                            "sides": {"2": "buy", "5": "none", "-2": "sell"}}),
}  # fmt: skip


_CASES = [(m, k, d, c) for m in sorted(_MAPPINGS) for k in (pl.Int8, pl.UInt8, pl.Int16, pl.UInt16)
          for d in ((), ("ts_recv_ns",), ("side",), R.QUOTE_COLUMNS, R.TRADE_COLUMNS)
          for c in (False, True) if not (_MAPPINGS[m].explicit and d)]  # fmt: skip


@pytest.mark.parametrize(("mp_name", "kind_dtype", "drop", "clean"), _CASES)
def test_normalise_fast_equals_general(monkeypatch, mp_name, kind_dtype, drop, clean):
    mp = _MAPPINGS[mp_name]
    frame = _frame(5000, seed=len(drop) * 7 + int(clean), kind_dtype=kind_dtype, side_dtype=kind_dtype,
                   drop=drop, clean=clean)  # fmt: skip
    plan = RP._make_plan(frame.columns, mp, "l1", Path("x.parquet"))
    assert RN._fast_ok(frame, plan, mp)
    for index in ({"CLF7": 0, "ESZ6": 1, "NQZ6": 2}, {" ESZ6": 0, "ESZ6": 1}, {}):
        for piece in (frame, frame.slice(37, 1000), frame.head(0)):  # offsets into the buffers
            fast, slow = _both(monkeypatch, lambda p=piece, ix=index: RN._normalise(p, plan, mp, ix))
            _same_norm(fast, slow)


def test_fast_path_not_taken_for_other_types_or_shapes():
    frame = _frame(100, seed=1, clean=True)
    plan = RP._make_plan(frame.columns, IDENTITY, "l1", Path("x.parquet"))
    assert RN._fast_ok(frame, plan, IDENTITY)
    assert not RN._fast_ok(frame.with_columns(pl.col("bid_px").cast(pl.Float32)), plan, IDENTITY)
    assert not RN._fast_ok(frame.with_columns(pl.col("kind").cast(pl.Int32)), plan, IDENTITY)
    assert not RN._fast_ok(frame.with_columns(pl.col("ts_event_ns").cast(pl.UInt64)), plan, IDENTITY)
    assert not RN._fast_ok(frame.with_columns(pl.col("symbol").cast(pl.Categorical)), plan, IDENTITY)
    for shape in ("trades", "l3"):
        p = RP._make_plan(frame.columns, IDENTITY, shape, Path("x.parquet"))
        assert not RN._fast_ok(frame, p, IDENTITY)
    scaled = build_mapping({"ts_event": "ts_event_ns", "symbol": "symbol", "kind": "kind",
                            "price": "price", "size": "size", "bid_px": "bid_px", "bid_sz": "bid_sz",
                            "ask_px": "ask_px", "ask_sz": "ask_sz", "ts_unit": "ns",
                            "price_scale": "0.01"})  # fmt: skip
    p = RP._make_plan(frame.columns, scaled, "l1", Path("x.parquet"))
    assert not RN._fast_ok(frame, p, scaled)


def _chunks(path, chunk_rows, **kw):
    ch = R.iter_tick_chunks(path, chunk_rows, **kw)
    out = [(_fields(c.ticks), c.rejected) for c in ch]
    return out, ch.rows_read, ch.rejected, ch.anomalies, ch.symbols


@pytest.mark.parametrize("clean", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 997, 100_000])
@pytest.mark.parametrize("sort", [False, True])
def test_chunks_fast_equal_general(tmp_path, monkeypatch, clean, chunk_rows, sort):
    frame = _frame(20_000 if chunk_rows > 1 else 200, seed=3, clean=clean)
    path = tmp_path / "t.parquet"
    frame.write_parquet(path, row_group_size=3000 if chunk_rows > 1 else 30)  # chunks straddle row groups
    ch = R.iter_tick_chunks(path, chunk_rows)
    assert ch._fast_parquet_columns() is not None
    fast, slow = _both(monkeypatch, lambda: _chunks(path, chunk_rows, sort_by_exchange_time=sort))
    assert fast == slow
    fast, slow = _both(monkeypatch, lambda: _chunks(path, chunk_rows, symbols=["NQZ6", "ESZ6"]))
    assert fast == slow
    whole_fast, whole_slow = _both(monkeypatch, lambda: R.read_ticks(path, sort_by_exchange_time=sort))
    assert _fields(whole_fast.ticks) == _fields(whole_slow.ticks)
    assert (whole_fast.rejected, whole_fast.anomalies) == (whole_slow.rejected, whole_slow.anomalies)


def test_chunks_fast_reader_only_for_plain_arrow_types(tmp_path):
    frame = _frame(100, seed=2, clean=True)
    p1 = tmp_path / "a.parquet"
    frame.with_columns(pl.col("symbol").cast(pl.Categorical)).write_parquet(p1)
    assert R.iter_tick_chunks(p1, 10)._fast_parquet_columns() is None
    p2 = tmp_path / "b.parquet"
    frame.with_columns(pl.col("ts_event_ns").cast(pl.Datetime("ns"))).write_parquet(p2)
    assert R.iter_tick_chunks(p2, 10)._fast_parquet_columns() is None
    p3 = tmp_path / "c.csv"
    frame.write_csv(p3)
    assert R.iter_tick_chunks(p3, 10)._fast_parquet_columns() is None
    p4 = tmp_path / "d.parquet"
    frame.with_columns(extra=pl.lit("x")).write_parquet(p4)
    assert R.iter_tick_chunks(p4, 10)._fast_parquet_columns() is not None  # extra columns are not read


def test_empty_parquet_file(tmp_path, monkeypatch):
    path = tmp_path / "e.parquet"
    _frame(10, seed=0, clean=True).head(0).write_parquet(path)
    fast, slow = _both(monkeypatch, lambda: _chunks(path, 5))
    assert fast == slow
