"""Which backend scores: fused vs onnxruntime parity and ``--backend auto|ort|fused``.

Before a fused backend is used, :func:`check_parity` compares it with the
onnxruntime backend on >= 100,000 feature vectors: fp32 max abs diff <= 1e-5;
int8 max abs diff <= one *output quantization step*, the largest score change
one step of the last quantized activation can cause, ``0.25 * s_last * max
|W_out|`` (0.25 = max slope of the sigmoid); :func:`check_tick_kernel` checks
the composed per-tick kernel against batch features + the program.
:func:`select_backend` implements ``--backend auto|ort|fused``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.schema import N_REJECT_REASONS
from features.registry import kernels_for
from models.fused import FusedBackend
from models.loader import load_checked
from models.ort_backend import OrtBackend
from models.program import UnsupportedGraph
from models.tick_kernels import TickContext, tick_kernel_for
from replay.generator import default_data_path
from replay.reader import read_ticks

__all__ = [
    "BACKEND_KINDS",
    "PARITY_ROWS",
    "FP32_TOLERANCE",
    "ParityReport",
    "BackendChoice",
    "check_parity",
    "check_tick_kernel",
    "parity_vectors",
    "select_backend",
]

log = logging.getLogger("tickscore.fused")

BACKEND_KINDS = ("auto", "ort", "fused")
#: Feature vectors of the pre-use parity check.
PARITY_ROWS = 100_000
#: fp32 parity tolerance (max abs score difference).
FP32_TOLERANCE = 1e-5



@dataclass
class ParityReport:
    """Fused vs onnxruntime on the same feature vectors."""

    rows: int
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    passed: bool
    quantization: str
    lowering: str
    out_step: float | None = None
    max_steps: float | None = None
    seconds: float = 0.0
    #: the program sums u8 x s8 products in int16-saturated pairs, as onnxruntime does on this CPU
    saturated_pairs: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def describe(self) -> str:
        """Return a one-line summary."""
        s = (
            f"parity {'ok' if self.passed else 'FAILED'} on {self.rows:,} vectors: "
            f"max |fused - ort| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}"
        )
        if self.max_steps is not None:
            s += f"; {self.max_steps:.3g} output quantization steps of {self.out_step:.3g}"
        sat = "; u8s8 pair sums saturated as onnxruntime's on this CPU" if self.saturated_pairs else ""
        return s + f", lowering {self.lowering}{sat})"


def check_parity(fused: FusedBackend, ort_backend: Any, X: np.ndarray) -> ParityReport:
    """Return fused vs onnxruntime agreement on the rows of ``X`` (float32 (n, F)).

    fp32 graphs pass with max abs diff <= :data:`FP32_TOLERANCE`; quantized
    graphs with max abs diff <= one output quantization step
    (:attr:`FusedProgram.out_step`).
    """
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, dtype=np.float32)
    a = fused.program.score_rows(X)
    b = ort_backend.score_batch(X).astype(np.float64)
    d = np.abs(a - b)
    mx = float(d.max()) if d.size else 0.0
    prog = fused.program
    if prog.quantized:
        step = prog.out_step if prog.out_step else FP32_TOLERANCE
        tol = step
        steps = mx / step
    else:
        step, tol, steps = None, FP32_TOLERANCE, None
    ok = bool(np.isfinite(a).all()) and mx <= tol
    return ParityReport(
        rows=int(X.shape[0]), max_abs_diff=mx, mean_abs_diff=float(d.mean()) if d.size else 0.0,
        tolerance=float(tol), passed=ok, quantization=fused.quantization, lowering=prog.lowering,
        out_step=step, max_steps=steps, seconds=time.perf_counter() - t0,
        saturated_pairs=prog.saturated_pairs,
    )


_PARITY_CACHE: dict[str, np.ndarray] = {}


def parity_vectors(
    feature_set: Any,
    ticks: np.ndarray | None = None,
    n: int = PARITY_ROWS,
    seed: int = 0,
) -> np.ndarray:
    """Return >= ``n`` float32 feature vectors for the parity check.

    Features of ``ticks`` (the data about to be replayed) computed with the
    feature set's batch kernel, topped up with the embedded dataset's features
    when there are fewer than ``n`` accepted rows, plus 5 % rows drawn around
    the data's moments with wide tails (so clipping and saturation are hit).
    """
    key = getattr(feature_set, "id", str(feature_set))
    parts = []
    if ticks is not None and len(ticks):
        parts.append(_features_of(ticks, feature_set))
    have = sum(p.shape[0] for p in parts)
    if have < n:
        if key not in _PARITY_CACHE:
            _PARITY_CACHE[key] = _features_of(read_ticks(default_data_path()).ticks, feature_set)
        parts.append(_PARITY_CACHE[key])
    X = np.concatenate(parts)
    real = X[np.isfinite(X).all(axis=1)]
    if real.shape[0] == 0:
        raise ValueError("no finite feature vectors for the parity check")
    rng = np.random.default_rng(seed)
    n_real = max(n - n // 20, 1)
    idx = np.linspace(0, real.shape[0] - 1, n_real).astype(np.int64)
    base = real[idx]
    mu, sd = real.mean(axis=0), real.std(axis=0) + 1e-6
    extra = (mu + sd * rng.standard_t(3, size=(n - n_real + 1, real.shape[1])) * 2).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([base, extra]), dtype=np.float32)


_TICKS_CACHE: dict[str, np.ndarray] = {}
TICK_CHECK_ROWS = 20_000


def check_tick_kernel(
    fused: FusedBackend, feature_set: Any, ticks: np.ndarray | None = None, n: int = TICK_CHECK_ROWS
) -> dict[str, Any]:
    """Return whether the composed per-tick kernel equals batch features + the program.

    Runs the fused ``tick`` over the first ``n`` ticks (``ticks`` or the embedded
    dataset) from a fresh state and compares flags, feature vectors and scores
    with the feature set's ``compute_batch`` followed by the lowered program.
    This catches a fused kernel that does not compute the live features, e.g.
    a stale numba cache after the feature kernels changed (numba's cache does
    not track functions of other files).  Keys: ``passed``, ``rows``,
    ``max_feature_diff``, ``max_score_diff``, ``flags_equal``.
    """
    if ticks is None or len(ticks) == 0:
        if "default" not in _TICKS_CACHE:
            _TICKS_CACHE["default"] = np.ascontiguousarray(read_ticks(default_data_path()).ticks[:n])
        ticks = _TICKS_CACHE["default"]
    ticks = np.ascontiguousarray(ticks[:n])
    kern = kernels_for(feature_set)
    n_inst = int(ticks["instrument"].max()) + 1
    F = len(feature_set.names)
    params = feature_set.params_array()
    fs0, is0 = kern.new_state(n_inst)
    X = np.empty((len(ticks), F), dtype=np.float32)
    flags = np.empty(len(ticks), dtype=np.int32)
    kern.compute_batch(ticks, fs0, is0, params, X, flags, np.zeros(N_REJECT_REASONS, dtype=np.int64))
    fstate, istate = kern.new_state(n_inst)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    mi, mf = fused.program.new_arrays()
    tick = tick_kernel_for(feature_set, fstate.ndim, istate.ndim)
    tctx = TickContext(fstate, istate, params, counters, mi, mf, ticks)
    ctx = tctx.addr
    xo = fused.program.x_offset
    got_flags = np.empty(len(ticks), dtype=np.int64)
    got_x = np.zeros((len(ticks), F), dtype=np.float32)
    got_s = np.zeros(len(ticks), dtype=np.float64)
    for i in range(len(ticks)):
        got_flags[i], got_s[i] = tick(i, ctx)
        got_x[i] = mf[xo : xo + F]
    ok = flags >= 0
    flags_equal = bool(np.array_equal(got_flags, flags))
    dx = float(np.max(np.abs(got_x[ok] - X[ok]))) if ok.any() else 0.0
    ref = fused.program.score_rows(X[ok]) if ok.any() else np.zeros(0)
    ds = float(np.max(np.abs(got_s[ok] - ref))) if ok.any() else 0.0
    return {
        "passed": flags_equal and dx == 0.0 and ds <= 1e-7,
        "rows": int(len(ticks)),
        "flags_equal": flags_equal,
        "max_feature_diff": dx,
        "max_score_diff": ds,
    }


def _features_of(ticks: np.ndarray, feature_set: Any) -> np.ndarray:
    kern = kernels_for(feature_set)
    n_inst = int(ticks["instrument"].max()) + 1 if len(ticks) else 0
    fstate, istate = kern.new_state(n_inst)
    X = np.empty((len(ticks), len(feature_set.names)), dtype=np.float32)
    flags = np.empty(len(ticks), dtype=np.int32)
    counters = np.zeros(N_REJECT_REASONS, dtype=np.int64)
    params = feature_set.params_array()
    kern.compute_batch(np.ascontiguousarray(ticks), fstate, istate, params, X, flags, counters)
    return X[flags >= 0]


@dataclass
class BackendChoice:
    """Outcome of :func:`select_backend`: the backend to use and why."""

    backend: Any
    kind: str
    requested: str
    reason: str
    parity: ParityReport | None = None
    messages: list[str] = field(default_factory=list)
    parity_X: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (for run summaries)."""
        return {
            "requested": self.requested,
            "used": self.kind,
            "reason": self.reason,
            "parity": self.parity.as_dict() if self.parity else None,
        }


