"""``tickscore publish``: send a market file's ticks to a running service, paced.

The counterpart of ``tickscore subscribe``: ticks leave in the documented
``Tick`` wire format (README, "Wire format"), over ZeroMQ (two frames, topic =
symbol) or Aeron (stream 1001 by default), at a chosen pace.  The same code is
the publisher process of ``tickscore replay --via``.

    tickscore publish                                        # embedded data -> ipc:///tmp/tickscore-ticks.ipc
    tickscore publish tcp://127.0.0.1:5555 --data day.parquet --rate 5000
    tickscore publish aeron:ipc --speed 1 --limit 100000     # the service's embedded driver, stream 1001
    tickscore publish ipc:///tmp/t.ipc --data q.csv.gz --map kind==quote,ts_event=timestamp,...

Event times are rebased to now, keeping their differences, so a file can be
sent to a running service again and again without its ticks being rejected as
``time_backwards``; ``--keep-times`` sends them as recorded.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

import numpy as np
import zmq

from engine.log import ProgressLine
from engine.partition import Partition
from engine.security import ClientKeys, apply_client
from engine.wire import Tick, encode_tick
from engine.zmq_io import ensure_ipc_free, raw_send
from features.featureset import get_feature_set
from replay.inputs import default_model_for_shape
from replay.mapping import mapping_from_cli
from replay.reader import iter_tick_chunks, resolve_shape

__all__ = [
    "publish_ticks", "first_event_after", "check_service_shape", "open_for_wire", "intended_times",
    "parse_rate", "pin_self",
]


def pin_self(cpus: list[int] | None) -> str:
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    try:
        os.sched_setaffinity(0, set(cpus))
    except OSError as exc:
        return f"pinning refused: {exc}"
    return f"pinned to {sorted(cpus)}"


def _timer_slack_1ns() -> bool:
    """Ask for 1 ns timer slack (default 50 us) so sleeps end on time; False if refused."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0) == 0  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        return False


