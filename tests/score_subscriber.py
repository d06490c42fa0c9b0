"""Independent ZeroMQ score subscriber used by the integration tests.

Decodes with the plain ``msgpack`` package and the field order documented in the
README (not tickscore's own structs), so it doubles as a check of the docs.
Usage: python tests/score_subscriber.py ENDPOINT OUT.json [IDLE_TIMEOUT_S] [MAX_WAIT_S]
Writes a JSON report once no message arrived for IDLE_TIMEOUT_S after the first one.
"""

import json
import sys
import time

import msgpack
import zmq

SCORE_FIELDS = [
    "schema_id", "instrument", "seq", "ts_event_ns", "ts_in_ns", "ts_out_ns",
    "score", "model_version", "flags", "shard", "epoch",
]


def main() -> None:
    endpoint, out = sys.argv[1], sys.argv[2]
    idle_s = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    max_wait_s = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    print("ready", flush=True)
    seqs, topics_ok, n, versions, instruments, bad = [], True, 0, set(), {}, 0
    first_rx = None
    start = time.monotonic()
    score_min, score_max = float("inf"), float("-inf")
    while True:
        timeout_ms = int(idle_s * 1000) if first_rx is not None else 200
        if not sock.poll(timeout_ms):
            if first_rx is not None or time.monotonic() - start > max_wait_s:
                break
            continue
        topic, payload = sock.recv_multipart()
        if first_rx is None:
            first_rx = time.monotonic()
        msg = msgpack.unpackb(payload, raw=False)
        if not isinstance(msg, list) or len(msg) != len(SCORE_FIELDS) or msg[0] != 3:
            bad += 1
            continue
        rec = dict(zip(SCORE_FIELDS, msg, strict=True))
        n += 1
        seqs.append(rec["seq"])
        versions.add(rec["model_version"])
        instruments[rec["instrument"]] = instruments.get(rec["instrument"], 0) + 1
        topics_ok &= topic.decode() == rec["instrument"]
        score_min = min(score_min, rec["score"])
        score_max = max(score_max, rec["score"])
    report = {
        "count": n,
        "bad": bad,
        "first_seq": seqs[0] if seqs else None,
        "last_seq": seqs[-1] if seqs else None,
        "contiguous": seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else False,
        "topics_match_instrument": topics_ok,
        "model_versions": sorted(versions),
        "instruments": instruments,
        "score_min": score_min,
        "score_max": score_max,
    }
    with open(out, "w") as f:
        json.dump(report, f)
    sock.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
