"""Small, exact statistics for the reliability detectors (retry_storm,
failure_spike, runaway_reasoning): sliding windows kept as tiny ring buffers
of ints, and a tight binomial tail bound.

Everything here is pure and cheap; the windows are created lazily, only for
consumers that fail and request hashes that repeat.

>>> round(log10_binom_tail(7, 7, 0.01), 1)   # 7 of 7 calls failing at a 1 % baseline
-14.0
>>> log10_binom_tail(1, 100, 0.02) == 0.0     # at or below expectation: no evidence
True
>>> -7 < log10_binom_tail(5, 100, 0.02) < -1  # 5 % of 100 at 2 %: weak evidence
True
>>> w = FailWindow(4)
>>> for k, t in enumerate((10.0, 20.0, 30.0, 40.0, 50.0)):
...     w.add_failure(t, 10 * k)
>>> w.size, w.get(0), w.get(3)  # newest first; the oldest record was overwritten
(4, (50000, 40), (20000, 10))
>>> r = HashWindow(4)
>>> for t, bad in ((0.0, True), (1.0, True), (2.0, False), (3.0, True), (4.0, True)):
...     r.add(t, bad)
>>> r.count(60.0, 4.0), r.count(1.5, 4.0)   # (attempts, failures) within the last W s
((2, 2), (2, 2))

(after the latest answer: the attempt at 2.0 was answered, so those at 0.0
and 1.0 were another request's retries)
"""

from __future__ import annotations

import math
from array import array
from typing import Final

from .record import Record

LN10: Final = math.log(10.0)

# status classes of a failed call
CLIENT: Final = 1  # 4xx except 408 / 429: the caller's own problem (auth, bad request, ...)
UPSTREAM: Final = 2  # 5xx, 429, 408, no answer (timeout, connect error): the provider's
# flag of a failure record (with its class): it belonged to a reported episode
REPORTED: Final = 4
# FailWindow keeps the running count of skipped calls modulo 2**SKIP_BITS
# beside each record's call counter (calls up to 2**35 per consumer; a
# window's skipped calls below 2**28)
SKIP_BITS: Final = 28
SKIP_MASK: Final = (1 << SKIP_BITS) - 1


def failure_class(status: int, error: str | None) -> int:
    """CLIENT for errors the caller causes, UPSTREAM for the provider's.

    >>> failure_class(401, None), failure_class(503, None), failure_class(0, "timeout")
    (1, 2, 2)
    >>> failure_class(429, "rate_limited"), failure_class(200, "upstream_5xx")
    (2, 2)
    """
    if 400 <= status < 500 and status not in (408, 429):
        return CLIENT
    return UPSTREAM


def log10_binom_tail(f: int, n: int, p: float) -> float:
    """log10 of an upper bound of ``P(X >= f)``, ``X ~ Binomial(n, p)``;
    0.0 when ``f <= n p`` (no evidence).

    The terms ``t_k`` of the tail decrease geometrically beyond the mean with
    ratio ``r_k = (n - k) / (k + 1) * p / (1 - p)``, itself decreasing in k,
    so ``P(X >= f) <= t_f / (1 - r_f)``: within a few percent of the exact
    value for the small tails that matter, and three ``lgamma`` calls."""
    if n <= 0 or f <= 0 or f <= n * p:
        return 0.0
    if f > n:
        return -math.inf
    q = 1.0 - p
    r = (n - f) / (f + 1.0) * p / q
    if r >= 1.0:
        return 0.0
    lt = (math.lgamma(n + 1.0) - math.lgamma(f + 1.0) - math.lgamma(n - f + 1.0)
          + f * math.log(p) + (n - f) * math.log(q))
    v = (lt - math.log1p(-r)) / LN10
    return v if v < 0.0 else 0.0


_NO_RING: Final = array("q")


