"""`tickscore report`: comparison table, regression gate, plots and self-contained HTML."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main as tickscore_main
from replay.latency import latency_stats
from replay.report import (
    CO_LABEL,
    SERVICE_LABEL,
    RunLoadError,
    check_regression,
    compare_table,
    load_run,
    parse_max_regress,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]


def _make_run(
    d: Path,
    lat_ns: np.ndarray,
    *,
    warmup: int = 0,
    gap_ns: int = 20_000,
    paced_queue_ns: np.ndarray | None = None,
    stages: bool = True,
    summary: dict | None = None,
) -> Path:
    """Write a run dir with the layout of ``tickscore replay --out`` for the given latencies."""
    lat = np.asarray(lat_ns, dtype=np.int64)
    n = lat.size
    t_in = 1_000_000_000 + np.arange(n, dtype=np.int64) * gap_ns
    t_out = t_in + lat
    raw = {"t_in": t_in, "t_out": t_out, "warmup": np.int64(warmup)}
    if paced_queue_ns is not None:
        raw["intended"] = t_in - np.asarray(paced_queue_ns, dtype=np.int64)
    if stages:
        seq = np.arange(0, n, 64, dtype=np.int64)
        t_f = t_in[seq] + lat[seq] * 3 // 10
        t_m = t_in[seq] + lat[seq] * 8 // 10
        raw.update(stage_seq=seq, stage_t_in=t_in[seq], stage_t_features=t_f, stage_t_model=t_m,
                   stage_t_out=t_out[seq])
    st = latency_stats(lat[warmup:])
    wall = (int(t_out[-1]) - int(t_in[0])) / 1e9
    s = {
        "ticks": n, "scores": n, "dropped": 0, "rejected": 0, "wall_s": wall,
        "throughput_tps": n / wall, "latency_ns": st.as_contract(), "mode": "inprocess",
        "backend": "ort", "model": {"path": "m.onnx", "version": "v1", "quantization": "int8"},
        "data": {"path": "d.parquet", "rows": n}, "host": {"cpus": 2, "pinned": [1], "python": "3.12"},
        "warmup_ticks_excluded": warmup, "speed": "max" if paced_queue_ns is None else 20.0,
    }
    s.update(summary or {})
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(s))
    np.savez_compressed(d / "latency_raw.npz", **raw)
    return d


def _lat(n: int = 20_000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(np.log(10_000), 0.3, n) + rng.pareto(2.5, n) * 2_000).astype(np.int64)


def _run_report(argv: list[str], capsys) -> tuple[int, str, str]:
    code = tickscore_main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _parse_table(text: str) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Return (header 1 cells, header 2 cells, row label -> cells) of the right-aligned table."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("latency (µs)"))
    label_w = len("latency (µs)")
    ends = [label_w + m.end() for m in re.finditer(r"\S+", lines[i][label_w:])]
    starts = [label_w, *ends[:-1]]

    def cells(line: str) -> list[str]:
        return [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]

    head1, head2 = cells(lines[i]), cells(lines[i + 1])
    rows: dict[str, list[str]] = {}
    for line in lines[i + 3:]:
        if "=" in line:
            break
        if line.strip():
            rows[re.split(r"\s{2,}", line)[0]] = cells(line)
    return head1, head2, rows


# ---------------------------------------------------------------------------- table


def test_report_of_two_synthetic_runs_shows_ratio_of_second_against_first(tmp_path, capsys):
    lat = _lat()
    a = _make_run(tmp_path / "base", lat, warmup=100)
    b = _make_run(tmp_path / "slow", lat * 3 // 2, warmup=100)
    code, out, _ = _run_report([str(a), str(b), "--no-plots"], capsys)
    assert code == 0
    head1, head2, rows = _parse_table(out)
    assert head1 == ["base", "slow", "slow"] and head2 == ["service", "service", "ratio"]
    ra, rb = load_run(a), load_run(b)
    for label, key in (("p50", "p50"), ("p99", "p99"), ("p99.9", "p999")):
        va, vb = ra.stats.percentiles[key], rb.stats.percentiles[key]
        assert rows[label] == [f"{va / 1000:,.2f}", f"{vb / 1000:,.2f}", f"{vb / va:.2f}x"]
        assert rows[label][2] == "1.50x"
    assert rows["max"][2] == "1.50x"
    assert rows["count"] == [f"{lat.size - 100:,}"] * 2 + [""]
    assert rows["backend"] == ["ort", "ort", ""] and rows["quantization"] == ["int8", "int8", ""]
    # throughput is the same (same t_in spacing), ratio 1.00x
    assert rows["ticks/s"][2] == "1.00x"
    assert "ratio          = this run / base" in out


def test_report_numbers_are_the_latency_stats_of_raw_arrays_after_warmup(tmp_path):
    lat = _lat(5_000)
    lat[:50] = 5_000_000  # slow warm-up ticks must not leak into the stats
    run = load_run(_make_run(tmp_path / "r", lat, warmup=50))
    assert run.stats == latency_stats(lat[50:])
    assert run.summary_mismatches() == []
    assert run.stats.max < 5_000_000


def test_duplicate_dir_names_get_distinct_column_labels(tmp_path):
    a = _make_run(tmp_path / "x" / "run", _lat(2_000))
    b = _make_run(tmp_path / "y" / "run", _lat(2_000, seed=2))
    head1, _, _ = _parse_table(compare_table([load_run(a), load_run(b)]))
    assert head1[:2] == ["x/run", "y/run"]


# ---------------------------------------------------------------------------- paced / CO


def test_paced_run_shows_service_time_and_co_corrected_series_with_their_labels(tmp_path, capsys):
    lat = _lat(10_000)
    queue = np.zeros(lat.size, dtype=np.int64)
    queue[5_000:5_200] = np.arange(200, 0, -1) * 50_000  # a 10 ms stall and its queue
    d = _make_run(tmp_path / "paced", lat, warmup=10, paced_queue_ns=queue)
    out_dir = tmp_path / "rep"
    code, out, _ = _run_report([str(d), "--out", str(out_dir), "--html"], capsys)
    assert code == 0
    _, head2, rows = _parse_table(out)
    assert head2 == ["service", "from intended"]
    run = load_run(d)
    assert run.paced and run.corrected_stats is not None
    assert rows["p99.9"][1] == f"{run.corrected_stats.percentiles['p999'] / 1000:,.2f}"
    assert run.corrected_stats.percentiles["p999"] > run.stats.percentiles["p999"]
    assert SERVICE_LABEL in out and CO_LABEL in out
    page = (out_dir / "report.html").read_text()
    assert SERVICE_LABEL in page and CO_LABEL in page


def test_unpaced_run_has_no_co_corrected_column(tmp_path):
    text = compare_table([load_run(_make_run(tmp_path / "r", _lat(2_000)))])
    assert "from intended" not in text and CO_LABEL not in text


# ---------------------------------------------------------------------------- check


def _const_run(d: Path, value_ns: int) -> Path:
    return _make_run(d, np.full(2_000, value_ns, dtype=np.int64), stages=False)


def test_check_exits_0_when_candidate_within_limit(tmp_path, capsys):
    base = _const_run(tmp_path / "base", 1_000)
    cand = _const_run(tmp_path / "cand", 1_050)
    code, out, _ = _run_report(["--check", str(base), str(cand), "--max-regress", "10%"], capsys)
    assert code == 0
    assert "PASS" in out and "FAIL" not in out


def test_check_exits_1_with_message_per_regressed_percentile(tmp_path, capsys):
    lat = _lat(10_000)
    base = _make_run(tmp_path / "base", lat)
    cand = _make_run(tmp_path / "cand", lat * 13 // 10)  # +30 %
    code, out, _ = _run_report(["--check", str(base), str(cand), "--max-regress", "0.1"], capsys)
    assert code == 1
    fails = [line.strip() for line in out.splitlines() if line.strip().startswith("FAIL p")]
    assert [f.split()[1] for f in fails] == ["p50", "p99"]
    b, c = load_run(base).stats.percentiles["p99"], load_run(cand).stats.percentiles["p99"]
    p99 = fails[1]
    assert f"{c / 1000:,.2f} µs" in p99 and f"{b / 1000:,.2f} µs" in p99
    assert f"{c / b:.3f}x" in p99 and "limit 1.100x (+10%)" in p99


def test_check_passes_exactly_on_the_boundary_and_fails_one_ns_above(tmp_path):
    base = load_run(_const_run(tmp_path / "base", 1_000))
    at = load_run(_const_run(tmp_path / "at", 1_100))
    above = load_run(_const_run(tmp_path / "above", 1_101))
    for r in ("10%", "0.1", 0.1):
        assert check_regression(base, at, r)[0], r
        ok, msgs = check_regression(base, above, r)
        assert not ok and all(m.startswith("FAIL") for m in msgs)


@pytest.mark.parametrize("bad", ["abc", "-5%", "10", "", "%", "nan", "1e999%"])
def test_check_with_bad_max_regress_exits_2(tmp_path, capsys, bad):
    base = _const_run(tmp_path / "base", 1_000)
    code, _, err = _run_report(["--check", str(base), str(base), f"--max-regress={bad}"], capsys)
    assert code == 2
    assert "--max-regress" in err


def test_parse_max_regress_accepts_percent_and_fraction_exactly():
    assert parse_max_regress("10%") == parse_max_regress("0.1") == parse_max_regress(0.1)
    assert float(parse_max_regress("150%")) == 1.5
    assert parse_max_regress("0") == 0


def test_check_with_missing_dir_exits_2_naming_it(tmp_path, capsys):
    base = _const_run(tmp_path / "base", 1_000)
    code, _, err = _run_report(["--check", str(base), str(tmp_path / "nope")], capsys)
    assert code == 2 and "nope" in err and "no such directory" in err


def test_report_with_no_dirs_or_both_modes_is_a_usage_error(tmp_path, capsys):
    base = _const_run(tmp_path / "base", 1_000)
    assert _run_report([], capsys)[0] == 2
    assert _run_report([str(base), "--check", str(base), str(base)], capsys)[0] == 2
    assert _run_report([str(base), "--max-regress", "10%"], capsys)[0] == 2


# ---------------------------------------------------------------------------- load errors


def test_load_run_without_raw_npz_names_dir_and_file(tmp_path):
    d = _const_run(tmp_path / "r", 1_000)
    (d / "latency_raw.npz").unlink()
    with pytest.raises(RunLoadError, match=r"r: missing latency_raw\.npz"):
        load_run(d)


def test_load_run_without_summary_names_dir_and_file(tmp_path, capsys):
    d = _const_run(tmp_path / "r", 1_000)
    (d / "summary.json").unlink()
    with pytest.raises(RunLoadError, match=r"run dir .*r: missing summary\.json"):
        load_run(d)
    code, _, err = _run_report([str(d), "--no-plots"], capsys)
    assert code == 2 and "summary.json" in err and str(d) in err


def test_load_run_with_corrupt_files_says_corrupt(tmp_path):
    d = _const_run(tmp_path / "r", 1_000)
    (d / "latency_raw.npz").write_bytes(b"not a zip")
    with pytest.raises(RunLoadError, match=r"latency_raw\.npz is corrupt"):
        load_run(d)
    (d / "summary.json").write_text("{truncated")
    with pytest.raises(RunLoadError, match=r"summary\.json is corrupt"):
        load_run(d)


# ---------------------------------------------------------------------------- files / HTML


def test_html_report_is_self_contained_with_all_plots_inlined(tmp_path):
    a = load_run(_make_run(tmp_path / "a", _lat(), warmup=500))
    b = load_run(_make_run(tmp_path / "b", _lat(seed=7) * 11 // 10, warmup=500,
                           paced_queue_ns=np.zeros(20_000, dtype=np.int64)))
    files = write_report([a, b], tmp_path / "out", html=True)
    for key in ("percentiles", "over_time", "histogram", "stages"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    page = files["html"].read_text()
    assert "http://" not in page and "https://" not in page
    assert page.count('<img alt="') == 4
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r"<(script|link)\b", page)
    assert "1.10x" in page or "1.09x" in page or "1.11x" in page
    data = json.loads(files["json"].read_text())
    assert data["runs"][1]["from_intended_ns"] is not None


def test_report_via_subprocess_prints_table_and_writes_files(tmp_path):
    a = _make_run(tmp_path / "a", _lat(3_000))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "report", str(a), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "latency (µs)" in proc.stdout and "stage (µs)" in proc.stdout
    assert (out / "percentiles.png").is_file() and not (out / "report.html").exists()


# ---------------------------------------------------------------------------- real replay


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> list[str]:
    """Return replay flags selecting a model: the shipped one, else a small one trained here."""
    from models.loader import default_model_path

    if default_model_path().is_file():
        return []
    out = tmp_path_factory.mktemp("model")
    proc = subprocess.run(
        [sys.executable, "-m", "models.train", "--out-dir", str(out), "--events", "60000"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0 or not (out / "risk_int8.onnx").is_file():
        pytest.skip("no shipped model and training one failed: " + proc.stderr.strip()[-300:])
    return ["--model", str(out / "risk_int8.onnx")]


def _replay(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine.cli", "replay", "--publish", "none", "--pin", "none",
           "--no-progress", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


def _replay_table(stdout: str) -> dict[str, dict[str, str]]:
    """Parse the replay's format_table output: column name -> row label -> cell."""
    lines = stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("latency (µs)"))
    cols = re.split(r"\s{2,}", lines[i].strip())[1:]
    table: dict[str, dict[str, str]] = {c: {} for c in cols}
    for line in lines[i + 2:]:
        if not line.strip():
            break
        parts = line.split()
        for c, v in zip(cols, parts[1:], strict=True):
            table[c][parts[0]] = v
    return table


