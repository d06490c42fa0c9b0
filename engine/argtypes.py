"""argparse value types and argument groups shared by the command modules (:mod:`engine.commands`)."""

from __future__ import annotations

import argparse
from typing import Any

from engine.config import ServiceConfig, load_config
from engine.security import ClientKeys, client_keys
from models.dataset import DEFAULT_MAX_ROWS
from replay.source import parse_speed

__all__ = [
    "speed",
    "pin",
    "non_negative_int",
    "add_input_arguments",
    "add_max_rows_argument",
    "TRAIN_CHUNK_HELP",
    "add_client_key_arguments",
    "client_keys_of",
]


def speed(text: str):
    """``--speed``: ``max`` or a multiple of the recorded speed (:func:`replay.source.parse_speed`)."""
    try:
        return parse_speed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pin(text: str) -> int | None:
    """``--pin``: a core number, or ``none``."""
    if text.lower() in ("none", "off", "-1"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pin takes a core number or 'none', got {text!r}") from None


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    v = non_negative_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return v


def add_input_arguments(p: Any, chunk_rows_help: str | None = None) -> None:
    """Add ``--map``, ``--map-file``, ``--shape``, ``--sort-by-exchange-time``, ``--chunk-rows``.

    The flags of every command that reads a market file (replay, publish,
    features, train, evaluate), so a file is read the same way by all of them.
    """
    p.add_argument(
        "--map", action="append", default=[], metavar="KEY=VALUE[,...]",
        help="column mapping for another vendor's layout, e.g. ts_event=time,price=Price,ts_unit=ms "
        "(repeatable; see 'Bringing your own data' in the README)",
    )
    p.add_argument("--map-file", metavar="TOML", help="column mapping in a TOML file (same keys as --map)")
    p.add_argument(
        "--shape", choices=["l1", "trades", "l3"], default=None,
        help="event shape: l1 quotes+trades, trades (trade-only feed), l3 (order by order); "
        "default: from the mapping, the model, or detected from the file",
    )
    p.add_argument(
        "--sort-by-exchange-time", action="store_true",
        help="replay in exchange-time order (stable: file order kept for equal times)",
    )
    p.add_argument(
        "--chunk-rows", type=int, default=None, metavar="N",
        help=chunk_rows_help or "read the file in chunks of N rows (bounded memory); default: whole "
        "file if it has at most 5M rows, else 1M-row chunks",
    )


TRAIN_CHUNK_HELP = "rows per chunk as the file is read, chunk by chunk (default 1,000,000)"


def add_max_rows_argument(p: Any) -> None:
    """Add ``--max-rows`` (usable rows kept for fitting / evaluation) to a parser."""
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help="usable rows kept; beyond N a uniform sample of N rows (by a hash of the row "
                        "number) is fitted and evaluated, so memory stays bounded whatever the file's "
                        "size; 0 = keep all (default %(default)s)")  # fmt: skip


def add_client_key_arguments(p: argparse.ArgumentParser, config: bool = False) -> None:
    """``--client-key`` / ``--server-key``: talk CURVE to a service run with ``[security] curve``."""
    g = p.add_argument_group("CURVE (a service with [security] curve = true)")
    g.add_argument("--client-key", metavar="NAME.key_secret", default=None,
                   help="this client's secret key file (tickscore keygen); its NAME.key must be in the "
                        "service's authorized_keys directory")
    g.add_argument("--server-key", metavar="NAME.key", default=None,
                   help="the service's public key file")
    if config:
        g.add_argument("--config", metavar="FILE", default=None,
                       help="a service config: its [security] client_key / server_key are used")


def client_keys_of(args, cfg: ServiceConfig | None = None) -> ClientKeys | None:
    """Return the CURVE keys of ``--client-key``/``--server-key``, else of the config's ``[security]``."""
    if cfg is None and getattr(args, "config", None):
        cfg = load_config(args.config)
    ck, sk = getattr(args, "client_key", None), getattr(args, "server_key", None)
    if cfg is not None and cfg.security.curve:
        ck = ck or cfg.security.client_key or None
        sk = sk or cfg.security.server_key or cfg.security.secret_key or None
    return client_keys(ck, sk)
