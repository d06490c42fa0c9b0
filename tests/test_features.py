"""Tests of the streaming feature kernels (features.kernels) and feature sets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.schema import (
    FLAG_CLIPPED,
    FLAG_NO_BOOK,
    FLAG_NO_TRADES,
    FLAG_STALE_QUOTE,
    FLAG_WARMUP,
    KIND_BOOK_ADD,
    KIND_QUOTE,
    KIND_TRADE,
    N_REJECT_REASONS,
    REJECT_BAD_KIND,
    REJECT_CROSSED,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    REJECT_TIME_BACKWARDS,
    REJECT_UNKNOWN_INSTRUMENT,
    empty_ticks,
)
from features import (
    DEFAULT_FEATURE_SET,
    FEATURE_NAMES,
    N_FEATURES,
    NF_STATE,
    NI_STATE,
    FeatureSet,
    compute_batch,
    get_feature_set,
    new_state,
    update_tick,
    validate_batch,
)

T0 = 1_800_000_000_000_000_000  # ~2027 in ns since the epoch: not exact in float64
MS = 1_000_000
S = 1_000_000_000
LN2 = math.log(2.0)
COL = {name: k for k, name in enumerate(FEATURE_NAMES)}

# Small warm-up so that random streams exercise both flag states.
TEST_FS = DEFAULT_FEATURE_SET.with_params(warmup_events=5.0, warmup_ns=0.5e9)


# ---------------------------------------------------------------------------
# Building tick arrays
# ---------------------------------------------------------------------------
def quote(ts: int, inst: int, bid: float, ask: float, bsz: float = 1.0, asz: float = 1.0):
    """Return a quote row description."""
    return dict(ts_event_ns=ts, instrument=inst, kind=KIND_QUOTE, bid_px=bid, ask_px=ask,
                bid_sz=bsz, ask_sz=asz)


def trade(ts: int, inst: int, price: float, size: float = 1.0, side: int = 1):
    """Return a trade row description."""
    return dict(ts_event_ns=ts, instrument=inst, kind=KIND_TRADE, price=price, size=size,
                side=side)


def make_ticks(rows: list[dict]) -> np.ndarray:
    """Return a TICK_DTYPE array holding ``rows`` (ts_recv_ns = ts_event_ns)."""
    ticks = empty_ticks(len(rows))
    for j, row in enumerate(rows):
        for k, v in row.items():
            ticks[j][k] = v
        ticks[j]["ts_recv_ns"] = row["ts_event_ns"]
    return ticks


def random_stream(seed: int, n: int = 600, n_inst: int = 3, rejects: bool = False) -> np.ndarray:
    """Return a random interleaved quote/trade stream with irregular spacing.

    Gaps mix simultaneous events, microseconds, milliseconds and multi-second
    silences; quotes include locked books and rare 8 % jumps (clipped returns);
    trades have buy, sell and unknown aggressors.  With ``rejects`` some rows are made invalid.
    """
    rng = np.random.default_rng(seed)
    scale = rng.choice([0, 1_000, 50_000, 2 * MS, 80 * MS, 700 * MS, 3 * S], size=n,
                       p=[0.1, 0.15, 0.2, 0.2, 0.2, 0.1, 0.05])
    ts = T0 + np.cumsum((rng.exponential(1.0, n) * scale).astype(np.int64))
    mid = 100.0 * np.exp(rng.normal(0, 0.01, n_inst))
    rows = []
    for j in range(n):
        inst = int(rng.integers(n_inst))
        if j > 0 and rng.random() < 0.6:  # starts with a trade: no book yet
            mid[inst] *= math.exp(rng.normal(0, 3e-4) + (0.08 if rng.random() < 0.01 else 0.0))
            half = 0.005 * int(rng.integers(0, 4))  # 0: locked quote
            rows.append(quote(int(ts[j]), inst, mid[inst] - half, mid[inst] + half,
                              float(rng.lognormal(3, 1)), float(rng.lognormal(3, 1))))
        else:
            rows.append(trade(int(ts[j]), inst, mid[inst] * math.exp(rng.normal(0, 2e-4)),
                              float(rng.lognormal(2, 1.5)), int(rng.integers(-1, 2))))
    ticks = make_ticks(rows)
    if rejects:
        for j in rng.choice(np.arange(5, n), size=n // 15, replace=False):
            what = int(rng.integers(6))
            if what == 0:
                ticks[j]["bid_px" if ticks[j]["kind"] == KIND_QUOTE else "price"] = np.nan
            elif what == 1 and ticks[j]["kind"] == KIND_QUOTE:
                ticks[j]["bid_px"] = ticks[j]["ask_px"] + 0.01
            elif what == 2:
                ticks[j]["ts_event_ns"] -= 10 * S
            elif what == 3:
                ticks[j]["instrument"] = n_inst + 2
            elif what == 4:
                ticks[j]["kind"] = KIND_BOOK_ADD
            else:
                ticks[j]["size" if ticks[j]["kind"] == KIND_TRADE else "ask_sz"] = -1.0
    return ticks


def run_batch(ticks: np.ndarray, n_inst: int, fs: FeatureSet = TEST_FS):
    """Return ``(X, flags, counters, fstate, istate, n_ok)`` from compute_batch on fresh state."""
    fstate, istate = new_state(n_inst)
    X = np.zeros((len(ticks), N_FEATURES), np.float32)
    flags = np.zeros(len(ticks), np.int32)
    counters = np.zeros(N_REJECT_REASONS, np.int64)
    n_ok = compute_batch(ticks, fstate, istate, fs.params_array(), X, flags, counters)
    return X, flags, counters, fstate, istate, n_ok


# ---------------------------------------------------------------------------
# Independent reference: direct sums over each instrument's full history
# ---------------------------------------------------------------------------
def _ref_reason(row, n_inst: int, last_ts: dict[int, int]) -> int:
    inst = int(row["instrument"])
    if not 0 <= inst < n_inst:
        return REJECT_UNKNOWN_INSTRUMENT
    kind = int(row["kind"])
    if kind == KIND_QUOTE:
        vals = [float(row[k]) for k in ("bid_px", "ask_px", "bid_sz", "ask_sz")]
    elif kind == KIND_TRADE:
        vals = [float(row["price"]), float(row["size"])]
    else:
        return REJECT_BAD_KIND
    if not all(math.isfinite(v) for v in vals):
        return REJECT_NONFINITE
    prices = vals[:2] if kind == KIND_QUOTE else vals[:1]
    if min(vals) <= 0 or min(prices) < sys.float_info.min:  # a subnormal price: as nonpositive
        return REJECT_NONPOSITIVE
    if kind == KIND_QUOTE and vals[0] > vals[1]:
        return REJECT_CROSSED
    if inst in last_ts and int(row["ts_event_ns"]) < last_ts[inst]:
        return REJECT_TIME_BACKWARDS
    return 0


def reference_features(ticks: np.ndarray, n_inst: int, p: dict[str, float]):
    """Return ``(X float64, flags)`` computed from the definitions, without recursion."""

    def w(t: int, s: int, h: float) -> float:
        return math.exp(-LN2 * (t - s) / h)  # exact int difference, then float

    def clip(v: float, lo: float, hi: float) -> tuple[float, bool]:
        return min(max(v, lo), hi), (v < lo or v > hi)

    hl = [p["hl_ret_fast_ns"], p["hl_ret_mid_ns"], p["hl_ret_slow_ns"]]
    quotes: dict[int, list] = {k: [] for k in range(n_inst)}
    trades: dict[int, list] = {k: [] for k in range(n_inst)}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    count = dict.fromkeys(range(n_inst), 0)
    X = np.full((len(ticks), N_FEATURES), np.nan)
    F = np.zeros(len(ticks), np.int64)
    for j, row in enumerate(ticks):
        reason = _ref_reason(row, n_inst, last)
        if reason:
            F[j] = -reason
            continue
        inst = int(row["instrument"])
        t = int(row["ts_event_ns"])
        first.setdefault(inst, t)
        last[inst] = t
        count[inst] += 1
        flags = 0
        Q, TR = quotes[inst], trades[inst]
        if int(row["kind"]) == KIND_QUOTE:
            Q.append((t, float(row["bid_px"]), float(row["ask_px"]), float(row["bid_sz"]),
                      float(row["ask_sz"])))
        else:
            if Q and t - Q[-1][0] > p["stale_quote_ns"]:
                flags |= FLAG_STALE_QUOTE
            TR.append((t, float(row["price"]), float(row["size"]), int(row["side"])))
        x = np.zeros(N_FEATURES)
        clipped = False
        since_first = (t - first[inst]) / 1e9
        if Q:
            _, b, a, B, A = Q[-1]
            m = (b + a) / 2
            spread = 1e4 * (a - b) / m
            x[0], c0 = clip(spread, 0, p["spread_max_bps"])
            micro = (b * A + a * B) / (A + B)
            x[1], c1 = clip(1e4 * (micro - m) / m, -p["spread_max_bps"] / 2,
                            p["spread_max_bps"] / 2)
            x[2] = (B - A) / (B + A)
            clipped |= c0 or c1
            mids = [(q[1] + q[2]) / 2 for q in Q]
            rets = [(Q[i][0], 1e4 * math.log(mids[i] / mids[i - 1])) for i in range(1, len(Q))]
            for k, h in enumerate(hl):
                ret = sum(r * w(t, s, h) for s, r in rets)
                var = sum(r * r * w(t, s, h) for s, r in rets)
                tsum = (1.0 - w(t, Q[0][0], h)) * h / LN2 / 1e9
                vol = math.sqrt(var / tsum) if tsum > 0 else 0.0
                x[3 + k], c0 = clip(ret, -p["ret_max_bps"], p["ret_max_bps"])
                v, c1 = clip(vol, 0, p["vol_max_bps_sqrt_s"])
                x[6 + k] = math.log1p(v)
                clipped |= c0 or c1
            hs = p["hl_spread_ns"]
            sp = [1e4 * (q[2] - q[1]) / ((q[1] + q[2]) / 2) for q in Q]
            ends = [q[0] for q in Q[1:]] + [t]
            ema = sp[0] * w(t, Q[0][0], hs) + sum(
                s_j * (w(t, e, hs) - w(t, q[0], hs)) for s_j, q, e in zip(sp, Q, ends, strict=True)
            )
            f = p["spread_floor_bps"]
            x[9], c0 = clip(math.log((spread + f) / (ema + f)), -p["spread_rel_max"],
                            p["spread_rel_max"])
            v, c1 = clip(LN2 / (p["hl_quote_ns"] / 1e9) * sum(w(t, q[0], p["hl_quote_ns"])
                                                             for q in Q), 0, p["rate_max_per_s"])
            x[10] = math.log1p(v)
            clipped |= c0 or c1
            if TR:
                hv = p["hl_vwap_ns"]
                vwap = (sum(pr * sz * w(t, s, hv) for s, pr, sz, _ in TR)
                        / sum(sz * w(t, s, hv) for s, _, sz, _ in TR))
                x[13], c0 = clip(1e4 * math.log(m / vwap), -p["vwap_dev_max_bps"],
                                 p["vwap_dev_max_bps"])
                clipped |= c0
            quote_age = (t - Q[-1][0]) / 1e9
        else:
            flags |= FLAG_NO_BOOK
            quote_age = since_first
        if TR:
            ht = p["hl_trade_ns"]
            sv = sum(np.sign(sd) * sz * w(t, s, ht) for s, _, sz, sd in TR)
            vv = sum(sz * w(t, s, ht) for s, _, sz, _ in TR)
            x[11] = sv / vv
            v, c0 = clip(LN2 / (ht / 1e9) * sum(w(t, s, ht) for s, *_ in TR), 0,
                         p["rate_max_per_s"])
            x[12] = math.log1p(v)
            clipped |= c0
            trade_age = (t - TR[-1][0]) / 1e9
        else:
            flags |= FLAG_NO_TRADES
            trade_age = since_first
        v, c0 = clip(trade_age, 0, p["age_max_s"])
        x[14] = math.log1p(v)
        v, c1 = clip(quote_age, 0, p["age_max_s"])
        x[15] = math.log1p(v)
        clipped |= c0 or c1
        if clipped:
            flags |= FLAG_CLIPPED
        if count[inst] < p["warmup_events"] or t - first[inst] < p["warmup_ns"]:
            flags |= FLAG_WARMUP
        X[j] = x
        F[j] = flags
    return X, F


# ---------------------------------------------------------------------------
# Streaming vs batch, reference
# ---------------------------------------------------------------------------
def test_streaming_update_tick_and_compute_batch_are_bit_identical():
    n_inst = 4
    ticks = random_stream(seed=11, n=1500, n_inst=n_inst, rejects=True)
    Xb, Fb, Cb, fsb, isb, n_ok = run_batch(ticks, n_inst)

    fstate, istate = new_state(n_inst)
    params = TEST_FS.params_array()
    Xs = np.zeros((len(ticks), N_FEATURES), np.float32)
    Fs = np.zeros(len(ticks), np.int32)
    Cs = np.zeros(N_REJECT_REASONS, np.int64)
    x = np.zeros(N_FEATURES, np.float32)
    for j in range(len(ticks)):
        Fs[j] = update_tick(ticks, j, fstate, istate, params, x, Cs)
        Xs[j] = x

    assert (Fb < 0).sum() > 20 and (Fb >= 0).sum() > 1000  # both paths exercised
    assert n_ok == (Fb >= 0).sum() == Cb[0]
    np.testing.assert_array_equal(Xs.view(np.uint32), Xb.view(np.uint32))
    np.testing.assert_array_equal(Fs, Fb)
    np.testing.assert_array_equal(Cs, Cb)
    np.testing.assert_array_equal(fstate.view(np.uint64), fsb.view(np.uint64))
    np.testing.assert_array_equal(istate, isb)
    assert np.isnan(Xb[Fb < 0]).all() and np.isfinite(Xb[Fb >= 0]).all()


def test_batch_in_chunks_equals_one_batch_with_carried_state():
    n_inst = 3
    ticks = random_stream(seed=5, n=900, n_inst=n_inst, rejects=True)
    X1, F1, C1, *_ = run_batch(ticks, n_inst)
    fstate, istate = new_state(n_inst)
    X2 = np.zeros_like(X1)
    F2 = np.zeros_like(F1)
    C2 = np.zeros_like(C1)
    for lo in range(0, len(ticks), 250):
        sl = slice(lo, lo + 250)
        compute_batch(ticks[sl], fstate, istate, TEST_FS.params_array(), X2[sl], F2[sl], C2)
    np.testing.assert_array_equal(X1.view(np.uint32), X2.view(np.uint32))
    np.testing.assert_array_equal(F1, F2)
    np.testing.assert_array_equal(C1, C2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kernels_match_python_reference_on_random_streams(seed):
    n_inst = 3
    ticks = random_stream(seed=seed, n=500, n_inst=n_inst, rejects=seed % 2 == 1)
    X, F, counters, *_ = run_batch(ticks, n_inst)
    Xr, Fr = reference_features(ticks, n_inst, TEST_FS.params)
    np.testing.assert_array_equal(F, Fr)
    np.testing.assert_allclose(X, Xr.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert counters.sum() == len(ticks)
    assert counters[0] == (Fr >= 0).sum()
    # every flag state occurs, so the comparison covers them
    for flag in (FLAG_WARMUP, FLAG_NO_BOOK, FLAG_STALE_QUOTE, FLAG_CLIPPED):
        assert (F[F >= 0] & flag).any()


def test_reference_matches_with_default_feature_set():
    ticks = random_stream(seed=9, n=400, n_inst=2)
    X, F, *_ = run_batch(ticks, 2, DEFAULT_FEATURE_SET)
    Xr, Fr = reference_features(ticks, 2, DEFAULT_FEATURE_SET.params)
    np.testing.assert_array_equal(F, Fr)
    np.testing.assert_allclose(X, Xr.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_validate_batch_rejects_exactly_the_rows_the_kernel_rejects():
    n_inst = 3
    ticks = random_stream(seed=21, n=800, n_inst=n_inst, rejects=True)
    _, F, C, *_ = run_batch(ticks, n_inst)
    reasons = np.zeros(len(ticks), np.uint8)
    counts = np.zeros(N_REJECT_REASONS, np.int64)
    n_ok = validate_batch(ticks, n_inst, reasons, counts)
    np.testing.assert_array_equal(np.where(F < 0, -F, 0), reasons)
    np.testing.assert_array_equal(counts, C)
    assert n_ok == C[0]


# ---------------------------------------------------------------------------
# Rejects
# ---------------------------------------------------------------------------
BAD_TICKS = {
    "nan_bid": (quote(T0 + 5 * S, 0, np.nan, 100.01), REJECT_NONFINITE),
    "inf_trade_price": (trade(T0 + 5 * S, 0, np.inf), REJECT_NONFINITE),
    "zero_ask_size": (quote(T0 + 5 * S, 0, 100.0, 100.01, 1.0, 0.0), REJECT_NONPOSITIVE),
    "negative_trade_size": (trade(T0 + 5 * S, 0, 100.0, -3.0), REJECT_NONPOSITIVE),
    "crossed_quote": (quote(T0 + 5 * S, 0, 100.02, 100.01), REJECT_CROSSED),
    "backwards_time": (trade(T0 + 2 * S - 1, 0, 100.0), REJECT_TIME_BACKWARDS),
    "unknown_instrument": (trade(T0 + 5 * S, 7, 100.0), REJECT_UNKNOWN_INSTRUMENT),
    "negative_instrument": (quote(T0 + 5 * S, -1, 100.0, 100.01), REJECT_UNKNOWN_INSTRUMENT),
    "book_event_kind": ({**trade(T0 + 5 * S, 0, 100.0), "kind": KIND_BOOK_ADD}, REJECT_BAD_KIND),
}


@pytest.mark.parametrize("case", sorted(BAD_TICKS))
def test_rejected_tick_leaves_state_untouched_and_is_counted(case):
    bad, reason = BAD_TICKS[case]
    good = [quote(T0, 0, 100.0, 100.01, 3, 4), trade(T0 + S, 0, 100.01, 2, 1),
            quote(T0 + 2 * S, 0, 100.01, 100.02, 5, 1), quote(T0 + 2 * S, 1, 50.0, 50.01)]
    ticks = make_ticks([*good, bad])
    fstate, istate = new_state(2)
    params = TEST_FS.params_array()
    counters = np.zeros(N_REJECT_REASONS, np.int64)
    x = np.zeros(N_FEATURES, np.float32)
    for j in range(len(good)):
        assert update_tick(ticks, j, fstate, istate, params, x, counters) >= 0
    f_before, i_before, c_before = fstate.copy(), istate.copy(), counters.copy()

    ret = update_tick(ticks, len(good), fstate, istate, params, x, counters)

    assert ret == -reason
    np.testing.assert_array_equal(fstate.view(np.uint64), f_before.view(np.uint64))
    np.testing.assert_array_equal(istate, i_before)
    expected = c_before.copy()
    expected[reason] += 1
    np.testing.assert_array_equal(counters, expected)
    assert np.isnan(x).all()


def test_equal_timestamps_and_locked_quote_are_accepted():
    ticks = make_ticks([quote(T0, 0, 100.0, 100.0), quote(T0, 0, 100.0, 100.01),
                        trade(T0, 0, 100.0)])
    _, F, C, *_ = run_batch(ticks, 1)
    assert (F >= 0).all() and C[0] == 3


# ---------------------------------------------------------------------------
# Decay in time
# ---------------------------------------------------------------------------
def _spaced_stream(gaps_ns: list[int]) -> np.ndarray:
    """Return the same 6 events (quotes moving the mid, trades) with the given gaps."""
    events = [quote, trade, quote, trade, quote, trade]
    args = [(100.0, 100.02), (100.01,), (100.04, 100.08), (100.06,), (100.02, 100.04), (100.03,)]
    ts = T0 + np.concatenate([[0], np.cumsum(gaps_ns)])
    rows = [ev(int(t), 0, *a) for ev, t, a in zip(events, ts, args, strict=True)]
    return make_ticks(rows)


def test_same_events_with_different_spacing_give_different_features():
    dense = _spaced_stream([10 * MS] * 5)
    sparse = _spaced_stream([10 * MS, 400 * MS, 10 * MS, 10 * MS, 2 * S])
    Xd, *_ = run_batch(dense, 1)
    Xs, *_ = run_batch(sparse, 1)
    for name in ("ret_fast_bps", "ret_mid_bps", "ret_slow_bps", "log_vol_fast", "log_vol_mid",
                 "log_quote_rate", "log_trade_rate", "spread_rel", "vwap_dev_bps"):
        assert Xd[-1, COL[name]] != Xs[-1, COL[name]], name
    # 2 s after the last quote the 100 ms momentum has decayed away, the 10 s one has not
    assert abs(Xs[-1, COL["ret_fast_bps"]]) < 1e-4 < abs(Xs[-1, COL["ret_slow_bps"]])


def test_doubled_half_life_matches_closed_form_decay():
    # one return r at t1, then a trade D later: ret_h = r * 2**(-D/h)
    D = 700 * MS
    ticks = make_ticks([quote(T0, 0, 100.0, 100.02), quote(T0 + S, 0, 100.2, 100.22),
                        trade(T0 + S + D, 0, 100.2)])
    r = 1e4 * math.log(100.21 / 100.01)
    base = TEST_FS.params
    for factor in (1.0, 2.0):
        fs = TEST_FS.with_params(**{k: base[k] * factor for k in
                                    ("hl_ret_fast_ns", "hl_ret_mid_ns", "hl_ret_slow_ns")})
        X, *_ = run_batch(ticks, 1, fs)
        for k, name in enumerate(("ret_fast_bps", "ret_mid_bps", "ret_slow_bps")):
            h = base[("hl_ret_fast_ns", "hl_ret_mid_ns", "hl_ret_slow_ns")[k]] * factor
            assert X[2, COL[name]] == pytest.approx(r * 2.0 ** (-D / h), rel=1e-6, abs=1e-7)
            # vol: r^2 2^(-D/h) over the decayed time since the first quote
            tsum = (1 - 2.0 ** (-(S + D) / h)) * h / LN2 / 1e9
            vol = math.sqrt(r * r * 2.0 ** (-D / h) / tsum)
            assert X[2, COL[f"log_vol_{name.split('_')[1]}"]] == pytest.approx(
                math.log1p(min(vol, base["vol_max_bps_sqrt_s"])), rel=1e-6)


def test_scaling_all_gaps_and_half_lives_by_two_rescales_features_as_expected():
    ticks = random_stream(seed=4, n=400, n_inst=2)
    slow = ticks.copy()
    slow["ts_event_ns"] = T0 + (ticks["ts_event_ns"] - T0) * 2
    time_params = [k for k in TEST_FS.params if k.endswith("_ns")]
    fs2 = TEST_FS.with_params(**{k: TEST_FS.params[k] * 2 for k in time_params},
                              vol_max_bps_sqrt_s=1e9, rate_max_per_s=1e9)
    fs1 = TEST_FS.with_params(vol_max_bps_sqrt_s=1e9, rate_max_per_s=1e9)
    X1, F1, *_ = run_batch(ticks, 2, fs1)
    X2, F2, *_ = run_batch(slow, 2, fs2)
    np.testing.assert_array_equal(F1, F2)
    same = ["spread_bps", "micro_offset_bps", "l1_imbalance", "ret_fast_bps", "ret_mid_bps",
            "ret_slow_bps", "spread_rel", "trade_flow_imb", "vwap_dev_bps"]
    for name in same:
        np.testing.assert_allclose(X2[:, COL[name]], X1[:, COL[name]], rtol=1e-5, atol=1e-5)
    # per-time quantities: vol per sqrt(s) / sqrt(2), rates / 2, ages * 2
    for name, scale in (("log_vol_fast", 2**-0.5), ("log_vol_mid", 2**-0.5),
                        ("log_vol_slow", 2**-0.5), ("log_quote_rate", 0.5),
                        ("log_trade_rate", 0.5), ("log_trade_age_s", 2.0),
                        ("log_quote_age_s", 2.0)):
        np.testing.assert_allclose(np.expm1(X2[:, COL[name]].astype(np.float64)),
                                   np.expm1(X1[:, COL[name]].astype(np.float64)) * scale,
                                   rtol=1e-5, atol=1e-6)


def test_the_kernels_log1p_matches_libm_to_a_few_ulps_and_every_float32():
    from numba import njit

    from features.common import log1p

    @njit
    def all_log1p(x, out):
        for i in range(x.shape[0]):
            out[i] = log1p(x[i])

    rng = np.random.default_rng(4)
    edges = [0.0, 5e-324, 1e-300, 2.0**-53, 2.0**-52, 1.0, 1e300]
    x = np.concatenate([10 ** rng.uniform(-15, 7, 500_000), edges])
    got = np.empty_like(x)
    all_log1p(x, got)
    ref = np.log1p(x)
    np.testing.assert_allclose(got, ref, rtol=1e-15, atol=0)
    np.testing.assert_array_equal(got.astype(np.float32), ref.astype(np.float32))


def test_a_reused_decay_factor_has_the_bits_of_the_one_it_replaces():
    """The kernels skip an exp/expm1 whose half-life repeats one computed before: the same bits."""
    from numba import njit

    from features.common import decay_factor
    from features.kernels import P_HL_RET, P_HL_SPREAD

    @njit
    def both(xs, params, p, out):  # out[:, 0:2] reused (or not), out[:, 2:4] computed
        for i in range(xs.shape[0]):
            x = xs[i]
            a0, a1, a2 = math.exp(x / params[P_HL_RET]), math.exp(x / params[P_HL_RET + 1]), math.exp(
                x / params[P_HL_RET + 2])
            e0, e1, e2 = math.expm1(x / params[P_HL_RET]), math.expm1(x / params[P_HL_RET + 1]), math.expm1(
                x / params[P_HL_RET + 2])
            out[i, 0] = decay_factor(x, params, p, P_HL_RET, a0, a1, a2, False)
            out[i, 1] = decay_factor(x, params, p, P_HL_RET, e0, e1, e2, True)
            out[i, 2] = math.exp(x / params[p])
            out[i, 3] = math.expm1(x / params[p])

    rng = np.random.default_rng(11)
    xs = -math.log(2.0) * 10 ** rng.uniform(0, 13, 20_000)  # -ln2 * dt_ns, 1 ns to ~3 h
    base = np.array(DEFAULT_FEATURE_SET.params_array(), dtype=np.float64)
    # the spread half-life equal to each return half-life in turn, then to none of them
    for hl in (*base[P_HL_RET:P_HL_RET + 3], 3.7e9):
        params = base.copy()
        params[P_HL_SPREAD] = hl
        out = np.zeros((xs.shape[0], 4))
        both(xs, params, P_HL_SPREAD, out)
        bits = out.view(np.uint64)
        np.testing.assert_array_equal(bits[:, 0], bits[:, 2])
        np.testing.assert_array_equal(bits[:, 1], bits[:, 3])
        assert 0.0 < out[:, 0].mean() < 1.0 and -1.0 < out[:, 1].mean() < 0.0  # not all 0, 1 or -1


def test_timestamps_keep_nanosecond_precision_near_2e18():
    # 1 ns apart at ~1.8e18: float64 timestamps would see the same instant
    assert float(T0) == float(T0 + 1)
    ticks = make_ticks([quote(T0, 0, 100.0, 100.01), trade(T0 + 1, 0, 100.0)])
    X, *_ = run_batch(ticks, 1)
    assert X[1, COL["log_quote_age_s"]] == np.float32(math.log1p(1e-9))


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------
def test_warmup_flag_clears_after_min_events_and_min_time():
    fs = TEST_FS.with_params(warmup_events=10.0, warmup_ns=1e9)
    rows = [quote(T0 + j * 10 * MS, 0, 100.0, 100.01) for j in range(20)]  # 190 ms
    rows += [quote(T0 + S + j * 10 * MS, 0, 100.0, 100.01) for j in range(3)]
    X, F, *_ = run_batch(make_ticks(rows), 1, fs)
    assert (F[:20] & FLAG_WARMUP).all()  # enough events but < 1 s
    assert not (F[20:] & FLAG_WARMUP).any()
    rows = [quote(T0 + j * S, 0, 100.0, 100.01) for j in range(12)]
    _, F, *_ = run_batch(make_ticks(rows), 1, fs)
    assert (F[:9] & FLAG_WARMUP).all() and not (F[9:] & FLAG_WARMUP).any()  # 10th event


def test_no_trades_flag_until_the_first_trade_of_the_instrument():
    ticks = make_ticks([quote(T0, 0, 100.0, 100.02, 3, 1), quote(T0 + S, 1, 50.0, 50.01, 1, 1),
                        trade(T0 + 2 * S, 0, 100.0, 1, 1), quote(T0 + 3 * S, 0, 100.0, 100.02, 3, 1),
                        quote(T0 + 3 * S, 1, 50.0, 50.01, 2, 1)])  # fmt: skip
    _, F, *_ = run_batch(ticks, 2)
    assert [bool(f & FLAG_NO_TRADES) for f in F] == [True, True, False, False, True]


def test_no_book_flag_until_first_quote_with_neutral_book_features():
    ticks = make_ticks([trade(T0, 0, 100.0, 2, 1), trade(T0 + 3 * S, 0, 100.1, 1, -1),
                        quote(T0 + 4 * S, 0, 100.0, 100.02, 3, 1), trade(T0 + 4 * S, 0, 100.0)])
    X, F, *_ = run_batch(ticks, 1)
    assert (F[:2] & FLAG_NO_BOOK).all() and not (F[2:] & FLAG_NO_BOOK).any()
    assert not (F[:2] & FLAG_STALE_QUOTE).any()
    book_cols = list(range(COL["log_quote_rate"] + 1)) + [COL["vwap_dev_bps"]]
    assert (X[:2, book_cols] == 0).all()
    # trade features are live without a book; ages before the first quote count from the start
    assert X[1, COL["trade_flow_imb"]] != 0 and X[1, COL["log_trade_rate"]] > 0
    assert X[1, COL["log_quote_age_s"]] == pytest.approx(math.log1p(3.0))
    assert X[2, COL["spread_bps"]] == pytest.approx(1e4 * 0.02 / 100.01, rel=1e-6)
    assert X[2, COL["l1_imbalance"]] == pytest.approx(0.5)


def test_stale_quote_flag_on_trade_after_threshold():
    thr = int(TEST_FS.params["stale_quote_ns"])
    ticks = make_ticks([quote(T0, 0, 100.0, 100.01), trade(T0 + thr, 0, 100.0),
                        trade(T0 + thr + 1, 0, 100.0), quote(T0 + 5 * S, 0, 100.0, 100.01),
                        trade(T0 + 5 * S + 1, 0, 100.0)])
    _, F, *_ = run_batch(ticks, 1)
    stale = (F & FLAG_STALE_QUOTE) != 0
    np.testing.assert_array_equal(stale, [False, False, True, False, False])


def test_clipped_flag_when_a_feature_leaves_its_range():
    ticks = make_ticks([quote(T0, 0, 100.0, 100.01), quote(T0 + S, 0, 100.0, 130.0),
                        quote(T0 + 2 * S, 0, 100.0, 100.01)])
    X, F, *_ = run_batch(ticks, 1)
    assert not F[0] & FLAG_CLIPPED
    assert F[1] & FLAG_CLIPPED
    assert X[1, COL["spread_bps"]] == TEST_FS.params["spread_max_bps"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(
        st.tuples(
            st.integers(0, 3 * S),  # gap ns
            st.booleans(),  # quote?
            st.floats(1e-3, 1e5),  # price level
            st.floats(0.0, 0.05),  # relative spread / trade offset
            st.floats(1e-3, 1e6),  # size
            st.floats(1e-3, 1e6),  # other size
            st.integers(-1, 1),  # side
        ),
        min_size=1,
        max_size=60,
    )
)
def test_features_stay_within_documented_ranges(events):
    rows, t = [], T0
    for gap, is_quote, px, rel, s1, s2, side in events:
        t += gap
        if is_quote:
            rows.append(quote(t, 0, px, px * (1 + rel), s1, s2))
        else:
            rows.append(trade(t, 0, px * (1 + rel), s1, side))
    X, F, *_ = run_batch(make_ticks(rows), 1)
    assert (F >= 0).all()
    assert np.isfinite(X).all()
    for k, d in enumerate(TEST_FS.describe()):
        lo, hi = d["range"]
        assert (X[:, k] >= np.float32(lo)).all() and (X[:, k] <= np.float32(hi)).all(), d["name"]


# ---------------------------------------------------------------------------
# Feature set
# ---------------------------------------------------------------------------
def test_feature_set_id_is_stable_across_processes():
    code = "from features import DEFAULT_FEATURE_SET as f; print(f.id)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == DEFAULT_FEATURE_SET.id
    assert out.startswith("l1.v1.") and len(out.split(".")[-1]) == 12


def test_feature_set_id_changes_when_a_param_or_version_changes():
    fs = DEFAULT_FEATURE_SET
    assert fs.with_params(hl_ret_fast_ns=fs.params["hl_ret_fast_ns"]).id == fs.id
    assert fs.with_params(hl_ret_fast_ns=200e6).id != fs.id
    assert fs.with_params(stale_quote_ns=2e9).id != fs.id
    import dataclasses

    assert dataclasses.replace(fs, version=2).id.startswith("l1.v2.")
    assert json.loads(fs.canonical_json())["names"] == list(FEATURE_NAMES)


def test_feature_set_shape_and_lookup():
    fs = DEFAULT_FEATURE_SET
    assert fs.name == "l1" and len(fs.names) == N_FEATURES >= 12
    assert fs.params_array().dtype == np.float64
    assert [d["name"] for d in fs.describe()] == list(fs.names)
    assert get_feature_set(fs.id) is fs and get_feature_set("l1") is fs
    with pytest.raises(KeyError, match=fs.id):
        get_feature_set("l1.v9.000000000000")
    with pytest.raises(ValueError):
        fs.with_params(hl_ret_fast_ns=0.0)
    f, i = new_state(3)
    assert f.shape == (3, NF_STATE) and i.shape == (3, NI_STATE)
    assert (i[:, 0] == np.iinfo(np.int64).min).all()


def _log8_over(u, w):
    """Run features.fastlog.log8_checked over u, w (float64, a multiple of 8 long): (p, ok bool)."""
    from numba import njit

    from features.fastlog import log8_checked

    @njit(error_model="numpy")
    def run(u, w, p, ok):
        for g in range(u.shape[0] // 8):
            j = 8 * g
            q, m = log8_checked((u[j], u[j + 1], u[j + 2], u[j + 3], u[j + 4], u[j + 5], u[j + 6], u[j + 7]),
                                (w[j], w[j + 1], w[j + 2], w[j + 3], w[j + 4], w[j + 5], w[j + 6], w[j + 7]))
            for k in range(8):
                p[j + k] = q[k]
                ok[j + k] = (m >> k) & 1

    p, ok = np.empty_like(u), np.zeros(u.shape[0], np.int64)
    run(u, w, p, ok)
    return p, ok.astype(bool)


def _libm_log(x):
    from numba import njit

    @njit(error_model="numpy")
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = math.log(x[i]) if x[i] > 0.0 else np.nan  # libm's log (numba calls it)

    out = np.empty_like(x)
    run(x, out)
    return out


def test_the_vector_log_is_libms_float32_wherever_it_says_so():
    """log8_checked: within 2**-43 of libm's value in range, its mask exactly the documented margin
    test, and every lane it keeps the float32 of the same expression with libm's log."""
    rng = np.random.default_rng(21)
    n = 400_000
    v = np.concatenate([
        10.0 ** rng.uniform(-20, 7, n), rng.uniform(0, 2, n), np.floor(rng.uniform(0, 1e6, n)),
        np.arange(n) * 1e-9, 10.0 ** rng.uniform(-30, 290, n),
        np.array([0.0, 5e-324, 1e-310, 2.0**-53, 2.0**-52, 1.0, math.sqrt(2) - 1,
                  np.nextafter(math.sqrt(2), 0) - 1, np.nextafter(math.sqrt(2), 3) - 1, 1e300, 1e308, np.inf,
                  np.nan, -1.0, -2.0, 0.5]),
    ])  # fmt: skip
    v = np.concatenate([v, np.zeros(-len(v) % 8)])
    u = 1.0 + v
    libm_log = _libm_log(u)  # what the kernels' math.log computes (numpy's own log differs)
    with np.errstate(all="ignore"):
        for form, w, ref in (("log1p", v, np.where(u == 1.0, v, libm_log * (v / (u - 1.0)))),
                             ("log", u - 1.0, libm_log)):  # fmt: skip
            p, ok = _log8_over(u, w)
            inr = (u >= 2.0**-1000) & (u <= 2.0**1000)
            one = u == 1.0
            rel = np.abs(p[inr] - ref[inr]) / np.maximum(np.abs(ref[inr]), 1e-300)
            assert rel.max() < 2.0**-43, form
            low = (p.view(np.int64) & ((1 << 29) - 1)) - (1 << 28)
            np.testing.assert_array_equal(ok, one | (inr & (np.abs(low) > (1 << 17))))
            np.testing.assert_array_equal(p[ok].astype(np.float32).view(np.uint32),
                                          ref[ok].astype(np.float32).view(np.uint32))  # fmt: skip
            assert 0 < (~ok).sum() < 0.002 * len(u) + 40, form  # the out-of-range edges too


def test_the_l1_spread_ratio_log_is_libms_at_a_clip_bound():
    """When the vector's log(ratio) may lie on the other side of the clip bound than libm's, the
    kernel takes libm's: at srmax = log(ratio) exactly the feature is srmax and not clipped."""
    from features.kernels import _log_features

    rng = np.random.default_rng(8)
    for ratio in 10.0 ** rng.uniform(-3, 3, 300):
        srmax = abs(math.log(ratio))
        y, r, clipped = _log_features(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, ratio, srmax)
        assert r == np.float32(math.log(ratio)) and not clipped, ratio
        assert [float(x) for x in y] == [float(np.float32(math.log1p(x))) for x in range(7)]
