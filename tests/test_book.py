"""L3 order book (features.book) and L3 kernels (features.kernels_l3).

Hand-built event sequences with known resulting books, one per messy-data rule,
and a property test: the numba book equals a plain-Python reference book on
random event streams.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.schema import (
    FLAG_CLIPPED,
    FLAG_NO_BOOK,
    FLAG_WARMUP,
    KIND_BOOK_ADD,
    KIND_BOOK_DELETE,
    KIND_BOOK_MODIFY,
    KIND_QUOTE,
    KIND_TRADE,
    N_REJECT_REASONS,
    REJECT_ABSURD_PRICE,
    REJECT_BAD_KIND,
    REJECT_BOOK_FULL,
    REJECT_MALFORMED,
    REJECT_NAMES,
    REJECT_NONFINITE,
    REJECT_NONPOSITIVE,
    REJECT_TIME_BACKWARDS,
    REJECT_UNKNOWN_ORDER,
    TICK_DTYPE,
)
from features import kernels_l3 as K
from features.book import anomaly_counts, book_levels, book_orders
from features.fastlog import log_checked
from features.featureset import L3_FEATURE_SET

T0 = 1_794_839_400_000_000_000
ADD, MOD, DEL, TRD = KIND_BOOK_ADD, KIND_BOOK_MODIFY, KIND_BOOK_DELETE, KIND_TRADE


def ev(ts, kind, oid=0, side=0, price=0.0, size=0.0, inst=0):
    return (T0 + ts, T0 + ts, inst, kind, side, 0.0, 0.0, 0.0, 0.0, price, size, oid)


class Book:
    """Drive the L3 kernel one event at a time and look at the result."""

    def __init__(self, n_inst=1, max_orders=1000, max_levels=64, crossing_add=None, **params):
        self.fs, self.is_ = K.new_state(n_inst, max_orders=max_orders, max_levels=max_levels,
                                        crossing_add=crossing_add)  # fmt: skip
        p = dict(K.DEFAULT_PARAMS)
        p.update(params)
        self.params = np.array([p[k] for k in K.PARAM_NAMES], dtype=np.float64)
        self.x = np.zeros(K.N_FEATURES, dtype=np.float32)
        self.counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)

    def __call__(self, *e):
        t = np.array([ev(*e)], dtype=TICK_DTYPE)
        return int(K.update_tick(t, 0, self.fs, self.is_, self.params, self.x, self.counters))

    def run(self, events):
        return [self(*e) for e in events]

    def levels(self, inst=0):
        return book_levels(self.fs, self.is_, inst)

    def orders(self, inst=0):
        return book_orders(self.fs, self.is_, inst)

    @property
    def anomalies(self):
        return anomaly_counts(self.is_)

    def rejects(self):
        return {REJECT_NAMES[r]: int(v) for r, v in enumerate(self.counters) if r and v}


# ============================================================================ hand-built books
def test_adds_modify_partial_cancel_and_fill_give_the_expected_book():
    b = Book()
    b.run([
        (1, ADD, 1, 1, 100.0, 5), (2, ADD, 2, 1, 100.0, 3), (3, ADD, 3, 1, 99.5, 4),
        (4, ADD, 4, -1, 100.5, 2), (5, ADD, 5, -1, 101.0, 6),
        (6, MOD, 2, 0, 100.0, 1),      # size down, same price
        (7, DEL, 3, 0, 0.0, 1),        # partial cancel of 1 of 4
        (8, TRD, 4, 1, 100.5, 2),      # fill exhausts order 4
        (9, MOD, 1, 0, 99.5, 5),       # move order 1 to 99.5
    ])  # fmt: skip
    assert b.rejects() == {}
    lv = b.levels()
    assert lv["bids"] == [(100.0, 1.0, 1), (99.5, 8.0, 2)]
    assert lv["asks"] == [(101.0, 6.0, 1)]
    assert b.orders() == {1: (1, 99.5, 5.0), 2: (1, 100.0, 1.0), 3: (1, 99.5, 3.0), 5: (-1, 101.0, 6.0)}


def test_delete_or_modify_of_unknown_order_is_rejected_counted_and_changes_nothing():
    b = Book()
    b.run([(1, ADD, 1, 1, 100.0, 5), (2, ADD, 2, -1, 101.0, 5)])
    f0, i0 = b.fs.copy(), b.is_.copy()
    assert b(3, DEL, 99) == -REJECT_UNKNOWN_ORDER
    assert b(4, MOD, 98, 0, 100.0, 1) == -REJECT_UNKNOWN_ORDER
    assert b.rejects() == {"unknown_order": 2}
    np.testing.assert_array_equal(b.fs, f0)
    np.testing.assert_array_equal(b.is_, i0)
    assert np.isnan(b.x).all()


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ((5, ADD, 9, 1, 0.0, 1), REJECT_NONPOSITIVE),  # zero price
        ((5, ADD, 9, 1, 100.0, 0), REJECT_NONPOSITIVE),  # zero size
        ((5, ADD, 9, 1, math.nan, 1), REJECT_NONFINITE),
        ((5, ADD, 9, 1, 9.2e9, 1), REJECT_ABSURD_PRICE),  # vendor sentinel (Databento UNDEF_PRICE)
        ((5, ADD, 9, 1, 5000.0, 1), REJECT_ABSURD_PRICE),  # 50x the mid
        ((5, TRD, 0, 1, 1.0, 1), REJECT_ABSURD_PRICE),  # trade at 1/100 of the mid
        ((5, ADD, 0, 1, 100.0, 1), REJECT_MALFORMED),  # no order id
        ((5, ADD, 9, 0, 100.0, 1), REJECT_MALFORMED),  # no side
        ((5, MOD, 1, 0, 100.0, -1), REJECT_NONPOSITIVE),
        ((5, KIND_QUOTE, 0, 0, 100.0, 1), REJECT_BAD_KIND),
        ((0, ADD, 9, 1, 100.0, 1), REJECT_TIME_BACKWARDS),
    ],
)
def test_bad_events_are_rejected_with_their_reason_and_leave_the_book_alone(event, reason):
    b = Book()
    b.run([(1, ADD, 1, 1, 99.0, 5), (2, ADD, 2, -1, 101.0, 5)])
    before = b.levels(), b.orders()
    assert b(*event) == -reason
    assert (b.levels(), b.orders()) == before


def test_duplicate_add_replaces_the_live_order_and_is_counted():
    b = Book()
    b.run([(1, ADD, 1, 1, 100.0, 5), (2, ADD, 1, 1, 99.0, 2)])
    assert b.orders() == {1: (1, 99.0, 2.0)}
    assert b.levels()["bids"] == [(99.0, 2.0, 1)]
    assert b.anomalies["duplicate_add"] == 1


def test_fill_of_unknown_order_is_a_print_that_leaves_the_book_alone():
    b = Book()
    b.run([(1, ADD, 1, 1, 100.0, 5), (2, ADD, 2, -1, 101.0, 5)])
    before = b.levels()
    flags = b(3, TRD, 777, 1, 101.0, 1)
    assert flags >= 0
    assert b.levels() == before
    assert b.anomalies["fill_unknown_order"] == 1
    assert b.x[K.X_FLOW] == 1.0  # the print's aggressor side is used


def test_fill_side_comes_from_the_resting_order_and_oversized_fill_removes_it():
    b = Book()
    b.run([(1, ADD, 1, 1, 100.0, 5), (2, ADD, 2, -1, 101.0, 5)])
    b(3, TRD, 1, 1, 100.0, 7)  # file says +1; resting bid => seller-initiated
    assert b.x[K.X_FLOW] == -1.0
    assert 1 not in b.orders() and b.levels()["bids"] == []
    assert b.anomalies["oversized_reduce"] == 1


def test_crossing_add_removes_stale_opposite_levels_and_their_orders_become_orphans():
    b = Book()
    b.run([(1, ADD, 1, -1, 100.0, 5), (2, ADD, 2, -1, 100.5, 5), (3, ADD, 3, -1, 102.0, 1),
           (4, ADD, 4, 1, 99.0, 1), (5, ADD, 5, 1, 101.0, 2)])  # fmt: skip
    lv = b.levels()
    assert lv["asks"] == [(102.0, 1.0, 1)] and lv["bids"] == [(101.0, 2.0, 1), (99.0, 1.0, 1)]
    assert b.anomalies["uncrossed_levels"] == 2
    assert "crossed_book" not in b.anomalies
    # orphans are still known: deleting one is accepted and touches no level
    assert b(6, DEL, 1) >= 0
    assert b.levels() == lv and b.anomalies["orphan_order"] == 1
    # a new level at an orphan's old price is not corrupted by the other orphan
    b(7, ADD, 6, -1, 101.5, 3)
    b(8, DEL, 2)
    assert b.levels()["asks"] == [(101.5, 3.0, 1), (102.0, 1.0, 1)]


def test_without_uncross_a_crossed_book_is_kept_as_received_and_counted():
    b = Book(uncross=0.0)
    b.run([(1, ADD, 1, -1, 100.0, 5), (2, ADD, 2, 1, 101.0, 2)])
    assert b.levels() == {"bids": [(101.0, 2.0, 1)], "asks": [(100.0, 5.0, 1)]}
    assert b.anomalies["crossed_book"] == 1
    assert b.x[K.X_SPREAD] == 0.0  # negative spread clipped


def _venue_book(**kw):
    """Bids 100.0 x5, 99.5 x4; asks 100.5 x2, 101.0 x3, 101.5 x4, 102.0 x5 (order ids 1..6)."""
    b = Book(**kw)
    b.run([(1, ADD, 1, 1, 100.0, 5), (1, ADD, 2, 1, 99.5, 4), (1, ADD, 3, -1, 100.5, 2),
           (1, ADD, 4, -1, 101.0, 3), (1, ADD, 5, -1, 101.5, 4), (1, ADD, 6, -1, 102.0, 5)])  # fmt: skip
    return b


_BIDS = [(100.0, 5.0, 1), (99.5, 4.0, 1)]


def test_aggressor_policy_holds_a_taker_off_the_book_until_its_fills_arrive_then_rests_the_rest():
    # A venue that announces a taker as a create at its limit price, then the fills as
    # deletes / reductions of the resting orders it consumed, then the taker's remainder.
    b = _venue_book(crossing_add="aggressor")
    asks0 = [(100.5, 2.0, 1), (101.0, 3.0, 1), (101.5, 4.0, 1), (102.0, 5.0, 1)]
    steps = [
        # taker buy 12 @ 101.5: through three ask levels; the opposite side stays intact
        ((2, ADD, 10, 1, 101.5, 12), _BIDS, asks0),
        # fill 1: resting ask 3 (100.5 x2) consumed
        ((2, DEL, 3, 0, 0.0, 0.0), _BIDS, asks0[1:]),
        # fill 2: resting ask 4 (101.0 x3) consumed, as a modify to size 0
        ((2, MOD, 4, 0, 101.0, 0.0), _BIDS, asks0[2:]),
        # fill 3: 2 of resting ask 5 (101.5 x4): the taker still locks 101.5, still held
        ((2, DEL, 5, 0, 0.0, 2.0), _BIDS, [(101.5, 2.0, 1), (102.0, 5.0, 1)]),
        # fill 4: the rest of ask 5: the taker no longer crosses; what the fills left of it
        # (12 - 2 - 3 - 4 = 3) rests at 101.5
        ((2, DEL, 5, 0, 0.0, 0.0), [(101.5, 3.0, 1)] + _BIDS, [(102.0, 5.0, 1)]),
        # the venue confirms the taker's remainder
        ((2, MOD, 10, 0, 101.5, 3.0), [(101.5, 3.0, 1)] + _BIDS, [(102.0, 5.0, 1)]),
        # and later cancels it
        ((3, DEL, 10, 0, 0.0, 0.0), _BIDS, [(102.0, 5.0, 1)]),
    ]
    for k, (e, bids, asks) in enumerate(steps):
        assert b(*e) >= 0, k
        assert b.levels() == {"bids": bids, "asks": asks}, k
        assert b.x[K.X_SPREAD] > 0.0, k  # never crossed, never locked
    assert b.rejects() == {}
    a = b.anomalies
    assert a["taker_add"] == 1 and a["taker_rested"] == 1
    for name in ("uncrossed_levels", "crossed_book", "locked_book", "orphan_order", "taker_dropped"):
        assert name not in a, name


def test_aggressor_policy_taker_consumed_by_its_fills_never_rests():
    b = _venue_book(crossing_add="aggressor")
    b(2, ADD, 10, 1, 101.0, 5)  # buy 5 @ 101.0: exactly asks 100.5 x2 + 101.0 x3
    b(2, DEL, 3)
    b(2, DEL, 4)  # no longer crosses, but nothing of it is left: it does not rest
    assert b.levels()["bids"] == _BIDS
    b(2, DEL, 10)  # the venue's delete of the filled taker is accepted quietly
    assert b.rejects() == {} and "orphan_order" not in b.anomalies and 10 not in b.orders()


def test_aggressor_policy_taker_deleted_while_crossing_never_touches_the_book():
    b = _venue_book(crossing_add="aggressor")
    b(2, ADD, 10, -1, 99.5, 20)  # sell taker @ 99.5: through the best bid
    b(2, DEL, 1, 0, 0.0, 5.0)  # it fills bid 1 (100.0 x5); it still locks bid 99.5: held
    assert b.levels()["bids"] == [(99.5, 4.0, 1)]
    b(2, DEL, 10)  # the venue deletes the (IOC) taker: nothing rests
    assert b.levels() == {"bids": [(99.5, 4.0, 1)],
                          "asks": [(100.5, 2.0, 1), (101.0, 3.0, 1), (101.5, 4.0, 1), (102.0, 5.0, 1)]}
    assert 10 not in b.orders()
    assert b.anomalies["taker_add"] == 1 and "taker_rested" not in b.anomalies


def test_uncross_policy_wipes_the_opposite_side_on_the_same_taker_sequence():
    # today's default rule on a venue that announces takers: the asks the taker crossed
    # are dropped at once and its later fills hit orphans (why such venues need aggressor)
    b = _venue_book(crossing_add="uncross")
    b(2, ADD, 10, 1, 101.5, 12)
    assert b.levels()["asks"] == [(101.5, 4.0, 1), (102.0, 5.0, 1)]
    assert b.anomalies["uncrossed_levels"] == 2
    b(2, DEL, 3)
    assert b.anomalies["orphan_order"] == 1


def test_crossing_add_policy_name_is_checked():
    with pytest.raises(ValueError, match="crossing_add must be one of"):
        K.new_state(1, crossing_add="agressor")


def test_locked_book_is_kept_and_counted():
    b = Book()
    b.run([(1, ADD, 1, -1, 100.0, 5), (2, ADD, 2, 1, 100.0, 2)])
    assert b.levels() == {"bids": [(100.0, 2.0, 1)], "asks": [(100.0, 5.0, 1)]}
    assert b.anomalies["locked_book"] == 1


def test_snapshot_burst_at_the_first_timestamp_is_applied_flagged_and_not_counted_as_flow():
    b = Book()
    burst = [
        (5, ADD, k, 1 if k % 2 else -1, 100.0 - k / 8 if k % 2 else 100.0 + k / 8, 1) for k in range(1, 101)
    ]
    flags = b.run(burst)
    assert all(f >= 0 and f & FLAG_WARMUP for f in flags)
    assert b.anomalies["snapshot"] == 99
    assert b.x[K.X_BOOK_RATE] == 0.0 and b.x[K.X_OFI] == 0.0  # no flow from a snapshot
    assert len(b.levels()["bids"]) == 50


def test_duplicate_timestamps_are_applied_in_file_order_and_counted():
    b = Book()
    b.run([(1, ADD, 1, 1, 100.0, 5), (2, ADD, 2, -1, 101.0, 5), (2, DEL, 2), (2, ADD, 3, -1, 100.5, 1)])
    assert b.levels()["asks"] == [(100.5, 1.0, 1)]
    assert b.anomalies["same_ts"] == 2


def test_clear_removes_every_order_of_the_instrument_only():
    b = Book(n_inst=2)
    b.run([(1, ADD, 1, 1, 100.0, 5), (1, ADD, 1, 1, 50.0, 5, 1), (2, ADD, 2, -1, 101.0, 5),
           (3, DEL, 0, 0, 0.0, 0, 0)])  # fmt: skip
    assert b.levels(0) == {"bids": [], "asks": []} and b.orders(0) == {}
    assert b.orders(1) == {1: (1, 50.0, 5.0)}
    assert b(4, DEL, 1) == -REJECT_UNKNOWN_ORDER  # its orders are gone
    assert b.anomalies["book_clear"] == 1


def test_level_overflow_drops_the_farthest_level_and_keeps_the_top_exact():
    b = Book(max_levels=3)
    b.run([(1, ADD, k, 1, 100.0 - k, 1) for k in range(1, 4)])  # 99, 98, 97
    b(2, ADD, 9, 1, 96.0, 1)  # worse than all kept levels: orphan
    b(3, ADD, 10, 1, 99.5, 2)  # better: 97 is dropped
    assert b.levels()["bids"] == [(99.5, 2.0, 1), (99.0, 1.0, 1), (98.0, 1.0, 1)]
    assert b.anomalies["level_overflow"] == 2
    assert b(4, DEL, 3) >= 0 and b(5, DEL, 9) >= 0  # orphans delete cleanly
    assert b.levels()["bids"] == [(99.5, 2.0, 1), (99.0, 1.0, 1), (98.0, 1.0, 1)]


def test_full_order_table_rejects_adds_as_book_full():
    b = Book(max_orders=2)
    assert b.run([(1, ADD, 1, 1, 100.0, 1), (2, ADD, 2, 1, 99.0, 1), (3, ADD, 3, 1, 98.0, 1)])[-1] == (
        -REJECT_BOOK_FULL
    )
    assert b(4, DEL, 1) >= 0 and b(5, ADD, 3, 1, 98.0, 1) >= 0


def test_one_sided_book_sets_no_book_flag_and_depth_imbalance_is_one():
    b = Book()
    f = b(1, ADD, 1, 1, 100.0, 5)
    assert f & FLAG_NO_BOOK and b.x[K.X_DEPTH_S] == 1.0 and b.x[K.X_SPREAD] == 0.0


def test_large_and_string_hashed_order_ids_are_kept_exactly():
    b = Book()
    big = 2**64 - 1
    b.run([(1, ADD, big, 1, 100.0, 5), (2, ADD, 2**63, -1, 101.0, 5)])
    assert set(b.orders()) == {big, 2**63}
    assert b(3, DEL, big) >= 0 and set(b.orders()) == {2**63}


def test_depth_imbalance_over_first_n_levels():
    b = Book(depth_levels_short=2.0, depth_levels_long=3.0)
    b.run([(1, ADD, 1, 1, 100.0, 1), (1, ADD, 2, 1, 99.0, 2), (1, ADD, 3, 1, 98.0, 4),
           (1, ADD, 4, -1, 101.0, 1), (1, ADD, 5, -1, 102.0, 1), (1, ADD, 6, -1, 103.0, 8)])  # fmt: skip
    assert b.x[K.X_DEPTH_S] == pytest.approx((3 - 2) / 5)
    assert b.x[K.X_DEPTH_L] == pytest.approx((7 - 10) / 17)
    assert b.x[K.X_IMB] == 0.0


# ============================================================================ batch == streaming
def _stream(n=20_000, seed=3):
    from replay.generator_l3 import generate_l3

    df = generate_l3(n, seed=seed)
    syms = sorted(set(df["symbol"].to_list()))
    t = np.zeros(df.height, TICK_DTYPE)
    for c in ("ts_event_ns", "ts_recv_ns", "kind", "side", "price", "size", "order_id"):
        t[c] = df[c].to_numpy()
    t["instrument"] = [syms.index(s) for s in df["symbol"].to_list()]
    return t, len(syms)


def test_streaming_update_tick_and_chunked_compute_batch_are_bit_identical():
    ticks, n_inst = _stream()
    p = L3_FEATURE_SET.params_array()
    fs1, is1 = K.new_state(n_inst)
    X1 = np.empty((len(ticks), K.N_FEATURES), np.float32)
    f1 = np.empty(len(ticks), np.int32)
    c1 = np.zeros(N_REJECT_REASONS, np.int64)
    K.compute_batch(ticks, fs1, is1, p, X1, f1, c1)
    fs2, is2 = K.new_state(n_inst)
    c2 = np.zeros(N_REJECT_REASONS, np.int64)
    X2 = np.empty_like(X1)
    f2 = np.empty_like(f1)
    for j in range(0, len(ticks), 3000):  # chunks with carried state
        K.compute_batch(ticks[j : j + 3000], fs2, is2, p, X2[j : j + 3000], f2[j : j + 3000], c2)
    fs3, is3 = K.new_state(n_inst)
    c3 = np.zeros(N_REJECT_REASONS, np.int64)
    x = np.empty(K.N_FEATURES, np.float32)
    for j in range(2000):
        assert K.update_tick(ticks, j, fs3, is3, p, x, c3) == f1[j]
        np.testing.assert_array_equal(x, X1[j])
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(c1, c2)
    assert c1[0] == len(ticks)  # the generator's stream is clean


# ============================================================================ property: vs reference
PENDING = "pending"  # level of a pending taker (aggressor policy): in the order table, on no level


class RefBook:
    """Plain-Python book implementing the documented rules of features.book.

    ``policy``: crossing-add policy, 0 keep, 1 uncross, 2 aggressor.
    """

    def __init__(self, n_inst, max_price, band, policy):
        self.orders = {}
        self.levels = [[{}, {}] for _ in range(n_inst)]
        self.takers = [[] for _ in range(n_inst)]
        self.next_lid = 1
        self.last_trade = [0.0] * n_inst
        self.last_ts = [None] * n_inst
        self.max_price, self.band, self.policy = max_price, band, int(policy)
        self.uncross = self.policy == 1
        self.anom = Counter()

    def marketable(self, inst, sd, price):
        if sd > 0:
            ba = self.best(inst, 1)
            return ba is not None and price >= ba
        bb = self.best(inst, 0)
        return bb is not None and price <= bb

    def push_taker(self, inst, key):
        if len(self.takers[inst]) == 4:
            old = self.takers[inst].pop(0)
            self.orders[old][3] = 0  # left on no level: an orphan
            self.anom["taker_dropped"] += 1
        self.takers[inst].append(key)
        self.anom["taker_add"] += 1

    def consume(self, inst, maker_side, maker_px, amount):
        """A resting order's fill / cancel is taken off the oldest pending taker crossing it."""
        for key in self.takers[inst]:
            if amount <= 0.0:
                return
            sd, px, sz, _ = self.orders[key]
            if sd == maker_side or (maker_px > px if sd > 0 else maker_px < px) or sz <= 0.0:
                continue
            take = min(amount, sz)
            rem = sz - take
            self.orders[key][2] = 0.0 if rem <= 1e-9 * sz else rem
            amount -= take

    def settle(self, inst):
        for key in list(self.takers[inst]):
            sd, px, sz, _ = self.orders[key]
            if sz <= 0.0 or self.marketable(inst, sd, px):
                continue
            self.orders[key][3] = self.lvl_add(inst, 0 if sd > 0 else 1, px, sz)
            self.takers[inst].remove(key)
            self.anom["taker_rested"] += 1

    def place(self, inst, key, sd, price, size):
        """Put order ``key`` on its level, or hold it as a pending taker (aggressor policy)."""
        if self.policy == 2 and self.marketable(inst, sd, price):
            self.orders[key] = [sd, price, size, PENDING]
            self.push_taker(inst, key)
        else:
            self.orders[key] = [sd, price, size, self.lvl_add(inst, 0 if sd > 0 else 1, price, size)]

    def best(self, inst, s):
        lv = self.levels[inst][s]
        if not lv:
            return None
        return max(lv) if s == 0 else min(lv)

    def price_ok(self, inst, price):
        if price > self.max_price:
            return REJECT_ABSURD_PRICE
        bb, ba = self.best(inst, 0), self.best(inst, 1)
        ref = 0.5 * bb + 0.5 * ba if bb is not None and ba is not None and bb <= ba else self.last_trade[inst]
        if ref > 0.0 and (price > ref * self.band or price * self.band < ref):
            return REJECT_ABSURD_PRICE
        return 0

    def lvl_add(self, inst, s, price, size):
        lv = self.levels[inst][s]
        if price in lv:
            lv[price][0] += size
            lv[price][1] += 1
            return lv[price][2]
        lid = self.next_lid
        self.next_lid += 1
        lv[price] = [size, 1, lid]
        return lid

    def lvl_reduce(self, inst, s, price, lid, size, remove):
        e = self.levels[inst][s].get(price)
        if lid == 0 or e is None or e[2] != lid:
            self.anom["orphan_order"] += 1
            return
        v = e[0] - size
        e[0] = v if v > 0.0 else 0.0
        if remove:
            e[1] -= 1
            if e[1] <= 0:
                del self.levels[inst][s][price]

    def do_uncross(self, inst, side, price):
        o = 1 if side > 0 else 0
        lv = self.levels[inst][o]
        drop = [p for p in lv if (p > price if o == 0 else p < price)]
        for p in drop:
            del lv[p]
        self.anom["uncrossed_levels"] += len(drop)

    def reduce(self, inst, key, size, is_fill):
        sd, px, osz, lid = self.orders[key]
        s = 0 if sd > 0 else 1
        if 0.0 < size < osz:
            if lid != PENDING:
                self.lvl_reduce(inst, s, px, lid, size, False)
                self.consume(inst, sd, px, size)
            self.orders[key][2] = osz - size
            return
        if lid == PENDING:
            self.takers[inst].remove(key)
            del self.orders[key]
            return
        if size > osz:
            self.anom["oversized_reduce"] += 1
        self.lvl_reduce(inst, s, px, lid, osz, True)
        del self.orders[key]
        self.consume(inst, sd, px, osz)

    def apply(self, ts, kind, inst, oid, side, price, size):
        if kind not in (TRD, ADD, MOD, DEL):
            return -REJECT_BAD_KIND
        if self.last_ts[inst] is not None and ts < self.last_ts[inst]:
            return -REJECT_TIME_BACKWARDS
        r = self._apply(kind, inst, oid, side, price, size)
        if r >= 0:
            self.last_ts[inst] = ts
            self.settle(inst)
        return r

    def _apply(self, kind, inst, oid, side, price, size):
        key = (inst, oid)
        finite = math.isfinite(price) and math.isfinite(size)
        if kind == ADD:
            if oid == 0 or side == 0:
                return -REJECT_MALFORMED
            if not finite:
                return -REJECT_NONFINITE
            if price <= 0.0 or size <= 0.0:
                return -REJECT_NONPOSITIVE
            r = self.price_ok(inst, price)
            if r:
                return -r
            if key in self.orders:
                self.anom["duplicate_add"] += 1
                osd, opx, osz, olid = self.orders.pop(key)
                if olid == PENDING:
                    self.takers[inst].remove(key)
                else:
                    self.lvl_reduce(inst, 0 if osd > 0 else 1, opx, olid, osz, True)
            self.place(inst, key, 1 if side > 0 else -1, price, size)
            if self.uncross:
                self.do_uncross(inst, side, price)
            return 0
        if kind == MOD:
            if oid == 0:
                return -REJECT_MALFORMED
            if not finite:
                return -REJECT_NONFINITE
            if price <= 0.0 or size < 0.0:
                return -REJECT_NONPOSITIVE
            if key not in self.orders:
                return -REJECT_UNKNOWN_ORDER
            if size > 0.0:
                r = self.price_ok(inst, price)
                if r:
                    return -r
            sd, opx, osz, lid = self.orders[key]
            s = 0 if sd > 0 else 1
            if lid == PENDING:
                if size == 0.0:
                    self.takers[inst].remove(key)
                    del self.orders[key]
                else:
                    self.orders[key][1:3] = [price, size]
                return 0
            if size == 0.0:
                self.lvl_reduce(inst, s, opx, lid, osz, True)
                del self.orders[key]
                self.consume(inst, sd, opx, osz)
                return 0
            if price == opx:
                self.lvl_reduce(inst, s, opx, lid, osz - size, False)
                self.orders[key][2] = size
                if size < osz:
                    self.consume(inst, sd, opx, osz - size)
                return 0
            self.lvl_reduce(inst, s, opx, lid, osz, True)
            self.place(inst, key, sd, price, size)
            if self.uncross:
                self.do_uncross(inst, sd, price)
            return 0
        if kind == DEL:
            if oid == 0:
                for k in [k for k in self.orders if k[0] == inst]:
                    del self.orders[k]
                self.levels[inst] = [{}, {}]
                self.takers[inst] = []
                self.anom["book_clear"] += 1
                return 0
            if not math.isfinite(size):
                return -REJECT_NONFINITE
            if size < 0.0:
                return -REJECT_NONPOSITIVE
            if key not in self.orders:
                return -REJECT_UNKNOWN_ORDER
            self.reduce(inst, key, size, False)
            return 0
        if not finite:
            return -REJECT_NONFINITE
        if price <= 0.0 or size <= 0.0:
            return -REJECT_NONPOSITIVE
        r = self.price_ok(inst, price)
        if r:
            return -r
        self.last_trade[inst] = price
        if oid != 0:
            if key in self.orders:
                self.reduce(inst, key, size, True)
            else:
                self.anom["fill_unknown_order"] += 1
        return 1

    def book(self, inst):
        bids = sorted(self.levels[inst][0].items(), reverse=True)
        asks = sorted(self.levels[inst][1].items())
        return {"bids": [(p, v[0], v[1]) for p, v in bids], "asks": [(p, v[0], v[1]) for p, v in asks]}

    def live(self, inst):
        return {k[1]: (v[0], v[1], v[2]) for k, v in self.orders.items() if k[0] == inst}


