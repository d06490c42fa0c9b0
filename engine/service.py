"""The live service: ``tickscore serve --config FILE``.

Builds, from one :class:`engine.config.ServiceConfig`, exactly what the replay
builds (model backend, :class:`engine.scorer.ScoringAgent`, :class:`engine.agent.AgentRunner`
with pinning, warm-up and GC freeze) but fed by network sources
(:mod:`engine.sources`) and publishing to network sinks (ZeroMQ
:class:`engine.zmq_io.ZmqPublisher`, Aeron :class:`engine.aeron_io.AeronPublisher`,
either or both).  Live and replay run the same agent code.

Threads and cores: every helper thread (ZeroMQ I/O threads, the embedded Aeron
media driver, the Aeron client conductor) is created *before* the hot thread is
pinned and is moved to the helper cores (default: every allowed core except the
hot one); the hot loop runs on the main thread, pinned to ``engine.pin``
(default core 1), so signal handlers keep working.

Lifecycle:

1. start-up: config already validated; check every endpoint to bind (a live
   ipc path or a taken port stops it before anything is bound); load the
   model, start the CURVE authenticator (``[security]``), the metrics server
   (``[metrics]``) and the Aeron driver (embedded by default), bind/connect
   sockets; any error stops here with a clear message (exit 2);
2. warm-up (JIT, model), ``gc.freeze``; then ``ready`` on stderr and the control
   socket answers;
3. loop: one tick per duty cycle; housekeeping (every ``housekeeping_every`` idle
   or busy cycles, at most every millisecond) answers control requests (each
   one an audit line); every ~100 ms it folds the counters into the metrics
   snapshot, moves the event-time bound and stops cleanly if the Aeron driver
   is gone;
4. graceful stop (``stop`` request, SIGTERM or SIGINT): stop the loop, keep scoring
   what already arrived until no tick came for ``drain_quiet_ms`` (at most
   ``drain_timeout_ms``), close the sources, flush the sinks, print the final
   report on stderr, write ``summary.json`` (+ hgrm, plot, raw) if ``output.dir``
   is set, answer a pending ``stop`` with the report, exit 0.  Every tick the
   service accepted has been scored and published by then (the signal handler
   only sets a flag, so a tick in flight is finished).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from engine.agent import AgentRunner, make_idle
from engine.builder import build_agent, load_scoring
from engine.config import ServiceConfig, check_output_dir
from engine.control import DEFER, ControlServer
from engine.log import configure as configure_log
from engine.log import log
from engine.log import set_context as set_log_context
from engine.metrics import MetricsServer, MetricsSnapshot
from engine.native_aeron import AeronCClient, NativeAeronPublisher
from engine.native_ingress import NativeAeronTickSource, NativeMultiSource, NativeZmqTickSource
from engine.security import CurveServer
from engine.sources import AeronTickSource, MultiSource, TickSlot, ZmqTickSource
from engine.zmq_io import ZmqPublisher, ensure_ipc_free
from features.kernels import I_LAST_TS
from models.loader import default_model_path
from replay.latency import (
    LatencyHistogram,
    ReplayResult,
    format_table,
    latency_stats,
    summarise,
    write_outputs,
)

__all__ = [
    "Service",
    "run_service",
    "pin_helper_threads",
    "AERON_LOST",
    "AERON_TRUNCATED",
]

_HK_BY_IDLE = {"busy-spin": 1024, "yield": 1024, "backoff": 64, "sleep": 16}
_CONTROL_PERIOD_NS = 1_000_000
_SLOW_PERIOD_NS = 100_000_000


def _env_int(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


def _log(msg: str, event: str = "", level: int = logging.INFO, **fields) -> None:
    log("serve", msg, event=event, level=level, **fields)


def _check_free(what: str, endpoint: str) -> None:
    """Raise OSError if ``endpoint`` (to be bound) is served by a live process or its port is taken.

    Run for every endpoint before any is bound: a second service must fail before it
    takes anything over (libzmq binds an ipc path by unlinking the live one's socket).
    """
    try:
        ensure_ipc_free(endpoint)
    except OSError as exc:
        raise OSError(f"{what}: {exc}") from None
    if endpoint.startswith("tcp://"):
        _check_port(what, endpoint[len("tcp://"):])


def _check_port(what: str, host_port: str) -> None:
    """Raise OSError if ``HOST:PORT`` cannot be bound now (a wildcard host or port 0 is not checked)."""
    host, _, port = host_port.rpartition(":")
    if not port.isdigit() or host in ("*", "") or int(port) == 0:
        return
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(fam, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq: TIME_WAIT is no conflict
    try:
        probe.bind((host, int(port)))
    except OSError as exc:
        raise OSError(f"{what} {host_port}: {exc.strerror or exc} (another tickscore serve running?); "
                      "nothing was bound") from None
    finally:
        probe.close()


def pin_helper_threads(cpus: set[int]) -> list[str]:
    """Move every thread of this process except the main one to ``cpus``; return what was done.

    Used for threads created by C libraries (Aeron driver and client conductor,
    ZeroMQ I/O), which Python cannot name.  Refusals are reported, never raised.
    """
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return []
    main = threading.main_thread().native_id
    done = []
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return []
    for tid in tids:
        if tid == main:
            continue
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        try:
            os.sched_setaffinity(tid, cpus)
            done.append(f"{name}[{tid}]->{sorted(cpus)}")
        except OSError as exc:
            done.append(f"{name}[{tid}] not moved: {exc}")
    return done


class Service:
    """One running ``tickscore serve``: build with :meth:`build`, then :meth:`run`.

    Parameters
    ----------
    cfg : ServiceConfig
    config_path : str, optional
        Shown in reports.
    """

    def __init__(self, cfg: ServiceConfig, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.state = "starting"
        self.stop_requested = False
        self.stop_reason = ""
        self.hurry = False
        self.runner = None
        self.agent = None
        self.source = None
        self.sources: list = []
        self._sources_closed = False
        self.sinks: list = []
        self.zmq_sink = None
        self.aeron_sink = None
        self.control = None
        self.aeron = None
        #: the native loop's Aeron C client (engine.native_aeron), when it publishes over Aeron
        self.aeron_c = None
        #: the native Aeron ingress's own C client: without pre-touch (see below)
        self.aeron_c_in = None
        self.ctx = None
        self.hist = LatencyHistogram()  # every tick so far, for status (bounded memory)
        self.folded = 0
        self.t_start_ns = time.perf_counter_ns()
        #: restarts of this shard before this run (set by ``serve --shards``' supervisor)
        self.restarts = _env_int("TICKSCORE_RESTARTS")
        self.t_ready_ns = 0
        self.t_stop_ns = 0
        self.drained = 0
        self.drain_s = 0.0
        self.helper_cpus: set[int] = set()
        self.helper_threads: list[str] = []
        self._next_ctrl = 0
        self._next_slow = 0
        self._fold_threshold = 1 << 19
        self.final: dict | None = None
        self.curve: CurveServer | None = None
        self.metrics: MetricsServer | None = None
        self.reload_dirs: list[str] = []
        self.control_results: dict[str, int] = {"ok": 0, "refused": 0, "error": 0, "bad_request": 0}
        self._reloads_logged = 0
        self._ipc_bound: list[tuple[str, int]] = []
        self.unscored_at_stop: dict[str, int] = {}
        self.slot = None
        #: a SIGBUS from the Aeron C client/driver (their files truncated): never close them
        self.aeron_fault = False

    # ------------------------------------------------------------------ start-up
    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop (safe from a signal handler); a second request hurries the drain."""
        if self.stop_requested:
            self.hurry = True
            return
        self.stop_requested = True
        self.stop_reason = reason
        if self.runner is not None:
            self.runner.stop()

    def _cores(self) -> tuple[int | None, set[int]]:
        hot = self.cfg.pin_core
        try:
            allowed = set(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return hot, set()
        if self.cfg.engine.helper_cpus:
            helpers = set(self.cfg.engine.helper_cpus) & allowed
        else:
            helpers = allowed - {hot} if hot is not None else set()
        return hot, helpers or set()

    def build(self) -> None:
        """Create backend, driver, sockets, agent and runner; raise (cleaned up) on any error."""
        try:
            self._build()
        except BaseException:
            self._close_resources()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        check_output_dir(cfg.output.dir)  # before anything starts: a stop must be able to write
        self._check_endpoints()  # every endpoint before any is bound: a second start takes nothing over
        hot, helpers = self._cores()
        self.helper_cpus = helpers
        io_cpu = min(helpers) if helpers else None

        # the model names its feature set, the feature set its kernels (L1, trades, L3 book)
        self.scoring = load_scoring(
            cfg.model.path or default_model_path(), cfg.model.backend,
            crossing_add=cfg.book.crossing_add or None, logger=lambda m: _log(f"backend: {m}"),
        )  # fmt: skip
        self.backend, self.model_path = self.scoring.backend, self.scoring.model_path
        self.backend_kind = self.scoring.choice.kind
        self.feature_set = self.scoring.feature_set
        self.reload_dirs = [os.path.realpath(os.path.expanduser(d)) for d in cfg.model.reload_dirs] or [
            os.path.dirname(os.path.realpath(self.model_path))]
        sec = cfg.security
        if sec.curve:
            self.curve = CurveServer(sec.secret_key, sec.authorized_keys, log=self._on_refused)
        if cfg.metrics.endpoint:
            self.metrics = MetricsServer(cfg.metrics.endpoint, lambda: self.state)

        # Helper threads first (they must exist before the hot thread is pinned).
        self.ctx = zmq.Context(io_threads=1)
        if io_cpu is not None:
            for c in sorted(helpers):
                try:
                    self.ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, c)
                except (zmq.ZMQError, AttributeError):
                    pass
        if cfg.uses_aeron:
            # deferred: loads the Aeron C client, only where Aeron is used
            from engine.aeron_io import AeronRuntime

            self.aeron = AeronRuntime(
                cfg.aeron_dir,
                embedded=cfg.aeron.embedded,
                threading=cfg.aeron.threading,
                driver_timeout_ms=cfg.aeron.driver_timeout_ms,
            )

        src_cfg, snk_cfg = cfg.effective_sources, cfg.effective_sinks
        # every instrument slot's state is allocated now; a symbol seen first on the wire
        # takes a free slot (max_instruments) and its name is set here, off the per-tick path
        # a shard of a cluster holds the instruments it owns; other shards' ticks are skipped
        cl = cfg.cluster
        owned = cfg.owned_instruments
        owns = None
        if cl.shards > 1:
            part, me = cl.partition, cl.shard
            owns = lambda sym: part.shard_of(sym) == me  # noqa: E731 - first sight of a symbol only
            _log(f"shard {me} of {cl.shards}: owns {len(owned)} of the {len(cfg.instruments)} listed "
                 f"instruments ({', '.join(owned[:8])}{' ...' if len(owned) > 8 else ''})", event="shard")
        n_slots = cfg.instrument_slots
        symbols = owned + [""] * (n_slots - len(owned))
        slot = TickSlot(owned, capacity=n_slots if cfg.max_instruments else None,
                        on_new=self._on_new_instrument,
                        max_ahead_ns=cfg.engine.max_event_ahead_s * 1_000_000_000, owns=owns)  # fmt: skip
        self.slot = slot
        native = cfg.engine.loop != "python" and self.backend.kind == "fused"
        native_aeron_in = native and cfg.engine.native_aeron_ingress and src_cfg.aeron is not None
        # ZeroMQ ticks received and decoded in compiled code: the only source (a python loop polls
        # it one tick at a time), or beside an Aeron source received in compiled code too
        native_zmq_in = cfg.engine.loop != "python" and (src_cfg.aeron is None or native_aeron_in)
        if src_cfg.zmq is not None:
            z = src_cfg.zmq
            zsrc = NativeZmqTickSource if native_zmq_in else ZmqTickSource
            extra = {"rows": cfg.engine.batch} if native_zmq_in else {}
            self.sources.append(
                zsrc(self.ctx, z.endpoint, bind=z.bind, subscribe=cfg.tick_topics, rcvhwm=z.rcvhwm, slot=slot,
                     configure=self._secure("ticks"), **extra)
            )
            self._remember_ipc(z.endpoint, z.bind)
        # the native loop's Aeron client (pyaeron exposes no handle of its own publications and
        # subscriptions): a C client of the same library on this driver, for compiled code
        if native and snk_cfg.aeron is not None:
            self.aeron_c = AeronCClient(cfg.aeron_dir, driver_timeout_ms=cfg.aeron.driver_timeout_ms,
                                        pre_touch=cfg.aeron.pre_touch)  # fmt: skip
        if src_cfg.aeron is not None:
            a = src_cfg.aeron
            if native_aeron_in:  # polled in compiled code
                # Its own client, without pre-touch: a client that pre-touches maps *every* log it
                # uses page by page, a subscription's images too (Aeron's conductor, on an image
                # becoming available): 192 MiB per ipc publisher joining, ~0.7 s here during
                # which that publisher's ticks wait unread in the log.
                self.aeron_c_in = AeronCClient(cfg.aeron_dir, driver_timeout_ms=cfg.aeron.driver_timeout_ms,
                                               pre_touch=False)  # fmt: skip
                self.sources.append(NativeAeronTickSource(self.aeron_c_in, a.channel, a.stream_id, slot=slot,
                                                          rows=cfg.engine.batch,
                                                          touch_ahead=cfg.aeron.pre_touch))  # fmt: skip
            else:
                self.sources.append(AeronTickSource(self.aeron.client, a.channel, a.stream_id, slot=slot))
        if len(self.sources) == 1:
            self.source = self.sources[0]
        elif all(isinstance(s, (NativeZmqTickSource, NativeAeronTickSource)) for s in self.sources):
            self.source = NativeMultiSource(self.sources)  # both in one compiled call per duty cycle
        else:
            self.source = MultiSource(self.sources)

        if snk_cfg.zmq is not None:
            z = snk_cfg.zmq
            self.zmq_sink = ZmqPublisher(
                z.endpoint, sndhwm=z.sndhwm, io_cpu=io_cpu, connect=not z.bind, linger_ms=z.linger_ms,
                drop_policy=z.drop_policy, configure=self._secure("scores"),
            )
            self.sinks.append(self.zmq_sink)
            self._remember_ipc(z.endpoint, z.bind)
        if snk_cfg.aeron is not None:
            a = snk_cfg.aeron
            retries = {"back_pressure_retries": a.back_pressure_retries, "linger_ms": a.linger_ms,
                       "not_connected_retries": a.not_connected_retries}  # fmt: skip
            if self.aeron_c is not None:  # the native loop offers from compiled code
                self.aeron_sink = NativeAeronPublisher(self.aeron_c, a.channel, a.stream_id, **retries)
            else:
                # deferred: loads the Aeron C client, only where Aeron is used
                from engine.aeron_io import AeronPublisher

                self.aeron_sink = AeronPublisher(self.aeron.client, a.channel, a.stream_id, **retries)
            self.sinks.append(self.aeron_sink)

        if cfg.control.endpoint:
            self.control = ControlServer(self.ctx, cfg.control.endpoint, self._on_control,
                                         configure=self._secure("control"), audit=self._audit)
            self._remember_ipc(cfg.control.endpoint, True)

        self.agent = build_agent(self.scoring, self.source, self.sinks, symbols,
                                 recorder_capacity=cfg.engine.recorder_capacity,
                                 progress=self._housekeeping,
                                 max_model_call_us=cfg.model.max_call_us, loop=cfg.engine.loop,
                                 batch=cfg.engine.batch, shard=cl.shard)  # fmt: skip
        self.source.bind_counters(self.agent.counters)
        self._fold_threshold = max(1, self.agent.recorder.capacity // 2)
        self.hist.compile()  # the fold runs in housekeeping on the hot thread: compile it now
        if self.metrics is not None:
            self.metrics.hist = self.hist
            self._update_metrics()

        self.helper_threads = pin_helper_threads(helpers)
        hk = cfg.engine.housekeeping_every or _HK_BY_IDLE[cfg.engine.idle]
        self.runner = AgentRunner(
            self.agent,
            make_idle(cfg.engine.idle),
            pin_core=hot,
            freeze_gc=cfg.engine.freeze_gc,
            housekeeping_every=hk,
            keep_warm_ns=cfg.engine.keep_warm_us * 1000,
        )
        if self.stop_requested:
            self.runner.stop()

    def _on_new_instrument(self, inst: int, symbol: str) -> None:
        """A symbol seen first on the wire took slot ``inst``: name it for the scores."""
        self.agent.name_instrument(inst, symbol)

    def _check_endpoints(self) -> None:
        """Raise before anything is bound if an endpoint to bind is taken (see :func:`_check_free`)."""
        cfg = self.cfg
        src, snk = cfg.effective_sources, cfg.effective_sinks
        if src.zmq is not None and src.zmq.bind:
            _check_free("sources.zmq.endpoint", src.zmq.endpoint)
        if snk.zmq is not None and snk.zmq.bind:
            _check_free("sinks.zmq.endpoint", snk.zmq.endpoint)
        if cfg.control.endpoint:
            _check_free("control.endpoint", cfg.control.endpoint)
        if cfg.metrics.endpoint:
            _check_port("metrics.endpoint", cfg.metrics.endpoint)

    def _remember_ipc(self, endpoint: str, bound: bool) -> None:
        """Note an ipc socket file this service bound, to remove it at exit (libzmq leaves it)."""
        if bound and endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
            path = endpoint[len("ipc://"):]
            try:
                self._ipc_bound.append((path, os.stat(path).st_ino))
            except OSError:
                pass

    def _remove_ipc_files(self) -> None:
        for path, ino in self._ipc_bound:
            try:
                if os.stat(path).st_ino == ino:  # still ours (nobody re-bound it meanwhile)
                    os.unlink(path)
            except OSError:
                pass
        self._ipc_bound = []

    def _secure(self, domain: str):
        """Return the socket hook making a socket a CURVE server of ``domain`` (None: no CURVE)."""
        curve = self.curve
        if curve is None:
            return None
        return lambda sock: curve.apply(sock, domain)

    def _on_refused(self, event: str, fields: dict) -> None:
        _log(f"refused a client on the {fields.get('socket', '?')} socket: {fields.get('reason', '')}",
             event="refused", level=logging.WARNING, audit=True, **fields)

    def _audit(self, who: str, cmd: str, arg, reply) -> None:
        """One audit line per control request: who, what, result."""
        if reply is None:
            result, detail = "accepted", "stopping"
        elif cmd == "bad_request":
            result, detail = "bad_request", reply.get("error", "")
        elif reply.get("ok"):
            result, detail = "ok", reply.get("status", "")
        else:
            result = "refused" if reply.get("refused") else "error"
            detail = reply.get("error") or reply.get("message", "")
        self.control_results[result] = self.control_results.get(result, 0) + 1
        if cmd == "status" and result == "ok":
            return  # polled often; counted, not logged
        fields = {"who": who, "command": cmd, "result": result}
        if arg is not None:
            fields["path"] = arg
        if reply is not None and reply.get("sha256"):
            fields["sha256"] = reply["sha256"]
        _log(f"control {cmd} from {who}: {result}" + (f" ({detail})" if detail else ""), event="control",
             level=logging.INFO if result in ("ok", "accepted") else logging.WARNING, audit=True, **fields)

    def _log_reload_results(self) -> None:
        """Log each reload once it is swapped or rejected (its request was logged when it came)."""
        agent = self.agent
        done = list(agent.reloads)
        while self._reloads_logged < len(done) and done[self._reloads_logged].status != "pending":
            t = done[self._reloads_logged]
            self._reloads_logged += 1
            _log(f"reload {t.status}: {t.message}", event="reload", audit=True, path=t.path,
                 result=t.status, version=t.version or "", sha256=t.sha256,
                 swap_seq=t.swap_seq if t.swap_seq is not None else "")

    def _update_metrics(self) -> None:
        """Housekeeping: fold the counters into a new metrics snapshot (a few µs, no per-tick work)."""
        agent = self.agent
        c = agent.counters
        sinks = self._sink_counters()
        reloads: dict[str, int] = {"swapped": 0, "rejected": 0}
        for t in agent.reloads:
            if t.status != "pending":
                reloads[t.status] = reloads.get(t.status, 0) + 1
        self.metrics.snapshot = MetricsSnapshot(
            ticks=int(c.sum()), scores=int(agent.seq), errors=self.runner.errors if self.runner else 0,
            rejected=agent.rejected_by_reason(all_reasons=True),
            dropped={k: int(v.get("drops", 0)) for k, v in sinks.items()},
            back_pressure={k: int(v.get("back_pressured", 0)) for k, v in sinks.items()},
            not_connected={k: int(v.get("unsent_no_subscriber", 0)) for k, v in sinks.items()},
            reloads=reloads,
            refused=dict(self.curve.refused) if self.curve is not None else {},
            control=dict(self.control_results),
            model={"version": agent.model_version, "feature_set": self.feature_set.id,
                   "backend": agent.backend.kind},
            cluster=self._cluster_state(),
            t_mono=time.monotonic(),
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Run until a graceful stop; return the final report (summary dict)."""
        self.state = "warming up"
        try:
            if not self.stop_requested:
                self.runner.run()
        except BaseException:
            self._close_resources()
            raise
        self.t_stop_ns = time.perf_counter_ns()
        self.state = "draining"
        try:
            self._drain()
        finally:
            self._stop_sources()
            for s in self.sinks:
                flush = getattr(s, "flush", None)
                if flush is not None:
                    flush()
            self.state = "stopped"
            self.final = self._final_report()
            if self.control is not None:
                self.control.reply_deferred({"ok": True, "command": "stop", "report": self.final})
            self._close_resources()
        return self.final

    def _housekeeping(self, agent, now_ns: int) -> None:
        """Off the per-tick path: control requests, stats folding, subscriber counts."""
        if self.stop_requested:
            self.runner.stop()
            return
        if not self.t_ready_ns:
            self.t_ready_ns = now_ns
            self.state = "running"
            self._log_ready()
        if now_ns < self._next_ctrl:
            return
        self._next_ctrl = now_ns + _CONTROL_PERIOD_NS
        if self.control is not None:
            self.control.poll()
        if agent.seq - self.folded >= self._fold_threshold:
            self._fold()
        if now_ns >= self._next_slow:
            self._next_slow = now_ns + _SLOW_PERIOD_NS
            if self.zmq_sink is not None:
                self.zmq_sink.poll_subscriptions()
            self.slot.advance_clock()
            if self.aeron is not None and self.aeron.lost and not self.stop_requested:
                _log(f"the Aeron media driver is gone ({self.aeron.lost}): stopping", event="aeron_lost",
                     level=logging.ERROR)
                self.request_stop(AERON_LOST)
            if self._reloads_logged < len(agent.reloads):
                self._log_reload_results()
            if self.metrics is not None:
                self._fold()
                self._update_metrics()

    def _drain(self) -> None:
        """Score what already arrived: until quiet for drain_quiet_ms or drain_timeout_ms passed."""
        agent = self.agent
        if agent is None:
            return
        clock = time.perf_counter_ns
        t0 = last = clock()
        deadline = t0 + self.cfg.engine.drain_timeout_ms * 1_000_000
        quiet = self.cfg.engine.drain_quiet_ms * 1_000_000
        n = 0
        invoke = self.runner.invoker.invoke  # counts and reports errors as the runner does
        why = "arrived_after_drain"  # the drain ended quiet: only late arrivals can be left
        while True:
            try:
                worked = invoke()
            except RuntimeError as exc:  # the error budget ran out: stop draining, still report
                _log(f"drain stopped: {exc}", event="drain", level=logging.ERROR)
                why = "error_budget"
                break
            now = clock()
            if worked:
                n += worked  # ticks: a native duty cycle scores a batch
                last = now
            elif now - last >= quiet and now < deadline and not self.hurry:
                break
            if self.hurry:
                why = "second_signal"
                break
            if now >= deadline:
                why = "drain_timeout"
                break
        self.drained = n
        self.drain_s = (clock() - t0) / 1e9
        # Received but not scored: count it by reason rather than let it vanish at close.
        pending = getattr(self.source, "discard_pending", None)
        left = int(pending()) if pending is not None else 0
        if left:
            self.unscored_at_stop[why] = self.unscored_at_stop.get(why, 0) + left
            _log(f"{left:,} ticks received but not scored at stop ({why})", event="unscored",
                 level=logging.WARNING, reason=why, ticks=left)

    def _stop_sources(self) -> None:
        if self._sources_closed:
            return
        self._sources_closed = True
        for s in self.sources:
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass

    def _close_resources(self) -> None:
        self._stop_sources()
        if self.curve is not None:
            self.curve.close()  # monitors and authenticators first: the sinks' close ends their contexts
        if self.control is not None:
            self.control.close()
            self.control = None
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001
                _log(f"closing sink {getattr(s, 'name', s)}: {exc}", event="error", level=logging.ERROR)
            if getattr(s, "drained", None) is False:  # a ZeroMQ sink's linger ran out
                _log(f"a subscriber had not taken every Score when the {s.linger_ms:,} ms linger of "
                     f"{s.endpoint} ran out; libzmq discarded the rest (sinks.zmq linger_ms)",
                     event="undelivered", level=logging.WARNING, endpoint=s.endpoint)  # fmt: skip
        self.sinks = []
        for c in (self.aeron_c, self.aeron_c_in):
            if c is not None and not self.aeron_fault:
                c.close()
        self.aeron_c = self.aeron_c_in = None
        if self.aeron is not None:
            if self.aeron_fault:  # its threads fault on the truncated files: closing would hang
                _log("the Aeron driver's files were truncated (SIGBUS): its client is left unclosed; "
                     "the process exits without cleanup", event="aeron_lost", level=logging.ERROR)
            else:
                self.aeron.close()
            self.aeron = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        self._remove_ipc_files()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # ------------------------------------------------------------------ control
    def _on_control(self, cmd: str, arg: str | None):
        if cmd == "status":
            return self.status()
        if cmd == "stop":
            self.request_stop("control stop")
            return DEFER
        if cmd == "reload":
            return self._reload(arg or "")
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _reload(self, path: str) -> dict:
        agent = self.agent
        path = os.path.abspath(os.path.expanduser(path))
        real = os.path.realpath(path)  # symlinks and ".." resolved: what would really be read
        if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in self.reload_dirs):
            return {"ok": False, "command": "reload", "refused": True, "status": "rejected", "path": path,
                    "error": f"reload refused: {path} is not inside the model directories "
                             f"({', '.join(self.reload_dirs)}; [model] reload_dirs); the old model keeps "
                             "serving"}  # fmt: skip
        ticket = agent.request_reload(real)
        # The agent loads on a new thread, which inherited the hot core: move it off.
        pin_helper_threads(self.helper_cpus)
        info = ticket.as_dict()
        return {"ok": info.get("status") != "rejected", "command": "reload", **info}

    def _fold(self) -> None:
        agent = self.agent
        seq = agent.seq
        start = max(self.folded, seq - agent.recorder.capacity)
        if seq > start:
            rec = agent.recorder
            self.hist.add_ring(rec.t_in, rec.t_out, rec.mask, start, seq)
        self.folded = seq

    def _sink_counters(self) -> dict:
        out = {}
        if self.zmq_sink is not None:
            z = self.zmq_sink
            out["zmq"] = {"endpoint": z.endpoint, "sent": z.sent, "drops": z.drops,
                          "send_errors": z.send_errors, "drop_policy": z.drop_policy,
                          "subscribers": z.subscriptions}
        if self.aeron_sink is not None:
            a = self.aeron_sink
            out["aeron"] = {"channel": a.channel, "stream_id": a.stream_id, **a.counters()}
        return out

    def status(self) -> dict:
        """Return the ``status`` reply: counters and latency so far (folds new latencies first)."""
        agent = self.agent
        self._fold()
        c = agent.counters
        sinks = self._sink_counters()
        now = time.perf_counter_ns()
        srcs = self.sources or []
        touch = next((s.touch_ahead for s in srcs if isinstance(s, NativeAeronTickSource)), None)
        rec = {
            "ok": True,
            "command": "status",
            "state": self.state,
            "pid": os.getpid(),
            "uptime_s": (now - self.t_start_ns) / 1e9,
            "ticks_in": int(c.sum()),
            "scores_out": int(agent.seq),
            "loop": agent.loop,
            #: the tick sources (NativeZmqTickSource / NativeAeronTickSource: received in compiled code)
            "ingress": [type(s).__name__ for s in srcs],
            "rejected": int(c[1:].sum()),
            "rejected_by_reason": agent.rejected_by_reason(),
            "messages_received": int(sum(getattr(s, "received", 0) for s in srcs)),
            "drops": int(sum(s.get("drops", 0) for s in sinks.values())),
            "back_pressure": int(sinks.get("aeron", {}).get("back_pressured", 0)),
            "not_connected": int(sinks.get("aeron", {}).get("not_connected", 0)),
            "unsent_no_subscriber": int(sinks.get("aeron", {}).get("unsent_no_subscriber", 0)),
            "sinks": sinks,
            "model": {
                "version": agent.model_version,
                "path": str(agent.backend.path),
                "backend": agent.backend.kind,
                "quantization": agent.backend.quantization,
            },
            "latency_ns": {"count": self.hist.count, **self.hist.stats().as_contract()},
            "last_event_ns": self._last_event_ns(),
            "errors": self.runner.errors if self.runner else 0,
            "aeron": None if self.aeron is None else {
                "dir": self.aeron.dir, "embedded": self.aeron.embedded, "errors": self.aeron.errors,
                **({"touch_ahead": touch} if touch is not None else {}),
            },
            "pin": self.runner.pin.message if self.runner and self.runner.pin else "",
            "security": self._security_state(),
            "control": dict(self.control_results),
            "metrics": self.metrics.endpoint if self.metrics is not None else "",
            "cluster": self._cluster_state(),
            **self._input_state(),
        }
        if agent.reloads:
            rec["reloads"] = [t.as_dict() for t in list(agent.reloads)[-8:]]
        return rec

    def _cluster_state(self) -> dict:
        """Return this process's place in its cluster: shard, epoch (the agent's: in every Score,
        new after a restart), restarts, skipped ticks."""
        cl = self.cfg.cluster
        skipped = self.slot.skipped if self.slot is not None else 0
        skipped += sum(s.native_skipped for s in self.sources if hasattr(s, "native_skipped"))
        return {"shard": cl.shard, "shards": cl.shards, "epoch": self.agent.epoch, "restarts": self.restarts,
                "partition": "explicit+hash" if cl.partitions else "hash", "skipped": int(skipped)}

    def _security_state(self) -> dict:
        """Return whether CURVE is on and the refused handshakes per socket."""
        if self.curve is None:
            return {"curve": False}
        return {"curve": True, "authorized_keys": self.curve.authorized_dir,
                "authorized": self.curve.authorized, "refused": dict(self.curve.refused),
                "reload_dirs": self.reload_dirs}

    def _input_state(self) -> dict:
        """Return the feature set, the instrument table (symbol -> id) and the messy-data counters."""
        agent = self.agent
        return {
            "feature_set": self.feature_set.id,
            "shape": self.feature_set.name,
            "instruments": {s: i for i, s in enumerate(agent.symbols) if s},
            "instrument_slots": len(agent.symbols),
            "anomalies": self.scoring.kernels.anomalies(agent.istate),
        }

    def _last_event_ns(self) -> int:
        """Return the latest accepted ``ts_event_ns`` (0 if none): replays start after it."""
        last = 0
        istate = getattr(self.agent, "istate", None)
        if istate is not None and getattr(istate, "ndim", 0) == 2 and istate.shape[1] > I_LAST_TS:
            last = int(istate[:, I_LAST_TS].max())  # last accepted ts_event_ns per instrument
        if self.agent.seq:
            last = max(last, int(self.source.ts_list[0]))
        return max(last, 0)

    # ------------------------------------------------------------------ reporting
    def _describe(self) -> tuple[str, str]:
        cfg = self.cfg
        src, snk = cfg.effective_sources, cfg.effective_sinks
        ins, outs = [], []
        def compiled(kind) -> bool:  # the native sources receive and decode in compiled code
            return any(isinstance(s, kind) for s in self.sources)

        if src.zmq is not None:
            how = ", compiled receive" if compiled(NativeZmqTickSource) else ""
            ins.append(f"zmq {src.zmq.endpoint} ({'bind' if src.zmq.bind else 'connect'}{how})")
        if src.aeron is not None:
            how = " (compiled receive)" if compiled(NativeAeronTickSource) else ""
            ins.append(f"aeron {src.aeron.channel} stream {src.aeron.stream_id}{how}")
        if snk.zmq is not None:
            outs.append(f"zmq {snk.zmq.endpoint} ({'bind' if snk.zmq.bind else 'connect'})")
        if snk.aeron is not None:
            outs.append(f"aeron {snk.aeron.channel} stream {snk.aeron.stream_id}")
        return ", ".join(ins), ", ".join(outs)

    def _log_ready(self) -> None:
        ins, outs = self._describe()
        parts = [f"ready: ticks in {ins}; scores out {outs}"]
        if self.control is not None:
            parts.append(f"control {self.control.endpoint}")
        if self.aeron is not None:
            parts.append(f"aeron dir {self.aeron.dir} ({'embedded' if self.aeron.embedded else 'external'})")
        parts.append(f"model {self.backend.version} ({self.backend_kind})")
        a = self.agent
        why = a.loop_reason if a.loop_reason and a.loop_requested != "python" else ""
        parts.append(f"loop {a.loop}" + (f" ({why})" if why else ""))
        if self.runner.pin is not None:
            parts.append(self.runner.pin.message)
        _log("; ".join(parts), event="ready")

    def _mode(self) -> str:
        src = self.cfg.effective_sources
        kinds = [k for k, v in (("zmq", src.zmq), ("aeron", src.aeron)) if v is not None]
        return "+".join(kinds)

    def _final_report(self) -> dict:

        agent = self.agent
        if agent is None:
            return {"ticks": 0, "scores": 0, "stop_reason": self.stop_reason}
        cfg = self.cfg
        t_in, t_out = agent.recorder.snapshot(agent.seq)
        lat = t_out - t_in
        first_seq = agent.seq - len(lat)
        warm = max(0, min(cfg.engine.warmup_ticks - first_seq, max(len(lat) - 1, 0)))
        stats = latency_stats(lat[warm:])
        c = agent.counters
        ticks_in = int(c.sum())
        rejected = int(c[1:].sum())
        sinks = self._sink_counters()
        dropped = int(sum(s.get("drops", 0) for s in sinks.values()))
        t0 = self.t_ready_ns or self.t_start_ns
        wall_s = max(0.0, ((self.t_stop_ns or time.perf_counter_ns()) - t0) / 1e9)
        ins, outs = self._describe()
        pinned = self.runner.pin.pinned if self.runner and self.runner.pin else []
        summary = summarise(
            ticks=ticks_in,
            scores=agent.seq,
            dropped=dropped,
            rejected=rejected,
            rejected_by_reason=agent.rejected_by_reason(),
            wall_s=wall_s,
            stats=stats,
            mode=self._mode(),
            backend=agent.backend.kind,
            model_path=str(self.model_path),
            model_version=agent.model_version,
            quantization=agent.backend.quantization,
            data_path=ins,
            data_rows=ticks_in,
            pinned=pinned,
            extra={
                "role": "service",
                "config": self.config_path,
                "stop_reason": self.stop_reason,
                "drained_ticks": self.drained,
                "drain_s": self.drain_s,
                "scores_out_to": outs,
                "sinks": sinks,
                "messages_received": int(sum(getattr(s, "received", 0) for s in self.sources)),
                "warmup_ticks_excluded": warm,
                "latency_window": {"first_seq": first_seq, "count": int(len(lat))},
                "errors": self.runner.errors if self.runner else 0,
                "pin": self.runner.pin.message if self.runner and self.runner.pin else "",
                "helper_threads": self.helper_threads,
                "idle": cfg.engine.idle,
                "loop": agent.loop,
                "loop_reason": agent.loop_reason,
                "ingress": [type(s).__name__ for s in self.sources],
                "native_errors": agent.native_errors,
                "out_of_range": stats.out_of_range,
                "reloads": [t.as_dict() for t in agent.reloads],
                "unscored_at_stop": dict(self.unscored_at_stop),
                "security": self._security_state(),
                "cluster": self._cluster_state(),
                "control": dict(self.control_results),
                **self._input_state(),
            },
        )
        files = {}
        if cfg.output.dir:
            raw = {"t_in": t_in, "t_out": t_out, "warmup": np.int64(warm)}
            raw.update(agent.recorder.stage_snapshot(agent.seq))
            try:
                files = write_outputs(ReplayResult(summary, lat, stats), cfg.output.dir, raw)
            except Exception as exc:  # noqa: BLE001 - the report must still be printed
                _log(f"could not write outputs to {cfg.output.dir}: {exc}")
        summary["out_files"] = files

        lines = [
            f"stopped ({self.stop_reason or 'end'}) after {wall_s:.2f}s running; "
            f"drained {self.drained:,} ticks in {self.drain_s:.3f}s",
            f"  ticks in {ticks_in:,}  scores out {agent.seq:,}  rejected {rejected:,}  dropped {dropped:,}"
            f"  errors {summary['errors']}",
        ]
        if summary["rejected_by_reason"]:
            lines.append("  rejected by reason: " + ", ".join(
                f"{k} {v:,}" for k, v in summary["rejected_by_reason"].items()))
        for name, s in sinks.items():
            lines.append(f"  sink {name}: " + "  ".join(
                f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
                for k, v in s.items()))
        lines.append(f"  final report (first {warm:,} latencies excluded as warm-up):")
        table = format_table({"service": stats})
        lines.extend("    " + ln for ln in table.splitlines())
        for name, path in files.items():
            lines.append(f"  {name:<8} {path}")
        _log("\n".join(lines), event="stopped", ticks=ticks_in, scores=int(agent.seq), rejected=rejected,
             dropped=dropped, stop_reason=self.stop_reason or "end")
        return summary


#: stop reasons after which ``tickscore serve`` exits 1 (summary written): the Aeron driver is gone
AERON_LOST = "aeron driver lost"
AERON_TRUNCATED = "aeron driver files truncated (SIGBUS)"


def _install_signals(service: Service) -> dict:
    old = {}

    def handler(signum, frame):
        service.request_stop(signal.Signals(signum).name)

    def bus(signum, frame):
        # A SIGBUS in an Aeron C thread (cnc.dat truncated under the mapped file): the C handler
        # returned to the faulting access, which faults again on that thread; this Python-level
        # handler runs on the main thread, which can still drain, report and leave (os._exit).
        service.aeron_fault = True
        service.request_stop(AERON_TRUNCATED)

    for sig in (signal.SIGTERM, signal.SIGINT):
        old[sig] = signal.signal(sig, handler)
    if service.cfg.uses_aeron:
        old[signal.SIGBUS] = signal.signal(signal.SIGBUS, bus)
    return old


def run_service(cfg: ServiceConfig, config_path: str | None = None, log_format: str | None = None) -> dict:
    """Build and run the service until a graceful stop; return the final report.

    ``log_format`` ("text" / "json") overrides ``[log] format``.
    """
    configure_log(log_format or cfg.log.format)
    if cfg.cluster.shards > 1:
        set_log_context(shard=cfg.cluster.shard)
    service = Service(cfg, config_path)
    old = _install_signals(service)
    try:
        _log(f"starting (pid {os.getpid()}, config {config_path or 'defaults'})", event="starting",
             pid=os.getpid(), config=config_path or "defaults")
        service.build()
        return service.run()
    finally:
        for sig, h in old.items():
            if sig == signal.SIGBUS and service.aeron_fault:
                continue  # Aeron's threads still fault: the default action would kill the process now
            signal.signal(sig, h)
