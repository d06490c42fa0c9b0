"""Latency statistics and the run summary after a run: HdrHistogram, table, ``.hgrm``, plots, JSON.

Raw per-tick nanoseconds are recorded in the loop into int64 arrays; everything
here runs after the run.  Percentiles come from an HdrHistogram with 3
significant digits (values are exact to within 0.1 %); ``max`` and ``mean`` are
exact, from the raw array.  The same function produces the replay CLI's table and
the report's, so they agree for the same run.  The run-summary JSON (the
README's contract) and the files beside it are written here for the replay
and the service alike (:func:`summarise`, :func:`write_outputs`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

__all__ = [
    "PERCENTILES",
    "LatencyStats",
    "build_histogram",
    "latency_stats",
    "write_hgrm",
    "format_table",
    "plot_percentiles",
    "percentile_curve",
    "percentile_axis",
    "ReplayResult",
    "summarise",
    "write_outputs",
    "write_summary",
]

#: Reported percentiles: JSON key → percentile.
PERCENTILES: dict[str, float] = {
    "p50": 50.0,
    "p90": 90.0,
    "p99": 99.0,
    "p999": 99.9,
    "p9999": 99.99,
}

_LOWEST_NS = 1
_HIGHEST_NS = 3_600 * 1_000_000_000  # one hour: anything above is out of range
_SIG_FIGS = 3


@dataclass(frozen=True)
class LatencyStats:
    """Percentiles (ns, from the histogram), exact max/mean (ns) and counts."""

    count: int
    percentiles: dict[str, int]
    max: int
    mean: float
    min: int
    out_of_range: int

    def as_contract(self) -> dict:
        """Return the ``latency_ns`` object of the run-summary JSON contract."""
        d: dict = {k: int(v) for k, v in self.percentiles.items()}
        d["max"] = int(self.max)
        d["mean"] = float(self.mean)
        return d


def build_histogram(values_ns: np.ndarray) -> tuple[HdrHistogram, int]:
    """Return an HdrHistogram of ``values_ns`` and the count of out-of-range values.

    Values below 1 ns are recorded as 1 ns, values above one hour are counted as
    out of range and clamped to the highest trackable value (never dropped).
    """
    hist = HdrHistogram(_LOWEST_NS, _HIGHEST_NS, _SIG_FIGS)
    v = np.asarray(values_ns, dtype=np.int64)
    out = int(np.count_nonzero(v > _HIGHEST_NS))
    v = np.clip(v, _LOWEST_NS, _HIGHEST_NS)
    uniq, counts = np.unique(v, return_counts=True)
    for value, count in zip(uniq.tolist(), counts.tolist(), strict=True):
        hist.record_value(value, count)
    return hist, out


def latency_stats(values_ns: np.ndarray) -> LatencyStats:
    """Return :class:`LatencyStats` of a raw latency array (ns)."""
    v = np.asarray(values_ns, dtype=np.int64)
    if v.size == 0:
        return LatencyStats(0, {k: 0 for k in PERCENTILES}, 0, 0.0, 0, 0)
    hist, out = build_histogram(v)
    vmax = int(v.max())
    # a bucket's highest equivalent value may exceed the exact max: never report p > max
    pct = {k: min(int(hist.get_value_at_percentile(p)), vmax) for k, p in PERCENTILES.items()}
    return LatencyStats(int(v.size), pct, vmax, float(v.mean()), int(v.min()), out)


def write_hgrm(values_ns: np.ndarray, path: str | Path) -> Path:
    """Write the HdrHistogram percentile distribution of ``values_ns`` in microseconds."""
    hist, _ = build_histogram(values_ns)
    buf = io.BytesIO()
    hist.output_percentile_distribution(
        buf, output_value_unit_scaling_ratio=1000.0, ticks_per_half_distance=5
    )
    # The library scales Mean to the output unit but writes StdDeviation in raw ns: one
    # unit (µs) for the whole footer, as HdrHistogram's own Java output has.
    lines = buf.getvalue().decode().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("#[Mean"):
            lines[i] = (f"#[Mean    = {hist.get_mean_value() / 1000.0:12.3f}, "
                        f"StdDeviation   = {hist.get_stddev() / 1000.0:12.3f}]\n")  # fmt: skip
    path = Path(path)
    path.write_text("".join(lines))
    return path


def _us(ns: float) -> str:
    return f"{ns / 1000.0:,.2f}"


def format_table(
    stats: Mapping[str, LatencyStats],
    *,
    throughput: Mapping[str, float] | None = None,
) -> str:
    """Return a fixed-width percentile table (µs), one column per named series."""
    names = list(stats)
    rows = [("count", [f"{stats[n].count:,}" for n in names])]
    for key, p in PERCENTILES.items():
        rows.append((f"p{p:g}", [_us(stats[n].percentiles[key]) for n in names]))
    rows.append(("max", [_us(stats[n].max) for n in names]))
    rows.append(("mean", [_us(stats[n].mean) for n in names]))
    if throughput:
        rows.append(("ticks/s", [f"{throughput.get(n, float('nan')):,.0f}" for n in names]))
    width = max(12, *(len(n) + 2 for n in names))
    head = f"{'latency (µs)':<14}" + "".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for label, cells in rows:
        lines.append(f"{label:<14}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def percentile_curve(
    values_ns: np.ndarray, max_nines: float, max_ns: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (x = 1/(1-p), y = latency µs) sampled log-evenly in 1/(1-p).

    The last point is always the maximum, at ``x = n`` (p = 1 - 1/n), so the
    curve ends where the table's ``max`` is; ``max_ns`` overrides it when the
    values are a window of a longer run whose exact max is known.
    """
    v = np.sort(np.asarray(values_ns, dtype=np.int64))
    n = v.size
    top = min(max_nines, np.log10(max(n, 10)))
    x = np.logspace(0, top, 400)
    p = 1.0 - 1.0 / x
    idx = np.minimum((p * n).astype(np.int64), n - 1)
    y = v[idx] / 1000.0
    mx = (v[-1] if max_ns is None else max(float(max_ns), float(v[-1]))) / 1000.0
    if x[-1] < n:
        x, y = np.append(x, float(n)), np.append(y, mx)
    else:
        y[-1] = mx
    return x, y


