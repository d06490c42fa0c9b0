"""Loading replay runs (summary.json + latency_raw.npz) and their derived statistics."""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from replay.latency import LatencyStats, latency_stats

SERVICE_LABEL = "service time"
#: Label of the paced-run ``t_out - intended`` series.
CO_LABEL = "from intended send time (CO-corrected)"

#: Percentiles gated by ``--check``.
CHECKED = ("p50", "p99")

_STAGES = ("features", "model", "publish")
_FUSED_STAGES = ("features + model", "publish")  # the fused backend runs both in one call
_STAGE_COLORS = {"features": "#4C78A8", "model": "#F58518", "publish": "#54A24B",
                 "features + model": "#4C78A8"}  # fmt: skip
#: Percentile bands of total latency for the stage breakdown: (label, low %, high %).
_BANDS = (("p0–50", 0.0, 50.0), ("p50–90", 50.0, 90.0), ("p90–99", 90.0, 99.0),
          ("p99–99.9", 99.0, 99.9), (">p99.9", 99.9, 100.0))
DEFAULT_OUT = "report"
DEFAULT_MAX_REGRESS = "10%"


class RunLoadError(ValueError):
    """A run directory is missing, incomplete or corrupt (message names dir and file)."""


# ---------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class StageStats:
    """Stage timings (ns) of the sampled ticks after warm-up: features, model, publish, total."""

    count: int
    stats: dict[str, LatencyStats]
    samples: dict[str, np.ndarray] = field(repr=False)
    #: the stages in order: features, model, publish; or, when features and model are one
    #: call (the fused backend: no clock reading between them), "features + model", publish
    stages: tuple[str, ...] = _STAGES


@dataclass(frozen=True, eq=False)
class Run:
    """One replay run loaded from its directory; latency arrays in ns (int64).

    Attributes
    ----------
    path : Path
        The run directory.
    name : str
        Short label (the directory name).
    summary : dict
        Decoded ``summary.json``.
    t_in, t_out : ndarray of int64
        Ingress / publish-returned clock per scored tick, seq order (all ticks,
        warm-up included).
    warmup : int
        Number of leading ticks excluded from the statistics.
    intended : ndarray of int64 or None
        Intended release time per scored tick (paced runs only).
    stages : dict of str to ndarray, or None
        ``stage_seq``, ``stage_t_in``, ``stage_t_features``, ``stage_t_model``,
        ``stage_t_out`` when the run recorded stage samples.
    """

    path: Path
    name: str
    summary: dict
    t_in: np.ndarray
    t_out: np.ndarray
    warmup: int
    intended: np.ndarray | None = None
    stages: dict[str, np.ndarray] | None = None

    @property
    def paced(self) -> bool:
        """Return whether the run was paced (has intended release times)."""
        return self.intended is not None

    @cached_property
    def latency_ns(self) -> np.ndarray:
        """Return the service time ``t_out - t_in`` of every scored tick, warm-up included."""
        return self.t_out - self.t_in

    @cached_property
    def service_ns(self) -> np.ndarray:
        """Return the service time after the warm-up (the series the statistics use)."""
        return self.latency_ns[self.warmup:]

    @cached_property
    def corrected_all_ns(self) -> np.ndarray | None:
        """Return ``t_out - intended`` of every scored tick (paced runs), warm-up included."""
        return None if self.intended is None else self.t_out - self.intended

    @cached_property
    def corrected_ns(self) -> np.ndarray | None:
        """Return the CO-corrected latency after the warm-up, or None for unpaced runs."""
        c = self.corrected_all_ns
        return None if c is None else c[self.warmup:]

    @cached_property
    def stats(self) -> LatencyStats:
        """Return the service-time statistics, computed exactly as the replay does."""
        return latency_stats(self.service_ns)

    @cached_property
    def corrected_stats(self) -> LatencyStats | None:
        """Return the CO-corrected statistics, or None for unpaced runs."""
        c = self.corrected_ns
        return None if c is None else latency_stats(c)

    @cached_property
    def stage_stats(self) -> StageStats | None:
        """Return the per-stage timings of the sampled ticks after warm-up, or None."""
        s = self.stages
        if not s or len(s["stage_seq"]) == 0:
            return None
        keep = (s["stage_seq"] >= self.warmup) & (s["stage_t_features"] > 0) & (s["stage_t_model"] > 0)
        if not keep.any():
            return None
        t_in, t_f, t_m, t_o = (s[k][keep] for k in
                               ("stage_t_in", "stage_t_features", "stage_t_model", "stage_t_out"))
        if (t_m == t_f).all():  # one call: say so rather than attribute 0 to the model
            samples = {"features + model": t_m - t_in, "publish": t_o - t_m, "total": t_o - t_in}
            stages = _FUSED_STAGES
        else:
            samples = {"features": t_f - t_in, "model": t_m - t_f, "publish": t_o - t_m,
                       "total": t_o - t_in}  # fmt: skip
            stages = _STAGES
        stats = {k: latency_stats(v) for k, v in samples.items()}
        return StageStats(int(keep.sum()), stats, samples, stages)

    def summary_mismatches(self) -> list[str]:
        """Return the ``latency_ns`` keys of summary.json that differ from the raw-array statistics."""
        got = self.stats.as_contract()
        want = self.summary.get("latency_ns") or {}
        bad = []
        for k, v in got.items():
            w = want.get(k)
            if w is None:
                continue
            if k == "mean":
                if not math.isclose(float(w), v, rel_tol=1e-9, abs_tol=1e-6):
                    bad.append(k)
            elif int(w) != v:
                bad.append(k)
        return bad


