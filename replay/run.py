"""In-process replay: drive the live scoring agent from a historical file and report.

The replay builds exactly what the service builds (feature state, model backend,
ZeroMQ publisher, :class:`engine.scorer.ScoringAgent`, :class:`engine.agent.AgentRunner`
with pinning, warm-up and GC freeze) and feeds it from a :class:`replay.source.ReplaySource`.
After the run it writes, under ``out_dir``:

* ``summary.json``: the run-summary contract (README, Run summary JSON; plus extra keys);
* ``latency.hgrm``: HdrHistogram percentile distribution, microseconds;
* ``latency.png``: percentile plot on a log ``1/(1-p)`` axis;
* ``latency_raw.npz``: raw ``t_in``/``t_out`` (and ``intended`` when paced) in ns.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.agent import AgentRunner, make_idle
from engine.builder import build_agent, load_scoring
from engine.config import SCORE_STREAM_ID, default_aeron_dir
from engine.log import ProgressLine
from engine.reload import ReloadAt, WatchModel
from engine.zmq_io import DEFAULT_PUBLISH_ENDPOINT, ZmqPublisher
from replay.generator import default_data_path
from replay.inputs import open_replay_data
from replay.latency import (
    ReplayResult,
    latency_stats,
    summarise,
    warmup_excluded,
    write_outputs,
    write_summary,
)
from replay.reader import explain_rejects
from replay.scores import SCORES_FILE, ScoreRecorder, write_scores

__all__ = ["ReplayOptions", "ReplayResult", "run_inprocess", "summarise"]


@dataclass
class ReplayOptions:
    """Options of an in-process replay (CLI flags map 1:1 onto these)."""

    data: str | None = None
    model: str | None = None
    speed: float | None = None
    pin: int | None = 1
    publish: str | None = DEFAULT_PUBLISH_ENDPOINT
    out: str | None = None
    backend: str = "auto"
    warmup_ticks: int = 1_000
    idle: str = "busy-spin"
    keep_warm_us: int = 100
    wait_subscribers: int = 0
    wait_timeout_s: float = 10.0
    sndhwm: int = 100_000
    #: how long closing the ZeroMQ publisher may go on delivering Scores a subscriber has not
    #: taken yet (a replay is finite and every Score should arrive; -1 = as long as it takes)
    linger_ms: int = 30_000
    progress: bool = True
    limit: int | None = None
    rt_priority: int | None = None
    reload_at: list[tuple[int, str]] = field(default_factory=list)
    watch_model: str | None = None
    # input (replay.inputs): event shape, vendor column mapping, ordering, chunking
    shape: str | None = None
    mapping: object | None = None
    sort_by_exchange_time: bool = False
    chunk_rows: int | None = None
    #: write DIR/scores.parquet (every published score) into ``out`` (replay.scores)
    record_scores: bool = False
    #: duty cycle: auto (native where the backend is fused), native, python (engine.scorer.LOOPS)
    loop: str = "auto"
    #: ticks per native duty cycle at most (a return to Python every 256 ticks, the default before,
    #: cost ~3% of an unpaced replay's throughput: ~2.6 µs per return)
    batch: int = 4096
    #: ``publish`` on an Aeron channel (``aeron:ipc``, ``aeron:udp?endpoint=...``): the driver
    #: directory (a running driver there is used, else one is embedded) and the stream id
    aeron_dir: str | None = None
    stream_id: int = SCORE_STREAM_ID


class _Progress:
    """The replay's progress line (called from housekeeping): ticks, rate, rejects, ETA."""

    def __init__(self, total: int, enabled: bool, period_s: float = 1.0) -> None:
        self.enabled = enabled
        self.line = ProgressLine("replay", "ticks", total, period_s)

    def __call__(self, agent, now_ns: int) -> None:
        if not self.enabled:
            return
        if self.line.t0 == 0:
            self.line.start(now_ns)
            return
        self.line.show(agent.source.position, now_ns, f"rejected {agent.rejected:,}  ", force=agent.done)

    def finish(self) -> None:
        if self.enabled:
            self.line.finish()


class _NullSink:
    """Sink used with ``--publish none``: measures the loop without a socket."""

    name = "none"
    native = "none"  # the native loop skips it
    drops = 0

    def publish(self, topic: bytes, payload) -> bool:
        return True

    def close(self) -> None:
        pass


