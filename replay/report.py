"""Compare replay runs: percentile table, plots, self-contained HTML and a regression gate.

Input is one or more run directories written by ``tickscore replay --out DIR``
(``summary.json`` + ``latency_raw.npz``, see :func:`replay.latency.write_outputs`).
Every latency number is recomputed from the raw int64 arrays with
:func:`replay.latency.latency_stats`, after dropping the same warm-up the replay
dropped, so the report's table equals the replay's printed table and
``summary.json`` to the nanosecond.

Series per run:

* **service time**: ``t_out - t_in`` per scored tick (the replay's "service" column);
* **from intended send time (CO-corrected)**: ``t_out - intended`` for paced runs,
  where ``intended`` is when the tick should have been released; a stall then
  shows up in every tick queued behind it, so coordinated omission is not hidden.

Command line (wired into ``tickscore`` by :func:`add_report_parser` / :func:`cmd_report`)::

    tickscore report RUN_DIR [RUN_DIR ...] [--out DIR] [--html] [--no-plots]
    tickscore report --check BASELINE_DIR CANDIDATE_DIR [--max-regress 10%]
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np

from replay.latency import PERCENTILES, LatencyStats, latency_stats, percentile_axis, percentile_curve

__all__ = [
    "CO_LABEL",
    "SERVICE_LABEL",
    "Run",
    "RunLoadError",
    "StageStats",
    "add_report_parser",
    "check_regression",
    "cmd_report",
    "compare_table",
    "load_run",
    "main",
    "parse_max_regress",
    "stage_table",
    "write_report",
]

#: Label of the per-tick ``t_out - t_in`` series.
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
_DEFAULT_OUT = "report"
_DEFAULT_MAX_REGRESS = "10%"


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


# ---------------------------------------------------------------------------- tables


def _us(ns: float) -> str:
    # Same format as replay.latency.format_table, so the tables agree character for character.
    return f"{ns / 1000.0:,.2f}"


def _ratio(value: float, base: float) -> str:
    if not base or not math.isfinite(value) or not math.isfinite(base):
        return "-"
    return f"{value / base:.2f}x"


def _speed(s: dict) -> str:
    sp = s.get("speed", "max")
    if isinstance(sp, int | float) and not isinstance(sp, bool):
        return f"{sp:g}x"
    return str(sp)


def _wall(w: float) -> str:
    return f"{w:.3f}" if w >= 1 or w == 0 else f"{w:.3g}"


def _pinned(s: dict) -> str:
    pinned = (s.get("host") or {}).get("pinned") or []
    return ",".join(str(c) for c in pinned) if pinned else "none"


@dataclass
class _Column:
    run: str
    kind: str  # "service" | "from intended" | "ratio"
    cells: dict[str, str]


@dataclass
class _Grid:
    rows: list[tuple[str, str | None]]  # (label, direction: "lower" | "higher" | None)
    columns: list[_Column]
    first: str


def _latency_cells(st: LatencyStats) -> dict[str, float]:
    d: dict[str, float] = {f"p{p:g}": st.percentiles[k] for k, p in PERCENTILES.items()}
    d["max"] = st.max
    d["mean"] = st.mean
    return d


def _grid(runs: Sequence[Run]) -> _Grid:
    """Build the comparison grid shared by the text and HTML tables."""
    lat_rows = [f"p{p:g}" for p in PERCENTILES.values()] + ["max", "mean"]
    rows: list[tuple[str, str | None]] = [("count", None)]
    rows += [(r, "lower") for r in lat_rows]
    rows += [("ticks/s", "higher"), ("wall s", None), ("ticks", None), ("scores", None),
             ("rejected", None), ("dropped", None), ("warm-up", None), ("backend", None),
             ("mode", None), ("model", None), ("quantization", None), ("cpus", None),
             ("pinned", None), ("speed", None)]
    names = _display_names(runs)
    base = runs[0]
    base_lat = _latency_cells(base.stats)
    base_cor = _latency_cells(base.corrected_stats) if base.corrected_stats else None
    base_tps = float(base.summary.get("throughput_tps", 0.0) or 0.0)
    cols: list[_Column] = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        s = run.summary
        model = s.get("model") or {}
        tps = float(s.get("throughput_tps", 0.0) or 0.0)
        lat = _latency_cells(run.stats)
        cells = {"count": f"{run.stats.count:,}"}
        cells.update({k: _us(v) for k, v in lat.items()})
        cells.update({
            "ticks/s": f"{tps:,.0f}",
            "wall s": _wall(float(s.get("wall_s", 0.0))),
            "ticks": f"{int(s.get('ticks', 0)):,}",
            "scores": f"{int(s.get('scores', 0)):,}",
            "rejected": f"{int(s.get('rejected', 0)):,}",
            "dropped": f"{int(s.get('dropped', 0)):,}",
            "warm-up": f"{run.warmup:,}",
            "backend": str(s.get("backend", "?")),
            "mode": str(s.get("mode", "?")),
            "model": str(model.get("version", "?")),
            "quantization": str(model.get("quantization", "?")),
            "cpus": str((s.get("host") or {}).get("cpus", "?")),
            "pinned": _pinned(s),
            "speed": _speed(s),
        })
        cols.append(_Column(name, "service", cells))
        if i > 0:
            rc = {k: _ratio(v, base_lat[k]) for k, v in lat.items()}
            rc["ticks/s"] = _ratio(tps, base_tps)
            cols.append(_Column(name, "ratio", rc))
        if run.corrected_stats is not None:
            cor = _latency_cells(run.corrected_stats)
            cc = {"count": f"{run.corrected_stats.count:,}"}
            cc.update({k: _us(v) for k, v in cor.items()})
            cc["ticks/s"] = cells["ticks/s"]
            cols.append(_Column(name, "from intended", cc))
            if i > 0 and base_cor is not None:
                cols.append(_Column(name, "ratio", {k: _ratio(v, base_cor[k]) for k, v in cor.items()}))
    return _Grid(rows, cols, names[0])


def _legend_lines(runs: Sequence[Run], first: str) -> list[str]:
    lines = [f"service        = {SERVICE_LABEL}: t_out - t_in per tick (the replay table's 'service')"]
    if any(r.paced for r in runs):
        lines.append(f"from intended  = {CO_LABEL}: t_out - intended release time (paced runs)")
    if len(runs) > 1:
        lines.append(f"ratio          = this run / {first}, same series (latency: lower is better, "
                     "ticks/s: higher is better)")
    return lines


def compare_table(runs: Sequence[Run]) -> str:
    """Return the side-by-side comparison table of ``runs`` (latency in µs).

    One ``service`` column per run, a ``from intended`` column for paced runs,
    and for every later run a ``ratio`` column against the first run's same
    series.  Latency rows use the format of :func:`replay.latency.format_table`.
    """
    if not runs:
        raise ValueError("compare_table needs at least one run")
    g = _grid(runs)
    label_w = max(14, *(len(r) + 2 for r, _ in g.rows))
    widths = [max(12, len(c.run) + 2, len(c.kind) + 2, *(len(v) + 2 for v in c.cells.values()))
              for c in g.columns]
    head1 = f"{'latency (µs)':<{label_w}}" + "".join(
        f"{c.run:>{w}}" for c, w in zip(g.columns, widths, strict=True))
    head2 = f"{'':<{label_w}}" + "".join(f"{c.kind:>{w}}" for c, w in zip(g.columns, widths, strict=True))
    lines = [head1, head2, "-" * len(head1)]
    sections = {"ticks/s": "-", "backend": "-"}
    for label, _ in g.rows:
        if label in sections:
            lines.append("")
        lines.append(f"{label:<{label_w}}" + "".join(
            f"{c.cells.get(label, ''):>{w}}" for c, w in zip(g.columns, widths, strict=True)).rstrip())
    lines.append("")
    lines += _legend_lines(runs, g.first)
    return "\n".join(lines)


def stage_table(runs: Sequence[Run]) -> str:
    """Return the per-stage table: p50/p99/mean (µs) and share of the mean per run."""
    names = _display_names(runs)
    head = f"{'stage (µs)':<29}{'sampled':>9}{'p50':>11}{'p99':>11}{'mean':>11}{'share':>8}"
    lines = [head, "-" * len(head)]
    any_stage = False
    for run, name in zip(runs, names, strict=True):
        ss = run.stage_stats
        if ss is None:
            lines.append(f"{name:<29}  (no stage samples)")
            continue
        any_stage = True
        total_mean = ss.stats["total"].mean or 1.0
        for j, stage in enumerate((*ss.stages, "total")):
            st = ss.stats[stage]
            label = f"{name if j == 0 else '':<12}{stage:<17}"
            lines.append(
                f"{label:<29}{ss.count:>9,}{_us(st.percentiles['p50']):>11}{_us(st.percentiles['p99']):>11}"
                f"{_us(st.mean):>11}{100.0 * st.mean / total_mean:>7.0f}%"
            )
    if any_stage:
        lines.append("")
        lines.append("every 64th tick after warm-up; features = kernel incl. ingest, model = backend run "
                     "(fused: features + model, one call), publish = encode + send")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- check


def parse_max_regress(text: str | float | Fraction) -> Fraction:
    """Return the allowed regression as an exact fraction: ``"10%"`` and ``"0.1"`` give 1/10.

    Raises
    ------
    ValueError
        For anything that is not a finite non-negative number or percentage, and
        for a bare number above 1 (write ``"150%"``, not ``"1.5"`` vs ``"150"``).
    """
    if isinstance(text, Fraction):
        value = text
    elif isinstance(text, int | float) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise ValueError(f"--max-regress must be finite, got {text!r}")
        value = Fraction(repr(float(text)))
    elif isinstance(text, str):
        t = text.strip()
        pct = t.endswith("%")
        num = t[:-1].strip() if pct else t
        try:
            value = Fraction(num)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"--max-regress takes a percentage like 10% or a fraction like 0.1, got {text!r}"
            ) from None
        if pct:
            value /= 100
        elif value > 1:
            raise ValueError(
                f"--max-regress {text!r} is ambiguous: write {t}% for {t} percent "
                f"(a bare number is a fraction, at most 1)"
            )
    else:
        raise ValueError(f"--max-regress takes a percentage or fraction, got {text!r}")
    if value < 0:
        raise ValueError(f"--max-regress must not be negative, got {text!r}")
    if value > 100:
        raise ValueError(f"--max-regress {text!r} is implausibly large (more than 10000%)")
    return value


def _pct(r: Fraction) -> str:
    return f"{float(r) * 100:g}%"


def check_regression(
    baseline: Run, candidate: Run, max_regress: str | float | Fraction
) -> tuple[bool, list[str]]:
    """Return whether the candidate's service-time p50 and p99 are within the allowed regression.

    Parameters
    ----------
    baseline, candidate : Run
    max_regress : str, float or Fraction
        Allowed relative increase, e.g. ``"10%"``, ``"0.1"`` or ``0.1``.

    Returns
    -------
    ok : bool
        True if every checked percentile satisfies
        ``candidate <= baseline * (1 + max_regress)`` (exact rational arithmetic
        on the integer ns values, so the boundary itself passes).
    messages : list of str
        One line per checked percentile, starting with ``ok`` or ``FAIL``, with
        value, baseline, ratio and limit.
    """
    r = parse_max_regress(max_regress)
    limit = 1 + r
    ok = True
    messages = []
    for key in CHECKED:
        label = f"p{PERCENTILES[key]:g}"
        b = baseline.stats.percentiles[key]
        c = candidate.stats.percentiles[key]
        passed = Fraction(c) <= Fraction(b) * limit
        ratio = f"{c / b:.3f}x" if b else ("1.000x" if c == 0 else "inf")
        rel = "<=" if passed else ">"
        msg = (
            f"{'ok  ' if passed else 'FAIL'} {label} {SERVICE_LABEL}: candidate {_us(c)} µs vs baseline "
            f"{_us(b)} µs = {ratio} {rel} limit {float(limit):.3f}x (+{_pct(r)})"
        )
        ok &= passed
        messages.append(msg)
    return ok, messages


# ---------------------------------------------------------------------------- plots


def _plt():
    import matplotlib  # deferred: matplotlib only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib only when a plot is drawn

    return plt


def _plot_percentiles(runs: Sequence[Run], names: list[str], path: Path) -> Path:
    """Overlay percentile curves (service solid, CO-corrected dashed) on a log 1/(1-p) axis."""
    plt = _plt()

    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    max_n = 10
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        color = f"C{i % 10}"
        series = [(run.service_ns, run.stats, "-", SERVICE_LABEL)]
        if run.corrected_ns is not None and run.corrected_stats is not None:
            series.append((run.corrected_ns, run.corrected_stats, "--", CO_LABEL))
        for values, st, ls, label in series:
            if len(values) == 0:
                continue
            x, y = percentile_curve(values, 6, st.max)
            max_n = max(max_n, float(x[-1]))
            ax.plot(x, y, ls, color=color, linewidth=1.6, label=f"{name}: {label}")
            px = [1.0 / (1.0 - p / 100.0) for p in PERCENTILES.values()]
            py = [st.percentiles[k] / 1000.0 for k in PERCENTILES]
            keep = [j for j, xx in enumerate(px) if xx <= len(values)]
            ax.plot([px[j] for j in keep], [py[j] for j in keep], "o", color=color, ms=3.5)
    percentile_axis(ax, max_n)
    ax.set_xlabel("percentile (log 1/(1-p) axis); dots = reported p50 … p99.99; curves end at max")
    ax.set_ylabel("latency (µs, log)")
    ax.set_title("tick-to-decision latency by percentile")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", axis="y", alpha=0.15)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _nice_width(target: float) -> float:
    """Return the largest 1/2/5 x 10^k not above ``target`` (seconds)."""
    if target <= 0:
        return 1e-6
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        w = m * 10.0**k
        if w <= target * (1 + 1e-9):
            return w
    return 10.0**k


def _time_bins(duration_s: float) -> float:
    """Return the bin width (s): 1 s when that gives >= 50 bins (coarser past ~600), else finer."""
    if duration_s >= 50.0:
        return max(1.0, _nice_width(duration_s / 300.0)) if duration_s > 600.0 else 1.0
    return _nice_width(duration_s / 50.0)


def _binned(t_s: np.ndarray, values_ns: np.ndarray, width: float) -> dict[str, np.ndarray]:
    """Return bin centres (s) and p50/p99/max (µs) of ``values_ns`` per time bin (empty bins dropped)."""
    order = None if t_s.size < 2 or np.all(np.diff(t_s) >= 0) else np.argsort(t_s, kind="stable")
    if order is not None:
        t_s, values_ns = t_s[order], values_ns[order]
    nb = max(1, int(math.ceil((t_s[-1] if t_s.size else 0.0) / width + 1e-12)))
    edges = np.arange(nb + 1) * width
    idx = np.searchsorted(t_s, edges[1:-1], side="left")
    bounds = np.concatenate(([0], idx, [t_s.size]))
    out: dict[str, list[float]] = {"t": [], "p50": [], "p99": [], "max": [], "n": []}
    for b in range(nb):
        seg = values_ns[bounds[b]:bounds[b + 1]]
        if seg.size == 0:
            continue
        p50, p99 = np.percentile(seg, [50.0, 99.0])
        out["t"].append((b + 0.5) * width)
        out["p50"].append(p50 / 1000.0)
        out["p99"].append(p99 / 1000.0)
        out["max"].append(seg.max() / 1000.0)
        out["n"].append(seg.size)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _share_log_ylim(axes: list, slack_decades: float = 1.5) -> None:
    """Give log-y ``axes`` one common range unless that would squash one of them."""
    if len(axes) < 2:
        return
    lims = [ax.get_ylim() for ax in axes]
    lo, hi = min(a for a, _ in lims), max(b for _, b in lims)
    widest = max(math.log10(b / a) for a, b in lims)
    if math.log10(hi / lo) - widest <= slack_decades:
        for ax in axes:
            ax.set_ylim(lo, hi)


def _plot_over_time(runs: Sequence[Run], names: list[str], path: Path) -> Path:
    """Plot per-time-bin p50/p99/max bands of every run, warm-up shaded."""
    plt = _plt()
    n = len(runs)
    fig, axes = plt.subplots(n, 1, figsize=(12, 1.0 + 2.7 * n), dpi=110, squeeze=False)
    plotted = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        ax = axes[i, 0]
        color = f"C{i % 10}"
        if run.t_in.size == 0:
            ax.text(0.5, 0.5, f"{name}: no scored ticks", transform=ax.transAxes, ha="center")
            continue
        t0 = int(run.t_in[0])
        t_s = (run.t_in - t0) / 1e9
        dur = float(t_s[-1]) if t_s.size else 0.0
        width = _time_bins(dur)
        b = _binned(t_s, run.latency_ns, width)
        ax.fill_between(b["t"], b["p50"], b["p99"], step="mid", color=color, alpha=0.25,
                        label=f"p50–p99 band ({SERVICE_LABEL})")
        ax.step(b["t"], b["p50"], where="mid", color=color, lw=1.4, label="p50")
        ax.step(b["t"], b["p99"], where="mid", color=color, lw=0.9, alpha=0.9, label="p99")
        ax.plot(b["t"], b["max"], ".", color="#333333", ms=2.5, label="max")
        if run.corrected_all_ns is not None:
            c = _binned(t_s, run.corrected_all_ns, width)
            ax.step(c["t"], c["p99"], where="mid", color="#C0392B", lw=1.1, ls="--",
                    label=f"p99 {CO_LABEL}")
        if 0 < run.warmup:
            w_end = (int(run.t_in[min(run.warmup, run.t_in.size - 1)]) - t0) / 1e9
            ax.axvspan(0, max(w_end, width * 0.02), color="#999999", alpha=0.25,
                       label=f"warm-up ({run.warmup:,} ticks, excluded)")
            ax.axvline(w_end, color="#777777", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlim(0, max(dur, width))
        ax.set_ylabel("latency (µs, log)")
        unit = f"{width:g} s" if width >= 1 else f"{width * 1e3:g} ms"
        ax.set_title(f"{name}: latency over time ({unit} bins, {len(b['t'])} bins)", fontsize=10)
        ax.grid(True, which="major", alpha=0.35)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, borderaxespad=0)
        plotted.append(ax)
    _share_log_ylim(plotted)
    axes[-1, 0].set_xlabel("time since the first tick's t_in (s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_histogram(runs: Sequence[Run], names: list[str], path: Path) -> Path:
    """Plot step histograms on log-spaced bins (fraction of ticks per bin, log y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.0), dpi=110)
    series = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        if run.service_ns.size:
            series.append((i, name, run.service_ns, run.stats, "-", SERVICE_LABEL))
        if run.corrected_ns is not None and run.corrected_ns.size and run.corrected_stats:
            series.append((i, name, run.corrected_ns, run.corrected_stats, "--", CO_LABEL))
    if series:
        lo = max(1.0, min(float(s[2].min()) for s in series))
        hi = max(lo * 1.01, max(float(s[2].max()) for s in series))
        decades = math.log10(hi / lo)
        nbins = int(min(400, max(40, 40 * decades)))
        edges = np.logspace(math.log10(lo * 0.98), math.log10(hi * 1.02), nbins + 1)
        for i, name, values, st, ls, label in series:
            color = f"C{i % 10}"
            counts, _ = np.histogram(np.maximum(values, 1), bins=edges)
            frac = counts / values.size * 100.0
            frac = np.where(counts > 0, frac, np.nan)
            ax.stairs(np.nan_to_num(frac, nan=0.0), edges / 1000.0, color=color, ls=ls, lw=1.3,
                      label=f"{name}: {label} (n={values.size:,})")
            for k, a in (("p50", 0.7), ("p99", 0.45)):
                ax.axvline(st.percentiles[k] / 1000.0, color=color, ls=":", lw=1, alpha=a)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5 * 100.0 / max(s[2].size for s in series))
    ax.set_xlabel("latency (µs, log-spaced bins); dotted lines = p50 and p99")
    ax.set_ylabel("% of ticks per bin (log)")
    ax.set_title("latency distribution")
    ax.grid(True, which="major", alpha=0.35)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _band_breakdown(ss: StageStats) -> list[tuple[str, int, dict[str, float]]]:
    """Return (band label, n, mean ns per stage) per non-empty percentile band of total latency."""
    total = ss.samples["total"]
    qs = np.percentile(total, [hi for _, _, hi in _BANDS[:-1]])
    band = np.searchsorted(qs, total, side="left")
    out = []
    for j, (label, _, _) in enumerate(_BANDS):
        m = band == j
        if not m.any():
            continue
        out.append((label, int(m.sum()), {s: float(ss.samples[s][m].mean()) for s in ss.stages}))
    return out