def select_backend(
    kind: str,
    path: str | Path,
    feature_set: Any,
    *,
    parity_X: np.ndarray | None = None,
    ticks: np.ndarray | None = None,
    logger: Callable[[str], None] | None = None,
) -> BackendChoice:
    """Return the backend for ``kind`` in ``auto | ort | fused`` and the reason for it.

    * ``ort``: onnxruntime.
    * ``fused``: the fused backend after the checks pass (graph supported, model
      parity with ort on ``parity_X`` or :func:`parity_vectors`, per-tick kernel
      equal to batch features + model, :func:`check_tick_kernel`); otherwise
      falls back to ``ort``, logged with the reason.
    * ``auto`` (the default of the CLI and config): the same rule, fused when
      possible, else ort.

    Raises :class:`models.metadata.ModelError` if the model cannot be loaded at
    all (missing file, wrong feature set, ...), whatever ``kind``.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    say = logger or (lambda m: log.info(m))
    model, meta = load_checked(path, feature_set)
    ort_b = OrtBackend(path, feature_set)
    if kind == "ort":
        return BackendChoice(ort_b, "ort", kind, "requested")
    try:
        fused = FusedBackend(path, feature_set, model=model, metadata=meta)
    except UnsupportedGraph as exc:
        msg = f"fused backend refused: {exc}; falling back to onnxruntime"
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, messages=[msg])
    X = parity_X if parity_X is not None else parity_vectors(feature_set, ticks)
    rep = check_parity(fused, ort_b, X)
    fused.parity = rep
    if not rep.passed:
        msg = f"fused backend {rep.describe()}; falling back to onnxruntime"
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, parity=rep, messages=[msg], parity_X=X)
    try:
        tk = check_tick_kernel(fused, feature_set, ticks)
    except Exception as exc:  # noqa: BLE001 - e.g. a feature set without an apply_tick kernel
        msg = f"fused per-tick kernel unavailable: {exc}; falling back to onnxruntime"
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, parity=rep, messages=[msg], parity_X=X)
    if not tk["passed"]:
        msg = (
            f"fused per-tick kernel differs from the batch features + model on {tk['rows']:,} ticks "
            f"(flags equal {tk['flags_equal']}, max feature diff {tk['max_feature_diff']:.3g}, "
            f"max score diff {tk['max_score_diff']:.3g}); a stale numba cache? falling back to onnxruntime"
        )
        say(msg)
        return BackendChoice(ort_b, "ort", kind, msg, parity=rep, messages=[msg], parity_X=X)
    msg = f"using fused backend ({meta.quantization}); {rep.describe()}"
    say(msg)
    return BackendChoice(fused, "fused", kind, msg, parity=rep, messages=[msg], parity_X=X)
