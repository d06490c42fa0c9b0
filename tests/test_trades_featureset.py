"""Trade-only feature set, the feature-set registry and the default models of the new shapes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.schema import (
    FLAG_CLIPPED,
    FLAG_WARMUP,
    KIND_QUOTE,
    KIND_TRADE,
    N_REJECT_REASONS,
    REJECT_ABSURD_PRICE,
    REJECT_BAD_KIND,
    REJECT_NONPOSITIVE,
    REJECT_TIME_BACKWARDS,
    TICK_DTYPE,
)
from features import kernels_trades as KT
from features.featureset import (
    DEFAULT_BY_SHAPE,
    DEFAULT_FEATURE_SET,
    L3_FEATURE_SET,
    TRADES_FEATURE_SET,
    FeatureSet,
    get_feature_set,
    known_feature_sets,
)
from features.registry import kernels_for

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_794_839_400_000_000_000


def trade(ts_ms, price, size=1.0, side=0, kind=KIND_TRADE, inst=0):
    return (T0 + int(ts_ms * 1e6), 0, inst, kind, side, 0.0, 0.0, 0.0, 0.0, price, size, 0)


def run(rows, n_inst=1):
    t = np.array(rows, dtype=TICK_DTYPE)
    fs, is_ = KT.new_state(n_inst)
    X = np.empty((len(t), KT.N_FEATURES), np.float32)
    fl = np.empty(len(t), np.int32)
    c = np.zeros(N_REJECT_REASONS, np.int64)
    KT.compute_batch(t, fs, is_, TRADES_FEATURE_SET.params_array(), X, fl, c)
    return X, fl, c


def col(name):
    return KT.FEATURE_NAMES.index(name)


# --------------------------------------------------------------------------- feature sets and registry
def test_l1_feature_set_id_is_unchanged_and_new_sets_are_registered():
    assert DEFAULT_FEATURE_SET.id == "l1.v1.79d8df4ae23a"
    ids = known_feature_sets()
    assert TRADES_FEATURE_SET.id in ids and L3_FEATURE_SET.id in ids
    assert (
        get_feature_set("trades") is TRADES_FEATURE_SET
        and get_feature_set(L3_FEATURE_SET.id) is L3_FEATURE_SET
    )
    assert DEFAULT_BY_SHAPE == {"l1": DEFAULT_FEATURE_SET, "trades": TRADES_FEATURE_SET, "l3": L3_FEATURE_SET}
    for fs in DEFAULT_BY_SHAPE.values():
        assert len(fs.describe()) == len(fs.names) == kernels_for(fs).n_features


def test_feature_sets_say_which_features_need_a_book():
    assert TRADES_FEATURE_SET.unavailable("trades") == []
    assert set(TRADES_FEATURE_SET.requires.values()) == {"trades"}
    gone = DEFAULT_FEATURE_SET.unavailable("trades")
    assert "spread_bps" in gone and "trade_flow_imb" not in gone and "log_trade_rate" not in gone
    assert DEFAULT_FEATURE_SET.unavailable("l1") == []
    assert L3_FEATURE_SET.unavailable("l3") == [] and L3_FEATURE_SET.unavailable("l1") == list(
        L3_FEATURE_SET.names
    )
    assert L3_FEATURE_SET.requires["depth_imb_short"] == "depth"


def test_bad_feature_set_definitions_are_refused():
    with pytest.raises(ValueError, match="unknown feature-set family"):
        FeatureSet("l9", 1, TRADES_FEATURE_SET.names, TRADES_FEATURE_SET.params)
    with pytest.raises(ValueError, match="column order"):
        FeatureSet("trades", 1, tuple(reversed(TRADES_FEATURE_SET.names)), TRADES_FEATURE_SET.params)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        TRADES_FEATURE_SET.with_params(hl_trade_ns=0.0)
    assert TRADES_FEATURE_SET.with_params(hl_trade_ns=2e9).id != TRADES_FEATURE_SET.id


def test_registry_returns_each_familys_kernels_with_the_same_signatures():
    for fam in ("l1", "trades", "l3"):
        k = kernels_for(fam)
        fstate, istate = k.new_state(2)
        t = np.array([trade(1, 100.0)], dtype=TICK_DTYPE)
        x = np.empty(k.n_features, np.float32)
        c = np.zeros(N_REJECT_REASONS, np.int64)
        fl = k.update_tick(t, 0, fstate, istate, DEFAULT_BY_SHAPE[fam].params_array(), x, c)
        assert fl >= 0 and c[0] == 1, fam  # a print is a valid event for every family
        assert isinstance(k.anomalies(istate), dict)
    with pytest.raises(KeyError):
        kernels_for("l9")


# --------------------------------------------------------------------------- trade kernel
def test_streaming_and_batch_agree_bit_for_bit():
    rng = np.random.default_rng(1)
    rows = [trade(i * 37.5, 100.0 + rng.normal(), float(rng.integers(1, 9)), int(rng.choice([-1, 0, 1])),
                  inst=int(rng.integers(0, 2))) for i in range(3_000)]  # fmt: skip
    X, fl, c = run(rows, n_inst=2)
    t = np.array(rows, dtype=TICK_DTYPE)
    fs, is_ = KT.new_state(2)
    x = np.empty(KT.N_FEATURES, np.float32)
    c2 = np.zeros(N_REJECT_REASONS, np.int64)
    for i in range(len(t)):
        assert KT.update_tick(t, i, fs, is_, TRADES_FEATURE_SET.params_array(), x, c2) == fl[i]
        np.testing.assert_array_equal(x, X[i])
    assert c[0] == len(rows)


def test_unknown_side_uses_the_tick_rule():
    X, fl, _ = run(
        [trade(0, 100.0, side=0), trade(1, 100.5, side=0), trade(2, 100.5, side=0), trade(3, 100.0)]
    )
    flow = X[:, col("trade_flow_imb")]
    assert flow[0] == 0.0  # nothing known yet
    assert flow[1] == pytest.approx(0.5, rel=1e-3)  # uptick: buy (1 of 2 units signed)
    assert flow[2] > flow[1]  # zero tick repeats the last sign
    assert flow[3] < flow[2]  # downtick: sell


def test_given_aggressor_side_is_used_as_is():
    X, _, _ = run([trade(0, 100.0, side=-1), trade(1, 101.0, side=-1)])
    assert X[1, col("trade_flow_imb")] == -1.0


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (trade(2, 0.0), REJECT_NONPOSITIVE),
        (trade(2, 100.0, size=-1.0), REJECT_NONPOSITIVE),
        (trade(2, 2000.0), REJECT_ABSURD_PRICE),  # 20x the last price
        (trade(2, 9.2e9), REJECT_ABSURD_PRICE),
        (trade(2, 100.0, kind=KIND_QUOTE), REJECT_BAD_KIND),
        (trade(0.5, 100.0), REJECT_TIME_BACKWARDS),
    ],
)
def test_bad_trades_are_rejected_and_change_no_state(row, reason):
    X, fl, c = run([trade(1, 100.0), row, trade(3, 100.0)])
    assert fl[1] == -reason and c[reason] == 1 and np.isnan(X[1]).all()
    X2, fl2, _ = run([trade(1, 100.0), trade(3, 100.0)])
    np.testing.assert_array_equal(X[[0, 2]], X2)


def test_returns_rate_vwap_size_and_gap_features():
    X, fl, _ = run([trade(0, 100.0, 1.0), trade(1000, 101.0, 3.0)])
    r = X[1]
    assert r[col("ret_fast_bps")] == pytest.approx(1e4 * math.log(1.01), rel=1e-5)  # added at its own time
    assert X[0, col("ret_fast_bps")] == 0.0
    assert r[col("log_trade_gap_s")] == pytest.approx(math.log(2.0), rel=1e-6)
    assert r[col("log_size_rel")] == pytest.approx(math.log(3.0), rel=1e-6)
    assert r[col("vwap_dev_bps")] > 0
    assert fl[1] & FLAG_WARMUP and not fl[1] & FLAG_CLIPPED


def test_features_stay_in_their_documented_ranges():
    rng = np.random.default_rng(7)
    px = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, 5_000)))
    ts = np.cumsum(rng.exponential(200.0, 5_000))
    X, fl, _ = run(
        [
            trade(t, p, float(rng.integers(1, 50)), int(rng.choice([-1, 0, 1])))
            for t, p in zip(ts, px, strict=True)
        ]
    )
    assert (fl >= 0).all()
    for row in TRADES_FEATURE_SET.describe():
        lo, hi = row["range"]
        v = X[:, col(row["name"])]
        assert np.isfinite(v).all() and (v >= lo - 1e-6).all() and (v <= hi + 1e-6).all(), row["name"]


# --------------------------------------------------------------------------- default models of the new shapes
@pytest.mark.parametrize("shape", ["trades", "l3"])
def test_default_model_of_each_shape_matches_its_feature_set(shape):
    from models.loader import load_model
    from replay.inputs import default_model_for_shape

    for q in ("int8", "fp32"):
        path = default_model_for_shape(shape).with_name(f"risk_{shape}_{q}.onnx")
        meta = load_model(path, DEFAULT_BY_SHAPE[shape])
        assert meta.feature_set_id == DEFAULT_BY_SHAPE[shape].id
        assert path.stat().st_size < 64_000


def test_trade_only_csv_replays_end_to_end_with_the_trades_model(tmp_path):
    from replay.generator_l3 import generate_trades

    df = (
        generate_trades(3_000)
        .drop("ts_recv_ns")
        .rename({"ts_event_ns": "time", "price": "px", "size": "qty"})
    )
    df = df.with_columns((df["time"] // 1_000_000).alias("time"))  # ms epoch
    p = tmp_path / "btc_trades.csv"
    df.write_csv(p)
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "replay", "--data", str(p),
         "--map", "ts_event=time,price=px,size=qty",
         "--shape", "trades", "--publish", "none", "--pin", "none", "--no-progress", "--backend", "ort",
         "--warmup-ticks", "100", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["shape"] == "trades" and s["feature_set"] == TRADES_FEATURE_SET.id
    assert s["scores"] == 3_000 and s["rejected"] == 0 and "risk_trades_int8" in s["model"]["path"]


def test_l1_model_on_a_trade_only_file_warns_about_unavailable_features(tmp_path, capsys):
    from replay.generator_l3 import generate_trades
    from replay.run import ReplayOptions, run_inprocess

    p = tmp_path / "t.parquet"
    generate_trades(2_000).write_parquet(p)
    from models.loader import default_model_path

    s = run_inprocess(ReplayOptions(data=str(p), model=str(default_model_path()), pin=None, publish="none",
                                    progress=False, backend="ort", shape="trades")).summary  # fmt: skip
    assert "spread_bps" in s["unavailable_features"] and s["scores"] == 2_000
    assert "cannot provide" in capsys.readouterr().err
