"""First contact: what a new user with a vendor file meets, and the message that says what to fix."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import zmq

from engine.cli import main
from replay.latency import percentile_curve, write_hgrm

T0_US = 1_733_000_000_000_000
L3_MAP = ("shape=l3,symbol==X,ts_event=microtimestamp,kind=action,order_id=id,side=order_type,"
          "price=price,size=amount,sides.0=buy,sides.1=sell")  # fmt: skip


def _l3_vendor_file(path, n=3000):
    rows = [(T0_US + i * 1000, ["created", "deleted", "changed"][i % 3], 1000 + i, i % 2,
             100.0 + (i % 5) * 0.01, 1.0) for i in range(n)]  # fmt: skip
    pl.DataFrame(rows, schema=["microtimestamp", "action", "id", "order_type", "price", "amount"],
                 orient="row").write_csv(path)  # fmt: skip
    return path


def _trades_file(path, n=500, same_every=0):
    ts = [T0_US + (i // 2 if same_every else i) * 1000 for i in range(n)]
    df = pl.DataFrame({"time": ts, "price": [100.0 + (i % 7) * 0.5 for i in range(n)],
                       "qty": [1.0] * n, "side": ["buy" if i % 2 else "sell" for i in range(n)]})  # fmt: skip
    df.write_csv(path)
    return path


def _replay(capsys, *args):
    rc = main(["replay", "--no-progress", "--publish", "none", "--pin", "none", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_a_run_whose_every_row_is_rejected_exits_2_and_names_the_unmapped_codes(tmp_path, capsys):
    data = _l3_vendor_file(tmp_path / "l3.csv")
    rc, out, err = _replay(capsys, "--data", str(data), "--map", L3_MAP, "--out", str(tmp_path / "run"))
    assert rc == 2
    assert "all 3,000 rows of" in err and "malformed 3,000" in err
    assert "column 'action' (kind) has values that no kinds.X maps:" in err
    assert "'created' (1,000), 'deleted' (1,000), 'changed' (1,000)" in err
    assert "p50" not in out  # no empty latency table
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["scores"] == 0 and s["rejected"] == 3000
    assert not (tmp_path / "run" / "latency.png").exists()


def test_mostly_rejected_run_warns_with_the_reasons(tmp_path, capsys):
    data = _l3_vendor_file(tmp_path / "l3.csv")
    # creates and changes mapped, deletes not: a third malformed, the rest fine
    rc, out, err = _replay(capsys, "--data", str(data), "--map", L3_MAP + ",kinds.created=add")
    assert rc == 0
    assert "rows rejected" in err and "'deleted' (1,000)" in err


def test_a_wrong_time_zone_is_one_line_naming_the_key_and_a_valid_name(tmp_path, capsys):
    data = _trades_file(tmp_path / "t.csv")
    rc, _, err = _replay(capsys, "--data", str(data), "--shape", "trades",
                         "--map", "ts_event=time,size=qty,ts_tz=Chicago")  # fmt: skip
    assert rc == 2
    assert "ts_tz = 'Chicago' is not a time zone name" in err and "America/Chicago" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_incomplete_field_group_names_the_field_that_is_missing(tmp_path, capsys):
    data = _trades_file(tmp_path / "t.csv")
    rc, _, err = _replay(capsys, "--data", str(data), "--shape", "trades",
                         "--map", "ts_event=time,price=price")  # fmt: skip
    assert rc == 2
    assert "trade field(s) ['size'] not mapped (mapped: ['price'])" in err


def test_features_leaves_no_parquet_behind_when_it_fails(tmp_path, capsys):
    good = _trades_file(tmp_path / "t.csv", n=200_000)
    data = tmp_path / "t.csv.gz"
    blob = gzip.compress(good.read_bytes())
    data.write_bytes(blob[: len(blob) // 2])  # corrupt part-way
    out = tmp_path / "f.parquet"
    rc = main(["features", "--data", str(data), "--shape", "trades", "--map", "ts_event=time,size=qty",
               "--out", str(out), "--no-progress", "--chunk-rows", "20000"])  # fmt: skip
    assert rc == 2
    assert not out.exists() and list(tmp_path.glob("*.parquet*")) == []
    rc = main(["features", "--data", str(good), "--shape", "trades", "--map", "ts_event=time,size=qty",
               "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0 and out.exists()
    import pyarrow.parquet as pq

    meta = pq.read_schema(out).metadata
    assert meta[b"tickscore.feature_set_id"].startswith(b"trades.v1.")


def test_limit_counts_rejects_only_over_the_rows_replayed(tmp_path):
    from replay.mapping import mapping_from_cli
    from replay.run import ReplayOptions, run_inprocess

    n = 5000
    df = pl.DataFrame({"time": [T0_US + i * 1000 for i in range(n)],
                       "price": [100.0] * 100 + [-1.0] * (n - 100), "qty": [1.0] * n})  # fmt: skip
    data = tmp_path / "t.csv"
    df.write_csv(data)
    opts = ReplayOptions(data=str(data), pin=None, publish="none", progress=False, backend="ort",
                         warmup_ticks=10, limit=150, shape="trades",
                         mapping=mapping_from_cli(["ts_event=time,size=qty"], shape="trades"))  # fmt: skip
    s = run_inprocess(opts).summary
    assert s["ticks"] == 150 and s["scores"] == 100 and s["rejected"] == 50
    assert s["data"]["rows"] == 150


def test_a_warmup_longer_than_the_run_warns_and_adapts(tmp_path, capsys):
    rc, out, err = _replay(capsys, "--limit", "284", "--json")
    assert rc == 0
    s = json.loads(out)
    assert s["warmup_ticks_excluded"] == 28 and s["latency_count"] == 284 - 28
    assert "warm-up of 1,000 ticks is more than half" in err


def test_same_timestamps_are_counted_for_trade_files_too(tmp_path, capsys):
    data = _trades_file(tmp_path / "t.csv", n=400, same_every=2)
    rc, out, err = _replay(capsys, "--data", str(data), "--shape", "trades",
                           "--map", "ts_event=time,size=qty", "--json")  # fmt: skip
    assert rc == 0, err
    s = json.loads(out)
    assert s["anomalies"]["same_ts"] == 200


def test_summary_records_every_mapping_key_applied(tmp_path, capsys):
    data = _trades_file(tmp_path / "t.csv")
    rc, out, err = _replay(capsys, "--data", str(data), "--shape", "trades",
                           "--map", "ts_event=time,size=qty,ts_tz=America/Chicago", "--json")  # fmt: skip
    assert rc == 0, err
    keys = json.loads(out)["mapping_keys"]
    assert keys["ts_tz"] == "America/Chicago" and keys["size"] == "qty" and keys["ts_event"] == "time"


def test_publish_detects_a_trade_file_as_replay_does_and_names_itself(tmp_path):
    data = _trades_file(tmp_path / "BTCUSDT-trades.csv")
    run = subprocess.run(
        [sys.executable, "-m", "engine.cli", "publish", "ipc:///tmp/tickscore-test-nobody.ipc",
         "--data", str(data), "--map", "ts_event=time,size=qty", "--control", "", "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2  # (no service there)
    assert "tickscore publish:" in run.stderr and "a 'trades' file" in run.stderr
    assert "replay --via" not in run.stderr and "Traceback" not in run.stderr


def test_replay_refuses_an_ipc_path_a_live_process_serves_and_takes_a_stale_one(tmp_path, capsys):
    path = tmp_path / "scores.ipc"
    ctx = zmq.Context()
    live = ctx.socket(zmq.PUB)
    live.bind(f"ipc://{path}")
    try:
        rc, _, err = _replay(capsys, "--limit", "2000", "--publish", f"ipc://{path}")
        assert rc == 2 and "is served by a running process" in err
    finally:
        live.close(0)
        ctx.term()
    stale = tmp_path / "stale.ipc"  # a socket file nobody listens on (a killed process's)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    rc, _, err = _replay(capsys, "--limit", "2000", "--publish", f"ipc://{stale}")
    assert rc == 0, err


def test_replay_and_serve_default_score_endpoints_differ():
    from engine.config import DEFAULT_SCORE_ENDPOINT
    from engine.zmq_io import DEFAULT_PUBLISH_ENDPOINT

    assert DEFAULT_PUBLISH_ENDPOINT != DEFAULT_SCORE_ENDPOINT


def test_hgrm_footer_is_in_one_unit(tmp_path):
    v = np.array([1000, 2000, 3000, 500_000], dtype=np.int64)
    text = write_hgrm(v, tmp_path / "x.hgrm").read_text()
    line = next(x for x in text.splitlines() if x.startswith("#[Mean"))
    mean = float(line.split("=")[1].split(",")[0])
    std = float(line.split("=")[2].rstrip("]"))
    assert mean == pytest.approx(126.5, rel=1e-2) and std == pytest.approx(np.std(v) / 1000, rel=1e-2)


@pytest.mark.parametrize("n", [284, 249_000, 3_000_000])
def test_percentile_curve_ends_at_the_max(n):
    v = np.arange(n, dtype=np.int64) * 10
    v[n // 3] = 99_999_999  # the max somewhere in the middle of the run
    x, y = percentile_curve(v, 6)
    assert y[-1] == 99_999_999 / 1000 and x[-1] >= n - 1
    x, y = percentile_curve(v, 6, max_ns=123_456_789)  # a window of a longer run
    assert y[-1] == 123_456_789 / 1000


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("tickscore ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "%%" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "p50 / p99 / p99.9" in capsys.readouterr().out  # the description is whole
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "picks the format" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_generate_writes_the_format_its_suffix_names(tmp_path, capsys, suffix):
    from replay.reader import read_ticks

    out = tmp_path / f"m{suffix}"
    assert main(["generate", "--out", str(out), "--events", "500"]) == 0
    head = out.read_bytes()[:4]
    if suffix == ".parquet":
        assert head == b"PAR1"
    elif suffix == ".csv.gz":
        assert head[:2] == b"\x1f\x8b"
    else:
        assert head == b"ts_e"
    assert len(read_ticks(out).ticks) == 500
    assert main(["generate", "--out", str(tmp_path / "m.txt"), "--events", "10"]) == 2


@pytest.mark.parametrize("shape", ["trades", "l3"])
def test_generate_writes_every_shape_and_replay_detects_it(tmp_path, capsys, shape):
    from replay.reader import read_ticks
    from replay.reader.read import resolve_shape

    out = tmp_path / f"{shape}.csv.gz"
    assert main(["generate", "--shape", shape, "--out", str(out), "--events", "3000", "--seed", "4"]) == 0
    assert f"3,000 {shape} events" in capsys.readouterr().out
    assert resolve_shape(out) == shape
    assert len(read_ticks(out, shape=shape).ticks) >= 3000  # an L3 market order in progress finishes
    # 0 events: a file with the shape's columns and no rows, in each format
    for suffix in (".csv", ".parquet"):
        empty = tmp_path / f"empty-{shape}{suffix}"
        assert main(["generate", "--shape", shape, "--out", str(empty), "--events", "0"]) == 0
        cols = (pl.read_csv(empty) if suffix == ".csv" else pl.read_parquet(empty)).columns
        assert "ts_event_ns" in cols and "price" in cols
    capsys.readouterr()
    for bad, says in ((["--out", str(tmp_path / "m.txt")], "unknown output format"),
                      (["--out", str(out), "--events", "-1"], "n_events must be >= 0"),
                      (["--out", str(out), "--seed", "-1"], "seed must be in"),
                      (["--out", str(out), "--symbols", "A,A"], "symbols must be unique")):
        assert main(["generate", "--shape", shape, "--events", "10", *bad]) == 2
        assert says in capsys.readouterr().err
