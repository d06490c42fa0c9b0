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

Messy data
----------

Every case (unknown order ids, duplicate adds, oversized reduces, absurd
prices, crossed and locked books, snapshots, level overflow, clears,
orphans), its rule and its counter are in the README's messy-data table
("Event shapes"); rejects count under ``engine.schema.REJECT_NAMES``,
accepted events with an anomaly under :data:`ANOMALY_NAMES`.  The
*crossing-add policy* (``crossing_add`` of :func:`new_book_state`, a
column-mapping key; else the ``uncross`` parameter) decides what an add at or
through the opposite best means: ``uncross`` (default: the opposite levels
through it are stale and dropped), ``aggressor`` (an incoming taker held off
the book while it crosses, at most ``MAX_TAKERS`` per instrument) or ``keep``.

Sizes are float64 (fractional crypto sizes are fine); a level is removed when
its order *count* reaches zero, so float rounding of sizes can never leave a
phantom level.

The kernels are compiled with ``_nrt=False``: they never allocate, and without
the runtime's atomic reference counting on every array argument the book step
is about 10 % faster.  The helpers of :func:`book_apply` are inlined into it
(``inline="always"``): a numba call passes every array as seven words on the
stack, which cost more than the helpers' own work (at the price of a longer
first compilation; the on-disk cache keeps it).

The package, one concern per module: :mod:`~features.book.layout` (state
layout and creation), :mod:`~features.book.orders` (order table),
:mod:`~features.book.levels` (price levels), :mod:`~features.book.apply`
(one event), :mod:`~features.book.views` (reading it from Python).
"""

from features.book.apply import book_apply
from features.book.layout import (
    ANOMALY_NAMES,
    DEFAULT_MAX_LEVELS,
    DEFAULT_MAX_ORDERS,
    MAX_TAKERS,
    N_ANOMALIES,
    check_book_state,
    new_book_state,
)
from features.book.levels import best_prices
from features.book.orders import grow_book_state, prefetch_order
from features.book.views import anomaly_counts, book_levels, book_orders

__all__ = [
    "ANOMALY_NAMES",
    "N_ANOMALIES",
    "MAX_TAKERS",
    "DEFAULT_MAX_ORDERS",
    "DEFAULT_MAX_LEVELS",
    "new_book_state",
    "check_book_state",
    "grow_book_state",
    "prefetch_order",
    "book_apply",
    "anomaly_counts",
    "book_levels",
    "book_orders",
    "best_prices",
]
