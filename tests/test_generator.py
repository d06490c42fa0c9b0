"""Tests of the seeded market generator (replay.generator) and the shipped data set."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from engine.schema import KIND_QUOTE, KIND_TRADE
from replay.generator import (
    DEFAULT_EVENTS,
    DEFAULT_SEED,
    DEFAULT_START_NS,
    DEFAULT_SYMBOLS,
    MARKET_SCHEMA,
    MarketSimulator,
    default_data_path,
    generate_market,
    inject_bad_rows,
    instrument_spec,
    main,
    write_chunks,
    write_market,
)

N = 200_000


@pytest.fixture(scope="module")
def market() -> pl.DataFrame:
    return generate_market(N)


def _quotes(market: pl.DataFrame, symbol: str) -> pl.DataFrame:
    return market.filter((pl.col("symbol") == symbol) & (pl.col("kind") == KIND_QUOTE))


def test_same_arguments_give_identical_frames_and_other_seeds_differ():
    a = generate_market(5_000, ("ESZ6", "CLF7"), seed=7)
    b = generate_market(5_000, ("ESZ6", "CLF7"), seed=7)
    c = generate_market(5_000, ("ESZ6", "CLF7"), seed=8)
    assert a.equals(b)
    assert not a.equals(c)


def test_frame_has_the_normalised_schema_and_exact_length(market):
    assert market.schema == pl.Schema(MARKET_SCHEMA)
    assert market.height == N
    assert generate_market(0).height == 0
    assert generate_market(2, DEFAULT_SYMBOLS).height == 2


def test_every_instrument_trades_and_quotes_interleaved_in_time(market):
    counts = market.group_by("symbol", "kind").len()
    assert counts.height == 2 * len(DEFAULT_SYMBOLS)
    assert counts["len"].min() > 5_000
    # The opening snapshot is one quote per instrument, in the given order.
    assert market["symbol"][:3].to_list() == list(DEFAULT_SYMBOLS)
    assert (market["kind"][:3] == KIND_QUOTE).all()
    # Instruments alternate often: no single symbol owns a long stretch of rows.
    switches = (market["symbol"] != market["symbol"].shift(1)).sum()
    assert switches > N // 4


def test_event_times_never_go_backwards_and_receive_follows_event(market):
    ts = market["ts_event_ns"].to_numpy()
    recv = market["ts_recv_ns"].to_numpy()
    assert ts[0] > DEFAULT_START_NS
    assert (np.diff(ts) >= 0).all()
    latency = recv - ts
    assert latency.min() > 0
    assert np.median(latency) < 100_000  # small: tens of microseconds
    assert (np.diff(recv) >= 0).all()
    # Spacing is irregular, in whole nanoseconds, not on a coarse clock grid.
    gaps = np.diff(ts)
    assert len(np.unique(gaps % 1000)) > 900


def test_quotes_are_never_crossed_or_locked(market):
    q = market.filter(pl.col("kind") == KIND_QUOTE)
    assert (q["ask_px"] > q["bid_px"]).all()
    assert (q["bid_px"] > 0).all()


@pytest.mark.parametrize("symbol", DEFAULT_SYMBOLS)
def test_prices_lie_exactly_on_each_instruments_tick_grid(market, symbol):
    spec = instrument_spec(symbol)
    g = market.filter(pl.col("symbol") == symbol)
    for col in ("bid_px", "ask_px", "price"):
        px = g[col].drop_nulls().to_numpy()
        ticks = np.rint(px * spec.tick_den / spec.tick_num)
        # Exactly the float64 nearest the decimal price (61.37, not 61.370000000001).
        np.testing.assert_array_equal(px, ticks * spec.tick_num / spec.tick_den)


def test_fields_are_null_exactly_where_they_do_not_apply(market):
    q = market.filter(pl.col("kind") == KIND_QUOTE)
    t = market.filter(pl.col("kind") == KIND_TRADE)
    assert q.height + t.height == N
    for col in ("bid_px", "bid_sz", "ask_px", "ask_sz"):
        assert q[col].null_count() == 0 and t[col].null_count() == t.height
    for col in ("price", "size"):
        assert t[col].null_count() == 0 and q[col].null_count() == q.height
    assert (q["side"] == 0).all()
    assert t["side"].is_in([-1, 1]).all()
    sizes = pl.concat([q["bid_sz"], q["ask_sz"], t["size"]]).to_numpy()
    assert (sizes >= 1).all() and (sizes == np.floor(sizes)).all()


def test_trades_print_at_the_prior_quote_ask_when_bought_and_bid_when_sold(market):
    prev = market.with_columns(
        pl.col("bid_px", "ask_px").forward_fill().over("symbol")
    ).filter(pl.col("kind") == KIND_TRADE)
    buys = prev.filter(pl.col("side") == 1)
    sells = prev.filter(pl.col("side") == -1)
    assert (buys["price"] == buys["ask_px"]).all()
    assert (sells["price"] == sells["bid_px"]).all()
    assert buys.height > 1000 and sells.height > 1000


def test_spreads_vary_in_ticks_and_widen_beyond_one_tick_sometimes(market):
    spec = instrument_spec("ESZ6")
    q = _quotes(market, "ESZ6")
    spread = np.rint((q["ask_px"] - q["bid_px"]).to_numpy() / spec.tick_size).astype(int)
    share = np.bincount(spread, minlength=5) / len(spread)
    assert share[1] > 0.5  # mostly one tick
    assert share[2:].sum() > 0.05  # but wider spreads occur


@pytest.mark.parametrize("symbol", DEFAULT_SYMBOLS)
def test_size_imbalance_predicts_the_direction_of_the_next_mid_move(market, symbol):
    q = _quotes(market, symbol)
    bs, az = q["bid_sz"].to_numpy(), q["ask_sz"].to_numpy()
    mid = (q["bid_px"] + q["ask_px"]).to_numpy() / 2
    imb = (bs - az) / (bs + az)
    dm = np.diff(mid)
    moves = np.flatnonzero(dm != 0)
    nxt = np.searchsorted(moves, np.arange(len(dm)))  # next move at or after each quote
    ok = nxt < len(moves)
    direction = np.sign(dm[moves[nxt[ok]]])
    corr = np.corrcoef(imb[:-1][ok], direction)[0, 1]
    assert corr > 0.15, corr


def test_trade_arrivals_are_clustered(market):
    for symbol in DEFAULT_SYMBOLS:
        ts = market.filter((pl.col("symbol") == symbol) & (pl.col("kind") == KIND_TRADE))
        gaps = np.diff(ts["ts_event_ns"].to_numpy()).astype(float)
        cv = gaps.std() / gaps.mean()
        assert cv > 1.3, (symbol, cv)  # Poisson arrivals would give 1


def test_volatility_regimes_cluster_mid_moves_in_time(market):
    q = _quotes(market, "ESZ6").with_columns(
        mid=(pl.col("bid_px") + pl.col("ask_px")) / 2, w=pl.col("ts_event_ns") // 10_000_000_000
    )
    per_window = (
        q.group_by("w").agg(moves=(pl.col("mid").diff() != 0).sum()).sort("w")["moves"].to_numpy()
    )
    dispersion = per_window.var() / per_window.mean()
    lag1 = np.corrcoef(per_window[:-1], per_window[1:])[0, 1]
    assert dispersion > 5, dispersion  # Poisson: 1
    assert lag1 > 0.3, lag1


def test_bad_fraction_corrupts_the_counted_number_of_rows():
    clean = generate_market(20_000, seed=3)
    bad, counts = inject_bad_rows(clean, 0.02, seed=3)
    assert bad.equals(generate_market(20_000, seed=3, bad_fraction=0.02))
    assert sum(counts.values()) == 400
    assert set(counts) == {"nonfinite", "nonpositive", "crossed", "time_backwards"}
    changed = ~pl.concat(
        [bad[c].eq_missing(clean[c]).to_frame() for c in clean.columns], how="horizontal"
    ).select(pl.all_horizontal(pl.all()))["ts_event_ns"]
    assert changed.sum() == 400
    assert inject_bad_rows(clean, 0.0)[0].equals(clean)


def test_unknown_symbols_get_a_stable_generic_spec():
    es = instrument_spec("ESZ6")
    assert (es.tick_num, es.tick_den) == (1, 4)
    assert instrument_spec("CLF7").tick_size == 0.01
    xyz = instrument_spec("XYZ")
    assert xyz == instrument_spec("XYZ") and xyz.tick_size == 0.01
    assert 2_000 <= xyz.start_ticks < 50_000
    df = generate_market(3_000, ("XYZ", "ABCH7"), seed=2)
    assert sorted(df["symbol"].unique().to_list()) == ["ABCH7", "XYZ"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_events": -1},
        {"n_events": 10, "symbols": ()},
        {"n_events": 10, "symbols": ("ESZ6", "ESZ6")},
        {"n_events": 10, "seed": -1},
        {"n_events": 10, "bad_fraction": 1.5},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        generate_market(**kwargs)


def test_single_string_as_symbols_is_refused():
    with pytest.raises(TypeError):
        generate_market(10, "ESZ6")


def test_write_market_and_cli_write_what_generate_market_returns(tmp_path):
    out = write_market(tmp_path / "sub" / "m.parquet", 3_000, ("ESZ6", "ABC"), 4)
    expected = generate_market(3_000, ("ESZ6", "ABC"), 4)
    assert pl.read_parquet(out).equals(expected)
    cli_out = tmp_path / "cli.parquet"
    argv = ["--out", str(cli_out), "--events", "3000", "--symbols", "ESZ6,ABC", "--seed", "4"]
    assert main(argv) == 0
    assert pl.read_parquet(cli_out).equals(expected)


@pytest.mark.parametrize("chunk", [1, 2, 3, 97, 1000])
def test_a_market_made_chunk_by_chunk_has_exactly_the_rows_of_one_call(chunk):
    syms, n = ("ESZ6", "CLF7", "ABC"), 6_000
    sim, parts, got, overflows = MarketSimulator(syms, 8), [], 0, 0
    first = True
    while got < n:  # the first chunk holds the opening quotes
        k = min(max(chunk, len(syms)) if first else chunk, n - got)
        f = sim.next_chunk(k, final=got + k >= n)
        overflows += f.height == k + 1  # a trade ended the chunk: its quote came with it
        parts.append(f)
        got += f.height
        first = False
    assert got == n
    assert pl.concat(parts).equals(generate_market(n, syms, 8))
    if chunk <= 3:
        assert overflows > 0  # the case that needs the extra row was exercised


def test_first_chunk_must_hold_the_opening_quotes():
    with pytest.raises(ValueError, match="opening quote of every instrument"):
        MarketSimulator(("A", "B", "C"), 1).next_chunk(2)
    short = MarketSimulator(("A", "B", "C"), 1).next_chunk(2, final=True)
    assert short.equals(generate_market(2, ("A", "B", "C"), 1))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".csv.gz"])
def test_write_market_in_chunks_writes_the_same_rows_with_progress(tmp_path, suffix):
    out, seen = tmp_path / f"m{suffix}", []
    write_market(out, 5_000, ("ESZ6", "NQZ6"), 3, chunk_rows=700, progress=seen.append)
    expected = generate_market(5_000, ("ESZ6", "NQZ6"), 3)
    got = pl.read_parquet(out) if suffix == ".parquet" else pl.read_csv(out, schema=expected.schema)
    assert got.equals(expected)
    assert len(seen) >= 7 and seen == sorted(seen) and seen[-1] == 5_000
    assert not list(tmp_path.glob("*.part"))


def test_an_interrupted_write_leaves_no_file(tmp_path):
    out = tmp_path / "m.csv"
    sim = MarketSimulator(("ESZ6",), 1)

    def next_chunk(k, final):
        if sim.sim_f[0] > 0:  # the second chunk fails, as a full disk or Ctrl-C would
            raise OSError("no space left on device")
        return sim.next_chunk(k, final)

    with pytest.raises(OSError, match="no space"):
        write_chunks(out, 3_000, 1_000, next_chunk)
    assert list(tmp_path.iterdir()) == []


def test_shipped_default_dataset_is_exactly_what_default_arguments_regenerate():
    path = default_data_path()
    assert path.name == "market.parquet" and path.parent.name == "default"
    shipped = pl.read_parquet(path)
    assert shipped.height == DEFAULT_EVENTS >= 200_000
    assert sorted(shipped["symbol"].unique().to_list()) == sorted(DEFAULT_SYMBOLS)
    assert path.stat().st_size < 8_000_000
    regenerated = generate_market(DEFAULT_EVENTS, DEFAULT_SYMBOLS, DEFAULT_SEED)
    assert shipped.schema == regenerated.schema
    assert shipped.equals(regenerated)
