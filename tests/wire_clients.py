"""Independent tick publisher and score subscriber for the service tests (separate processes).

Encodes Ticks and decodes Scores with the plain ``msgpack`` package and the
layouts documented in the README (never tickscore's own structs), so the tests
also prove the documentation is right.

    python tests/wire_clients.py publish   SPEC.json
    python tests/wire_clients.py subscribe SPEC.json

SPEC keys: ``via`` (zmq|aeron); zmq: ``endpoint``; aeron: ``channel``,
``stream_id``, ``aeron_dir`` or ``embedded`` (own driver, for UDP).
publish: ``n``, ``first`` (index of the first tick; sets its times), ``rate``
(ticks/s, 0 = back to back), ``garbage`` (send the malformed set first),
``symbols``, ``curve`` ([public, secret, server public] Z85: a CURVE client).
subscribe: ``out`` (JSON report), ``expect`` (stop after),
``idle_s`` (stop after this long without a score once one arrived), ``max_s``.
Prints ``ready`` once connected.
"""

import json
import math
import sys
import time

import msgpack

SCORE_FIELDS = [
    "schema_id", "instrument", "seq", "ts_event_ns", "ts_in_ns", "ts_out_ns",
    "score", "model_version", "flags", "shard", "epoch",
]
SCORE_TYPES = [int, str, int, int, int, int, float, str, int, int, int]
BASE_NS = 1_750_000_000_000_000_000  # mid 2025: in the past (the service bounds future times)


def _curve(sock, spec: dict) -> None:
    """CURVE client keys from ``spec["curve"]`` = [public, secret, server public] (Z85 text)."""
    if spec.get("curve"):
        pub, sec, srv = (k.encode() for k in spec["curve"])
        sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, srv


def tick(i: int, symbols: list[str]) -> bytes:
    """Return tick ``i`` as documented: 13-element array, schema id 1 first."""
    sym = symbols[i % len(symbols)]
    ts = BASE_NS + i * 1_000
    if i % 4 == 3:  # a trade
        return msgpack.packb([1, 2, sym, ts, ts + 5, 0.0, 0.0, 0.0, 0.0, 100.25, 2.0, 1, 0])
    bid = 100.0 + (i % 7) * 0.25
    return msgpack.packb([1, 1, sym, ts, ts + 5, bid, 5.0, bid + 0.25, 7, 0.0, 0.0, 0, 0])


def garbage(symbols: list[str]) -> list[list[bytes]]:
    """Return the malformed messages (as frame lists) and what each must count as."""
    ts = BASE_NS - 10_000_000
    s = symbols[0]
    msgs = [
        [s.encode(), b"\xc1 not msgpack"],                                           # undecodable
        [s.encode(), msgpack.packb([1, 1, s, ts, ts, 1.0, 1.0, 2.0])],               # too short
        [s.encode(), msgpack.packb([1, 1, s, ts, ts, 1.0, 1.0, 2.0, 1.0, 0, 0, 0, 0, 99])],  # too long
        [s.encode(), msgpack.packb([1, 1, s, "ts", ts, 1.0, 1.0, 2.0, 1.0, 0, 0, 0, 0])],    # str time
        [s.encode(), msgpack.packb([1, 1, s, ts, ts, "100", 1.0, 2.0, 1.0, 0, 0, 0, 0])],    # str price
        [s.encode(), msgpack.packb([2, 1, s, ts, ts, 1.0, 1.0, 2.0, 1.0, 0, 0, 0, 0])],      # schema id 2
        [s.encode(), msgpack.packb({"kind": 1, "instrument": s})],                   # a map
        [s.encode(), msgpack.packb([1, 300, s, ts, ts, 1.0, 1.0, 2.0, 1.0, 0, 0, 0, 0])],    # kind > 255
        [s.encode()],                                                                # one frame
        [s.encode(), msgpack.packb([1, 1, s, ts, ts, 1.0, 1.0, 2.0, 1.0, 0, 0, 0, 0]), b"x"],  # 3 frames
        [s.encode(), msgpack.packb([1, 1, s, ts, ts, math.nan, 1.0, 2.0, 1.0, 0, 0, 0, 0])],  # NaN
        [b"ZZZZ", msgpack.packb([1, 1, "ZZZZ", ts, ts, 1.0, 1.0, 2.0, 1.0, 0, 0, 0, 0])],   # unknown
    ]
    return msgs


#: What :func:`garbage` must produce in the service's reject counters.
GARBAGE_EXPECTED = {"malformed": 10, "nonfinite": 1, "unknown_instrument": 1}
#: The same messages over Aeron (payload only: the frame-count cases do not apply).
GARBAGE_EXPECTED_AERON = {"malformed": 8, "nonfinite": 1, "unknown_instrument": 1}


