"""Prometheus metrics, ``/healthz`` and ``/readyz`` of the service, on a helper thread.

``[metrics] endpoint = "127.0.0.1:9464"`` starts a small HTTP server
(:class:`http.server.ThreadingHTTPServer`, started before the hot thread is
pinned, so its threads run on the helper cores) answering:

``/metrics``  Prometheus text format, written by ``prometheus_client`` from a
              custom collector (below) plus its process collector (RSS, CPU, fds).
``/healthz``  200 ``ok`` while the service lives: starting, warming up, or its
              hot loop ran housekeeping within the last :data:`STALL_S` seconds;
              else 503 with the reason (loop stalled, stopped).
``/readyz``   200 ``ready`` once warm-up is done and every source is bound
              (state ``running``); else 503 with the state.

No per-tick work: the hot thread folds its counters into a plain
:class:`MetricsSnapshot` in housekeeping (every ~100 ms, a few µs) and swaps
the reference; a scrape only reads the latest snapshot, and the latency
histogram's bucket counts (:class:`replay.latency.LatencyHistogram`, folded in
the same housekeeping), converted to cumulative Prometheus buckets at scrape
time.  A scrape holds the GIL for ~0.2 ms: the hot loop may wait that long once
per scrape, which shows in the far tail (p99.99) only.

Metric names (all prefixed ``tickscore_``): ``ticks_total``, ``scores_total``,
``rejected_total{reason}``, ``dropped_total{sink}``, ``back_pressure_total{sink}``,
``not_connected_total{sink}``, ``tick_to_decision_seconds`` (histogram),
``model_info{version,feature_set,backend}``, ``reloads_total{result}``,
``auth_refused_total{socket}``, ``control_requests_total{result}``,
``errors_total``, ``up``, ``ready``, ``shard_info{shard,shards,epoch}``, ``restarts``,
``skipped_total`` (other shards' ticks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["MetricsSnapshot", "MetricsServer", "LATENCY_BUCKETS_S", "STALL_S"]

#: Upper bounds (s) of the tick-to-decision histogram buckets (+Inf added): 0.5 µs .. 10 ms.
LATENCY_BUCKETS_S = (0.5e-6, 1e-6, 1.5e-6, 2e-6, 3e-6, 5e-6, 7.5e-6, 10e-6, 15e-6, 20e-6, 30e-6, 50e-6,
                     75e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3)  # fmt: skip
#: /healthz fails when the hot loop ran no housekeeping for this long (s).
STALL_S = 5.0


@dataclass
class MetricsSnapshot:
    """Counters of the service as of one housekeeping (plain Python values, read by scrapes)."""

    ticks: int = 0
    scores: int = 0
    errors: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    back_pressure: dict[str, int] = field(default_factory=dict)
    not_connected: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    control: dict[str, int] = field(default_factory=dict)
    model: dict[str, str] = field(default_factory=dict)
    #: the process's place in its cluster: shard, shards, epoch, restarts, skipped
    cluster: dict[str, int] = field(default_factory=dict)
    #: time.monotonic() of the housekeeping that made it
    t_mono: float = 0.0


class _Collector:
    """prometheus_client collector over the latest snapshot and the latency histogram."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self._bounds_ns = np.array([round(b * 1e9) for b in LATENCY_BUCKETS_S], dtype=np.int64)

    def _buckets(self):
        hist = self.server.hist
        if hist is None:
            return [(f"{b:g}", 0) for b in LATENCY_BUCKETS_S] + [("+Inf", 0)], 0.0
        # a copy: the hot thread folds into hist.counts (numba, without the GIL) at any moment
        counts = hist.counts.copy()
        nz = np.flatnonzero(counts)
        c = counts[nz]
        per = np.bincount(np.searchsorted(self._bounds_ns, hist.bucket_values()[nz], side="left"), weights=c,
                          minlength=len(self._bounds_ns) + 1)  # fmt: skip
        cum = np.cumsum(per).astype(np.int64)
        out = [(f"{b:g}", int(cum[i])) for i, b in enumerate(LATENCY_BUCKETS_S)]
        out.append(("+Inf", int(cum[-1])))
        total = hist.total / 1e9 if hist.count else 0.0
        return out, total

    def collect(self):
        s = self.server.snapshot
        yield CounterMetricFamily("tickscore_ticks", "Ticks received (accepted and rejected)", value=s.ticks)
        yield CounterMetricFamily("tickscore_scores", "Scores computed and published", value=s.scores)
        yield CounterMetricFamily("tickscore_errors", "Errors caught in the hot loop", value=s.errors)

        def labelled(name, doc, label, values):
            m = CounterMetricFamily(name, doc, labels=[label])
            for k, v in values.items():
                m.add_metric([k], v)
            return m

        yield labelled("tickscore_rejected", "Ticks rejected, by reason", "reason", s.rejected)
        yield labelled("tickscore_dropped", "Scores a sink dropped (queue full or no reader after retries)",
                       "sink", s.dropped)
        yield labelled("tickscore_back_pressure", "Sends refused for back-pressure (then retried)", "sink",
                       s.back_pressure)
        yield labelled("tickscore_not_connected", "Scores not sent: no subscriber connected (not drops)",
                       "sink", s.not_connected)
        yield labelled("tickscore_reloads", "Model reloads, by result", "result", s.reloads)
        yield labelled("tickscore_auth_refused", "Refused CURVE handshakes, by socket", "socket", s.refused)
        yield labelled("tickscore_control_requests", "Control requests, by result", "result", s.control)
        info = GaugeMetricFamily("tickscore_model_info", "The model being served",
                                 labels=["version", "feature_set", "backend"])
        if s.model:
            info.add_metric([s.model.get("version", ""), s.model.get("feature_set", ""),
                             s.model.get("backend", "")], 1)
        yield info
        cl = s.cluster
        shard = GaugeMetricFamily("tickscore_shard_info", "This process's shard of its cluster (0 of 1: "
                                  "not sharded) and its epoch (start time, ns)",
                                  labels=["shard", "shards", "epoch"])
        if cl:
            shard.add_metric([str(cl["shard"]), str(cl["shards"]), str(cl["epoch"])], 1)
        yield shard
        yield GaugeMetricFamily("tickscore_restarts", "Restarts of this shard before this run "
                                "(serve --shards)", value=cl.get("restarts", 0))
        yield CounterMetricFamily("tickscore_skipped", "Ticks of other shards' instruments skipped",
                                  value=cl.get("skipped", 0))
        buckets, total = self._buckets()
        yield HistogramMetricFamily("tickscore_tick_to_decision_seconds",
                                    "Tick-to-decision latency (source read to score published)",
                                    buckets=buckets, sum_value=total)
        live, _ = self.server.health()
        yield GaugeMetricFamily("tickscore_up", "1 while the service is alive", value=1 if live else 0)
        ready, _ = self.server.readiness()
        yield GaugeMetricFamily("tickscore_ready", "1 once warmed up and serving", value=1 if ready else 0)


