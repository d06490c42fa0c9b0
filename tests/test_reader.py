"""Tests of the market file reader (replay.reader): normalisation and rejection counts."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.schema import KIND_QUOTE, KIND_TRADE, REJECT_NAMES, TICK_DTYPE
from replay.generator import default_data_path, generate_market, inject_bad_rows
from replay.reader import TickData, read_ticks

T0 = 1_794_839_400_000_000_000
FORMATS = ["parquet", "csv", "csv.gz"]
COLUMNS = {
    "ts_event_ns": pl.Int64,
    "ts_recv_ns": pl.Int64,
    "symbol": pl.String,
    "kind": pl.Int8,
    "bid_px": pl.Float64,
    "bid_sz": pl.Float64,
    "ask_px": pl.Float64,
    "ask_sz": pl.Float64,
    "price": pl.Float64,
    "size": pl.Float64,
    "side": pl.Int8,
}


def quote(ts, sym="ESZ6", bid=100.0, bsz=5.0, ask=100.25, asz=7.0, recv=None):
    return {"ts_event_ns": T0 + ts, "ts_recv_ns": T0 + (ts + 50 if recv is None else recv),
            "symbol": sym, "kind": KIND_QUOTE, "bid_px": bid, "bid_sz": bsz, "ask_px": ask,
            "ask_sz": asz, "price": None, "size": None, "side": 0}  # fmt: skip


def trade(ts, sym="ESZ6", price=100.25, size=2.0, side=1):
    return {"ts_event_ns": T0 + ts, "ts_recv_ns": T0 + ts + 50, "symbol": sym,
            "kind": KIND_TRADE, "bid_px": None, "bid_sz": None, "ask_px": None, "ask_sz": None,
            "price": price, "size": size, "side": side}  # fmt: skip


def frame(rows, schema=None) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema or COLUMNS, orient="row")


def write(df: pl.DataFrame, tmp_path: Path, fmt: str, name: str = "ticks") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        df.write_parquet(path)
    elif fmt == "csv":
        df.write_csv(path)
    else:
        path.write_bytes(gzip.compress(df.write_csv().encode()))
    return path


def read_rows(rows, tmp_path, fmt, **kw) -> TickData:
    return read_ticks(write(frame(rows), tmp_path, fmt), **kw)


# --------------------------------------------------------------------------- accepted rows
@pytest.mark.parametrize("fmt", FORMATS)
def test_accepted_rows_keep_file_order_and_exact_field_values(tmp_path, fmt):
    rows = [quote(10, "NQZ6", 25400.25, 3, 25400.5, 4), quote(20, "ESZ6", 6850.0, 300, 6850.25, 10),
            trade(30, "ESZ6", 6850.0, 12, -1), trade(30, "NQZ6", 25400.5, 1, 1),
            quote(30, "CLF7", 61.37, 20, 61.38, 21, recv=99)]  # fmt: skip
    td = read_rows(rows, tmp_path, fmt)
    assert td.ticks.dtype == TICK_DTYPE
    assert td.symbols == ["CLF7", "ESZ6", "NQZ6"]
    assert td.rows == 5 and td.rejected == {} and td.rejected_total == 0
    assert td.path.endswith(f"ticks.{fmt}")
    t = td.ticks
    np.testing.assert_array_equal(t["ts_event_ns"], T0 + np.array([10, 20, 30, 30, 30]))
    np.testing.assert_array_equal(t["ts_recv_ns"], T0 + np.array([60, 70, 80, 80, 99]))
    np.testing.assert_array_equal(t["instrument"], [2, 1, 1, 2, 0])
    np.testing.assert_array_equal(t["kind"], [1, 1, 2, 2, 1])
    np.testing.assert_array_equal(t["side"], [0, 0, -1, 1, 0])
    np.testing.assert_array_equal(t["bid_px"], [25400.25, 6850.0, 0, 0, 61.37])
    np.testing.assert_array_equal(t["bid_sz"], [3, 300, 0, 0, 20])
    np.testing.assert_array_equal(t["ask_px"], [25400.5, 6850.25, 0, 0, 61.38])
    np.testing.assert_array_equal(t["ask_sz"], [4, 10, 0, 0, 21])
    np.testing.assert_array_equal(t["price"], [0, 0, 6850.0, 25400.5, 0])
    np.testing.assert_array_equal(t["size"], [0, 0, 12, 1, 0])
    np.testing.assert_array_equal(t["order_id"], 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_generated_market_reads_back_exactly(tmp_path, fmt):
    df = generate_market(3_000, ("ESZ6", "CLF7"), seed=5)
    td = read_ticks(write(df, tmp_path, fmt))
    assert td.rows == 3_000 and td.rejected == {} and len(td.ticks) == 3_000
    for col in ("ts_event_ns", "ts_recv_ns", "bid_px", "ask_px", "bid_sz", "price", "size"):
        np.testing.assert_array_equal(td.ticks[col], df[col].fill_null(0).to_numpy())
    np.testing.assert_array_equal(
        np.array(td.symbols)[td.ticks["instrument"]], df["symbol"].to_numpy()
    )


def test_shipped_default_dataset_reads_without_rejections():
    td = read_ticks(default_data_path())
    assert td.rows == len(td.ticks) >= 200_000
    assert td.rejected == {}
    assert td.symbols == ["CLF7", "ESZ6", "NQZ6"]


# --------------------------------------------------------------------------- rejections
@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_prices_and_sizes_are_rejected_as_nonfinite(tmp_path, fmt):
    nan, inf = float("nan"), float("inf")
    rows = [quote(1), quote(2, bid=nan), quote(3, asz=inf), trade(4, price=-inf),
            trade(5, size=nan), quote(6)]  # fmt: skip
    td = read_rows(rows, tmp_path, fmt)
    assert td.rejected == {"nonfinite": 4}
    np.testing.assert_array_equal(td.ticks["ts_event_ns"] - T0, [1, 6])


@pytest.mark.parametrize("fmt", FORMATS)
def test_nonpositive_price_or_size_is_rejected_and_counted(tmp_path, fmt):
    rows = [quote(1, bid=0.0), quote(2, asz=-1.0), trade(3, size=0.0), trade(4, price=-5.0),
            trade(5), quote(6)]  # fmt: skip
    td = read_rows(rows, tmp_path, fmt)
    assert td.rejected == {"nonpositive": 4}
    assert len(td.ticks) == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_crossed_quote_row_is_rejected_and_counted_but_locked_quote_is_accepted(tmp_path, fmt):
    rows = [quote(1, bid=100.5, ask=100.25), quote(2, bid=100.25, ask=100.25), quote(3)]
    td = read_rows(rows, tmp_path, fmt)
    assert td.rejected == {"crossed": 1}
    np.testing.assert_array_equal(td.ticks["ts_event_ns"] - T0, [2, 3])


@pytest.mark.parametrize("fmt", FORMATS)
def test_backwards_time_is_judged_per_instrument_against_last_accepted_row(tmp_path, fmt):
    rows = [quote(10, "ESZ6"), quote(5, "NQZ6"),  # other instrument earlier: fine
            quote(9, "ESZ6"),  # backwards
            trade(10, "ESZ6"),  # equal time: fine
            quote(20, "ESZ6", bid=float("nan")),  # rejected, does not advance the clock
            quote(15, "ESZ6")]  # fmt: skip
    td = read_rows(rows, tmp_path, fmt)
    assert td.rejected == {"time_backwards": 1, "nonfinite": 1}
    np.testing.assert_array_equal(td.ticks["ts_event_ns"] - T0, [10, 5, 10, 15])


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_symbol_with_given_table_is_rejected_and_ids_follow_the_table(tmp_path, fmt):
    rows = [quote(1, "ESZ6"), quote(2, "CLF7"), quote(3, "NQZ6"), trade(4, "CLF7")]
    td = read_rows(rows, tmp_path, fmt, symbols=["NQZ6", "ESZ6"])
    assert td.symbols == ["NQZ6", "ESZ6"]
    assert td.rejected == {"unknown_instrument": 2}
    np.testing.assert_array_equal(td.ticks["instrument"], [1, 0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_required_fields_are_malformed_but_inapplicable_nulls_are_fine(tmp_path, fmt):
    rows = [quote(1, ask=None), trade(2, size=None), {**quote(3), "symbol": None},
            {**quote(4), "ts_event_ns": None}, {**trade(5), "kind": None},
            {**quote(6), "price": 1.0}, {**quote(7), "ts_recv_ns": None},
            {**trade(8), "side": None}]  # fmt: skip
    td = read_rows(rows, tmp_path, fmt)
    assert td.rejected == {"malformed": 5}
    t = td.ticks
    np.testing.assert_array_equal(t["ts_event_ns"] - T0, [6, 7, 8])
    assert t["price"][0] == 0.0  # a price on a quote is ignored
    assert t["ts_recv_ns"][1] == t["ts_event_ns"][1]  # null receive time -> event time
    assert t["side"][2] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_string_and_int_kinds_give_the_same_ticks(tmp_path, fmt):
    rows = [quote(1), trade(2), quote(3), trade(4)]
    as_int = read_rows(rows, tmp_path, fmt).ticks
    schema = {**COLUMNS, "kind": pl.String}
    named = [{**r, "kind": k} for r, k in zip(rows, ["quote", "TRADE", " Quote ", "trade"],
                                              strict=True)]  # fmt: skip
    td = read_ticks(write(frame(named, schema), tmp_path, fmt, "named"))
    assert td.rejected == {}
    np.testing.assert_array_equal(td.ticks, as_int)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_kind_string_is_malformed_and_unhandled_kind_is_bad_kind(tmp_path, fmt):
    schema = {**COLUMNS, "kind": pl.String}
    rows = [{**quote(1), "kind": "quote"}, {**quote(2), "kind": "snapshot"},
            {**quote(3), "kind": "book_add"}, {**quote(4), "kind": "7"},
            {**quote(5), "kind": "2"}]  # fmt: skip
    td = read_ticks(write(frame(rows, schema), tmp_path, fmt))
    # "2" is a trade without price/size: malformed too.
    assert td.rejected == {"malformed": 2, "bad_kind": 2}
    assert len(td.ticks) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_side_defaults_to_zero_and_missing_recv_time_to_event_time(tmp_path, fmt):
    df = frame([quote(1), trade(2, side=1)]).drop("side", "ts_recv_ns")
    td = read_ticks(write(df, tmp_path, fmt))
    assert td.rejected == {}
    np.testing.assert_array_equal(td.ticks["side"], [0, 0])
    np.testing.assert_array_equal(td.ticks["ts_recv_ns"], td.ticks["ts_event_ns"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_side_names_are_read_and_invalid_sides_are_malformed(tmp_path, fmt):
    schema = {**COLUMNS, "side": pl.String}
    rows = [{**trade(1), "side": "buy"}, {**trade(2), "side": "S"}, {**trade(3), "side": "-1"},
            {**trade(4), "side": "2"}, {**trade(5), "side": "up"}]  # fmt: skip
    td = read_ticks(write(frame(rows, schema), tmp_path, fmt))
    assert td.rejected == {"malformed": 2}
    np.testing.assert_array_equal(td.ticks["side"], [1, -1, -1])


def test_unparsable_csv_values_are_malformed_and_other_rows_survive(tmp_path):
    text = (
        "ts_event_ns,symbol,kind,bid_px,bid_sz,ask_px,ask_sz,price,size\n"
        f"{T0 + 1},ESZ6,quote,100,5,100.25,7,,\n"
        f"{T0 + 2}x,ESZ6,quote,100,5,100.25,7,,\n"  # bad timestamp
        f"{T0 + 3},ESZ6,quote,abc,5,100.25,7,,\n"  # bad price
        f"{T0 + 4},ESZ6,trade,,,,,100.25\n"  # short line: size missing
        f"{T0 + 5},ESZ6,trade,,,,,100.25,1e0\n"
        f"{T0 + 6},ESZ6,2,,,,,NaN,1\n"  # NaN parses: nonfinite, not malformed
    )
    path = tmp_path / "hand.csv"
    path.write_text(text)
    td = read_ticks(path)
    assert td.rows == 6
    assert td.rejected == {"malformed": 3, "nonfinite": 1}
    np.testing.assert_array_equal(td.ticks["ts_event_ns"] - T0, [1, 5])
    assert td.ticks["size"][1] == 1.0


def test_parquet_with_other_dtypes_is_normalised(tmp_path):
    base = frame([quote(1), trade(2, side=-1), quote(3)])
    df = base.with_columns(
        pl.col("kind").cast(pl.UInt8),
        pl.col("side").cast(pl.Float32),
        pl.col("symbol").cast(pl.Categorical),
        pl.col("bid_sz", "ask_sz", "size").cast(pl.Int32),
        pl.col("ts_event_ns").cast(pl.Datetime("ns")),
        pl.col("ts_recv_ns").cast(pl.Float64),
        order_id=pl.Series([2**64 - 1, 0, None], dtype=pl.UInt64),
    ).rename({"ts_event_ns": "TS_EVENT_NS"})
    path = tmp_path / "typed.parquet"
    df.write_parquet(path)
    td = read_ticks(path)
    assert td.rejected == {}
    ref = read_rows([quote(1), trade(2, side=-1), quote(3)], tmp_path, "parquet")
    for col in ("ts_event_ns", "kind", "side", "bid_sz", "size", "bid_px"):
        np.testing.assert_array_equal(td.ticks[col], ref.ticks[col])
    np.testing.assert_array_equal(td.ticks["order_id"], np.array([2**64 - 1, 0, 0], np.uint64))


def test_nan_float_timestamp_is_nonfinite(tmp_path):
    df = frame([quote(1), quote(2)]).with_columns(
        pl.Series("ts_event_ns", [float(T0 + 1), float("nan")])
    )
    path = write(df, tmp_path, "parquet")
    td = read_ticks(path)
    assert td.rejected == {"nonfinite": 1} and len(td.ticks) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_generated_bad_rows_are_counted_exactly_by_reason(tmp_path, fmt):
    clean = generate_market(20_000, seed=11)
    bad, counts = inject_bad_rows(clean, 0.02, seed=11)
    td = read_ticks(write(bad, tmp_path, fmt))
    assert td.rows == 20_000
    assert td.rejected == counts
    assert td.rejected_total == 400 and len(td.ticks) == 20_000 - 400
    # What survives is exactly the untouched rows, in order.
    untouched = pl.concat(
        [bad[c].eq_missing(clean[c]).to_frame() for c in clean.columns], how="horizontal"
    ).select(pl.all_horizontal(pl.all()))["ts_event_ns"]
    np.testing.assert_array_equal(
        td.ticks["ts_event_ns"], clean.filter(untouched)["ts_event_ns"].to_numpy()
    )


def test_trades_only_file_without_quote_columns_is_read(tmp_path):
    df = frame([trade(1), trade(2), quote(3)]).drop("bid_px", "bid_sz", "ask_px", "ask_sz")
    td = read_ticks(write(df, tmp_path, "parquet"))
    assert td.rejected == {"malformed": 1}  # the quote has no quote columns
    assert len(td.ticks) == 2


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.sampled_from(["ESZ6", "NQZ6", "X"]),
                  st.sampled_from([1, 2, 9]),
                  st.sampled_from([100.0, 99.0, 0.0, -1.0, float("nan"), float("inf"), None])),
        max_size=40,
    )  # fmt: skip
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_row_is_either_accepted_or_counted_once(tmp_path, rows):
    data = []
    for ts, sym, kind, px in rows:
        r = quote(ts, sym, bid=px) if kind != 2 else trade(ts, sym, price=px)
        data.append({**r, "kind": kind})
    td = read_rows(data, tmp_path, "parquet", symbols=["ESZ6", "NQZ6"])
    assert td.rows == len(rows)
    assert len(td.ticks) + td.rejected_total == len(rows)
    assert set(td.rejected) <= set(REJECT_NAMES[1:]) and all(td.rejected.values())
    ts = td.ticks["ts_event_ns"]
    for inst in (0, 1):
        assert (np.diff(ts[td.ticks["instrument"] == inst]) >= 0).all()


# --------------------------------------------------------------------------- file errors
def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_ticks(path)


@pytest.mark.parametrize("name", ["junk.parquet", "junk.csv.gz"])
def test_corrupt_file_raises_clear_value_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=rf"cannot read .*{name}.*corrupt"):
        read_ticks(path)


def test_empty_csv_raises_and_header_only_csv_gives_no_ticks(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_ticks(empty)
    header = tmp_path / "header.csv"
    header.write_text(",".join(COLUMNS) + "\n")
    td = read_ticks(header)
    assert td.rows == 0 and len(td.ticks) == 0 and td.symbols == []


def test_missing_required_columns_raise_listing_them_and_the_schema(tmp_path):
    path = write(frame([quote(1)]).drop("kind", "ts_event_ns"), tmp_path, "csv")
    with pytest.raises(ValueError) as err:
        read_ticks(path)
    msg = str(err.value)
    assert "ticks.csv" in msg and "'ts_event_ns'" in msg and "'kind'" in msg
    assert "expected columns" in msg


def test_incomplete_quote_columns_raise(tmp_path):
    path = write(frame([quote(1)]).drop("ask_sz"), tmp_path, "parquet")
    with pytest.raises(ValueError, match=r"incomplete quote columns: missing \['ask_sz'\]"):
        read_ticks(path)


def test_file_without_price_columns_raises(tmp_path):
    df = frame([quote(1)]).select("ts_event_ns", "symbol", "kind")
    with pytest.raises(ValueError, match="neither quote columns"):
        read_ticks(write(df, tmp_path, "parquet"))


def test_unknown_suffix_is_recognised_by_content(tmp_path):
    df = frame([quote(1), trade(2)])
    pq = tmp_path / "data.bin"
    df.write_parquet(pq)
    csv = tmp_path / "data.txt"
    df.write_csv(csv)
    assert len(read_ticks(pq).ticks) == len(read_ticks(csv).ticks) == 2


def test_symbol_table_with_duplicates_is_refused(tmp_path):
    path = write(frame([quote(1)]), tmp_path, "parquet")
    with pytest.raises(ValueError, match="duplicates"):
        read_ticks(path, symbols=["ESZ6", "ESZ6"])


def test_datetime_event_time_column_is_converted_to_epoch_ns(tmp_path):
    stamp = dt.datetime(2026, 11, 16, 14, 30, 0, 5)
    df = frame([quote(1)]).with_columns(pl.Series("ts_event_ns", [stamp], dtype=pl.Datetime("us")))
    td = read_ticks(write(df, tmp_path, "parquet"))
    assert td.ticks["ts_event_ns"][0] == int(stamp.replace(tzinfo=dt.UTC).timestamp()) * 10**9 + 5000
