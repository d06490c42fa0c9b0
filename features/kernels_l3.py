"""L3 (order-by-order) feature kernels: book update + features in one numba call.

Same signatures as :mod:`features.kernels` (``apply_tick``, ``update_tick``,
``compute_batch``, ``new_state``), so the scoring agent, the batch command and
a fused features + model kernel use them unchanged.  Per event,
:func:`apply_tick` checks the instrument, the kind (trade, book add / modify /
delete; a quote is ``bad_kind``) and the event-time order, applies the event to
the instrument's order book (:func:`features.book.book_apply`, which also
validates it and applies the messy-data rules documented in
:mod:`features.book`), advances the time-decayed accumulators to the event
time, and writes the feature vector of the ``l3`` feature set (documented in
:mod:`features.featureset`).

State is :func:`features.book.new_book_state`'s two flat arrays; this module
owns columns ``C_*`` (>= 1) of the per-instrument float block and column
``I_HAVE_MID`` of the int block.  Times stay int64 ns.

Batch kernels (:func:`compute_batch`, :func:`compute_batch_grow`) return the
same bits as :func:`apply_tick` row by row (tests/test_book.py checks it) but
run the per-event core (:func:`_apply_core`) over blocks of ``_BLOCK`` events
and then compute the block's seven log1p features together, with a SIMD
polynomial log whose float32 rounding is accepted only when provably equal to
libm's (:func:`features.fastlog.log_checked`; libm for the rest, about 1 in 2000); they also
prefetch the order-table slot an event a few rows ahead will look up.
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
    KIND_BOOK_DELETE,
    KIND_TRADE,
    REJECT_BAD_KIND,
    REJECT_BOOK_FULL,
    REJECT_OK,
    REJECT_TIME_BACKWARDS,
    REJECT_UNKNOWN_INSTRUMENT,
)
from features.book.apply import book_apply
from features.book.layout import (
    A_CROSSED,
    A_LOCKED,
    A_SAME_TS,
    A_SNAPSHOT,
    DEFAULT_MAX_LEVELS,
    DEFAULT_MAX_ORDERS,
    DEPTH_CLEAN,
    H_F_OFF_LEVELS,
    H_LEVELS,
    H_MAX_LIVE,
    H_N_INST,
    H_OFF_INST,
    I_ANOM,
    I_DEPTH_CHG,
    I_FIRST_TS,
    I_LAST_TOP_TS,
    I_LAST_TRADE_TS,
    I_LAST_TS,
    I_N_BOOK,
    I_N_EVENTS,
    I_NA,
    I_NB,
    I_SPARE,
    NF_INST,
    NI_INST,
    P_MAX_PRICE,
    P_PRICE_BAND,
    P_UNCROSS,
    _prefetch,
    new_book_state,
)
from features.book.levels import best_prices
from features.book.orders import grow_book_state, prefetch_order
from features.common import (
    BPS,
    NS_PER_S,
    clip,
    decay_factor,
    drop_stale_numba_cache,
    l1_book_features,
    realised_vol,
)
from features.fastlog import LANES_OK, log8_of, log_checked

__all__ = [
    "N_FEATURES",
    "N_PARAMS",
    "PARAM_NAMES",
    "FEATURE_NAMES",
    "DEFAULT_PARAMS",
    "new_state",
    "apply_tick",
    "update_tick",
    "compute_batch",
]

_LN2 = math.log(2.0)


_HERE = os.path.dirname(os.path.abspath(__file__))
# the kernels compile in the book's functions, the shared helpers and the schema's constants
drop_stale_numba_cache(__file__, [os.path.join(_HERE, "book", "*.py"), os.path.join(_HERE, "common.py"),
                                  os.path.join(_HERE, "fastlog.py"), os.path.join(_HERE, "validate.py"),
                                  os.path.join(_HERE, "..", "engine", "schema.py")])  # fmt: skip
#: _log_block: the 8 bool lanes of a row, all True
_ALL_LANES = np.uint64(0x0101010101010101)
INT64_MIN = np.iinfo(np.int64).min

FEATURE_NAMES = (
    "spread_bps",
    "micro_offset_bps",
    "l1_imbalance",
    "depth_imb_short",
    "depth_imb_long",
    "ret_fast_bps",
    "ret_mid_bps",
    "ret_slow_bps",
    "log_vol_fast",
    "log_vol_mid",
    "log_vol_slow",
    "log_book_rate",
    "order_flow_imb",
    "cancel_share",
    "trade_flow_imb",
    "log_trade_rate",
    "vwap_dev_bps",
    "log_trade_age_s",
    "log_top_age_s",
)
N_FEATURES = len(FEATURE_NAMES)
X_SPREAD = 0
X_MICRO = 1
X_IMB = 2
assert (X_SPREAD, X_MICRO, X_IMB) == (0, 1, 2)  # features.common.l1_book_features writes x_out[0:3]
X_DEPTH_S = 3
X_DEPTH_L = 4
X_RET = 5  # + k
X_VOL = 8  # + k
X_BOOK_RATE = 11
X_OFI = 12
X_CXL = 13
X_FLOW = 14
X_TRADE_RATE = 15
X_VWAP = 16
X_TRADE_AGE = 17
X_TOP_AGE = 18

PARAM_NAMES = (
    "max_price",
    "price_band",
    "uncross",
    "hl_ret_fast_ns",
    "hl_ret_mid_ns",
    "hl_ret_slow_ns",
    "hl_trade_ns",
    "hl_vwap_ns",
    "hl_book_ns",
    "warmup_events",
    "warmup_ns",
    "stale_top_ns",
    "spread_max_bps",
    "ret_max_bps",
    "vol_max_bps_sqrt_s",
    "rate_max_per_s",
    "vwap_dev_max_bps",
    "age_max_s",
    "depth_levels_short",
    "depth_levels_long",
)
N_PARAMS = len(PARAM_NAMES)
assert PARAM_NAMES[P_MAX_PRICE] == "max_price"
assert PARAM_NAMES[P_PRICE_BAND] == "price_band"
assert PARAM_NAMES[P_UNCROSS] == "uncross"
P_HL_RET = 3
P_HL_TRADE = 6
P_HL_VWAP = 7
P_HL_BOOK = 8
P_WARMUP_EVENTS = 9
P_WARMUP_NS = 10
P_STALE_TOP_NS = 11
P_SPREAD_MAX_BPS = 12
P_RET_MAX_BPS = 13
P_VOL_MAX = 14
P_RATE_MAX = 15
P_VWAP_DEV_MAX_BPS = 16
P_AGE_MAX_S = 17
P_DEPTH_S = 18
P_DEPTH_L = 19

#: Default parameters (the ``l3`` feature set's).
DEFAULT_PARAMS: dict[str, float] = {
    "max_price": 1e9,
    "price_band": 10.0,
    "uncross": 1.0,
    "hl_ret_fast_ns": 100e6,
    "hl_ret_mid_ns": 1e9,
    "hl_ret_slow_ns": 10e9,
    "hl_trade_ns": 1e9,
    "hl_vwap_ns": 10e9,
    "hl_book_ns": 1e9,
    "warmup_events": 50.0,
    "warmup_ns": 10e9,
    "stale_top_ns": 1e9,
    "spread_max_bps": 1000.0,
    "ret_max_bps": 500.0,
    "vol_max_bps_sqrt_s": 1000.0,
    "rate_max_per_s": 1e6,
    "vwap_dev_max_bps": 500.0,
    "age_max_s": 86400.0,
    "depth_levels_short": 5.0,
    "depth_levels_long": 10.0,
}
assert tuple(DEFAULT_PARAMS) == PARAM_NAMES

# per-instrument float columns (column 0 is the book's last trade price)
C_LOGMID = 1
C_RET = 2  # + k
C_VAR = 5  # + k
C_TIME = 8  # + k
C_FLOW_SV = 11
C_FLOW_V = 12
C_TRADE_N = 13
C_VWAP_PV = 14
C_VWAP_V = 15
C_BOOK_N = 16
C_OFI = 17
C_OF_ABS = 18
C_ADD_V = 19
C_CXL_V = 20
C_BID = 21
C_ASK = 22
C_LOGVWAP = 23
C_DEPTH = 24  #: + 2 * side + (0: first depth_levels_short, 1: first depth_levels_long): summed sizes
C_DEPTH_NS = 28  #: depth_levels_short / _long the sums above were computed for
C_DEPTH_NL = 29
#: scratch: the last event's arguments v of the seven log1p features (LOG_FEATURES order)
C_LOG_IN = 30
assert C_LOG_IN + 7 <= NF_INST
#: features written as log1p(v) (float32): computed after the core, see _apply_core
LOG_FEATURES = (X_VOL, X_VOL + 1, X_VOL + 2, X_BOOK_RATE, X_TRADE_RATE, X_TRADE_AGE, X_TOP_AGE)
N_LOG = 7
I_HAVE_MID = I_SPARE  # 1 once the instrument had a two-sided book


def new_state(
    n_instruments: int,
    *,
    max_orders: int = DEFAULT_MAX_ORDERS,
    max_levels: int = DEFAULT_MAX_LEVELS,
    crossing_add: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return fresh ``(fstate, istate)`` for ``n_instruments`` (see :func:`features.book.new_book_state`).

    The capacities are not feature-set parameters (they do not change any
    feature while they are not exceeded, and a model must not depend on them):
    pass larger ones for very deep or very many books.  Exceeding them is
    counted (``book_full`` rejects, ``level_overflow`` anomalies).  Nor is
    ``crossing_add``, the venue's meaning of a marketable add (``keep``,
    ``uncross``, ``aggressor``; None: the ``uncross`` parameter decides).
    """
    return new_book_state(n_instruments, max_orders=max_orders, max_levels=max_levels,
                              crossing_add=crossing_add)  # fmt: skip


