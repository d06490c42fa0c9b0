"""The native duty cycle (engine.native_loop): same Scores as the python loop, byte for byte.

* the compiled Score encoder writes msgspec's bytes for every row (hypothesis);
* a replay with ``loop="native"`` publishes the same Scores as ``loop="python"``
  (every field but the two clock readings equal, and each payload exactly what
  msgspec writes for its decoded row), also paced, chunked and after a hot reload;
* over a real ipc socket an independent subscriber gets every Score with
  contiguous seq and the recorded bytes; a stalled subscriber costs counted drops;
* what the native loop cannot serve is a clear error for ``native`` and the python
  loop for ``auto``; an instrument id beyond the symbol table is a counted error.
"""

from __future__ import annotations

import math
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.native_loop import MAX_SCORE_BYTES, NativeLoop, SymbolTable, encode_score, native_loop_refusal
from engine.recorder import LatencyRecorder
from engine.scorer import NativeLoopUnavailable
from engine.wire import SCORE_SCHEMA_ID, Score, decode_score
from replay.run import ReplayOptions, run_inprocess
from replay.scores import ScoreRecorder

_enc = msgspec.msgpack.Encoder()
_I64 = st.integers(-(2**63), 2**63 - 1)
_EDGES = st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, -1, -32, -33,
                          -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)])  # fmt: skip
_INTS = st.one_of(_EDGES, _I64)
_SYMS = st.text(min_size=0, max_size=40).filter(lambda s: len(s.encode()) <= 255)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sym=_SYMS, ver=_SYMS, ints=st.tuples(_INTS, _INTS, _INTS, _INTS, _INTS, _INTS, _INTS),
       score=st.floats(allow_nan=True, allow_infinity=True))  # fmt: skip
def test_compiled_score_encoder_writes_msgspecs_bytes(sym, ver, ints, score):
    st_ = SymbolTable(["other", sym], ver)
    buf = np.zeros(MAX_SCORE_BYTES, np.uint8)
    n = encode_score(buf, st_.table, st_.off[2], st_.off[3], ints[0], ints[1], ints[2], ints[3], score,
                     st_.ver_off, st_.ver_len, ints[4], ints[5], ints[6])  # fmt: skip
    ref = _enc.encode((SCORE_SCHEMA_ID, sym, *ints[:4], score, ver, *ints[4:]))
    assert buf[:n].tobytes() == ref
    if ints[5] >= 0 and ints[6] >= 0:  # what a subscriber decodes
        assert decode_score(ref) == Score(sym, *ints[:4], score, ver, *ints[4:]) or math.isnan(score)


def test_encoder_refuses_a_buffer_too_small_instead_of_writing_past_it():
    st_ = SymbolTable(["ES"], "v1")
    buf = np.zeros(10, np.uint8)
    assert encode_score(buf, st_.table, st_.off[0], st_.off[1], 1, 2, 3, 4, 0.5,
                        st_.ver_off, st_.ver_len, 0, 0, 0) == -1  # fmt: skip
    big = np.zeros(MAX_SCORE_BYTES, np.uint8)  # a symbol or version beyond the table is refused too
    v0, vl = st_.ver_off, st_.ver_len
    assert encode_score(big, st_.table, st_.off[0], 999, 1, 2, 3, 4, 0.5, v0, vl, 0, 0, 0) == -1
    assert encode_score(big, st_.table, -1, st_.off[1], 1, 2, 3, 4, 0.5, v0, vl, 0, 0, 0) == -1
    assert encode_score(big, st_.table, st_.off[0], st_.off[1], 1, 2, 3, 4, 0.5, v0, 999, 0, 0, 0) == -1


def test_symbols_over_255_bytes_are_refused_at_bind_not_truncated():
    with pytest.raises(ValueError, match="255 bytes"):
        SymbolTable(["x" * 256], "v1")


def _run_recording(opts: ReplayOptions):
    """Run ``opts`` (with ``record_scores``); return the summary and every published payload."""
    rec = {}
    orig = ScoreRecorder.__init__

    def keep(self):  # the run's recorder, to read its payloads after the run
        orig(self)
        rec["r"] = self

    ScoreRecorder.__init__ = keep
    try:
        res = run_inprocess(opts)
    finally:
        ScoreRecorder.__init__ = orig
    return res.summary, rec["r"].payloads


