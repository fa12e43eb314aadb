"""Online baselines: small, pure, I/O-free statistics keyed by the engine.

* :func:`ew_first` -- river's ``EWMean`` step; on a value and its square it
  gives river's ``EWVar`` of a per-minute total (tokens), exactly, in two
  floats: a river object per consumer would not fit the memory budget.
  Empty minutes are fed as zeros, so a bursty consumer's baseline carries the
  variance of its bursts and silences.
* :class:`EW` -- an EW mean and variance in two floats (the incremental
  form), for the call rate and call sizes.
* (the log-scale baselines of call sizes and agent runs are
  :class:`~detectors.state.LogPair` records)
* :func:`binom_surprise` -- the Chernoff bound of a one-sided binomial test.

>>> a, m = alpha_for_halflife(60), 0.0
>>> for n, x in enumerate((100, 120, 80, 100)):
...     m = ew_first(n, m, x, a)
>>> round(m)
100
>>> for _ in range(60):
...     m = ew_first(4, m, 0.0, a)
>>> round(m)
50
>>> e = EW(10.0); e.update(20.0, 0.5); (e.mean, e.var)
(15.0, 25.0)
>>> binom_surprise(20, 40, 0.02) > 16, binom_surprise(0.5, 40, 0.02)
(True, 0.0)
"""

from __future__ import annotations

import math
from typing import Final

from .record import Record

LN10: Final = math.log(10.0)


def alpha_for_halflife(halflife: float) -> float:
    """EW weight of a new value such that an old value's weight halves after
    ``halflife`` updates."""
    return 1.0 - 0.5 ** (1.0 / max(halflife, 1e-9))


def ew_first(n: int, mean: float, x: float, a: float) -> float:
    """One step of river's ``EWMean`` (``n`` values so far): the first value,
    then ``a x + (1 - a) mean``.  With the same step on ``x**2``, the EW
    variance is ``mean(x**2) - mean(x)**2``: river's ``EWVar``, exactly (its
    two EW means), in two floats instead of a river object of about 370 bytes
    per key (see :class:`~detectors.state.ConsumerState`).

    >>> from river import stats
    >>> v, a = stats.EWVar(fading_factor=0.3), 0.3
    >>> m = m2 = 0.0
    >>> for n, x in enumerate((0.0, 0.0, 120.0, 80.0, 0.0, 4000.0, 35.5)):
    ...     v.update(x)
    ...     m, m2 = ew_first(n, m, x, a), ew_first(n, m2, x * x, a)
    >>> m2 - m * m == v.get()
    True
    """
    return a * x + (1.0 - a) * mean if n else x


class EW(Record):
    """EW mean/variance in two floats: the incremental form of river's
    ``EWVar`` (equal to it up to rounding)."""

    __slots__ = ("mean", "var")

    def __init__(self, mean: float = 0.0, var: float = 0.0) -> None:
        self.mean = mean
        self.var = var

    def update(self, x: float, a: float) -> None:
        d = x - self.mean
        inc = a * d
        self.mean += inc
        self.var = (1.0 - a) * (self.var + d * inc)

    def fill_zeros(self, k: int, a: float) -> None:
        for _ in range(min(k, 240)):
            self.update(0.0, a)

    def sd(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 0.0


def ew_sd(var: float) -> float:
    """:meth:`EW.sd` of an EW kept as two floats elsewhere."""
    return math.sqrt(var) if var > 0 else 0.0


def binom_surprise(f: float, n: float, p0: float) -> float:
    """``n * KL(f/n || p0)`` when ``f/n > p0``, else 0.

    By the Chernoff bound ``P(X >= f | n, p0) <= exp(-surprise)``, so
    ``surprise >= ln(1/alpha)`` is a (conservative) one-sided test at level
    alpha.  Works with the fractional counts of decayed windows.
    """
    if n <= 0 or f <= p0 * n:
        return 0.0
    p = f / n
    if p >= 1.0:
        return -n * math.log(p0)
    return n * (p * math.log(p / p0) + (1.0 - p) * math.log((1.0 - p) / (1.0 - p0)))


def wilson_lower(f: float, n: float, z: float = 3.0) -> float:
    """Lower bound of the Wilson score interval of a rate f/n.

    >>> round(wilson_lower(8, 10), 2), round(wilson_lower(1, 2), 2)
    (0.35, 0.05)
    """
    if n <= 0:
        return 0.0
    p = f / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return max((centre - half) / (1 + z2 / n), 0.0)
