"""Numba helpers the feature kernels share: unit constants, the clip rule, the L1 book features.

Every helper is ``inline="always"``: each kernel compiles it into its own
code, exactly as if written in place (no call, same machine code).  Numba's
disk cache does not notice edits here in the kernels that inline them:
:func:`drop_stale_numba_cache`, called by each kernel module at import, deletes
a cache older than the files it compiles in (and the fused backend's per-tick
check, :func:`models.backend_choice.check_tick_kernel`, would catch a stale one).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable

from numba import njit

__all__ = ["NS_PER_S", "BPS", "clip", "log1p", "realised_vol", "realised_vols", "l1_book_features",
           "drop_stale_numba_cache"]

def drop_stale_numba_cache(module_file: str, dependencies: Iterable[str]) -> None:
    """Delete ``module_file``'s numba cache if a file it compiles in changed after it was written.

    Numba's on-disk cache is keyed on the caller's own source file only, but a
    compiled function carries the code of every ``@njit`` function it calls and
    the values of the module constants it reads, from any module.  A cache
    older than one of ``dependencies`` (paths or glob patterns) would run old
    code against a new state layout; call this at import, before the first
    compilation, with the files whose functions or constants the module's
    kernels use.
    """
    newest = 0.0
    for pattern in dependencies:
        for dep in glob.glob(pattern):
            try:
                newest = max(newest, os.path.getmtime(dep))
            except OSError:
                pass
    here = os.path.dirname(os.path.abspath(module_file))
    stem = os.path.splitext(os.path.basename(module_file))[0]
    for f in glob.glob(os.path.join(here, "__pycache__", f"{stem}.*.nb[ic]")):
        try:
            if os.path.getmtime(f) < newest:
                os.remove(f)
        except OSError:
            pass


#: Nanoseconds per second (float, for rates and ages).
NS_PER_S = 1e9
#: Basis points per unit (relative quantities are reported in bps).
BPS = 1e4


@njit(cache=True, nogil=True, inline="always")
def decay_factor(x, params, p, p_ret, a0, a1, a2, minus_one):
    """Return ``exp(x / params[p])`` (``expm1`` if ``minus_one``), reusing ``a_k`` if a half-life is equal.

    ``a_k`` is the same function of ``x / params[p_ret + k]``: the same operation on the
    same values gives the same bits, so where a feature set's half-lives repeat (the
    shipped ones do) one ``exp`` (~5-10 ns on the hot path) is saved and nothing changes.
    """
    hl = params[p]
    if hl == params[p_ret]:
        return a0
    if hl == params[p_ret + 1]:
        return a1
    if hl == params[p_ret + 2]:
        return a2
    return math.expm1(x / hl) if minus_one else math.exp(x / hl)


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
def realised_vol(var, tsum, vmax):
    """``sqrt(var / tsum)`` (0 while ``tsum`` is not positive) clipped to ``[0, vmax]``: ``(v, was_clipped)``.

    The volatility features: decayed squared returns over the decayed time with a book.
    """
    return clip(math.sqrt(var / tsum) if tsum > 0.0 else 0.0, 0.0, vmax, 0.0)


@njit(cache=True, nogil=True, inline="always")
def realised_vols(fs, f_var, f_time, vmax):
    """The three half-lives' :func:`realised_vol` from ``fs[f_var + k]`` / ``fs[f_time + k]``:
    ``(v0, v1, v2, any_clipped)``."""
    v0, c0 = realised_vol(fs[f_var], fs[f_time], vmax)
    v1, c1 = realised_vol(fs[f_var + 1], fs[f_time + 1], vmax)
    v2, c2 = realised_vol(fs[f_var + 2], fs[f_time + 2], vmax)
    return v0, v1, v2, c0 | c1 | c2


@njit(cache=True, nogil=True, inline="always")
def log1p(v):
    """``log(1 + v)`` for ``v > -1``, accurate where ``v`` is tiny (Goldberg 1991, theorem 4).

    ``log(u) * v / (u - 1)`` with ``u = 1 + v`` rounded cancels the rounding of ``u``:
    within a few double ulps of libm's ``log1p`` (4e-16 relative over 2M values from
    1e-12 to 1e6, every one the same float32), and one ``log`` instead of libm's
    ``log1p``, which took ~15 ns per call for the rates and volatilities here (~9 ns).
    """
    u = 1.0 + v
    if u == 1.0:
        return v
    return math.log(u) * (v / (u - 1.0))


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
