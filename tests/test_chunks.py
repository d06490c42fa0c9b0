"""Chunked reading (iter_tick_chunks), exchange-time sorting, the chunked replay source, batch features."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.schema import N_REJECT_REASONS
from replay.generator import generate_market, inject_bad_rows
from replay.generator_l3 import generate_l3, generate_trades
from replay.reader import iter_tick_chunks, read_ticks

FORMATS = ["parquet", "csv", "csv.gz"]


def write(df: pl.DataFrame, tmp_path: Path, fmt: str, name: str = "data") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        df.write_parquet(path, row_group_size=3_000)
    elif fmt == "csv":
        df.write_csv(path)
    else:
        path.write_bytes(gzip.compress(df.write_csv().encode()))
    return path


def concat(chunks) -> np.ndarray:
    return np.concatenate([c.ticks for c in chunks])


@pytest.fixture(scope="module")
def l1_bad():
    return inject_bad_rows(generate_market(12_000, seed=5), 0.02, seed=5)[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("chunk_rows", [1, 997, 5_000, 100_000])
def test_chunks_concatenate_to_the_whole_read_with_the_same_rejects(tmp_path, l1_bad, fmt, chunk_rows):
    if chunk_rows == 1 and fmt != "parquet":
        pytest.skip("one-row chunks: parquet is enough")
    df = l1_bad.head(300) if chunk_rows == 1 else l1_bad
    p = write(df, tmp_path, fmt)
    whole = read_ticks(p)
    ch = iter_tick_chunks(p, chunk_rows)
    sizes = []
    parts = []
    for c in ch:
        sizes.append(len(c.ticks))
        parts.append(c.ticks)
    np.testing.assert_array_equal(np.concatenate(parts), whole.ticks)
    assert ch.rejected == whole.rejected and ch.rows_read == whole.rows == ch.total_rows
    assert ch.symbols == whole.symbols
    assert max(sizes) <= chunk_rows


@pytest.mark.parametrize("shape", ["trades", "l3"])
def test_chunks_of_trade_only_and_l3_files_equal_the_whole_read(tmp_path, shape):
    df = generate_trades(5_000) if shape == "trades" else generate_l3(20_000)
    p = write(df, tmp_path, "csv.gz")
    whole = read_ticks(p, shape=shape)
    ch = iter_tick_chunks(p, 1_234, shape=shape)
    np.testing.assert_array_equal(concat(ch), whole.ticks)
    assert len(whole.ticks) == df.height


def _shuffled_times(n=6_000, max_shift=50, seed=0) -> pl.DataFrame:
    """Trades in receive order whose exchange times run up to ``max_shift`` rows backwards."""
    rng = np.random.default_rng(seed)
    ts = np.arange(n, dtype=np.int64) * 1_000 + 10**18
    ex = ts - rng.integers(0, max_shift, n) * 1_000  # exchange time lags receive time
    return pl.DataFrame({
        "ts_event_ns": ex, "ts_recv_ns": ts, "symbol": "X", "kind": 2,
        "price": 100.0 + (np.arange(n) % 5), "size": 1.0, "side": 1,
    })  # fmt: skip


def test_sorting_by_exchange_time_is_stable_and_chunked_sort_matches_whole(tmp_path):
    df = _shuffled_times()
    p = write(df, tmp_path, "parquet")
    unsorted = read_ticks(p)
    assert unsorted.rejected.get("time_backwards", 0) > 0  # why the option exists
    whole = read_ticks(p, sort_by_exchange_time=True)
    assert whole.rejected == {} and len(whole.ticks) == df.height
    ts = whole.ticks["ts_event_ns"]
    assert (np.diff(ts) >= 0).all()
    # ties keep file order: the price column is the file position mod 5
    order = np.lexsort((np.arange(df.height), df["ts_event_ns"].to_numpy()))
    np.testing.assert_array_equal(whole.ticks["price"], df["price"].to_numpy()[order])
    assert whole.anomalies["reordered"] > 0
    ch = iter_tick_chunks(p, 500, sort_by_exchange_time=True)
    np.testing.assert_array_equal(concat(ch), whole.ticks)
    assert ch.rejected == {} and "late" not in ch.anomalies


def test_rows_displaced_beyond_the_sort_window_are_counted_late_not_lost(tmp_path):
    df = _shuffled_times(n=3_000, max_shift=3)
    ts = df["ts_event_ns"].to_numpy().copy()
    ts[2_500] = ts[100]  # one row 2,400 rows late
    df = df.with_columns(pl.Series("ts_event_ns", ts))
    p = write(df, tmp_path, "parquet")
    ch = iter_tick_chunks(p, 200, sort_by_exchange_time=True)
    got = concat(ch)
    assert ch.anomalies.get("late", 0) >= 1
    assert len(got) + sum(ch.rejected.values()) == df.height
    assert ch.rejected.get("time_backwards", 0) >= 1


def test_receive_times_running_backwards_are_counted_and_kept(tmp_path):
    df = _shuffled_times(n=100, max_shift=1)
    recv = df["ts_recv_ns"].to_numpy().copy()
    recv[[10, 50]] -= 10_000_000
    p = write(df.with_columns(pl.Series("ts_recv_ns", recv)), tmp_path, "csv")
    whole = read_ticks(p)
    assert whole.anomalies == {"recv_backwards": 2} and len(whole.ticks) == 100
    ch = iter_tick_chunks(p, 30)
    concat(ch)
    assert ch.anomalies == {"recv_backwards": 2}


def test_csv_lines_with_the_wrong_field_count_are_malformed_when_streaming(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text(
        "ts_event_ns,symbol,kind,price,size\n1,X,2,1.0,1\n2,X,2,1.0\n3,X,2,1.0,1,extra\n4,X,2,1.0,1\n"
    )
    ch = iter_tick_chunks(p, 10)
    assert len(concat(ch)) == 2 and ch.rejected == {"malformed": 2} and ch.rows_read == 4


# --------------------------------------------------------------------------- chunked replay
def _replay(path, **kw):
    from replay.run import ReplayOptions, run_inprocess

    opts = ReplayOptions(data=str(path), pin=None, publish="none", progress=False, backend="ort",
                         warmup_ticks=100, **kw)  # fmt: skip
    return run_inprocess(opts).summary


def test_chunked_replay_scores_every_tick_like_the_in_memory_replay(tmp_path, l1_bad):
    p = write(l1_bad, tmp_path, "parquet")
    a = _replay(p)
    b = _replay(p, chunk_rows=1_000)
    assert b["chunked"] and b["chunks"]["served"] >= 10 and not a["chunked"]
    for k in ("ticks", "scores", "rejected", "rejected_by_reason"):
        assert a[k] == b[k], k
    assert b["latency_count"] == b["scores"] - 100
    assert b["ticks"] == b["scores"] + b["rejected"] == l1_bad.height


def test_chunked_l3_replay_with_mapping_reports_shape_and_anomalies(tmp_path):
    df = generate_l3(15_000, seed=4)
    df = df.rename({"ts_event_ns": "exch_ts", "order_id": "oid"}).with_columns(
        pl.col("kind").replace_strict({2: "F", 3: "A", 4: "M", 5: "C"}, return_dtype=pl.String)
    )
    p = write(df, tmp_path, "csv")
    from replay.mapping import mapping_from_cli

    m = mapping_from_cli(["ts_event=exch_ts,order_id=oid,kinds.F=fill,kinds.A=add,kinds.M=modify,"
                          "kinds.C=delete"], shape="l3")  # fmt: skip
    s = _replay(p, mapping=m, chunk_rows=4_000, speed=50.0, limit=3_000)
    assert s["shape"] == "l3" and s["feature_set"].startswith("l3.v1.")
    assert s["ticks"] == 3_000 and s["rejected"] == 0
    assert s["anomalies"]["snapshot"] > 0
    assert s["latency_from_intended_ns"]["p50"] >= s["latency_ns"]["p50"]


# --------------------------------------------------------------------------- reader process, shared memory
def _memfd_mappings() -> list[str]:
    return [ln for ln in Path("/proc/self/maps").read_text().splitlines() if "tickscore-chunks" in ln]


def _source(path, chunk_rows, **kw):
    from replay.source import ChunkedReplaySource

    return ChunkedReplaySource(iter_tick_chunks(path, chunk_rows, **kw.pop("reader", {})), **kw)


def _drain_source(src) -> np.ndarray:
    """Poll ``src`` to the end without an agent; return a copy of every tick handed out."""
    out = []
    while True:
        i = src.poll()
        if i < 0:
            if src.done:
                break
            continue
        out.append(src.ticks[i].copy())
    return np.array(out, dtype=src.ticks.dtype) if out else src.ticks[:0].copy()


def _scored(source, symbols, kind: str) -> list[tuple]:
    """Run the scoring agent over ``source``; return (symbol, seq, ts_event, score, flags) per score."""
    from engine.agent import AgentRunner, make_idle
    from engine.scorer import ScoringAgent
    from engine.wire import decode_score
    from features.featureset import DEFAULT_FEATURE_SET as fs
    from models.backend_choice import select_backend
    from models.loader import default_model_path

    first = source.ticks[:2_000].copy()
    backend = select_backend(kind, default_model_path(), fs, ticks=first).backend
    got: list[bytes] = []

    class Sink:
        def publish(self, topic, payload):
            got.append(bytes(payload))
            return True

    agent = ScoringAgent(source, backend, [Sink()], symbols, fs.params_array(), recorder_capacity=1 << 16)
    if hasattr(source, "attach"):
        source.attach(agent)
    try:
        AgentRunner(agent, make_idle("busy-spin"), pin_core=None).run()
    finally:
        if hasattr(source, "finish"):
            source.finish()
    return [(s.instrument, s.seq, s.ts_event_ns, s.score, s.flags) for s in map(decode_score, got)]


@pytest.mark.parametrize("kind", ["fused", "ort"])
def test_chunked_source_scores_tick_for_tick_like_the_in_memory_source(tmp_path, l1_bad, kind):
    from replay.source import ReplaySource

    p = write(l1_bad, tmp_path, "parquet")
    whole = read_ticks(p)
    a = _scored(ReplaySource(np.ascontiguousarray(whole.ticks)), whole.symbols, kind)
    src = _source(p, 1_000)
    b = _scored(src, whole.symbols, kind)
    assert len(a) == len(b) > 10_000
    assert a == b  # same symbols, seqs, event times, scores and flags, across 12 chunk boundaries
    assert src.chunks_served >= 12 and src.handed == len(whole.ticks)
    assert src.chunks.rejected == whole.rejected and src.chunks.rows_read == whole.rows


def test_chunks_larger_than_a_slot_arrive_whole_in_several_slots(tmp_path):
    df = _shuffled_times(n=6_000, max_shift=600)  # the sort window emits chunks > chunk_rows
    p = write(df, tmp_path, "parquet")
    want = concat(iter_tick_chunks(p, 500, sort_by_exchange_time=True))
    src = _source(p, 500, reader={"sort_by_exchange_time": True})
    got = _drain_source(src)
    src.finish()
    np.testing.assert_array_equal(got, want)
    assert src.max_chunk_ticks <= 500 and src.handed == len(want)


def test_limit_stops_the_reader_and_counts_only_handed_ticks(tmp_path, l1_bad):
    p = write(l1_bad, tmp_path, "csv")
    src = _source(p, 1_000, limit=2_500)
    got = _drain_source(src)
    src.finish()
    np.testing.assert_array_equal(got, read_ticks(p).ticks[:2_500])
    assert src.handed == 2_500 and src.total == 2_500
    assert not src._worker.alive


def test_reader_process_and_its_threads_run_on_the_given_cores(tmp_path, l1_bad):
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    p = write(l1_bad, tmp_path, "parquet")
    src = _source(p, 1_000, cpus={cores[0]})
    pid = src._worker.pid
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) > 1  # the decoders' thread pools exist by now
        assert all(os.sched_getaffinity(t) == {cores[0]} for t in tids)
    finally:
        src.close()


def test_chunked_file_without_one_accepted_tick_ends_at_once(tmp_path):
    df = generate_market(1_000, seed=1).with_columns(pl.lit(float("nan")).alias("price"),
                                                     pl.lit(float("nan")).alias("bid_px"))  # fmt: skip
    p = write(df, tmp_path, "parquet")
    src = _source(p, 100)
    assert len(_drain_source(src)) == 0 and src.done
    src.finish()
    assert src.handed == 0 and src.reader_rejected == {"nonfinite": 1_000} and src.position == 1_000


def test_reader_process_and_shared_memory_are_gone_after_a_run(tmp_path, l1_bad):
    p = write(l1_bad, tmp_path, "parquet")
    shm_before = set(Path("/dev/shm").glob("*tickscore*"))  # e.g. Aeron dirs of a killed service
    src = _source(p, 2_000)
    assert _memfd_mappings()  # the slots are mapped while the run goes on
    assert _drain_source(src).shape[0] == len(read_ticks(p).ticks)
    src.finish()
    assert not src._worker.alive and src._worker._proc.returncode == 0
    assert src.poll() == -1 and src.done
    assert _memfd_mappings() == []  # nothing held a view: unmapped at once
    assert set(Path("/dev/shm").glob("*tickscore*")) - shm_before == set()  # no named shm either


def _corrupt_row_group(tmp_path, n=160_000, group=10_000, bad_group=12) -> Path:
    """Parquet whose row group ``bad_group`` has garbage page headers (symbol column left intact).

    Past the first 100k rows, which shape detection reads whole.
    """
    import pyarrow.parquet as pq

    p = tmp_path / "corrupt.parquet"
    pq.write_table(generate_market(n, seed=3).to_arrow(), p, row_group_size=group)
    rg = pq.ParquetFile(p).metadata.row_group(bad_group)
    b = bytearray(p.read_bytes())
    for c in range(rg.num_columns):
        if rg.column(c).path_in_schema != "symbol":  # the row-count / symbol scan still passes
            off = rg.column(c).data_page_offset
            b[off : off + 64] = b"\xff" * 64
    p.write_bytes(bytes(b))
    return p


def test_corrupt_row_group_mid_file_ends_the_run_with_a_clear_error_and_frees_everything(tmp_path):
    from replay.source import ChunkReadError

    p = _corrupt_row_group(tmp_path)
    with pytest.raises(ChunkReadError, match=r"reading .*corrupt\.parquet failed after 120,000 rows: "
                       r"cannot read .*corrupt\.parquet as Parquet \(corrupt") as ei:  # fmt: skip
        _replay(p, chunk_rows=10_000)
    assert isinstance(ei.value, ValueError)  # the CLI prints it as a one-line error, exit code 2
    assert "Traceback" in ei.value.child_traceback
    import gc

    del ei  # its traceback holds the run's frames, and they the last chunk's view
    gc.collect()
    assert _memfd_mappings() == []


def test_corrupt_file_from_the_cli_is_one_error_line_and_exit_code_2(tmp_path):
    import subprocess
    import sys

    p = _corrupt_row_group(tmp_path)
    cmd = [sys.executable, "-m", "engine.cli", "replay", "--data", str(p), "--chunk-rows", "10000",
           "--publish", "none", "--no-progress", "--pin", "none", "--backend", "ort"]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 2, r.stderr
    assert "tickscore replay: error: reading" in r.stderr and "corrupt" in r.stderr
    assert "Traceback" not in r.stderr and "loop continues" not in r.stderr


def test_reader_process_killed_mid_run_is_a_clear_error(tmp_path, l1_bad):
    import os
    import signal

    from replay.source import ChunkReadError

    p = write(l1_bad, tmp_path, "parquet")
    src = _source(p, 1_000, prefetch=1)
    os.kill(src._worker.pid, signal.SIGKILL)
    _drain_source(src)  # what was decoded already is served, then the run ends
    assert src.done and 0 < src.handed < len(read_ticks(p).ticks)
    with pytest.raises(ChunkReadError, match=r"reader process exited unexpectedly \(exit code -9\)"):
        src.finish()


def test_ctrl_c_mid_run_stops_the_reader_and_frees_the_shared_memory(tmp_path, l1_bad):
    import gc

    from engine.agent import AgentRunner, make_idle
    from engine.scorer import ScoringAgent
    from features.featureset import DEFAULT_FEATURE_SET as fs
    from models.backend_choice import select_backend
    from models.loader import default_model_path

    p = write(l1_bad, tmp_path, "parquet")
    src = _source(p, 1_000)
    backend = select_backend("ort", default_model_path(), fs).backend

    def interrupt(agent, now_ns):
        if agent.seq >= 3_000:
            raise KeyboardInterrupt

    agent = ScoringAgent(src, backend, [], src.symbols, fs.params_array(), recorder_capacity=1 << 16,
                         triggers=[interrupt])  # fmt: skip
    src.attach(agent)
    worker = src._worker
    with pytest.raises(KeyboardInterrupt):
        try:
            AgentRunner(agent, make_idle("busy-spin"), pin_core=None).run()
        finally:
            src.finish()  # what ReplayData.finish does on the way out
    assert not worker.alive
    assert 3_000 <= src.handed < 12_000 and src.latency.count > 0
    del agent, src
    gc.collect()
    assert _memfd_mappings() == []


# --------------------------------------------------------------------------- batch features
@pytest.mark.parametrize("shape", ["l1", "l3"])
def test_features_command_equals_one_batch_call_with_chunks_and_threads(tmp_path, shape):
    from features.featureset import DEFAULT_BY_SHAPE
    from features.registry import kernels_for
    from replay.batch_features import compute_features

    df = generate_market(20_000, seed=2) if shape == "l1" else generate_l3(20_000, seed=2)
    p = write(df, tmp_path, "parquet")
    out = tmp_path / "f.parquet"
    res = compute_features(p, out, shape=shape, chunk_rows=3_000, threads=2, progress=False)
    got = pl.read_parquet(out)
    fs = DEFAULT_BY_SHAPE[shape]
    k = kernels_for(fs)
    td = read_ticks(p, shape=shape)
    X = np.empty((len(td.ticks), len(fs.names)), np.float32)
    fl = np.empty(len(td.ticks), np.int32)
    fstate, istate = k.new_state(len(td.symbols))
    k.compute_batch(td.ticks, fstate, istate, fs.params_array(), X, fl, np.zeros(N_REJECT_REASONS, np.int64))
    assert res["events"] == len(td.ticks) == got.height and res["threads"] == 2
    np.testing.assert_array_equal(got.select(fs.names).to_numpy(), X)
    np.testing.assert_array_equal(got["flags"].to_numpy(), fl)
    np.testing.assert_array_equal(got["ts_event_ns"].to_numpy(), td.ticks["ts_event_ns"])
    assert got["symbol"].cast(pl.String).to_list()[:3] == [td.symbols[i] for i in td.ticks["instrument"][:3]]
