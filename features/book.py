"""Numba L3 order book: orders by id, price levels per instrument, messy-data rules.

The book is rebuilt from order-by-order events (``engine.schema.KIND_BOOK_ADD``,
``KIND_BOOK_MODIFY``, ``KIND_BOOK_DELETE`` and ``KIND_TRADE`` with an order id)
inside the feature kernel of the ``l3`` feature set
(:mod:`features.kernels_l3`), so one numba call per event updates the book and
writes the features.  All memory is preallocated by :func:`new_book_state`; an
event never allocates.

State layout (two flat arrays, so a kernel call unboxes two arrays, not ten)
---------------------------------------------------------------------------

``istate`` (int64, 1-D)

* ``[0, HEADER)``: header (``H_*``): instrument count, order-table capacity
  (power of two) and mask, levels per side ``L``, live orders, the live-order
  limit, the next level id and the offsets of the blocks below;
* per-instrument int block, ``NI_INST`` columns per instrument (``I_*``): last
  and first accepted ``ts_event_ns``, event counts, number of bid / ask levels,
  last trade / top-of-book change time, the anomaly counters
  (``I_ANOM + a`` for ``a`` in :data:`ANOMALY_NAMES`), and per side the
  shallowest level depth changed since the feature kernel last summed the
  side's depth (``I_DEPTH_CHG``: it re-sums only a side that changed near the
  top);
* order table: ``cap`` records of ``OREC`` = 4 int64 (32 bytes, two per cache
  line) ``[order id bits, meta, price, remaining size]`` where ``meta`` packs
  ``instrument + 1`` (bits 0-31; 0 = empty slot), the side (bit 32: 0 bid, 1
  ask) and the level id (bits 33-62), and price and size are float64 bits; open
  addressing with linear probing and backward-shift deletion (no tombstones,
  so heavy add/cancel churn never degrades the table).  The home slot is a
  splitmix64 hash of the instrument and the id without its low ``RUN_BITS``
  bits, plus those bits (:func:`_home`): sequential ids (most venues number
  their orders) land in consecutive slots, so the recent orders that most
  events touch share cache lines, and the batch kernels prefetch the slot an
  event a few rows ahead will probe (:func:`prefetch_order`), which hides the
  cache miss of an order added long ago.  :func:`grow_book_state` rebuilds a
  full table larger, and the batch path
  (:func:`features.kernels_l3.compute_batch_grow`) starts small and grows.

``fstate`` (float64, 1-D)

* per-instrument float block, ``NF_INST`` columns per instrument: column
  ``FB_LAST_TRADE_PX`` belongs to the book, the rest to the feature kernel;
* price levels: per instrument and side, four arrays of ``L`` entries: key,
  total size, order count and level id.  Keys are ``+price`` for bids and
  ``-price`` for asks, kept ascending, so the best level of either side is the
  *last* used entry: the common case (activity near the top) inserts and deletes
  at the end of the array without moving anything.

A level's id is unique for the run.  Every order remembers the id of the level
it was added to; an order whose level has since been dropped (level overflow,
un-crossing) is an *orphan*: it stays in the order table, so a later delete or
fill still finds it, but it no longer changes any level.  A new level at the
same price gets a new id, so an orphan can never corrupt it.

Event semantics
---------------

* **add** (kind 3): ``order_id``, ``side`` (+1 bid / -1 ask), ``price``,
  ``size`` > 0.  Creates the order and adds it to its level.
* **modify** (kind 4): ``order_id``, new ``price`` and new ``size`` (the side is
  the order's own, the tick's side is ignored).  Size 0 deletes the order.
* **delete** (kind 5): ``order_id``; ``size`` = quantity cancelled.  ``size``
  0 (or at least the remaining size) removes the order; a smaller size is a
  partial cancel (Databento MBO ``C``, LOBSTER type 2).  ``order_id == 0``
  clears the instrument's whole book (Databento ``R``; mapped by the reader
  from a ``clear`` event code).
* **trade** (kind 2) with ``order_id != 0``: a fill of that resting order by
  ``size`` (LOBSTER type 4, crypto ``match``); the aggressor side is the
  opposite of the resting order's side.  With ``order_id == 0`` it is a print
  that leaves the book alone (Databento ``T``: there the book is updated by the
  cancels/modifies that follow).

Messy data: each case, its rule and its counter
-----------------------------------------------

Rejected events (nothing changes, counted in the run's reject counters under
the name in ``engine.schema.REJECT_NAMES``, no score is published):

* modify or delete of an order id not in the book: ``unknown_order``;
* add / modify / trade with price or size NaN/inf: ``nonfinite``; price <= 0 or
  add size <= 0 or negative modify/delete size: ``nonpositive``;
* price above ``max_price`` (vendor sentinels such as Databento's
  ``UNDEF_PRICE`` or LOBSTER's ``9999999999``), or outside
  ``[ref / price_band, ref * price_band]`` where ``ref`` is the current mid
  (or the last trade price when the book is one-sided): ``absurd_price``;
* add or modify without an order id, or an add with side 0: ``malformed``;
* add while ``max_orders`` orders are live: ``book_full``;
* event time earlier than the instrument's previous accepted event:
  ``time_backwards`` (use the reader's sort-by-exchange-time option for files
  written in receive-time order).

Accepted events with an anomaly (applied as described, counted per instrument
under :data:`ANOMALY_NAMES`; reported as ``anomalies`` in the run summary):

* ``duplicate_add``: add for an order id that is already live: the old order
  is removed and the new one added (a re-sent snapshot or a missed delete);
* ``fill_unknown_order``: trade naming an order id that is not in the book:
  used as a print (trade features), book untouched;
* ``oversized_reduce``: partial cancel or fill larger than the remaining size:
  the order is removed;
* ``crossed_book``: after the event best bid > best ask.  What an add (or a
  modify to a new price) at or through the opposite best price means depends
  on the venue: the *crossing-add policy* (``crossing_add`` of
  :func:`new_book_state`, a column-mapping key; else the ``uncross``
  parameter: 1 ``uncross``, 0 ``keep``):

  - ``uncross`` (default; venues that never show an aggressor as an order,
    e.g. ITCH/LOBSTER, Databento MBO): a crossing order means the opposite
    levels strictly through its price are stale (a missed delete); they are
    dropped, their orders become orphans, counted ``uncrossed_levels``;
  - ``aggressor`` (venues that announce an incoming taker as an add at its
    limit price *before* the fills, which arrive as deletes / reductions of
    the resting orders it took): a marketable order (at or through the
    opposite best; a locking one too) is a *pending taker*, counted
    ``taker_add``: it is kept in the order table on no level, the opposite
    side stays intact, and after every event of its instrument each pending
    taker that no longer crosses rests at its price with its remaining size
    (``taker_rested``).  A delete, modify or fill of a pending taker changes
    it off the book.  At most ``MAX_TAKERS`` are pending per instrument; the
    oldest beyond that is left as an orphan (``taker_dropped``);
  - ``keep`` (e.g. auction periods): every order as received;
    ``crossed_book`` counts the crossings;

* ``locked_book``: after the event best bid == best ask; kept as is;
* ``snapshot``: further events at the instrument's first timestamp (a
  starting snapshot burst): applied, flagged warm-up, not counted as order flow
  or event rate;
* ``same_ts``: event with the same timestamp as the instrument's previous one:
  applied in file order (nothing decays between them);
* ``level_overflow``: a new price level while ``L`` levels of that side are in
  use: the farthest level is dropped (its orders become orphans) if the new one
  is better, else the new order is an orphan.  Top-of-book and depth features
  stay exact as long as they look at fewer than ``L`` levels;
* ``book_clear``: a clear event (all orders of the instrument removed);
* ``orphan_order``: delete / modify / fill of an orphan (the table entry is
  updated, no level changes).

Sizes are float64 (fractional crypto sizes are fine); a level is removed when
its order *count* reaches zero, so float rounding of sizes can never leave a
phantom level.

The kernels are compiled with ``_nrt=False``: they never allocate, and without
the runtime's atomic reference counting on every array argument the book step
is about 10 % faster.  The helpers of :func:`book_apply` are inlined into it
(``inline="always"``): a numba call passes every array as seven words on the
stack, which cost more than the helpers' own work (at the price of a longer
first compilation; the on-disk cache keeps it).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.schema import (
    CROSSING_ADD_POLICIES,
    KIND_BOOK_ADD,
    KIND_BOOK_DELETE,
    KIND_BOOK_MODIFY,
    REJECT_ABSURD_PRICE,
    REJECT_BOOK_FULL,
    REJECT_MALFORMED,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    REJECT_UNKNOWN_ORDER,
)

__all__ = [
    "ANOMALY_NAMES",
    "N_ANOMALIES",
    "DEFAULT_MAX_ORDERS",
    "DEFAULT_MAX_LEVELS",
    "new_book_state",
    "book_apply",
    "anomaly_counts",
    "book_levels",
    "book_orders",
    "best_prices",
]

INT64_MIN = np.iinfo(np.int64).min

#: Default limit of live orders (all instruments); the table has >= 2x slots.
DEFAULT_MAX_ORDERS = 1 << 16
#: Default number of price levels kept per instrument and side.
DEFAULT_MAX_LEVELS = 4096

# ----------------------------------------------------------------------------- header
H_N_INST = 0
H_CAP = 1
H_MASK = 2
H_LEVELS = 3
H_LIVE = 4
H_MAX_LIVE = 5
H_NEXT_LEVEL_ID = 6
H_OFF_INST = 7
H_OFF_ORD = 8
H_F_OFF_LEVELS = 9
H_MAGIC = 11
H_CROSSING = 12  #: crossing-add policy of this state (CROSS_*), or -1: the ``uncross`` param decides
HEADER = 16
_MAGIC = 0x4C33424F4F4B  # "L3BOOK"

# ----------------------------------------------------------------------------- per-instrument ints
I_LAST_TS = 0  #: last accepted ts_event_ns (INT64_MIN: none)
I_FIRST_TS = 1  #: first accepted ts_event_ns (INT64_MIN: none)
I_N_EVENTS = 2  #: accepted events
I_NB = 3  #: bid levels in use
I_NA = 4  #: ask levels in use
I_LAST_TRADE_TS = 5  #: ts of the last trade (INT64_MIN: none)
I_LAST_TOP_TS = 6  #: ts of the last change of best bid or ask price (INT64_MIN: none)
I_N_BOOK = 7  #: accepted book events (add / modify / delete)
I_ANOM = 8  #: first anomaly counter
ANOMALY_NAMES = (
    "duplicate_add",
    "fill_unknown_order",
    "oversized_reduce",
    "crossed_book",
    "locked_book",
    "uncrossed_levels",
    "snapshot",
    "same_ts",
    "level_overflow",
    "book_clear",
    "orphan_order",
    "taker_add",
    "taker_rested",
    "taker_dropped",
)
N_ANOMALIES = len(ANOMALY_NAMES)
A_DUP_ADD = 0
A_FILL_UNKNOWN = 1
A_OVERSIZED = 2
A_CROSSED = 3
A_LOCKED = 4
A_UNCROSSED = 5
A_SNAPSHOT = 6
A_SAME_TS = 7
A_LEVEL_OVERFLOW = 8
A_CLEAR = 9
A_ORPHAN = 10
A_TAKER_ADD = 11
A_TAKER_RESTED = 12
A_TAKER_DROPPED = 13
#: shallowest level depth (0 = best level) changed per side (+0 bid, +1 ask) since the feature
#: kernel last reset it; 0 in a new state (all changed).  Lets the kernel skip re-summing the
#: depth of a side whose first levels did not change.
I_DEPTH_CHG = I_ANOM + N_ANOMALIES
DEPTH_CLEAN = np.int64(1) << 62  #: value of an ``I_DEPTH_CHG`` column: nothing changed
#: pending takers (``aggressor`` policy): their count, then up to MAX_TAKERS order keys, oldest first
I_N_TAKERS = I_DEPTH_CHG + 2
I_TAKERS = I_N_TAKERS + 1
MAX_TAKERS = 4
I_SPARE = I_TAKERS + MAX_TAKERS  #: first of 5 columns free for the feature kernel
NI_INST = I_SPARE + 5

# ----------------------------------------------------------------------------- per-instrument floats
FB_LAST_TRADE_PX = 0  #: last trade price (0: none); book-owned, used as the band reference
NF_INST = 40  #: columns reserved per instrument; the feature kernel uses 1..NF_INST-1

# ----------------------------------------------------------------------------- order records
OREC = 4  # [key, meta = level id << 33 | ask << 32 | inst + 1, price (f64 bits), size (f64 bits)]
O_KEY = 0
O_META = 1
O_PX = 2
O_SZ = 3
_LOW32 = (1 << 32) - 1
_LEVEL_ID_MOD = 1 << 30
#: level id of a pending taker: in the order table, on no level (never given to a real level)
PENDING_LEVEL = _LEVEL_ID_MOD - 1

# ----------------------------------------------------------------------------- params used by the book
# (indices into the feature set's params vector, shared with features.kernels_l3)
P_MAX_PRICE = 0
P_PRICE_BAND = 1
P_UNCROSS = 2
N_BOOK_PARAMS = 3

# ----------------------------------------------------------------------------- crossing-add policies
CROSS_KEEP = 0  #: keep every order as received (the book may rest crossed)
CROSS_UNCROSS = 1  #: a crossing add drops the opposite levels strictly through its price (stale)
CROSS_AGGRESSOR = 2  #: a marketable add is an incoming taker: held off the book while it crosses
#: Policy names (``crossing_add`` in a column mapping) -> code.
CROSSING_POLICIES = {name: code for code, name in enumerate(CROSSING_ADD_POLICIES)}
assert CROSSING_POLICIES == {"keep": CROSS_KEEP, "uncross": CROSS_UNCROSS, "aggressor": CROSS_AGGRESSOR}

_U_GOLD = np.uint64(0x9E3779B97F4A7C15)
_U_M1 = np.uint64(0xBF58476D1CE4E5B9)
_U_M2 = np.uint64(0x94D049BB133111EB)
_U30 = np.uint64(30)
_U27 = np.uint64(27)
_U31 = np.uint64(31)
#: low order-id bits kept as a slot offset (see :func:`_home`)
RUN_BITS = 4
_U_RUN = np.uint64(RUN_BITS)
_U_RUN_MASK = np.uint64((1 << RUN_BITS) - 1)


@intrinsic
def _f2i(typingctx, x):
    """Return the bits of float64 ``x`` as an int64 (no conversion, no array view)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return types.int64(types.float64), codegen


