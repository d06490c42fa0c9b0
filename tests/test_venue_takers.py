"""A venue that announces takers as orders: the crossing-add policy, end to end.

Some crypto venues publish an incoming aggressive order as ``created`` at its
limit price, then the fills as ``deleted`` / ``changed`` events of the resting
orders it took, then the taker's own remainder.  A seeded simulation writes
such a feed in a vendor layout (``microtimestamp, action, id, order_type,
price, amount``); it is read with README mapping keys only, and the rebuilt
book is compared with the simulator's true book.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from engine.schema import FLAG_NO_BOOK, N_REJECT_REASONS
from features import kernels_l3 as K
from features.book import anomaly_counts, book_levels
from features.featureset import L3_FEATURE_SET
from replay.mapping import mapping_from_cli
from replay.reader import read_ticks

T0_US = 1_733_000_000_000_000
TICK = 0.01
MAP = [
    "shape=l3,symbol==BTCUSD,ts_event=microtimestamp,kind=action,order_id=id,side=order_type",
    "price=price,size=amount,kinds.created=add,kinds.changed=modify,kinds.deleted=delete",
    "sides.0=buy,sides.1=sell",
]


def _venue_feed(n_steps: int = 2500, seed: int = 3) -> tuple[pl.DataFrame, dict, np.ndarray]:
    """Return a taker-announcing venue's feed, its true final book ``{side: {price: size}}``
    and its true (best bid, best ask) after every row (NaN: side empty)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    trades: list[tuple] = []  # the venue's separate trade file: microtimestamp,price,amount,type
    tops: list[tuple[float, float]] = []
    book = {1: {}, -1: {}}  # side -> {order id: [price, size]}
    next_id = [1000]
    t = [T0_US]

    def emit(action, oid, side, price, amount):
        rows.append((t[0], action, oid, 0 if side > 0 else 1, round(price, 2), round(amount, 4)))
        bb, ba = best(1), best(-1)
        tops.append((np.nan if bb is None else bb, np.nan if ba is None else ba))

    def add(side, price, size):
        price = round(price, 2)  # on the tick grid, as the venue prints it
        oid = next_id[0]
        next_id[0] += 1
        book[side][oid] = [price, size]
        emit("created", oid, side, price, size)
        return oid

    def best(side):
        px = [p for p, _ in book[side].values()]
        return (max(px) if side > 0 else min(px)) if px else None

    for k in range(10):  # the starting book, one timestamp
        add(1, 100.0 - k * TICK, 1.0 + k % 3)
        add(-1, 100.01 + k * TICK, 1.0 + k % 3)
    for _ in range(n_steps):
        t[0] += int(rng.integers(1, 3000))
        u = rng.random()
        bb, ba = best(1), best(-1)
        if u < 0.55 or bb is None or ba is None:  # passive add behind the top
            side = 1 if rng.random() < 0.5 else -1
            ref = bb if side > 0 else ba
            ref = ref if ref is not None else (ba - TICK if side > 0 else bb + TICK)
            px = round(ref - side * TICK * int(rng.integers(0, 5)), 2)
            if side > 0 and ba is not None:
                px = min(px, round(ba - TICK, 2))
            if side < 0 and bb is not None:
                px = max(px, round(bb + TICK, 2))
            add(side, px, float(rng.choice([0.5, 1.0, 2.0])))
        elif u < 0.8:  # cancel a resting order
            side = 1 if rng.random() < 0.5 else -1
            if len(book[side]) > 3:
                oid = list(book[side])[int(rng.integers(0, len(book[side])))]
                book[side].pop(oid)
                emit("deleted", oid, side, 0.0, 0.0)
        else:  # a taker through 1-3 opposite levels, announced before its fills
            side = 1 if rng.random() < 0.5 else -1
            opp = -side
            levels = sorted({p for p, _ in book[opp].values()}, reverse=(opp > 0))
            if len(levels) < 4:
                continue
            depth = int(rng.integers(1, 4))
            limit = levels[depth - 1]
            want = sum(s for p, s in book[opp].values() if (p <= limit if side > 0 else p >= limit))
            size = round(want + float(rng.choice([-0.5, 0.0, 1.0])), 4)
            if size <= 0:
                continue
            taker = next_id[0]
            next_id[0] += 1
            emit("created", taker, side, limit, size)
            makers = sorted(((p, oid) for oid, (p, _) in book[opp].items()
                             if (p <= limit if side > 0 else p >= limit)),
                            key=lambda x: x[0] * side)  # fmt: skip
            plan, left = [], size
            for _p, oid in makers:  # price-time priority: fill plan of the taker
                if left <= 1e-9:
                    break
                fill = min(book[opp][oid][1], left)
                left = round(left - fill, 4)
                plan.append((oid, fill))
            for k, (oid, fill) in enumerate(plan):
                mp, ms = book[opp][oid]
                trades.append((t[0], round(mp, 2), round(fill, 4), 0 if side > 0 else 1))
                full = fill >= ms - 1e-9
                if full:
                    book[opp].pop(oid)
                else:
                    book[opp][oid][1] = round(ms - fill, 4)
                if k == len(plan) - 1 and left > 1e-9:  # the remainder rests on the venue now
                    book[side][taker] = [limit, left]
                emit("deleted" if full else "changed", oid, opp, mp, 0.0 if full else book[opp][oid][1])
            if left > 1e-9:  # the venue reports the resting remainder's amount
                emit("changed", taker, side, limit, left)
            else:
                emit("deleted", taker, side, limit, 0.0)
    df = pl.DataFrame(rows, schema=["microtimestamp", "action", "id", "order_type", "price", "amount"],
                      orient="row")  # fmt: skip
    truth = {}
    for side in (1, -1):
        lv: dict[float, float] = {}
        for p, s in book[side].values():
            lv[round(p, 2)] = round(lv.get(round(p, 2), 0.0) + s, 4)
        truth[side] = lv
    trades_df = pl.DataFrame(trades, schema=["microtimestamp", "price", "amount", "type"], orient="row")
    return df, truth, np.array(tops), trades_df