def parse_rate(text: str) -> float | None:
    if text.strip().lower() in ("max", "inf"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate takes ticks per second or 'max', got {text!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"--rate must be positive, got {text!r}")
    return v


def intended_times(
    ts_event: np.ndarray, start_ns: int, *, speed: float | None, rate: float | None,
    ts0: int | None = None, first_index: int = 0,
) -> np.ndarray:
    """Return the intended send time (ns, CLOCK_MONOTONIC) of every tick; zeros = as fast as possible.

    ``ts0`` (default the first tick's time) and ``first_index`` place a chunk of
    a longer file on the whole file's schedule.
    """
    n = len(ts_event)
    if speed is not None:
        t0 = int(ts_event[0]) if ts0 is None else int(ts0)
        rel = (ts_event.astype(np.int64) - t0).astype(np.float64) / speed
        return start_ns + rel.astype(np.int64)
    if rate is not None:
        idx = np.arange(first_index, first_index + n, dtype=np.float64)
        return start_ns + (idx * (1e9 / rate)).astype(np.int64)
    return np.zeros(n, dtype=np.int64)


#: Rows per chunk the publisher reads, encodes and sends at a time (bounded memory).
WIRE_CHUNK_ROWS = 250_000


def open_for_wire(path: str, map_items, map_file, shape, sort_by_exchange_time: bool,
                  chunk_rows: int = WIRE_CHUNK_ROWS):
    """Open ``path`` for sending as the replay flags say (``--map``, ``--map-file``, ``--shape``, sort).

    Returns a :class:`replay.reader.TickChunks` (``.shape``, ``.symbols``,
    ``.total_rows``): the file is read chunk by chunk, in bounded memory, as the
    in-process replay reads big files.  The shape is found exactly as the replay
    finds it (``--shape``, the mapping's ``shape``, else detected from the
    file); every shape travels in the ``Tick`` wire format (book events as kinds
    3/4/5 with their order id, fills as kind 2 with the resting order's id).
    """
    mapping = mapping_from_cli(map_items, map_file, shape)
    return iter_tick_chunks(path, chunk_rows, mapping=mapping, shape=resolve_shape(path, mapping, shape),
                            sort_by_exchange_time=sort_by_exchange_time)  # fmt: skip


def _no_ticks_error(path: str, chunks) -> ValueError:
    why = ", ".join(f"{k} {v:,}" for k, v in chunks.rejected.items() if v) or "the file is empty"
    return ValueError(f"{path}: no acceptable ticks to send (rejected: {why})")


def first_ticks_for_wire(path: str, map_items, map_file, shape, sort_by_exchange_time: bool,
                         chunk_rows: int | None = None):
    """Return ``(TickChunks, its iterator, first non-empty chunk of ticks)``; ValueError if none."""
    chunks = open_for_wire(path, map_items, map_file, shape, sort_by_exchange_time,
                           chunk_rows or WIRE_CHUNK_ROWS)  # fmt: skip
    it = iter(chunks)
    for ch in it:
        if len(ch.ticks):
            return chunks, it, ch.ticks
    raise _no_ticks_error(path, chunks)


def check_service_shape(status: dict | None, shape: str, command: str) -> None:
    """Refuse (ValueError) a file of ``shape`` the running service's kernels cannot consume; warn
    when they compute only part of its features from it.  ``status``: the service's ``status``."""
    fs_id = (status or {}).get("feature_set")
    if not fs_id:
        return

    fs = get_feature_set(fs_id)
    missing = fs.unavailable(shape)
    if len(missing) == len(fs.names):
        raise ValueError(
            f"{command}: the file is a {shape!r} file but the service scores feature set {fs_id}, whose "
            f"kernels cannot consume {shape!r} events; start the service with a model of that shape "
            f"([model] path = {default_model_for_shape(shape)})"
        )
    if missing:
        print(f"{command}: warning: the service's feature set {fs_id} cannot compute {len(missing)} of "
              f"its features from a {shape!r} file ({', '.join(missing)}): they stay neutral and the "
              f"scores are flagged", file=sys.stderr)  # fmt: skip


def first_event_after(status: dict | None) -> int:
    """Return the earliest event time (ns) to rebase ticks to for a service reporting ``status``.

    The service rejects an instrument's tick older than its last one (``time_backwards``);
    starting 1 s after the last event time it accepted keeps every sent tick newer.
    """
    return int((status or {}).get("last_event_ns") or 0) + 1_000_000_000


def _encode_chunk(ticks: np.ndarray, symbols: list[str], topics: list[bytes], shift: int):
    """Return (payloads, topics, rebased ts_event) of a chunk: Tick messages of the wire format."""
    ts_event = ticks["ts_event_ns"].astype(np.int64) + shift
    ev, rv = ts_event.tolist(), (ticks["ts_recv_ns"].astype(np.int64) + shift).tolist()
    cols = [ticks[c].tolist() for c in ("kind", "instrument", "bid_px", "bid_sz", "ask_px", "ask_sz",
                                        "price", "size", "side", "order_id")]
    payloads, tp = [], []
    for i in range(len(ticks)):
        k, inst, bp, bs, ap, az, p, s, side, oid = (c[i] for c in cols)
        payloads.append(encode_tick(Tick(k, symbols[inst], ev[i], rv[i], bp, bs, ap, az, p, s, side, oid)))
        tp.append(topics[inst])
    return payloads, tp, ts_event


def _open_xpub(ctx, target: dict, spec: dict):
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 5000)
    if target.get("expect"):
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscriptions, duplicates too
    apply_client(sock, ClientKeys.from_text(spec.get("curve")))  # a CURVE service
    if target["bind"]:
        ensure_ipc_free(target["endpoint"])
        sock.bind(target["endpoint"])
    else:
        sock.connect(target["endpoint"])
    return sock