def _aeron(spec):
    import pyaeron

    if spec.get("embedded"):
        return pyaeron.Aeron(embedded=True)
    ctx = pyaeron.Context(dir=spec["aeron_dir"], error_handler=lambda code, msg: None)
    return pyaeron.Aeron(context=ctx)


def publish(spec: dict) -> None:
    symbols = spec.get("symbols", ["CLF7", "ESZ6", "NQZ6"])
    n, first, rate = spec["n"], spec.get("first", 0), spec.get("rate", 0)
    if spec["via"] == "zmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 5000)
        _curve(sock, spec)
        sock.connect(spec["endpoint"])
        assert sock.poll(30_000), "the service did not subscribe"
        sock.recv()
        time.sleep(0.05)

        def send(frames):
            sock.send_multipart(frames)
    else:
        aeron = _aeron(spec)
        pub = aeron.add_exclusive_publication(spec["channel"], spec["stream_id"])
        pub.await_connected(timeout=30)

        def send(frames):
            if len(frames) != 2:
                return
            while pub.offer(frames[1]) is not True:
                time.sleep(0)
    print("ready", flush=True)
    if spec.get("garbage"):
        for frames in garbage(symbols):
            send(frames)
    t0 = time.monotonic()
    for i in range(first, first + n):
        if rate:
            due = t0 + (i - first) / rate
            while time.monotonic() < due:
                time.sleep(0.0002)
        send([symbols[i % len(symbols)].encode(), tick(i, symbols)])
    time.sleep(0.5)
    if spec["via"] == "zmq":
        sock.close()
        ctx.term()
    else:
        aeron.close()


def subscribe(spec: dict) -> None:
    expect = spec.get("expect", 0)
    idle_s, max_s = spec.get("idle_s", 3.0), spec.get("max_s", 120.0)
    seqs, bad, versions, instruments = [], [], set(), {}
    topics_ok = True
    scores_ok = True

    def on_payload(payload: bytes, topic: bytes | None):
        nonlocal topics_ok, scores_ok
        msg = msgpack.unpackb(payload, raw=False)
        if (not isinstance(msg, list) or len(msg) != 11 or msg[0] != 3
                or not all(type(v) is t for v, t in zip(msg, SCORE_TYPES, strict=True))):
            bad.append(repr(msg)[:200])
            return
        # the score is float 64 on the wire (0xcb + 8 bytes), as documented
        scores_ok &= payload.count(b"\xcb") >= 1 and 0.0 <= msg[6] <= 1.0
        rec = dict(zip(SCORE_FIELDS, msg, strict=True))
        seqs.append(rec["seq"])
        versions.add(rec["model_version"])
        instruments[rec["instrument"]] = instruments.get(rec["instrument"], 0) + 1
        if topic is not None:
            topics_ok &= topic.decode() == rec["instrument"]

    start = time.monotonic()
    last = None
    if spec["via"] == "zmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        _curve(sock, spec)
        sock.connect(spec["endpoint"])
        print("ready", flush=True)
        while not expect or len(seqs) + len(bad) < expect:
            if sock.poll(100):
                frames = sock.recv_multipart()
                last = time.monotonic()
                if len(frames) != 2:
                    bad.append(f"{len(frames)} frames")
                    continue
                on_payload(frames[1], frames[0])
            elif (last and time.monotonic() - last > idle_s) or time.monotonic() - start > max_s:
                break
        sock.close(0)
        ctx.term()
    else:
        aeron = _aeron(spec)
        sub = aeron.add_subscription(spec["channel"], spec["stream_id"])
        if not spec.get("embedded"):
            sub.await_connected(timeout=30)
        print("ready", flush=True)

        def handler(buf, header):
            on_payload(bytes(buf), None)

        while not expect or len(seqs) + len(bad) < expect:
            if sub.poll(handler, 100):
                last = time.monotonic()
            else:
                time.sleep(0.0005)
                if (last and time.monotonic() - last > idle_s) or time.monotonic() - start > max_s:
                    break
        aeron.close()
    report = {
        "count": len(seqs),
        "bad": bad,
        "seqs_sorted_contiguous": bool(seqs) and sorted(seqs) == list(range(min(seqs or [0]),
                                                                            min(seqs or [0]) + len(seqs))),
        "in_order": seqs == sorted(seqs),
        "first_seq": min(seqs) if seqs else None,
        "last_seq": max(seqs) if seqs else None,
        "model_versions": sorted(versions),
        "instruments": instruments,
        "topics_match_instrument": topics_ok,
        "scores_ok": scores_ok,
    }
    with open(spec["out"], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    role, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        spec = json.load(f)
    (publish if role == "publish" else subscribe)(spec)
