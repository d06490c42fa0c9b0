"""Log lines of the service on stderr: timestamped text (default) or one JSON object per line.

Both formats come from the standard :mod:`logging` module (logger ``tickscore``)
with a formatter per format, chosen once at start-up with :func:`configure`
(``--log-format`` / ``[log] format``).  Every line carries a UTC timestamp with
microseconds.  :func:`log` takes an ``event`` name (``ready``, ``refused``,
``control``, ``stopped`` ...) and fields; the text format appends the fields as
``key=value``, the JSON format writes them as keys::

    2026-12-04T10:11:02.481230Z INFO tickscore serve: control who=tcp://127.0.0.1:53514 command=stop result=ok
    {"ts": "2026-12-04T10:11:02.481230Z", "level": "INFO", "logger": "tickscore serve",
     "event": "control", "msg": "...", "who": "tcp://127.0.0.1:53514", "command": "stop", "result": "ok"}

Control actions are logged as ``event = "control"`` lines with ``audit = true``
(who: the client's CURVE public key, else its peer address; what; result): the
audit trail.  Logging is never on the per-tick path.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["configure", "log", "set_context", "FORMATS", "ProgressLine"]

FORMATS = ("text", "json")
_LOGGER = logging.getLogger("tickscore")
_LOGGER.propagate = False
#: fields written on every line (e.g. ``shard`` of a cluster's process), see :func:`set_context`
_CONTEXT: dict = {}


def set_context(**fields) -> None:
    """Write ``fields`` on every later line of this process (a shard's number, say)."""
    _CONTEXT.update(fields)


def _ts(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _name(record: logging.LogRecord) -> str:
    return record.name.replace(".", " ", 1)  # "tickscore.serve" -> "tickscore serve"


def _text(v) -> str:
    s = str(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


class TextFormatter(logging.Formatter):
    """``TS LEVEL tickscore COMPONENT: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {**_CONTEXT, **(getattr(record, "fields", None) or {})}
        msg = record.getMessage()
        if "\n" in msg:  # a report block: its fields are in its text already (JSON keeps them)
            return f"{_ts(record)} {record.levelname} {_name(record)}: {msg}"
        tail = "".join(f" {k}={_text(v)}" for k, v in fields.items())
        return f"{_ts(record)} {record.levelname} {_name(record)}: {msg}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``, ``msg`` and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": _ts(record), "level": record.levelname, "logger": _name(record),
               "event": getattr(record, "event", "") or "log", "msg": record.getMessage()}
        for k, v in {**_CONTEXT, **(getattr(record, "fields", None) or {})}.items():
            obj.setdefault(k, v)
        return json.dumps(obj, default=str)


def configure(fmt: str = "text", stream=None) -> None:
    """Send ``tickscore`` log lines to ``stream`` (stderr) in ``fmt`` ("text" or "json")."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: choose text or json")
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # Python warnings (e.g. from a library at stop) become log lines of the same format
    logging.captureWarnings(True)
    for logger in (_LOGGER, logging.getLogger("py.warnings")):
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(h)
        logger.propagate = False
    _LOGGER.setLevel(logging.INFO)


def log(component: str, msg: str, *, event: str = "", level: int = logging.INFO, **fields) -> None:
    """Write one log line of ``tickscore COMPONENT`` (configures text on stderr if nobody did)."""
    if not _LOGGER.handlers:
        configure("text")
    _LOGGER.getChild(component).log(level, msg, extra={"event": event, "fields": fields})


class ProgressLine:
    """A long run's progress on stderr: ``LABEL pct%  done/total UNIT  rate UNIT/s  [extra]ETA``.

    Rewritten in place on a terminal at most every ``period_s``; otherwise (a log file, a
    pipe) one line at most every ``max(period_s, 5)`` s.  Times are ``perf_counter_ns``.
    """

    def __init__(self, label: str, unit: str, total: int, period_s: float = 1.0) -> None:
        self.label, self.unit, self.total = label, unit, int(total)
        self.tty = sys.stderr.isatty()
        self.period_ns = int(period_s * 1e9) if self.tty else int(max(period_s, 5.0) * 1e9)
        self.t0 = self.last = 0
        self.printed = False

    def start(self, now_ns: int) -> None:
        """The run's rates and ETA count from ``now_ns``."""
        self.t0 = self.last = now_ns

    def show(self, done: int, now_ns: int, extra: str = "", force: bool = False) -> None:
        """Write the line for ``done`` of ``total`` if ``period_s`` has passed (or ``force``)."""
        if now_ns - self.last < self.period_ns and not force:
            return
        self.last = now_ns
        el = (now_ns - self.t0) / 1e9
        rate = done / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        pct = 100.0 * done / self.total if self.total else 100.0
        line = (f"{self.label} {pct:5.1f}%  {done:,}/{self.total:,} {self.unit}  {rate:,.0f} {self.unit}/s  "
                f"{extra}ETA {eta:,.0f}s")  # fmt: skip
        sys.stderr.write("\r" + line if self.tty else line + "\n")
        sys.stderr.flush()
        self.printed = True

    def finish(self) -> None:
        """End a line rewritten in place."""
        if self.tty and self.printed:
            sys.stderr.write("\n")
