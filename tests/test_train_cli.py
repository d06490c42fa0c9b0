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