class FailWindow(Record):
    """The last ``k`` counted failures of one consumer, in one ``array('q')``
    ring of two words per failure: its time in ms with its class in the low
    bits, and the consumer's call counter at that failure with the running
    count of skipped calls (:meth:`skip`) in the low :data:`SKIP_BITS`.
    Windows are anchored at past failures: the calls after the j-th latest
    failure and the failures among them are exact sliding-window counts.

    One array, not four (time, call counter, skipped calls, class): a
    consumer that has failed holds a ring, and nearly every consumer of
    real traffic has (432 bytes compiled at k = 16; 913 in four arrays).
    A consumer's record *is* its failure window (see
    :class:`~detectors.volume.Volume`), whose ring it allocates at its
    first counted failure (:meth:`start`): 336 bytes then, where a window
    of its own cost 432.  The number of records is not kept: a record's
    first word is never 0 (its class is not), so a ring whose last slot is
    0 has not wrapped yet.

    >>> w = FailWindow(4)
    >>> w.add_failure(1700000000.123, 12, CLIENT); w.skip(); w.skip()
    >>> w.get(0), w.cls_of(0), w.skipped_since(0)
    ((1700000000123, 12), 1, 2)
    """

    __slots__ = ("cbase", "cbase_at", "head", "r", "rf")

    def __init__(self, k: int = 16) -> None:
        # k = 0: no ring yet (one empty array that every such window shares)
        self.r = _NO_RING
        self.start(k)
        # calls that do not count (see skip), a running count (the ring keeps
        # its low SKIP_BITS at each record)
        self.rf = 0
        self.head = 0  # slot of the next record
        # EW count of CLIENT-class failures (decayed per call like the consumer's
        # failure baseline, lazily: only when read or when one is added)
        self.cbase = 0.0
        self.cbase_at = 0

    def start(self, k: int) -> None:
        """Allocate a ring of ``k`` records if there is none."""
        if k > 0 and not len(self.r):
            # (a repeated one-element array: built from bytes, the array
            # over-allocates by 40 bytes)
            self.r = array("q", (0,)) * (2 * k)

    def has_ring(self) -> bool:
        return len(self.r) != 0

    @property
    def size(self) -> int:
        """Records in the ring."""
        r = self.r
        n = len(r)
        return n >> 1 if n and r[n - 2] != 0 else self.head

    def client_base(self, calls: int, log_keep: float) -> float:
        """The EW client-failure count at call ``calls`` (``log_keep``: log of
        the per-call decay factor)."""
        return self.cbase * math.exp((calls - self.cbase_at) * log_keep)

    def teach_client(self, calls: int, log_keep: float) -> None:
        self.cbase = self.client_base(calls, log_keep) + 1.0
        self.cbase_at = calls

    def add_failure(self, ts: float, call_idx: int, cls: int = UPSTREAM) -> None:
        """Keep a failure (``cls``: CLIENT or UPSTREAM, never 0)."""
        h = self.head
        r = self.r
        r[2 * h] = int(ts * 1000.0) << 3 | cls
        r[2 * h + 1] = call_idx << SKIP_BITS | (self.rf & SKIP_MASK)
        k = len(r) >> 1
        self.head = h + 1 if h + 1 < k else 0

    def skip(self) -> None:
        """A call of the consumer that windows do not count: a failed retry
        of a failing request (its failure is counted once) or an upstream
        failure the model scope judges (an outage, or the model failing for
        other consumers too)."""
        self.rf += 1

    def mark_newest(self) -> None:
        """Flag the latest record :data:`REPORTED`."""
        if self.size:
            self.r[2 * self.slot(0)] |= REPORTED

    def slot(self, j: int) -> int:
        """Ring slot of the j-th latest record (0 = newest)."""
        s = self.head - 1 - j
        return s + (len(self.r) >> 1) if s < 0 else s

    def get(self, j: int) -> tuple[int, int]:
        """(time in ms, call counter) of the j-th latest record."""
        s = 2 * self.slot(j)
        return self.r[s] >> 3, self.r[s + 1] >> SKIP_BITS

    def cls_of(self, j: int) -> int:
        """Class (with the REPORTED flag) of the j-th latest record."""
        return self.r[2 * self.slot(j)] & 7

    def skipped_since(self, j: int) -> int:
        """Calls skipped since the j-th latest record."""
        return (self.rf - self.r[2 * self.slot(j) + 1]) & SKIP_MASK

    def scan(self, calls: int, now: float, p: float, min_failures: int, min_rate: float,
             max_window_s: float, log10_alpha: float, only: int = 0,
             min_window_s: float = 0.0, after_reported: bool = False
             ) -> tuple[int, int, float, float] | None:
        """The first window, newest anchor first, whose failures are
        significant: ``(failures, calls, log10 p, start time)`` or None.

        A window starts just after the j-th latest failure (the anchor, left
        out: under the null the calls after it are independent of it) and ends
        now; it holds j failures out of ``calls - idx[anchor]`` calls.  At most
        ``k - 1`` windows are tested per failure (a Bonferroni factor that
        ``log10_alpha`` must cover).  ``only``: count and anchor on failures
        of that class only (tested against that class's own baseline);
        ``min_window_s``: a window shorter than this is tested only with
        twice ``min_failures`` failures (a few clustered errors are no spike;
        many are sure at once; either way its failures count in the longer
        windows); ``after_reported``: no window starts before the latest
        failure marked :data:`REPORTED` (failures already reported are no
        evidence of a new spike).

        >>> w = FailWindow(8)
        >>> for i in range(6):
        ...     w.add_failure(float(i), 10 + i)
        >>> w.scan(16, 6.0, 0.01, 3, 0.0, 60.0, -2.0) is not None
        True
        >>> w.mark_newest()
        >>> w.scan(16, 6.0, 0.01, 3, 0.0, 60.0, -2.0, after_reported=True) is None
        True

        Calls skipped since a record (failed retries) are not in its windows:

        >>> v = FailWindow(4)
        >>> v.add_failure(1.0, 10); v.add_failure(2.0, 20)
        >>> v.scan(30, 3.0, 0.01, 1, 0.0, 60.0, 0.0)[:2]
        (1, 20)
        >>> for _ in range(5):
        ...     v.skip()
        >>> v.scan(30, 3.0, 0.01, 1, 0.0, 60.0, 0.0)[:2]
        (1, 15)
        """
        lim = int((now - max_window_s) * 1000.0)
        short = int((now - min_window_s) * 1000.0)
        r = self.r
        rf = self.rf
        # newest first: slot(j) for j = 0, 1, ... without the method call,
        # and each ring element read once (compiled, an array read is a
        # generic item call that boxes the value: most of a failed call's cost)
        k = len(r) >> 1
        s = self.head
        f = 0  # failures newer than the anchor
        for _ in range(self.size):
            s = s - 1 if s > 0 else k - 1
            v = r[2 * s]
            t = v >> 3
            if t < lim:
                break
            c = v & 7
            if only and (c & 3) != only:
                if after_reported and c & REPORTED:
                    break
                continue
            if f >= min_failures and (t <= short or f >= 2 * min_failures):
                u = r[2 * s + 1]
                n = calls - (u >> SKIP_BITS) - ((rf - u) & SKIP_MASK)
                if f >= min_rate * n:
                    lp = log10_binom_tail(f, n, p)
                    if lp <= log10_alpha:
                        return f, n, lp, t / 1000.0
            if after_reported and c & REPORTED:
                break
            f += 1
        return None

    def recent(self, calls: int, now: float, horizon_s: float) -> tuple[int, int, float]:
        """``(failures, calls, seconds)`` since the oldest kept failure within
        ``horizon_s`` (that failure included), for the call-rate check."""
        lim = int((now - horizon_s) * 1000.0)
        j = -1
        for i in range(self.size):
            if self.r[2 * self.slot(i)] >> 3 < lim:
                break
            j = i
        if j < 0:
            return 0, 0, 0.0
        t, idx = self.get(j)
        return j + 1, calls - idx + 1, now - t / 1000.0

    def client_share(self, j: int) -> float:
        """Share of CLIENT-class failures among the j + 1 latest records."""
        c = 0
        for i in range(j + 1):
            if self.cls_of(i) & 3 == CLIENT:
                c += 1
        return c / (j + 1)

    def recent_client_share(self, now: float, horizon_s: float, most: int = 10) -> float:
        """Share of CLIENT-class failures among the latest ``most`` records of
        the last ``horizon_s`` (0.0 if there are none): the errors of a jump
        in calls, not older failures that happen to be kept with them.

        >>> w = FailWindow(16)
        >>> for t in (0.0, 10.0, 20.0):
        ...     w.add_failure(t, int(t), UPSTREAM)
        >>> for t in (500.0, 505.0, 510.0):
        ...     w.add_failure(t, int(t), CLIENT)
        >>> w.add_failure(512.0, 512, UPSTREAM)
        >>> w.recent_client_share(515.0, 60.0), w.client_share(6)
        (0.75, 0.42857142857142855)
        """
        lim = int((now - horizon_s) * 1000.0)
        c = n = 0
        for i in range(min(self.size, most)):
            v = self.r[2 * self.slot(i)]
            if v >> 3 < lim:
                break
            n += 1
            if v & 3 == CLIENT:
                c += 1
        return c / n if n else 0.0