def _await_subscribers(sock, target: dict, spec: dict) -> None:
    """Wait for the service's SUB subscription (else the first ticks are lost).

    ``target["expect"]``: the topics every shard subscribes to (a list with repeats); all
    of them must have arrived, so no shard misses the first ticks of a publish-once.
    """
    timeout_s = spec.get("connect_timeout_s", 30)
    want = list(target.get("expect") or [])
    deadline = time.monotonic() + timeout_s
    first = True
    while first or want:
        left = int((deadline - time.monotonic()) * 1000)
        if left <= 0 or not sock.poll(left):
            what = f"{len(want)} shard subscriptions still missing ({', '.join(want[:6])})" if not first \
                else "no service subscribed to the ticks"
            raise TimeoutError(f"{what} on {target['endpoint']} within {timeout_s} s "
                               f"(is it running, and bound there?)")
        msg = sock.recv()
        first = False
        if msg[:1] == b"\x01" and msg[1:].decode(errors="replace") in want:
            want.remove(msg[1:].decode())


def publish_ticks(spec: dict, on_ready=None, progress_s: float = 0.0) -> dict:
    """Send a file's ticks as ``spec`` says; return what was sent and when.

    ``spec`` keys: ``data`` and the reading options of :func:`open_for_wire`
    (``map``, ``map_file``, ``shape``, ``sort_by_exchange_time``), ``limit``; ``via``
    (``zmq``: ``endpoint``, ``bind``; ``aeron``: ``aeron_dir``, ``channel``, ``stream_id``;
    a cluster: ``zmq_targets`` (``endpoint``, ``bind``, ``expect``) or ``aeron_channels``, one
    per shard, and ``route`` (``[shards, partitions]``: each tick goes to the target of its
    instrument's shard), see :func:`cluster_targets`),
    ``connect_timeout_s``; pace ``speed`` (x recorded) or ``rate`` (ticks/s), neither =
    back to back; ``sleep_margin_us``, ``rt_priority``, ``cpus``; event times rebased
    to now (after ``min_event_ns``) unless ``keep_times``.

    The file is read, encoded and sent one chunk at a time (bounded memory: a
    chunk's messages plus four integers per tick for the timing record).
    ``on_ready()`` is called once connected, just before the first send.  With
    ``progress_s`` > 0 a progress line (:class:`engine.log.ProgressLine`, as replay's) goes
    to stderr at most every ``progress_s`` seconds.
    Raises ``TimeoutError`` when no service takes the ticks within the connect timeout.
    Ctrl-C or SIGTERM (a ``KeyboardInterrupt``) while sending stops it: the sockets still
    close with their linger, the result covers the ticks sent, and ``interrupt`` holds the
    exception for the caller to re-raise once it has reported them (else None).
    """
    pin = pin_self(spec.get("cpus"))
    chunks, rest, ticks = first_ticks_for_wire(spec["data"], spec.get("map"), spec.get("map_file"),
                                               spec.get("shape"), bool(spec.get("sort_by_exchange_time")),
                                               spec.get("chunk_rows"))  # fmt: skip
    limit = spec.get("limit")
    total = chunks.total_rows if limit is None else min(int(limit), chunks.total_rows)
    symbols = chunks.symbols
    topics = [s.encode() for s in symbols]
    ts0 = int(ticks["ts_event_ns"][0])
    # keep event-time differences, start at "now" and after whatever the service saw last
    base = ts0 if spec.get("keep_times") else max(time.time_ns(), int(spec.get("min_event_ns", 0)))
    shift = base - ts0

    via = spec["via"]
    # a cluster: ``route`` maps each symbol to the target (shard) that gets its ticks
    route = Partition(*spec["route"]) if spec.get("route") else None
    dest_of = np.asarray([route.shard_of(s) if route else 0 for s in symbols], dtype=np.int64)
    if via == "zmq":
        ctx = zmq.Context(io_threads=1)
        targets = spec.get("zmq_targets") or [{"endpoint": spec["endpoint"], "bind": spec["bind"]}]
        socks = []
        try:
            for tg in targets:
                socks.append(_open_xpub(ctx, tg, spec))
            for tg, sock in zip(targets, socks, strict=True):
                _await_subscribers(sock, tg, spec)
        except BaseException:
            for sock in socks:
                sock.close(0)
            ctx.term()
            raise
        time.sleep(0.05)
        more, flags_last = zmq.SNDMORE, 0
        sends = [raw_send(sock) for sock in socks]

        def send(topic: bytes, payload: bytes, d: int = 0) -> int:
            sendz = sends[d]
            sendz(topic, more)
            sendz(payload, flags_last)
            return 0
    else:
        # deferred: loads the Aeron C client, only where Aeron is used
        from engine.aeron_io import connect_client

        aeron = connect_client(spec["aeron_dir"], on_error=lambda c, m: print(f"publisher: aeron {m}",
                                                                              file=sys.stderr))
        offers = []
        for channel in spec.get("aeron_channels") or [spec["channel"]]:
            pub = aeron.add_exclusive_publication(channel, spec["stream_id"])
            try:
                pub.await_connected(timeout=spec.get("connect_timeout_s", 30))
            except Exception as exc:  # noqa: BLE001 - pyaeron raises its own error types
                aeron.close()
                raise TimeoutError(f"no service subscribed to {channel} stream {spec['stream_id']} "
                                   f"within {spec.get('connect_timeout_s', 30)} s: {exc}") from None
            offers.append(pub.offer)

        def send(topic: bytes, p: bytes, d: int = 0) -> int:
            offer = offers[d]
            retries = 0
            while offer(p) is not True:  # back-pressured / not connected: retry, time keeps running
                retries += 1
                if retries & 1023 == 0:
                    os.sched_yield()
                if retries > 50_000_000:
                    raise RuntimeError("publisher: offer kept failing")
            return retries

    if on_ready is not None:
        on_ready()
    slack = _timer_slack_1ns()
    sched, fifo = "default scheduler", False
    rt = int(spec.get("rt_priority") or 0)
    margin = int(spec.get("sleep_margin_us", 150) * 1000)
    speed, rate = spec.get("speed"), spec.get("rate")
    paced = speed is not None or rate is not None
    clock = time.perf_counter_ns
    start = clock() + 20_000_000
    first = intended_times(ticks["ts_event_ns"], start, speed=speed, rate=rate)
    if rt and paced and len(first) > 1 and float(np.median(np.diff(first))) < 2 * margin:
        # ticks closer than twice the spin margin: a FIFO thread would spin without a
        # break and starve the core's other threads (subscriber, I/O, Aeron conductors)
        sched = f"SCHED_FIFO {rt} not used: ticks are closer than 2 x the sleep margin"
    elif rt and paced:
        # this thread only (the I/O / conductor threads were created before): it sleeps
        # between ticks, and wakes up on time even when the subscriber spins on its core
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(rt))
            sched, fifo = f"SCHED_FIFO {rt}", True
        except (OSError, AttributeError) as exc:
            sched = f"SCHED_FIFO {rt} refused ({exc}); default scheduler"
    rec: dict[str, list[np.ndarray]] = {"intended": [], "sent_ns": [], "ts_event": [], "inst": []}
    retries_total = 0
    n = 0
    interrupt = None
    t_start = clock()
    line = ProgressLine("publish", "ticks", total, progress_s) if progress_s > 0 else None
    if line is not None:
        line.start(t_start)
    try:
        while ticks is not None and (limit is None or n < limit):
            if limit is not None:
                ticks = ticks[: limit - n]
            payloads, tp, ts_event = _encode_chunk(ticks, symbols, topics, shift)
            dest = dest_of[ticks["instrument"]].tolist()
            m = len(payloads)
            due = intended_times(ticks["ts_event_ns"], start, speed=speed, rate=rate, ts0=ts0, first_index=n)
            due_l = due.tolist()
            sent = np.zeros(m, dtype=np.int64)
            k = 0  # ticks of this chunk sent (all of them unless Ctrl-C / SIGTERM stops the loop)
            gc.collect()
            gc.disable()  # no collector pauses while sending
            try:
                for i in range(m):
                    if line is not None and not i & 1023:
                        line.show(n + i, clock())
                    if paced:
                        d = due_l[i]
                        while True:
                            now = clock()
                            if now >= d:
                                break
                            if d - now > margin:  # sleep, waking `margin` early; spin the rest
                                time.sleep((d - now - margin) / 1e9)
                            # no sched_yield here: under CFS/EEVDF it can hand the core to the (lowest
                            # priority) subscriber for a whole scheduler tick
                    else:
                        now = clock()
                    sent[i] = now
                    retries_total += send(tp[i], payloads[i], dest[i])
                    k = i + 1
            finally:  # the record of what was sent, also when the loop is stopped
                gc.enable()
                rec["intended"].append((due if paced else sent)[:k])
                rec["sent_ns"].append(sent[:k])
                rec["ts_event"].append(ts_event[:k])
                rec["inst"].append(ticks["instrument"][:k].astype(np.int32))
                n += k
            ticks = next((ch.ticks for ch in rest if len(ch.ticks)), None)  # the next chunk
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: stop sending; what was sent is returned
        interrupt = exc
    if line is not None:
        line.finish()
    if fifo:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    wall_s = (clock() - t_start) / 1e9
    time.sleep(0.2)
    if via == "zmq":
        for sock in socks:
            sock.close()  # linger: queued ticks are still delivered
        ctx.term()
    else:
        aeron.close()
    return {"sent": n, "interrupt": interrupt, "retries": retries_total, "pin": pin, "timer_slack_1ns": slack,
            "sleep_margin_us": margin / 1000, "scheduler": sched, "wall_s": wall_s,
            "symbols": symbols, "reader_rejected": {k: v for k, v in chunks.rejected.items() if v},
            **{k: np.concatenate(v) for k, v in rec.items()}}