def run_inprocess(opts: ReplayOptions) -> ReplayResult:
    """Replay ``opts.data`` through the scoring agent in this process and report."""
    data_path = opts.data or str(default_data_path())
    # shape, model, feature set (from the model's metadata) and kernels, source
    data = open_replay_data(opts, data_path)
    if not data.chunked and len(data.source.ticks) == 0:  # every row rejected by the reader
        rejected = dict(data.reader_rejected)
        if opts.out:  # the account of what was rejected; no model was loaded, no latency measured
            summary = summarise(
                ticks=data.ticks_total(), scores=0, dropped=0, rejected=sum(rejected.values()),
                rejected_by_reason=rejected, wall_s=0.0, stats=latency_stats(np.empty(0, np.int64)),
                mode="inprocess", backend=opts.backend, model_path=data.model_path, model_version="",
                quantization="", data_path=data_path, data_rows=data.rows, pinned=[],
                extra={"shape": data.shape, "feature_set": data.feature_set.id,
                       "anomalies": dict(data.reader_anomalies)},
            )  # fmt: skip
            write_summary(opts.out, summary)
        raise NoScoresError(_no_scores_message(data, rejected, data.rows))
    scoring = load_scoring(data.model_path, opts.backend, ticks=data.first_ticks,
                           crossing_add=getattr(data.mapping, "crossing_add", None))  # fmt: skip
    backend, model_path, choice = scoring.backend, scoring.model_path, scoring.choice

    # Create every helper thread (ZeroMQ I/O) before the hot thread is pinned,
    # and put it on another core than the hot one.
    io_cpu, others = None, []
    if opts.pin is not None:
        # (the runner restores this thread's affinity after a run, so a second run in the
        # same process still sees every core here)
        others = sorted(os.sched_getaffinity(0) - {opts.pin})
        io_cpu = others[0] if others else None
    aeron = None
    if opts.publish and opts.publish.startswith("aeron:"):
        # the embedded driver's and the C client's threads inherit this thread's cores: not the hot one
        before = os.sched_getaffinity(0)
        if io_cpu is not None:
            os.sched_setaffinity(0, set(others))
        try:
            sink, aeron = _aeron_sink(opts)
        finally:
            os.sched_setaffinity(0, before)
    elif opts.publish and opts.publish.lower() != "none":
        sink = ZmqPublisher(opts.publish, sndhwm=opts.sndhwm, io_cpu=io_cpu, linger_ms=opts.linger_ms)
    else:
        sink = _NullSink()
    sinks = [sink]
    zmq_close = None  # what closing the ZeroMQ publisher delivered (the summary's "zmq")
    interrupt = None
    recorder = None
    if opts.record_scores:
        recorder = ScoreRecorder()
        sinks.append(recorder)
    try:
        if opts.wait_subscribers and aeron is not None:  # Aeron tells connected, not how many
            deadline = time.monotonic() + opts.wait_timeout_s
            while not sink.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            if not sink.connected:
                print(f"tickscore: no Aeron subscriber on {opts.publish} stream {opts.stream_id} after "
                      f"{opts.wait_timeout_s:g}s; replaying anyway", file=sys.stderr)  # fmt: skip
        if opts.wait_subscribers and isinstance(sink, ZmqPublisher):
            got = sink.wait_for_subscribers(opts.wait_subscribers, opts.wait_timeout_s)
            if got < opts.wait_subscribers:
                print(
                    f"tickscore: only {got} of {opts.wait_subscribers} subscribers after "
                    f"{opts.wait_timeout_s:g}s; replaying anyway",
                    file=sys.stderr,
                )
        source = data.source
        progress = _Progress(data.total, opts.progress)
        agent = build_agent(scoring, source, sinks, data.symbols, recorder_capacity=data.recorder_capacity,
                            progress=progress, triggers=_reload_triggers(opts), loop=opts.loop,
                            batch=opts.batch)  # fmt: skip
        runner = AgentRunner(
            agent, make_idle(opts.idle), pin_core=opts.pin, rt_priority=opts.rt_priority,
            keep_warm_ns=opts.keep_warm_us * 1000,
        )
        if data.chunked:
            source.attach(agent)
        try:
            runner.run()
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: report what was scored until then
            interrupt = exc
        progress.finish()
    finally:
        if aeron is not None:
            sink.flush()  # linger: a subscriber reads what is still in the log
            aeron_counters = sink.counters()
        if isinstance(sink, ZmqPublisher):
            zmq_close = _close_zmq(sink)
        else:
            sink.close()
        if aeron is not None:
            aeron.close()
        data.finish()

    t_in, t_out = agent.recorder.snapshot(agent.seq)
    lat = t_out - t_in
    warm = warmup_excluded(opts.warmup_ticks, len(lat))
    corrected = corrected_stats = None
    if data.chunked:  # every tick is in the chunk histograms; raw arrays may be a window
        for h in (source.latency, source.latency_intended):
            if h is not None:
                h.rewarm(warm)  # a run shorter than twice the warm-up (Ctrl-C early) leaves out 10 %
        stats = source.latency.stats()
        if source.latency_intended is not None:
            corrected_stats = source.latency_intended.stats()
        wall_s = source.wall_s()
    else:
        stats = latency_stats(lat[warm:])
        if source.intended_ns is not None and agent.seq:
            accepted = np.ones(len(source.ticks), dtype=bool)
            accepted[source.rejected_idx] = False
            intended = source.intended_ns[accepted][: agent.seq]
            corrected = t_out - intended
            corrected_stats = latency_stats(corrected[warm:])
        wall_s = (int(t_out[-1]) - int(t_in[0])) / 1e9 if agent.seq else 0.0
    reader_rejected = sum(data.reader_rejected.values())
    ticks = data.ticks_total()
    if interrupt is not None and not data.chunked:  # the ticks taken before the stop (and every reject
        ticks = int(source.position) + reader_rejected  # of the reader, which read the whole file)
    summary = summarise(
        ticks=ticks,
        scores=agent.seq,
        dropped=int(getattr(sink, "drops", 0)),
        rejected=agent.rejected + reader_rejected,
        rejected_by_reason=_merge(data.reader_rejected, agent.rejected_by_reason()),
        wall_s=wall_s,
        stats=stats,
        mode="inprocess",
        backend=choice.kind,
        model_path=model_path,
        model_version=backend.version,
        quantization=backend.quantization,
        data_path=data_path,
        data_rows=data.rows,
        pinned=runner.pin.pinned if runner.pin else [],
        extra={
            "warmup_ticks_excluded": warm,
            "interrupted": interrupt is not None,
            "speed": "max" if opts.speed is None else opts.speed,
            "publish": opts.publish,
            **({"zmq": zmq_close} if zmq_close is not None else {}),
            **({"aeron": {"dir": aeron.dir, "stream_id": opts.stream_id, "embedded": aeron.embedded,
                          **aeron_counters}} if aeron is not None else {}),  # fmt: skip
            "idle": opts.idle,
            "loop": agent.loop,
            "loop_reason": agent.loop_reason,
            "batch": opts.batch,
            "native_errors": agent.native_errors,
            "keep_warm_us": opts.keep_warm_us,
            "keep_warm_calls": runner.warm_calls,
            "errors": runner.errors,
            "pin": runner.pin.message if runner.pin else "",
            "scheduler": runner.scheduler,
            "backend_selection": choice.as_dict(),
            "reloads": [t.as_dict() for t in agent.reloads],
            "backend_final": agent.backend.kind,
            "model_version_final": agent.backend.version,
            "latency_from_intended_ns": corrected_stats.as_contract() if corrected_stats else None,
            "out_of_range": stats.out_of_range,
            **_input_summary(data, agent),
        },
    )
    result = ReplayResult(summary, lat, stats, corrected, corrected_stats, interrupt=interrupt)
    if agent.seq == 0 and interrupt is not None:
        raise interrupt  # nothing scored yet: nothing to report
    if agent.seq == 0:
        if opts.out:  # the account of what was rejected, without an empty latency report
            write_summary(opts.out, summary)
        raise NoScoresError(_no_scores_message(data, summary["rejected_by_reason"], summary["ticks"]))
    if summary["rejected"] > 0.5 * summary["ticks"] and interrupt is None:
        _warn_rejects(data, summary["rejected_by_reason"], summary["ticks"])
    if opts.out:
        raw = {"t_in": t_in, "t_out": t_out, "warmup": np.int64(warm)}
        if corrected is not None:
            raw["intended"] = t_out - corrected
        raw.update(agent.recorder.stage_snapshot(agent.seq))
        result.out_files = write_outputs(result, opts.out, raw)
        if recorder is not None:
            write_scores(Path(opts.out) / SCORES_FILE, recorder.payloads)
            result.out_files["scores"] = str(Path(opts.out) / SCORES_FILE)
        if data.chunked:  # the .hgrm of every tick, not only of the raw window
            source.latency.write_hgrm(Path(opts.out) / "latency.hgrm")
    return result


