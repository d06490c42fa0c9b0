"""Extreme but finite prices and sizes, in every shape's fused kernel.

A subnormal price (below the smallest normal float64) passed ``price > 0``, and half of it
rounds to 0: the L1 mid was 0, the features divided by it, and from then on every tick of
that instrument raised ``ZeroDivisionError`` (the native loop published a stale score for
each).  A finite size of 1e300 was accepted from a file while the live sources reject it as
``absurd_value``, and gave the L3 depth features NaN.  Now both are rejected by reason in
every shape, by the kernels themselves (so files, replay and live decide alike), and no
accepted tick, however extreme, gives a non-finite feature or score.
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
    REJECT_ABSURD_VALUE,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    TICK_DTYPE,
)
from features.registry import kernels_for
from features.validate import validate_batch
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
@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"size": 1e300}, REJECT_ABSURD_VALUE),
        ({"ask_sz": 1.8446744073709552e19}, REJECT_ABSURD_VALUE),  # uint64-max, in any of the six fields
        ({"price": 1e16, "size": 2.0}, REJECT_ABSURD_VALUE),
        ({"bid_sz": np.inf, "size": 1e300}, None),  # a +inf anywhere: not absurd, left to the kernel's checks
        ({"price": np.inf}, REJECT_NONFINITE),
    ],
)
def test_an_absurd_value_is_rejected_by_every_shape_as_the_live_sources_do(shape, values, reason):
    ticks = _events(shape, 30)
    ticks["kind"][10] = KIND_TRADE
    for k, v in values.items():
        ticks[k][10] = v
    flags, scores, X, counters = _run(shape, ticks)
    if reason is None:  # the live rule: with a +inf among the six, the kernel's own checks decide; a trade
        # of size 1e300 (its bid size, +inf, is no trade field) may be taken, and must poison nothing
        assert np.isfinite(scores[flags >= 0]).all() and np.isfinite(X[flags >= 0]).all()
    else:
        assert flags[10] == -reason, flags[10]
        assert counters[reason] == 1
        later = np.arange(11, len(ticks))
        assert (flags[later] >= 0).all() and np.isfinite(scores[later]).all()


VALS = np.array([5e-324, 1e-310, MIN_PRICE, 1e-300, 1e-200, 1e-9, 0.01, 1.0, 100.0, 1e15, 1e200, 1e300,
                 1.7e308])  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_no_accepted_tick_of_extreme_values_gives_a_nonfinite_feature_or_score(shape):
    """Random events whose every price and size is drawn from 1e-323 .. 1.7e308 (seeded)."""
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
    flags, scores, X, counters = _run(shape, t)
    ok = flags >= 0
    assert ok.sum() > 100  # the draw leaves enough accepted events to mean something
    assert counters[REJECT_ABSURD_VALUE] > 0 and counters[REJECT_NONPOSITIVE] > 0
    assert np.isfinite(scores[ok]).all()
    bad_cols = sorted({int(c) for c in np.nonzero(~np.isfinite(X[ok]))[1]})
    assert not bad_cols, f"non-finite features {bad_cols}"
