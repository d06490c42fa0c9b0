"""Shared schema: the normalised tick dtype, event kinds, flags and reject reasons.

Every part of tickscore (readers, feature kernels, engine, wire codec) imports
these constants from here, so there is exactly one definition of a tick.

A tick is one row of :data:`TICK_DTYPE`.  Fields that do not apply to an event
kind are 0 (e.g. ``price``/``size`` on a quote, ``bid_*``/``ask_*`` on a trade).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TICK_DTYPE",
    "KIND_QUOTE",
    "KIND_TRADE",
    "KIND_BOOK_ADD",
    "KIND_BOOK_MODIFY",
    "KIND_BOOK_DELETE",
    "KIND_NAMES",
    "SIDE_BUY",
    "SIDE_SELL",
    "SIDE_UNKNOWN",
    "FLAG_WARMUP",
    "FLAG_STALE_QUOTE",
    "FLAG_NO_BOOK",
    "FLAG_CLIPPED",
    "FLAG_NO_TRADES",
    "FLAG_NAMES",
    "CROSSING_ADD_POLICIES",
    "REJECT_OK",
    "REJECT_NONFINITE",
    "REJECT_NONPOSITIVE",
    "REJECT_CROSSED",
    "REJECT_TIME_BACKWARDS",
    "REJECT_UNKNOWN_INSTRUMENT",
    "REJECT_BAD_KIND",
    "REJECT_MALFORMED",
    "REJECT_UNKNOWN_ORDER",
    "REJECT_ABSURD_PRICE",
    "REJECT_BOOK_FULL",
    "REJECT_INSTRUMENTS_FULL",
    "REJECT_IMPLAUSIBLE_TIME",
    "REJECT_ABSURD_VALUE",
    "MAX_ABS_VALUE",
    "MIN_PRICE",
    "REJECT_NAMES",
    "N_REJECT_REASONS",
    "empty_ticks",
]

#: Normalised tick, one row per market event.  Times are integer nanoseconds
#: (``ts_event_ns``: exchange/event time since the Unix epoch; ``ts_recv_ns``:
#: local receive time).  ``instrument`` is the int id (row of the per-instrument
#: feature state); the symbol lives in the instrument table of the source.
TICK_DTYPE = np.dtype(
    [
        ("ts_event_ns", np.int64),
        ("ts_recv_ns", np.int64),
        ("instrument", np.int32),
        ("kind", np.uint8),
        ("side", np.int8),
        ("bid_px", np.float64),
        ("bid_sz", np.float64),
        ("ask_px", np.float64),
        ("ask_sz", np.float64),
        ("price", np.float64),
        ("size", np.float64),
        ("order_id", np.uint64),
    ],
    align=True,
)

# Event kinds (wire contract: same integers on the wire).
KIND_QUOTE = 1
KIND_TRADE = 2
KIND_BOOK_ADD = 3
KIND_BOOK_MODIFY = 4
KIND_BOOK_DELETE = 5
KIND_NAMES = {
    KIND_QUOTE: "quote",
    KIND_TRADE: "trade",
    KIND_BOOK_ADD: "book_add",
    KIND_BOOK_MODIFY: "book_modify",
    KIND_BOOK_DELETE: "book_delete",
}

# Trade aggressor side / book order side.
SIDE_BUY = 1
SIDE_SELL = -1
SIDE_UNKNOWN = 0

# Score flags (bit set, wire contract).
FLAG_WARMUP = 1  #: the instrument has seen too few events for its features to be settled
FLAG_STALE_QUOTE = 2  #: the last quote of the instrument is older than the stale threshold
FLAG_NO_BOOK = 4  #: no quote seen yet for the instrument: book features are placeholders
FLAG_CLIPPED = 8  #: at least one feature was clipped to its documented range
FLAG_NO_TRADES = 16  #: no trade seen yet for the instrument: trade features are placeholders
FLAG_NAMES = {
    FLAG_WARMUP: "warmup",
    FLAG_STALE_QUOTE: "stale_quote",
    FLAG_NO_BOOK: "no_book",
    FLAG_CLIPPED: "clipped",
    FLAG_NO_TRADES: "no_trades",
}

#: L3 crossing-add policies (mapping key / config ``crossing_add``), by code = position:
#: what an add at or through the opposite best price means on a venue (features.book).
CROSSING_ADD_POLICIES = ("keep", "uncross", "aggressor")

# Reject reasons: index into a per-run int64 counter array.
REJECT_OK = 0
REJECT_NONFINITE = 1  #: NaN or inf in a price, size or timestamp
REJECT_NONPOSITIVE = 2  #: price or size <= 0 where it must be positive, or a price below MIN_PRICE
REJECT_CROSSED = 3  #: quote with bid >= ask
REJECT_TIME_BACKWARDS = 4  #: ts_event_ns earlier than the instrument's previous event
REJECT_UNKNOWN_INSTRUMENT = 5  #: symbol / id not in the instrument table
REJECT_BAD_KIND = 6  #: event kind not handled by this feature set
REJECT_MALFORMED = 7  #: undecodable wire message or row (wrong length, types, ...)
REJECT_UNKNOWN_ORDER = 8  #: book modify/delete for an order id that is not in the book
REJECT_ABSURD_PRICE = 9  #: price above the feature set's max_price or outside its band around the mid
REJECT_BOOK_FULL = 10  #: book add while the preallocated order table is full
REJECT_INSTRUMENTS_FULL = 11  #: a new symbol while every instrument slot of the service is taken
REJECT_IMPLAUSIBLE_TIME = 12  #: ts_event_ns <= 0 or further ahead of the receiving clock than allowed
REJECT_ABSURD_VALUE = 13  #: a finite price or size beyond MAX_ABS_VALUE (1e15: 1e300, a uint64-max sentinel)
#: Largest finite price or size accepted, live and from files (larger: ``absurd_value``).
MAX_ABS_VALUE = 1e15
#: Smallest price the feature kernels accept (smaller: ``nonpositive``): the smallest normal
#: float64.  Below it a price is subnormal, and half of it (a mid is ``0.5 * bid + 0.5 * ask``)
#: can round to 0, which the features would then divide by.
MIN_PRICE = 2.2250738585072014e-308
REJECT_NAMES = (
    "ok",
    "nonfinite",
    "nonpositive",
    "crossed",
    "time_backwards",
    "unknown_instrument",
    "bad_kind",
    "malformed",
    "unknown_order",
    "absurd_price",
    "book_full",
    "instruments_full",
    "implausible_time",
    "absurd_value",
)
N_REJECT_REASONS = len(REJECT_NAMES)


def empty_ticks(n: int) -> np.ndarray:
    """Return a zeroed tick array of ``n`` rows (:data:`TICK_DTYPE`)."""
    return np.zeros(n, dtype=TICK_DTYPE)