@njit(cache=True, nogil=True, inline="always")
def _depth_sums(fstate, out, top, n, n_s, n_l):
    """Write the sizes of a side's first ``n_s`` and ``n_l`` levels, summed best level first.

    ``top`` is the fstate index of the best level's size (deeper levels below it).
    One running sum: the short sum is the long one's prefix (same additions, same order).
    """
    m_l = min(n, n_l)
    m_s = max(np.int64(0), min(m_l, n_s))
    acc = 0.0
    for q in range(m_s):
        acc += fstate[top - q]
    s_short = acc
    for q in range(m_s, m_l):
        acc += fstate[top - q]
    fstate[out] = s_short
    fstate[out + 1] = acc


@njit(cache=True, nogil=True, inline="always")
def _reject(x_out, counters, reason):
    counters[reason] += 1
    for k in range(x_out.shape[0]):
        x_out[k] = np.nan
    return -reason


@njit(cache=True, nogil=True, _nrt=False, error_model="numpy")
def apply_tick(ticks, i, fstate, istate, params, x_out, counters):
    """Validate and apply ``ticks[i]`` to its book; write its features; return flags or -reason.

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE
        Only row ``i`` is read.  Times int64 ns.
    i : int
    fstate, istate : ndarray
        L3 state from :func:`new_state`, updated in place.
    params : ndarray of float64, shape (N_PARAMS,)
    x_out : ndarray of float32, shape (N_FEATURES,)
        Receives the features; all NaN if the event is rejected.
    counters : ndarray of int64, shape (N_REJECT_REASONS,)
        ``counters[0]`` accepted events, ``counters[r]`` rejects of reason r.

    Returns
    -------
    int
        Flags (>= 0) if accepted, ``-reason`` if rejected (state unchanged
        except ``counters`` and ``x_out``).

    Allocates: no.
    """
    f = _apply_core(ticks, i, fstate, istate, params, x_out, counters)
    if f >= 0:
        c = ticks[i].instrument * NF_INST + C_LOG_IN
        u = (1.0 + fstate[c], 1.0 + fstate[c + 1], 1.0 + fstate[c + 2], 1.0 + fstate[c + 3],
             1.0 + fstate[c + 4], 1.0 + fstate[c + 5], 1.0 + fstate[c + 6], 1.0)  # fmt: skip
        # the seven logs in one vector, libm's float32 bit for bit (libm's where not certain)
        p, ok = log8_of(u)
        for k in range(N_LOG):
            x_out[LOG_FEATURES[k]] = p[k] if ok == LANES_OK else math.log(u[k])
    return f


