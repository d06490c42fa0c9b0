"""The training dataset built chunk by chunk: streamed labels, the bounded row sample, bounded memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.schema import KIND_QUOTE, KIND_TRADE, empty_ticks
from features.featureset import DEFAULT_BY_SHAPE
from models.dataset import RowSample, dataset_from_file, dataset_from_ticks
from models.label import LabelSpec, StreamingLabels, compute_labels
from models.train import SHAPE_LABELS, train_file
from replay.generator import write_market
from replay.generator_l3 import write_l3, write_trades
from replay.reader import read_ticks

WRITERS = {"l1": write_market, "trades": write_trades, "l3": write_l3}


def _mixed_ticks(n: int, seed: int, grid_ns: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ticks = empty_ticks(n)
    ticks["instrument"] = rng.integers(0, 3, n)
    # equal timestamps happen; on a coarse grid often, and events fall exactly on t + H
    ticks["ts_event_ns"] = np.cumsum(rng.integers(0, 80_000_000 // grid_ns, n)) * grid_ns
    ticks["kind"] = np.where(rng.random(n) < 0.75, KIND_QUOTE, KIND_TRADE)
    mid = 50 + np.cumsum(rng.choice([-0.01, 0.0, 0.01, 0.05], n, p=[0.2, 0.55, 0.2, 0.05]))
    ticks["bid_px"] = mid - 0.005
    ticks["ask_px"] = mid + 0.005
    ticks["price"] = mid
    flags = np.where(rng.random(n) < 0.05, -3, 0).astype(np.int32)
    return ticks, flags


@pytest.mark.parametrize("grid_ns", [1, 10_000_000, 40_000_000])
@pytest.mark.parametrize("step", [1, 7, 50, 333, 5000])
def test_streamed_labels_equal_the_batch_labels_whatever_the_chunking(step, grid_ns):
    ticks, flags = _mixed_ticks(3000, 11, grid_ns)
    spec = LabelSpec(horizon_ms=320, k=1.5, vol_tau_ms=3_000, warmup_ms=500)  # on both grids
    batch = compute_labels(ticks, flags, 3, spec)
    assert (batch == 1).sum() > 50 and (batch == 0).sum() > 500  # both classes, not a trivial stream
    lab = StreamingLabels(3, spec)
    y = np.full(len(ticks), -1, dtype=np.int8)
    seen = []
    for a in range(0, len(ticks), step):
        row = {"row": np.arange(a, min(a + step, len(ticks)))}
        yy, p = lab.add(ticks[a : a + step], flags[a : a + step], row)
        assert lab.held_rows < 200  # only about one horizon of rows waits
        y[p["row"]] = yy
        seen.append(p["row"])
    yy, p = lab.finish()
    y[p["row"]] = yy
    seen.append(p["row"])
    rows = np.concatenate(seen)
    assert np.unique(rows).size == rows.size == (flags >= 0).sum()  # every accepted row exactly once
    np.testing.assert_array_equal(y, batch)


@pytest.mark.parametrize("shape", ["l1", "trades", "l3"])
def test_dataset_in_chunks_equals_the_dataset_of_the_whole_file(tmp_path, shape):
    path = WRITERS[shape](tmp_path / f"{shape}.parquet", 30_000)
    td = read_ticks(path, shape=shape)
    fs = DEFAULT_BY_SHAPE[shape]
    label = LabelSpec(horizon_ms=SHAPE_LABELS[shape].horizon_ms / 5, k=2.0, vol_tau_ms=5_000, warmup_ms=2_000)
    whole, _ = dataset_from_ticks(td.ticks, tuple(td.symbols), label, fs)
    chunked = dataset_from_file(path, label, fs, shape=shape, chunk_rows=2_345, max_rows=None).dataset
    assert whole.rows["usable"] > 10_000 and 0 < whole.y.mean() < 0.5
    for name in ("ts", "X", "flags", "y", "row"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(chunked, name), err_msg=name)
    assert {k: v for k, v in whole.rows.items() if k != "max_held_rows"} == {
        k: v for k, v in chunked.rows.items() if k != "max_held_rows"
    }
    assert chunked.rows["max_held_rows"] < 2 * 2_345  # held rows stay about one horizon, not the file


def test_row_sample_keeps_a_uniform_chunking_independent_sample_of_max_rows(tmp_path):
    path = write_market(tmp_path / "m.parquet", 40_000, ["ESZ6", "NQZ6"], 5)
    td = read_ticks(path)
    fs, label = DEFAULT_BY_SHAPE["l1"], SHAPE_LABELS["l1"]
    full, _ = dataset_from_ticks(td.ticks, tuple(td.symbols), label, fs)
    a, _ = dataset_from_ticks(td.ticks, tuple(td.symbols), label, fs, max_rows=5_000, chunk_rows=3_000)
    b, _ = dataset_from_ticks(td.ticks, tuple(td.symbols), label, fs, max_rows=5_000, chunk_rows=777)
    assert full.rows["usable"] > 30_000 and a.sampled and not full.sampled
    assert a.rows["kept"] == a.X.shape[0] == 5_000 and a.rows["usable"] == full.rows["usable"]
    np.testing.assert_array_equal(a.row, b.row)  # the same rows whatever the chunking
    assert np.all(np.diff(a.row) > 0)  # in row order
    pos = np.searchsorted(full.row, a.row)
    np.testing.assert_array_equal(full.row[pos], a.row)  # a subset of the usable rows ...
    np.testing.assert_array_equal(full.X[pos], a.X)  # ... with their own values
    np.testing.assert_array_equal(full.y[pos], a.y)
    # Uniform over time: each fifth of the event span holds about a fifth of the sample.
    edges = np.linspace(full.span[0], full.span[1], 6)
    share = np.histogram(a.ts, edges)[0] / 5_000
    full_share = np.histogram(full.ts, edges)[0] / full.ts.size
    assert np.abs(share - full_share).max() < 0.03, (share, full_share)
    assert abs(a.y.mean() - full.y.mean()) < 0.02


def test_row_sample_shrinks_to_max_rows_and_rejects_a_bad_limit():
    s = RowSample(2, max_rows=100, seed=3)
    rng = np.random.default_rng(0)
    for a in range(0, 10_000, 1000):
        r = np.arange(a, a + 1000)
        X = rng.random((1000, 2), dtype=np.float32)
        s.add(r, r * 10, X, np.ones(1000, np.int8), np.zeros(1000, np.int32))
    row, ts, X, y, flags = s.arrays()
    assert s.seen == 10_000 and row.shape == (100,) and X.shape == (100, 2)
    np.testing.assert_array_equal(ts, row * 10)
    assert row.min() < 2_000 and row.max() > 8_000  # spread over the stream, not the first rows
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        RowSample(2, max_rows=0)


def test_train_with_max_rows_fits_a_sample_and_reports_it(tmp_path):
    data = write_market(tmp_path / "m.parquet", 60_000, ["ESZ6", "NQZ6"], 2)
    out = tmp_path / "m.onnx"
    rep = train_file(data, out, hidden=(4,), max_rows=12_000, label=LabelSpec(horizon_ms=400, k=2))
    smp, rows = rep["sample"], rep["train_range"]["rows"]
    assert smp == {"max_rows": 12_000, "kept": 12_000, "sampled": True,
                   "max_rows_held_for_label": smp["max_rows_held_for_label"]}  # fmt: skip
    assert rep["rows"]["usable"] > 50_000
    assert 5_000 < rows["train"] < 7_500 and rows["train"] + rows["val"] + rows["test"] <= 12_000
    assert rep["fp32"]["test"]["n"] == rows["test"] and 0 < rep["fp32"]["test"]["auc"] < 1
    assert "--max-rows 12000" in rep["command"]
    assert json.loads(out.with_name("m.train.json").read_text())["sample"]["sampled"] is True