def percentile_axis(ax, max_x: float) -> None:
    """Set up a log ``1/(1-p)`` percentile x axis (0 %, 90 %, 99 %, ...) reaching ``max_x``."""
    # deferred: matplotlib only when a plot is drawn
    from matplotlib.ticker import FixedLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    nines = int(np.floor(np.log10(max(max_x, 10))))
    ticks = [10.0**k for k in range(0, nines + 1)]
    labels = ["0%"] + [f"{100 - 100 / t:.{max(0, k - 2)}f}%" for k, t in enumerate(ticks) if k > 0]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, labels)
    ax.set_xlim(1, max(max_x, ticks[-1]) * 1.3)


def plot_percentiles(
    series: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    title: str = "tick-to-decision latency by percentile",
    max_ns: Mapping[str, float] | None = None,
) -> Path:
    """Plot latency against percentile on a log ``1/(1-p)`` axis (the HdrHistogram plot).

    ``series`` maps a label to a raw latency array in ns; all are overlaid.
    Each curve ends at its maximum (``max_ns[label]`` when given: a raw
    window of a longer run), marked and labelled.
    """
    import matplotlib  # deferred: matplotlib only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib only when a plot is drawn

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    max_x = 10.0
    for label, values in series.items():
        if len(values) == 0:
            continue
        x, y = percentile_curve(values, 6, (max_ns or {}).get(label))
        max_x = max(max_x, float(x[-1]))
        (line,) = ax.plot(x, y, label=label, linewidth=1.6)
        ax.plot(x[-1:], y[-1:], "o", color=line.get_color(), ms=4)
        ax.annotate(f"max {y[-1]:,.1f}", (x[-1], y[-1]), textcoords="offset points", xytext=(-6, 6),
                    ha="right", fontsize=8, color=line.get_color())  # fmt: skip
    percentile_axis(ax, max_x)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (µs, log)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", axis="y", alpha=0.15)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class ReplayResult:
    """What a replay measured; ``summary`` is the contract JSON object."""

    summary: dict
    latency_ns: np.ndarray
    stats: LatencyStats
    corrected_ns: np.ndarray | None = None
    corrected_stats: LatencyStats | None = None
    out_files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """Return the end-of-run percentile table (µs) and throughput."""
        stats = {"service": self.stats}
        if self.corrected_stats is not None:
            stats["from intended"] = self.corrected_stats
        tps = {k: self.summary["throughput_tps"] for k in stats}
        return format_table(stats, throughput=tps)


