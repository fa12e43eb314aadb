"""Rate windows for token_spike and cost_spike: sliding sums, robust
baselines and source attribution, in a few hundred bytes per consumer.

A token (or cost) spike is a sustained change of the consumption *rate*, not
one big call.  Per consumer, :class:`Volume` keeps

* a sliding **60 s window** (six 10 s buckets of tokens, cost, calls, the
  largest call's tokens and cost and the second largest call's tokens),
  tested on every event, so that a x5-x50
  step is seen within a minute;
* a **5 min window** (five closed minutes, same fields), tested when a
  minute closes, for slower ramps and small consumers (two consecutive
  windows must agree);
* both rings as float attributes by age, moved on like shift registers
  (see ``Volume.__init__``);
* for each window size, baselines learnt only from normal windows (not
  while an episode of the kind is open): an EW mean per bucket (empty buckets
  count as zeros, so silences and bursts are part of normal) and a slowly
  decaying maximum of the *trimmed* window (window total minus its largest
  call), i.e. the consumer's recent normal worst case;
* a time-of-day profile: the highest trimmed window of each hour of the day
  on earlier days (one byte per hour and window size, see ``prof``), so that
  a burst that comes at the same hour every day is that hour's normal;
* two weighted Misra-Gries "heavy hitter" trackers (60 s and 5 min decay)
  of the call's source (trace, else session, else request hash, else the call
  itself): when one source makes up most of the window, the volume belongs
  to an agent loop, a bloated session, a repeated request or one giant call,
  which have detectors of their own.

A window fires when its trimmed total (largest call removed) is at least
max(floor, ratio x EW mean, ratio_to_recent_max x recent normal maximum),
it has ``min_calls`` calls and no single source dominates it.  token_spike
also requires the excess to be spread over the calls (the second largest
call at most ``spread_share`` of the excess over the EW mean);
cost_spike requires the cost per token to be ``price_ratio`` x the
baseline (more cost than the token volume explains).  A window can be
both: ten times the calls on a dearer model is a token and a cost spike.

>>> v = Volume(0)
>>> v.add(100, 0.001, "a"), v.wt, v.wn
(False, 100.0, 1.0)
>>> v.dominated1()
True
"""

from __future__ import annotations

import math
from typing import Final

from .reliability import FailWindow

BUCKET_S: Final = 10.0
NB: Final = 6  # 10 s buckets in the 60 s window
NM: Final = 5  # closed minutes in the 5 min window
# a source with at least this share of the decayed window (lower bound) dominates
DOM_SHARE: Final = 0.3
D1: Final = 0.5 ** (BUCKET_S / 30.0)  # 60 s tracker: weights halve in 30 s
D5: Final = 0.5 ** (60.0 / 150.0)  # 5 min tracker: weights halve in 150 s (decayed per minute)
INF: Final = float("inf")
# a minute priced at most this many times the baseline price is back to normal
PRICE_BACK: Final = 2.0
# the time-of-day profile (see Volume.prof): one byte per hour and window
# size, the value x coded as ceil(8 log2 x) (steps of 9 %, rounded up, so a
# decoded high is never below the window that taught it)
NH: Final = 24
_DEC: Final = tuple([0.0] + [2.0 ** (q / 8.0) for q in range(1, 256)])


def _enc(x: float) -> int:
    """The byte code of ``x`` (0 for nothing; decoded, never below ``x``).

    >>> _enc(0.0), _enc(1000.0), _DEC[_enc(1000.0)] >= 1000.0
    (0, 80, True)
    """
    if x < 1.0:
        return 0
    q = math.ceil(8.0 * math.log2(x))
    return 255 if q > 255 else (q if q > 0 else 1)


def _put(p: bytes, i: int, q: int) -> bytes:
    """``p`` with byte ``i`` set to ``q``.

    >>> _put(bytes(3), 1, 7)
    b'\\x00\\x07\\x00'
    """
    b = bytearray(p)
    b[i] = q
    return bytes(b)


def _lower(q: int, step: int) -> int:
    """Code ``q`` a day later (``step`` codes less, not below 0)."""
    return q - step if q > step else 0


