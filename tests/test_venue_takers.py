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
from tests.venue_feed import venue_feed

MAP = [
    "shape=l3,symbol==BTCUSD,ts_event=microtimestamp,kind=action,order_id=id,side=order_type",
    "price=price,size=amount,kinds.created=add,kinds.changed=modify,kinds.deleted=delete",
    "sides.0=buy,sides.1=sell",
]


@pytest.fixture(scope="module")
def venue(tmp_path_factory):
    df, truth, tops, trades = venue_feed()
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
