"""The regression gate: ``tickscore report --check BASELINE CANDIDATE``."""

from __future__ import annotations

import math
from fractions import Fraction

from replay.latency import PERCENTILES
from replay.report.runs import CHECKED, SERVICE_LABEL, Run
from replay.report.tables import _us

# ---------------------------------------------------------------------------- check


def parse_max_regress(text: str | float | Fraction) -> Fraction:
    """Return the allowed regression as an exact fraction: ``"10%"`` and ``"0.1"`` give 1/10.

    Raises
    ------
    ValueError
        For anything that is not a finite non-negative number or percentage, and
        for a bare number above 1 (write ``"150%"``, not ``"1.5"`` vs ``"150"``).
    """
    if isinstance(text, Fraction):
        value = text
    elif isinstance(text, int | float) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise ValueError(f"--max-regress must be finite, got {text!r}")
        value = Fraction(repr(float(text)))
    elif isinstance(text, str):
        t = text.strip()
        pct = t.endswith("%")
        num = t[:-1].strip() if pct else t
        try:
            value = Fraction(num)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"--max-regress takes a percentage like 10% or a fraction like 0.1, got {text!r}"
            ) from None
        if pct:
            value /= 100
        elif value > 1:
            raise ValueError(
                f"--max-regress {text!r} is ambiguous: write {t}% for {t} percent "
                f"(a bare number is a fraction, at most 1)"
            )
    else:
        raise ValueError(f"--max-regress takes a percentage or fraction, got {text!r}")
    if value < 0:
        raise ValueError(f"--max-regress must not be negative, got {text!r}")
    if value > 100:
        raise ValueError(f"--max-regress {text!r} is implausibly large (more than 10000%)")
    return value


def pct(r: Fraction) -> str:
    return f"{float(r) * 100:g}%"


def check_regression(
    baseline: Run, candidate: Run, max_regress: str | float | Fraction
) -> tuple[bool, list[str]]:
    """Return whether the candidate's service-time p50 and p99 are within the allowed regression.

    Parameters
    ----------
    baseline, candidate : Run
    max_regress : str, float or Fraction
        Allowed relative increase, e.g. ``"10%"``, ``"0.1"`` or ``0.1``.

    Returns
    -------
    ok : bool
        True if every checked percentile satisfies
        ``candidate <= baseline * (1 + max_regress)`` (exact rational arithmetic
        on the integer ns values, so the boundary itself passes).
    messages : list of str
        One line per checked percentile, starting with ``ok`` or ``FAIL``, with
        value, baseline, ratio and limit.
    """
    r = parse_max_regress(max_regress)
    limit = 1 + r
    ok = True
    messages = []
    for key in CHECKED:
        label = f"p{PERCENTILES[key]:g}"
        b = baseline.stats.percentiles[key]
        c = candidate.stats.percentiles[key]
        passed = Fraction(c) <= Fraction(b) * limit
        ratio = f"{c / b:.3f}x" if b else ("1.000x" if c == 0 else "inf")
        rel = "<=" if passed else ">"
        msg = (
            f"{'ok  ' if passed else 'FAIL'} {label} {SERVICE_LABEL}: candidate {_us(c)} µs vs baseline "
            f"{_us(b)} µs = {ratio} {rel} limit {float(limit):.3f}x (+{pct(r)})"
        )
        ok &= passed
        messages.append(msg)
    return ok, messages
