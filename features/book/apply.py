"""Applying one event to the book (``book_apply``): the messy-data rules and the crossing-add policies."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.schema import (
    KIND_BOOK_ADD,
    KIND_BOOK_DELETE,
    KIND_BOOK_MODIFY,
    MIN_PRICE,
    REJECT_ABSURD_PRICE,
    REJECT_BOOK_FULL,
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    REJECT_UNKNOWN_ORDER,
)
from features.book.layout import (
    A_CLEAR,
    A_DUP_ADD,
    A_FILL_UNKNOWN,
    A_ORPHAN,
    A_OVERSIZED,
    A_TAKER_ADD,
    A_TAKER_DROPPED,
    A_TAKER_RESTED,
    A_UNCROSSED,
    CROSS_AGGRESSOR,
    CROSS_UNCROSS,
    FB_LAST_TRADE_PX,
    H_CROSSING,
    H_LIVE,
    H_MAX_LIVE,
    H_OFF_INST,
    H_OFF_ORD,
    I_ANOM,
    I_DEPTH_CHG,
    I_N_TAKERS,
    I_NA,
    I_NB,
    I_TAKERS,
    MAX_TAKERS,
    NF_INST,
    NI_INST,
    O_KEY,
    O_META,
    O_PX,
    O_SZ,
    OREC,
    P_MAX_PRICE,
    P_PRICE_BAND,
    P_UNCROSS,
    PENDING_LEVEL,
    _f2i,
    _i2f,
    _m_level,
    _m_side,
    _meta,
)
from features.book.levels import _best_key, _depth_changed, _lvl_add, _lvl_base, _lvl_reduce, _side_index
from features.book.orders import (
    _order_delete,
    _order_insert,
    _order_put,
    _order_slot,
    _purge_instrument,
    order_find,
)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _price_ok(fstate, istate, ib, inst, fb, price, params):
    """Return 0 if ``price`` is acceptable, else the reject reason (absurd price)."""
    if price > params[P_MAX_PRICE]:
        return REJECT_ABSURD_PRICE
    band = params[P_PRICE_BAND]
    bb = _best_key(istate, fstate, ib, inst, 0)
    ba = -_best_key(istate, fstate, ib, inst, 1)
    if bb == bb and ba == ba and bb <= ba:
        ref = 0.5 * bb + 0.5 * ba
    else:
        ref = fstate[fb + FB_LAST_TRADE_PX]
    if ref > 0.0 and (price > ref * band or price * band < ref):
        return REJECT_ABSURD_PRICE
    return 0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _uncross(istate, fstate, ib, inst, side, price):
    """Drop opposite-side levels strictly through ``price`` (they are stale); return count."""
    o = 1 - _side_index(side)
    n = istate[ib + I_NB + o]
    base = _lvl_base(istate, inst, o)
    dropped = 0
    # opposite best is at the end; its key is +px (bids) or -px (asks)
    while n > 0:
        key = fstate[base + n - 1]
        px = key if o == 0 else -key
        crosses = px > price if o == 0 else px < price
        if not crosses:
            break
        n -= 1
        dropped += 1
    istate[ib + I_NB + o] = n
    if dropped:
        _depth_changed(istate, ib, o, 0)
    return dropped


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _policy(istate, params):
    """Return the crossing-add policy: the state's own, else the ``uncross`` parameter's."""
    p = istate[H_CROSSING]
    return np.int64(params[P_UNCROSS]) if p < 0 else p


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _marketable(istate, fstate, ib, inst, sd, price):
    """Return True if an order of side ``sd`` at ``price`` is at or through the opposite best."""
    if sd > 0:
        if istate[ib + I_NA] == 0:
            return False
        return price >= -_best_key(istate, fstate, ib, inst, 1)
    if istate[ib + I_NB] == 0:
        return False
    return price <= _best_key(istate, fstate, ib, inst, 0)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _taker_remove(istate, ib, q):
    """Remove entry ``q`` of the instrument's pending-taker list (order kept)."""
    n = istate[ib + I_N_TAKERS]
    for r in range(q + 1, n):
        istate[ib + I_TAKERS + r - 1] = istate[ib + I_TAKERS + r]
    istate[ib + I_TAKERS + n - 1] = 0
    istate[ib + I_N_TAKERS] = n - 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _taker_forget(istate, ib, key):
    """Remove order ``key`` from the pending-taker list (it was deleted or replaced)."""
    n = istate[ib + I_N_TAKERS]
    for q in range(n):
        if istate[ib + I_TAKERS + q] == key:
            _taker_remove(istate, ib, q)
            return


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _taker_push(istate, ib, inst, key):
    """Append order ``key`` to the pending takers; a full list gives up its oldest entry.

    The oldest pending taker, still crossing after ``MAX_TAKERS`` newer ones,
    is left in the order table on no level (an orphan: a later delete is
    accepted and changes no level), counted ``taker_dropped``.
    """
    if istate[ib + I_N_TAKERS] >= MAX_TAKERS:
        j = order_find(istate, istate[ib + I_TAKERS], inst)
        if j >= 0:
            ro = istate[H_OFF_ORD] + j * OREC
            om = istate[ro + O_META]
            istate[ro + O_META] = _meta(inst, _m_side(om), 0)
        _taker_remove(istate, ib, 0)
        istate[ib + I_ANOM + A_TAKER_DROPPED] += 1
    n = istate[ib + I_N_TAKERS]
    istate[ib + I_TAKERS + n] = key
    istate[ib + I_N_TAKERS] = n + 1
    istate[ib + I_ANOM + A_TAKER_ADD] += 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _taker_consume(istate, ib, inst, maker_side, maker_px, amount):
    """Take ``amount`` filled / cancelled off a resting order at ``maker_px`` off the pending takers.

    The liquidity a pending taker crosses is what it consumes: the oldest
    taker of the other side whose price crosses ``maker_px`` loses ``amount``
    of its remaining size (the rest spills over to the next one).  A taker
    consumed to zero never rests; the venue's delete removes it.
    """
    n = istate[ib + I_N_TAKERS]
    for q in range(n):
        if amount <= 0.0:
            return
        j = order_find(istate, istate[ib + I_TAKERS + q], inst)
        if j < 0:
            continue
        ro = istate[H_OFF_ORD] + j * OREC
        tsd = _m_side(istate[ro + O_META])
        if tsd == maker_side:
            continue
        tpx = _i2f(istate[ro + O_PX])
        if (maker_px > tpx) if tsd > 0 else (maker_px < tpx):
            continue
        tsz = _i2f(istate[ro + O_SZ])
        if tsz <= 0.0:
            continue
        take = amount if amount < tsz else tsz
        rem = tsz - take
        if rem <= 1e-9 * tsz:  # float dust of decimal sizes
            rem = 0.0
        istate[ro + O_SZ] = _f2i(rem)
        amount -= take


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _settle_takers(istate, fstate, ib, inst):
    """Rest every pending taker that no longer crosses, oldest first, at its price and size."""
    n = istate[ib + I_N_TAKERS]
    q = 0
    while q < n:
        key = istate[ib + I_TAKERS + q]
        j = order_find(istate, key, inst)
        if j < 0:  # not in the table (cannot happen: deletes forget it); drop the entry
            _taker_remove(istate, ib, q)
            n -= 1
            continue
        ro = istate[H_OFF_ORD] + j * OREC
        sd = _m_side(istate[ro + O_META])
        px = _i2f(istate[ro + O_PX])
        if _i2f(istate[ro + O_SZ]) <= 0.0 or _marketable(istate, fstate, ib, inst, sd, px):
            q += 1  # consumed (waits for the venue's delete) or still crossing
            continue
        s = _side_index(sd)
        lid = _lvl_add(istate, fstate, ib, inst, s, px if s == 0 else -px, _i2f(istate[ro + O_SZ]))
        istate[ro + O_META] = _meta(inst, sd, lid)
        istate[ib + I_ANOM + A_TAKER_RESTED] += 1
        _taker_remove(istate, ib, q)
        n -= 1