@njit(cache=True, nogil=True, _nrt=False, error_model="numpy")
def _apply_core(ticks, i, fstate, istate, params, x_out, counters):
    """:func:`apply_tick` without its seven log1p features (the ``LOG_FEATURES``).

    Their arguments are left in the instrument's scratch columns
    ``C_LOG_IN .. C_LOG_IN + 6`` of ``fstate``: :func:`apply_tick` takes their
    logs at once, the batch kernels for a block of events at a time
    (:func:`_log_block`, vectorised; same float32 bits).  Parameters, return
    value and rejects as :func:`apply_tick`.  Allocates: no.
    """
    t = ticks[i]
    inst = t.instrument
    if inst < 0 or inst >= istate[H_N_INST]:
        return _reject(x_out, counters, REJECT_UNKNOWN_INSTRUMENT)
    kind = t.kind
    if kind < KIND_TRADE or kind > KIND_BOOK_DELETE:
        return _reject(x_out, counters, REJECT_BAD_KIND)
    ib = istate[H_OFF_INST] + inst * NI_INST
    fb = inst * NF_INST
    ts = t.ts_event_ns
    if ts < istate[ib + I_LAST_TS]:
        return _reject(x_out, counters, REJECT_TIME_BACKWARDS)
    had_book = istate[ib + I_NB] > 0 and istate[ib + I_NA] > 0

    code, side, added, removed = book_apply(ticks, i, fstate, istate, params)
    if code < 0:
        return _reject(x_out, counters, -code)
    counters[REJECT_OK] += 1

    flags = 0
    snapshot = False
    n_ev = istate[ib + I_N_EVENTS]
    if n_ev == 0:
        istate[ib + I_FIRST_TS] = ts
        snapshot = True  # the first event (and any at the same time) is state, not flow
    else:
        if ts == istate[ib + I_FIRST_TS]:
            snapshot = True
            istate[ib + I_ANOM + A_SNAPSHOT] += 1
        elif ts == istate[ib + I_LAST_TS]:
            istate[ib + I_ANOM + A_SAME_TS] += 1
        dt_ns = np.float64(ts - istate[ib + I_LAST_TS])
        if dt_ns > 0.0:
            x = -_LN2 * dt_ns
            a0 = math.exp(x / params[P_HL_RET])
            a1 = math.exp(x / params[P_HL_RET + 1])
            a2 = math.exp(x / params[P_HL_RET + 2])
            for k in range(3):
                a = a0 if k == 0 else (a1 if k == 1 else a2)
                fstate[fb + C_RET + k] *= a
                fstate[fb + C_VAR + k] *= a
                if had_book:
                    # exact integral of the decay kernel over (t_prev, ts], in s
                    hl = params[P_HL_RET + k]
                    fstate[fb + C_TIME + k] = a * fstate[fb + C_TIME + k] + (1.0 - a) * (
                        hl / (_LN2 * NS_PER_S)
                    )
            a = decay_factor(x, params, P_HL_TRADE, P_HL_RET, a0, a1, a2, False)
            fstate[fb + C_FLOW_SV] *= a
            fstate[fb + C_FLOW_V] *= a
            fstate[fb + C_TRADE_N] *= a
            a = decay_factor(x, params, P_HL_VWAP, P_HL_RET, a0, a1, a2, False)
            fstate[fb + C_VWAP_PV] *= a
            fstate[fb + C_VWAP_V] *= a
            a = decay_factor(x, params, P_HL_BOOK, P_HL_RET, a0, a1, a2, False)
            for c in range(C_BOOK_N, C_CXL_V + 1):
                fstate[fb + c] *= a
    istate[ib + I_LAST_TS] = ts
    istate[ib + I_N_EVENTS] = n_ev + 1

    # -- the event's own contribution ---------------------------------------------
    if code == 1:  # trade
        size = t.size
        fstate[fb + C_FLOW_SV] += side * size
        fstate[fb + C_FLOW_V] += size
        fstate[fb + C_TRADE_N] += 1.0
        fstate[fb + C_VWAP_PV] += t.price * size
        fstate[fb + C_VWAP_V] += size
        # VWAP = PV / V is unchanged by decay (both decay alike): log it on trades only
        fstate[fb + C_LOGVWAP] = math.log(fstate[fb + C_VWAP_PV] / fstate[fb + C_VWAP_V])
        if istate[ib + I_LAST_TOP_TS] != INT64_MIN and (
            np.float64(ts - istate[ib + I_LAST_TOP_TS]) > params[P_STALE_TOP_NS]
        ):
            flags |= FLAG_STALE_QUOTE
        istate[ib + I_LAST_TRADE_TS] = ts
    else:
        istate[ib + I_N_BOOK] += 1
        if not snapshot:
            fstate[fb + C_BOOK_N] += 1.0
            fstate[fb + C_OFI] += side * (added - removed)
            fstate[fb + C_OF_ABS] += added + removed
            fstate[fb + C_ADD_V] += added
            fstate[fb + C_CXL_V] += removed

    # -- top of book after the event --------------------------------------------------
    L = istate[H_LEVELS]
    nb = istate[ib + I_NB]
    na = istate[ib + I_NA]
    bbase = istate[H_F_OFF_LEVELS] + (inst * 2) * 4 * L
    abase = bbase + 4 * L
    bid = fstate[bbase + nb - 1] if nb > 0 else 0.0
    ask = -fstate[abase + na - 1] if na > 0 else 0.0
    two_sided = nb > 0 and na > 0
    if bid != fstate[fb + C_BID] or ask != fstate[fb + C_ASK]:
        fstate[fb + C_BID] = bid
        fstate[fb + C_ASK] = ask
        istate[ib + I_LAST_TOP_TS] = ts
        if two_sided:
            logmid = math.log(0.5 * bid + 0.5 * ask)
            if istate[ib + I_HAVE_MID] != 0:
                r = BPS * (logmid - fstate[fb + C_LOGMID])
                for k in range(3):
                    fstate[fb + C_RET + k] += r
                    fstate[fb + C_VAR + k] += r * r
            fstate[fb + C_LOGMID] = logmid
            istate[ib + I_HAVE_MID] = 1

    # -- features ----------------------------------------------------------------------
    clipped = False
    age_max = params[P_AGE_MAX_S]
    rate_max = params[P_RATE_MAX]
    age_first_s = np.float64(ts - istate[ib + I_FIRST_TS]) / NS_PER_S
    if two_sided:
        if bid >= ask:
            istate[ib + I_ANOM + (A_CROSSED if bid > ask else A_LOCKED)] += 1
        bsz = fstate[bbase + L + nb - 1]
        asz = fstate[abase + L + na - 1]
        # x_out[X_SPREAD], x_out[X_MICRO], x_out[X_IMB]
        _, c = l1_book_features(bid, ask, bsz, asz, params[P_SPREAD_MAX_BPS], x_out)
        clipped |= c
        if fstate[fb + C_VWAP_V] > 0.0:
            dmax = params[P_VWAP_DEV_MAX_BPS]
            v, c = clip(BPS * (fstate[fb + C_LOGMID] - fstate[fb + C_LOGVWAP]), -dmax, dmax, 0.0)
            clipped |= c
            x_out[X_VWAP] = v
        else:
            x_out[X_VWAP] = 0.0
    else:
        flags |= FLAG_NO_BOOK
        x_out[X_SPREAD] = 0.0
        x_out[X_MICRO] = 0.0
        x_out[X_IMB] = 0.0
        x_out[X_VWAP] = 0.0
    # depth imbalance over the first N levels (defined on a one-sided book: +-1); a side's
    # sums are kept until the book reports a change within its first n_l levels
    if params[P_DEPTH_S] != fstate[fb + C_DEPTH_NS] or params[P_DEPTH_L] != fstate[fb + C_DEPTH_NL]:
        fstate[fb + C_DEPTH_NS] = params[P_DEPTH_S]
        fstate[fb + C_DEPTH_NL] = params[P_DEPTH_L]
        istate[ib + I_DEPTH_CHG] = 0
        istate[ib + I_DEPTH_CHG + 1] = 0
    n_s = np.int64(params[P_DEPTH_S])
    n_l = np.int64(params[P_DEPTH_L])
    if istate[ib + I_DEPTH_CHG] < n_l:
        _depth_sums(fstate, fb + C_DEPTH, bbase + L + nb - 1, nb, n_s, n_l)
    if istate[ib + I_DEPTH_CHG + 1] < n_l:
        _depth_sums(fstate, fb + C_DEPTH + 2, abase + L + na - 1, na, n_s, n_l)
    istate[ib + I_DEPTH_CHG] = DEPTH_CLEAN
    istate[ib + I_DEPTH_CHG + 1] = DEPTH_CLEAN
    sb_s = fstate[fb + C_DEPTH]
    sb_l = fstate[fb + C_DEPTH + 1]
    sa_s = fstate[fb + C_DEPTH + 2]
    sa_l = fstate[fb + C_DEPTH + 3]
    tot = sb_s + sa_s
    x_out[X_DEPTH_S] = (sb_s - sa_s) / tot if tot > 0.0 else 0.0
    tot = sb_l + sa_l
    x_out[X_DEPTH_L] = (sb_l - sa_l) / tot if tot > 0.0 else 0.0
    if istate[ib + I_HAVE_MID] != 0:
        rmax = params[P_RET_MAX_BPS]
        vmax = params[P_VOL_MAX]
        for k in range(3):
            v, c = clip(fstate[fb + C_RET + k], -rmax, rmax, 0.0)
            clipped |= c
            x_out[X_RET + k] = v
            v, c = realised_vol(fstate[fb + C_VAR + k], fstate[fb + C_TIME + k], vmax)
            clipped |= c
            fstate[fb + C_LOG_IN + k] = v
    else:
        for k in range(3):
            x_out[X_RET + k] = 0.0
            fstate[fb + C_LOG_IN + k] = 0.0
    rate = fstate[fb + C_BOOK_N] * (_LN2 * NS_PER_S) / params[P_HL_BOOK]
    v, c = clip(rate, 0.0, rate_max, 0.0)
    clipped |= c
    fstate[fb + C_LOG_IN + 3] = v
    tot = fstate[fb + C_OF_ABS]
    x_out[X_OFI] = min(1.0, max(-1.0, fstate[fb + C_OFI] / tot)) if tot > 0.0 else 0.0
    tot = fstate[fb + C_ADD_V] + fstate[fb + C_CXL_V]
    x_out[X_CXL] = min(1.0, max(0.0, fstate[fb + C_CXL_V] / tot)) if tot > 0.0 else 0.0
    if istate[ib + I_LAST_TRADE_TS] == INT64_MIN:
        flags |= FLAG_NO_TRADES
        x_out[X_FLOW] = 0.0
        fstate[fb + C_LOG_IN + 4] = 0.0
        age_t = age_first_s
    else:
        vol_t = fstate[fb + C_FLOW_V]
        if vol_t > 0.0:
            v, c = clip(fstate[fb + C_FLOW_SV] / vol_t, -1.0, 1.0, 0.0)
            clipped |= c
            x_out[X_FLOW] = v
        else:
            x_out[X_FLOW] = 0.0
        rate = fstate[fb + C_TRADE_N] * (_LN2 * NS_PER_S) / params[P_HL_TRADE]
        v, c = clip(rate, 0.0, rate_max, 0.0)
        clipped |= c
        fstate[fb + C_LOG_IN + 4] = v
        age_t = np.float64(ts - istate[ib + I_LAST_TRADE_TS]) / NS_PER_S
    v, c = clip(age_t, 0.0, age_max, 0.0)
    clipped |= c
    fstate[fb + C_LOG_IN + 5] = v
    top_ts = istate[ib + I_LAST_TOP_TS]
    age_q = age_first_s if top_ts == INT64_MIN else np.float64(ts - top_ts) / NS_PER_S
    v, c = clip(age_q, 0.0, age_max, 0.0)
    clipped |= c
    fstate[fb + C_LOG_IN + 6] = v

    if clipped:
        flags |= FLAG_CLIPPED
    if snapshot or np.float64(n_ev + 1) < params[P_WARMUP_EVENTS] or (
        np.float64(ts - istate[ib + I_FIRST_TS]) < params[P_WARMUP_NS]
    ):
        flags |= FLAG_WARMUP
    return flags


