"""Extreme but finite prices and sizes, in every shape's fused kernel.

A subnormal price (below the smallest normal float64) passed ``price > 0``, and half of it
rounds to 0: the L1 mid was 0, the features divided by it, and from then on every tick of
that instrument raised ``ZeroDivisionError`` (the native loop published a stale score for
each): now ``nonpositive`` in every shape's kernel.  A finite size of 1e300 was accepted
from a file while the live sources reject it as ``absurd_value``, and gave the L3 depth
features NaN: now the readers apply the live rule.  No tick a kernel accepts, however
extreme, gives a non-finite feature or score.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.builder import model_feature_set
from engine.schema import (
    KIND_BOOK_ADD,
    KIND_QUOTE,
    KIND_TRADE,
    MIN_PRICE,
    N_REJECT_REASONS,
    REJECT_NONPOSITIVE,
    TICK_DTYPE,
)
from features.registry import kernels_for
from features.validate import absurd_rows, validate_batch
from models.fused import FusedBackend
from replay.inputs import default_model_for_shape

SHAPES = ("l1", "trades", "l3")
_BACKENDS: dict[str, tuple] = {}


def _fused(shape: str):
    """The shipped model of ``shape`` as a fused backend (no parity check: the kernels are under test)."""
    if shape not in _BACKENDS:
        path = default_model_for_shape(shape)
        fs = model_feature_set(str(path))
        _BACKENDS[shape] = (FusedBackend(path, fs), fs, kernels_for(fs))
    return _BACKENDS[shape]


def _run(shape: str, ticks: np.ndarray):
    """Score ``ticks`` one by one with the fused kernel; return (flags, scores, X, counters)."""
    be, fs, kern = _fused(shape)
    fstate, istate = kern.new_state(int(ticks["instrument"].max()) + 1)
    counters = np.zeros(N_REJECT_REASONS, np.int64)
    tick, ctx = be.make_tick(fstate, istate, fs.params_array(), counters, ticks)
    n, xo, nf = len(ticks), be.program.x_offset, be.n_features
    flags, scores, X = np.zeros(n, np.int64), np.zeros(n), np.zeros((n, nf), np.float32)
    for i in range(n):
        flags[i], scores[i] = tick(i, ctx.addr)
        X[i] = be.mf[xo : xo + nf]
    return flags, scores, X, counters


def _events(shape: str, n: int) -> np.ndarray:
    """``n`` plain events of ``shape`` for one instrument, 1 ms apart (L3: adds of distinct orders)."""
    t = np.zeros(n, TICK_DTYPE)
    t["ts_event_ns"] = t["ts_recv_ns"] = (np.arange(n) + 1) * 1_000_000
    t["bid_px"], t["ask_px"], t["bid_sz"], t["ask_sz"] = 100.0, 100.25, 3.0, 4.0
    t["price"], t["size"] = 100.0 + 0.25 * (np.arange(n) % 2), 1.0 + np.arange(n) % 3
    t["side"] = np.where(np.arange(n) % 2 == 0, 1, -1)
    if shape == "l1":
        t["kind"] = np.where(np.arange(n) % 3 == 2, KIND_TRADE, KIND_QUOTE)
    elif shape == "trades":
        t["kind"] = KIND_TRADE
    else:
        t["kind"] = np.where(np.arange(n) % 4 == 3, KIND_TRADE, KIND_BOOK_ADD)
        t["order_id"] = np.arange(n) + 1
        step = 0.25 * (np.arange(n) % 3)
        t["price"] = np.where(t["side"] > 0, 100.0 - step, 100.25 + step)
    return t


def _price_fields(shape: str) -> tuple[str, ...]:
    return ("bid_px", "ask_px", "price") if shape == "l1" else ("price",)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tiny", [5e-324, 1e-310, np.nextafter(MIN_PRICE, 0.0)])
def test_a_subnormal_price_is_nonpositive_and_the_instrument_keeps_scoring(shape, tiny):
    ticks = _events(shape, 60)
    bad = [20, 21, 22] if shape == "l1" else [20]  # L1: a quote with both sides tiny, one tiny side, a trade
    if shape == "l1":
        ticks["kind"][20:23] = (KIND_QUOTE, KIND_QUOTE, KIND_TRADE)
        ticks["bid_px"][20] = ticks["ask_px"][20] = tiny
        ticks["bid_px"][21] = tiny
        ticks["price"][22] = tiny
    else:
        ticks["price"][20] = tiny
    flags, scores, X, counters = _run(shape, ticks)
    assert (flags[bad] == -REJECT_NONPOSITIVE).all(), flags[bad]
    assert counters[REJECT_NONPOSITIVE] == len(bad)
    rest = np.setdiff1d(np.arange(len(ticks)), bad)
    assert (flags[rest] >= 0).all() and np.isfinite(scores[rest]).all() and np.isfinite(X[rest]).all()
    # the reader's validation of a file (L1 and trades rows: validate_batch) decides alike
    if shape == "l1":
        reasons, counts = np.zeros(len(ticks), np.uint8), np.zeros(N_REJECT_REASONS, np.int64)
        validate_batch(ticks, 1, reasons, counts)
        assert (reasons[bad] == REJECT_NONPOSITIVE).all() and (reasons[rest] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_the_smallest_normal_price_is_accepted_and_scores_finite(shape):
    ticks = _events(shape, 40)
    for f in _price_fields(shape):
        ticks[f][10] = MIN_PRICE
    if shape == "l1":
        ticks["kind"][10] = KIND_QUOTE
    flags, scores, X, _ = _run(shape, ticks)
    if shape != "l1":  # trades and L3 judge a price this far from the last one absurd (their band)
        assert flags[10] < 0
        return
    assert (flags >= 0).all() and np.isfinite(scores).all() and np.isfinite(X).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunks"])
def test_a_files_absurd_values_are_rejected_as_the_live_sources_do(tmp_path, shape, chunked):
    """The readers apply the live sources' ``absurd_value`` rule: a finite price or size above 1e15
    (1e300, uint64-max) while none of the row's values is +inf."""
    import polars as pl

    from replay.generator_l3 import write_l3, write_trades
    from replay.reader import iter_tick_chunks, read_ticks

    path = tmp_path / f"{shape}.parquet"
    if shape == "l1":
        from replay.generator import write_market

        write_market(path, n_events=400)
    else:
        (write_l3 if shape == "l3" else write_trades)(path, 400)
    df = pl.read_parquet(path).with_row_index("row")
    # rows of the kind whose columns are edited (a file's quote row has no price or size: the
    # reader reads the columns its kind uses; the wire's Tick carries all six, checked all six)
    kind = df["kind"].to_numpy() if "kind" in df.columns else np.full(df.height, 2)
    tr = [int(r) for r in np.flatnonzero(kind != 1)[10:15]]
    absurd = {tr[0]: ("size", 1e300), tr[1]: ("price", 1.8446744073709552e19), tr[2]: ("price", 2e15)}
    if shape == "l1":
        absurd |= {int(np.flatnonzero(kind == 1)[10]): ("bid_sz", 1e300)}
    # the bound itself is no absurd value; nor is 1e300 beside a +inf (left to the kernel's nonfinite)
    kept = {tr[3]: ("price", 1e15), tr[4]: ("size", 1e300)}
    edits = list(absurd.items()) + list(kept.items()) + [(tr[4], ("price", np.inf))]
    for row, (col, v) in edits:
        df = df.with_columns(pl.when(pl.col("row") == row).then(pl.lit(v)).otherwise(pl.col(col)).alias(col))
    df.drop("row").write_parquet(path)
    if chunked:
        it = iter_tick_chunks(path, 64, shape=shape)
        ticks = np.concatenate([c.ticks for c in it])
        rejected = it.rejected
    else:
        data = read_ticks(path, shape=shape)
        ticks, rejected = data.ticks, data.rejected
    assert rejected.get("absurd_value", 0) == len(absurd), rejected
    assert not absurd_rows(ticks).any()
    assert (ticks["price"] == 1e15).sum() == 1


