"""Live equals replay: the same file, in-process and through a spawned service, gives the same scores.

For every event shape (L1, trade-only, L3 order by order, and an L3 venue that
announces takers, read with ``crossing_add=aggressor``), over real sockets
(ZeroMQ ipc and Aeron IPC): ``replay --record-scores`` in-process and
``replay --via zmq|aeron --record-scores`` (publisher -> ``tickscore serve`` ->
subscriber, three processes) record ``scores.parquet``; the two must hold the
same scores tick by tick: same count, same order per instrument, ``score``
bit-identical, same flags, same event times relative to the first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from replay.scores import compare_scores, read_scores

ROOT = Path(__file__).resolve().parents[1]

VENUE_MAP = [
    "--map", "shape=l3,symbol==BTCUSD,ts_event=microtimestamp,kind=action,order_id=id,side=order_type",
    "--map", "price=price,size=amount,kinds.created=add,kinds.changed=modify,kinds.deleted=delete",
    "--map", "sides.0=buy,sides.1=sell,crossing_add=aggressor",
]  # fmt: skip


def _replay(*args, timeout=300):
    cmd = [sys.executable, "-m", "engine.cli", "replay", "--no-progress", "--pin", "none",
           "--backend", "fused", "--warmup-ticks", "100", *[str(a) for a in args]]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from replay.generator import write_market
    from replay.generator_l3 import write_l3, write_trades
    from tests.venue_feed import venue_feed

    d = tmp_path_factory.mktemp("shapes")
    out = {
        "l1": (write_market(d / "l1.parquet", 4000, seed=3), []),
        "trades": (write_trades(d / "trades.parquet", 3000, seed=4), []),
        "l3": (write_l3(d / "l3.parquet", 5000, seed=5), []),
    }
    venue = d / "btcusd-live-orders.csv"
    venue_feed(n_steps=1500)[0].write_csv(venue)
    out["l3-venue"] = (venue, VENUE_MAP)
    return out


_INPROC: dict[str, pl.DataFrame] = {}


def _inprocess(shape, files, tmp_path):
    if shape not in _INPROC:
        path, extra = files[shape]
        out = tmp_path / f"inproc-{shape}"
        # the reference: the per-tick python loop (the live service runs the native one where it can)
        _replay("--data", path, *extra, "--publish", "none", "--out", out, "--record-scores",
                "--loop", "python")
        _INPROC[shape] = read_scores(out)
    return _INPROC[shape]


@pytest.mark.parametrize("via", ["zmq", "aeron"])
@pytest.mark.parametrize("shape", ["l1", "trades", "l3", "l3-venue"])
def test_live_service_scores_equal_in_process_replay_tick_by_tick(shape, via, files, tmp_path):
    path, extra = files[shape]
    a = _inprocess(shape, files, tmp_path)
    assert a.height > 1000
    out = tmp_path / f"wire-{shape}-{via}"
    _replay("--via", via, "--data", path, *extra, "--out", out, "--record-scores", "--rate", "20000")
    b = read_scores(out)
    diff = compare_scores(a, b)
    assert diff is None, f"{shape} via {via}: live differs from replay, first differing tick: {diff}"
    # the service received and decoded every tick in compiled code (its default for a fused model)
    final = json.loads((out / "summary.json").read_text())["service_final"]
    assert final["ingress"] == [{"zmq": "NativeZmqTickSource", "aeron": "NativeAeronTickSource"}[via]], final
    assert a["model_version"].unique().to_list() == b["model_version"].unique().to_list()


@pytest.mark.parametrize("via", ["zmq", "aeron"])
def test_live_service_with_the_python_loop_scores_as_the_native_one(via, files, tmp_path):
    path, extra = files["l1"]
    a = _inprocess("l1", files, tmp_path)
    runs = {}
    for loop in ("native", "python"):
        out = tmp_path / f"wire-{loop}"
        _replay("--via", via, "--data", path, "--out", out, "--record-scores", "--rate", "20000",
                "--loop", loop)
        runs[loop] = read_scores(out)
        assert json.loads((out / "summary.json").read_text())["service_final"]["loop"] == loop
    assert compare_scores(runs["native"], runs["python"]) is None
    assert compare_scores(a, runs["native"]) is None


def test_compare_scores_names_the_first_differing_tick():
    a = pl.DataFrame({"seq": [0, 1, 2], "instrument": ["X", "Y", "X"], "ts_event_ns": [10, 11, 12],
                      "score": [0.25, 0.5, 0.75], "flags": [1, 0, 0], "model_version": ["m"] * 3},
                     schema_overrides={"seq": pl.UInt64, "flags": pl.UInt32})  # fmt: skip
    assert compare_scores(a, a) is None
    shifted = a.with_columns(pl.col("ts_event_ns") + 1_000)  # wire mode's rebased times
    assert compare_scores(a, shifted) is None
    assert compare_scores(a, shifted, times="exact") is not None
    bits = a["score"].to_numpy().copy()
    bits.view(np.uint64)[2] ^= 1  # one ulp
    diff = compare_scores(a, a.with_columns(pl.Series("score", bits)))
    assert diff is not None and diff.startswith("instrument X, its score #1 (seq 2 vs 2)")
    assert compare_scores(a, a.with_columns(pl.Series("flags", [1, 0, 8], pl.UInt32))) is not None
    assert compare_scores(a, a.head(2)) == "3 scores vs 2"


def test_a_file_sent_in_many_chunks_is_scored_as_the_in_process_replay(files, tmp_path):
    # the publisher reads, encodes and sends the file 700 rows at a time (bounded memory):
    # nothing is lost or reordered at chunk boundaries, and the pacing runs on across them
    path, extra = files["l3"]
    a = _inprocess("l3", files, tmp_path)
    out = tmp_path / "wire-chunked"
    run = _replay("--via", "zmq", "--data", path, "--out", out, "--record-scores", "--rate", "20000",
                  "--chunk-rows", "700")  # fmt: skip
    diff = compare_scores(a, read_scores(out))
    assert diff is None, f"chunked publisher: first differing tick: {diff}"
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["ticks"] == s["scores"] == a.height
    assert s["publisher"]["sent"] == a.height and "Traceback" not in run.stderr