@intrinsic
def _i2f(typingctx, x):
    """Return the int64 bits ``x`` as the float64 they encode."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@intrinsic
def _prefetch(typingctx, arr, idx, off):
    """Hint the CPU to load the cache line ``off`` bytes into row ``idx`` of ``arr`` (``llvm.prefetch``).

    A hint: it changes no result (and a prefetch never faults).
    """
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    if not isinstance(off, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        inds = [args[1]] + [zero] * (aryty.ndim - 1)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i8p = builder.gep(i8p, [args[2]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [i8p, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(arr, idx, off), codegen


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _meta(inst, side, level_id):
    """Return the packed meta word of an order (see the module docstring)."""
    ask = np.int64(1) if side < 0 else np.int64(0)
    return (np.int64(level_id) << 33) | (ask << 32) | np.int64(inst + 1)


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _m_side(meta):
    return -1 if (meta >> 32) & 1 else 1


@njit(cache=True, nogil=True, inline="always", _nrt=False)
def _m_level(meta):
    return meta >> 33


def _pow2_at_least(n: int) -> int:
    cap = 1
    while cap < n:
        cap <<= 1
    return cap


def new_book_state(
    n_instruments: int,
    *,
    max_orders: int = DEFAULT_MAX_ORDERS,
    max_levels: int = DEFAULT_MAX_LEVELS,
    crossing_add: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(fstate, istate)`` of an empty book for ``n_instruments`` instruments.

    Parameters
    ----------
    n_instruments : int
        Instrument ids ``0 .. n_instruments - 1``.
    max_orders : int
        Live orders the table accepts (all instruments together); an add beyond
        it is rejected as ``book_full``.  The table has a power of two >= 2x slots.
    max_levels : int
        Price levels kept per instrument and side (``L``).
    crossing_add : {None, "keep", "uncross", "aggressor"}
        What an add (or modify) at or through the opposite best price means:
        a property of the venue's feed, not of the model (see the module
        docstring).  ``None``: the feature set's ``uncross`` parameter decides
        (1 = ``uncross``, 0 = ``keep``).

    Memory: ``32 * cap`` bytes for the order table (``cap`` = the power of two
    >= ``2 * max_orders``; zero pages until touched) plus ``64 * max_levels``
    bytes per instrument.
    """
    if n_instruments < 0:
        raise ValueError(f"n_instruments must be >= 0, got {n_instruments}")
    if max_orders < 1 or max_levels < 2:
        raise ValueError(f"need max_orders >= 1 and max_levels >= 2, got {max_orders}, {max_levels}")
    if crossing_add is not None and crossing_add not in CROSSING_POLICIES:
        raise ValueError(f"crossing_add must be one of {sorted(CROSSING_POLICIES)}, got {crossing_add!r}")
    cap = _pow2_at_least(2 * int(max_orders))
    L = int(max_levels)
    n = int(n_instruments)
    off_inst = HEADER
    off_ord = off_inst + n * NI_INST
    istate = np.zeros(off_ord + cap * OREC, dtype=np.int64)
    f_off_levels = n * NF_INST
    fstate = np.zeros(f_off_levels + n * 2 * 4 * L, dtype=np.float64)
    istate[H_N_INST] = n
    istate[H_CAP] = cap
    istate[H_MASK] = cap - 1
    istate[H_LEVELS] = L
    istate[H_MAX_LIVE] = int(max_orders)
    istate[H_NEXT_LEVEL_ID] = 1
    istate[H_OFF_INST] = off_inst
    istate[H_OFF_ORD] = off_ord
    istate[H_F_OFF_LEVELS] = f_off_levels
    istate[H_MAGIC] = _MAGIC
    istate[H_CROSSING] = -1 if crossing_add is None else CROSSING_POLICIES[crossing_add]
    blk = istate[off_inst:off_ord].reshape(n, NI_INST)
    blk[:, I_LAST_TS] = INT64_MIN
    blk[:, I_FIRST_TS] = INT64_MIN
    blk[:, I_LAST_TRADE_TS] = INT64_MIN
    blk[:, I_LAST_TOP_TS] = INT64_MIN
    return fstate, istate