@pytest.fixture(scope="module")
def venue(tmp_path_factory):
    df, truth, tops, trades = _venue_feed()
    d = tmp_path_factory.mktemp("venue")
    path = d / "btcusd-live-orders.csv"
    df.write_csv(path)
    trades.write_csv(d / "btcusd-trades.csv")
    return path, truth, tops


def _rebuild(path, policy):
    mapping = mapping_from_cli(MAP + [f"crossing_add={policy}"])
    td = read_ticks(path, mapping=mapping)
    fs, is_ = K.new_state(len(td.symbols), crossing_add=mapping.crossing_add)
    n = len(td.ticks)
    X = np.empty((n, K.N_FEATURES), np.float32)
    flags = np.empty(n, np.int32)
    c = np.zeros(N_REJECT_REASONS, np.int64)
    K.compute_batch(td.ticks, fs, is_, L3_FEATURE_SET.params_array(), X, flags, c)
    return td, fs, is_, X, flags, c


def test_aggressor_policy_rebuilds_the_venue_book_exactly_with_sane_spreads(venue):
    path, truth, tops = venue
    td, fs, is_, X, flags, c = _rebuild(path, "aggressor")
    assert td.rejected == {} and c[1:].sum() == 0  # every event accepted
    lv = book_levels(fs, is_, 0)
    got = {1: {p: round(s, 4) for p, s, _ in lv["bids"]}, -1: {p: round(s, 4) for p, s, _ in lv["asks"]}}
    assert got == truth
    a = anomaly_counts(is_)
    assert a["taker_add"] > 100 and a["taker_rested"] > 0
    for name in ("uncrossed_levels", "crossed_book", "locked_book", "orphan_order", "taker_dropped"):
        assert name not in a, name
    two_sided = (flags & FLAG_NO_BOOK) == 0
    assert two_sided.mean() > 0.99
    spread = X[two_sided, K.X_SPREAD]
    assert (spread > 0.0).all()  # never locked, never crossed
    # after every event, the spread is the venue's true spread
    bid, ask = tops[two_sided, 0], tops[two_sided, 1]
    true_spread = np.minimum(1e4 * (ask - bid) / (0.5 * (bid + ask)), 1000.0)
    bad = np.flatnonzero(np.abs(spread - true_spread) > 1e-3 * np.maximum(true_spread, 1.0))
    assert bad.size == 0, f"first wrong spread at two-sided event {bad[:1]}"


def test_uncross_policy_on_the_same_feed_shows_the_wiped_side(venue):
    # today's default rule on such a venue: what the issue saw on a real file
    path, _, _ = venue
    td, fs, is_, X, flags, c = _rebuild(path, "uncross")
    a = anomaly_counts(is_)
    assert a["uncrossed_levels"] > 100 and a["orphan_order"] > 100
    spread = X[(flags & FLAG_NO_BOOK) == 0, K.X_SPREAD]
    assert (spread == 0.0).mean() > 0.05 or spread.max() > 50.0


def test_replay_summary_records_the_policy_and_the_taker_anomalies(venue):
    from replay.run import ReplayOptions, run_inprocess

    path, _, _ = venue
    mapping = mapping_from_cli(MAP + ["crossing_add=aggressor"])
    opts = ReplayOptions(data=str(path), pin=None, publish="none", progress=False, backend="ort",
                         warmup_ticks=10, mapping=mapping)  # fmt: skip
    s = run_inprocess(opts).summary
    assert s["shape"] == "l3" and s["rejected"] == 0
    assert s["anomalies"]["taker_add"] > 100 and "uncrossed_levels" not in s["anomalies"]
    assert s["mapping_keys"]["crossing_add"] == "aggressor"
    assert "crossing_add=aggressor" in s["mapping"]


def test_l3_file_without_trades_reports_trade_features_unavailable_and_the_readme_merge_fixes_it(
    venue, capsys
):
    from replay.run import ReplayOptions, run_inprocess

    path, _, _ = venue

    def replay(p, extra=()):
        mapping = mapping_from_cli(MAP + ["crossing_add=aggressor", *extra])
        opts = ReplayOptions(data=str(p), pin=None, publish="none", progress=False, backend="ort",
                             warmup_ticks=10, mapping=mapping)  # fmt: skip
        return run_inprocess(opts)

    res = replay(path)
    trade_features = [n for n, need in L3_FEATURE_SET.requires.items() if need == "trades"]
    assert res.summary["unavailable_features"] == trade_features
    assert "no trade in" in capsys.readouterr().err
    # the README's recipe, as written there: the venue's trade file joins the L3 file by time
    book = pl.read_csv(path)
    trades = pl.read_csv(path.parent / "btcusd-trades.csv")
    trades = trades.select("microtimestamp", pl.lit("trade").alias("action"),
                           pl.lit(None, pl.Int64).alias("id"), pl.col("type").alias("order_type"),
                           "price", "amount")  # fmt: skip
    merged = path.parent / "btcusd-l3-with-trades.csv"
    pl.concat([book, trades]).sort("microtimestamp", maintain_order=True).write_csv(merged)
    res2 = replay(merged, ["kinds.trade=print"])
    assert res2.summary["unavailable_features"] == [] and res2.summary["rejected"] == 0
    assert "no trade in" not in capsys.readouterr().err
    assert res2.summary["anomalies"]["taker_add"] == res.summary["anomalies"]["taker_add"]
