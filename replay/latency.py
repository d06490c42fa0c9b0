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
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram
from numba import njit

__all__ = [
    "PERCENTILES",
    "LatencyStats",
    "LatencyHistogram",
    "latency_stats",
    "write_hgrm",
    "format_table",
    "plot_percentiles",
    "percentile_curve",
    "percentile_axis",
    "ReplayResult",
    "summarise",
    "warmup_excluded",
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


def latency_stats(values_ns: np.ndarray) -> LatencyStats:
    """Return :class:`LatencyStats` of a raw latency array (ns) (through :class:`LatencyHistogram`)."""
    h = LatencyHistogram()
    h.add(np.asarray(values_ns, dtype=np.int64), 0)
    return h.stats()


def write_hgrm(values_ns: np.ndarray, path: str | Path) -> Path:
    """Write the HdrHistogram percentile distribution of ``values_ns`` in microseconds."""
    h = LatencyHistogram()
    h.add(np.asarray(values_ns, dtype=np.int64), 0)
    return h.write_hgrm(path)


def _write_hgrm(hist: HdrHistogram, path: str | Path) -> Path:
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


class LatencyHistogram:
    """The latency histogram of every run: bounded memory, HdrHistogram's percentiles.

    One implementation for the replay (whole runs via :func:`latency_stats`,
    chunked runs drained chunk by chunk) and the live service (``status``,
    folded from the agent's ring in housekeeping).  Values go into a
    log-linear count array with HdrHistogram's bucket layout for 3 significant
    digits (values below 2048 ns exact, above: 1024 sub-buckets per power of
    two), by one numba pass straight over the ring (:meth:`add_ring`, ~8 ms per
    million ticks, no copy), with exact count / min / max / mean.  :meth:`stats`
    records each bucket once into an HdrHistogram (1 ns .. 1 h, 3 digits, as
    :mod:`replay.latency`): every tick lands in the bucket it would have landed
    in if recorded one by one, so the percentiles are those of the raw values.
    The first ``warmup`` scored ticks are left out.
    """

    _SUB = 2048  # sub-buckets per magnitude (3 significant digits)

    def __init__(self, warmup: int = 0) -> None:
        self._hi = _HIGHEST_NS
        self._lo = _LOWEST_NS
        self._n_mag = int(_HIGHEST_NS).bit_length() - 10 + 1
        self.counts = np.zeros(self._n_mag * self._SUB, dtype=np.int64)
        self.warmup = int(warmup)
        self.count = 0
        self.total = 0.0
        self.vmax = 0
        self.vmin = 0
        self.out_of_range = 0
        self._hist = None
        self._values = None
        #: the warm-up's latencies (at most ``warmup``), kept for :meth:`rewarm`
        self._held: list[np.ndarray] = []

    def rewarm(self, warmup: int) -> None:
        """Leave out only the first ``warmup`` (< the current warm-up) ticks: the rest of it counts now.

        For a run that ended before its warm-up was much behind it (an interrupted or short run),
        where the replay excludes 10 % of the run instead.
        """
        warmup = max(0, int(warmup))
        if warmup >= self.warmup:
            return
        held = np.concatenate(self._held) if self._held else np.zeros(0, np.int64)
        self._held = []
        old, self.warmup = self.warmup, 0
        self.add(held[warmup:old], 0)
        self.warmup = warmup

    def bucket_values(self) -> np.ndarray:
        """Return the latency (ns) each entry of ``counts`` stands for (index e*SUB + m -> m << e)."""
        if self._values is None:
            e = np.arange(self._n_mag, dtype=np.int64)[:, None]
            m = np.arange(self._SUB, dtype=np.int64)[None, :]
            self._values = (m << e).ravel()
        return self._values

    def add(self, values: np.ndarray, first_seq: int) -> None:
        """Record latencies (ns, int64) of consecutive seqs starting at ``first_seq``."""
        skip = max(0, self.warmup - first_seq)
        if skip:
            self._held.append(np.array(values[:skip], dtype=np.int64))
        v = values[skip:] if skip else values
        if v.size == 0:
            return
        acc = np.zeros(3, dtype=np.float64)
        oor = _bucket_add(np.ascontiguousarray(v, dtype=np.int64), self.counts, self._lo, self._hi, acc)
        self._fold(int(v.size), oor, acc)

    def add_ring(self, t_in: np.ndarray, t_out: np.ndarray, mask: int, seq0: int, seq1: int) -> None:
        """Record ``t_out - t_in`` (ns) of seqs [seq0, seq1) of a latency ring, in place (no copy)."""
        s0 = max(seq0, self.warmup)
        if seq0 < s0:  # warm-up ticks: held aside
            idx = np.arange(seq0, min(s0, seq1), dtype=np.int64) & mask
            self._held.append(t_out[idx] - t_in[idx])
        if s0 >= seq1:
            return
        acc = np.zeros(3, dtype=np.float64)
        oor = _ring_add(t_in, t_out, mask, s0, seq1, self.counts, self._lo, self._hi, acc)
        self._fold(seq1 - s0, oor, acc)

    def _fold(self, n: int, oor: int, acc: np.ndarray) -> None:
        """Fold one batch's ``n`` values, out-of-range count and [sum, max, min] into the totals."""
        self.out_of_range += int(oor)
        vmax, vmin = int(acc[1]), int(acc[2])
        self.vmax = vmax if self.count == 0 else max(self.vmax, vmax)
        self.vmin = vmin if self.count == 0 else min(self.vmin, vmin)
        self.count += n
        self.total += float(acc[0])
        self._hist = None

    @property
    def hist(self):
        """Return the HdrHistogram of everything recorded (built once per change)."""
        if self._hist is None:
            h = HdrHistogram(self._lo, self._hi, _SIG_FIGS)
            values = self.bucket_values()
            for key in np.flatnonzero(self.counts).tolist():
                h.record_value(int(values[key]), int(self.counts[key]))
            self._hist = h
        return self._hist

    def stats(self):
        """Return :class:`replay.latency.LatencyStats` of everything recorded."""
        if self.count == 0:
            return LatencyStats(0, {k: 0 for k in PERCENTILES}, 0, 0.0, 0, 0)
        h = self.hist
        pct = {k: min(int(h.get_value_at_percentile(p)), self.vmax) for k, p in PERCENTILES.items()}
        return LatencyStats(self.count, pct, self.vmax, self.total / self.count, self.vmin, self.out_of_range)

    def write_hgrm(self, path: str | Path) -> Path:
        """Write the percentile distribution in microseconds (as :func:`write_hgrm`)."""
        return _write_hgrm(self.hist, path)

    def compile(self) -> None:
        """Compile the numba passes now (before a hot loop), on scratch arrays."""
        z = np.zeros(1, dtype=np.int64)
        scratch = np.zeros_like(self.counts)
        _ring_add(z, z, 0, 0, 1, scratch, 1, 2, np.zeros(3))
        _bucket_add(z, scratch, 1, 2, np.zeros(3))


@njit(cache=True, nogil=True, inline="always")
def _bucket_of(v, lo, hi):
    """Return the log-linear bucket of ``v`` (ns), clamped to [lo, hi]."""
    if v > hi:
        v = hi
    elif v < lo:
        v = lo
    e = 0
    x = v >> 11
    while x > 0:
        x >>= 1
        e += 1
    return e * 2048 + (v >> e)


@njit(cache=True, nogil=True)
def _bucket_add(values, counts, lo, hi, acc):
    """Add ``values`` (ns) to the log-linear ``counts``; acc = [sum, max, min]; return out-of-range count."""
    oor = 0
    s = 0.0
    vmax = values[0]
    vmin = values[0]
    for i in range(values.shape[0]):
        v = values[i]
        s += v
        if v > vmax:
            vmax = v
        if v < vmin:
            vmin = v
        if v > hi:
            oor += 1
        counts[_bucket_of(v, lo, hi)] += 1
    acc[0] += s
    acc[1] = vmax
    acc[2] = vmin
    return oor


@njit(cache=True, nogil=True)
def _ring_add(t_in, t_out, mask, s0, s1, counts, lo, hi, acc):
    """Add ``t_out - t_in`` (ns) of seqs [s0, s1) of a ring (index ``seq & mask``); as :func:`_bucket_add`.

    Allocates: no.
    """
    oor = 0
    s = 0.0
    k = s0 & mask
    vmax = t_out[k] - t_in[k]
    vmin = vmax
    for seq in range(s0, s1):
        k = seq & mask
        v = t_out[k] - t_in[k]
        s += v
        if v > vmax:
            vmax = v
        if v < vmin:
            vmin = v
        if v > hi:
            oor += 1
        counts[_bucket_of(v, lo, hi)] += 1
    acc[0] += s
    acc[1] = vmax
    acc[2] = vmin
    return oor


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
    if ax.get_legend_handles_labels()[0]:  # no run with latencies (nothing scored): no legend
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no latencies recorded", transform=ax.transAxes, ha="center", va="center")
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
    #: Ctrl-C or SIGTERM ended the run early: the report covers the ticks scored before it;
    #: the caller re-raises it once the report is out (summary ``"interrupted": true``)
    interrupt: BaseException | None = None

    def table(self) -> str:
        """Return the end-of-run percentile table (µs) and throughput."""
        stats = {"service": self.stats}
        if self.corrected_stats is not None:
            stats["from intended"] = self.corrected_stats
        tps = {k: self.summary["throughput_tps"] for k in stats}
        return format_table(stats, throughput=tps)


def warmup_excluded(warmup_ticks: int, n: int) -> int:
    """Return the latencies to drop as warm-up: ``warmup_ticks``, or 10 % of a run it would swamp."""
    if warmup_ticks <= n // 2 or n == 0:
        return min(warmup_ticks, n)
    warm = n // 10
    print(
        f"tickscore: warning: the warm-up of {warmup_ticks:,} ticks is more than half of this run's "
        f"{n:,} scores: excluding the first {warm:,} (10 %) instead (set it with --warmup-ticks N)",
        file=sys.stderr,
    )
    return warm


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