def check_book_state(fstate: np.ndarray, istate: np.ndarray) -> None:
    """Raise ValueError unless the arrays are a book state from :func:`new_book_state`."""
    if istate.ndim != 1 or istate.dtype != np.int64 or istate.shape[0] < HEADER:
        raise ValueError("istate is not an L3 book state (1-D int64 with a header)")
    if int(istate[H_MAGIC]) != _MAGIC:
        raise ValueError("istate is not an L3 book state (bad magic)")
    L = int(istate[H_LEVELS])
    if fstate.ndim != 1 or fstate.shape[0] != int(istate[H_F_OFF_LEVELS]) + int(istate[H_N_INST]) * 8 * L:
        raise ValueError("fstate does not match istate's layout")


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


@njit(cache=True, nogil=True, _nrt=False)
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
        if price <= 0.0 or size <= 0.0:
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
        if price <= 0.0 or size < 0.0:
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
    if price <= 0.0 or size <= 0.0:
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


# ============================================================================= inspection (tests, reports)
def anomaly_counts(istate: np.ndarray) -> dict[str, int]:
    """Return the anomaly counters summed over instruments (non-zero only)."""
    n = int(istate[H_N_INST])
    off = int(istate[H_OFF_INST])
    blk = istate[off : off + n * NI_INST].reshape(n, NI_INST)
    tot = blk[:, I_ANOM : I_ANOM + N_ANOMALIES].sum(axis=0)
    return {name: int(v) for name, v in zip(ANOMALY_NAMES, tot, strict=True) if v}


