"""`tickscore adopt`: an external scikit-learn model becomes a tickscore model, as a new user would do it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.schema import N_REJECT_REASONS
from features import kernels as K
from features.featureset import DEFAULT_FEATURE_SET as FS
from models.metadata import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _tickscore(*args, timeout=300):
    cmd = [sys.executable, "-m", "engine.cli", *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LogisticRegression on the 16 L1 features, exported with skl2onnx with and without ZipMap."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from replay.generator import default_data_path
    from replay.reader import read_ticks

    td = read_ticks(default_data_path())
    t = td.ticks[:40_000]
    X = np.empty((len(t), len(FS.names)), np.float32)
    fl = np.empty(len(t), np.int32)
    f, i = K.new_state(len(td.symbols))
    K.compute_batch(t, f, i, FS.params_array(), X, fl, np.zeros(N_REJECT_REASONS, np.int64))
    X = X[(fl >= 0) & np.isfinite(X).all(axis=1)]
    y = (np.abs(X[:, 3]) > np.quantile(np.abs(X[:, 3]), 0.9)).astype(int)
    clf = LogisticRegression(max_iter=300).fit(X, y)
    d = tmp_path_factory.mktemp("byom")
    plain, zipmap = d / "lr.onnx", d / "lr_zipmap.onnx"
    plain.write_bytes(to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}).SerializeToString())
    zipmap.write_bytes(to_onnx(clf, X[:1]).SerializeToString())
    return plain, zipmap, clf, X


def test_adopted_sklearn_model_scores_its_positive_class_probability_in_replay(exported, tmp_path):
    plain, _, clf, X = exported
    out = tmp_path / "adopted.onnx"
    run = _tickscore("adopt", plain, "--feature-set", "l1", "--out", out,
                     "--label-horizon-ms", "500", "--label-k", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads(run.stdout)
    assert rep["max_abs_diff_vs_source"] <= 1e-6 and rep["verified_rows"] > 1000
    meta = read_metadata(out)
    assert meta.feature_set_id == FS.id and meta.label["horizon_ms"] == 500.0
    assert meta.train_range["adopted_from"] == "lr.onnx" and len(meta.train_range["source_sha256"]) == 64
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["score"]
    import onnxruntime as ort

    got = ort.InferenceSession(str(out)).run(["score"], {"x": X[:500]})[0][:, 0]
    np.testing.assert_allclose(got, clf.predict_proba(X[:500])[:, 1], atol=1e-5)
    run = _tickscore("replay", "--model", out, "--limit", "5000", "--publish", "none", "--pin", "none",
                     "--no-progress", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    s = json.loads(run.stdout)
    assert s["scores"] == 5000 and s["backend"] == "ort"  # LinearClassifier: not a fused graph
    assert "fused backend refused" in run.stderr and "LinearClassifier" in run.stderr


def test_a_zipmap_export_is_refused_with_how_to_export_it(exported, tmp_path):
    _, zipmap, _, _ = exported
    run = _tickscore("adopt", zipmap, "--feature-set", "l1", "--out", tmp_path / "a.onnx")
    assert run.returncode == 2 and "zipmap" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "a.onnx").exists()


def test_a_model_of_the_wrong_width_is_refused(exported, tmp_path):
    plain, _, _, _ = exported
    run = _tickscore("adopt", plain, "--feature-set", "trades", "--out", tmp_path / "a.onnx")
    assert run.returncode == 2 and "needs [N, 12]" in run.stderr


def test_evaluate_refuses_an_unknown_label_and_takes_it_from_flags(exported, tmp_path):
    plain, _, _, _ = exported
    out = tmp_path / "adopted.onnx"
    assert _tickscore("adopt", plain, "--feature-set", "l1", "--out", out).returncode == 0
    assert read_metadata(out).label["known"] is False
    run = _tickscore("evaluate", out, "--latency-calls", "100")
    assert run.returncode == 2 and "no label definition" in run.stderr
    run = _tickscore("evaluate", out, "--latency-calls", "100", "--label-horizon-ms", "500",
                     "--label-k", "2", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout)["models"][0]
    assert m["label"]["horizon_ms"] == 500.0 and m["auc"] is not None