_PRICES = [99.0, 99.5, 100.0, 100.5, 101.0, 0.0, 5000.0, math.nan]
_SIZES = [1.0, 2.0, 3.0, 0.5, 7.0, 0.0, -1.0]
events_strategy = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 0, 1, 2]),  # dt
        st.sampled_from([ADD, ADD, ADD, MOD, DEL, DEL, TRD, KIND_QUOTE]),
        st.integers(0, 1),  # instrument
        st.integers(0, 9),  # order id (0 = none / clear)
        st.sampled_from([1, -1, 1, -1, 0]),
        st.sampled_from(_PRICES),
        st.sampled_from(_SIZES),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events=events_strategy, policy=st.sampled_from([0, 1, 2]), by_state=st.booleans())
def test_numba_book_matches_python_reference_on_random_streams(events, policy, by_state):
    # the policy comes from the state (crossing_add, a mapping key) or the uncross parameter
    if by_state:
        b = Book(n_inst=2, crossing_add=("keep", "uncross", "aggressor")[policy], uncross=1.0)
    else:
        b = Book(n_inst=2, uncross=float(policy))
    ref = RefBook(2, 1e9, 10.0, policy)
    ts = 0
    for dt, kind, inst, oid, side, price, size in events:
        ts += dt
        got = b(ts, kind, oid, side, price, size, inst)
        want = ref.apply(ts, kind, inst, oid, side, price, size)
        if want == 1 or want == 0:
            assert got >= 0, (kind, oid, side, price, size)
        else:
            assert got == want, (kind, oid, side, price, size)
        for i in (0, 1):
            assert b.levels(i) == ref.book(i)
            assert b.orders(i) == ref.live(i)
    got_anom = b.anomalies
    for name in ("duplicate_add", "fill_unknown_order", "oversized_reduce", "uncrossed_levels",
                 "book_clear", "orphan_order", "taker_add", "taker_rested", "taker_dropped"):  # fmt: skip
        assert got_anom.get(name, 0) == ref.anom[name], name


