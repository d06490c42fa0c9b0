"""A cluster of shards on one host: ``tickscore serve --shards N`` and ``control status --cluster``.

:class:`Supervisor` starts one ``tickscore serve --shard K`` process per shard, each
pinned to its own core, restarts a shard that dies (bounded exponential back-off,
counted and logged; the restarted process gets a new ``epoch``, which every Score
carries) and stops them all gracefully on SIGTERM/SIGINT: each shard drains what it
received, as a single service does.  It keeps no state a restart would need: a
shard's state is its feature state, rebuilt from the ticks that follow (README,
"Scale-out").  Under systemd, ``tickscore@.service`` runs the same processes with the
host's supervisor instead (``engine/examples/systemd``).

:func:`cluster_status` asks every shard's control socket for its status and sums
the cluster up; a shard that does not answer is reported ``down``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgspec

from engine.config import ConfigError, ServiceConfig
from engine.control import ControlError, request
from engine.log import configure as configure_log
from engine.log import log

__all__ = ["Supervisor", "cluster_status", "format_cluster_status", "shard_cores", "with_shards"]

#: a shard that dies within this long of its start counts as a quick death (the back-off doubles)
QUICK_DEATH_S = 60.0


def _log(msg: str, event: str = "", **fields) -> None:
    log("cluster", msg, event=event, **fields)


def shard_cores(cfg: ServiceConfig, allowed: set[int] | None = None) -> list[int | None]:
    """Return the hot core of each shard: ``[cluster] cores``, else the allowed cores but the lowest.

    The lowest allowed core is left to the OS, the ZeroMQ I/O threads and the Aeron
    drivers (on a 2-core host every shard shares core 1: they then compete for it).
    ``engine.pin = "none"`` leaves every shard unpinned.
    """
    c = cfg.cluster
    if cfg.engine.pin == "none":
        return [None] * c.shards
    if c.cores:
        return [c.cores[k % len(c.cores)] for k in range(c.shards)]
    if allowed is None:
        allowed = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    cores = sorted(allowed)
    hot = cores[1:] or cores
    if not hot:
        return [None] * c.shards
    return [hot[k % len(hot)] for k in range(c.shards)]


@dataclass
class _Shard:
    k: int
    core: int | None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    next_start: float = 0.0
    exits: list[str] = field(default_factory=list)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (even by SIGKILL): no orphan shard."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the shards then outlive a killed supervisor
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Run the shards of ``cfg`` (a cluster config, ``[cluster] shards`` > 1) on this host.

    Parameters
    ----------
    cfg : ServiceConfig
        The cluster's config (with ``{shard}`` placeholders); every shard's config is
        derived and checked before any process starts.
    config_path : str
        The file the shards read (``tickscore serve --config PATH --shard K``).
    log_format : str, optional
        Passed on to the shards (``--log-format``).
    command : list of str, optional
        How to run ``tickscore`` (default: this Python, ``-m engine.cli``).
    only : sequence of int, optional
        Run only these shards (the others run on other hosts); default all.
    """

    def __init__(self, cfg: ServiceConfig, config_path: str, *, log_format: str | None = None,
                 command: list[str] | None = None, only=None) -> None:  # fmt: skip
        if cfg.cluster.shards < 2:
            raise ConfigError(f"{config_path}: [cluster] shards = {cfg.cluster.shards}: "
                              "serve --shards needs a cluster of 2 or more")  # fmt: skip
        for k in range(cfg.cluster.shards):
            cfg.for_shard(k)  # every shard's endpoints are distinct, or a clear error now
        self.cfg = cfg
        self.config_path = os.path.abspath(config_path)
        self.log_format = log_format or cfg.log.format
        self.command = command or [sys.executable, "-m", "engine.cli"]
        c = cfg.cluster
        self.base_s = c.restart_backoff_ms / 1000
        self.max_s = c.restart_backoff_max_ms / 1000
        if only is not None:
            bad = sorted(set(only) - set(range(c.shards)))
            if bad:
                raise ConfigError(f"--only {bad}: shards are numbered 0 .. {c.shards - 1}")
        self.shards = [_Shard(k, core) for k, core in enumerate(shard_cores(cfg))
                       if only is None or k in only]  # fmt: skip
        self.stop_requested = False
        #: the grace a shard gets to drain and write its report after SIGTERM
        self.stop_grace_s = cfg.engine.drain_timeout_ms / 1000 + 15.0

    def _start(self, s: _Shard) -> None:
        argv = [*self.command, "serve", "--config", self.config_path, "--shard", str(s.k),
                "--of", str(self.cfg.cluster.shards), "--log-format", self.log_format]  # fmt: skip
        if s.core is not None:
            argv += ["--pin", str(s.core)]
        env = dict(os.environ, TICKSCORE_RESTARTS=str(s.restarts))
        s.proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        s.started = time.monotonic()
        _log(f"shard {s.k} started (pid {s.proc.pid}, core {s.core if s.core is not None else 'any'}, "
             f"restarts {s.restarts})", event="shard_started", shard=s.k, pid=s.proc.pid,
             restarts=s.restarts)  # fmt: skip

    def _check(self, s: _Shard, now: float) -> None:
        if s.proc is None:
            if now >= s.next_start:
                self._start(s)
            return
        code = s.proc.poll()
        if code is None:
            return
        why = _describe_exit(code)
        s.exits.append(why)
        lived = now - s.started
        s.quick_deaths = s.quick_deaths + 1 if lived < QUICK_DEATH_S else 0
        delay = min(self.max_s, self.base_s * (2 ** max(0, s.quick_deaths - 1)))
        s.restarts += 1
        s.proc = None
        s.next_start = now + delay
        _log(f"shard {s.k} died ({why}) after {lived:.1f} s; restart {s.restarts} in {delay:.1f} s",
             event="shard_died", shard=s.k, exit=why, restarts=s.restarts, backoff_s=delay)

    def request_stop(self, signum=None, frame=None) -> None:
        """Stop every shard gracefully (signal handler)."""
        self.stop_requested = True

    def run(self) -> int:
        """Start the shards and keep them running until SIGTERM/SIGINT; return the exit code."""
        configure_log(self.log_format)
        old = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        ks = [s.k for s in self.shards]
        _log(f"cluster of {self.cfg.cluster.shards} shards from {self.config_path}; running shards "
             f"{', '.join(map(str, ks))} here", event="cluster_starting", shards=ks, config=self.config_path)
        try:
            while not self.stop_requested:
                now = time.monotonic()
                for s in self.shards:
                    self._check(s, now)
                time.sleep(0.05)
            return self._stop_all()
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def _stop_all(self) -> int:
        alive = [s for s in self.shards if s.proc is not None and s.proc.poll() is None]
        _log(f"stopping {len(alive)} shards", event="cluster_stopping")
        for s in alive:
            s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        codes = {}
        for s in self.shards:
            if s.proc is None:
                continue
            try:
                codes[s.k] = s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log(f"shard {s.k} did not stop within {self.stop_grace_s:.0f} s: killed",
                     event="shard_killed", shard=s.k)
                s.proc.kill()
                codes[s.k] = s.proc.wait()
        total = sum(s.restarts for s in self.shards)
        _log(f"cluster stopped; {total} restarts in all", event="cluster_stopped", restarts=total)
        return 0 if all(c == 0 for c in codes.values()) else 1