def _close_zmq(sink: ZmqPublisher) -> dict:
    """Close the replay's ZeroMQ publisher, saying so when it waits for or loses queued Scores."""

    def say(text: str) -> None:
        print(f"tickscore: {text}", file=sys.stderr, flush=True)

    sink.close(notice=say)
    if sink.drained is False:
        say(f"WARNING: a subscriber had not taken every Score when the {sink.linger_ms:,} ms linger ran out; "
            "libzmq discarded the rest (it does not say how many). Raise --linger-ms, or give the "
            "subscriber more CPU")  # fmt: skip
    return {"sent": int(sink.sent), "drops": int(sink.drops), "linger_ms": int(sink.linger_ms),
            "close_s": round(sink.close_s, 3), "drained": sink.drained}  # fmt: skip


def default_replay_aeron_dir() -> str:
    """Where a replay publishing on Aeron embeds its driver: /dev/shm/tickscore-replay-aeron-USER.

    Apart from the service's, so a replay and a service on one host do not share a driver
    unless ``--aeron-dir`` says so.
    """
    return default_aeron_dir().replace("tickscore-aeron-", "tickscore-replay-aeron-")


class _AeronDriver:
    """The driver a replay publishes through: embedded in this process, or the one running in ``dir``."""

    def __init__(self, dir: str) -> None:
        from engine.aeron_io import AeronRuntime, driver_active  # deferred: the Aeron C client

        self.dir = dir
        self.embedded = not driver_active(dir)
        self.runtime = AeronRuntime(dir, embedded=True) if self.embedded else None

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()


