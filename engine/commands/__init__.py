"""The ``tickscore`` commands, one module each: its parser (``register``) and its ``run``.

A command module reads the arguments, calls the layer below (the service, the
replay runners, training) and prints; it holds no logic of its own that
another entry point would need.  :data:`COMMANDS` lists them in the order
``tickscore --help`` shows them.
"""

from __future__ import annotations

from engine.commands import (
    adopt,
    evaluate,
    features,
    generate,
    keygen,
    publish,
    replay,
    report,
    serve,
    subscribe,
    train,
)

__all__ = ["COMMANDS"]

COMMANDS = (replay, report, features, serve, subscribe, publish, train, evaluate, adopt, generate, keygen)