@njit(cache=True, nogil=True)
def update_tick(ticks, i, fstate, istate, params, x_out, counters):
    """Apply one event (live entry point, one numba dispatch); see :func:`apply_tick`.

    Allocates: no.
    """
    return apply_tick(ticks, i, fstate, istate, params, x_out, counters)


#: events per block of the batch kernels (their log1p features are computed per block)
_BLOCK = 256
#: the batch kernels prefetch the order-table slot of the event this many rows ahead
_PREFETCH = 4
#: ... and the input events this many rows ahead
_PREFETCH_ROWS = 16


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _prefetch_ahead(ticks, j, n, istate):
    """Cache hints of the batch loops at row ``j`` of ``n``: the input event
    ``_PREFETCH_ROWS`` ahead and the order slot of the event ``_PREFETCH`` ahead.
    Changes no result."""
    if j + _PREFETCH_ROWS < n:  # an event spans up to two cache lines
        _prefetch(ticks, j + _PREFETCH_ROWS, 0)
        _prefetch(ticks, j + _PREFETCH_ROWS, 64)
    if j + _PREFETCH < n:
        prefetch_order(ticks, j + _PREFETCH, istate)


@njit(cache=True, nogil=True)
def compute_batch(ticks, fstate, istate, params, X_out, flags_out, counters):
    """Apply every row in order with the streaming core; return the number accepted.

    ``X_out`` float32 ``(n, N_FEATURES)``, ``flags_out`` int32 ``(n,)``; state is
    carried in place, so chunk after chunk equals one call.  The same features
    (bit for bit) as :func:`apply_tick` row by row: the core runs per event and
    the seven log1p features of a block of events are computed together
    (:func:`_log_block`).  Allocates: a few kB of scratch per call (a row view
    per event would cost two atomic reference-count updates per event).
    """
    n_ok = 0
    F = X_out.shape[1]
    x = np.empty(F, dtype=np.float32)
    lv = np.zeros(_BLOCK * 8, dtype=np.float64)
    ly = np.empty(_BLOCK * 8, dtype=np.float32)
    lok = np.empty(_BLOCK * 8, dtype=np.bool_)
    n = ticks.shape[0]
    for j0 in range(0, n, _BLOCK):
        j1 = min(n, j0 + _BLOCK)
        for j in range(j0, j1):
            _prefetch_ahead(ticks, j, n, istate)
            f = _apply_core(ticks, j, fstate, istate, params, x, counters)
            for k in range(F):
                X_out[j, k] = x[k]
            flags_out[j] = f
            if f >= 0:
                n_ok += 1
                _stash_log_args(fstate, ticks[j].instrument, lv, j - j0)
        _log_block(lv, ly, lok, j1 - j0, X_out, flags_out, j0)
    return n_ok


