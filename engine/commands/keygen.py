"""``tickscore keygen``: write a CURVE key pair for the service or one of its clients."""

from __future__ import annotations

import sys

from engine.security import keygen


def register(sub) -> None:
    """Register the command's parser(s) on the ``tickscore`` subparsers."""
    p = sub.add_parser(
        "keygen",
        help="write a ZeroMQ CURVE key pair (NAME.key public, NAME.key_secret secret, mode 0600)",
        description=(
            "Write a CURVE key pair in the format pyzmq's zmq.auth reads. The service uses its "
            "NAME.key_secret ([security] secret_key); a client's NAME.key goes into the service's "
            "[security] authorized_keys directory, the service's NAME.key to the clients (--server-key)."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR/NAME",
                   help="where to write: DIR/NAME.key and DIR/NAME.key_secret (never overwritten)")
    p.set_defaults(handler=cmd_keygen)


def cmd_keygen(args) -> int:
    """Run ``tickscore keygen``."""
    public, secret = keygen(args.out)
    print(f"tickscore keygen: public key {public}\ntickscore keygen: secret key {secret} (mode 0600: keep it "
          "on this host)", file=sys.stderr)
    print(public.read_text().split('public-key = "')[1].split('"')[0])
    return 0
