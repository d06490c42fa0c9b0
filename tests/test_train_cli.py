"""`tickscore train` and `tickscore evaluate` on a small generated market."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from features.featureset import DEFAULT_FEATURE_SET
from models.metadata import QUANT_FP32, QUANT_INT8_QDQ, read_metadata
from models.train import int8_path_for, train_file
from replay.generator import write_market

ROOT = Path(__file__).resolve().parents[1]


def _tickscore(*args, timeout=300):
    cmd = [sys.executable, "-m", "engine.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    data = write_market(d / "m5.parquet", 80_000, ["ESZ6", "NQZ6", "CLF7"], 5)
    out = d / "risk.onnx"
    run = _tickscore("train", "--data", str(data), "--out", str(out), "--hidden", "8", "--seed", "3",
                     "--label-horizon-ms", "400", "--label-k", "2")
    assert run.returncode == 0, run.stderr
    return data, out, run


def test_train_writes_fp32_and_int8_models_with_full_metadata(trained):
    data, out, run = trained
    out8 = int8_path_for(out)
    assert out.is_file() and out8.is_file() and "test AUC" in run.stdout
    m32, m8 = read_metadata(out), read_metadata(out8)
    assert (m32.quantization, m8.quantization) == (QUANT_FP32, QUANT_INT8_QDQ)
    for m in (m32, m8):
        assert m.feature_set_id == DEFAULT_FEATURE_SET.id
        assert m.feature_names == DEFAULT_FEATURE_SET.names
        assert m.label["horizon_ms"] == 400.0 and m.label["k"] == 2.0 and "definition" in m.label
        tr = m.train_range
        assert tr["data_file"] == data.name and len(tr["data_sha256"]) == 16
        # time split with a gap: train < val < test, separated by >= the label horizon
        assert tr["train_ts_ns"][1] + tr["gap_ns"] <= tr["val_ts_ns"][0]
        assert tr["val_ts_ns"][1] + tr["gap_ns"] <= tr["test_ts_ns"][0]
        assert tr["gap_ns"] == 400_000_000
        assert m.seed == 3
    assert m8.metrics["calibration"] == "minmax" and m8.metrics["calibration_rows"] > 0
    assert abs(m8.metrics["test"]["auc"] - m32.metrics["test"]["auc"]) < 0.01
    ops = {n.op_type for n in onnx.load(str(out8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_same_seed_and_data_give_the_same_model_bytes(trained, tmp_path):
    data, out, _ = trained
    again = tmp_path / "risk.onnx"
    from models.label import LabelSpec

    train_file(data, again, label=LabelSpec(horizon_ms=400.0, k=2.0), hidden=(8,), seed=3)
    assert again.read_bytes() == out.read_bytes()
    assert int8_path_for(again).read_bytes() == int8_path_for(out).read_bytes()


def test_evaluate_compares_models_side_by_side_and_writes_json_and_png(trained, tmp_path):
    data, out, _ = trained
    run = _tickscore("evaluate", "--data", str(data), str(out), str(int8_path_for(out)),
                     "--out", str(tmp_path / "ev"), "--latency-calls", "3000")
    assert run.returncode == 0, run.stderr
    for key in ("AUC", "log-loss", "Brier", "calibration ECE", "vs fp32 max|d|", "ort p50 us",
                "fused tick p50 us", "reliability"):
        assert key in run.stdout
    res = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    m32, m8 = res["models"]
    assert m32["trained_on_this_data"] and m8["trained_on_this_data"]
    # the held-out test period is exactly the one recorded at training time
    assert m32["test_period_ts_ns"] == read_metadata(out).train_range["test_ts_ns"]
    assert m32["auc"] == pytest.approx(read_metadata(out).metrics["test"]["auc"], abs=1e-9)
    a = m8["agreement_vs_fp32"]
    assert a["twin"] and 0 < a["max_abs_diff"] < 0.2 and a["mean_abs_diff"] < 0.02
    assert len(m8["calibration"]["count"]) == 10 and sum(m8["calibration"]["count"]) == m8["test_rows"]
    for m in (m32, m8):
        assert m["fused"]["supported"] and m["fused"]["max_abs_diff_vs_ort"] < 1e-5
        assert {"ort_run", "fused_run", "fused_tick"} <= set(m["latency"])
    assert (tmp_path / "ev" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_a_bad_hidden_spec_fails_with_a_clear_message(tmp_path):
    run = _tickscore("train", "--out", str(tmp_path / "m.onnx"), "--hidden", "32,x")
    assert run.returncode == 2
    assert "--hidden takes comma-separated widths" in run.stderr and "Traceback" not in run.stderr


# --------------------------------------------------------------------------- every shape, vendor files
TRADES_MAP = ["--shape", "trades", "--map", "ts_event=time,price=px,size=qty,side=maker",
              "--map", "sides.true=sell,sides.false=buy,symbol==BTCUSDT"]  # fmt: skip
VENUE_MAP = [
    "--map", "shape=l3,symbol==BTCUSD,ts_event=microtimestamp,kind=action,order_id=id,side=order_type",
    "--map", "price=price,size=amount,kinds.created=add,kinds.changed=modify,kinds.deleted=delete",
    "--map", "sides.0=buy,sides.1=sell,crossing_add=aggressor",
]  # fmt: skip


@pytest.fixture(scope="module")
def vendor_files(tmp_path_factory):
    import polars as pl

    from replay.generator_l3 import generate_trades
    from tests.venue_feed import venue_feed

    d = tmp_path_factory.mktemp("vendor")
    t = generate_trades(40_000, ["BTCUSDT"], seed=2)
    trades = d / "BTCUSDT-trades.csv"  # a crypto trade dump: ms times, maker flag
    t.select((pl.col("ts_event_ns") // 1_000_000).alias("time"), pl.col("price").alias("px"),
             pl.col("size").alias("qty"), (pl.col("side") < 0).alias("maker")).write_csv(trades)  # fmt: skip
    l3 = d / "btcusd-live-orders.csv"
    venue_feed(n_steps=40_000, seed=9)[0].write_csv(l3)
    # the venue simulator's mid moves little: its large moves are 0.5 sigma within 2 s
    return {"trades": (trades, TRADES_MAP, []),
            "l3": (l3, VENUE_MAP, ["--label-k", "0.5", "--label-horizon-ms", "2000"])}


@pytest.mark.parametrize("shape", ["trades", "l3"])
def test_train_and_evaluate_a_vendor_file_of_each_shape(shape, vendor_files, tmp_path):
    data, flags, label_flags = vendor_files[shape]
    out = tmp_path / f"{shape}.onnx"
    run = _tickscore("train", "--data", str(data), *flags, *label_flags, "--out", str(out), "--hidden", "8")
    assert run.returncode == 0, run.stderr[-3000:]
    for path in (out, int8_path_for(out)):
        meta = read_metadata(path)
        assert meta.feature_set_id.startswith(f"{shape}.v1.")
        assert meta.train_range["shape"] == shape and meta.train_range["data_file"] == data.name
        assert "ts_event" in meta.train_range["mapping"]
    want = {"trades": 5000.0, "l3": 2000.0}[shape]  # trades: the shape's default label
    assert float(read_metadata(out).label["horizon_ms"]) == want
    ev = _tickscore("evaluate", str(out), str(int8_path_for(out)), "--data", str(data), *flags, "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(ev.stdout)
    assert [m["trained_on_this_data"] for m in res["models"]] == [True, True]
    assert all(m["auc"] is not None and m["test_rows"] > 1000 for m in res["models"])


def test_train_on_a_file_too_short_for_the_split_is_a_clear_error(vendor_files, tmp_path):
    data, flags, _ = vendor_files["trades"]
    short = tmp_path / "short.csv"
    short.write_text("".join(data.read_text().splitlines(keepends=True)[:40]))
    run = _tickscore("train", "--data", str(short), *flags, "--out", str(tmp_path / "m.onnx"))
    assert run.returncode == 2
    assert "needs both label classes" in run.stderr and "Traceback" not in run.stderr


def test_chunked_reading_trains_the_same_model_bytes_as_reading_whole(trained, tmp_path):
    # big files (or --chunk-rows) are read as the replay reads them, chunk by chunk; the
    # model must not depend on it
    data, out, _ = trained
    out2 = tmp_path / "chunked.onnx"
    run = _tickscore("train", "--data", str(data), "--out", str(out2), "--hidden", "8", "--seed", "3",
                     "--label-horizon-ms", "400", "--label-k", "2", "--chunk-rows", "7000")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert out2.read_bytes() == out.read_bytes()
    assert int8_path_for(out2).read_bytes() == int8_path_for(out).read_bytes()


def test_chunked_file_dataset_equals_the_whole_file_read_at_once(tmp_path):
    import numpy as np

    from features.featureset import DEFAULT_FEATURE_SET
    from models.dataset import dataset_from_file, dataset_from_ticks
    from models.train import SHAPE_LABELS
    from replay.reader import read_ticks

    data = write_market(tmp_path / "bad.parquet", 30_000, ["ESZ6", "NQZ6"], 7, bad_fraction=0.02)
    td = read_ticks(data)
    whole, _ = dataset_from_ticks(td.ticks, tuple(td.symbols), SHAPE_LABELS["l1"], DEFAULT_FEATURE_SET)
    fd = dataset_from_file(data, SHAPE_LABELS["l1"], DEFAULT_FEATURE_SET, shape="l1", chunk_rows=1_000)
    assert sum(td.rejected.values()) > 0 and fd.rejected == td.rejected and fd.rows_read == td.rows
    chunked = fd.dataset
    assert chunked.rows["usable"] == whole.rows["usable"] > 20_000 and not chunked.sampled
    for name in ("ts", "X", "flags", "y", "row"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(chunked, name), err_msg=name)
    assert chunked.span == whole.span and chunked.rows["labelled"] == whole.rows["labelled"]
