"""Tick validation shared by file readers (batch) and the hot path (one tick).

One numba kernel decides whether a tick is acceptable, so a row rejected by the
reader is exactly a tick the live loop would reject too.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.schema import (
    KIND_QUOTE,
    KIND_TRADE,
    MAX_ABS_VALUE,
    MIN_PRICE,
    N_REJECT_REASONS,
    REJECT_BAD_KIND,
    REJECT_CROSSED,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    REJECT_OK,
    REJECT_TIME_BACKWARDS,
    REJECT_UNKNOWN_INSTRUMENT,
)

__all__ = ["validate_tick", "validate_batch", "validate_rows", "absurd_rows"]


def absurd_rows(ticks: np.ndarray) -> np.ndarray:
    """Which rows carry a finite price or size above :data:`~engine.schema.MAX_ABS_VALUE` (1e15:
    1e300, a uint64-max sentinel) while none of their six is +inf (that is left to ``nonfinite``).

    The live sources' ``absurd_value`` rule (:meth:`engine.sources.TickSlot.ingest`,
    :mod:`engine.tick_decode`), vectorised for the file readers of every shape, so a file's row
    and a wire tick with the same values get the same decision and a sentinel never reaches
    the features.  Returns a bool array of ``len(ticks)``.  Allocates: the masks.
    """
    big = np.zeros(len(ticks), dtype=bool)
    inf = np.zeros(len(ticks), dtype=bool)
    for c in ("bid_px", "ask_px", "price", "bid_sz", "ask_sz", "size"):
        v = ticks[c]
        big |= v > MAX_ABS_VALUE
        inf |= v == np.inf
    return big & ~inf


@njit(cache=True, nogil=True)
def validate_tick(ticks, i, last_ts):
    """Return the reject reason of ``ticks[i]`` (``REJECT_OK`` = 0 if acceptable).

    Parameters
    ----------
    ticks : ndarray of TICK_DTYPE
    i : int
        Row to check.
    last_ts : int64 ndarray, shape (n_instruments,)
        Last accepted ``ts_event_ns`` per instrument (``INT64_MIN`` if none).
        Read only: the caller advances it once the tick is accepted.

    Checks, in order: instrument id in range, kind handled (quote/trade),
    finite and positive prices/sizes (a price at least :data:`~engine.schema.MIN_PRICE`,
    the smallest normal float64), quote not crossed (bid > ask; a locked
    quote bid == ask is accepted), event time not earlier than the instrument's
    previous accepted event (equal times are accepted).

    Allocates: no.
    """
    t = ticks[i]
    inst = t.instrument
    if inst < 0 or inst >= last_ts.shape[0]:
        return REJECT_UNKNOWN_INSTRUMENT
    kind = t.kind
    if kind == KIND_QUOTE:
        b = t.bid_px
        a = t.ask_px
        bs = t.bid_sz
        az = t.ask_sz
        if not (np.isfinite(b) and np.isfinite(a) and np.isfinite(bs) and np.isfinite(az)):
            return REJECT_NONFINITE
        if b < MIN_PRICE or a < MIN_PRICE or bs <= 0.0 or az <= 0.0:
            return REJECT_NONPOSITIVE
        if b > a:
            return REJECT_CROSSED
    elif kind == KIND_TRADE:
        p = t.price
        s = t.size
        if not (np.isfinite(p) and np.isfinite(s)):
            return REJECT_NONFINITE
        if p < MIN_PRICE or s <= 0.0:
            return REJECT_NONPOSITIVE
    else:
        return REJECT_BAD_KIND
    if t.ts_event_ns < last_ts[inst]:
        return REJECT_TIME_BACKWARDS
    return REJECT_OK


@njit(cache=True, nogil=True)
def validate_batch(ticks, n_instruments, reasons_out, counts_out):
    """Validate every row in file order; write per-row reasons and per-reason counts.

    ``reasons_out`` (uint8, len(ticks)) receives each row's reason; ``counts_out``
    (int64, N_REJECT_REASONS) is incremented.  Per-instrument time order is judged
    against the previous *accepted* row of that instrument.  Returns the number of
    accepted rows.  Allocates: one int64 array of ``n_instruments``.
    """
    last_ts = np.full(n_instruments, np.iinfo(np.int64).min, dtype=np.int64)
    return validate_rows(ticks, last_ts, reasons_out, counts_out)


@njit(cache=True, nogil=True)
def validate_rows(ticks, last_ts, reasons_out, counts_out):
    """Validate rows in order against carried per-instrument ``last_ts`` (updated); return n accepted.

    The chunked form of :func:`validate_batch`: the readers carry ``last_ts`` from
    chunk to chunk.
    """
    n_ok = 0
    for i in range(ticks.shape[0]):
        r = validate_tick(ticks, i, last_ts)
        reasons_out[i] = r
        counts_out[r] += 1
        if r == REJECT_OK:
            last_ts[ticks[i].instrument] = ticks[i].ts_event_ns
            n_ok += 1
    return n_ok


assert N_REJECT_REASONS <= 256  # reasons travel as uint8 (reasons_out)