@njit(cache=True, nogil=True, inline="always")
def _stash_log_args(fstate, inst, lv, r):
    """Copy the last event's log1p arguments into row ``r`` (8 lanes) of the block buffer."""
    c = inst * NF_INST + C_LOG_IN
    for k in range(N_LOG):
        lv[r * 8 + k] = fstate[c + k]
    lv[r * 8 + N_LOG] = 0.0


@njit(cache=True, nogil=True, error_model="numpy")
def _log_block(lv, ly, lok, rows, X_out, flags_out, j0):
    """Write the log1p features of block rows ``0 .. rows-1`` (events ``j0 + r``; rejects skipped).

    ``ly = float32(log(1 + lv))`` lane by lane with :func:`features.fastlog.log_checked` in one
    branch-free loop (SIMD); a lane whose float32 the approximation cannot
    decide (``lok`` False, about 1 in 2000) is recomputed with libm.  The
    result is float32(math.log(1.0 + v)), bit for bit.
    """
    m = rows * 8
    for q in range(m):
        y, ok = log_checked(1.0 + lv[q])
        ly[q] = np.float32(y)
        lok[q] = ok
    all_ok = lok.view(np.uint64)  # 8 lanes of a row (lane 7: log(1) = 0, always ok)
    for r in range(rows):
        j = j0 + r
        if flags_out[j] < 0:
            continue
        q = r * 8
        if all_ok[r] == _ALL_LANES:
            X_out[j, X_VOL] = ly[q]
            X_out[j, X_VOL + 1] = ly[q + 1]
            X_out[j, X_VOL + 2] = ly[q + 2]
            X_out[j, X_BOOK_RATE] = ly[q + 3]
            X_out[j, X_TRADE_RATE] = ly[q + 4]
            X_out[j, X_TRADE_AGE] = ly[q + 5]
            X_out[j, X_TOP_AGE] = ly[q + 6]
        else:
            for k in range(N_LOG):
                y = ly[q + k] if lok[q + k] else np.float32(math.log(1.0 + lv[q + k]))
                X_out[j, LOG_FEATURES[k]] = y


