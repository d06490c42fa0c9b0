"""Streaming L1 feature kernels: one per-event core shared by live and batch paths.

State is two flat preallocated arrays, one row per instrument:

* ``fstate`` float64 ``(n_instruments, NF_STATE)``: last quote, log mid, and the
  time-decayed accumulators (columns ``F_*``);
* ``istate`` int64 ``(n_instruments, NI_STATE)``: timestamps and counters
  (columns ``I_*``).  Column 0 is the last accepted ``ts_event_ns``.  Times stay
  int64 ns (epoch ns do not fit exactly in float64); only differences become
  float.

Every decayed quantity uses a half-life in event time (ns): between two events of
an instrument ``dt = t - t_prev`` ns and each accumulator is multiplied by
``a = exp(-ln2 * dt / half_life)``, so irregular spacing is handled exactly and
simultaneous events (``dt = 0``) do not decay anything.  All accumulators are
advanced to the current event time on *every* accepted event (quote or trade),
then the event is applied, then the full feature vector is written from the
state.  The features, their formulas, units and ranges are documented in
:mod:`features.featureset`.

:func:`apply_tick` is the per-event core; :func:`update_tick` (live, one numba
dispatch per tick) and :func:`compute_batch` (research / replay) both run it, and
a fused features+model kernel can call it from its own ``@njit`` function.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

from engine.schema import (
    FLAG_CLIPPED,
    FLAG_NO_BOOK,
    FLAG_NO_TRADES,
    FLAG_STALE_QUOTE,
    FLAG_WARMUP,
    KIND_QUOTE,
    REJECT_OK,
)
from features.common import (
    BPS,
    NS_PER_S,
    clip,
    decay_factor,
    drop_stale_numba_cache,
    l1_book_features,
    log1p,
    realised_vols,
)
from features.fastlog import LANES_OK, clear_of, log8_checked
from features.validate import validate_tick

__all__ = [
    "N_FEATURES",
    "NF_STATE",
    "NI_STATE",
    "N_PARAMS",
    "PARAM_NAMES",
    "FEATURE_NAMES",
    "INT64_MIN",
    "new_state",
    "reset_state",
    "apply_tick",
    "update_tick",
    "compute_batch",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
drop_stale_numba_cache(__file__, [os.path.join(_HERE, "common.py"), os.path.join(_HERE, "validate.py"),
                                  os.path.join(_HERE, "fastlog.py"), os.path.join(_HERE, "book", "layout.py"),
                                  os.path.join(_HERE, "..", "engine", "schema.py")])  # fmt: skip

INT64_MIN = np.iinfo(np.int64).min
_LN2 = math.log(2.0)

# ---------------------------------------------------------------------------
# Feature columns (order of x).  Names and docs: features.featureset.
# ---------------------------------------------------------------------------
X_SPREAD = 0
X_MICRO = 1
X_IMB = 2
X_RET_FAST = 3  # X_RET_FAST + k, k = 0, 1, 2 (fast, mid, slow half-life)
X_VOL_FAST = 6  # X_VOL_FAST + k
X_SPREAD_REL = 9
X_QUOTE_RATE = 10
X_FLOW_IMB = 11
X_TRADE_RATE = 12
X_VWAP_DEV = 13
X_TRADE_AGE = 14
X_QUOTE_AGE = 15
N_FEATURES = 16
assert (X_SPREAD, X_MICRO, X_IMB) == (0, 1, 2)  # features.common.l1_book_features writes x_out[0:3]

#: Column names of ``x`` (the feature set's ``names`` must equal this).
FEATURE_NAMES = (
    "spread_bps",
    "micro_offset_bps",
    "l1_imbalance",
    "ret_fast_bps",
    "ret_mid_bps",
    "ret_slow_bps",
    "log_vol_fast",
    "log_vol_mid",
    "log_vol_slow",
    "spread_rel",
    "log_quote_rate",
    "trade_flow_imb",
    "log_trade_rate",
    "vwap_dev_bps",
    "log_trade_age_s",
    "log_quote_age_s",
)

# ---------------------------------------------------------------------------
# Float state columns.
# ---------------------------------------------------------------------------
F_BID = 0  #: last quote bid price
F_ASK = 1  #: last quote ask price
F_BSZ = 2  #: last quote bid size
F_ASZ = 3  #: last quote ask size
F_LOGMID = 4  #: log of the last quote's mid
F_SPREAD_EMA = 5  #: time-EMA of spread_bps (bps)
F_RET = 6  #: F_RET + k: decayed sum of log-mid returns (bps), half-life k
F_VAR = 9  #: F_VAR + k: decayed sum of squared returns (bps^2)
F_TIME = 12  #: F_TIME + k: decayed time with a book, integral of the kernel (s)
F_FLOW_SV = 15  #: decayed signed trade volume (trade half-life)
F_FLOW_V = 16  #: decayed trade volume (trade half-life)
F_TRADE_N = 17  #: decayed trade count (trade half-life)
F_VWAP_PV = 18  #: decayed sum price * size (VWAP half-life)
F_VWAP_V = 19  #: decayed sum size (VWAP half-life)
F_QUOTE_N = 20  #: decayed quote count (quote half-life)
NF_STATE = 21

# ---------------------------------------------------------------------------
# Int64 state columns.
# ---------------------------------------------------------------------------
I_LAST_TS = 0  #: last accepted ts_event_ns (INT64_MIN: none)
I_FIRST_TS = 1  #: first accepted ts_event_ns (INT64_MIN: none)
I_LAST_QUOTE_TS = 2  #: ts_event_ns of the last quote (INT64_MIN: no book yet)
I_LAST_TRADE_TS = 3  #: ts_event_ns of the last trade (INT64_MIN: none)
I_N_EVENTS = 4  #: accepted events (quotes + trades)
I_N_QUOTES = 5  #: accepted quotes
NI_STATE = 6

# ---------------------------------------------------------------------------
# Parameter vector (float64, order of PARAM_NAMES).
# ---------------------------------------------------------------------------
P_HL_RET = 0  # P_HL_RET + k, k = 0, 1, 2
P_HL_TRADE = 3
P_HL_VWAP = 4
P_HL_SPREAD = 5
P_HL_QUOTE = 6
P_WARMUP_EVENTS = 7
P_WARMUP_NS = 8
P_STALE_QUOTE_NS = 9
P_SPREAD_MAX_BPS = 10
P_RET_MAX_BPS = 11
P_VOL_MAX = 12
P_RATE_MAX = 13
P_VWAP_DEV_MAX_BPS = 14
P_AGE_MAX_S = 15
P_SPREAD_FLOOR_BPS = 16
P_SPREAD_REL_MAX = 17
N_PARAMS = 18

#: Names of the entries of the params vector, in order (keys of FeatureSet.params).
PARAM_NAMES = (
    "hl_ret_fast_ns",
    "hl_ret_mid_ns",
    "hl_ret_slow_ns",
    "hl_trade_ns",
    "hl_vwap_ns",
    "hl_spread_ns",
    "hl_quote_ns",
    "warmup_events",
    "warmup_ns",
    "stale_quote_ns",
    "spread_max_bps",
    "ret_max_bps",
    "vol_max_bps_sqrt_s",
    "rate_max_per_s",
    "vwap_dev_max_bps",
    "age_max_s",
    "spread_floor_bps",
    "spread_rel_max",
)

assert len(FEATURE_NAMES) == N_FEATURES
assert len(PARAM_NAMES) == N_PARAMS


def new_state(n_instruments: int) -> tuple[np.ndarray, np.ndarray]:
    """Return freshly initialised feature state for ``n_instruments`` instruments.

    Parameters
    ----------
    n_instruments : int
        Number of instrument rows (instrument ids ``0 .. n_instruments - 1``).

    Returns
    -------
    fstate : ndarray of float64, shape (n_instruments, NF_STATE)
        All zeros.
    istate : ndarray of int64, shape (n_instruments, NI_STATE)
        Timestamp columns ``INT64_MIN`` (none yet), counters 0.
    """
    if n_instruments < 0:
        raise ValueError(f"n_instruments must be >= 0, got {n_instruments}")
    fstate = np.zeros((n_instruments, NF_STATE), dtype=np.float64)
    istate = np.zeros((n_instruments, NI_STATE), dtype=np.int64)
    reset_state(fstate, istate)
    return fstate, istate


def reset_state(fstate: np.ndarray, istate: np.ndarray) -> None:
    """Reset existing state arrays in place to the initial (no event seen) state.

    Allocates: no.
    """
    fstate[...] = 0.0
    istate[...] = 0
    istate[:, I_LAST_TS] = INT64_MIN
    istate[:, I_FIRST_TS] = INT64_MIN
    istate[:, I_LAST_QUOTE_TS] = INT64_MIN
    istate[:, I_LAST_TRADE_TS] = INT64_MIN


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _log_features(v0, v1, v2, v3, v4, v5, v6, ratio, srmax):
    """Return ``(y, spread_rel, clipped)``: ``y[k] = float32(log1p(v_k))`` (k < 7, the form of
    :func:`features.common.log1p`) and ``clip(log(ratio), -srmax, srmax)``, bit for bit libm's.

    The eight logs are one vector (:func:`features.fastlog.log8_checked`); when a lane's float32
    is not certain (about 1 tick in 250), or the spread ratio's log may lie on the other side of
    a clip bound than libm's (:func:`features.fastlog.clear_of`), all eight are libm's.
    """
    p, ok = log8_checked((1.0 + v0, 1.0 + v1, 1.0 + v2, 1.0 + v3, 1.0 + v4, 1.0 + v5, 1.0 + v6, ratio),
                         (v0, v1, v2, v3, v4, v5, v6, ratio - 1.0))  # fmt: skip
    r = p[7]
    if ok == LANES_OK and clear_of(r, srmax):
        y = (np.float32(p[0]), np.float32(p[1]), np.float32(p[2]), np.float32(p[3]), np.float32(p[4]),
             np.float32(p[5]), np.float32(p[6]))  # fmt: skip
    else:
        y = (np.float32(log1p(v0)), np.float32(log1p(v1)), np.float32(log1p(v2)), np.float32(log1p(v3)),
             np.float32(log1p(v4)), np.float32(log1p(v5)), np.float32(log1p(v6)))  # fmt: skip
        r = math.log(ratio)
    v, c = clip(r, -srmax, srmax, 0.0)
    return y, np.float32(v), c


# _nrt=False: it allocates nothing, so no reference counting of its views; error_model="numpy":
# divisions are IEEE's (no zero-divisor branch, never an exception; see validate_tick's MIN_PRICE)
@njit(cache=True, nogil=True, _nrt=False, error_model="numpy")
def apply_tick(ticks, i, fstate, istate, params, x_out, counters):
    """Validate and apply ``ticks[i]``; write its feature vector; return flags or -reason.

    This is the per-event core run by :func:`update_tick` and :func:`compute_batch`;
    call it from other ``@njit`` code (e.g. a fused features + model kernel).

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE
        Tick rows; only row ``i`` is read.  Times are int64 ns.
    i : int
        Row to apply.
    fstate : ndarray of float64, shape (n_instruments, NF_STATE)
        Float state, updated in place for the tick's instrument.
    istate : ndarray of int64, shape (n_instruments, NI_STATE)
        Int state (timestamps in ns, counters), updated in place.
    params : ndarray of float64, shape (N_PARAMS,)
        Feature-set parameters (``FeatureSet.params_array()``).
    x_out : ndarray of float32, shape (N_FEATURES,)
        Receives the feature vector; all NaN if the tick is rejected.
    counters : ndarray of int64, shape (N_REJECT_REASONS,)
        ``counters[0]`` counts accepted ticks, ``counters[r]`` rejects of reason r.

    Returns
    -------
    int
        Flag bit set (``FLAG_*``, >= 0) if accepted, ``-reason`` (< 0) if rejected.
        A rejected tick changes no state other than ``counters`` and ``x_out``.

    Allocates: no.
    """
    reason = validate_tick(ticks, i, istate[:, I_LAST_TS])
    if reason != REJECT_OK:
        counters[reason] += 1
        for k in range(N_FEATURES):
            x_out[k] = np.nan
        return -reason
    counters[REJECT_OK] += 1

    t = ticks[i]
    inst = t.instrument
    ts = t.ts_event_ns
    fs = fstate[inst]
    st = istate[inst]
    flags = 0

    # -- advance every decayed accumulator from the previous event to ts ------
    if st[I_N_EVENTS] == 0:
        st[I_FIRST_TS] = ts
    else:
        dt_ns = np.float64(ts - st[I_LAST_TS])
        if dt_ns > 0.0:
            has_book = st[I_LAST_QUOTE_TS] != INT64_MIN
            # a factor whose half-life equals one computed before with the same function is
            # reused (the same bits; the shipped half-lives repeat: 7 calls -> 5)
            x = -_LN2 * dt_ns
            em0 = math.expm1(x / params[P_HL_RET])  # a - 1
            em1 = math.expm1(x / params[P_HL_RET + 1])
            em2 = math.expm1(x / params[P_HL_RET + 2])
            for k in range(3):
                hl = params[P_HL_RET + k]
                em = em0 if k == 0 else (em1 if k == 1 else em2)
                a = 1.0 + em
                fs[F_RET + k] *= a
                fs[F_VAR + k] *= a
                if has_book:
                    # exact integral of the kernel over (t_prev, ts], in s
                    fs[F_TIME + k] = a * fs[F_TIME + k] - em * (hl / (_LN2 * NS_PER_S))
            hl_t, hl_v, hl_q = params[P_HL_TRADE], params[P_HL_VWAP], params[P_HL_QUOTE]
            a_t = math.exp(x / hl_t)
            fs[F_FLOW_SV] *= a_t
            fs[F_FLOW_V] *= a_t
            fs[F_TRADE_N] *= a_t
            a_v = a_t if hl_v == hl_t else math.exp(x / hl_v)
            fs[F_VWAP_PV] *= a_v
            fs[F_VWAP_V] *= a_v
            fs[F_QUOTE_N] *= a_t if hl_q == hl_t else (a_v if hl_q == hl_v else math.exp(x / hl_q))
            if has_book:
                # time-EMA of the piecewise-constant spread held over (t_prev, ts]
                em = decay_factor(x, params, P_HL_SPREAD, P_HL_RET, em0, em1, em2, True)
                mid_prev = 0.5 * fs[F_BID] + 0.5 * fs[F_ASK]
                s_prev = BPS * (fs[F_ASK] - fs[F_BID]) / mid_prev
                fs[F_SPREAD_EMA] = (1.0 + em) * fs[F_SPREAD_EMA] - em * s_prev
    st[I_LAST_TS] = ts
    st[I_N_EVENTS] += 1

    # -- apply the event ------------------------------------------------------
    if t.kind == KIND_QUOTE:
        bid = t.bid_px
        ask = t.ask_px
        logmid = math.log(0.5 * bid + 0.5 * ask)
        if st[I_LAST_QUOTE_TS] == INT64_MIN:
            mid = 0.5 * bid + 0.5 * ask
            fs[F_SPREAD_EMA] = BPS * (ask - bid) / mid
        else:
            r = BPS * (logmid - fs[F_LOGMID])
            for k in range(3):
                fs[F_RET + k] += r
                fs[F_VAR + k] += r * r
        fs[F_BID] = bid
        fs[F_ASK] = ask
        fs[F_BSZ] = t.bid_sz
        fs[F_ASZ] = t.ask_sz
        fs[F_LOGMID] = logmid
        fs[F_QUOTE_N] += 1.0
        st[I_LAST_QUOTE_TS] = ts
        st[I_N_QUOTES] += 1
    else:  # KIND_TRADE (validate_tick rejects every other kind)
        size = t.size
        if t.side > 0:
            fs[F_FLOW_SV] += size
        elif t.side < 0:
            fs[F_FLOW_SV] -= size
        fs[F_FLOW_V] += size
        fs[F_TRADE_N] += 1.0
        fs[F_VWAP_PV] += t.price * size
        fs[F_VWAP_V] += size
        if st[I_LAST_QUOTE_TS] != INT64_MIN and (
            np.float64(ts - st[I_LAST_QUOTE_TS]) > params[P_STALE_QUOTE_NS]
        ):
            flags |= FLAG_STALE_QUOTE
        st[I_LAST_TRADE_TS] = ts

    # -- features from the state at ts ----------------------------------------
    clipped = False
    age_first_s = np.float64(ts - st[I_FIRST_TS]) / NS_PER_S
    age_max = params[P_AGE_MAX_S]
    rate_max = params[P_RATE_MAX]
    # the arguments of the eight logs, taken together at the end (_log_features): log1p of
    # vol_k (k = 0..2), quote rate, trade rate, quote age, trade age; log of the spread ratio
    v0 = v1 = v2 = v3 = v4 = 0.0
    ratio = 1.0
    has_book = st[I_LAST_QUOTE_TS] != INT64_MIN
    if not has_book:
        flags |= FLAG_NO_BOOK
        for k in range(X_SPREAD_REL + 1):  # book, returns, vol, spread_rel
            x_out[k] = 0.0
        x_out[X_QUOTE_RATE] = 0.0
        x_out[X_VWAP_DEV] = 0.0
        v5, c = clip(age_first_s, 0.0, age_max, 0.0)
        clipped |= c
    else:
        # x_out[X_SPREAD], x_out[X_MICRO], x_out[X_IMB]
        smax = params[P_SPREAD_MAX_BPS]
        spread, c = l1_book_features(fs[F_BID], fs[F_ASK], fs[F_BSZ], fs[F_ASZ], smax, x_out)
        clipped |= c
        rmax = params[P_RET_MAX_BPS]
        vmax = params[P_VOL_MAX]
        for k in range(3):
            v, c = clip(fs[F_RET + k], -rmax, rmax, 0.0)
            clipped |= c
            x_out[X_RET_FAST + k] = v
        v0, v1, v2, c = realised_vols(fs, F_VAR, F_TIME, vmax)
        clipped |= c
        floor = params[P_SPREAD_FLOOR_BPS]
        ratio = (spread + floor) / (fs[F_SPREAD_EMA] + floor)
        rate = fs[F_QUOTE_N] * (_LN2 * NS_PER_S) / params[P_HL_QUOTE]
        v3, c = clip(rate, 0.0, rate_max, 0.0)
        clipped |= c
        if fs[F_VWAP_V] > 0.0:
            vwap = fs[F_VWAP_PV] / fs[F_VWAP_V]
            dmax = params[P_VWAP_DEV_MAX_BPS]
            v, c = clip(BPS * (fs[F_LOGMID] - math.log(vwap)), -dmax, dmax, 0.0)
            clipped |= c
            x_out[X_VWAP_DEV] = v
        else:
            x_out[X_VWAP_DEV] = 0.0
        age_q = np.float64(ts - st[I_LAST_QUOTE_TS]) / NS_PER_S
        v5, c = clip(age_q, 0.0, age_max, 0.0)
        clipped |= c

    has_trades = st[I_LAST_TRADE_TS] != INT64_MIN
    if not has_trades:
        flags |= FLAG_NO_TRADES
        x_out[X_FLOW_IMB] = 0.0
        x_out[X_TRADE_RATE] = 0.0
        age_t = age_first_s
    else:
        vol_t = fs[F_FLOW_V]
        if vol_t > 0.0:
            v, c = clip(fs[F_FLOW_SV] / vol_t, -1.0, 1.0, 0.0)
            clipped |= c
            x_out[X_FLOW_IMB] = v
        else:
            x_out[X_FLOW_IMB] = 0.0
        rate = fs[F_TRADE_N] * (_LN2 * NS_PER_S) / params[P_HL_TRADE]
        v4, c = clip(rate, 0.0, rate_max, 0.0)
        clipped |= c
        age_t = np.float64(ts - st[I_LAST_TRADE_TS]) / NS_PER_S
    v6, c = clip(age_t, 0.0, age_max, 0.0)
    clipped |= c

    y, spread_rel, c = _log_features(v0, v1, v2, v3, v4, v5, v6, ratio, params[P_SPREAD_REL_MAX])
    if has_book:
        x_out[X_VOL_FAST] = y[0]
        x_out[X_VOL_FAST + 1] = y[1]
        x_out[X_VOL_FAST + 2] = y[2]
        x_out[X_QUOTE_RATE] = y[3]
        x_out[X_SPREAD_REL] = spread_rel
        clipped |= c
    if has_trades:
        x_out[X_TRADE_RATE] = y[4]
    x_out[X_QUOTE_AGE] = y[5]
    x_out[X_TRADE_AGE] = y[6]

    if clipped:
        flags |= FLAG_CLIPPED
    if np.float64(st[I_N_EVENTS]) < params[P_WARMUP_EVENTS] or (
        np.float64(ts - st[I_FIRST_TS]) < params[P_WARMUP_NS]
    ):
        flags |= FLAG_WARMUP
    return flags


@njit(cache=True, nogil=True)
def update_tick(ticks, i, fstate, istate, params, x_out, counters):
    """Validate and apply one tick; write its features; return flags or -reason.

    The live entry point: one numba dispatch per tick.  Same arguments, effects
    and return value as :func:`apply_tick` (see there for dtypes and shapes):
    ``x_out`` is float32 ``(N_FEATURES,)``, times are int64 ns, ``counters`` is
    int64 ``(N_REJECT_REASONS,)``.

    Allocates: no.
    """
    return apply_tick(ticks, i, fstate, istate, params, x_out, counters)


@njit(cache=True, nogil=True)
def compute_batch(ticks, fstate, istate, params, X_out, flags_out, counters):
    """Apply every row of ``ticks`` in order with the streaming core; return n accepted.

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE, shape (n,)
        Events in arrival order (times int64 ns).
    fstate, istate : ndarray
        State from :func:`new_state` (or carried over from a previous chunk),
        updated in place exactly as ``n`` calls of :func:`update_tick` would.
    params : ndarray of float64, shape (N_PARAMS,)
    X_out : ndarray of float32, shape (n, N_FEATURES)
        Row ``j`` receives the features of ``ticks[j]`` (NaN if rejected).
    flags_out : ndarray of int32, shape (n,)
        Flags (>= 0) or ``-reason`` (< 0) per row.
    counters : ndarray of int64, shape (N_REJECT_REASONS,)

    Returns
    -------
    int
        Number of accepted rows.

    Allocates: no.
    """
    n_ok = 0
    for j in range(ticks.shape[0]):
        f = apply_tick(ticks, j, fstate, istate, params, X_out[j], counters)
        flags_out[j] = f
        if f >= 0:
            n_ok += 1
    return n_ok
