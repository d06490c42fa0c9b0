"""Fused backend: features and model in one numba call per tick.

The ONNX graph is lowered to a small *program* (flat int32/float32 arrays) that
one cached ``@njit`` interpreter runs; the per-tick kernel calls the feature
set's ``apply_tick`` and then the program, and writes the score into a
preallocated array.  No code is generated per model, so a new model (hot
reload) costs no JIT compilation: it is only new arrays.

The parts, one module each:

* :mod:`models.program`: a lowered model as two flat arrays (:class:`~models.program.FusedProgram`)
  and the cached ``@njit`` interpreter that runs them;
* :mod:`models.lowering`: ONNX graph -> program (which graphs, and why int8
  results match onnxruntime);
* :mod:`models.tick_kernels`: the per-tick kernels (feature update + program in
  one call) and their :class:`~models.tick_kernels.TickContext`;
* this module: :class:`FusedBackend`, the backend the agent runs;
* :mod:`models.backend_choice`: parity with onnxruntime and ``--backend
  auto|ort|fused`` selection (it serves both backends).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from models.loader import FeatureSetLike, load_checked
from models.lowering import lower_model
from models.metadata import ModelError, ModelMetadata
from models.program import _run_program
from models.tick_kernels import TickContext, tick_kernel_for

__all__ = ["FusedBackend"]

# --------------------------------------------------------------------------- backend
class FusedBackend:
    """Fused features + model backend (same surface as :class:`models.ort_backend.OrtBackend`).

    Attributes
    ----------
    x_flat : ndarray float32 (F,)
        The model input (a view into ``mf``); the feature kernel writes it.
    mi, mf : ndarray
        This instance's program arrays (constants and registers).
    version, quantization, metadata, path, program, parity
    """

    kind = "fused"

    def __init__(
        self,
        path: str | Path,
        feature_set: FeatureSetLike,
        *,
        model: onnx.ModelProto | None = None,
        metadata: ModelMetadata | None = None,
    ) -> None:
        self.path = Path(path)
        if model is None or metadata is None:
            model, metadata = load_checked(self.path, feature_set)
        self.metadata = metadata
        self.version: str = metadata.model_version
        self.quantization: str = metadata.quantization
        self.n_features = metadata.n_features
        self.program = lower_model(model, str(self.path))
        if self.program.n_features != self.n_features:
            raise ModelError(
                f"{self.path}: graph input width {self.program.n_features} != {self.n_features}"
            )
        self.feature_set = feature_set
        self.mi, self.mf = self.program.new_arrays()
        xo = self.program.x_offset
        self.x_flat = self.mf[xo : xo + self.n_features]
        self.parity: Any = None  # models.backend_choice.ParityReport once checked

    def run(self) -> float:
        """Return the score of the current ``x_flat`` (the model only). Allocates: the float."""
        return _run_program(self.mi, self.mf)

    def make_tick(self, fstate, istate, params, counters, ticks=None) -> tuple[Callable, TickContext]:
        """Return ``(tick, ctx)``: the fused kernel and its context over these arrays.

        ``tick(i, ctx.addr) -> (flags, score)`` validates tick ``i``, updates the
        feature state, runs the model and writes the score into
        ``mf[program.score_index]``: one numba call per tick.
        """
        kernel = tick_kernel_for(self.feature_set, np.ndim(fstate), np.ndim(istate))
        return kernel, TickContext(fstate, istate, params, counters, self.mi, self.mf, ticks)

    def score_batch(self, X: np.ndarray) -> np.ndarray:
        """Return the scores of the rows of ``X`` (float32 (N, F)) as float32 (N,)."""
        return self.program.score_rows(X).astype(np.float32)

    def warmup(self, n: int = 2000) -> None:
        """Call :meth:`run` ``n`` times (content of ``x_flat`` preserved)."""
        for _ in range(n):
            self.run()

    def __repr__(self) -> str:
        """Return a short description."""
        lowering = self.program.lowering
        return f"FusedBackend({str(self.path)!r}, version={self.version!r}, lowering={lowering!r})"