def _replay(loop: str, **kw):
    return _run_recording(ReplayOptions(publish="none", progress=False, loop=loop, record_scores=True,
                                        pin=None, **kw))  # fmt: skip


def _same_scores(a: list[bytes], b: list[bytes]) -> None:
    assert len(a) == len(b) > 0
    for pa, pb in zip(a, b, strict=True):
        sa, sb = decode_score(pa), decode_score(pb)
        # every field but the two clock readings, and each payload exactly msgspec's bytes of its row
        assert (sa.instrument, sa.seq, sa.ts_event_ns, sa.score, sa.model_version, sa.flags) == (
            sb.instrument, sb.seq, sb.ts_event_ns, sb.score, sb.model_version, sb.flags)
        assert _enc.encode(sa) == pa and _enc.encode(sb) == pb


@pytest.fixture(scope="module")
def python_run():
    return _replay("python", limit=30_000)


def test_native_replay_publishes_the_python_loops_scores(python_run):
    s_py, p_py = python_run
    s_nat, p_nat = _replay("native", limit=30_000)
    assert s_py["loop"] == "python" and s_nat["loop"] == "native"
    assert s_nat["scores"] == s_py["scores"] and s_nat["rejected_by_reason"] == s_py["rejected_by_reason"]
    _same_scores(p_py, p_nat)
    assert [decode_score(p).seq for p in p_nat] == list(range(len(p_nat)))
    assert s_nat["native_errors"] == 0


def test_native_replay_small_batches_and_auto_give_the_same_scores(python_run):
    _, p_py = python_run
    s, p = _replay("auto", limit=30_000, batch=3)
    assert s["loop"] == "native"
    _same_scores(p_py, p)


def test_native_replay_of_a_chunked_file_matches_the_in_memory_one(python_run):
    _, p_py = python_run
    s, p = _replay("native", limit=30_000, chunk_rows=7_000)
    assert s["loop"] == "native" and s["chunked"] and s["chunks"]["served"] >= 4
    _same_scores(p_py, p)


def test_paced_native_replay_records_intended_times_and_the_same_scores(tmp_path):
    s_py, p_py = _replay("python", limit=3_000, speed=50.0)
    s_nat, p_nat = _replay("native", limit=3_000, speed=50.0)
    _same_scores(p_py, p_nat)
    assert s_nat["latency_from_intended_ns"] is not None
    assert s_nat["latency_from_intended_ns"]["p50"] > 0


def test_native_loop_survives_a_hot_reload_with_contiguous_seq(python_run):
    from models.loader import default_model_path

    s, p = _replay("native", limit=30_000, speed=100.0, reload_at=[(2_000, str(default_model_path()))])
    assert [t["status"] for t in s["reloads"]] == ["swapped"]
    assert s["loop"] == "native"
    assert [decode_score(x).seq for x in p] == list(range(len(p)))
    _same_scores(python_run[1], p)


def test_loop_native_with_the_ort_backend_is_a_clear_error_and_auto_falls_back():
    with pytest.raises(NativeLoopUnavailable, match="--loop native"):
        run_inprocess(ReplayOptions(publish="none", progress=False, loop="native", backend="ort", limit=2_000,
                                    pin=None))  # fmt: skip
    res = run_inprocess(ReplayOptions(publish="none", progress=False, loop="auto", backend="ort", limit=2_000,
                                      pin=None))  # fmt: skip
    assert res.summary["loop"] == "python" and "ort" in res.summary["loop_reason"]


def test_sinks_without_a_compiled_path_are_named():
    class Fused:
        kind = "fused"

    class PySink:
        name = "aeron"

    assert "aeron" in native_loop_refusal(Fused(), [PySink()])
    assert native_loop_refusal(Fused(), [ScoreRecorder()]) is None