class Volume(FailWindow):
    """Per-consumer rate windows (see the module doc).

    A Volume is also the consumer's failure window (its base class, with
    no ring until :meth:`~detectors.reliability.FailWindow.start`): one
    record for the consumer's rate and failure windows, a class chain
    because a compiled native class has one base.  The window's own object
    and pointer cost 112 bytes more, at nearly every consumer (real
    traffic's consumers nearly all fail sometime)."""

    __slots__ = ("b", "c0", "c1", "c2", "c3", "c4", "c5", "hits5", "hr", "m",
                 "max1_c", "max1_t", "max5_c", "max5_t", "mc0", "mc1", "mc2", "mc3", "mc4",
                 "mean_c", "mean_t", "mn0", "mn1", "mn2", "mn3", "mn4",
                 "mt0", "mt1", "mt2", "mt3", "mt4", "mx0", "mx1", "mx2", "mx3", "mx4",
                 "my0", "my1", "my2", "my3", "my4", "mz0", "mz1", "mz2", "mz3", "mz4",
                 "n", "n0", "n1", "n2", "n3", "n4", "n5", "p1c0", "p1c1", "p1t0", "p1t1",
                 "p5c0", "p5c1", "p5t0", "p5t1", "pr_hi", "pr_pend", "price_c", "price_t",
                 "prof", "src1", "src5",
                 "t0", "t1", "t2", "t3", "t4", "t5", "thr_c", "thr_cf", "thr_t", "tot1", "tot5",
                 "w1", "w5", "wc", "wn", "wt", "x0", "x1", "x2", "x3", "x4", "x5",
                 "y0", "y1", "y2", "y3", "y4", "y5", "z0", "z1", "z2", "z3", "z4", "z5")

    def __init__(self, ts: float) -> None:
        FailWindow.__init__(self, 0)
        self.b = int(ts // BUCKET_S)  # current bucket
        self.m = int(ts // 60.0)  # current minute (of the 5 min ring)
        # The two rings are shift registers of float attributes, by age (0:
        # the current bucket or closing minute): compiled, a native class
        # reads and writes those unboxed, where an array element costs a
        # boxed float and a generic item call (about 200 instructions), and a
        # bucket's roll, which a sparse consumer makes at nearly every call,
        # read and wrote dozens of them.  Moving a ring on by one copies its
        # figures one age up; no slot arithmetic, and no array object.
        #
        # 10 s buckets of the 60 s window: tokens (t), cost (c), independent
        # calls (n), the largest call's tokens (x) and cost (y), the second
        # largest call's tokens (z)
        self.t0 = self.t1 = self.t2 = self.t3 = self.t4 = self.t5 = 0.0
        self.c0 = self.c1 = self.c2 = self.c3 = self.c4 = self.c5 = 0.0
        self.n0 = self.n1 = self.n2 = self.n3 = self.n4 = self.n5 = 0.0
        self.x0 = self.x1 = self.x2 = self.x3 = self.x4 = self.x5 = 0.0
        self.y0 = self.y1 = self.y2 = self.y3 = self.y4 = self.y5 = 0.0
        self.z0 = self.z1 = self.z2 = self.z3 = self.z4 = self.z5 = 0.0
        # closed minutes of the 5 min window, the same figures (m*: age 0 is
        # the minute being closed, written by window5)
        self.mt0 = self.mt1 = self.mt2 = self.mt3 = self.mt4 = 0.0
        self.mc0 = self.mc1 = self.mc2 = self.mc3 = self.mc4 = 0.0
        self.mn0 = self.mn1 = self.mn2 = self.mn3 = self.mn4 = 0.0
        self.mx0 = self.mx1 = self.mx2 = self.mx3 = self.mx4 = 0.0
        self.my0 = self.my1 = self.my2 = self.my3 = self.my4 = 0.0
        self.mz0 = self.mz1 = self.mz2 = self.mz3 = self.mz4 = 0.0
        # baselines, learnt from normal windows only: EW mean tokens (cost)
        # per 10 s bucket; decaying max of the trimmed 60 s (5 min) window
        self.mean_t: float = 0.0
        self.mean_c: float = 0.0
        self.max1_t: float = 0.0
        self.max1_c: float = 0.0
        self.max5_t: float = 0.0
        self.max5_c: float = 0.0
        # windows wait before they teach the maximum (so that a rise is
        # tested against windows from before it): the largest of the current
        # (p..0) and of the previous minute (p..1; 5 min windows: block) are
        # pending; a minute (block) later they count
        self.p1t0: float = 0.0
        self.p1t1: float = 0.0
        self.p1c0: float = 0.0
        self.p1c1: float = 0.0
        self.p5t0: float = 0.0
        self.p5t1: float = 0.0
        self.p5c0: float = 0.0
        self.p5c1: float = 0.0
        # the baseline price (cost per token = price_c / price_t): EW means
        # of tokens and cost per bucket as mean_t and mean_c, learnt from each
        # bucket as it leaves the 60 s window, a minute late: a switch to a
        # dearer model that also multiplies the calls would otherwise make its
        # price the baseline within a minute, before its cost_spike is seen
        # (the EW means are volume weighted, and the switch has most of the volume)
        self.price_t: float = 0.0
        self.price_c: float = 0.0
        # the recent high of the cost per token of a minute with at least a
        # few calls (decaying as the recent maxima): a consumer that mixes a
        # cheap model with a dear one pays 5-15x its mean price in some
        # minutes, which is its normal, not a switch to a dearer model (see
        # cost_spike.price_high_ratio).  A dear minute teaches it only once a
        # later minute's price is back near the baseline (pr_pend: the
        # highest since then): a price that stays up, or climbs (a switch,
        # at once or on a ramp), never teaches the high it is measured against
        self.pr_hi: float = 0.0
        self.pr_pend: float = 0.0
        # the window's running figures, touched by every event: 60 s window
        # tokens, cost, independent calls; the pre-filter thresholds of the
        # current bucket (tokens, cost, cost volume); the heavy-hitter weights
        # and decayed totals (60 s, 5 min)
        self.wt: float = 0.0
        self.wc: float = 0.0
        self.wn: float = 0.0
        self.thr_t: float = INF  # (thr_c may be below thr_cf: price rule)
        self.thr_c: float = INF
        self.thr_cf: float = INF
        self.w1: float = 0.0
        self.tot1: float = 0.0
        self.w5: float = 0.0
        self.tot5: float = 0.0
        # heavy-hitter source (60 s), as its digest (see Engine's source_digest);
        # its weight and total: w1, tot1.  -1: none yet
        self.src1 = -1
        self.src5 = -1  # same, 5 min (w5, tot5)
        # consecutive 5 min windows above threshold (bits 0-2 tokens, 3-5 cost, 6- persistent)
        self.hits5 = 0
        self.n = 0  # 10 s buckets learnt
        # time of day: the highest trimmed 60 s (bytes 0-23) and 5 min
        # (24-47) window seen in each hour of the day (UTC), coded (_enc),
        # lowered by the daily decay each day the consumer is active in that
        # hour; bytes 48, 49: dh1 / dh5, the highs of this hour and the next
        # on earlier days, as this hour began (today's windows never raise
        # today's bar: the recent maximum does that); hr: the current hour
        # since the epoch.  Every window teaches it, spikes too: a burst that
        # comes back at the same hour every day is that hour's normal, and
        # one that does not has halved by the next day.  Tokens only (cost
        # windows have no profile: see docs/detectors.md, State)
        # (bytes, replaced when a code changes: 24 bytes less than a bytearray,
        # and a code changes at most a few times an hour once the day is known)
        self.prof = bytes(2 * NH + 2)  # + the codes of dh1, dh5
        self.hr = -1

    # ------------------------------------------------------------ per event
    def add(self, tokens: int, cost: float, src: int, indep: bool = True) -> bool:
        """Count one call in the current bucket; ``indep``: an independent
        request (not a later call of a run), the only ones ``min_calls``
        counts.  True when a 60 s window reaches its pre-filter threshold."""
        self.t0 += tokens
        if indep:
            self.n0 += 1.0
            self.wn += 1.0
        if tokens > self.z0:  # the two largest calls
            if tokens > self.x0:
                self.z0 = self.x0
                self.x0 = float(tokens)
            else:
                self.z0 = float(tokens)
        wt = self.wt + tokens
        self.wt = wt
        if cost:  # adding 0.0 changes nothing
            self.c0 += cost
            if cost > self.y0:
                self.y0 = cost
            wc = self.wc + cost
            self.wc = wc
        else:
            wc = self.wc
        x = tokens + 1.0
        # weighted Misra-Gries with one counter: the candidate's weight is a
        # lower bound of its true (decayed) weight
        w = self.w1
        if src == self.src1:
            self.w1 = w + x
        elif w >= x:
            self.w1 = w - x
        else:
            self.src1 = src
            self.w1 = x - w
        self.tot1 += x
        w = self.w5
        if src == self.src5:
            self.w5 = w + x
        elif w >= x:
            self.w5 = w - x
        else:
            self.src5 = src
            self.w5 = x - w
        self.tot5 += x
        return wt >= self.thr_t or wc >= self.thr_c

    def dominated1(self) -> bool:
        return self.w1 >= DOM_SHARE * self.tot1

    def dominated5(self) -> bool:
        return self.w5 >= DOM_SHARE * self.tot5

    def second1(self) -> float:
        """The second largest call's tokens in the 60 s window."""
        m1, m2 = _top2(self.x0, self.z0, self.x1, self.z1)
        m1, m2 = _top2(m1, m2, self.x2, self.z2)
        m1, m2 = _top2(m1, m2, self.x3, self.z3)
        m1, m2 = _top2(m1, m2, self.x4, self.z4)
        return _top2(m1, m2, self.x5, self.z5)[1]

    def second5(self) -> float:
        """The second largest call's tokens in the 5 min window."""
        m1, m2 = _top2(self.mx0, self.mz0, self.mx1, self.mz1)
        m1, m2 = _top2(m1, m2, self.mx2, self.mz2)
        m1, m2 = _top2(m1, m2, self.mx3, self.mz3)
        return _top2(m1, m2, self.mx4, self.mz4)[1]

    def largest1(self) -> tuple[float, float]:
        """The largest call (tokens, cost) in the 60 s window."""
        mt = _max3(self.x0, self.x1, self.x2)
        mt = _max3(mt, self.x3, self.x4)
        mc = _max3(self.y0, self.y1, self.y2)
        mc = _max3(mc, self.y3, self.y4)
        return (mt if mt > self.x5 else self.x5), (mc if mc > self.y5 else self.y5)

    # -------------------------------------------------------------- buckets
    def _shift1(self) -> None:
        """The 10 s ring one bucket on: every bucket one age older, the
        oldest gone, the new current bucket empty."""
        self.t5, self.t4, self.t3, self.t2, self.t1, self.t0 = (
            self.t4, self.t3, self.t2, self.t1, self.t0, 0.0)
        self.c5, self.c4, self.c3, self.c2, self.c1, self.c0 = (
            self.c4, self.c3, self.c2, self.c1, self.c0, 0.0)
        self.n5, self.n4, self.n3, self.n2, self.n1, self.n0 = (
            self.n4, self.n3, self.n2, self.n1, self.n0, 0.0)
        self.x5, self.x4, self.x3, self.x2, self.x1, self.x0 = (
            self.x4, self.x3, self.x2, self.x1, self.x0, 0.0)
        self.y5, self.y4, self.y3, self.y2, self.y1, self.y0 = (
            self.y4, self.y3, self.y2, self.y1, self.y0, 0.0)
        self.z5, self.z4, self.z3, self.z2, self.z1, self.z0 = (
            self.z4, self.z3, self.z2, self.z1, self.z0, 0.0)

    def _clear1(self) -> None:
        """Empty the 10 s ring (the whole window has left)."""
        self.t0 = self.t1 = self.t2 = self.t3 = self.t4 = self.t5 = 0.0
        self.c0 = self.c1 = self.c2 = self.c3 = self.c4 = self.c5 = 0.0
        self.n0 = self.n1 = self.n2 = self.n3 = self.n4 = self.n5 = 0.0
        self.x0 = self.x1 = self.x2 = self.x3 = self.x4 = self.x5 = 0.0
        self.y0 = self.y1 = self.y2 = self.y3 = self.y4 = self.y5 = 0.0
        self.z0 = self.z1 = self.z2 = self.z3 = self.z4 = self.z5 = 0.0

    def roll(self, b: int, learn_t: bool, learn_c: bool, alpha: float, max_decay: float
             ) -> None:
        """Move to bucket ``b``: the closing window teaches the baselines
        (``learn_*``: no open episode of the kind), old buckets leave."""
        k = b - self.b
        if k <= 0:
            return
        mt, mc = self.largest1()
        f = (1.0 - alpha) ** min(k - 1, 100_000)
        d = max_decay ** min(k, 100_000)
        # the recent maximum learns only from windows below the threshold, a
        # minute or two late (else it would chase a rise before it is detected)
        new_min = b // NB - self.b // NB
        # the time-of-day profile learns every closing window (see prof)
        v = self.wt - mt
        hr = self.hr % NH
        if self.hr >= 0 and v > _DEC[self.prof[hr]]:
            self.prof = _put(self.prof, hr, _enc(v))
        if learn_t:
            m = self.mean_t
            m += alpha * (self.t0 - m)
            self.mean_t = m * f
            self.max1_t, self.p1t0, self.p1t1 = _pend(
                self.max1_t, self.p1t0, self.p1t1, self.wt - mt, self.thr_t, d, new_min)
        else:
            self.p1t0 = self.p1t1 = 0.0
        if learn_c:
            m = self.mean_c
            m += alpha * (self.c0 - m)
            self.mean_c = m * f
            self.max1_c, self.p1c0, self.p1c1 = _pend(
                self.max1_c, self.p1c0, self.p1c1, self.wc - mc, self.thr_cf, d, new_min)
        else:
            self.p1c0 = self.p1c1 = 0.0
        self.n += 1
        # the buckets leave the window, oldest first; a bucket leaving it
        # teaches the baseline price (see price_t)
        if k >= NB:
            # the whole window leaves (a sparse consumer's usual call)
            if learn_c:
                g = (1.0 - alpha) ** min(k, 100_000)
                pt = self.price_t * g
                pt += alpha * self.t5
                pt += alpha * self.t4
                pt += alpha * self.t3
                pt += alpha * self.t2
                pt += alpha * self.t1
                self.price_t = pt + alpha * self.t0
                pc = self.price_c * g
                pc += alpha * self.c5
                pc += alpha * self.c4
                pc += alpha * self.c3
                pc += alpha * self.c2
                pc += alpha * self.c1
                self.price_c = pc + alpha * self.c0
            self._clear1()
            self.wt = self.wc = self.wn = 0.0
        else:
            if learn_c:
                g = (1.0 - alpha) ** k
                pt = self.price_t * g
                pc = self.price_c * g
                for _ in range(k):
                    pt += alpha * self.t5
                    pc += alpha * self.c5
                    self._shift1()
                self.price_t, self.price_c = pt, pc
            else:
                for _ in range(k):
                    self._shift1()
            self.wt = self.t0 + self.t1 + self.t2 + self.t3 + self.t4 + self.t5
            self.wc = self.c0 + self.c1 + self.c2 + self.c3 + self.c4 + self.c5
            self.wn = self.n0 + self.n1 + self.n2 + self.n3 + self.n4 + self.n5
        self.b = b
        g = D1 ** k
        self.w1 *= g
        self.tot1 *= g


    def enter_hour(self, ts: float, decay: float) -> None:
        """Keep the time-of-day profile on the hour of ``ts``: when a new
        hour begins (``hr`` counts hours since the epoch), its bytes are
        lowered by ``decay`` a day (in codes: 8 halves a high; 0 clears
        them) and, with the next hour's as they will be, become dh1 / dh5."""
        hr = int(ts // 3600.0)
        if hr == self.hr:
            return
        day_step = 256 if decay <= 0.0 else round(-8.0 * math.log2(decay))
        p = bytearray(self.prof)
        h = hr % NH
        nx = (h + 1) % NH
        for w in (0, NH):  # 60 s, 5 min
            q = p[w + h] = _lower(p[w + h], day_step)
            p[2 * NH + w // NH] = max(q, _lower(p[w + nx], day_step))
        self.prof = bytes(p)
        self.hr = hr

    @property
    def dh1(self) -> float:
        """The highest trimmed 60 s window of this hour of the day (or the
        next) on earlier days, decayed; 0 if none."""
        return _DEC[self.prof[2 * NH]]

    @property
    def dh5(self) -> float:
        """The same, 5 min windows."""
        return _DEC[self.prof[2 * NH + 1]]

    def set_thresholds(self, thr_t: float, thr_c: float, thr_cf: float) -> None:
        self.thr_t, self.thr_c, self.thr_cf = thr_t, thr_c, thr_cf

    # --------------------------------------------------------------- minutes
    def window5(self, tokens: float, cost: float) -> tuple[float, float, float]:
        """Store the closing minute's totals; return the trimmed 5 min window:
        tokens and cost without the largest call, and the independent calls.
        Called before the 10 s ring moves on, so its buckets of the closing
        minute (ages 0 .. b % NB: minutes are 6 aligned buckets) give the
        minute's largest call and independent calls."""
        self.mt0, self.mc0 = tokens, cost
        n = mt = mc = m2 = 0.0
        if self.b // NB == self.m:
            r = self.b % NB
            n, mt, mc, m2 = self.n0, self.x0, self.y0, self.z0
            if r >= 1:
                n += self.n1
                mt, m2 = _top2(mt, m2, self.x1, self.z1)
                mc = mc if mc > self.y1 else self.y1
                if r >= 2:
                    n += self.n2
                    mt, m2 = _top2(mt, m2, self.x2, self.z2)
                    mc = mc if mc > self.y2 else self.y2
                    if r >= 3:
                        n += self.n3
                        mt, m2 = _top2(mt, m2, self.x3, self.z3)
                        mc = mc if mc > self.y3 else self.y3
                        if r >= 4:
                            n += self.n4
                            mt, m2 = _top2(mt, m2, self.x4, self.z4)
                            mc = mc if mc > self.y4 else self.y4
                            if r >= 5:
                                n += self.n5
                                mt, m2 = _top2(mt, m2, self.x5, self.z5)
                                mc = mc if mc > self.y5 else self.y5
        self.mn0, self.mx0, self.my0, self.mz0 = n, mt, mc, m2
        wt = self.mt0 + self.mt1 + self.mt2 + self.mt3 + self.mt4
        wc = self.mc0 + self.mc1 + self.mc2 + self.mc3 + self.mc4
        wn = self.mn0 + self.mn1 + self.mn2 + self.mn3 + self.mn4
        mt = _max3(_max3(self.mx0, self.mx1, self.mx2), self.mx3, self.mx4)
        mc = _max3(_max3(self.my0, self.my1, self.my2), self.my3, self.my4)
        return wt - mt, wc - mc, wn

    def pair(self) -> tuple[float, float, float, float]:
        """The closing minute and the one before it (minute ring; zeros for
        a minute without calls): the lower of their trimmed totals (tokens
        without the minute's largest call), the fewer of their independent
        calls, and each minute's second largest call (its largest left in).
        Called, as window5, before the minute ring moves on."""
        t1 = self.mt0 - self.mx0
        t0 = self.mt1 - self.mx1
        n = self.mn0 if self.mn0 < self.mn1 else self.mn1
        return (t1 if t1 < t0 else t0), n, self.mz1, self.mz0

    def _shift5(self) -> None:
        """The minute ring one minute on (the oldest gone, the new one empty)."""
        self.mt4, self.mt3, self.mt2, self.mt1, self.mt0 = (
            self.mt3, self.mt2, self.mt1, self.mt0, 0.0)
        self.mc4, self.mc3, self.mc2, self.mc1, self.mc0 = (
            self.mc3, self.mc2, self.mc1, self.mc0, 0.0)
        self.mn4, self.mn3, self.mn2, self.mn1, self.mn0 = (
            self.mn3, self.mn2, self.mn1, self.mn0, 0.0)
        self.mx4, self.mx3, self.mx2, self.mx1, self.mx0 = (
            self.mx3, self.mx2, self.mx1, self.mx0, 0.0)
        self.my4, self.my3, self.my2, self.my1, self.my0 = (
            self.my3, self.my2, self.my1, self.my0, 0.0)
        self.mz4, self.mz3, self.mz2, self.mz1, self.mz0 = (
            self.mz3, self.mz2, self.mz1, self.mz0, 0.0)

    def advance5(self, m: int, st: float, sc: float, learn_t: bool, learn_c: bool,
                 max_decay_min: float, thr_t: float = INF, thr_c: float = INF,
                 price_min_calls: float = 5.0) -> None:
        """Learn from the closed 5 min window (trimmed totals ``st``, ``sc``;
        the maximum only from windows below their threshold) and from the
        closed minute's price (a minute of ``price_min_calls`` calls or more),
        and move the minute ring to minute ``m``."""
        k = m - self.m
        if k <= 0:
            return
        d = max_decay_min ** min(k, 100_000)
        new_block = m // NM - self.m // NM
        hr = NH + self.hr % NH
        if self.hr >= 0 and st > _DEC[self.prof[hr]]:
            self.prof = _put(self.prof, hr, _enc(st))
        if learn_t:
            self.max5_t, self.p5t0, self.p5t1 = _pend(
                self.max5_t, self.p5t0, self.p5t1, st, thr_t, d, new_block)
        else:
            self.p5t0 = self.p5t1 = 0.0
        if learn_c:
            self.max5_c, self.p5c0, self.p5c1 = _pend(
                self.max5_c, self.p5c0, self.p5c1, sc, thr_c, d, new_block)
            self.pr_hi *= d
            if self.mn0 >= price_min_calls and self.mt0 > 0:
                p = self.mc0 / self.mt0
                if p <= PRICE_BACK * self.base_price():
                    # back near the baseline: the dear minutes before were a passing mix
                    if self.pr_pend > self.pr_hi:
                        self.pr_hi = self.pr_pend
                    self.pr_pend = 0.0
                    if p > self.pr_hi:
                        self.pr_hi = p
                elif p > self.pr_pend:
                    self.pr_pend = p
        else:
            self.p5c0 = self.p5c1 = 0.0
            self.pr_pend = 0.0
        for _ in range(min(k, NM)):
            self._shift5()
        self.m = m
        g = D5 ** min(k, 100)
        self.w5 *= g
        self.tot5 *= g

    # ------------------------------------------------------------- figures
    def base_price(self) -> float:
        """Baseline cost per token (ratio of the EW means), 0 if unknown."""
        return self.price_c / self.price_t if self.price_t > 0 else 0.0


def _max3(a: float, b: float, c: float) -> float:
    if b > a:
        a = b
    return c if c > a else a


def _top2(m1: float, m2: float, x1: float, x2: float) -> tuple[float, float]:
    """The two largest of (m1 >= m2) and (x1 >= x2)."""
    if x1 > m1:
        return x1, (m1 if m1 > x2 else x2)
    return m1, (x1 if x1 > m2 else m2)


def _pend(mx: float, p0: float, p1: float, s: float, thr: float, decay: float, shift: int
          ) -> tuple[float, float, float]:
    """Window value ``s`` (below ``thr``) becomes pending in ``p0``; after
    ``shift`` minutes (blocks) the pending values move on, the previous one
    (``p1``) teaching the maximum ``mx``.  Returns the new (mx, p0, p1).

    >>> _pend(10.0, 0.0, 0.0, 50.0, 100.0, 0.5, 0)  # pending, the max decays
    (5.0, 50.0, 0.0)
    >>> _pend(10.0, 50.0, 0.0, 20.0, 100.0, 1.0, 1)  # a minute on: 50 waits a minute more
    (10.0, 0.0, 50.0)
    >>> _pend(10.0, 0.0, 50.0, 0.0, 100.0, 1.0, 1)  # and then teaches the max
    (50.0, 0.0, 0.0)
    """
    if s < thr and s > p0:
        p0 = s
    x = mx * decay
    if shift > 0:
        y = p1 if shift == 1 or p1 > p0 else p0
        if y > x:
            x = y
        p1 = p0 if shift == 1 else 0.0
        p0 = 0.0
    return x, p0, p1
