"""The C and Java decoders of ``engine/examples`` (and the C subscriber) against the wire format.

The README promises that a subscriber in C, C++ or Java can decode Scores from its
wire-format table alone. ``score_sub.c`` and ``ScoreDecoder.java`` are such decoders
(no MessagePack library); these tests compile them with the machine's C compiler
(under AddressSanitizer and UBSan, so an out-of-bounds read fails the test) and JDK,
and hold both to a reference written from the README's table with the plain
``msgpack`` package: the same accept/reject decision and the same values on
tickscore's own payloads, every truncation of them, random byte changes and hand-made
wrong ones. Then the C subscriber, linked to pyzmq's libzmq, receives a replay over
ipc and must see every Score the replay recorded, bit for bit.
"""

from __future__ import annotations

import math
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import msgspec
import numpy as np
import pytest
import zmq

from engine.native_zmq import libzmq_path
from engine.wire import Score, ScoreEncoder, ScoreV1, decode_score
from replay.scores import SCORES_FILE, read_scores

EXAMPLES = Path(__file__).resolve().parents[1] / "engine" / "examples"
SRC = EXAMPLES / "score_sub.c"
CC = shutil.which("cc") or shutil.which("gcc")
JAVAC, JAVA = shutil.which("javac"), shutil.which("java")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on this machine")
FLAGS = ["-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fno-omit-frame-pointer"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def _compile(out: Path, *extra: str, libs: tuple[str, ...] = ()) -> Path:
    cmd = [CC, *FLAGS, *extra, str(SRC), *libs, "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module", params=["c", "java"])
def decoder(request, tmp_path_factory) -> list[str]:
    """The command of a decoder-only program: records on stdin, one line per record."""
    if request.param == "c":
        if CC is None:
            pytest.skip("no C compiler on this machine")
        return [str(_compile(tmp_path_factory.mktemp("c") / "score_decode", *SANITIZE))]
    if JAVAC is None or JAVA is None:
        pytest.skip("no JDK (javac, java) on this machine")
    out = tmp_path_factory.mktemp("java")
    cmd = [JAVAC, "-Xlint:all", "-Werror", "-d", str(out), str(EXAMPLES / "ScoreDecoder.java")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return [JAVA, "-cp", str(out), "ScoreDecoder"]


def _run_decoder(decoder: list[str], payloads: list[bytes]) -> list[str]:
    data = b"".join(struct.pack("<I", len(p)) + p for p in payloads)
    res = subprocess.run(decoder, input=data, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    lines = res.stdout.decode().splitlines()
    assert len(lines) == len(payloads)
    return lines


def _hex(s: str) -> str:
    return s.encode().hex() or "-"


def _doc_decode(payload: bytes) -> str:
    """The decoder's expected line from the README's table, read with the plain msgpack package."""
    try:
        m = msgpack.unpackb(payload, raw=False)
    except Exception:
        return "err"
    if not isinstance(m, list):
        return "err"

    def is_int(v, lo, hi):
        return type(v) is int and lo <= v <= hi

    u64, i64 = (0, 2**64 - 1), (-(2**63), 2**63 - 1)
    if not m or not is_int(m[0], 2, 3) or len(m) != (11 if m[0] == 3 else 9):
        return "err"
    schema, inst, seq, tev, tin, tout, score, version, flags, *rest = m
    shard, epoch = rest if schema == 3 else (0, 0)
    if not (type(inst) is str and type(version) is str and type(score) is float):
        return "err"
    if not all(is_int(v, *u64) for v in (seq, flags, shard, epoch)):
        return "err"
    if not all(is_int(v, *i64) for v in (tev, tin, tout)):
        return "err"
    bits = struct.unpack(">Q", struct.pack(">d", score))[0]
    return (f"ok {schema} {_hex(inst)} {seq} {tev} {tin} {tout} {bits:016x} {_hex(version)} "
            f"{flags} {shard} {epoch}")  # fmt: skip


def _scores(rng: random.Random, n: int) -> list[bytes]:
    """tickscore's own payloads over the fields' ranges (v2 by ScoreEncoder, v1 by msgspec)."""
    enc, out = ScoreEncoder(), []
    names = ["ESZ6", "BTC-USDT", "é" * 20, "x" * 40, "深圳A", "y" * 300, ""]
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1]
    scores = [0.0, -0.0, 0.5, 1.0, 1e-300, math.inf, math.nan, 0.0731]
    for k in range(n):
        inst, version = rng.choice(names), rng.choice(names[:5])
        seq, flags = rng.choice(ints), rng.choice(ints)
        times = [0, -1, -(2**63), 2**63 - 1, 1_790_000_000_123_456_789]
        t = [rng.choice([*times, rng.randrange(-(2**40), 2**40)]) for _ in range(3)]
        score = rng.choice(scores) if k % 3 else rng.random()
        if k % 4 == 0:
            out.append(msgspec.msgpack.encode(ScoreV1(inst, seq, *t, score, version, flags)))
        else:
            shard = rng.choice([0, 1, 255, 2**16])
            epoch = rng.choice([0, 2**64 - 1, 1_796_400_000_000_000_000])
            out.append(bytes(enc.encode(Score(inst, seq, *t, score, version, flags, shard, epoch))))
    # float 32 scores: MessagePack allows them, the README reference reads them, so must the decoder
    out += [msgpack.packb([3, "ESZ6", k, 1, 2, 3, rng.random(), "v", 0, 0, 0], use_single_float=True)
            for k in range(n // 20)]  # fmt: skip
    return out


def test_the_decoder_reads_tickscores_payloads_as_the_readme_table_says(decoder):
    rng = random.Random(3)
    payloads = _scores(rng, 400)
    lines = _run_decoder(decoder, payloads)
    for p, line in zip(payloads, lines, strict=True):
        assert line == _doc_decode(p), p.hex()
        # and the README's reading is tickscore's own
        s = decode_score(p)
        ok, schema, inst, seq, tev, tin, tout, bits, version, flags, shard, epoch = line.split()
        assert (bytes.fromhex(inst.strip("-")).decode(), int(seq), int(tev), int(tin), int(tout)) == (
            s.instrument, s.seq, s.ts_event_ns, s.ts_in_ns, s.ts_out_ns)  # fmt: skip
        assert struct.pack(">Q", int(bits, 16)) == struct.pack(">d", s.score)
        assert (bytes.fromhex(version.strip("-")).decode(), int(flags), int(shard), int(epoch)) == (
            s.model_version, s.flags, s.shard, s.epoch)  # fmt: skip


def test_the_decoder_rejects_what_the_readme_table_rejects(decoder):
    """Truncations, byte changes, random bytes and hand-made wrong payloads: the same
    accept/reject decision and values as the README reference; never a read out of bounds."""
    rng = random.Random(5)
    valid = _scores(rng, 60)
    bad: list[bytes] = []
    for p in valid[:20]:
        bad += [p[:k] for k in range(len(p))]  # every truncation
        bad.append(p + b"\x00")
    for _ in range(6000):
        p = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 3)):
            p[rng.randrange(len(p))] = rng.randrange(256)
        bad.append(bytes(p))
    bad += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(2000)]
    base = [3, "ESZ6", 1, 2, 3, 4, 0.5, "v", 0, 0, 0]
    crafted = {
        "truncated": [b"\x9b\x03\xa4ES"],
        "not_array": [msgpack.packb({"a": 1}), msgpack.packb("x"), msgpack.packb(None)],
        "schema": [msgpack.packb([4, *base[1:]]), msgpack.packb([True, *base[1:]]),
                   msgpack.packb(["3", *base[1:]]), msgpack.packb([-3, *base[1:]])],
        "length": [msgpack.packb(base[:10]), msgpack.packb([*base, 0]), msgpack.packb([2, *base[1:]]),
                   msgpack.packb([])],
        "type": [msgpack.packb([3, "ESZ6", 1.0, *base[3:]]), msgpack.packb([*base[:6], 1, *base[7:]]),
                 msgpack.packb([3, b"ESZ6", *base[2:]]), msgpack.packb([3, "ESZ6", True, *base[3:]]),
                 b"\x9b\x03\xa2\xed\xa0" + msgpack.packb(base)[7:]],  # a UTF-16 surrogate in the symbol
        "range": [msgpack.packb([3, "ESZ6", -1, *base[3:]]), msgpack.packb([3, "ESZ6", 1, 2**63, *base[4:]]),
                  msgpack.packb([*base[:10], -5])],
        "trailing": [msgpack.packb(base) + b"\xc0"],
    }  # fmt: skip
    payloads = valid + bad + [p for ps in crafted.values() for p in ps]
    lines = _run_decoder(decoder, payloads)
    accepted = 0
    for p, line in zip(payloads, lines, strict=True):
        want = _doc_decode(p)
        assert line == want if want != "err" else line.startswith("err "), (p.hex(), line, want)
        accepted += line.startswith("ok ")
    assert 60 < accepted < len(payloads) - 2000  # both decisions were exercised
    by_payload = dict(zip(payloads, lines, strict=True))
    for name, ps in crafted.items():
        for p in ps:
            assert by_payload[p].endswith(" " + name), (name, p.hex(), by_payload[p])


def _zmq_header(include: Path) -> None:
    """The part of zmq.h the example uses, its constants taken from pyzmq (no libzmq headers here)."""
    include.mkdir(parents=True, exist_ok=True)
    consts = {n: int(getattr(zmq, n.removeprefix("ZMQ_"))) for n in
              ("ZMQ_SUB", "ZMQ_SUBSCRIBE", "ZMQ_RCVMORE", "ZMQ_RCVHWM", "ZMQ_RCVTIMEO")}  # fmt: skip
    (include / "zmq.h").write_text(
        "#include <stddef.h>\n"
        + "".join(f"#define {n} {v}\n" for n, v in consts.items())
        + "void *zmq_ctx_new(void);\nint zmq_ctx_term(void *context);\n"
        "void *zmq_socket(void *context, int type);\nint zmq_close(void *s);\n"
        "int zmq_setsockopt(void *s, int option, const void *optval, size_t optvallen);\n"
        "int zmq_getsockopt(void *s, int option, void *optval, size_t *optvallen);\n"
        "int zmq_connect(void *s, const char *addr);\n"
        "int zmq_recv(void *s, void *buf, size_t len, int flags);\n"
        "int zmq_errno(void);\nconst char *zmq_strerror(int errnum);\n"
    )


@needs_cc
def test_the_c_subscriber_receives_a_replay_score_for_score(tmp_path):
    exe = _subscriber(tmp_path)
    ep = f"ipc://{tmp_path}/scores.ipc"
    sub = subprocess.Popen([str(exe), "-x", "-t", "3", ep], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        assert "subscribed" in sub.stderr.readline()
        out = tmp_path / "run"
        cmd = [sys.executable, "-m", "engine.cli", "replay", "--limit", "20000", "--publish", ep,
               "--wait-subscribers", "1", "--record-scores", "--out", str(out), "--no-progress"]  # fmt: skip
        rep = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rep.returncode == 0, rep.stderr[-3000:]
        stdout, stderr = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, stderr
    lines = stdout.splitlines()
    rec = read_scores(out / SCORES_FILE)
    assert len(lines) == len(rec) == 20000
    assert "20000 scores, 0 gaps (0 missing), 0 restarts, 0 malformed, 0 topic mismatches" in stderr
    f = [ln.split() for ln in lines]
    assert all(x[0] == "ok" and x[1] == "3" for x in f)
    assert [int(x[3]) for x in f] == rec["seq"].to_list() == list(range(20000))
    assert [bytes.fromhex(x[2]).decode() for x in f] == rec["instrument"].to_list()
    assert [int(x[4]) for x in f] == rec["ts_event_ns"].to_list()
    bits = np.array([int(x[7], 16) for x in f], dtype=np.uint64).view(np.float64)
    assert np.array_equal(bits, rec["score"].to_numpy(), equal_nan=True)
    assert [int(x[9]) for x in f] == rec["flags"].to_list()
    assert {bytes.fromhex(x[8]).decode() for x in f} == set(rec["model_version"].to_list())
    assert all(int(x[6]) >= int(x[5]) for x in f)  # ts_out after ts_in, both CLOCK_MONOTONIC


def _subscriber(tmp_path: Path) -> Path:
    lib = Path(libzmq_path())
    _zmq_header(tmp_path / "include")
    return _compile(tmp_path / "score_sub", "-DTS_WITH_ZMQ", f"-I{tmp_path / 'include'}", *SANITIZE,
                    libs=(str(lib), f"-Wl,-rpath,{lib.parent}"))  # fmt: skip


@needs_cc
def test_the_c_subscriber_counts_gaps_restarts_and_malformed_messages(tmp_path):
    exe = _subscriber(tmp_path)
    ep = f"ipc://{tmp_path}/faults.ipc"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.bind(ep)
    sub = subprocess.Popen([str(exe), "-q", "-t", "2", ep], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        assert "subscribed" in sub.stderr.readline()
        assert pub.poll(30_000)  # the subscription arrived
        pub.recv()
        enc = ScoreEncoder()

        def score(seq, shard=0, epoch=7, inst="ESZ6"):
            return bytes(enc.encode(Score(inst, seq, 1, 2, 3, 0.5, "v", 0, shard, epoch)))

        msgs = [[b"ESZ6", score(s)] for s in (0, 1, 2, 5, 6)]  # a gap of 2 (seq 3 and 4)
        msgs += [[b"ESZ6", score(0, epoch=8)], [b"ESZ6", score(1, epoch=8)]]  # a restart
        # another shard: its own seq, no gap
        msgs += [[b"NQZ6", score(0, 1, inst="NQZ6")], [b"NQZ6", score(1, 1, inst="NQZ6")]]
        msgs += [[b"ESZ6"], [b"ESZ6", score(2, epoch=8), b"x"], [b"ESZ6", b"\x93\x01"]]  # malformed x3
        msgs += [[b"CLZ6", score(2, epoch=8)]]  # the topic is not the instrument
        for m in msgs:
            pub.send_multipart(m)
        _, stderr = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
        pub.close(linger=0)
        ctx.term()
    assert sub.returncode == 0, stderr
    assert "10 scores, 1 gaps (2 missing), 1 restarts, 3 malformed, 1 topic mismatches" in stderr