def test_an_instrument_beyond_the_symbol_table_is_a_counted_error_not_a_write_out_of_bounds():
    from engine.builder import load_scoring
    from engine.keep_warm import synthetic_ticks, throwaway_tick
    from engine.schema import N_REJECT_REASONS
    from models.loader import default_model_path

    sc = load_scoring(default_model_path(), "fused")
    ticks = synthetic_ticks(100)
    ticks["instrument"] = 0
    ticks["instrument"][50:] = 1  # a second instrument the loop has no symbol for
    fstate, istate = sc.kernels.new_state(2)
    counters = np.zeros(N_REJECT_REASONS, np.int64)
    tick, tctx = throwaway_tick(sc.backend, fstate, istate, sc.feature_set.params_array(), counters, ticks)
    nl = NativeLoop(tick, ["A"], "v", [], LatencyRecorder(128))
    assert nl.run(tctx.addr, 0, 100) == 100
    assert nl.seq == 50 and nl.errors == 50


def test_an_unpaced_batch_takes_each_ticks_t_in_from_the_previous_ticks_t_out():
    from engine.builder import load_scoring
    from engine.keep_warm import synthetic_ticks, throwaway_tick
    from engine.schema import N_REJECT_REASONS
    from models.loader import default_model_path

    sc = load_scoring(default_model_path(), "fused")
    ticks = synthetic_ticks(200)
    bad = {60, 61, 130}
    for i in bad:  # rejected (non-finite): the tick after one reads the clock afresh
        ticks["bid_px"][i] = ticks["price"][i] = np.nan
    fstate, istate = sc.kernels.new_state(1)
    counters = np.zeros(N_REJECT_REASONS, np.int64)
    tick, tctx = throwaway_tick(sc.backend, fstate, istate, sc.feature_set.params_array(), counters, ticks)
    rec = LatencyRecorder(256)
    nl = NativeLoop(tick, ["A"], "v", [], rec)
    assert nl.run(tctx.addr, 0, 120) == 120 and nl.run(tctx.addr, 120, 200) == 80
    scored = [i for i in range(200) if i not in bad]
    assert nl.seq == len(scored) == 197
    t_in, t_out = rec.t_in[:197], rec.t_out[:197]
    assert (t_out > t_in).all()
    for k in range(196):
        adjacent = scored[k + 1] == scored[k] + 1 and scored[k + 1] != 120  # 120: a new batch
        assert (t_in[k + 1] == t_out[k]) == adjacent, k


def test_an_independent_subscriber_gets_every_native_score_with_the_recorded_bytes(tmp_path):
    ep = f"ipc://{tmp_path}/scores.ipc"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    got: list[tuple[bytes, bytes]] = []

    def drain():  # up to 120 s for the first score (model loading, parity check), then 3 s of quiet
        sub.connect(ep)
        start, last = time.monotonic(), None
        while time.monotonic() - (last or start) < (3.0 if last else 120.0):
            if sub.poll(100):
                got.append(tuple(sub.recv_multipart()))
                last = time.monotonic()

    t = threading.Thread(target=drain)
    t.start()
    try:
        opts = ReplayOptions(publish=ep, progress=False, loop="native", record_scores=True, pin=None,
                             limit=20_000, wait_subscribers=1, sndhwm=0)  # fmt: skip
        s, payloads = _run_recording(opts)
        t.join(150)
    finally:
        sub.close(0)
        ctx.term()
    assert s["loop"] == "native" and s["dropped"] == 0
    assert len(got) == s["scores"] == len(payloads)
    assert [p for _, p in got] == payloads  # byte for byte, in order
    for topic, p in got:
        sc: Score = decode_score(p)
        assert topic == sc.instrument.encode()
    assert [decode_score(p).seq for _, p in got] == list(range(len(got)))


def test_a_stalled_subscriber_costs_counted_drops_in_the_native_loop(tmp_path):
    ep = f"ipc://{tmp_path}/stalled.ipc"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ep)  # never reads
    try:
        res = run_inprocess(ReplayOptions(publish=ep, progress=False, loop="native", pin=None, limit=30_000,
                                          wait_subscribers=1, sndhwm=10))  # fmt: skip
    finally:
        sub.close(0)
        ctx.term()
    s = res.summary
    assert s["loop"] == "native"
    assert 0 < s["dropped"] < s["scores"]