VALS = np.array([5e-324, 1e-310, MIN_PRICE, 1e-300, 1e-200, 1e-9, 0.01, 1.0, 100.0, 1e15, 1e200, 1e300,
                 1.7e308])  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_no_accepted_tick_of_extreme_values_gives_a_nonfinite_feature_or_score(shape):
    """Random events whose every price and size is drawn from 1e-323 .. 1.7e308 (seeded), less the
    rows with an absurd value (which never reach a kernel: readers and live sources reject them)."""
    rng = np.random.default_rng(3)
    n = 6000
    t = np.zeros(n, TICK_DTYPE)
    t["ts_event_ns"] = t["ts_recv_ns"] = np.arange(n) * 1000 + 1
    kinds = {"l1": [1, 2], "trades": [2], "l3": [2, 3, 4, 5]}[shape]
    t["kind"] = rng.choice(kinds, n)
    for c in ("bid_px", "ask_px", "bid_sz", "ask_sz", "price", "size"):
        t[c] = rng.choice(VALS, n)
    t["ask_px"] = np.maximum(t["ask_px"], t["bid_px"])
    t["side"] = rng.choice([-1, 1], n)
    t["order_id"] = rng.integers(1, 40, n)
    t = t[~absurd_rows(t)]  # as every reader and live source does before the kernel
    flags, scores, X, counters = _run(shape, t)
    ok = flags >= 0
    assert ok.sum() > 100  # the draw leaves enough accepted events to mean something
    assert counters[REJECT_NONPOSITIVE] > 0
    assert np.isfinite(scores[ok]).all()
    bad_cols = sorted({int(c) for c in np.nonzero(~np.isfinite(X[ok]))[1]})
    assert not bad_cols, f"non-finite features {bad_cols}"
