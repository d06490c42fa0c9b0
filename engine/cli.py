"""``tickscore`` command line: one thin dispatcher over :mod:`engine.commands`.

Each command lives in its own module of :mod:`engine.commands` (its parser and
its ``run``); this module builds the parser from them and maps errors a user
can fix (missing file, bad model, bad flag value) to a one-line message and
exit code 2, never a traceback; ``--debug`` shows the traceback.  It is the top
layer of the import contract (``pyproject.toml``): nothing imports it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from importlib.metadata import PackageNotFoundError, version

from engine.commands import COMMANDS
from engine.log import log
from features.compile_notice import compile_notice
from models.metadata import ModelError

__all__ = ["main", "build_parser"]

#: commands that compile numba kernels on a first run (they say so when it takes long)
_COMPILING = frozenset({"replay", "features", "serve", "train", "evaluate", "generate", "adopt"})


def _version() -> str:
    try:
        return version("tickscore")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``tickscore`` command."""
    p = argparse.ArgumentParser(
        prog="tickscore",
        description="Low-latency per-tick risk scoring: replay, serve, train, report.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="version", version=f"tickscore {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C is: the command's clean-up runs (no partial output file)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the ``tickscore`` command; return the process exit code.

    SIGTERM stops a command as Ctrl-C does (``subscribe`` installs its own graceful handler
    over this one); ``serve`` keeps SIGTERM's default until its graceful stop is installed,
    so a supervisor sees a service stopped during start-up die by the signal, as before.
    """
    args = build_parser().parse_args(argv)
    handle_term = threading.current_thread() is threading.main_thread() and args.command != "serve"
    old = signal.signal(signal.SIGTERM, _raise_terminated) if handle_term else None
    try:
        return _dispatch(args)
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command in _COMPILING:
            # the service's notice is a log line of its format (text or JSON); others print
            say = (lambda text: log("serve", text, event="compile")) if args.command == "serve" else None
            with compile_notice(f"tickscore {args.command}", say=say):
                return args.handler(args)
        return args.handler(args)
    except _Terminated:
        print("tickscore: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tickscore: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, OSError, ModelError) as exc:
        if args.debug:
            raise
        print(f"tickscore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
