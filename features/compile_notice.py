"""Say so when numba compiles for long: the first run of a kernel is slow, later ones load the cache.

Every kernel is compiled with ``cache=True``, so only the first run on a
machine (or after the code changed) compiles.  That can take tens of seconds
(the L3 book and its fused model kernel), with nothing on the screen.  Wrap a
command in :func:`compile_notice`: when a compilation has run for more than
``after_s`` seconds it prints one line, and one more with the total when the
command's compiling is over.  It listens to numba's compile events only; the
hot path is untouched.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from numba.core import event

__all__ = ["compile_notice"]


class _Listener:
    def __init__(self, after_s: float, stream: TextIO, who: str, say: Callable[[str], None] | None) -> None:
        self.after_s = after_s
        self.stream = stream
        self.who = who
        self.say = say or self._print
        self.depth = 0
        self.t0 = 0.0
        self.total = 0.0
        self.printed = False
        self.timer: threading.Timer | None = None
        self.lock = threading.Lock()

    def on_start(self, _event) -> None:
        with self.lock:
            self.depth += 1
            if self.depth == 1:
                self.t0 = time.perf_counter()
                if not self.printed:
                    self.timer = threading.Timer(self.after_s, self._announce)
                    self.timer.daemon = True
                    self.timer.start()

    def on_end(self, _event) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self.total += time.perf_counter() - self.t0
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None

    def _print(self, text: str) -> None:
        print(f"{self.who}: {text}", file=self.stream, flush=True)

    def _announce(self) -> None:
        with self.lock:
            if self.depth > 0 and not self.printed:
                self.printed = True
                self.say("compiling kernels, first run only (cached for the next runs) ...")


@contextmanager
def compile_notice(
    who: str = "tickscore", after_s: float = 1.0, stream: TextIO | None = None,
    say: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Print one line when numba compiles for more than ``after_s`` s inside the block, and the total.

    ``say(text)`` writes a line instead of printing ``who: text`` (e.g. the service's log, JSON or text).
    """
    state = _Listener(after_s, stream or sys.stderr, who, say)

    class _L(event.Listener):
        def on_start(self, ev) -> None:
            state.on_start(ev)

        def on_end(self, ev) -> None:
            state.on_end(ev)

    try:
        with event.install_listener("numba:compile", _L()):
            yield
    finally:
        if state.timer is not None:
            state.timer.cancel()
        if state.printed:
            state.say(f"kernels compiled in {state.total:.1f} s")
