"""Report plots: percentiles, latency over time, histograms, stage breakdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from replay.latency import PERCENTILES, percentile_axis, percentile_curve
from replay.report.runs import _BANDS, _STAGE_COLORS, CO_LABEL, SERVICE_LABEL, Run, StageStats

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
