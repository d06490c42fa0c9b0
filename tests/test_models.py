"""Tests of models/: label, graph, quantization, metadata, loader and the ort backend."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.schema import KIND_QUOTE, KIND_TRADE, empty_ticks
from features.featureset import DEFAULT_FEATURE_SET
from models.dataset import time_split
from models.label import LabelSpec, compute_labels
from models.loader import ModelError, default_model_path, load_model
from models.metadata import (
    QUANT_FP32,
    QUANT_INT8_QDQ,
    ModelMetadata,
    make_model_version,
    read_metadata,
    weights_digest,
    write_metadata,
)
from models.onnx_graph import (
    MLPWeights,
    build_graph,
    forward_numpy,
    weights_from_graph,
    weights_from_sklearn,
)
from models.ort_backend import OrtBackend
from models.quantize import quantize_int8
from models.train import build_dataset

FS = DEFAULT_FEATURE_SET
F = len(FS.names)

#: int8 vs fp32 agreement of the shipped models, measured on the training
#: test period (train_report.json: max 0.085, mean 0.004) plus headroom.
INT8_MAX_ABS_DIFF = 0.15
INT8_MEAN_ABS_DIFF = 0.01


# --------------------------------------------------------------------------- helpers
def _random_weights(rng: np.random.Generator, hidden=(16, 8), clip=None, n_in=F) -> MLPWeights:
    sizes = [n_in, *hidden, 1]
    layers = tuple(
        (rng.normal(size=(a, b)) / math.sqrt(a), rng.normal(size=b) * 0.1)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    )
    return MLPWeights(
        mean=rng.normal(size=n_in),
        inv_std=rng.uniform(0.5, 2.0, size=n_in),
        layers=layers,
        clip=clip,
    )


def _meta(model: onnx.ModelProto, **overrides) -> ModelMetadata:
    base = dict(
        feature_set_id=FS.id,
        feature_names=tuple(FS.names),
        label={"definition": "test", "horizon_ms": 500.0, "k": 2.0},
        train_range={"data_seed": 7, "n_events": 10, "train_ts_ns": [1, 2]},
        seed=3,
        quantization=QUANT_FP32,
        model_version=make_model_version(model, QUANT_FP32),
        metrics={"test": {"auc": 0.5}},
    )
    base.update(overrides)
    return ModelMetadata(**base)


def _tickscore_model(rng: np.random.Generator, path: Path, **meta_overrides) -> Path:
    model = build_graph(_random_weights(rng))
    write_metadata(model, _meta(model, **meta_overrides))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def feature_rows() -> np.ndarray:
    """Return settled feature vectors of a small generated market (seed 3, not 1 or 7)."""
    ds, _ = build_dataset(40_000, 3, LabelSpec(), FS)
    ok = (ds.flags >= 0) & np.isfinite(ds.X).all(axis=1)
    return np.ascontiguousarray(ds.X[ok][5_000:])


# --------------------------------------------------------------------------- label
def _label_reference(ticks, flags, spec: LabelSpec) -> np.ndarray:
    """Plain-Python statement of the label definition in models/label.py."""
    tau = spec.vol_tau_ms * 1e6
    H = int(spec.horizon_ms * 1e6)
    warm_ns = spec.warmup_ms * 1e6
    n = len(ticks)
    lm = [math.nan] * n
    sig = [math.nan] * n
    warm = [False] * n
    state: dict[int, dict] = {}
    for i in range(n):
        if flags[i] < 0:
            continue
        t = ticks[i]
        s = int(t["instrument"])
        ts = int(t["ts_event_ns"])
        st = state.setdefault(s, {"lm": None, "rets": [], "first": None})
        if t["kind"] == KIND_QUOTE:
            m = math.log((t["bid_px"] + t["ask_px"]) / 2)
            if st["lm"] is None:
                st["first"] = ts
            elif m != st["lm"]:
                st["rets"].append((ts, m - st["lm"]))
            st["lm"] = m
        if st["lm"] is None:
            continue
        lm[i] = st["lm"]
        rv = sum(r * r * math.exp(-(ts - tj) / tau) for tj, r in st["rets"])
        sig[i] = math.sqrt(rv / tau * H)
        warm[i] = ts - st["first"] >= warm_ns
    end = max(int(ticks["ts_event_ns"][i]) for i in range(n) if flags[i] >= 0)
    y = np.full(n, -1, dtype=np.int8)
    for i in range(n):
        ts = int(ticks["ts_event_ns"][i])
        if flags[i] < 0 or not warm[i] or not sig[i] > 0 or ts + H > end:
            continue
        move = 0.0
        for j in range(i + 1, n):
            if ticks["ts_event_ns"][j] > ts + H:
                break
            if flags[j] >= 0 and ticks["instrument"][j] == ticks["instrument"][i]:
                if not math.isnan(lm[j]):
                    move = max(move, abs(lm[j] - lm[i]))
        y[i] = 1 if move > spec.k * sig[i] else 0
    return y


def test_label_marks_events_within_horizon_before_a_jump():
    # One instrument, a quote every 100 ms for 10 s: the mid alternates by one
    # cent for 3 s (volatility), stays flat, jumps +1 at 6.0 s, then stays flat.
    n = 101
    ticks = empty_ticks(n)
    ticks["ts_event_ns"] = np.arange(n) * 100_000_000
    ticks["kind"] = KIND_QUOTE
    mid = np.full(n, 100.01)
    mid[:30:2] = 100.00
    mid[60:] = 101.0
    ticks["bid_px"] = mid - 0.005
    ticks["ask_px"] = mid + 0.005
    ticks["bid_sz"] = ticks["ask_sz"] = 1.0
    spec = LabelSpec(horizon_ms=500, k=2, vol_tau_ms=2_000, warmup_ms=1_000)
    y = compute_labels(ticks, np.zeros(n, np.int32), 1, spec)
    expected = np.zeros(n, dtype=np.int8)
    expected[:10] = -1  # warm-up: less than 1 s since the first quote
    expected[55:60] = 1  # 5.5 .. 5.9 s: the jump at 6.0 s is within 500 ms
    expected[96:] = -1  # horizon runs past the last event (10.0 s)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(y, _label_reference(ticks, np.zeros(n, np.int32), spec))


def test_label_kernel_matches_plain_python_reference_on_mixed_sequence():
    rng = np.random.default_rng(11)
    n = 1500
    ticks = empty_ticks(n)
    ticks["instrument"] = rng.integers(0, 3, n)
    # equal timestamps happen (step 0), spacing up to 80 ms
    ticks["ts_event_ns"] = np.cumsum(rng.integers(0, 80_000_000, n))
    ticks["kind"] = np.where(rng.random(n) < 0.75, KIND_QUOTE, KIND_TRADE)
    mid = 50 + np.cumsum(rng.choice([-0.01, 0.0, 0.01, 0.05], n, p=[0.2, 0.55, 0.2, 0.05]))
    ticks["bid_px"] = mid - 0.005
    ticks["ask_px"] = mid + 0.005
    ticks["price"] = mid
    flags = np.where(rng.random(n) < 0.05, -3, 0).astype(np.int32)  # some rejected rows
    spec = LabelSpec(horizon_ms=300, k=1.5, vol_tau_ms=3_000, warmup_ms=500)
    y = compute_labels(ticks, flags, 3, spec)
    ref = _label_reference(ticks, flags, spec)
    np.testing.assert_array_equal(y, ref)
    assert (y[flags < 0] == -1).all()
    assert 0 < (y == 1).sum() < (y == 0).sum()


def test_time_split_leaves_a_gap_of_the_horizon_between_parts():
    ts = np.arange(0, 100_000_000_000, 10_000_000, dtype=np.int64)  # 100 s, 10 ms apart
    gap = 500_000_000
    sp = time_split(ts, np.ones(ts.shape, bool), gap)
    assert not (sp.train & sp.val).any() and not (sp.val & sp.test).any()
    assert ts[sp.val].min() - ts[sp.train].max() >= gap
    assert ts[sp.test].min() - ts[sp.val].max() >= gap


# --------------------------------------------------------------------------- graph
@pytest.mark.parametrize("hidden,clip", [((16, 8), None), ((16, 8), 4.0), ((), None)])
def test_graph_output_equals_numpy_forward_pass(hidden, clip):
    rng = np.random.default_rng(1)
    w = _random_weights(rng, hidden=hidden, clip=clip)
    model = build_graph(w)
    X = (rng.normal(size=(500, F)) * 4).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": X})[0]
    assert out.shape == (500, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], forward_numpy(w, X), atol=1e-6)
    w2 = weights_from_graph(model)
    assert w2.hidden == w.hidden and w2.clip == w.clip
    np.testing.assert_array_equal(forward_numpy(w2, X), forward_numpy(w, X))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_graph_equals_sklearn_predict_proba():
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(2)
    X = rng.normal(size=(3000, 6)).astype(np.float32) * 3 + 1
    y = (X[:, 0] * X[:, 1] > 1).astype(int)
    mean, std = X.mean(0), X.std(0)
    Z = (X - mean.astype(np.float32)) * (1.0 / std).astype(np.float32)  # as the graph does
    clf = MLPClassifier((8, 4), random_state=0, max_iter=300).fit(Z, y)
    w = weights_from_sklearn(mean, std, clf)
    sess = ort.InferenceSession(build_graph(w).SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": X})[0][:, 0]
    np.testing.assert_allclose(out, clf.predict_proba(Z)[:, 1], atol=1e-5)


def test_quantized_graph_keeps_normalisation_float_and_matmul_int8(tmp_path):
    rng = np.random.default_rng(4)
    w = _random_weights(rng, clip=4.0)
    X = ((rng.normal(size=(4096, F)) / w.inv_std) + w.mean).astype(np.float32)
    q = quantize_int8(build_graph(w), tmp_path / "q.onnx", X)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 3  # one per MatMul activation input
    float_ops = [n.op_type for n in q.graph.node if n.name.startswith("norm_")]
    assert float_ops == ["Sub", "Mul", "Clip"]
    dtypes = {t.name: t.data_type for t in q.graph.initializer}
    assert dtypes["fc0_W_quantized"] == onnx.TensorProto.INT8
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    diff = np.abs(sess.run(None, {"x": X})[0][:, 0] - forward_numpy(w, X))
    assert diff.mean() < 0.01


# --------------------------------------------------------------------------- metadata / loader
def test_metadata_round_trips_through_the_onnx_file(tmp_path):
    path = _tickscore_model(np.random.default_rng(5), tmp_path / "m.onnx")
    meta = read_metadata(path)
    model = onnx.load(str(path))
    assert meta == _meta(model)
    assert meta.model_version == f"risk-fp32-{weights_digest(model)}"
    # rewriting the metadata replaces it and does not change the weights digest
    write_metadata(model, dataclasses.replace(meta, quantization=QUANT_INT8_QDQ))
    assert [p.key for p in model.metadata_props].count("tickscore.quantization") == 1
    assert weights_digest(model) == weights_digest(onnx.load(str(path)))


def test_loading_model_of_another_feature_set_names_both_ids_and_first_difference(tmp_path):
    names = list(FS.names)
    names[3] = "ret_fast_bps_v0"
    path = _tickscore_model(
        np.random.default_rng(6),
        tmp_path / "old.onnx",
        feature_set_id="l1.v0.000000000000",
        feature_names=tuple(names),
    )
    with pytest.raises(ModelError) as exc:
        load_model(path, FS)
    msg = str(exc.value)
    assert "l1.v0.000000000000" in msg and FS.id in msg and str(path) in msg
    assert "ret_fast_bps_v0" in msg and FS.names[3] in msg


def test_loading_model_with_same_id_but_other_names_is_refused(tmp_path):
    names = list(FS.names)
    names[-1] = "something_else"
    path = _tickscore_model(np.random.default_rng(6), tmp_path / "m.onnx", feature_names=tuple(names))
    with pytest.raises(ModelError, match="something_else"):
        load_model(path, FS)


def test_corrupt_model_file_gives_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(ModelError, match="not a valid ONNX model") as exc:
        load_model(path, FS)
    assert str(path) in str(exc.value)
    with pytest.raises(ModelError, match="no readable model file there"):
        load_model(tmp_path / "missing.onnx", FS)


def test_onnx_model_without_tickscore_metadata_is_not_a_tickscore_model(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(build_graph(_random_weights(np.random.default_rng(7))), str(path))
    with pytest.raises(ModelError, match="not a tickscore model, missing") as exc:
        load_model(path, FS)
    assert "tickscore.feature_set_id" in str(exc.value) and str(path) in str(exc.value)


def test_model_whose_input_width_differs_from_the_feature_set_is_refused(tmp_path):
    model = build_graph(_random_weights(np.random.default_rng(8), n_in=F - 1))
    write_metadata(model, _meta(model))
    path = tmp_path / "narrow.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=f"input has {F - 1} features"):
        load_model(path, FS)


# --------------------------------------------------------------------------- backend
@pytest.mark.parametrize("quant", ["int8", "fp32"])
def test_ort_backend_run_equals_score_batch_row_by_row(quant, feature_rows):
    b = OrtBackend(default_model_path(quant), FS)
    assert b.x.shape == (1, F) and b.x.flags.c_contiguous and b.x.dtype == np.float32
    assert np.shares_memory(b.x, b.x_flat) and b.x_flat.shape == (F,)
    rows = feature_rows[::50][:400]
    batch = b.score_batch(rows)
    single = np.empty(len(rows), dtype=np.float32)
    for i, r in enumerate(rows):
        b.x_flat[:] = r  # what the feature kernel does
        single[i] = b.run()
    # one row and many rows go through different GEMM kernels (int8: the last
    # layer's float accumulation order differs), so equal up to float rounding
    np.testing.assert_allclose(single, batch, rtol=0, atol=1e-6)
    assert ((batch > 0) & (batch < 1)).all()


def test_shipped_default_models_load_and_int8_agrees_with_fp32(feature_rows):
    m8 = load_model(default_model_path("int8"), FS)
    m32 = load_model(default_model_path("fp32"), FS)
    assert default_model_path() == default_model_path("int8")
    assert (m8.quantization, m32.quantization) == (QUANT_INT8_QDQ, QUANT_FP32)
    assert m8.model_version.startswith("risk-int8-") and len(m8.model_version) == 20
    assert m32.model_version.startswith("risk-fp32-")
    assert m8.feature_set_id == FS.id and m8.label["horizon_ms"] == 500.0
    assert m8.train_range["data_seed"] != 1  # not the demo dataset
    b8 = OrtBackend(default_model_path("int8"), FS)
    b32 = OrtBackend(default_model_path("fp32"), FS)
    assert b8.version == m8.model_version and b8.quantization == QUANT_INT8_QDQ
    d = np.abs(b8.score_batch(feature_rows) - b32.score_batch(feature_rows))
    assert d.max() < INT8_MAX_ABS_DIFF and d.mean() < INT8_MEAN_ABS_DIFF


def test_shipped_fp32_graph_has_the_documented_simple_shape():
    model = onnx.load(str(default_model_path("fp32")))
    ops = [n.op_type for n in model.graph.node]
    assert ops == [
        "Sub",
        "Mul",
        "Clip",
        "MatMul",
        "Add",
        "Relu",
        "MatMul",
        "Add",
        "Relu",
        "MatMul",
        "Add",
        "Sigmoid",
    ]
    w = weights_from_graph(model)
    assert w.n_features == F and w.hidden == (16, 8)


# --------------------------------------------------------------------------- training
def test_training_twice_with_same_seeds_writes_identical_models(tmp_path):
    from models.train import train_default

    reports = [train_default(tmp_path / d, events=80_000, compare_quantization=False) for d in ("a", "b")]
    for name in ("risk_fp32.onnx", "risk_int8.onnx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rep = reports[0]
    assert rep["fp32"]["max_abs_diff_vs_sklearn"] <= 1e-5
    assert rep["train_range"]["data_seed"] == 7
    tr = rep["train_range"]
    assert tr["val_ts_ns"][0] - tr["train_ts_ns"][1] >= tr["gap_ns"]
    assert tr["test_ts_ns"][0] - tr["val_ts_ns"][1] >= tr["gap_ns"]
    assert load_model(tmp_path / "a" / "risk_int8.onnx", FS).quantization == QUANT_INT8_QDQ