@njit(cache=True, nogil=True, _nrt=False, error_model="numpy")
def book_apply(ticks, i, fstate, istate, params):
    """Validate and apply a book or trade event to the book of its instrument.

    The caller (the feature kernel) has already checked the instrument id, the
    kind (2..5) and the event-time order.  Nothing is changed when the event
    is rejected.  Under the ``aggressor`` crossing-add policy, pending takers
    that no longer cross rest after the event (:func:`_settle_takers`).

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE
        Row ``i`` is the event.
    fstate, istate : ndarray
        Book state from :func:`new_book_state`.
    params : ndarray of float64
        ``params[P_MAX_PRICE]``, ``params[P_PRICE_BAND]``, ``params[P_UNCROSS]``
        (the crossing-add policy when the state does not set one).

    Returns
    -------
    code : int
        ``-reason`` (< 0) if rejected; 0 book event applied; 1 trade.
    side : int
        Side of the order (book events) or aggressor side (trades).
    added : float
        Size added to the book (add, modify up, modify to a new price); an
        add held as a pending taker adds nothing.
    removed : float
        Size cancelled from the book (delete, modify down / away); fills are not
        cancels and report 0, nor does anything done to a pending taker.

    Allocates: no.
    """
    code, side, added, removed = _apply_event(ticks, i, fstate, istate, params)
    if code >= 0:
        ib = istate[H_OFF_INST] + ticks[i].instrument * NI_INST
        if istate[ib + I_N_TAKERS] > 0:
            _settle_takers(istate, fstate, ib, ticks[i].instrument)
    return code, side, added, removed


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _apply_event(ticks, i, fstate, istate, params):
    """:func:`book_apply` without settling pending takers."""
    t = ticks[i]
    inst = t.instrument
    kind = t.kind
    ib = istate[H_OFF_INST] + inst * NI_INST
    fb = inst * NF_INST
    key = np.int64(t.order_id)
    price = t.price
    size = t.size

    if kind == KIND_BOOK_ADD:
        side = t.side
        if key == 0 or side == 0:
            return -REJECT_MALFORMED, 0, 0.0, 0.0
        if not (math.isfinite(price) and math.isfinite(size)):
            return -REJECT_NONFINITE, 0, 0.0, 0.0
        if price < MIN_PRICE or size <= 0.0:
            return -REJECT_NONPOSITIVE, 0, 0.0, 0.0
        r = _price_ok(fstate, istate, ib, inst, fb, price, params)
        if r != 0:
            return -r, 0, 0.0, 0.0
        sd = 1 if side > 0 else -1
        j = _order_slot(istate, key, inst)
        if j < 0 and istate[H_LIVE] >= istate[H_MAX_LIVE]:
            return -REJECT_BOOK_FULL, 0, 0.0, 0.0
        removed = 0.0
        if j >= 0:  # duplicate add: replace the live order
            istate[ib + I_ANOM + A_DUP_ADD] += 1
            ro = istate[H_OFF_ORD] + j * OREC
            om = istate[ro + O_META]
            if _m_level(om) == PENDING_LEVEL:
                _taker_forget(istate, ib, key)
            else:
                os_ = _m_side(om)
                opx = _i2f(istate[ro + O_PX])
                osz = _i2f(istate[ro + O_SZ])
                s0 = _side_index(os_)
                okey = opx if s0 == 0 else -opx
                if not _lvl_reduce(istate, fstate, ib, inst, s0, okey, _m_level(om), osz, True):
                    istate[ib + I_ANOM + A_ORPHAN] += 1
                removed = osz
            _order_delete(istate, j)
        s = _side_index(sd)
        added = size
        policy = _policy(istate, params)
        if policy == CROSS_AGGRESSOR and _marketable(istate, fstate, ib, inst, sd, price):
            lid = np.int64(PENDING_LEVEL)  # an incoming taker: not on the book while it crosses
            _taker_push(istate, ib, inst, key)
            added = 0.0
        else:
            lid = _lvl_add(istate, fstate, ib, inst, s, price if s == 0 else -price, size)
        if j < 0:  # the free slot found above is still free: the table was not touched
            _order_put(istate, -j - 1, key, inst, sd, price, size, lid)
        else:  # the duplicate was deleted (entries may have moved): probe again
            _order_insert(istate, key, inst, sd, price, size, lid)
        if policy == CROSS_UNCROSS:
            istate[ib + I_ANOM + A_UNCROSSED] += _uncross(istate, fstate, ib, inst, sd, price)
        return 0, sd, added, removed

    if kind == KIND_BOOK_MODIFY:
        if key == 0:
            return -REJECT_MALFORMED, 0, 0.0, 0.0
        if not (math.isfinite(price) and math.isfinite(size)):
            return -REJECT_NONFINITE, 0, 0.0, 0.0
        if price < MIN_PRICE or size < 0.0:
            return -REJECT_NONPOSITIVE, 0, 0.0, 0.0
        j = order_find(istate, key, inst)
        if j < 0:
            return -REJECT_UNKNOWN_ORDER, 0, 0.0, 0.0
        if size > 0.0:
            r = _price_ok(fstate, istate, ib, inst, fb, price, params)
            if r != 0:
                return -r, 0, 0.0, 0.0
        ro = istate[H_OFF_ORD] + j * OREC
        om = istate[ro + O_META]
        sd = _m_side(om)
        s = _side_index(sd)
        opx = _i2f(istate[ro + O_PX])
        osz = _i2f(istate[ro + O_SZ])
        lid = _m_level(om)
        if lid == PENDING_LEVEL:  # a pending taker changes off the book; settling decides
            if size == 0.0:
                _taker_forget(istate, ib, key)
                _order_delete(istate, j)
            else:
                istate[ro + O_PX] = _f2i(price)
                istate[ro + O_SZ] = _f2i(size)
            return 0, sd, 0.0, 0.0
        if size == 0.0:  # modify to nothing = delete
            if not _lvl_reduce(istate, fstate, ib, inst, s, opx if s == 0 else -opx, lid, osz, True):
                istate[ib + I_ANOM + A_ORPHAN] += 1
            _order_delete(istate, j)
            if istate[ib + I_N_TAKERS] > 0:
                _taker_consume(istate, ib, inst, sd, opx, osz)
            return 0, sd, 0.0, osz
        if price == opx:
            if not _lvl_reduce(istate, fstate, ib, inst, s, opx if s == 0 else -opx, lid,
                               osz - size, False):
                istate[ib + I_ANOM + A_ORPHAN] += 1
            istate[ro + O_SZ] = _f2i(size)
            if size < osz and istate[ib + I_N_TAKERS] > 0:
                _taker_consume(istate, ib, inst, sd, opx, osz - size)
            if size >= osz:
                return 0, sd, size - osz, 0.0
            return 0, sd, 0.0, osz - size
        # price change: leave the old level, join the new one
        if not _lvl_reduce(istate, fstate, ib, inst, s, opx if s == 0 else -opx, lid, osz, True):
            istate[ib + I_ANOM + A_ORPHAN] += 1
        added = size
        policy = _policy(istate, params)
        if policy == CROSS_AGGRESSOR and _marketable(istate, fstate, ib, inst, sd, price):
            nlid = np.int64(PENDING_LEVEL)
            _taker_push(istate, ib, inst, key)
            added = 0.0
        else:
            nlid = _lvl_add(istate, fstate, ib, inst, s, price if s == 0 else -price, size)
        istate[ro + O_META] = _meta(inst, sd, nlid)
        istate[ro + O_PX] = _f2i(price)
        istate[ro + O_SZ] = _f2i(size)
        if policy == CROSS_UNCROSS:
            istate[ib + I_ANOM + A_UNCROSSED] += _uncross(istate, fstate, ib, inst, sd, price)
        return 0, sd, added, osz

    if kind == KIND_BOOK_DELETE:
        if key == 0:  # clear the instrument's book
            _purge_instrument(istate, inst)
            istate[ib + I_NB] = 0
            istate[ib + I_NA] = 0
            istate[ib + I_DEPTH_CHG] = 0
            istate[ib + I_DEPTH_CHG + 1] = 0
            for q in range(MAX_TAKERS):
                istate[ib + I_TAKERS + q] = 0
            istate[ib + I_N_TAKERS] = 0
            istate[ib + I_ANOM + A_CLEAR] += 1
            return 0, 0, 0.0, 0.0
        if not math.isfinite(size):
            return -REJECT_NONFINITE, 0, 0.0, 0.0
        if size < 0.0:
            return -REJECT_NONPOSITIVE, 0, 0.0, 0.0
        j = order_find(istate, key, inst)
        if j < 0:
            return -REJECT_UNKNOWN_ORDER, 0, 0.0, 0.0
        return _reduce_order(istate, fstate, ib, inst, j, size, False)

    # KIND_TRADE
    if not (math.isfinite(price) and math.isfinite(size)):
        return -REJECT_NONFINITE, 0, 0.0, 0.0
    if price < MIN_PRICE or size <= 0.0:
        return -REJECT_NONPOSITIVE, 0, 0.0, 0.0
    r = _price_ok(fstate, istate, ib, inst, fb, price, params)
    if r != 0:
        return -r, 0, 0.0, 0.0
    fstate[fb + FB_LAST_TRADE_PX] = price
    side = 1 if t.side > 0 else (-1 if t.side < 0 else 0)
    if key != 0:
        j = order_find(istate, key, inst)
        if j < 0:
            istate[ib + I_ANOM + A_FILL_UNKNOWN] += 1
        else:
            ro = istate[H_OFF_ORD] + j * OREC
            om = istate[ro + O_META]
            # the aggressor is the opposite of a resting order, or the pending taker itself
            side = _m_side(om) if _m_level(om) == PENDING_LEVEL else -_m_side(om)
            _reduce_order(istate, fstate, ib, inst, j, size, True)
    return 1, side, 0.0, 0.0


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _reduce_order(istate, fstate, ib, inst, j, size, is_fill):
    """Cancel or fill ``size`` of the order in slot ``j`` (0 or >= remaining: all of it)."""
    ro = istate[H_OFF_ORD] + j * OREC
    om = istate[ro + O_META]
    sd = _m_side(om)
    s = _side_index(sd)
    opx = _i2f(istate[ro + O_PX])
    osz = _i2f(istate[ro + O_SZ])
    lid = _m_level(om)
    okey = opx if s == 0 else -opx
    pending = lid == PENDING_LEVEL
    if size > 0.0 and size < osz:
        if not pending:
            if not _lvl_reduce(istate, fstate, ib, inst, s, okey, lid, size, False):
                istate[ib + I_ANOM + A_ORPHAN] += 1
            if istate[ib + I_N_TAKERS] > 0:
                _taker_consume(istate, ib, inst, sd, opx, size)
        istate[ro + O_SZ] = _f2i(osz - size)
        return 0, sd, 0.0, (0.0 if is_fill or pending else size)
    if pending:
        _taker_forget(istate, ib, istate[ro + O_KEY])
        _order_delete(istate, j)
        return 0, sd, 0.0, 0.0
    if size > osz:
        istate[ib + I_ANOM + A_OVERSIZED] += 1
    if not _lvl_reduce(istate, fstate, ib, inst, s, okey, lid, osz, True):
        istate[ib + I_ANOM + A_ORPHAN] += 1
    _order_delete(istate, j)
    if istate[ib + I_N_TAKERS] > 0:
        _taker_consume(istate, ib, inst, sd, opx, osz)
    return 0, sd, 0.0, (0.0 if is_fill else osz)
