"""Service configuration: one TOML file decoded into frozen msgspec structs.

``tickscore serve --config FILE`` reads the file once at start-up with
:func:`load_config`; a bad key or value is a :class:`ConfigError` naming the key
path and the value (``service.toml: engine.pin = "two": expected int ...``)
before anything starts.  Hot-path code never sees these structs: the service
turns them into plain ints, strings and preallocated objects.

Layout (every table and key is optional; see ``engine/examples/service.toml``)::

    instruments = ["CLF7", "ESZ6", "NQZ6"]    # symbol table: id = position
    max_instruments = 0                        # > 0: slots for symbols seen first on the wire

    [engine]    pin, helper_cpus, idle, freeze_gc, housekeeping_every,
                recorder_capacity, warmup_ticks, drain_timeout_ms, drain_quiet_ms
    [model]     path, backend
    [sources.zmq]    endpoint, bind, subscribe, rcvhwm     (ticks in over ZeroMQ SUB)
    [sources.aeron]  channel, stream_id                    (ticks in over an Aeron subscription)
    [sinks.zmq]      endpoint, bind, sndhwm                (scores out over ZeroMQ PUB)
    [sinks.aeron]    channel, stream_id, back_pressure_retries, not_connected_retries, linger_ms
    [aeron]     embedded, dir, threading, driver_timeout_ms     (media driver, if Aeron is used)
    [control]   endpoint                                   (ZeroMQ REP: status / reload / stop)
    [security]  curve, secret_key, authorized_keys, client_key, server_key   (ZeroMQ CURVE)
    [metrics]   endpoint                                   (Prometheus /metrics, /healthz, /readyz)
    [log]       format                                     (text | json lines on stderr)
    [output]    dir                                        (final summary.json, hgrm, plot)
    [book]      crossing_add                               (L3 models: the venue's crossing-add policy)

Without a ``[sources]`` table the service reads ticks from the default ZeroMQ
endpoint; without a ``[sinks]`` table it publishes scores on the default ZeroMQ
endpoint.  When a ``[sources]`` (``[sinks]``) table is present, exactly the
transports listed in it are used.
"""

from __future__ import annotations

import functools
import getpass
import os
import re
import tempfile
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from engine.agent import allowed_cpus
from engine.partition import Partition

__all__ = [
    "TICK_STREAM_ID",
    "SCORE_STREAM_ID",
    "DEFAULT_TICK_ENDPOINT",
    "DEFAULT_SCORE_ENDPOINT",
    "DEFAULT_CONTROL_ENDPOINT",
    "ConfigError",
    "EngineConfig",
    "ModelConfig",
    "ZmqSourceConfig",
    "AeronSourceConfig",
    "SourcesConfig",
    "ZmqSinkConfig",
    "AeronSinkConfig",
    "SinksConfig",
    "AeronConfig",
    "ControlConfig",
    "OutputConfig",
    "BookConfig",
    "SecurityConfig",
    "MetricsConfig",
    "LogConfig",
    "ClusterConfig",
    "ServiceConfig",
    "shard_text",
    "load_config",
    "parse_config",
    "default_aeron_dir",
    "to_toml",
    "is_loopback_endpoint",
]

#: Aeron stream id of Tick messages (schema id 1) sent to the service.
TICK_STREAM_ID = 1001
#: Aeron stream id of Score messages (schema id 3) published by the service.
SCORE_STREAM_ID = 1002

#: Default ZeroMQ endpoint the service binds a SUB socket to for ticks.
DEFAULT_TICK_ENDPOINT = "ipc:///tmp/tickscore-ticks.ipc"
#: Default ZeroMQ endpoint the service binds its score PUB (XPUB) socket to.
DEFAULT_SCORE_ENDPOINT = "ipc:///tmp/tickscore-scores.ipc"
#: Default control endpoint (ZeroMQ REP, loopback only).
DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5590"

_ZMQ_SCHEMES = ("ipc://", "tcp://", "inproc://")
_AERON_SCHEMES = ("aeron:ipc", "aeron:udp")

