"""Trade-only feature kernels (``trades`` feature set): features that need no book.

Same signatures as :mod:`features.kernels` (``apply_tick``, ``update_tick``,
``compute_batch``, ``new_state``).  Only trades (kind 2) are handled; any other
kind is rejected as ``bad_kind``.  Every accepted trade advances the
time-decayed accumulators of its instrument to the trade time and writes the
feature vector documented in :mod:`features.featureset` (feature set
``trades``).

Aggressor side: ``side`` +1 / -1 when the feed gives it; 0 (unknown) is
replaced by the **tick rule**: an uptick is a buy, a downtick a sell, a
zero-tick repeats the previous inferred sign (0 before the first price change).

Price checks (besides NaN / <= 0): a price above ``max_price`` or outside
``[last / price_band, last * price_band]`` of the instrument's last accepted
trade price is rejected as ``absurd_price`` (a fat finger or a vendor sentinel
must not poison the returns and the VWAP).

State: ``fstate`` float64 ``(n_instruments, NF_STATE)``, ``istate`` int64
``(n_instruments, NI_STATE)``; times stay int64 ns.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit

from engine.schema import (
    FLAG_CLIPPED,
    FLAG_WARMUP,
    KIND_TRADE,
    MIN_PRICE,
    REJECT_ABSURD_PRICE,
    REJECT_BAD_KIND,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    REJECT_OK,
    REJECT_TIME_BACKWARDS,
    REJECT_UNKNOWN_INSTRUMENT,
)
from features.common import BPS, NS_PER_S, clip, decay_factor, drop_stale_numba_cache, realised_vols
from features.fastlog import LANES_OK, clear_of, log8_of

__all__ = [
    "N_FEATURES",
    "N_PARAMS",
    "PARAM_NAMES",
    "FEATURE_NAMES",
    "DEFAULT_PARAMS",
    "NF_STATE",
    "NI_STATE",
    "new_state",
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

FEATURE_NAMES = (
    "ret_fast_bps",
    "ret_mid_bps",
    "ret_slow_bps",
    "log_vol_fast",
    "log_vol_mid",
    "log_vol_slow",
    "trade_flow_imb",
    "log_trade_rate",
    "trade_rate_rel",
    "vwap_dev_bps",
    "log_size_rel",
    "log_trade_gap_s",
)
N_FEATURES = len(FEATURE_NAMES)
X_RET = 0
X_VOL = 3
X_FLOW = 6
X_RATE = 7
X_RATE_REL = 8
X_VWAP = 9
X_SIZE_REL = 10
X_GAP = 11

PARAM_NAMES = (
    "max_price",
    "price_band",
    "hl_ret_fast_ns",
    "hl_ret_mid_ns",
    "hl_ret_slow_ns",
    "hl_trade_ns",
    "hl_slow_ns",
    "warmup_events",
    "warmup_ns",
    "ret_max_bps",
    "vol_max_bps_sqrt_s",
    "rate_max_per_s",
    "rate_rel_max",
    "vwap_dev_max_bps",
    "size_rel_max",
    "age_max_s",
)
N_PARAMS = len(PARAM_NAMES)
P_MAX_PRICE = 0
P_PRICE_BAND = 1
P_HL_RET = 2  # + k
P_HL_TRADE = 5
P_HL_SLOW = 6
P_WARMUP_EVENTS = 7
P_WARMUP_NS = 8
P_RET_MAX_BPS = 9
P_VOL_MAX = 10
P_RATE_MAX = 11
P_RATE_REL_MAX = 12
P_VWAP_DEV_MAX_BPS = 13
P_SIZE_REL_MAX = 14
P_AGE_MAX_S = 15

#: Default parameters of the ``trades`` feature set.
DEFAULT_PARAMS: dict[str, float] = {
    "max_price": 1e9,
    "price_band": 10.0,
    "hl_ret_fast_ns": 1e9,
    "hl_ret_mid_ns": 10e9,
    "hl_ret_slow_ns": 60e9,
    "hl_trade_ns": 1e9,
    "hl_slow_ns": 60e9,
    "warmup_events": 20.0,
    "warmup_ns": 30e9,
    "ret_max_bps": 500.0,
    "vol_max_bps_sqrt_s": 1000.0,
    "rate_max_per_s": 1e5,
    "rate_rel_max": 5.0,
    "vwap_dev_max_bps": 500.0,
    "size_rel_max": 10.0,
    "age_max_s": 86400.0,
}
assert tuple(DEFAULT_PARAMS) == PARAM_NAMES

F_LAST_PX = 0  #: last accepted trade price
F_LOGPX = 1  #: its log
F_RET = 2  # + k: decayed sum of log-price returns (bps)
F_VAR = 5  # + k: decayed sum of squared returns (bps^2)
F_TIME = 8  # + k: decayed elapsed time since the first trade (s)
F_FLOW_SV = 11  #: decayed signed volume (hl_trade)
F_FLOW_V = 12  #: decayed volume (hl_trade)
F_N_FAST = 13  #: decayed trade count (hl_trade)
F_N_SLOW = 14  #: decayed trade count (hl_slow)
F_PV = 15  #: decayed price * size (hl_slow)
F_V = 16  #: decayed size (hl_slow)
F_LOGVWAP = 17  #: log(F_PV / F_V), refreshed on each trade
F_TICK_SIGN = 18  #: last tick-rule sign (+1 / -1 / 0)
NF_STATE = 19

I_LAST_TS = 0
I_FIRST_TS = 1
I_N_EVENTS = 2
NI_STATE = 3


def new_state(n_instruments: int) -> tuple[np.ndarray, np.ndarray]:
    """Return fresh ``(fstate, istate)``: float64 ``(n, NF_STATE)`` zeros, int64 ``(n, NI_STATE)``."""
    if n_instruments < 0:
        raise ValueError(f"n_instruments must be >= 0, got {n_instruments}")
    fstate = np.zeros((n_instruments, NF_STATE), dtype=np.float64)
    istate = np.zeros((n_instruments, NI_STATE), dtype=np.int64)
    istate[:, I_LAST_TS] = INT64_MIN
    istate[:, I_FIRST_TS] = INT64_MIN
    return fstate, istate


@njit(cache=True, nogil=True, inline="always")
def _reject(x_out, counters, reason):
    counters[reason] += 1
    for k in range(x_out.shape[0]):
        x_out[k] = np.nan
    return -reason


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _log_features(v0, v1, v2, v3, v4, rate_ratio, size_ratio, rr, smax):
    """Return ``(y, rate_rel, size_rel, clipped)``: ``y[k] = float32(log(1 + v_k))`` and the two
    ratios' logs clipped to ``+-rr`` / ``+-smax`` (float32), bit for bit libm's.

    The seven logs are one vector (:func:`features.fastlog.log8_of`, lane 7 unused); when a
    lane's float32 is not certain, or a ratio's log may lie on the other side of its clip bound
    than libm's (:func:`features.fastlog.clear_of`), all seven are libm's.
    """
    u = (1.0 + v0, 1.0 + v1, 1.0 + v2, 1.0 + v3, 1.0 + v4, rate_ratio, size_ratio, 1.0)
    p, ok = log8_of(u)
    a, b = p[5], p[6]
    if ok == LANES_OK and clear_of(a, rr) and clear_of(b, smax):
        y = (np.float32(p[0]), np.float32(p[1]), np.float32(p[2]), np.float32(p[3]), np.float32(p[4]))
    else:
        y = (np.float32(math.log(u[0])), np.float32(math.log(u[1])), np.float32(math.log(u[2])),
             np.float32(math.log(u[3])), np.float32(math.log(u[4])))  # fmt: skip
        a, b = math.log(rate_ratio), math.log(size_ratio)
    va, ca = clip(a, -rr, rr, 0.0)
    vb, cb = clip(b, -smax, smax, 0.0)
    return y, np.float32(va), np.float32(vb), ca | cb


@njit(cache=True, nogil=True, _nrt=False, error_model="numpy")
def apply_tick(ticks, i, fstate, istate, params, x_out, counters):
    """Validate and apply trade ``ticks[i]``; write its features; return flags or -reason.

    Arguments, effects and return value as :func:`features.kernels.apply_tick`:
    ``x_out`` float32 ``(N_FEATURES,)``, ``counters`` int64 ``(N_REJECT_REASONS,)``,
    times int64 ns; a rejected trade changes nothing but ``counters`` and ``x_out``.

    Allocates: no.
    """
    t = ticks[i]
    inst = t.instrument
    if inst < 0 or inst >= istate.shape[0]:
        return _reject(x_out, counters, REJECT_UNKNOWN_INSTRUMENT)
    if t.kind != KIND_TRADE:
        return _reject(x_out, counters, REJECT_BAD_KIND)
    p = t.price
    q = t.size
    if not (math.isfinite(p) and math.isfinite(q)):
        return _reject(x_out, counters, REJECT_NONFINITE)
    if p < MIN_PRICE or q <= 0.0:
        return _reject(x_out, counters, REJECT_NONPOSITIVE)
    fs = fstate[inst]
    st = istate[inst]
    last = fs[F_LAST_PX]
    band = params[P_PRICE_BAND]
    if p > params[P_MAX_PRICE] or (last > 0.0 and (p > last * band or p * band < last)):
        return _reject(x_out, counters, REJECT_ABSURD_PRICE)
    ts = t.ts_event_ns
    if ts < st[I_LAST_TS]:
        return _reject(x_out, counters, REJECT_TIME_BACKWARDS)
    counters[REJECT_OK] += 1

    n_prev = st[I_N_EVENTS]
    gap_s = 0.0
    if n_prev == 0:
        st[I_FIRST_TS] = ts
    else:
        dt_ns = np.float64(ts - st[I_LAST_TS])
        gap_s = dt_ns / NS_PER_S
        if dt_ns > 0.0:
            x = -_LN2 * dt_ns
            a0 = math.exp(x / params[P_HL_RET])
            a1 = math.exp(x / params[P_HL_RET + 1])
            a2 = math.exp(x / params[P_HL_RET + 2])
            for k in range(3):
                hl = params[P_HL_RET + k]
                a = a0 if k == 0 else (a1 if k == 1 else a2)
                fs[F_RET + k] *= a
                fs[F_VAR + k] *= a
                fs[F_TIME + k] = a * fs[F_TIME + k] + (1.0 - a) * (hl / (_LN2 * NS_PER_S))
            a = decay_factor(x, params, P_HL_TRADE, P_HL_RET, a0, a1, a2, False)
            fs[F_FLOW_SV] *= a
            fs[F_FLOW_V] *= a
            fs[F_N_FAST] *= a
            a = decay_factor(x, params, P_HL_SLOW, P_HL_RET, a0, a1, a2, False)
            fs[F_N_SLOW] *= a
            fs[F_PV] *= a
            fs[F_V] *= a
    st[I_LAST_TS] = ts
    st[I_N_EVENTS] = n_prev + 1

    # -- apply the trade ------------------------------------------------------------
    logp = math.log(p)
    side = 1.0 if t.side > 0 else (-1.0 if t.side < 0 else 0.0)
    if n_prev > 0:
        r = BPS * (logp - fs[F_LOGPX])
        if r != 0.0:
            for k in range(3):
                fs[F_RET + k] += r
                fs[F_VAR + k] += r * r
            fs[F_TICK_SIGN] = 1.0 if r > 0.0 else -1.0
    if side == 0.0:
        side = fs[F_TICK_SIGN]
    # decayed mean trade size before this trade (F_V and F_N_SLOW decay alike)
    mean_size_before = fs[F_V] / fs[F_N_SLOW] if fs[F_N_SLOW] > 0.0 else q
    fs[F_LAST_PX] = p
    fs[F_LOGPX] = logp
    fs[F_FLOW_SV] += side * q
    fs[F_FLOW_V] += q
    fs[F_N_FAST] += 1.0
    fs[F_N_SLOW] += 1.0
    fs[F_PV] += p * q
    fs[F_V] += q
    fs[F_LOGVWAP] = math.log(fs[F_PV] / fs[F_V])

    # -- features -----------------------------------------------------------------------
    # the seven logs are taken together at the end (_log_features): log(1 + v) of vol_k
    # (k = 0..2), the trade rate and the gap; log of the rate ratio and the size ratio
    clipped = False
    rmax = params[P_RET_MAX_BPS]
    vmax = params[P_VOL_MAX]
    for k in range(3):
        v, c = clip(fs[F_RET + k], -rmax, rmax, 0.0)
        clipped |= c
        x_out[X_RET + k] = v
    v0, v1, v2, c = realised_vols(fs, F_VAR, F_TIME, vmax)
    clipped |= c
    vt = fs[F_FLOW_V]
    v, c = clip(fs[F_FLOW_SV] / vt if vt > 0.0 else 0.0, -1.0, 1.0, 0.0)
    clipped |= c
    x_out[X_FLOW] = v
    rate_max = params[P_RATE_MAX]
    rate_f = fs[F_N_FAST] * (_LN2 * NS_PER_S) / params[P_HL_TRADE]
    rate_s = fs[F_N_SLOW] * (_LN2 * NS_PER_S) / params[P_HL_SLOW]
    v3, c = clip(rate_f, 0.0, rate_max, 0.0)
    clipped |= c
    dmax = params[P_VWAP_DEV_MAX_BPS]
    v, c = clip(BPS * (logp - fs[F_LOGVWAP]), -dmax, dmax, 0.0)
    clipped |= c
    x_out[X_VWAP] = v
    v4, c = clip(gap_s, 0.0, params[P_AGE_MAX_S], 0.0)
    clipped |= c
    rate_ratio = (rate_f + 1e-3) / (rate_s + 1e-3)
    size_ratio = q / mean_size_before if mean_size_before > 0.0 else 1.0  # log 0 without a mean
    y, rate_rel, size_rel, c = _log_features(v0, v1, v2, v3, v4, rate_ratio, size_ratio,
                                             params[P_RATE_REL_MAX], params[P_SIZE_REL_MAX])  # fmt: skip
    clipped |= c
    x_out[X_VOL] = y[0]
    x_out[X_VOL + 1] = y[1]
    x_out[X_VOL + 2] = y[2]
    x_out[X_RATE] = y[3]
    x_out[X_GAP] = y[4]
    x_out[X_RATE_REL] = rate_rel
    x_out[X_SIZE_REL] = size_rel

    flags = 0
    if clipped:
        flags |= FLAG_CLIPPED
    if np.float64(n_prev + 1) < params[P_WARMUP_EVENTS] or (
        np.float64(ts - st[I_FIRST_TS]) < params[P_WARMUP_NS]
    ):
        flags |= FLAG_WARMUP
    return flags


@njit(cache=True, nogil=True)
def update_tick(ticks, i, fstate, istate, params, x_out, counters):
    """Apply one trade (live entry point, one numba dispatch); see :func:`apply_tick`.

    Allocates: no.
    """
    return apply_tick(ticks, i, fstate, istate, params, x_out, counters)


@njit(cache=True, nogil=True)
def compute_batch(ticks, fstate, istate, params, X_out, flags_out, counters):
    """Apply every row in order; return the number accepted (state carried in place).

    ``X_out`` float32 ``(n, N_FEATURES)``, ``flags_out`` int32 ``(n,)``.  Allocates: no.
    """
    n_ok = 0
    for j in range(ticks.shape[0]):
        f = apply_tick(ticks, j, fstate, istate, params, X_out[j], counters)
        flags_out[j] = f
        if f >= 0:
            n_ok += 1
    return n_ok