def _read_summary(d: Path) -> dict:
    f = d / "summary.json"
    if not f.is_file():
        raise RunLoadError(
            f"run dir {d}: missing summary.json (expected the output of `tickscore replay --out {d}`)"
        )
    try:
        summary = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunLoadError(f"run dir {d}: summary.json is corrupt: {exc}") from None
    if not isinstance(summary, dict):
        raise RunLoadError(f"run dir {d}: summary.json is corrupt: top level is not an object")
    return summary


def _read_raw(d: Path) -> dict[str, np.ndarray]:
    f = d / "latency_raw.npz"
    if not f.is_file():
        raise RunLoadError(
            f"run dir {d}: missing latency_raw.npz (raw per-tick latencies; "
            "written by `tickscore replay --out DIR`)"
        )
    try:
        with np.load(f, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RunLoadError(f"run dir {d}: latency_raw.npz is corrupt: {exc}") from None
    for k in ("t_in", "t_out"):
        if k not in raw:
            raise RunLoadError(f"run dir {d}: latency_raw.npz has no {k!r} array")
    return raw


def load_run(path: str | Path) -> Run:
    """Load a replay run directory.

    Parameters
    ----------
    path : str or Path
        Directory written by ``tickscore replay --out DIR``.

    Returns
    -------
    Run

    Raises
    ------
    RunLoadError
        If the directory, ``summary.json`` or ``latency_raw.npz`` is missing or
        corrupt; the message names the directory and the file.
    """
    d = Path(path)
    if not d.is_dir():
        raise RunLoadError(f"run dir {d}: no such directory")
    summary = _read_summary(d)
    raw = _read_raw(d)
    t_in = np.asarray(raw["t_in"], dtype=np.int64).ravel()
    t_out = np.asarray(raw["t_out"], dtype=np.int64).ravel()
    if t_in.shape != t_out.shape:
        raise RunLoadError(
            f"run dir {d}: latency_raw.npz is corrupt: t_in has {t_in.size} values, t_out {t_out.size}"
        )
    if "warmup" in raw:
        warm = int(raw["warmup"])
    else:
        warm = int(summary.get("warmup_ticks_excluded", 0))
    warm = max(0, min(warm, t_in.size))
    intended = None
    if "intended" in raw:
        intended = np.asarray(raw["intended"], dtype=np.int64).ravel()
        if intended.shape != t_in.shape:
            raise RunLoadError(
                f"run dir {d}: latency_raw.npz is corrupt: intended has {intended.size} values, "
                f"t_in {t_in.size}"
            )
    stage_keys = ("stage_seq", "stage_t_in", "stage_t_features", "stage_t_model", "stage_t_out")
    stages = None
    if all(k in raw for k in stage_keys):
        stages = {k: np.asarray(raw[k], dtype=np.int64).ravel() for k in stage_keys}
        if len({v.size for v in stages.values()}) != 1:
            stages = None
    name = d.resolve().name or str(d)
    return Run(d, name, summary, t_in, t_out, warm, intended, stages)


def _display_names(runs: Sequence[Run]) -> list[str]:
    """Return unique short labels: dir name, else parent/name, else name#i."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    names = [f"{r.path.resolve().parent.name}/{r.name}" for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.name}#{i + 1}" for i, r in enumerate(runs)]
