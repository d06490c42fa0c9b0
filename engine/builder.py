"""One path from a model file to a scoring agent, for the replay and the live service alike.

The model's metadata names its feature set; the feature set names its kernels
(:func:`features.registry.kernels_for`: L1, trade-only or the L3 book); the
backend (``auto`` / ``ort`` / ``fused``) is chosen by
:func:`models.backend_choice.select_backend` with its parity checks run on ticks of the
model's own event shape.  :func:`load_scoring` does that once;
:func:`build_agent` builds the :class:`engine.scorer.ScoringAgent` from it.
Sources differ (file arrays, ZeroMQ, Aeron); the agent, kernels and sinks do
not, which is what makes "live equals replay" hold tick by tick.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.scorer import ScoringAgent
from features.featureset import get_feature_set
from features.registry import kernels_for
from models.backend_choice import select_backend
from models.metadata import read_metadata
from replay.generator_l3 import write_l3, write_trades
from replay.reader import read_ticks

__all__ = ["Scoring", "load_scoring", "build_agent", "shape_sample_ticks", "model_feature_set"]


@dataclass
class Scoring:
    """A loaded model with its feature set, kernels and chosen backend."""

    model_path: str
    feature_set: Any  # features.featureset.FeatureSet
    kernels: Any  # features.registry.Kernels
    choice: Any  # models.backend_choice.BackendChoice
    requested: str  # the backend kind asked for (auto / ort / fused): what a reload uses

    @property
    def backend(self):
        return self.choice.backend

    @property
    def shape(self) -> str:
        """The event shape the feature set is made for (``l1``, ``trades``, ``l3``)."""
        return self.feature_set.name


def model_feature_set(model_path: str | Path):
    """Return the feature set a model file was trained on (from its metadata)."""
    return get_feature_set(read_metadata(model_path).feature_set_id)


def shape_sample_ticks(family: str, n_events: int = 20_000) -> np.ndarray | None:
    """Return seeded ticks of ``family``'s event shape for the backend checks (None: the default data).

    The live service has no data file at start-up; the fused backend's parity
    and per-tick checks then run on the project's generated market of the same
    shape (the L1 check uses the embedded dataset).
    """
    if family == "l1":
        return None

    with tempfile.TemporaryDirectory(prefix="tickscore-sample-") as tmp:
        path = Path(tmp) / f"{family}.parquet"
        (write_l3 if family == "l3" else write_trades)(path, n_events)
        return np.ascontiguousarray(read_ticks(path, shape=family).ticks)


def load_scoring(
    model_path: str | Path,
    backend: str = "auto",
    *,
    crossing_add: str | None = None,
    ticks: np.ndarray | None = None,
    logger: Callable[[str], None] | None = None,
) -> Scoring:
    """Load ``model_path`` with the kernels of its feature set and the backend ``backend``.

    ``crossing_add`` is the L3 book's crossing-add policy of the data (a mapping
    key; ignored by the other shapes).  ``ticks`` are the data about to be scored
    (the replay's first ticks); without them the checks use
    :func:`shape_sample_ticks`.  Raises ``ModelError`` / ``ValueError`` with a
    clear message for a model that cannot be used.
    """
    path = str(model_path)
    fs = model_feature_set(path)
    kern = kernels_for(fs, crossing_add=crossing_add)
    if ticks is None:
        ticks = shape_sample_ticks(fs.name)
    say = logger or (lambda m: print(f"tickscore: backend {backend}: {m}", file=sys.stderr))
    choice = select_backend(backend, path, fs, ticks=ticks, logger=say)
    if backend == "ort":
        say("onnxruntime (requested)")
    return Scoring(model_path=path, feature_set=fs, kernels=kern, choice=choice, requested=backend)


def build_agent(scoring: Scoring, source, sinks: Sequence, symbols: Sequence[str], **kw: Any):
    """Return the :class:`engine.scorer.ScoringAgent` of ``scoring`` reading ``source``."""
    return ScoringAgent(
        source,
        scoring.backend,
        sinks,
        symbols,
        scoring.feature_set.params_array(),
        update=scoring.kernels.update_tick,
        new_state=scoring.kernels.new_state,
        backend_kind=scoring.requested,
        feature_set=scoring.feature_set,
        parity_X=scoring.choice.parity_X,
        **kw,
    )
