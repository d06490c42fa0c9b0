"""onnxruntime backend: one-row scoring with preallocated, pre-bound buffers.

The session is tuned for the latency of a single row on a pinned hot thread:
one intra-op and one inter-op thread, sequential execution, spinning off (the
hot thread already spins; ORT worker spinning would steal the other core), all
graph optimisations, CPU execution provider.

The input ``x`` (float32, (1, F)) and the output ``out`` (float32, (1, 1)) are
allocated once and bound once with an IOBinding (as OrtValues that share the
numpy memory), so :meth:`OrtBackend.run` passes no dict, allocates no input or
output tensor and only returns the score.  It calls the C++ session's
``run_with_iobinding`` directly, skipping the Python wrapper's per-call checks.

Measured with :func:`measure_variants` (``python -m models.ort_backend``,
pinned to one core, 50k warm calls each, shipped models, p50 / p99 in us):

======================  ===============  ===============
variant                 fp32             int8 (QDQ)
======================  ===============  ===============
run (new feed dict)     7.6 / 16.9       9.4 / 22.2
run (reused feed)       7.2 / 15.8       9.1 / 20.8
C++ run (reused feed)   6.0 / 12.9       7.8 / 17.2
run_with_ort_values     40.8 / 105       42.6 / 108
C++ run_with_ort_vals   6.4 / 13.8       8.2 / 17.4
IOBinding (public)      4.7 / 10.0       6.6 / 14.0
IOBinding (C++ call)    4.2 / 8.9        6.1 / 12.9
======================  ===============  ===============

For a model this small onnxruntime's per-node overhead dominates, so the int8
graph (more nodes: Q/DQ, QGemm) is ~2 us slower per row than fp32 here; whether
int8 pays off is a question for the fused numba backend.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from features.featureset import DEFAULT_FEATURE_SET
from models.loader import FeatureSetLike, default_model_path, load_checked
from models.metadata import ModelMetadata
from models.onnx_graph import INPUT_NAME, OUTPUT_NAME

__all__ = ["OrtBackend", "make_session_options", "measure_variants", "RUN_VARIANTS"]

#: Names of the ways of calling the session compared by :func:`measure_variants`.
RUN_VARIANTS = (
    "run_plain",
    "run_reused_feed",
    "run_reused_feed_c",
    "run_with_ort_values",
    "run_with_ort_values_c",
    "iobinding_public",
    "iobinding",
)


def make_session_options() -> ort.SessionOptions:
    """Return session options tuned for one-row latency on a single thread."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OrtBackend:
    """Score one feature vector at a time with onnxruntime.

    Parameters
    ----------
    path : str or Path
        Model file; validated with :func:`models.loader.load_model`.
    feature_set : FeatureSetLike
        The running feature set (``.id``, ``.names``).

    Attributes
    ----------
    x : ndarray, float32, shape (1, F), C-contiguous
        Input row, allocated once and bound to the session.
    x_flat : ndarray, float32, shape (F,)
        1-D view of ``x``; the feature kernel writes into it.
    out : ndarray, float32, shape (1, 1)
        Output buffer bound to the session.
    metadata : ModelMetadata
        Model metadata.
    version : str
        ``metadata.model_version``.
    quantization : str
        ``metadata.quantization`` (``"fp32"`` / ``"int8-qdq"``).
    path : Path
        Model file.
    """

    #: backend name (:class:`engine.ports.Backend`)
    kind = "ort"
    #: no parity check: onnxruntime is the reference
    parity = None

    def __init__(self, path: str | Path, feature_set: FeatureSetLike) -> None:
        self.path = Path(path)
        model, meta = load_checked(self.path, feature_set)
        self.metadata: ModelMetadata = meta
        self.version: str = meta.model_version
        self.quantization: str = meta.quantization
        self.n_features: int = meta.n_features
        self.session = ort.InferenceSession(
            model.SerializeToString(), make_session_options(), providers=["CPUExecutionProvider"]
        )
        self.x = np.zeros((1, self.n_features), dtype=np.float32)
        self.x_flat = self.x.reshape(-1)
        assert np.shares_memory(self.x, self.x_flat)
        self.out = np.zeros((1, 1), dtype=np.float32)
        # OrtValues over the numpy buffers (CPU: no copy, memory shared).
        self._x_ov = ort.OrtValue.ortvalue_from_numpy(self.x)
        self._out_ov = ort.OrtValue.ortvalue_from_numpy(self.out)
        self._binding = self.session.io_binding()
        self._binding.bind_ortvalue_input(INPUT_NAME, self._x_ov)
        self._binding.bind_ortvalue_output(OUTPUT_NAME, self._out_ov)
        # Call the C++ session directly: skips the Python wrapper (graph-capture
        # checks, one frame) on every tick.  Falls back to the public method if a
        # future onnxruntime renames the private attributes.
        c_sess = getattr(self.session, "_sess", None)
        c_binding = getattr(self._binding, "_iobinding", None)
        if c_sess is not None and c_binding is not None:
            self._run_bound = c_sess.run_with_iobinding
            self._c_binding = c_binding
        else:  # pragma: no cover - depends on the onnxruntime version
            self._run_bound = lambda binding, _opts: self.session.run_with_iobinding(binding)
            self._c_binding = self._binding

    def run(self) -> float:
        """Return the score of the current ``x`` (in [0, 1]).

        The input and output are bound once; the call passes no feed dict and
        writes into ``out``.  Allocates: only the returned Python float.
        """
        self._run_bound(self._c_binding, None)
        return float(self.out[0, 0])

    def score_batch(self, X: np.ndarray) -> np.ndarray:
        """Return the scores of the rows of ``X`` (float32 (N, F)) as float32 (N,).

        For evaluation and checks, not the hot path (allocates).
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (N, {self.n_features}), got {X.shape}")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: X})[0][:, 0]

    def warmup(self, n: int = 2000) -> None:
        """Call :meth:`run` ``n`` times on the current ``x`` (content preserved)."""
        for _ in range(n):
            self.run()

    def __repr__(self) -> str:
        """Return a short description."""
        return f"OrtBackend({str(self.path)!r}, version={self.version!r})"


def _variant_callables(b: OrtBackend) -> dict[str, Callable[[], Any]]:
    sess = b.session
    c_sess = sess._sess
    x = b.x
    names = [OUTPUT_NAME]
    feed = {INPUT_NAME: x}
    x_ov = ort.OrtValue.ortvalue_from_numpy(x)
    ov_feed = {INPUT_NAME: x_ov}
    c_ov_feed = {INPUT_NAME: x_ov._get_c_value()}
    binding = b._binding
    return {
        # public API, new feed dict and output array per call
        "run_plain": lambda: float(sess.run(None, {INPUT_NAME: x})[0][0, 0]),
        # public API, feed dict and output-name list reused
        "run_reused_feed": lambda: float(sess.run(names, feed)[0][0, 0]),
        # C++ session, feed dict reused (skips the Python wrapper's checks)
        "run_reused_feed_c": lambda: float(c_sess.run(names, feed, None)[0][0, 0]),
        # public API, input OrtValue reused, output OrtValue allocated per call
        "run_with_ort_values": lambda: float(sess.run_with_ort_values(names, ov_feed)[0].numpy()[0, 0]),
        "run_with_ort_values_c": lambda: float(
            c_sess.run_with_ort_values(c_ov_feed, names, None)[0].numpy()[0, 0]
        ),
        # input and output bound once; public wrapper
        "iobinding_public": lambda: (sess.run_with_iobinding(binding), float(b.out[0, 0]))[1],
        # input and output bound once; C++ call (what OrtBackend.run does)
        "iobinding": b.run,
    }


def measure_variants(
    path: str | Path,
    feature_set: FeatureSetLike,
    rows: np.ndarray | None = None,
    n_calls: int = 50_000,
    n_warm: int = 5_000,
) -> dict[str, dict[str, float]]:
    """Return per-call latency (ns) of each way of calling the session on one row.

    Each variant is warmed ``n_warm`` calls, then ``n_calls`` calls are timed one
    by one with ``time.perf_counter_ns`` into a preallocated int64 array; the
    row is refreshed from ``rows`` before each call (like the live loop, the
    copy is outside the timed region).  Variants are interleaved in blocks so
    machine noise hits them alike.  Returns ``{variant: {"p50", "p90", "p99",
    "p999", "mean", "max"}}`` in ns; all variants are checked to give the same
    score as :meth:`OrtBackend.run`.
    """
    b = OrtBackend(path, feature_set)
    if rows is None:
        rows = np.random.default_rng(0).normal(size=(1024, b.n_features)).astype(np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    calls = _variant_callables(b)
    for fn in calls.values():  # same result, and warm-up
        for j in range(n_warm):
            b.x_flat[:] = rows[j % rows.shape[0]]
            fn()
    b.x_flat[:] = rows[0]
    ref = b.run()
    for name, fn in calls.items():
        if abs(fn() - ref) > 1e-7:
            raise AssertionError(f"variant {name} disagrees with iobinding")
    times = {name: np.empty(n_calls, dtype=np.int64) for name in calls}
    block = 1000
    clock = time.perf_counter_ns
    for start in range(0, n_calls, block):
        stop = min(start + block, n_calls)
        for name, fn in calls.items():
            t = times[name]
            for j in range(start, stop):
                b.x_flat[:] = rows[j % rows.shape[0]]
                t0 = clock()
                fn()
                t[j] = clock() - t0
    out: dict[str, dict[str, float]] = {}
    for name, t in times.items():
        p50, p90, p99, p999 = np.percentile(t, [50, 90, 99, 99.9])
        out[name] = {
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "p999": float(p999),
            "mean": float(t.mean()),
            "max": float(t.max()),
        }
    return out


def _main() -> None:  # pragma: no cover - measurement script

    ap = argparse.ArgumentParser(description="Measure per-call latency of ORT call variants.")
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    res = {}
    for q in ("fp32", "int8"):
        res[q] = measure_variants(default_model_path(q), DEFAULT_FEATURE_SET, n_calls=args.calls)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":  # pragma: no cover
    _main()