def _aeron_sink(opts: ReplayOptions):
    """Return ``(sink, driver)``: a publication on ``opts.publish`` the native loop offers to."""
    from engine.native_aeron import NativeAeronPublisher  # deferred: the Aeron C client

    drv = _AeronDriver(opts.aeron_dir or default_replay_aeron_dir())
    try:
        return NativeAeronPublisher(drv.dir, opts.publish, opts.stream_id), drv
    except BaseException:
        drv.close()
        raise


class NoScoresError(ValueError):
    """The run scored nothing: every row was rejected (the message says why)."""


def _reasons_text(rejected: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))


def _no_scores_message(data, rejected: dict[str, int], rows: int) -> str:
    why = explain_rejects(data.path, data.mapping, data.shape, rejected)
    head = f"all {rows:,} rows of {data.path} were rejected ({_reasons_text(rejected) or 'no rows'})"
    return head + "".join(f"\n  {w}" for w in why)


def _warn_rejects(data, rejected: dict[str, int], ticks: int) -> None:
    n = sum(rejected.values())
    print(f"tickscore: warning: {n:,} of {ticks:,} rows rejected ({100.0 * n / ticks:.0f} %: "
          f"{_reasons_text(rejected)})", file=sys.stderr)  # fmt: skip
    for w in explain_rejects(data.path, data.mapping, data.shape, rejected):
        print(f"  {w}", file=sys.stderr)


def _input_summary(data, agent) -> dict:
    """Return the summary keys describing the input: shape, feature set, anomalies, chunks."""
    anomalies = _merge(data.reader_anomalies, data.kernels.anomalies(agent.istate))
    unavailable = list(data.unavailable)
    if agent.seq and data.kernels.trades_seen(agent.istate) == 0:
        # a file without trades (an L3 file of creates / deletes / changes only, quotes only)
        fs = data.feature_set
        no_trade = [n for n, need in fs.requires.items() if need == "trades" and n not in unavailable]
        if no_trade:
            unavailable += no_trade
            print(
                f"tickscore: warning: no trade in {data.path}: {len(no_trade)} trade feature(s) of "
                f"{fs.id} ({', '.join(no_trade)}) are placeholders and every score carries flag "
                "no_trades; to bring the venue's trades in, see the README (Bringing your own data: "
                "separate trade files)",
                file=sys.stderr,
            )
    out = {
        "shape": data.shape,
        "feature_set": data.feature_set.id,
        "anomalies": anomalies,
        "unavailable_features": unavailable,
        "chunked": data.chunked,
    }
    if data.mapping is not None:
        out["mapping"] = data.mapping.describe()
        out["mapping_keys"] = data.mapping.keys
    if data.chunked:
        src = data.source
        out["chunks"] = {"chunk_rows": data.chunks.chunk_rows, "served": src.chunks_served,
                         "raw_latency_window": int(min(agent.seq, agent.recorder.capacity))}  # fmt: skip
    return out


def _reload_triggers(opts: ReplayOptions) -> list:
    """Return the housekeeping triggers for ``--reload-at`` / ``--watch-model``."""
    triggers: list = [ReloadAt(seq, path) for seq, path in opts.reload_at]
    if opts.watch_model:
        triggers.append(WatchModel(opts.watch_model))
    return triggers


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out
