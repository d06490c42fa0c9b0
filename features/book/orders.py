"""The order table: open addressing by order id, prefetch and growth.

Home slot, linear probe, insert, backward-shift delete (no tombstones).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from features.book.layout import (
    _LOW32,
    _U27,
    _U30,
    _U31,
    _U_GOLD,
    _U_M1,
    _U_M2,
    _U_RUN,
    _U_RUN_MASK,
    H_CAP,
    H_CROSSING,
    H_LEVELS,
    H_LIVE,
    H_MASK,
    H_N_INST,
    H_NEXT_LEVEL_ID,
    H_OFF_INST,
    H_OFF_ORD,
    O_KEY,
    O_META,
    O_PX,
    O_SZ,
    OREC,
    _f2i,
    _meta,
    _prefetch,
    check_book_state,
    new_book_state,
)


# ============================================================================= order table
@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _home(key, inst, mask):
    """Return the home slot of (instrument, order id bits).

    The id's high bits (``key >> RUN_BITS``) and the instrument are hashed
    (splitmix64) to a random start; the low ``RUN_BITS`` bits are added to it,
    so ids that differ only there (sequential ids: a venue's order numbers) get
    consecutive slots.  Recent orders, the ones most events touch, then share a
    few cache lines instead of one random line each, while unrelated ids still
    spread uniformly.  The ids of one block of ``2**RUN_BITS`` share at most
    that many consecutive home slots, so a block whose ids are all live
    lengthens probes by at most that much (16: a dense snapshot of sequential
    ids runs as fast as with a plain hash; 256 made it 1.5x slower).
    """
    u = np.uint64(key)
    h = (u >> _U_RUN) ^ (np.uint64(inst + 1) * _U_GOLD)
    h = (h ^ (h >> _U30)) * _U_M1
    h = (h ^ (h >> _U27)) * _U_M2
    h = h ^ (h >> _U31)
    return np.int64((h + (u & _U_RUN_MASK)) & np.uint64(mask))


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def prefetch_order(ticks, i, istate):
    """Start loading the order-table slot that event ``ticks[i]`` will probe first.

    The batch kernels call it a few events ahead: a lookup of an order added
    long ago misses the caches, and the prefetch overlaps that wait with the
    events in between.  Changes nothing.  Allocates: no.
    """
    t = ticks[i]
    j = _home(np.int64(t.order_id), t.instrument, istate[H_MASK])
    _prefetch(istate, istate[H_OFF_ORD] + j * OREC, 0)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def order_find(istate, key, inst):
    """Return the slot of order ``key`` (int64 bits of the id) of ``inst``, or -1. Allocates: no."""
    mask = istate[H_MASK]
    off = istate[H_OFF_ORD]
    code = inst + 1
    j = _home(key, inst, mask)
    while True:
        r = off + j * OREC
        m = istate[r + O_META]
        if m == 0:
            return -1
        if (m & _LOW32) == code and istate[r + O_KEY] == key:
            return j
        j = (j + 1) & mask


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _order_slot(istate, key, inst):
    """Return the slot of the order (>= 0), or ``-(free slot + 1)`` where it would go."""
    mask = istate[H_MASK]
    off = istate[H_OFF_ORD]
    code = inst + 1
    j = _home(key, inst, mask)
    while True:
        r = off + j * OREC
        m = istate[r + O_META]
        if m == 0:
            return -(j + 1)
        if (m & _LOW32) == code and istate[r + O_KEY] == key:
            return j
        j = (j + 1) & mask


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _order_put(istate, j, key, inst, side, price, size, level_id):
    """Write a new order into free slot ``j`` (from :func:`_order_slot`, table unchanged since)."""
    r = istate[H_OFF_ORD] + j * OREC
    istate[r + O_KEY] = key
    istate[r + O_META] = _meta(inst, side, level_id)
    istate[r + O_PX] = _f2i(price)
    istate[r + O_SZ] = _f2i(size)
    istate[H_LIVE] += 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _order_insert(istate, key, inst, side, price, size, level_id):
    """Insert a new order (caller checked it is absent and the table has room); return slot."""
    mask = istate[H_MASK]
    off = istate[H_OFF_ORD]
    j = _home(key, inst, mask)
    while istate[off + j * OREC + O_META] != 0:
        j = (j + 1) & mask
    r = off + j * OREC
    istate[r + O_KEY] = key
    istate[r + O_META] = _meta(inst, side, level_id)
    istate[r + O_PX] = _f2i(price)
    istate[r + O_SZ] = _f2i(size)
    istate[H_LIVE] += 1
    return j


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _order_delete(istate, j):
    """Remove the order in slot ``j`` with backward-shift deletion. Allocates: no."""
    mask = istate[H_MASK]
    off = istate[H_OFF_ORD]
    i = j
    k = j
    while True:
        k = (k + 1) & mask
        rk = off + k * OREC
        c = istate[rk + O_META]
        if c == 0:
            break
        h = _home(istate[rk + O_KEY], (c & _LOW32) - 1, mask)
        # entry k may move to hole i unless its home lies cyclically in (i, k]
        if i <= k:
            stays = i < h and h <= k
        else:
            stays = i < h or h <= k
        if stays:
            continue
        ri = off + i * OREC
        for q in range(OREC):
            istate[ri + q] = istate[rk + q]
        i = k
    ri = off + i * OREC
    for q in range(OREC):
        istate[ri + q] = 0
    istate[H_LIVE] -= 1


@njit(cache=True, nogil=True, _nrt=False)
def _purge_instrument(istate, inst):
    """Remove every order of ``inst`` from the table; return how many. Allocates: no."""
    cap = istate[H_CAP]
    off = istate[H_OFF_ORD]
    code = inst + 1
    n = 0
    for j in range(cap):
        # backward shift may move another order of inst into slot j: re-check it
        while (istate[off + j * OREC + O_META] & _LOW32) == code:
            _order_delete(istate, j)
            n += 1
    return n


@njit(cache=True, nogil=True, _nrt=False)
def _rehash(src, dst):
    """Insert every live order of table ``src`` into the empty table ``dst`` (same layout otherwise)."""
    cap = src[H_CAP]
    so = src[H_OFF_ORD]
    do = dst[H_OFF_ORD]
    mask = dst[H_MASK]
    n = 0
    for j in range(cap):
        r = so + j * OREC
        m = src[r + O_META]
        if m == 0:
            continue
        k = _home(src[r + O_KEY], (m & _LOW32) - 1, mask)
        while dst[do + k * OREC + O_META] != 0:
            k = (k + 1) & mask
        for q in range(OREC):
            dst[do + k * OREC + q] = src[r + q]
        n += 1
    dst[H_LIVE] = n
    return n


def grow_book_state(fstate: np.ndarray, istate: np.ndarray, max_orders: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a copy of a book state whose order table holds ``max_orders`` live orders.

    Levels, per-instrument state, counters and every live order (rehashed) are
    kept, so features continue exactly as if the table had been that large from
    the start.  Not for the hot path (it allocates): the batch kernels grow a
    small, cache-friendly table when it fills up.
    """
    check_book_state(fstate, istate)
    n = int(istate[H_N_INST])
    if max_orders < int(istate[H_LIVE]):
        raise ValueError(f"max_orders {max_orders} < {int(istate[H_LIVE])} live orders")
    f2, i2 = new_book_state(n, max_orders=max_orders, max_levels=int(istate[H_LEVELS]))
    f2[:] = fstate
    i2[H_NEXT_LEVEL_ID] = istate[H_NEXT_LEVEL_ID]
    i2[H_CROSSING] = istate[H_CROSSING]
    off = int(istate[H_OFF_INST])
    end = int(istate[H_OFF_ORD])
    i2[off:end] = istate[off:end]
    _rehash(istate, i2)
    return f2, i2
