"""Shared test helpers: a ``tickscore serve`` subprocess (:class:`Svc`), free ports, Aeron dirs."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.control import request

ROOT = Path(__file__).resolve().parents[1]
#: Instruments of the services the tests start.
SYMBOLS = ["CLF7", "ESZ6", "NQZ6"]


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the Aeron directories :func:`_aeron_dir` handed out, removed when the session ends (a driver
#: killed by a test, or one left running by a stopped service, leaves its directory behind)
_AERON_DIRS: list[str] = []


def _aeron_dir() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    d = f"{base}/tickscore-test-{uuid.uuid4().hex[:12]}"
    _AERON_DIRS.append(d)
    return d


@pytest.fixture(scope="session", autouse=True)
def _remove_aeron_dirs():
    yield
    for d in _AERON_DIRS:
        shutil.rmtree(d, ignore_errors=True)


class Svc:
    """A service subprocess with its config, control endpoint and stderr log."""

    def __init__(self, tmp: Path, toml: str, name: str = "svc", instruments=SYMBOLS, *, keys=None,
                 args=(), wait: bool = True) -> None:  # fmt: skip
        self.tmp = tmp
        self.keys = keys  # CURVE client keys of the control requests (engine.security.ClientKeys)
        self.control = f"tcp://127.0.0.1:{_free_port()}"
        self.out = tmp / f"{name}-out"
        self.cfg = tmp / f"{name}.toml"
        self.cfg.write_text(
            f'instruments = {json.dumps(list(instruments))}\n{toml}\n'
            f'[control]\nendpoint = "{self.control}"\n[output]\ndir = "{self.out}"\n'
        )
        self.log = tmp / f"{name}.log"
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--config", str(self.cfg), *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._logf,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"service exited early:\n{self.log.read_text()}"
            try:
                st = request(self.control, "status", timeout_s=1.0, keys=self.keys)
                if st.get("state") == "running":
                    return st
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"service not ready after {timeout}s:\n{self.log.read_text()}")

    def status(self) -> dict:
        return request(self.control, "status", timeout_s=10.0, keys=self.keys)

    def wait_for(self, pred, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        st = self.status()
        while not pred(st) and time.monotonic() < deadline:
            time.sleep(0.05)
            st = self.status()
        return st

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._logf.close()

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())