class MetricsServer:
    """HTTP server of ``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread.

    Parameters
    ----------
    endpoint : str
        ``HOST:PORT`` (port 0 = any free port; see :attr:`port`).
    state : callable
        Returns the service state (``starting``, ``warming up``, ``running``,
        ``draining``, ``stopped``).
    """

    def __init__(self, endpoint: str, state: Callable[[], str]) -> None:
        host, _, port = endpoint.rpartition(":")
        self.state = state
        self.snapshot = MetricsSnapshot(t_mono=time.monotonic())
        self.hist = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body, ctype, code = generate_latest(server.registry), CONTENT_TYPE_LATEST, 200
                    except Exception as exc:  # noqa: BLE001 - answer, never drop the connection
                        body, ctype, code = f"metrics failed: {exc}\n".encode(), "text/plain", 500
                elif path in ("/healthz", "/readyz"):
                    ok, why = server.health() if path == "/healthz" else server.readiness()
                    body, ctype, code = (why + "\n").encode(), "text/plain; charset=utf-8", 200 if ok else 503
                else:
                    body, ctype, code = b"not found: /metrics, /healthz, /readyz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - quiet: no line per scrape
                pass

        try:
            self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {endpoint!r}: {exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.endpoint = f"{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 1.0},
                                        name="tickscore-metrics", daemon=True)  # fmt: skip
        self._thread.start()

    def health(self) -> tuple[bool, str]:
        """Return (alive, reason) for ``/healthz``."""
        st = self.state()
        if st in ("starting", "warming up"):
            return True, f"ok ({st})"
        if st == "stopped":
            return False, "stopped"
        age = time.monotonic() - self.snapshot.t_mono
        if st == "running" and age > STALL_S:
            return False, f"hot loop stalled: no housekeeping for {age:.1f} s"
        return True, f"ok ({st})"

    def readiness(self) -> tuple[bool, str]:
        """Return (ready, reason) for ``/readyz``."""
        st = self.state()
        return (True, "ready") if st == "running" else (False, f"not ready: {st}")

    def close(self) -> None:
        """Stop serving (the port is free afterwards)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2)