def test_report_of_real_replays_equals_the_replays_printed_tables_and_summary(
    tmp_path, capsys, model_args
):
    runs = {"fast": ("--limit", "20000"), "paced": ("--limit", "3000", "--speed", "20")}
    dirs = []
    for name, extra in runs.items():
        d = tmp_path / name
        proc = _replay(d, *extra, *model_args)
        printed = _replay_table(proc.stdout)
        assert {"count", "p50", "p99", "p99.99", "max", "mean", "ticks/s"} <= printed["service"].keys()
        run = load_run(d)
        summary = json.loads((d / "summary.json").read_text())
        assert run.stats.as_contract() == summary["latency_ns"]
        if run.paced:
            assert run.corrected_stats.as_contract() == summary["latency_from_intended_ns"]
        _, head2, rows = _parse_table(compare_table([run]))
        for col, series in (("service", "service"), ("from intended", "from intended")):
            if col not in printed:
                continue
            j = head2.index(series)
            for label, cell in printed[col].items():
                assert rows[label][j] == cell, (name, col, label)
        assert ("from intended" in printed) == run.paced
        dirs.append(str(d))
    code, out, _ = _run_report([*dirs, "--no-plots"], capsys)
    assert code == 0 and CO_LABEL in out


def test_a_run_stopped_early_is_flagged_in_the_text_and_html_reports(tmp_path, capsys):
    full = _make_run(tmp_path / "full", _lat())
    stopped = _make_run(tmp_path / "stopped", _lat(4_000, seed=2),
                        summary={"interrupted": True, "data": {"path": "d.parquet", "rows": 250_000},
                                 "mode": "zmq", "rate_tps": 5000.0})  # fmt: skip
    code, out, _ = _run_report([str(full), str(stopped), "--out", str(tmp_path / "rep"), "--html"], capsys)
    assert code == 0
    header = out.split("\n\n")[0].splitlines()
    i = next(k for k, line in enumerate(header) if "stopped" in line and "[2]" in line)
    assert "speed 5,000 ticks/s" in header[i]  # a wire run's rate, not "max"
    assert header[i + 1].strip() == ("warning: stopped early (Ctrl-C / SIGTERM) after 4,000 ticks of the "
                                     "file's 250,000: its figures cover those only")  # fmt: skip
    assert sum("stopped early" in line for line in header) == 1  # the complete run has none
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "stopped early (Ctrl-C / SIGTERM) after 4,000 ticks" in html