Port = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
#: Latency ring entries: two int64 rings of this many (2**27: 2 GiB), allocated at start-up.
RecorderCapacity = Annotated[int, msgspec.Meta(ge=1, le=1 << 27)]
#: Keep-warm period (µs): at most one second.
KeepWarmUs = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class ConfigError(ValueError):
    """A configuration file cannot be read or has a bad key or value (message names both)."""


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class EngineConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Hot loop: pinning, idle strategy, GC, recording, graceful-stop bounds."""

    #: Core of the hot loop; ``"none"`` leaves it unpinned.  A refused pin is reported.
    pin: NonNegative | Literal["none"] = 1
    #: Cores for helper threads (ZeroMQ I/O, Aeron driver and client); [] = all allowed but ``pin``.
    helper_cpus: list[NonNegative] = []
    #: What the loop does when no tick is ready.
    idle: Literal["busy-spin", "yield", "backoff", "sleep"] = "busy-spin"
    #: While idle, run one synthetic tick through features + model on throwaway state
    #: every this many microseconds, so the next real tick finds the code and the
    #: model warm (0 = off).  Costs one model call per period on the hot core only.
    keep_warm_us: KeepWarmUs = 100
    #: Duty cycle: ``native`` = one compiled call per cycle scores every tick ready (fused
    #: backend; a run it cannot serve is a start-up error), ``python`` = the per-tick Python
    #: path, ``auto`` = native where it can serve, else python (the reason is logged).
    loop: Literal["auto", "native", "python"] = "auto"
    #: Ticks per native duty cycle at most (housekeeping runs between cycles).  The live
    #: ingress receives a batch before it scores it, so a burst delays a batch's first tick
    #: by the other receives: 16 kept the service time of back-to-back ticks at p50 14 µs,
    #: 256 let it reach 165 µs (README, native duty cycle); replays from memory use 256.
    batch: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 16
    #: Poll an Aeron tick source in compiled code as well (beside a ZeroMQ source: both in one
    #: call): one call per duty cycle reads and decodes up to ``batch`` ticks.  It drains a
    #: burst ~3.5-3.9x faster than the Python poll (one tick per cycle); paced, wire to wire the
    #: two are the same.  With ``[aeron] pre_touch`` it touches the tick log's pages ahead of
    #: the reader while idle, so reads do not fault.  See the README, native duty cycle, and
    #: benchmarks/bench_aeron_ingress.py.
    native_aeron_ingress: bool = True
    #: ``gc.collect(); gc.freeze(); gc.disable()`` before the loop.
    freeze_gc: bool = True
    #: Duty cycles between housekeeping calls (control socket, stats); power of two, 0 = by idle.
    housekeeping_every: NonNegative = 0
    #: Latest ticks whose (t_in, t_out) are kept in the ring for the final statistics.
    recorder_capacity: RecorderCapacity = 1 << 20
    #: First N latencies of the run excluded from the final statistics.
    warmup_ticks: NonNegative = 1000
    #: Graceful stop: at most this long scoring what was already received.
    drain_timeout_ms: NonNegative = 2000
    #: Graceful stop: the drain ends once no tick arrived for this long.
    drain_quiet_ms: NonNegative = 20
    #: A tick whose ts_event_ns is further ahead of this host's wall clock (s) is rejected as
    #: ``implausible_time`` (0 = no bound).  Historical replays (older times) are unaffected.
    max_event_ahead_s: Annotated[int, msgspec.Meta(ge=0, le=10 * 365 * 86400)] = 86_400

    def __post_init__(self) -> None:
        h = self.housekeeping_every
        if h and h & (h - 1):
            raise ValueError(f"housekeeping_every = {h}: must be a power of two (or 0 = automatic)")
        allowed = allowed_cpus()
        missing = sorted(set(self.helper_cpus) - allowed) if allowed else []
        if missing:
            raise ValueError(f"helper_cpus = {self.helper_cpus}: core(s) {missing} are not available to this "
                             f"process (allowed: {sorted(allowed)})")  # fmt: skip


#: Default per-call budget of a reloaded model (µs): above it the reload is refused.
DEFAULT_MAX_MODEL_CALL_US = 1_000.0


class ModelConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Model file and runtime."""

    #: ONNX model with tickscore metadata; "" = the shipped int8 model.
    path: str = ""
    #: Model runtime, as for ``tickscore replay --backend`` (checked when the model is loaded).
    backend: Literal["auto", "ort", "fused"] = "auto"
    #: A reloaded model whose median call costs more (µs) is refused; the old one keeps serving.
    max_call_us: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = DEFAULT_MAX_MODEL_CALL_US
    #: ``reload`` loads only files inside these directories (symlinks and ``..`` resolved first);
    #: [] = the directory of ``path`` (of the shipped model when ``path`` is "").
    reload_dirs: list[str] = []