def _plot_stages(runs: Sequence[Run], names: list[str], path: Path) -> Path | None:
    """Plot, per run, 100 %-stacked bars of mean stage time per band of total latency."""
    pairs = [(r, n) for r, n in zip(runs, names, strict=True) if r.stage_stats is not None]
    if not pairs:
        return None
    plt = _plt()
    k = len(pairs)
    fig, axes = plt.subplots(1, k, figsize=(max(6.0, 4.6 * k), 5.0), dpi=110, sharey=True, squeeze=False)
    for ax, (run, name) in zip(axes[0], pairs, strict=True):
        ss = run.stage_stats
        assert ss is not None
        bands = _band_breakdown(ss)
        x = np.arange(len(bands))
        bottom = np.zeros(len(bands))
        for stage in ss.stages:
            means = np.array([b[2][stage] for b in bands])
            totals = np.array([sum(b[2].values()) for b in bands])
            share = np.where(totals > 0, means / np.where(totals > 0, totals, 1) * 100.0, 0.0)
            ax.bar(x, share, 0.7, bottom=bottom, color=_STAGE_COLORS[stage], label=stage)
            for xi, (sh, mu, bo) in enumerate(zip(share, means, bottom, strict=True)):
                if sh >= 9:
                    ax.text(xi, bo + sh / 2, f"{mu / 1000:.2f}", ha="center", va="center",
                            fontsize=7, color="white")
            bottom += share
        for xi, b in enumerate(bands):
            tot = sum(b[2].values())
            ax.text(xi, 101.5, f"{tot / 1000:.2f} µs\nn={b[1]:,}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [b[0] for b in bands], fontsize=8)
        ax.set_ylim(0, 115)
        ax.set_title(f"{name} ({ss.count:,} sampled ticks)", fontsize=10)
        ax.set_xlabel("band of total latency (sampled ticks)")
    axes[0, 0].set_ylabel("share of mean latency (%); numbers = mean µs")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle("where the time goes: features / model / publish per latency band", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- report


def _header(runs: Sequence[Run]) -> str:
    names = _display_names(runs)
    lines = [f"tickscore report: {len(runs)} run{'s' if len(runs) != 1 else ''}"]
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        s = run.summary
        model = s.get("model") or {}
        paced = f"paced {_speed(s)}" if run.paced else f"speed {_speed(s)}"
        lines.append(
            f"  [{i + 1}] {name:<14} {run.path}  {s.get('mode', '?')}/{s.get('backend', '?')}  "
            f"model {model.get('version', '?')} ({model.get('quantization', '?')})  {paced}"
        )
        bad = run.summary_mismatches()
        if bad:
            lines.append(f"      warning: summary.json latency_ns differs from latency_raw.npz in {bad}")
    return "\n".join(lines)


def _report_text(runs: Sequence[Run]) -> str:
    return "\n\n".join([_header(runs), compare_table(runs), stage_table(runs)])


def _stats_json(st: LatencyStats | None) -> dict | None:
    if st is None:
        return None
    d = st.as_contract()
    d["count"] = st.count
    d["out_of_range"] = st.out_of_range
    return d


def _report_json(runs: Sequence[Run]) -> dict:
    names = _display_names(runs)
    out = []
    for run, name in zip(runs, names, strict=True):
        ss = run.stage_stats
        out.append({
            "name": name,
            "path": str(run.path),
            "paced": run.paced,
            "warmup_ticks_excluded": run.warmup,
            "throughput_tps": run.summary.get("throughput_tps"),
            "service_ns": _stats_json(run.stats),
            "from_intended_ns": _stats_json(run.corrected_stats),
            "stages_ns": None if ss is None else {
                k: {"p50": v.percentiles["p50"], "p99": v.percentiles["p99"], "mean": v.mean}
                for k, v in ss.stats.items()
            },
        })
    return {"runs": out, "created_unix": time.time()}


_CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde1e8; --bg:#f6f7f9; --card:#fff;
        --bad:#b3261e; --badbg:#fdecea; --good:#1e7b34; --goodbg:#e8f5ec; --accent:#2f5fa7; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:#1f2a3c; color:#fff; padding:22px 32px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header p { margin:0; color:#c8d0de; font-size:13px; }
main { max-width:1180px; margin:0 auto; padding:20px 24px 48px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:16px 20px; margin:18px 0; box-shadow:0 1px 2px rgba(0,0,0,.04); }
h2 { font-size:17px; margin:0 0 10px; color:var(--accent); }
table { border-collapse:collapse; font-size:13px; }
th, td { padding:4px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
th { background:#eef1f6; font-weight:600; text-align:right; }
th.l, td.l { text-align:left; }
td { text-align:right; font-variant-numeric:tabular-nums;
     font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
td.lab { font-family:inherit; text-align:left; color:var(--muted); }
tr.sep td { border-top:2px solid var(--line); }
td.ratio { color:var(--muted); }
td.bad { color:var(--bad); background:var(--badbg); font-weight:600; }
td.good { color:var(--good); background:var(--goodbg); }
.scroll { overflow-x:auto; }
figure { margin:8px 0 4px; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; }
figcaption, .note { color:var(--muted); font-size:13px; margin-top:6px; }
.co { border-left:4px solid #c0392b; background:#fbf1f0; padding:8px 12px; border-radius:4px; }
td.wrap { white-space:normal; word-break:break-all; min-width:120px; }
code { background:#eef1f6; padding:1px 4px; border-radius:3px; font-size:12px; }
"""


def _html_grid(runs: Sequence[Run]) -> str:
    g = _grid(runs)
    e = html.escape
    head1 = "".join(f"<th>{e(c.run)}</th>" for c in g.columns)
    kind_label = {"service": SERVICE_LABEL, "from intended": CO_LABEL, "ratio": f"vs {g.first}"}
    head2 = "".join(f"<th>{e(kind_label[c.kind])}</th>" for c in g.columns)
    out = ['<div class="scroll"><table>',
           f'<tr><th class="l">latency (µs)</th>{head1}</tr>',
           f'<tr><th class="l"></th>{head2}</tr>']
    for label, direction in g.rows:
        cls = ' class="sep"' if label in ("ticks/s", "backend") else ""
        tds = []
        for c in g.columns:
            v = c.cells.get(label, "")
            css = ""
            if c.kind == "ratio" and v.endswith("x") and direction:
                r = float(v[:-1])
                worse = r > 1.05 if direction == "lower" else r < 1 / 1.05
                better = r < 1 / 1.05 if direction == "lower" else r > 1.05
                css = "bad" if worse else ("good" if better else "ratio")
            elif c.kind == "ratio":
                css = "ratio"
            tds.append(f'<td class="{css}">{e(v)}</td>' if css else f"<td>{e(v)}</td>")
        out.append(f'<tr{cls}><td class="lab">{e(label)}</td>{"".join(tds)}</tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _html_stage_table(runs: Sequence[Run]) -> str:
    e = html.escape
    names = _display_names(runs)
    rows = ['<table><tr><th class="l">run</th><th class="l">stage</th><th>sampled</th>'
            "<th>p50 (µs)</th><th>p99 (µs)</th><th>mean (µs)</th><th>share of mean</th></tr>"]
    for run, name in zip(runs, names, strict=True):
        ss = run.stage_stats
        if ss is None:
            rows.append(f'<tr><td class="l">{e(name)}</td><td class="lab" colspan="6">'
                        "no stage samples</td></tr>")
            continue
        tm = ss.stats["total"].mean or 1.0
        for j, stage in enumerate((*ss.stages, "total")):
            st = ss.stats[stage]
            cls = ' class="sep"' if j == 0 else ""
            rows.append(
                f'<tr{cls}><td class="l">{e(name) if j == 0 else ""}</td><td class="lab">{stage}</td>'
                f"<td>{ss.count:,}</td><td>{_us(st.percentiles['p50'])}</td>"
                f"<td>{_us(st.percentiles['p99'])}</td><td>{_us(st.mean)}</td>"
                f"<td>{100.0 * st.mean / tm:.0f}%</td></tr>"
            )
    rows.append("</table>")
    return "\n".join(rows)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CAPTIONS = {
    "percentiles": (
        "Latency percentile distribution",
        "Latency (log y) against percentile on a log 1/(1-p) axis, so each step right is one more "
        "nine (90%, 99%, 99.9%, …); the tail is as visible as the median. Curves come from the raw "
        "per-tick values after warm-up; dots mark the HdrHistogram percentiles of the table. "
        f"Solid = {SERVICE_LABEL}; dashed = {CO_LABEL} (paced runs only).",
    ),
    "over_time": (
        "Latency over time",
        "Per time bin (1 s, or finer so that short runs get at least ~50 bins) since the first "
        "tick's t_in: shaded band from p50 to p99, p50 and p99 as lines, max as dots. Every tick is "
        "shown, including the warm-up (grey area), which the statistics exclude. Spikes, GC or "
        "scheduler stalls and drifts show up here and not in a single percentile. For paced runs "
        f"the red dashed line is the p99 {CO_LABEL}.",
    ),
    "histogram": (
        "Latency histogram",
        "Share of ticks per log-spaced latency bin (both axes log), one step line per series; "
        "dotted vertical lines mark each run's p50 and p99. Shows modes (e.g. cache-hot vs cold "
        f"paths) that a percentile curve flattens. Solid = {SERVICE_LABEL}, dashed = {CO_LABEL}.",
    ),
    "stages": (
        "Where the time goes, per latency band",
        "From the stage samples (every 64th tick after warm-up): the sampled ticks are split into "
        "bands of their total latency (p0–50, p50–90, p90–99, p99–99.9, >p99.9); each bar shows how "
        "the mean latency of that band splits into features (feature kernel, incl. ingest), model "
        "(backend run) and publish (encode + send), as % of the band's mean; numbers in the bars are "
        "the stage means in µs, above each bar the band's mean total and number of ticks. A slow "
        "tail band dominated by one stage points at that stage.",
    ),
}


def _html(runs: Sequence[Run], plots: dict[str, Path]) -> str:
    e = html.escape
    names = _display_names(runs)
    run_rows = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        s = run.summary
        model = s.get("model") or {}
        data = s.get("data") or {}
        created = s.get("created_unix")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "?"
        run_rows.append(
            f'<tr><td class="l">{i + 1}</td><td class="l"><b>{e(name)}</b></td>'
            f'<td class="l"><code>{e(str(run.path))}</code></td>'
            f'<td class="l">{e(str(s.get("mode", "?")))} / {e(str(s.get("backend", "?")))}</td>'
            f'<td class="l">{e(str(model.get("version", "?")))} ({e(str(model.get("quantization", "?")))})'
            f'</td><td class="l">{e(_speed(s))}{" (paced)" if run.paced else ""}</td>'
            f'<td class="l wrap"><code>{e(str(data.get("path", "?")))}</code></td>'
            f'<td class="l">{e(when)}</td></tr>'
        )
    co_note = ""
    if any(r.paced for r in runs):
        co_note = (
            '<p class="co"><b>Coordinated omission.</b> For paced runs two series are shown. '
            f"<b>{SERVICE_LABEL}</b> = t_out − t_in: how long the service worked on a tick once it "
            f"picked it up. <b>{CO_LABEL}</b> = t_out − the time the tick was <i>meant</i> to be "
            "released: if the service stalls, every tick queued behind the stall is charged the "
            "wait, as a real client would see it. The gap between the two is queueing.</p>"
        )
    sections = []
    for key in ("percentiles", "over_time", "histogram", "stages"):
        title, caption = _CAPTIONS[key]
        if key in plots:
            body = f"<figure>{_img(plots[key], title)}<figcaption>{e(caption)}</figcaption></figure>"
        else:
            body = '<p class="note">No run has stage samples.</p>'
        sections.append(f"<section><h2>{e(title)}</h2>{body}</section>")
    ratio_note = (
        f"Ratio columns: this run ÷ {e(names[0])} (same series). Red: more than 5% worse "
        "(latency up or throughput down); green: more than 5% better."
        if len(runs) > 1 else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tickscore latency report</title>
<style>{_CSS}</style></head>
<body>
<header><h1>tickscore latency report</h1>
<p>{len(runs)} run{"s" if len(runs) != 1 else ""} · generated {e(time.strftime("%Y-%m-%d %H:%M:%S"))}
 · tick-to-decision latency (t_out − t_in), HdrHistogram percentiles (3 significant digits),
 exact max and mean, warm-up excluded</p></header>
<main>
<section><h2>Runs</h2><div class="scroll"><table>
<tr><th class="l">#</th><th class="l">name</th><th class="l">directory</th><th class="l">mode / backend</th>
<th class="l">model (quantization)</th><th class="l">speed</th><th class="l">data</th>
<th class="l">recorded</th></tr>
{"".join(run_rows)}
</table></div></section>
<section><h2>Latency and throughput</h2>
{_html_grid(runs)}
<p class="note">Latency in µs, computed from the raw per-tick arrays exactly as the replay computes
its table. {ratio_note}</p>
{co_note}
</section>
<section><h2>Stage breakdown</h2>
{_html_stage_table(runs)}
<p class="note">Stage times of the sampled ticks (every 64th tick, after warm-up). features = feature
kernel incl. ingest (t_features − t_in), model = backend run (t_model − t_features), publish =
encode + send (t_out − t_model).</p>
</section>
{"".join(sections)}
</main></body></html>
"""


def write_report(runs: Sequence[Run], out_dir: str | Path, html: bool = False) -> dict[str, Path]:
    """Write the plots, ``report.txt``, ``report.json`` and optionally ``report.html``.

    Parameters
    ----------
    runs : sequence of Run
        The first run is the reference for ratios.
    out_dir : str or Path
        Created if missing.
    html : bool
        Also write the self-contained ``report.html`` (plots inlined as base64 PNG).

    Returns
    -------
    dict of str to Path
        Keys ``percentiles``, ``over_time``, ``histogram``, ``stages`` (absent
        when no run has stage samples), ``text``, ``json`` and ``html``.
    """
    if not runs:
        raise ValueError("write_report needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _display_names(runs)
    files: dict[str, Path] = {
        "percentiles": _plot_percentiles(runs, names, out / "percentiles.png"),
        "over_time": _plot_over_time(runs, names, out / "latency_over_time.png"),
        "histogram": _plot_histogram(runs, names, out / "histogram.png"),
    }
    stages = _plot_stages(runs, names, out / "stages.png")
    if stages is not None:
        files["stages"] = stages
    (out / "report.txt").write_text(_report_text(runs) + "\n")
    files["text"] = out / "report.txt"
    (out / "report.json").write_text(json.dumps(_report_json(runs), indent=2) + "\n")
    files["json"] = out / "report.json"
    if html:
        (out / "report.html").write_text(_html(runs, files), encoding="utf-8")
        files["html"] = out / "report.html"
    return files


# ---------------------------------------------------------------------------- CLI


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "report",
        help="compare replay runs: percentile table, plots, HTML, regression check",
        description=(
            "Compare replay run directories (tickscore replay --out DIR): print a side-by-side "
            "latency table with ratios against the first run and write plots (and report.html). "
            "With --check, exit 1 if the candidate's p50 or p99 regressed by more than "
            "--max-regress against the baseline."
        ),
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories; the first is the reference")
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"directory for plots and report files (default ./{_DEFAULT_OUT})")
    p.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    p.add_argument("--no-plots", action="store_true", help="print the tables only, write no files")
    p.add_argument("--check", nargs=2, metavar=("BASELINE_DIR", "CANDIDATE_DIR"),
                   help="regression gate on service-time p50 and p99: exit 0 ok, 1 regressed, 2 usage")
    p.add_argument("--max-regress", metavar="R", default=None,
                   help="allowed increase for --check: '10%%' or '0.1' (default 10%%)")
    return p


def _err(msg: str) -> int:
    print(f"tickscore report: error: {msg}", file=sys.stderr)
    return 2


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        limit = parse_max_regress(
            _DEFAULT_MAX_REGRESS if args.max_regress is None else args.max_regress
        )
    except ValueError as exc:
        return _err(str(exc))
    base, cand = (load_run(d) for d in args.check)
    print(_report_text([base, cand]))
    ok, messages = check_regression(base, cand, limit)
    print()
    print(f"regression check: {cand.name} against baseline {base.name}, max regress +{_pct(limit)}")
    for m in messages:
        print(f"  {m}")
    print("PASS" if ok else "FAIL: candidate regressed beyond the limit")
    if args.out or args.html:
        _print_files(write_report([base, cand], args.out or _DEFAULT_OUT, args.html))
    return 0 if ok else 1


def _print_files(files: dict[str, Path]) -> None:
    print()
    for name, path in files.items():
        print(f"  {name:<12} {path}")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``tickscore report`` with parsed ``args``; return the exit code (0, 1 or 2)."""
    try:
        if args.check:
            if args.runs:
                return _err("give either RUN_DIR ... or --check BASELINE_DIR CANDIDATE_DIR, not both")
            return _cmd_check(args)
        if args.max_regress is not None:
            return _err("--max-regress only applies with --check BASELINE_DIR CANDIDATE_DIR")
        if not args.runs:
            return _err("give at least one RUN_DIR (or --check BASELINE_DIR CANDIDATE_DIR)")
        if args.html and args.no_plots:
            return _err("--html needs the plots; drop --no-plots")
        runs = [load_run(d) for d in args.runs]
        print(_report_text(runs))
        if not args.no_plots:
            _print_files(write_report(runs, args.out or _DEFAULT_OUT, args.html))
        return 0
    except RunLoadError as exc:
        if getattr(args, "debug", False):
            raise
        return _err(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``report`` as a standalone command (``python -m replay.report ...``)."""
    parser = argparse.ArgumentParser(prog="tickscore")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_parser(sub)
    args = parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    return cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