def cluster_targets(cfg, via: str) -> dict:
    """Return the ``publish_ticks`` spec entries that send ``symbols`` to the shards of ``cfg``.

    * **once**: every shard's ZeroMQ source connects to one endpoint (``bind = false``):
      the publisher binds it and waits until every shard has subscribed; ZeroMQ's topic
      filter gives each shard its instruments (a shard skips any other that reaches it).
      Over Aeron, one channel for all shards: each receives every tick and skips others'.
    * **routed**: each shard binds its own ZeroMQ endpoint, or listens on its own Aeron
      channel: one connection per shard, and each tick goes to its instrument's shard
      only (the partition function of :mod:`engine.partition`).
    """
    c = cfg.cluster
    shards = [cfg.for_shard(k) for k in range(c.shards)]
    route = [c.shards, [list(p) for p in c.partitions]]  # Partition(*route), in publish_ticks
    if via == "zmq":
        zs = [sc.effective_sources.zmq for sc in shards]
        if any(z is None for z in zs):
            raise ValueError("the cluster's shards have no ZeroMQ tick source ([sources.zmq])")
        eps = [z.endpoint for z in zs]
        if len(set(eps)) == 1 and not zs[0].bind:
            expect = [t for sc in shards for t in sc.tick_topics]
            return {"mode": "once", "endpoint": eps[0], "route": None,
                    "zmq_targets": [{"endpoint": eps[0], "bind": True, "expect": expect}]}
        if len(set(eps)) == len(eps) and all(z.bind for z in zs):
            return {"mode": "routed", "endpoint": ", ".join(eps), "route": route,
                    "zmq_targets": [{"endpoint": e, "bind": False} for e in eps]}
        raise ValueError("[sources.zmq] of a cluster: either bind = false on one endpoint (the publisher "
                         "binds it, publish once) or bind = true on an endpoint per shard ({shard})")
    chans = [sc.effective_sources.aeron.channel if sc.effective_sources.aeron else None for sc in shards]
    if any(ch is None for ch in chans):
        raise ValueError("the cluster's shards have no Aeron tick source ([sources.aeron])")
    if len(set(chans)) == 1:
        return {"mode": "once", "channel": chans[0], "route": None, "aeron_channels": chans[:1]}
    return {"mode": "routed", "channel": ", ".join(chans), "route": route, "aeron_channels": chans}