def _check_against_reference(events, policy, n_inst=2, max_orders=1000):
    """Feed ``events`` to the numba book and the reference; compare after every event."""
    b = Book(n_inst=n_inst, max_orders=max_orders, crossing_add=("keep", "uncross", "aggressor")[policy])
    ref = RefBook(n_inst, 1e9, 10.0, policy)
    ts = 0
    for k, (dt, kind, inst, oid, side, price, size) in enumerate(events):
        ts += dt
        got = b(ts, kind, oid, side, price, size, inst)
        want = ref.apply(ts, kind, inst, oid, side, price, size)
        assert (got >= 0) if want in (0, 1) else (got == want), (k, kind, oid, side, price, size)
        for i in range(n_inst):
            assert b.levels(i) == ref.book(i), (k, kind, oid, side, price, size)
            assert b.orders(i) == ref.live(i), (k, kind, oid, side, price, size)
    for name in ("duplicate_add", "fill_unknown_order", "oversized_reduce", "uncrossed_levels",
                 "book_clear", "orphan_order", "taker_add", "taker_rested", "taker_dropped"):  # fmt: skip
        assert b.anomalies.get(name, 0) == ref.anom[name], name
    return ref


# book-like streams: mostly adds on both sides near one price, then fills / deletes / changes
_BOOKISH_PRICES = [99.5, 100.0, 100.0, 100.5, 100.5, 101.0, 101.5]
_bookish_events = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 1]),
        st.sampled_from([ADD, ADD, ADD, ADD, MOD, DEL, DEL, DEL, TRD]),
        st.integers(0, 1),
        st.integers(0, 12),
        st.sampled_from([1, -1]),
        st.sampled_from(_BOOKISH_PRICES),
        st.sampled_from([1.0, 2.0, 3.0, 0.5, 0.0]),
    ),
    min_size=5,
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events=_bookish_events, policy=st.sampled_from([0, 1, 2]))
def test_numba_book_matches_python_reference_on_book_like_streams(events, policy):
    _check_against_reference(events, policy)


