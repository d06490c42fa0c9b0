"""Column mapping (replay.mapping) through the reader: units, price encodings, codes, presets."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.schema import KIND_BOOK_ADD, KIND_BOOK_DELETE, KIND_BOOK_MODIFY, KIND_QUOTE, KIND_TRADE
from replay.mapping import build_mapping, load_map_file, mapping_from_cli, parse_map_args
from replay.reader import iter_tick_chunks, read_ticks

EPOCH_S = 1_700_000_000  # 2023-11-14T22:13:20Z


def write(df: pl.DataFrame, tmp_path: Path, fmt: str, name: str = "vendor", header: bool = True) -> Path:
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        df.write_parquet(path)
    elif fmt == "csv":
        df.write_csv(path, include_header=header)
    else:
        path.write_bytes(gzip.compress(df.write_csv(include_header=header).encode()))
    return path


def trades(**cols) -> pl.DataFrame:
    base = {"Price": [100.5, 100.25], "Qty": [1.0, 2.0]}
    base.update(cols)
    return pl.DataFrame(base)


def read(path, *items, shape="trades", **kw):
    return read_ticks(path, mapping=mapping_from_cli(list(items), shape=shape), **kw)


# --------------------------------------------------------------------------- timestamps
@pytest.mark.parametrize("fmt", ["parquet", "csv", "csv.gz"])
@pytest.mark.parametrize(("unit", "scale"), [("ns", 10**9), ("us", 10**6), ("ms", 10**3), ("s", 1)])
def test_integer_epoch_timestamps_in_each_unit_give_ns(tmp_path, fmt, unit, scale):
    df = trades(T=[EPOCH_S * scale, EPOCH_S * scale + 7])
    p = write(df, tmp_path, fmt)
    want = [EPOCH_S * 10**9, EPOCH_S * 10**9 + 7 * (10**9 // scale)]
    for u in (unit, "auto"):  # explicit unit and magnitude detection agree
        td = read(p, f"ts_event=T,price=Price,size=Qty,symbol==BTCUSDT,ts_unit={u}")
        assert td.rejected == {}
        np.testing.assert_array_equal(td.ticks["ts_event_ns"], want)
        assert td.symbols == ["BTCUSDT"]


@pytest.mark.parametrize("fmt", ["csv", "csv.gz"])
def test_decimal_second_and_millisecond_text_converts_exactly(tmp_path, fmt):
    df = trades(T=["1585180700.064712345", "1585180700.5"], R=["1585180700064.7123", "1585180700500"])
    td = read(write(df, tmp_path, fmt), "ts_event=T,ts_recv=R,ts_recv_unit=ms,price=Price,size=Qty")
    np.testing.assert_array_equal(td.ticks["ts_event_ns"], [1585180700064712345, 1585180700500000000])
    np.testing.assert_array_equal(td.ticks["ts_recv_ns"], [1585180700064712300, 1585180700500000000])


def test_float_seconds_in_parquet_are_converted(tmp_path):
    df = trades(T=[1585180700.25, 1585180701.5])
    td = read(write(df, tmp_path, "parquet"), "ts_event=T,price=Price,size=Qty")
    np.testing.assert_array_equal(td.ticks["ts_event_ns"], [1585180700250000000, 1585180701500000000])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_iso_datetime_strings_with_zone_and_naive_with_ts_tz(tmp_path, fmt):
    df = trades(T=["2023-01-02T03:04:05.123456789Z", "2023-01-02T04:04:05+01:00"],
                N=["2023-01-02 09:30:00.5", "2023-01-02 09:30:01"])  # fmt: skip
    p = write(df, tmp_path, fmt)
    td = read(p, "ts_event=T,price=Price,size=Qty,ts_unit=datetime")
    t0 = int(dt.datetime(2023, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp()) * 10**9
    np.testing.assert_array_equal(td.ticks["ts_event_ns"], [t0 + 123456789, t0])
    td = read(p, "ts_event=N,price=Price,size=Qty,ts_tz=America/New_York")
    t1 = int(dt.datetime(2023, 1, 2, 14, 30, tzinfo=dt.UTC).timestamp()) * 10**9
    np.testing.assert_array_equal(td.ticks["ts_event_ns"], [t1 + 500_000_000, t1 + 10**9])


def test_parquet_timestamp_column_is_used_as_is(tmp_path):
    stamp = dt.datetime(2024, 5, 6, 7, 8, 9, 10)
    df = trades(T=[stamp, stamp]).with_columns(pl.col("T").cast(pl.Datetime("us", "UTC")))
    td = read(write(df, tmp_path, "parquet"), "ts_event=T,price=Price,size=Qty")
    assert td.ticks["ts_event_ns"][0] == int(stamp.replace(tzinfo=dt.UTC).timestamp()) * 10**9 + 10_000


def test_times_of_day_with_ts_date_in_exchange_time_zone(tmp_path):
    df = trades(T=["34200.004241176", "34200.5"], S=["09:30:00.004241176", "09:30:00.5"])
    p = write(df, tmp_path, "csv")
    base = int(dt.datetime(2012, 6, 21, 13, 30, tzinfo=dt.UTC).timestamp()) * 10**9  # 09:30 EDT
    want = [base + 4241176, base + 500_000_000]
    common = "price=Price,size=Qty,ts_date=2012-06-21,ts_tz=America/New_York"
    np.testing.assert_array_equal(read(p, f"ts_event=T,{common}").ticks["ts_event_ns"], want)
    np.testing.assert_array_equal(read(p, f"ts_event=S,{common}").ticks["ts_event_ns"], want)


def test_unparsable_and_nan_timestamps_are_counted(tmp_path):
    df = trades(T=["1700000000000", "soon"]).vstack(trades(T=["nan", "1700000000001"]))
    td = read(write(df, tmp_path, "csv"), "ts_event=T,price=Price,size=Qty,ts_unit=ms")
    assert td.rejected == {"malformed": 1, "nonfinite": 1}
    assert len(td.ticks) == 2


def test_unknowable_unit_raises_asking_for_ts_unit(tmp_path):
    p = write(trades(T=[12, 13]), tmp_path, "csv")
    with pytest.raises(ValueError, match="ts_unit"):
        read(p, "ts_event=T,price=Price,size=Qty")


# --------------------------------------------------------------------------- prices and sizes
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_scaled_integer_prices_are_exact_decimals(tmp_path, fmt):
    df = pl.DataFrame({"T": [1, 2], "P": [5859400, 1234567], "Q": [100, 250]})
    td = read(write(df, tmp_path, fmt), "ts_event=T,ts_unit=s,price=P,size=Q,price_scale=0.0001")
    assert td.ticks["price"].tolist() == [585.94, 123.4567]
    td = read(
        write(df, tmp_path, fmt), "ts_event=T,ts_unit=s,price=P,size=Q,price_scale=1/10000,size_scale=0.01"
    )
    assert td.ticks["price"].tolist() == [585.94, 123.4567] and td.ticks["size"].tolist() == [1.0, 2.5]


def test_price_int_scale_applies_to_integers_only(tmp_path):
    df = pl.DataFrame({"T": [1, 2, 3], "P": ["4500250000000", "4500.250000000", "4500.5"], "Q": [1, 1, 1]})
    td = read(write(df, tmp_path, "csv"), "ts_event=T,ts_unit=s,price=P,size=Q,price_int_scale=1e-9")
    assert td.ticks["price"].tolist() == [4500.25, 4500.25, 4500.5]


def test_float_and_decimal_text_prices_are_read_as_is(tmp_path):
    df = pl.DataFrame({"T": [1, 2], "P": ["61.37", " 0.000012 "], "Q": ["0.5", "1e3"]})
    td = read(write(df, tmp_path, "csv"), "ts_event=T,ts_unit=s,price=P,size=Q")
    assert td.ticks["price"].tolist() == [61.37, 0.000012] and td.ticks["size"].tolist() == [0.5, 1000.0]


# --------------------------------------------------------------------------- codes, constants, layout
def test_boolean_maker_flag_maps_to_aggressor_side(tmp_path):
    df = trades(T=[1700000000000, 1700000000001], M=[True, False])
    td = read(write(df, tmp_path, "parquet"), "ts_event=T,price=Price,size=Qty,side=M",
              "sides.true=sell,sides.false=buy")  # fmt: skip
    assert td.ticks["side"].tolist() == [-1, 1]


def test_trade_side_resting_negates_the_file_side(tmp_path):
    df = trades(T=[1, 2], S=["buy", "sell"])
    td = read(
        write(df, tmp_path, "csv"), "ts_event=T,ts_unit=s,price=Price,size=Qty,side=S,trade_side=resting"
    )
    assert td.ticks["side"].tolist() == [-1, 1]


def test_headerless_file_symbol_from_file_name_and_separator(tmp_path):
    p = tmp_path / "ethusdt-trades.csv"
    p.write_text("1700000000000;2000.5;0.1\n1700000000001;2000.75;0.2\n")
    td = read(p, "header=false,separator=semicolon,ts_event=column_1,price=column_2,size=column_3")
    assert td.symbols == ["ethusdt-trades"] and len(td.ticks) == 2
    chunks = iter_tick_chunks(
        p,
        1,
        mapping=mapping_from_cli(
            ["header=false,separator=semicolon,ts_event=column_1,price=column_2,size=column_3"],
            shape="trades",
        ),
    )
    np.testing.assert_array_equal(np.concatenate([c.ticks for c in chunks]), td.ticks)


def test_coalesced_columns_and_hashed_string_order_ids(tmp_path):
    df = pl.DataFrame({
        "time": [1, 2, 3, 4], "type": ["open", "open", "match", "done"],
        "order_id": ["0a1b-uuid", "77c2-uuid", None, "0a1b-uuid"],
        "maker_order_id": [None, None, "77c2-uuid", None],
        "side": ["buy", "sell", "sell", "buy"], "price": ["100", "101", "101", None],
        "size": [None, None, "0.5", None], "remaining_size": ["2", "1", None, "2"],
    })  # fmt: skip
    m = ["ts_event=time,ts_unit=s,kind=type,order_id=order_id|maker_order_id,size=size|remaining_size",
         "kinds.open=add,kinds.match=fill,kinds.done=delete,trade_side=resting,symbol==BTC-USD"]  # fmt: skip
    td = read(write(df, tmp_path, "csv"), *m, shape="l3")
    t = td.ticks
    assert td.rejected == {}
    assert t["kind"].tolist() == [KIND_BOOK_ADD, KIND_BOOK_ADD, KIND_TRADE, KIND_BOOK_DELETE]
    assert t["order_id"][0] == t["order_id"][3] != t["order_id"][1] == t["order_id"][2] != 0
    assert t["side"][2] == 1  # maker sold: buyer-initiated
    assert t["size"].tolist() == [2.0, 1.0, 0.5, 2.0]


def test_skip_print_and_clear_kinds(tmp_path):
    df = pl.DataFrame({"t": [1, 2, 3, 4], "a": ["A", "T", "F", "R"], "id": [5, 9, 5, 0],
                       "s": ["B", "A", "A", "N"], "p": [100.0, 100.0, 100.0, None],
                       "q": [1.0, 1.0, 1.0, None]})  # fmt: skip
    m = ("preset=databento-mbo,ts_event=t,ts_recv=t,ts_unit=ns,kind=a,order_id=id,"
         "side=s,price=p,size=q,symbol==ESZ6")  # fmt: skip
    td = read(write(df, tmp_path, "csv"), m, shape=None)
    assert td.shape == "l3" and td.anomalies == {"skipped": 1}
    t = td.ticks
    assert t["kind"].tolist() == [KIND_BOOK_ADD, KIND_TRADE, KIND_BOOK_DELETE]
    assert t["order_id"].tolist() == [5, 0, 0]  # a print drops its id; a clear has id 0
    assert t["side"].tolist() == [1, -1, 0]


def test_l3_rows_missing_their_fields_are_malformed(tmp_path):
    df = pl.DataFrame({"t": [1, 2, 3, 4], "k": ["add", "add", "modify", "delete"],
                       "id": [1, None, None, 4], "s": ["b", "s", "b", "b"],
                       "p": [None, 1.0, 1.0, None], "q": [1.0, 1.0, 1.0, None]})  # fmt: skip
    td = read(
        write(df, tmp_path, "csv"),
        "ts_event=t,ts_unit=s,kind=k,order_id=id,side=s,price=p,size=q",
        shape="l3",
    )
    assert td.rejected == {"malformed": 3}
    assert td.ticks["kind"].tolist() == [KIND_BOOK_DELETE]


# --------------------------------------------------------------------------- presets, TOML, errors
def test_lobster_preset_reads_a_message_file(tmp_path):
    p = tmp_path / "AAPL_2012-06-21_34200000_57600000_message_10.csv"
    p.write_text(
        "34200.004241176,1,16113575,18,5853300,1\n"
        "34200.025552208,1,16120456,18,5859100,-1\n"
        "34200.201743198,3,16113575,18,5853300,1\n"
        "34200.201743198,2,16120456,6,5859100,-1\n"
        "34200.289000000,4,16120456,12,5859100,-1\n"
        "34200.300000000,7,0,0,-1,-1\n"
    )
    td = read_ticks(p, mapping=mapping_from_cli(["preset=lobster,ts_date=2012-06-21,symbol==AAPL"]))
    t = td.ticks
    assert td.shape == "l3" and td.symbols == ["AAPL"] and td.anomalies == {"skipped": 1}
    assert t["kind"].tolist() == [
        KIND_BOOK_ADD,
        KIND_BOOK_ADD,
        KIND_BOOK_DELETE,
        KIND_BOOK_DELETE,
        KIND_TRADE,
    ]
    assert t["price"].tolist() == [585.33, 585.91, 585.33, 585.91, 585.91]
    assert t["side"].tolist() == [1, -1, 1, -1, 1]  # execution of a sell limit order: buyer-initiated
    base = int(dt.datetime(2012, 6, 21, 13, 30, tzinfo=dt.UTC).timestamp()) * 10**9
    assert t["ts_event_ns"][0] == base + 4241176


# ------------------------------------------------------------------ L1 vendor layouts (README examples)
TARDIS_QUOTES = """exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount
binance-futures,BTCUSDT,1598918400045000,1598918400050363,2.159,11648.76,11648.75,7.389
binance-futures,BTCUSDT,1598918400046000,1598918400051223,2.159,11648.76,11648.75,7.512
binance-futures,BTCUSDT,1598918400049000,1598918400053000,1.1,11648.77,11648.76,0.512
"""


def test_tardis_quotes_layout_with_the_readme_mapping(tmp_path):
    p = tmp_path / "binance-futures_quotes_2020-09-01_BTCUSDT.csv.gz"
    p.write_bytes(gzip.compress(TARDIS_QUOTES.encode()))
    m = mapping_from_cli(["kind==quote,ts_event=timestamp,ts_recv=local_timestamp",
                          "bid_px=bid_price,bid_sz=bid_amount,ask_px=ask_price,ask_sz=ask_amount"])
    td = read_ticks(p, mapping=m)
    t = td.ticks
    assert td.shape == "l1" and td.symbols == ["BTCUSDT"] and not any(td.rejected.values())
    assert t["kind"].tolist() == [KIND_QUOTE] * 3
    assert t["ts_event_ns"].tolist() == [1598918400045000000, 1598918400046000000, 1598918400049000000]
    assert t["ts_recv_ns"][0] == 1598918400050363000
    assert t["bid_px"].tolist() == [11648.75, 11648.75, 11648.76] and t["ask_sz"][2] == 1.1


def test_binance_book_ticker_layout_with_the_readme_mapping(tmp_path):
    p = tmp_path / "BTCUSDT-bookTicker-2024-01-01.csv"
    p.write_text(
        "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,event_time\n"
        "4455906185541,42283.5,2.406,42283.6,13.564,1704067200003,1704067200007\n"
        "4455906186055,42283.5,2.406,42283.6,13.551,1704067200004,1704067200008\n"
    )
    m = mapping_from_cli(["kind==quote,symbol==BTCUSDT,ts_event=transaction_time,ts_recv=event_time",
                          "bid_px=best_bid_price,bid_sz=best_bid_qty,ask_px=best_ask_price,ask_sz=best_ask_qty"])
    t = read_ticks(p, mapping=m).ticks
    assert t["ts_event_ns"].tolist() == [1704067200003000000, 1704067200004000000]
    assert t["ask_px"].tolist() == [42283.6, 42283.6] and t["ask_sz"].tolist() == [13.564, 13.551]


def test_databento_mbp1_layout_trades_and_quotes_in_one_file(tmp_path):
    p = tmp_path / "glbx-mdp3-20240102.mbp-1.csv"
    head = ("ts_recv,ts_event,rtype,publisher_id,instrument_id,action,side,depth,price,size,flags,"
            "ts_in_delta,sequence,bid_px_00,ask_px_00,bid_sz_00,ask_sz_00,bid_ct_00,ask_ct_00,symbol\n")
    p.write_text(
        head
        + "1704186000403918695,1704186000402161763,1,1,5482,A,B,0,4786250000000,1,128,17214,3795,"
          "4786250000000,4786500000000,14,12,9,7,ESH4\n"
        + "1704186000404082931,1704186000403904127,1,1,5482,T,A,0,4786250000000,1,0,13564,3796,"
          "4786250000000,4786500000000,13,12,8,7,ESH4\n"
        + "1704186000404233817,1704186000404100911,1,1,5482,C,A,0,4786500000000,2,128,12711,3797,"
          "4786250000000,4786500000000,13,10,8,6,ESH4\n"
    )
    m = mapping_from_cli(["kind=action,kinds.T=trade,kinds.A=quote,kinds.C=quote,kinds.M=quote,kinds.R=skip",
                          "bid_px=bid_px_00,ask_px=ask_px_00,bid_sz=bid_sz_00,ask_sz=ask_sz_00,price_scale=1e-9"])
    td = read_ticks(p, mapping=m)
    t = td.ticks
    assert td.symbols == ["ESH4"] and not any(td.rejected.values())
    assert t["kind"].tolist() == [KIND_QUOTE, KIND_TRADE, KIND_QUOTE]
    # a trade row carries the trade; its book columns do not apply (zero), the next quote row has the book
    assert t["bid_px"].tolist() == [4786.25, 0.0, 4786.25] and t["ask_px"][0] == 4786.5
    assert t["price"][1] == 4786.25 and t["size"][1] == 1 and t["side"][1] == -1  # sell aggressor
    assert t["ts_event_ns"][0] == 1704186000402161763 and t["ts_recv_ns"][0] == 1704186000403918695


def test_toml_file_equals_flat_flags(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('preset = "databento-mbo"\nsymbol = "=ESZ6"\nsort = 1\n'.replace("sort = 1\n", "")
                 + '[kinds]\nF = "fill"\n[sides]\nN = "none"\n')  # fmt: skip
    a = build_mapping(load_map_file(f))
    b = mapping_from_cli(["preset=databento-mbo,symbol==ESZ6,kinds.F=fill,sides.N=none"])
    assert a == b
    assert a.kinds["f"] == KIND_TRADE and a.shape == "l3"


def test_flat_syntax_with_quotes_and_dotted_tables():
    spec = parse_map_args(["ts_event=time,ts_format='%Y-%m-%d %H:%M:%S',kinds.X=skip", "price=Px"])
    assert spec == {
        "ts_event": "time",
        "ts_format": "%Y-%m-%d %H:%M:%S",
        "kinds": {"X": "skip"},
        "price": "Px",
    }


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["bogus=1"], "unknown key 'bogus'"),
        (["kinds.A=explode"], "is not a kind"),
        (["sides.A=up"], "buy, sell or none"),
        (["ts_unit=weeks"], "ts_unit must be one of"),
        (["price_scale=-1"], "must be > 0"),
        (["preset=bloomberg"], "unknown preset"),
        (["ts_event"], "expected key=value"),
    ],
)
def test_bad_mapping_is_a_clear_error(items, match):
    with pytest.raises(ValueError, match=match):
        mapping_from_cli(items)


def test_mapped_column_missing_from_file_names_the_file_columns(tmp_path):
    p = write(trades(T=[1, 2]), tmp_path, "csv")
    with pytest.raises(ValueError, match=r"column 'Time' for ts_event not found.*'Price'"):
        read(p, "ts_event=Time,price=Price,size=Qty")


def test_no_mapping_keeps_the_normalised_schema_reader(tmp_path):
    df = pl.DataFrame({"ts_event_ns": [1, 2], "symbol": ["X", "X"], "kind": [2, 2],
                       "price": [1.0, 2.0], "size": [1.0, 1.0]})  # fmt: skip
    td = read_ticks(write(df, tmp_path, "csv"))
    assert len(td.ticks) == 2 and td.shape == "l1"
    assert read_ticks(
        write(df.with_columns(kind=pl.lit(KIND_BOOK_MODIFY)), tmp_path, "csv", "b")
    ).rejected == {"bad_kind": 2}