def summarise(
    *,
    ticks: int,
    scores: int,
    dropped: int,
    rejected: int,
    rejected_by_reason: dict[str, int],
    wall_s: float,
    stats: LatencyStats,
    mode: str,
    backend: str,
    model_path: str,
    model_version: str,
    quantization: str,
    data_path: str,
    data_rows: int,
    pinned: list[int],
    extra: dict | None = None,
) -> dict:
    """Return the run-summary JSON object (the README's contract) plus ``extra`` keys."""
    summary = {
        "ticks": int(ticks),
        "scores": int(scores),
        "dropped": int(dropped),
        "rejected": int(rejected),
        "wall_s": float(wall_s),
        "throughput_tps": float(scores / wall_s) if wall_s > 0 else 0.0,
        "latency_ns": stats.as_contract(),
        "mode": mode,
        "backend": backend,
        "model": {"path": str(model_path), "version": model_version, "quantization": quantization},
        "data": {"path": str(data_path), "rows": int(data_rows)},
        "host": {
            "cpus": os.cpu_count() or 0,
            "pinned": [int(c) for c in pinned],
            "python": platform.python_version(),
        },
        "rejected_by_reason": rejected_by_reason,
        "latency_count": stats.count,
        "created_unix": time.time(),
    }
    if extra:
        summary.update(extra)
    return summary


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """Write ``out_dir/summary.json`` (creating the directory); return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def write_outputs(
    result: ReplayResult,
    out_dir: str | Path,
    raw: dict[str, np.ndarray],
) -> dict[str, str]:
    """Write summary.json, latency.hgrm, latency.png and latency_raw.npz; return their paths.

    ``latency_raw.npz`` holds, all int64 ns on CLOCK_MONOTONIC and in seq order:
    ``t_in``/``t_out`` (every scored tick), ``warmup`` (count excluded from stats),
    ``intended`` (paced runs: intended release time per scored tick) and the stage
    samples ``stage_seq``, ``stage_t_in``, ``stage_t_features``, ``stage_t_model``,
    ``stage_t_out`` (every 64th tick: features = t_features - t_in, model =
    t_model - t_features, publish incl. encode = t_out - t_model).
    """
    warm = int(raw["warmup"])
    out = Path(out_dir)
    files = {"summary": str(write_summary(out, result.summary))}
    files["hgrm"] = str(write_hgrm(result.latency_ns[warm:], out / "latency.hgrm"))
    label = f"service time ({result.summary['backend']})"
    series = {label: result.latency_ns[warm:]}
    max_ns = {label: result.stats.max}  # the table's max (a chunked run's raw arrays are a window)
    if result.corrected_ns is not None:
        series["from intended send time"] = result.corrected_ns[warm:]
        write_hgrm(result.corrected_ns[warm:], out / "latency_intended.hgrm")
        if result.corrected_stats is not None:
            max_ns["from intended send time"] = result.corrected_stats.max
    files["png"] = str(plot_percentiles(series, out / "latency.png", max_ns=max_ns))
    np.savez_compressed(out / "latency_raw.npz", **raw)
    files["raw"] = str(out / "latency_raw.npz")
    return files