@pytest.mark.parametrize("policy", [0, 1, 2])
def test_numba_book_matches_python_reference_on_a_long_seeded_stream(policy):
    rng = np.random.default_rng(11 + policy)
    n = 6000
    kinds = np.array([ADD, ADD, ADD, ADD, MOD, DEL, DEL, DEL, TRD])
    events = list(zip(
        rng.choice([0, 0, 1], n).tolist(), rng.choice(kinds, n).tolist(), rng.integers(0, 2, n).tolist(),
        rng.integers(0, 40, n).tolist(), rng.choice([1, -1], n).tolist(),
        rng.choice(_BOOKISH_PRICES, n).tolist(), rng.choice([1.0, 2.0, 3.0, 0.5, 0.0], n).tolist(),
        strict=True,
    ))  # fmt: skip
    ref = _check_against_reference(events, policy)
    if policy == 2:  # the stream really exercises held, rested and evicted takers
        assert ref.anom["taker_add"] > 100 and ref.anom["taker_rested"] > 20
        assert ref.anom["taker_dropped"] > 0


def test_growing_the_order_table_mid_stream_changes_no_feature_and_no_book():
    ticks, n_inst = _stream(30_000, seed=8)
    p = L3_FEATURE_SET.params_array()
    X1 = np.empty((len(ticks), K.N_FEATURES), np.float32)
    f1 = np.empty(len(ticks), np.int32)
    c1 = np.zeros(N_REJECT_REASONS, np.int64)
    fs, is_ = K.new_state(n_inst)
    K.compute_batch(ticks, fs, is_, p, X1, f1, c1)
    st = list(K.new_state(n_inst, max_orders=16))
    X2, f2, c2 = np.empty_like(X1), np.empty_like(f1), np.zeros(N_REJECT_REASONS, np.int64)
    assert K.compute_batch_auto(ticks, st, p, X2, f2, c2) >= 2
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(c1, c2)
    for i in range(n_inst):
        assert book_levels(fs, is_, i) == book_levels(st[0], st[1], i)
        assert book_orders(fs, is_, i) == book_orders(st[0], st[1], i)