def book_levels(fstate: np.ndarray, istate: np.ndarray, inst: int) -> dict[str, list[tuple]]:
    """Return ``{"bids": [(price, size, count), ...], "asks": [...]}``, best level first."""
    n_inst = int(istate[H_N_INST])
    if not 0 <= inst < n_inst:
        raise IndexError(f"instrument {inst} out of range 0..{n_inst - 1}")
    L = int(istate[H_LEVELS])
    ib = int(istate[H_OFF_INST]) + inst * NI_INST
    out: dict[str, list[tuple]] = {}
    for s, name in ((0, "bids"), (1, "asks")):
        base = int(istate[H_F_OFF_LEVELS]) + (inst * 2 + s) * 4 * L
        n = int(istate[ib + I_NB + s])
        rows = []
        for q in range(n - 1, -1, -1):
            key = float(fstate[base + q])
            rows.append((key if s == 0 else -key, float(fstate[base + L + q]), int(fstate[base + 2 * L + q])))
        out[name] = rows
    return out


def book_orders(fstate: np.ndarray, istate: np.ndarray, inst: int) -> dict[int, tuple[int, float, float]]:
    """Return the live orders of ``inst``: ``{order_id: (side, price, size)}``."""
    cap = int(istate[H_CAP])
    off = int(istate[H_OFF_ORD])
    rec = istate[off : off + cap * OREC].reshape(cap, OREC)
    meta = rec[:, O_META]
    sel = np.flatnonzero((meta != 0) & ((meta & _LOW32) == inst + 1))
    fv = rec.view(np.float64)
    ids = rec[:, O_KEY].view(np.uint64)
    side = np.where((meta >> 32) & 1, -1, 1)
    return {int(ids[j]): (int(side[j]), float(fv[j, O_PX]), float(fv[j, O_SZ])) for j in sel}


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
