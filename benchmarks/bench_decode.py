"""Cost of decoding one Tick: the compiled decoder vs the msgspec path of the live sources (issue 16).

Encodes ``--ticks`` quotes (3 instruments) once, then decodes them all:

* ``msgspec_ingest``: :meth:`engine.sources.TickSlot.ingest` per message, as the live sources
  do today (one Python call per message: msgspec decode, checks, symbol lookup, pack);
* ``compiled_loop``: :func:`engine.tick_decode.decode_tick` over every message inside one
  numba loop (what a native duty cycle would run; the symbol lookup is a byte compare with
  the 3 symbols);
* ``compiled_per_call``: one Python -> numba call per message (the dispatch cost included).

Each is timed ``--repeat`` times; the JSON holds the median ns per message of each and the
ratios.  ``python benchmarks/bench_decode.py --json benchmarks/results/decode.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.sources import TickSlot  # noqa: E402
from engine.tick_decode import I_SYM_LEN, I_SYM_START, decode_tick, new_outputs  # noqa: E402

SYMBOLS = ["CLF7", "ESZ6", "NQZ6"]
MAX_EVENT_NS = 2**62


@njit(cache=True, nogil=True, _nrt=False)
def _decode_all(buf, offsets, syms, out_i, out_f, insts):
    """Decode every message; return how many were accepted (symbol found by byte compare)."""
    ok = 0
    for m in range(offsets.shape[0] - 1):
        a, b = offsets[m], offsets[m + 1]
        r = decode_tick(buf[a:b], b - a, MAX_EVENT_NS, out_i, out_f)
        if r:
            continue
        s0, sl = a + out_i[I_SYM_START], out_i[I_SYM_LEN]
        inst = -1
        for k in range(syms.shape[0]):
            if sl == 4 and buf[s0] == syms[k, 0] and buf[s0 + 1] == syms[k, 1] and \
                    buf[s0 + 2] == syms[k, 2] and buf[s0 + 3] == syms[k, 3]:
                inst = k
                break
        if inst >= 0:
            insts[m] = inst
            ok += 1
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = args.ticks
    msgs = []
    for i in range(n):
        sym = SYMBOLS[i % 3]
        bid = 100.0 + (i % 7) * 0.25
        ts = 1_700_000_000_000_000_000 + i * 1_000
        msgs.append(msgpack.packb([1, 1, sym, ts, ts + 5, bid, 5.0, bid + 0.25, 7.0, 0.0, 0.0, 0, 0]))
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(m) for m in msgs])
    buf = np.frombuffer(b"".join(msgs), np.uint8)
    syms = np.array([list(s.encode()) for s in SYMBOLS], np.uint8)
    out_i, out_f = new_outputs()
    insts = np.zeros(n, np.int64)
    _decode_all(buf, offsets[:3], syms, out_i, out_f, insts)  # compile
    slot = TickSlot(SYMBOLS)
    slot.max_event_ns = MAX_EVENT_NS
    ingest = slot.ingest
    res: dict[str, list[float]] = {"msgspec_ingest": [], "compiled_loop": [], "compiled_per_call": []}
    clock = time.perf_counter_ns
    for _ in range(args.repeat):
        t0 = clock()
        for m in msgs:
            ingest(m)
        res["msgspec_ingest"].append((clock() - t0) / n)
        t0 = clock()
        ok = _decode_all(buf, offsets, syms, out_i, out_f, insts)
        res["compiled_loop"].append((clock() - t0) / n)
        assert ok == n
        t0 = clock()
        for m in range(n):
            a, b = offsets[m], offsets[m + 1]
            decode_tick(buf[a:b], b - a, MAX_EVENT_NS, out_i, out_f)
        res["compiled_per_call"].append((clock() - t0) / n)
    med = {k: float(np.median(v)) for k, v in res.items()}
    doc = {"benchmark": "bench_decode", "ticks": n, "repeat": args.repeat,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "ns_per_message_median": med, "runs_ns_per_message": res,
           "ratio_msgspec_over_compiled_loop": med["msgspec_ingest"] / med["compiled_loop"]}
    for k, v in med.items():
        print(f"{k:<18} {v:8.1f} ns/message (median of {args.repeat})", file=sys.stderr)
    print(f"msgspec path / compiled loop: {doc['ratio_msgspec_over_compiled_loop']:.1f}x", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
