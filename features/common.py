"""Numba helpers the feature kernels share: unit constants, the clip rule, the L1 book features.

Every helper is ``inline="always"``: each kernel compiles it into its own
code, exactly as if written in place (no call, same machine code).  Numba's
disk cache does not notice edits here in the kernels that inline them; the
fused backend's per-tick check (:func:`models.backend_choice.check_tick_kernel`)
catches a stale kernel, and deleting ``features/__pycache__/*.nb?`` rebuilds.
"""

from __future__ import annotations

from numba import njit

__all__ = ["NS_PER_S", "BPS", "clip", "l1_book_features"]

#: Nanoseconds per second (float, for rates and ages).
NS_PER_S = 1e9
#: Basis points per unit (relative quantities are reported in bps).
BPS = 1e4


@njit(cache=True, nogil=True, inline="always")
def clip(x, lo, hi, neutral):
    """Return ``(x clipped to [lo, hi], was_clipped)``; NaN maps to ``neutral``."""
    if x < lo:
        return lo, True
    if x > hi:
        return hi, True
    if x != x:
        return neutral, True
    return x, False


@njit(cache=True, nogil=True, inline="always")
def l1_book_features(bid, ask, bsz, asz, spread_max_bps, x_out):
    """Write ``spread_bps``, ``micro_offset_bps``, ``l1_imbalance`` into ``x_out[0:3]``.

    The first three features of the L1 and L3 feature sets, from the top of the
    book (a two-sided one: ``bid`` and ``ask`` finite, sizes > 0).  Returns
    ``(spread_bps, clipped)``: the unclipped spread (other features use it).
    """
    mid = 0.5 * bid + 0.5 * ask
    spread = BPS * (ask - bid) / mid
    imb = (bsz - asz) / (bsz + asz)
    smax = spread_max_bps
    v, clipped = clip(spread, 0.0, smax, 0.0)
    x_out[0] = v
    v, c = clip(0.5 * spread * imb, -0.5 * smax, 0.5 * smax, 0.0)
    clipped |= c
    x_out[1] = v
    v, c = clip(imb, -1.0, 1.0, 0.0)
    clipped |= c
    x_out[2] = v
    return spread, clipped