class HashWindow(Record):
    """The last ``k`` attempts of one request_hash: time in ms, negative for a
    failed attempt (``array('q')`` ring)."""

    __slots__ = ("head", "size", "t")

    def __init__(self, k: int = 8) -> None:
        self.t = array("q", (0,)) * k  # (exact size: see FailWindow)
        self.head = 0
        self.size = 0

    def add(self, ts: float, failed: bool) -> None:
        v = int(ts * 1000.0) + 1  # + 1: never 0, so the sign always carries the flag
        h = self.head
        self.t[h] = -v if failed else v
        k = len(self.t)
        self.head = h + 1 if h + 1 < k else 0
        if self.size < k:
            self.size += 1

    def count(self, window_s: float, now: float) -> tuple[int, int]:
        """(attempts, failed attempts) of the ring within ``window_s`` of
        ``now`` and after its latest answered attempt (an answer ends a
        request's retries: what follows is asking again)."""
        lim = int((now - window_s) * 1000.0) + 1
        for v in self.t[:self.size] if self.size < len(self.t) else self.t:
            if v > 0 and v + 1 > lim:
                lim = v + 1
        n = f = 0
        for v in self.t[:self.size] if self.size < len(self.t) else self.t:
            if v < 0:
                if -v >= lim:
                    n += 1
                    f += 1
            elif v >= lim:
                n += 1
        return n, f
