"""The written report: text, JSON and the self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path

from replay.latency import LatencyStats
from replay.report.plots import _plot_histogram, _plot_over_time, _plot_percentiles, _plot_stages
from replay.report.runs import CO_LABEL, SERVICE_LABEL, Run, _display_names
from replay.report.tables import _grid, _speed, _us, compare_table, stage_table

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
        early = _stopped_early(s)
        if early:
            lines.append(f"      warning: {early}")
    return "\n".join(lines)


def _stopped_early(s: dict) -> str:
    """'' for a complete run; else what an interrupted one (Ctrl-C / SIGTERM) covers."""
    if not s.get("interrupted"):
        return ""
    rows = (s.get("data") or {}).get("rows")
    of = f" of the file's {rows:,}" if isinstance(rows, int) and rows else ""
    return (f"stopped early (Ctrl-C / SIGTERM) after {s.get('ticks', 0):,} ticks{of}: "
            f"its figures cover those only")


def report_text(runs: Sequence[Run]) -> str:
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
        early = _stopped_early(s)
        if early:
            run_rows.append(f'<tr><td></td><td class="l bad" colspan="7">{e(early)}</td></tr>')
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
    (out / "report.txt").write_text(report_text(runs) + "\n")
    files["text"] = out / "report.txt"
    (out / "report.json").write_text(json.dumps(_report_json(runs), indent=2) + "\n")
    files["json"] = out / "report.json"
    if html:
        (out / "report.html").write_text(_html(runs, files), encoding="utf-8")
        files["html"] = out / "report.html"
    return files