@njit(cache=True, nogil=True)
def compute_batch_top(ticks, fstate, istate, params, X_out, flags_out, counters, bid_out, ask_out):
    """:func:`compute_batch` that also records the best bid / ask after every event.

    ``bid_out`` / ``ask_out`` float64 ``(n,)`` receive the instrument's best
    prices after the event (NaN for an empty side or a rejected event); for
    labels and research, not the hot path.  Allocates: no.
    """
    n_ok = 0
    for j in range(ticks.shape[0]):
        f = apply_tick(ticks, j, fstate, istate, params, X_out[j], counters)
        flags_out[j] = f
        if f >= 0:
            n_ok += 1
            b, a = best_prices(fstate, istate, ticks[j].instrument)
            bid_out[j] = b
            ask_out[j] = a
        else:
            bid_out[j] = np.nan
            ask_out[j] = np.nan
    return n_ok


@njit(cache=True, nogil=True)
def compute_batch_grow(ticks, fstate, istate, params, X_out, flags_out, counters):
    """:func:`compute_batch` that stops before an event the full order table would refuse.

    Returns the number of rows processed: ``ticks.shape[0]``, or the index of the
    first add rejected as ``book_full`` (not counted, nothing changed), so the
    caller can :func:`features.book.grow_book_state` and resume from that row.
    Allocates: a few kB of scratch per call.
    """
    F = X_out.shape[1]
    x = np.empty(F, dtype=np.float32)
    lv = np.zeros(_BLOCK * 8, dtype=np.float64)
    ly = np.empty(_BLOCK * 8, dtype=np.float32)
    lok = np.empty(_BLOCK * 8, dtype=np.bool_)
    n = ticks.shape[0]
    for j0 in range(0, n, _BLOCK):
        j1 = min(n, j0 + _BLOCK)
        for j in range(j0, j1):
            _prefetch_ahead(ticks, j, n, istate)
            f = _apply_core(ticks, j, fstate, istate, params, x, counters)
            if f == -REJECT_BOOK_FULL:
                counters[REJECT_BOOK_FULL] -= 1
                _log_block(lv, ly, lok, j - j0, X_out, flags_out, j0)
                return j
            for k in range(F):
                X_out[j, k] = x[k]
            flags_out[j] = f
            if f >= 0:
                _stash_log_args(fstate, ticks[j].instrument, lv, j - j0)
        _log_block(lv, ly, lok, j1 - j0, X_out, flags_out, j0)
    return n


def compute_batch_auto(ticks, state, params, X_out, flags_out, counters, grow=4):
    """Run :func:`compute_batch_grow` over ``ticks``, growing the order table as needed.

    ``state`` is a two-item list ``[fstate, istate]`` replaced in place when the
    table grows (by ``grow`` x).  Returns the number of growths.
    """
    j = 0
    n = ticks.shape[0]
    grown = 0
    while j < n:
        done = compute_batch_grow(ticks[j:], state[0], state[1], params, X_out[j:], flags_out[j:], counters)
        j += done
        if j < n:
            cap = int(state[1][H_MAX_LIVE])
            state[0], state[1] = grow_book_state(state[0], state[1], cap * grow)
            grown += 1
    return grown