# ============================================================================ batch kernels' shortcuts
def _messy(ticks, seed=5):
    """Return a copy of ``ticks`` with rejects and messy-data cases sprinkled in."""
    t = ticks.copy()
    rng = np.random.default_rng(seed)
    n = len(t)

    def pick(frac):
        return rng.choice(n, max(1, int(n * frac)), replace=False)

    t["price"][pick(0.003)] = np.nan
    t["size"][pick(0.003)] = -1.0
    t["price"][pick(0.002)] = 9999999999.0
    t["order_id"][pick(0.005)] = rng.integers(1, 2**63, max(1, int(n * 0.005)), dtype=np.uint64)
    t["kind"][pick(0.005)] = ADD  # often a duplicate add
    i = pick(0.001)
    t["kind"][i], t["order_id"][i] = DEL, 0  # clears
    t["ts_event_ns"][pick(0.002)] -= 10**9  # time backwards
    t["kind"][pick(0.002)] = KIND_QUOTE
    i = pick(0.004)
    t["price"][i] = np.round(t["price"][i] * 0.98, 2)  # crossing adds / modifies
    return t


def test_batch_blocks_equal_streaming_on_messy_data_and_changing_params():
    """compute_batch (blocks of events, log1p features per block, prefetching) == update_tick.

    Rejected rows (NaN features) inside blocks, clears, uncrossing, a table that
    grows mid-block, tight clip limits, and depth / half-life parameters that
    change between calls on the same state (the cached depth sums must follow).
    """
    ticks, n_inst = _stream(6_000, seed=4)
    ticks = _messy(ticks)
    p1 = L3_FEATURE_SET.params_array()
    p2 = p1.copy()
    for name, v in (("depth_levels_short", 2.0), ("depth_levels_long", 4.0), ("vol_max_bps_sqrt_s", 5.0),
                    ("rate_max_per_s", 30.0), ("hl_trade_ns", 3e8), ("age_max_s", 0.01)):  # fmt: skip
        p2[K.PARAM_NAMES.index(name)] = v
    cut = [0, 1_000, 1_700, 3_333, len(ticks)]
    params = [p1, p2, p1, p2]
    # streaming, one event at a time
    fs, is_ = K.new_state(n_inst)
    c1 = np.zeros(N_REJECT_REASONS, np.int64)
    X1 = np.empty((len(ticks), K.N_FEATURES), np.float32)
    f1 = np.empty(len(ticks), np.int32)
    for a, b, p in zip(cut, cut[1:], params, strict=False):
        n_s, n_l = (int(p[K.PARAM_NAMES.index(k)]) for k in ("depth_levels_short", "depth_levels_long"))
        for j in range(a, b):
            f1[j] = K.update_tick(ticks, j, fs, is_, p, X1[j], c1)
            if f1[j] >= 0:  # depth imbalances from scratch (the kernel keeps sums while a side is unchanged)
                lv = book_levels(fs, is_, int(ticks["instrument"][j]))
                want = []
                for n in (n_s, n_l):
                    sums = []
                    for side in ("bids", "asks"):
                        acc = 0.0
                        for _, size, _ in lv[side][:n]:
                            acc += size
                        sums.append(acc)
                    tot = sums[0] + sums[1]
                    want.append((sums[0] - sums[1]) / tot if tot > 0.0 else 0.0)
                assert X1[j, K.X_DEPTH_S] == np.float32(want[0]), j
                assert X1[j, K.X_DEPTH_L] == np.float32(want[1]), j
    # batch, the same chunks; and the growing batch path from a tiny table
    fs, is_ = K.new_state(n_inst)
    st = list(K.new_state(n_inst, max_orders=8))
    c2, c3 = np.zeros_like(c1), np.zeros_like(c1)
    X2, X3 = np.empty_like(X1), np.empty_like(X1)
    f2, f3 = np.empty_like(f1), np.empty_like(f1)
    for a, b, p in zip(cut, cut[1:], params, strict=False):
        K.compute_batch(ticks[a:b], fs, is_, p, X2[a:b], f2[a:b], c2)
        K.compute_batch_auto(ticks[a:b], st, p, X3[a:b], f3[a:b], c3)
    assert (f1 < 0).sum() > 50 and ((f1 >= 0) & (f1 & FLAG_CLIPPED != 0)).sum() > 50  # both occurred
    for X, f, c in ((X2, f2, c2), (X3, f3, c3)):
        np.testing.assert_array_equal(X.view(np.uint32), X1.view(np.uint32))
        np.testing.assert_array_equal(f, f1)
        np.testing.assert_array_equal(c, c1)