def _check_zmq_endpoint(key: str, endpoint: str) -> None:
    if not endpoint.startswith(_ZMQ_SCHEMES):
        raise ValueError(
            f"{key} = {endpoint!r}: not a ZeroMQ endpoint (use ipc://PATH, tcp://HOST:PORT or inproc://NAME)"
        )


def _check_aeron_channel(key: str, channel: str) -> None:
    if not channel.startswith(_AERON_SCHEMES):
        raise ValueError(
            f"{key} = {channel!r}: not an Aeron channel (use aeron:ipc or aeron:udp?endpoint=HOST:PORT)"
        )
    if channel.startswith("aeron:udp") and "endpoint=" not in channel and "control=" not in channel:
        raise ValueError(f"{key} = {channel!r}: a UDP channel needs endpoint=HOST:PORT")


class ZmqSourceConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ticks in over a ZeroMQ SUB socket (``[topic, payload]`` frames)."""

    endpoint: str = DEFAULT_TICK_ENDPOINT
    #: True = bind (publishers connect to the service); False = connect to a publisher.
    bind: bool = True
    #: Topic prefixes to subscribe to ("" = every instrument).
    subscribe: list[str] = msgspec.field(default_factory=lambda: [""])
    #: Receive queue bound in messages (0 = unbounded).
    rcvhwm: NonNegative = 100_000

    def __post_init__(self) -> None:
        _check_zmq_endpoint("endpoint", self.endpoint)


class AeronSourceConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ticks in over an Aeron subscription (payload only, one Tick per message)."""

    channel: str = "aeron:ipc"
    stream_id: Port = TICK_STREAM_ID

    def __post_init__(self) -> None:
        _check_aeron_channel("channel", self.channel)


class SourcesConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tick sources; one or both."""

    zmq: ZmqSourceConfig | None = None
    aeron: AeronSourceConfig | None = None


class ZmqSinkConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Scores out over a ZeroMQ XPUB (PUB-compatible) socket."""

    endpoint: str = DEFAULT_SCORE_ENDPOINT
    bind: bool = True
    #: Per-subscriber queue bound in messages.
    sndhwm: NonNegative = 100_000
    #: A subscriber whose queue is full: "per-subscriber" = it alone loses that score (it sees a
    #: ``seq`` gap; the others get it); "count" = the score is refused for every subscriber and
    #: counted as a drop here (ZMQ_XPUB_NODROP; one slow subscriber then costs them all).
    drop_policy: Literal["per-subscriber", "count"] = "per-subscriber"
    #: At stop, wait up to this long for queued scores to be sent.
    linger_ms: NonNegative = 2000

    def __post_init__(self) -> None:
        _check_zmq_endpoint("endpoint", self.endpoint)


class AeronSinkConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Scores out over an Aeron exclusive publication."""

    channel: str = "aeron:ipc"
    stream_id: Port = SCORE_STREAM_ID
    #: Extra offers of one score after BACK_PRESSURED / ADMIN_ACTION before it is a counted drop.
    back_pressure_retries: NonNegative = 16
    #: Extra offers of one score after NOT_CONNECTED (no subscriber) before it is a counted drop.
    not_connected_retries: NonNegative = 1
    #: At stop, keep the publication (and an embedded driver) up this long so subscribers drain it.
    linger_ms: NonNegative = 250

    def __post_init__(self) -> None:
        _check_aeron_channel("channel", self.channel)


class SinksConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Score sinks; one or both (each score goes to every sink)."""

    zmq: ZmqSinkConfig | None = None
    aeron: AeronSinkConfig | None = None


class AeronConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Aeron media driver: embedded in the service (default) or an external one."""

    #: Run the C media driver inside the service; False = use a running driver in ``dir``.
    embedded: bool = True
    #: Driver directory; "" = /dev/shm/tickscore-aeron-USER (embedded) or Aeron's default (external).
    dir: str = ""
    #: Threading of the embedded driver.
    threading: Literal["shared", "dedicated", "shared_network"] = "shared"
    #: How long the client waits for the driver before giving up.
    driver_timeout_ms: Positive = 10_000
    #: The native loop's client touches every page of the score publication's log at start
    #: (3 x term length in memory), so no offer takes a page fault, and the compiled tick ingress
    #: touches the tick log's pages ahead of the reader while idle (at most 8 MiB ahead; each
    #: image's log once), so no read takes one (README: the native duty cycle).
    pre_touch: bool = True


class ControlConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Control channel: ZeroMQ REP socket; "" disables it."""

    endpoint: str = DEFAULT_CONTROL_ENDPOINT

    def __post_init__(self) -> None:
        if self.endpoint:
            _check_zmq_endpoint("endpoint", self.endpoint)


_LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


def is_loopback_endpoint(endpoint: str) -> bool:
    """Return whether a ZeroMQ endpoint stays on this host (ipc, inproc, tcp on a loopback address)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    return host.startswith(_LOOPBACK_HOSTS)


class SecurityConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """ZeroMQ CURVE on the tick, score and control sockets (README, "Security")."""

    #: Run the service's ZeroMQ sockets as CURVE servers; only authorized clients connect.
    curve: bool = False
    #: The service's secret key file (``tickscore keygen --out DIR/NAME`` -> NAME.key_secret).
    secret_key: str = ""
    #: Directory of the public key files (NAME.key) of the clients allowed to connect.
    authorized_keys: str = ""
    #: Client tools run with ``--config``: their own secret key file.
    client_key: str = ""
    #: Client tools run with ``--config``: the service's public key file ("" = from ``secret_key``).
    server_key: str = ""

    def __post_init__(self) -> None:
        if self.curve and not self.secret_key:
            raise ValueError("secret_key = '': CURVE needs the service's key file "
                             "(tickscore keygen --out DIR/NAME)")
        if self.curve and not self.authorized_keys:
            raise ValueError("authorized_keys = '': CURVE needs a directory of the clients' public keys")


class MetricsConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prometheus text endpoint (``/metrics``) with ``/healthz`` and ``/readyz``."""

    #: ``HOST:PORT`` to serve on ("" = off), e.g. "127.0.0.1:9464".
    endpoint: str = ""

    def __post_init__(self) -> None:
        if self.endpoint:
            host, _, port = shard_text(self.endpoint, 0).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"endpoint = {self.endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")


class LogConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Log lines on stderr."""

    #: "text" (timestamped lines) or "json" (one object per line: ts, level, event, fields).
    format: Literal["text", "json"] = "text"


class BookConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The L3 order book (models of the ``l3`` feature set only)."""

    #: What an add at or through the opposite best price means on the venue feeding the
    #: service (as the mapping key of the replay): "" = the feature set's ``uncross``
    #: parameter (uncross), "uncross", "aggressor" or "keep".
    crossing_add: Literal["", "uncross", "aggressor", "keep"] = ""


class OutputConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the final report goes besides stderr."""

    #: Directory for summary.json, latency.hgrm, latency.png, latency_raw.npz ("" = none).
    dir: str = ""


_SHARD_RE = re.compile(r"\{(?:(\d+)\+)?shard\}")


def shard_text(text: str, shard: int) -> str:
    """Return ``text`` with ``{shard}`` replaced by ``shard`` and ``{N+shard}`` by N + shard."""
    return _SHARD_RE.sub(lambda m: str(int(m.group(1) or 0) + shard), text)


class ClusterConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sharding: instruments partitioned across ``shards`` service processes (README, "Scale-out").

    In a cluster's config, the endpoints and paths each shard must own alone carry a
    ``{shard}`` placeholder (``{N+shard}`` for ports): ``tcp://127.0.0.1:{5560+shard}``.
    """

    #: Number of shards (1 = not sharded).
    shards: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    #: This process's shard (``serve --shard K`` overrides; ``serve --shards N`` starts them all).
    shard: NonNegative = 0
    #: Explicit symbol lists, one per shard; [] = by hash (FNV-1a 64 of the symbol mod shards).
    #: A symbol listed nowhere is hashed.
    partitions: list[list[str]] = []
    #: ``serve --shards``: the hot core of each shard, in shard order ([] = the allowed cores
    #: except the lowest, round robin; one core: all on it).
    cores: list[NonNegative] = []
    #: ``serve --shards``: the first restart of a dead shard waits this long (ms); doubled after
    #: each death within a minute of its start, up to ``restart_backoff_max_ms``.
    restart_backoff_ms: Positive = 500
    restart_backoff_max_ms: Positive = 30_000

    def __post_init__(self) -> None:
        if self.shard >= self.shards:
            raise ValueError(f"shard = {self.shard}: shards are numbered 0 .. {self.shards - 1}")
        Partition(self.shards, self.partitions)  # raises on a bad list

    @property
    def partition(self) -> Partition:
        """Return the cluster's partition function."""
        return Partition(self.shards, self.partitions)


