"""The comparison and stage tables (text)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from replay.latency import PERCENTILES, LatencyStats
from replay.report.runs import CO_LABEL, SERVICE_LABEL, Run, _display_names

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
    rate = s.get("rate_tps")  # a wire run paced at a fixed rate (its speed is then "max")
    if sp == "max" and isinstance(rate, int | float) and rate > 0:
        return f"{rate:,.0f} ticks/s"
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