def test_batch_log1p_shortcut_rounds_like_libm():
    """The batch kernels' SIMD log (kept only when its float32 is certain) == float32(math.log)."""
    from numba import njit

    check = njit(error_model="numpy")(_log_check_loop)
    rng = np.random.default_rng(0)
    n = 400_000
    v = np.concatenate([
        10.0 ** rng.uniform(-20, 7, n), rng.uniform(0, 2, n), np.floor(rng.uniform(0, 1e6, n)),
        np.arange(n) * 1e-9, rng.uniform(-0.999, 0, n), 10.0 ** rng.uniform(-30, 300, n),
        np.array([0.0, -0.0, 5e-324, 1e-310, 1.0, math.sqrt(2) - 1, np.nextafter(math.sqrt(2), 0) - 1,
                  np.nextafter(math.sqrt(2), 3) - 1, 1e300, 1e308, np.inf, np.nan, -1.0, -2.0]),
    ])  # fmt: skip
    mismatches, fallbacks = check(v, log_checked)
    assert mismatches == 0
    assert fallbacks < 0.002 * len(v)


def _log_check_loop(v, log_checked):
    bad = 0
    fb = 0
    for i in range(v.shape[0]):
        x = 1.0 + v[i]
        y, ok = log_checked(x)
        if not ok:
            fb += 1
        elif np.float32(y) != np.float32(math.log(x)):
            bad += 1
    return bad, fb


