"""Price levels per instrument and side: sorted keys, sizes, counts and level ids; best prices."""

from __future__ import annotations

import numpy as np
from numba import njit

from features.book.layout import (
    A_LEVEL_OVERFLOW,
    H_F_OFF_LEVELS,
    H_LEVELS,
    H_NEXT_LEVEL_ID,
    H_OFF_INST,
    I_ANOM,
    I_DEPTH_CHG,
    I_NB,
    NI_INST,
    PENDING_LEVEL,
)


# ============================================================================= price levels
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _lvl_base(istate, inst, s):
    """Return the fstate offset of (inst, side index s: 0 bid, 1 ask) level arrays."""
    L = istate[H_LEVELS]
    return istate[H_F_OFF_LEVELS] + (inst * 2 + s) * 4 * L


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _depth_changed(istate, ib, s, depth):
    """Record that side ``s``'s level at ``depth`` (0 = best) changed, or the set below it shifted."""
    c = ib + I_DEPTH_CHG + s
    if depth < istate[c]:
        istate[c] = depth


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _lvl_search(fstate, base, n, key):
    """Return the first index in [0, n) whose key is >= ``key`` (n if none)."""
    # activity concentrates at the top (the end): check the last entries first
    if n == 0 or fstate[base + n - 1] < key:
        return n
    lo = 0
    hi = n - 1
    if n > 8 and fstate[base + n - 8] < key:
        lo = n - 7
    while lo < hi:
        mid = (lo + hi) >> 1
        if fstate[base + mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _lvl_add(istate, fstate, ib, inst, s, key, size):
    """Add one order of ``size`` at ``key`` to side ``s``; return its level id (0: orphan)."""
    L = istate[H_LEVELS]
    base = _lvl_base(istate, inst, s)
    ncol = I_NB + s
    n = istate[ib + ncol]
    pos = _lvl_search(fstate, base, n, key)
    if pos < n and fstate[base + pos] == key:
        fstate[base + L + pos] += size
        fstate[base + 2 * L + pos] += 1.0
        _depth_changed(istate, ib, s, n - 1 - pos)
        return np.int64(fstate[base + 3 * L + pos])
    if n == L:
        istate[ib + I_ANOM + A_LEVEL_OVERFLOW] += 1
        if pos == 0:
            return np.int64(0)  # worse than every kept level: orphan
        # drop the farthest level (index 0), shift [1, pos) down by one
        for a in range(4):
            b = base + a * L
            for q in range(1, pos):
                fstate[b + q - 1] = fstate[b + q]
        pos -= 1
        n -= 1
    else:
        for a in range(4):
            b = base + a * L
            for q in range(n, pos, -1):
                fstate[b + q] = fstate[b + q - 1]
    lid = istate[H_NEXT_LEVEL_ID]
    istate[H_NEXT_LEVEL_ID] = lid + 1 if lid + 1 < PENDING_LEVEL else 1  # ids wrap (30 bits)
    fstate[base + pos] = key
    fstate[base + L + pos] = size
    fstate[base + 2 * L + pos] = 1.0
    fstate[base + 3 * L + pos] = np.float64(lid)
    istate[ib + ncol] = n + 1
    _depth_changed(istate, ib, s, n - pos)  # the new level's depth; the ones above it are unchanged
    return lid


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _lvl_reduce(istate, fstate, ib, inst, s, key, level_id, size, remove_order):
    """Take ``size`` off level ``key`` (and one order if ``remove_order``); False if orphan."""
    if level_id == 0:
        return False
    L = istate[H_LEVELS]
    base = _lvl_base(istate, inst, s)
    ncol = I_NB + s
    n = istate[ib + ncol]
    pos = _lvl_search(fstate, base, n, key)
    if pos >= n or fstate[base + pos] != key or np.int64(fstate[base + 3 * L + pos]) != level_id:
        return False
    v = fstate[base + L + pos] - size
    fstate[base + L + pos] = v if v > 0.0 else 0.0
    _depth_changed(istate, ib, s, n - 1 - pos)
    if remove_order:
        c = fstate[base + 2 * L + pos] - 1.0
        fstate[base + 2 * L + pos] = c
        if c <= 0.0:
            for a in range(4):
                b = base + a * L
                for q in range(pos + 1, n):
                    fstate[b + q - 1] = fstate[b + q]
            istate[ib + ncol] = n - 1
    return True


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _best_key(istate, fstate, ib, inst, s):
    """Return the best key of side s (bid: price, ask: -price) or NaN if empty."""
    n = istate[ib + I_NB + s]
    if n == 0:
        return np.nan
    return fstate[_lvl_base(istate, inst, s) + n - 1]


@njit(cache=True, nogil=True, _nrt=False)
def best_prices(fstate, istate, inst):
    """Return ``(best_bid, best_ask)`` prices of ``inst`` (NaN for an empty side). Allocates: no."""
    ib = istate[H_OFF_INST] + inst * NI_INST
    return _best_key(istate, fstate, ib, inst, 0), -_best_key(istate, fstate, ib, inst, 1)


# ============================================================================= one event
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _side_index(side):
    return 0 if side > 0 else 1