def with_shards(cfg: ServiceConfig, shards: int) -> ServiceConfig:
    """Return ``cfg`` as a cluster of ``shards`` shards (``serve --shards N`` / ``--of N``)."""
    if cfg.cluster.partitions and len(cfg.cluster.partitions) != shards:
        raise ConfigError(f"[cluster] partitions lists {len(cfg.cluster.partitions)} shards, not {shards}")
    try:
        c = msgspec.structs.replace(cfg.cluster, shards=shards, shard=min(cfg.cluster.shard, shards - 1))
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"--shards {shards}: {exc}") from None
    return msgspec.structs.replace(cfg, cluster=c)


def _summary(k: int, st: dict) -> dict:
    cl = st.get("cluster") or {}
    lat = st.get("latency_ns") or {}
    return {"shard": k, "state": st.get("state"), "pid": st.get("pid"), "epoch": cl.get("epoch"),
            "restarts": cl.get("restarts"), "uptime_s": round(float(st.get("uptime_s", 0.0)), 1),
            "instruments": sorted(st.get("instruments", {})), "ticks_in": st.get("ticks_in"),
            "scores_out": st.get("scores_out"), "rejected": st.get("rejected"), "drops": st.get("drops"),
            "skipped": cl.get("skipped"), "p50_ns": lat.get("p50"), "p99_ns": lat.get("p99")}  # fmt: skip


def cluster_status(cfg: ServiceConfig, timeout_s: float = 2.0, keys=None) -> dict:
    """Return every shard's status summary (``down`` with the reason where one does not answer)."""
    shards = []
    for k in range(cfg.cluster.shards):
        endpoint = cfg.for_shard(k).control.endpoint
        if not endpoint:
            raise ConfigError("[control] endpoint = \"\": the shards have no control socket to ask")
        try:
            shards.append(_summary(k, request(endpoint, "status", timeout_s=timeout_s, keys=keys)))
        except ControlError as exc:
            shards.append({"shard": k, "state": "down", "control": endpoint, "error": str(exc)})
    up = [s for s in shards if s["state"] != "down"]
    return {"ok": len(up) == len(shards), "command": "status", "shards_total": len(shards),
            "shards_up": len(up), "ticks_in": sum(s["ticks_in"] or 0 for s in up),
            "scores_out": sum(s["scores_out"] or 0 for s in up), "shards": shards}  # fmt: skip


def format_cluster_status(rep: dict) -> str:
    """Return the table ``control status --cluster`` prints for people (stderr)."""
    head = f"{'shard':>5} {'state':<9} {'pid':>7} {'restarts':>8} {'uptime_s':>9} {'ticks_in':>10} " \
           f"{'scores':>10} {'skipped':>10} {'drops':>6}  instruments"
    lines = [head]
    for s in rep["shards"]:
        if s["state"] == "down":
            lines.append(f"{s['shard']:>5} {'down':<9}  {s['error']}")
            continue
        lines.append(f"{s['shard']:>5} {s['state']:<9} {s['pid']:>7} {s['restarts']:>8} {s['uptime_s']:>9} "
                     f"{s['ticks_in']:>10,} {s['scores_out']:>10,} {s['skipped']:>10,} {s['drops']:>6,}  "
                     f"{' '.join(s['instruments'])}")  # fmt: skip
    lines.append(f"{rep['shards_up']}/{rep['shards_total']} shards up; "
                 f"{rep['ticks_in']:,} ticks in, {rep['scores_out']:,} scores out")
    return "\n".join(lines)