class ServiceConfig(_Base, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole ``tickscore serve`` configuration."""

    #: Instrument table: symbol -> id (position).  Ticks for other symbols are rejected
    #: (``unknown_instrument``) unless ``max_instruments`` leaves free slots.
    instruments: list[str] = msgspec.field(default_factory=lambda: ["CLF7", "ESZ6", "NQZ6"])
    #: Instrument slots (0 = just ``instruments``): a symbol not listed takes the next free
    #: slot on first sight, in arrival order; beyond, its ticks are ``instruments_full``.
    #: State for every slot is allocated at start-up.
    max_instruments: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    engine: EngineConfig = EngineConfig()
    model: ModelConfig = ModelConfig()
    sources: SourcesConfig | None = None
    sinks: SinksConfig | None = None
    aeron: AeronConfig = AeronConfig()
    control: ControlConfig = ControlConfig()
    output: OutputConfig = OutputConfig()
    book: BookConfig = BookConfig()
    security: SecurityConfig = SecurityConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    cluster: ClusterConfig = ClusterConfig()

    def __post_init__(self) -> None:
        if not self.instruments:
            raise ValueError("instruments = []: list at least one symbol")
        seen = set()
        for s in self.instruments:
            if not s or s in seen:
                raise ValueError(f"instruments = {self.instruments!r}: {s!r} is empty or listed twice")
            seen.add(s)
        src, snk = self.effective_sources, self.effective_sinks
        if src.zmq is None and src.aeron is None:
            raise ValueError("[sources] lists no source: add [sources.zmq] and/or [sources.aeron]")
        if snk.zmq is None and snk.aeron is None:
            raise ValueError("[sinks] lists no sink: add [sinks.zmq] and/or [sinks.aeron]")
        if src.aeron is not None and snk.aeron is not None:
            if src.aeron.channel == snk.aeron.channel and src.aeron.stream_id == snk.aeron.stream_id:
                raise ValueError(
                    f"sources.aeron and sinks.aeron use the same channel and stream id "
                    f"({src.aeron.channel!r}, {src.aeron.stream_id}): the service would read its own scores"
                )
        if src.zmq is not None and snk.zmq is not None and src.zmq.endpoint == snk.zmq.endpoint:
            raise ValueError(f"sources.zmq and sinks.zmq use the same endpoint {src.zmq.endpoint!r}")
        if self.control.endpoint and not self.security.curve and not is_loopback_endpoint(
                self.control.endpoint):
            raise ValueError(f"[control] endpoint = {self.control.endpoint!r} is reachable from other hosts: "
                             "without [security] curve = true anyone there could stop the service or "
                             "reload its model; bind it to 127.0.0.1 or an ipc:// path, or enable CURVE")
        if self.max_instruments and self.max_instruments < len(self.instruments):
            raise ValueError(f"max_instruments = {self.max_instruments} is fewer than the "
                             f"{len(self.instruments)} instruments listed")  # fmt: skip

    def for_shard(self, shard: int) -> ServiceConfig:
        """Return the config of shard ``shard`` of this cluster config (placeholders filled in).

        Raises :class:`ConfigError` when an endpoint or path every shard would bind alone
        has no ``{shard}`` placeholder (two shards on one host would collide).
        """
        c = self.cluster
        if not 0 <= shard < c.shards:
            raise ConfigError(f"shard {shard}: [cluster] shards = {c.shards} numbers them "
                              f"0 .. {c.shards - 1}")
        src, snk = self.effective_sources, self.effective_sinks
        if c.shards > 1:
            own = [("sinks.zmq.endpoint", snk.zmq.endpoint if snk.zmq and snk.zmq.bind else ""),
                   ("sources.zmq.endpoint", src.zmq.endpoint if src.zmq and src.zmq.bind else ""),
                   ("control.endpoint", self.control.endpoint), ("metrics.endpoint", self.metrics.endpoint),
                   ("output.dir", self.output.dir),
                   ("aeron.dir", self.aeron.dir if self.aeron.embedded else "")]  # fmt: skip
            for key, text in own:
                if text and not _SHARD_RE.search(text):
                    raise ConfigError(f"{key} = {text!r}: every shard would use it; put {{shard}} in it "
                                      f"(ports: {{N+shard}}, e.g. tcp://127.0.0.1:{{5560+shard}})")
        f = functools.partial(shard_text, shard=shard)
        rep = msgspec.structs.replace
        if src.zmq is not None:
            src = rep(src, zmq=rep(src.zmq, endpoint=f(src.zmq.endpoint)))
        if src.aeron is not None:
            src = rep(src, aeron=rep(src.aeron, channel=f(src.aeron.channel)))
        if snk.zmq is not None:
            snk = rep(snk, zmq=rep(snk.zmq, endpoint=f(snk.zmq.endpoint)))
        if snk.aeron is not None:
            snk = rep(snk, aeron=rep(snk.aeron, channel=f(snk.aeron.channel)))
        aeron_dir = f(self.aeron.dir)
        if c.shards > 1 and self.aeron.embedded and not aeron_dir:  # one embedded driver per shard
            aeron_dir = f"{default_aeron_dir()}-shard{shard}"
        engine = self.engine
        if c.cores:
            engine = rep(engine, pin=c.cores[shard % len(c.cores)])
        return rep(self, sources=src, sinks=snk, engine=engine,
                   control=rep(self.control, endpoint=f(self.control.endpoint)),
                   metrics=rep(self.metrics, endpoint=f(self.metrics.endpoint)),
                   output=rep(self.output, dir=f(self.output.dir)),
                   aeron=rep(self.aeron, dir=aeron_dir), cluster=rep(c, shard=shard))

    @property
    def owned_instruments(self) -> list[str]:
        """Return the listed instruments this shard owns (all of them when not sharded)."""
        c = self.cluster
        if c.shards == 1:
            return list(self.instruments)
        return c.partition.owned(self.instruments, c.shard)

    @property
    def tick_topics(self) -> list[str]:
        """Return the topic prefixes of the ZeroMQ tick source.

        A shard with a fixed table (``max_instruments = 0``) and the default ``[""]``
        subscribes to the symbols it owns: the publisher's topic filter then sends it
        only those (a longer symbol sharing a prefix still arrives, and is skipped).
        """
        z = self.effective_sources.zmq
        topics = list(z.subscribe) if z is not None else [""]
        if self.cluster.shards > 1 and topics == [""] and not self.max_instruments:
            return self.owned_instruments
        return topics

    @property
    def instrument_slots(self) -> int:
        """Return the number of instrument slots (state rows) the service allocates."""
        return max(self.max_instruments, len(self.owned_instruments), 1)

    @property
    def effective_sources(self) -> SourcesConfig:
        """Return ``sources`` or, when the table is absent, the default ZeroMQ source."""
        return self.sources if self.sources is not None else SourcesConfig(zmq=ZmqSourceConfig())

    @property
    def effective_sinks(self) -> SinksConfig:
        """Return ``sinks`` or, when the table is absent, the default ZeroMQ sink."""
        return self.sinks if self.sinks is not None else SinksConfig(zmq=ZmqSinkConfig())

    @property
    def uses_aeron(self) -> bool:
        """Return whether any source or sink is an Aeron one (the driver is needed)."""
        return self.effective_sources.aeron is not None or self.effective_sinks.aeron is not None

    @property
    def pin_core(self) -> int | None:
        """Return the hot core, or None when unpinned."""
        return None if self.engine.pin == "none" else int(self.engine.pin)

    @property
    def aeron_dir(self) -> str:
        """Return the Aeron directory the service uses (resolving the "" default)."""
        if self.aeron.dir:
            return self.aeron.dir
        if self.aeron.embedded:
            return default_aeron_dir()
        import pyaeron  # deferred: loads the Aeron C client, only where Aeron is used

        return pyaeron.default_path()


def default_aeron_dir() -> str:
    """Return the default directory of the embedded driver: /dev/shm/tickscore-aeron-USER."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"tickscore-aeron-{user}")


# ------------------------------------------------------------------------------------ decoding

_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`")


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for m in re.finditer(r"\.([^.\[]+)|\[(\d+)\]", path):
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    return parts


def _dotted(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _lookup(raw: Any, parts: list[str | int]) -> tuple[bool, Any]:
    cur = raw
    for p in parts:
        try:
            cur = cur[p]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, cur


def _struct_for(parts: list[str | int]) -> type | None:
    """Return the struct type at a key path of ServiceConfig (for listing valid keys)."""
    cur: Any = ServiceConfig
    for p in parts:
        if isinstance(p, int):
            return None
        hints = typing.get_type_hints(cur, include_extras=True)
        t = hints.get(p)
        if t is None:
            return None
        args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        nxt = next((a for a in args if isinstance(a, type) and issubclass(a, msgspec.Struct)), None)
        if nxt is None:
            return None
        cur = nxt
    return cur


def _choices(parts: list[str | int]) -> list[str] | None:
    """Return the allowed strings of a Literal-typed key, or None."""
    if not parts or isinstance(parts[-1], int):
        return None
    struct = _struct_for(parts[:-1])
    if struct is None:
        return None
    t = typing.get_type_hints(struct, include_extras=True).get(parts[-1])
    out: list[str] = []
    for a in (t,) if typing.get_origin(t) is Literal else typing.get_args(t):
        if typing.get_origin(a) is Literal:
            out.extend(str(x) for x in typing.get_args(a))
        elif a is not type(None) and typing.get_origin(a) is Annotated:
            out.append("a number")
    return out or None


def _format_error(exc: msgspec.ValidationError, raw: dict, source: str) -> str:
    msg = str(exc)
    m = _PATH_RE.search(msg)
    parts = _split_path(m.group("path")) if m else []
    detail = msg[: m.start()] if m else msg
    u = _UNKNOWN_RE.match(detail)
    if u:
        key = _dotted([*parts, u.group("field")])
        struct = _struct_for(parts)
        valid = f" (valid keys here: {', '.join(struct.__struct_fields__)})" if struct else ""
        return f"{source}: unknown key {key!r}{valid}"
    # __post_init__ checks say "FIELD = VALUE: why"; attach the field to the struct's path.
    f = re.match(r"^(\w+) = ", detail)
    if f and _struct_for(parts) is not None and f.group(1) in _struct_for(parts).__struct_fields__:
        return f"{source}: {_dotted([*parts, f.group(1)])}{detail[len(f.group(1)):]}"
    if detail.startswith("Invalid enum value"):
        choices = _choices(parts)
        if choices:
            detail += f" (choose one of: {', '.join(choices)})"
    detail = detail[0].lower() + detail[1:] if detail else detail
    if not parts:
        return f"{source}: {detail}"
    found, value = _lookup(raw, parts)
    shown = f" = {value!r}" if found and not isinstance(value, dict) else ""
    return f"{source}: {_dotted(parts)}{shown}: {detail}"


def parse_config(raw: dict, source: str = "config") -> ServiceConfig:
    """Return the :class:`ServiceConfig` of a decoded TOML document; raise :class:`ConfigError`."""
    try:
        return msgspec.convert(raw, ServiceConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_format_error(exc, raw, source)) from None


def check_output_dir(path: str) -> None:
    """Create ``[output] dir`` and check it is writable at start-up (at stop the summary would be lost)."""
    if not path:
        return
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".tickscore-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"output.dir = {path!r}: not writable: {exc.strerror or exc}") from None


def load_config(path: str | Path | None) -> ServiceConfig:
    """Read and validate a TOML config file (``None`` = all defaults); raise :class:`ConfigError`."""
    if path is None:
        return ServiceConfig()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text (UTF-8) TOML file") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(raw, str(p))


# ------------------------------------------------------------------------------------ encoding


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: ServiceConfig) -> str:
    """Return ``cfg`` as a TOML document (effective sources/sinks spelled out)."""
    d = msgspec.to_builtins(cfg)
    d["sources"] = msgspec.to_builtins(cfg.effective_sources)
    d["sinks"] = msgspec.to_builtins(cfg.effective_sinks)
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")

    def emit(name: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if scalars or not subs:
            lines.append("")
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in subs.items():
            emit(f"{name}.{k}", v)

    for name, table in tables:
        emit(name, table)
    return "\n".join(lines) + "\n"