@pytest.mark.parametrize("stride", [1, 3, 16, 1 << 20])
def test_order_table_with_dense_and_strided_ids_matches_reference(stride):
    """Runs of consecutive ids share cache lines (see features.book._home): probing and
    backward-shift deletion stay exact with dense, strided and high-bit-only ids, near-full."""
    rng = np.random.default_rng(stride)
    b = Book(n_inst=2, max_orders=600, max_levels=64)
    ref = RefBook(2, 1e9, 10.0, True)
    ts = 0
    live = [[], []]
    nxt = 1
    for step in range(4_000):
        ts += 1
        inst = int(rng.integers(2))
        if live[inst] and (len(live[0]) + len(live[1]) >= 590 or rng.random() < 0.45):
            k = int(rng.integers(len(live[inst]))) if rng.random() < 0.7 else -1  # random or newest
            oid = live[inst].pop(k)
            e = (ts, DEL, oid * stride, 0, 0.0, 0.0, inst)
        else:
            side = 1 if rng.random() < 0.5 else -1
            px = 100.0 - side * float(rng.integers(1, 30)) * 0.25
            oid = nxt if rng.random() < 0.9 else nxt + 7  # mostly sequential, some gaps
            nxt = oid + 1
            live[inst].append(oid)
            e = (ts, ADD, oid * stride, side, px, 1.0, inst)
        got = b(*e)
        want = ref.apply(e[0], e[1], e[6], e[2], e[3], e[4], e[5])
        assert (got >= 0) == (want >= 0), (step, e)
    for i in (0, 1):
        assert b.orders(i) == ref.live(i)
        assert b.levels(i) == ref.book(i)
