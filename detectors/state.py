"""Per-key state of the detection engine: compact ``__slots__`` records.

Memory matters (one :class:`ConsumerState` per tracked consumer, 100k+ of
them, in 2 KiB each), so every baseline is a handful of floats: the per-minute
token baseline is river's ``EWVar`` kept as its two EW means
(:func:`~detectors.baselines.ew_first`), not a river object.
Per-(consumer, model) call-size baselines exist only for the models a
consumer actually uses, and request-hash trackers only once a hash repeats.
"""

from __future__ import annotations

import math
from typing import Any, Final

from .baselines import alpha_for_halflife, ew_first
from .config import Settings
from .record import Record
from .reliability import HashWindow
from .volume import BUCKET_S, Volume

INF: Final = float("inf")
# empty minutes fed to the token series one by one; beyond, the weight is negligible
MAX_FILL: Final = 240


class HotSettings:
    """The settings the per-event path reads, copied out of one
    :class:`~detectors.config.Settings`.  Compiled, this is a native class:
    one read is a field load instead of two generic attribute lookups on the
    frozen config dataclasses (a fifth of the per-event cost before).  Built
    from the settings, never pickled (see :meth:`ConsumerState.__getstate__`).
    """

    __slots__ = (
        "al_enabled",
        "al_min_calls",
        "al_min_tokens",
        "attempt_alone",
        "cb_enabled",
        "cb_min_calls",
        "cb_min_growth",
        "cb_min_input",
        "cfg",
        "cv_floor",
        "cv_guard",
        "cv_on",
        "cv_price_vol",
        "cv_ratio",
        "cv_rmax",
        "fs_alpha",
        "fs_base_z",
        "fs_client_prior",
        "fs_enabled",
        "fs_keep",
        "fs_log_keep",
        "fs_long_tau",
        "fs_max_window",
        "fs_min_failures",
        "fs_min_rate",
        "fs_min_ratio",
        "fs_min_window",
        "fs_prior_calls",
        "fs_prior_rate",
        "fs_short_tau",
        "fs_warmup",
        "rr_enabled",
        "rr_len_min",
        "rr_len_out",
        "rr_max_think",
        "rr_min_tokens",
        "rs_enabled",
        "rs_min_calls",
        "rs_ratio",
        "rs_share",
        "rs_warmup",
        "rs_z",
        "tv_alpha",
        "tv_daily",
        "tv_decay",
        "tv_floor",
        "tv_guard",
        "tv_on",
        "tv_ratio",
        "tv_rmax",
        "tv_warm_b",
        "tv_warm_s",
    )

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg  # (a consumer reaches its settings through here: one pointer less)
        fc = cfg.failure_spike
        self.fs_short_tau: float = fc.short_tau_s
        self.fs_long_tau: float = fc.long_tau_s
        self.fs_min_failures: float = fc.min_failures
        self.fs_keep: float = 1.0 - 1.0 / fc.baseline_halflife_calls
        # read at every failed call (Engine._rule_failures)
        self.fs_enabled: bool = fc.enabled
        self.fs_warmup: int = fc.warmup_calls
        self.fs_prior_rate: float = fc.prior_rate
        self.fs_prior_calls: float = fc.prior_calls
        self.fs_client_prior: float = fc.client_prior_rate
        self.fs_base_z: float = fc.baseline_z
        self.fs_min_rate: float = fc.min_rate
        self.fs_min_ratio: float = fc.min_ratio
        self.fs_max_window: float = fc.max_window_s
        self.fs_min_window: float = fc.min_window_s
        self.fs_alpha: float = fc.log10_alpha
        self.fs_log_keep: float = math.log1p(-1.0 / fc.baseline_halflife_calls)
        sc = cfg.retry_storm
        self.rs_enabled: bool = sc.enabled
        self.rs_warmup: int = sc.warmup_min
        self.rs_min_calls: int = sc.rate_min_calls
        self.rs_z: float = sc.rate_z
        self.rs_share: float = sc.rate_min_fail_share
        self.rs_ratio: float = sc.rate_ratio
        self.attempt_alone: int = sc.attempt_alone
        rc = cfg.runaway_reasoning
        self.rr_enabled: bool = rc.enabled
        self.rr_min_tokens: int = rc.min_tokens
        self.rr_max_think: int = rc.max_think_tokens
        self.rr_len_min: int = rc.length_min_reasoning
        self.rr_len_out: int = rc.length_min_output
        ac = cfg.agent_loop
        self.al_enabled: bool = ac.enabled
        self.al_min_calls: int = ac.min_calls
        self.al_min_tokens: int = ac.min_tokens
        bc = cfg.context_bloat
        self.cb_enabled: bool = bc.enabled
        self.cb_min_calls: int = bc.min_calls
        self.cb_min_growth: float = bc.min_growth
        self.cb_min_input: int = bc.min_input_tokens
        # the rate windows' settings read at every 10 s bucket a consumer
        # closes (Engine._roll_volume, _young): once per call of a sparse one
        tc = cfg.token_spike
        per_bucket = 60.0 / BUCKET_S
        self.tv_alpha: float = alpha_for_halflife(tc.halflife_min * per_bucket)
        self.tv_decay: float = 1.0 - alpha_for_halflife(tc.max_halflife_min * per_bucket)
        self.tv_daily: float = tc.daily_decay
        self.tv_on: bool = tc.enabled
        self.tv_floor: float = tc.min_tokens_per_min
        self.tv_ratio: float = tc.ratio
        self.tv_rmax: float = tc.ratio_to_recent_max
        self.tv_guard: float = tc.max_tokens_per_min
        self.tv_warm_s: float = tc.warmup_min * 60.0
        self.tv_warm_b: int = tc.warmup_buckets
        cc = cfg.cost_spike
        self.cv_on: bool = cc.enabled
        self.cv_floor: float = cc.min_cost_per_min
        self.cv_ratio: float = cc.ratio
        self.cv_rmax: float = cc.ratio_to_recent_max
        self.cv_price_vol: float = cc.price_jump_volume_ratio
        self.cv_guard: float = cc.max_cost_per_min


class ConsumerState(Volume):
    """One tracked consumer.  It *is* its :class:`~detectors.volume.Volume`
    (the 60 s / 5 min rate windows of token_spike and cost_spike), which is
    its :class:`~detectors.reliability.FailWindow` (its last failures, for
    failure_spike), so that a consumer costs one object plus a few small
    records."""

    __slots__ = (
        "calls",
        "cpm_mean",
        "cpm_var",
        "f_base",
        "fa",
        "first_ts",
        "fl",
        "fs",
        "hot",
        "key",
        "last_ts",
        "m_calls",
        "m_cost",
        "m_fail",
        "m_tok",
        "mb1",
        "n_base",
        "nl",
        "ns",
        "run",
        "sz_fn",
        "sz_fsum",
        "sz_mean",
        "sz_mn",
        "sz_msq",
        "sz_msum",
        "sz_n",
        "sz_var",
        "tenant",
        "tok_m2",
        "tok_mean",
        "tok_n",
    )

    def __init__(self, key: str, tenant: str, cfg: Settings, ts: float,
                 hot: HotSettings | None = None) -> None:
        # 60 s / 5 min rate windows (token_spike, cost_spike), then the figures above
        Volume.__init__(self, ts)
        self.key = key
        self.tenant = tenant
        self.hot = hot if hot is not None else HotSettings(cfg)
        # The per-event figures are plain float attributes: compiled, a
        # native class stores them unboxed (8 bytes each, as in an array) and
        # reads them without a float object; in an array('d') every read and
        # write boxed or unboxed one (a tenth of the per-event cost).
        # Interpreted, each costs a float object (24 bytes) more.
        self.first_ts: float = ts
        self.last_ts: float = ts  # also the time the decayed failure counts refer to
        # current minute's tokens (whole numbers), cost and failed calls (retries too)
        self.m_tok: float = 0.0
        self.m_cost: float = 0.0
        self.m_fail: float = 0.0
        # calls / minute: EW mean and variance (see baselines.EW)
        self.cpm_mean: float = 0.0
        self.cpm_var: float = 0.0
        # failures: decayed counts (short and long window) and a slow baseline
        # (EW failures / calls, counts with a half-life in calls)
        self.ns: float = 0.0
        self.fs: float = 0.0  # failed distinct requests (retries of a failing one not counted)
        self.fa: float = 0.0  # every failed call, short window (the rate-jump rule's share)
        self.nl: float = 0.0
        self.fl: float = 0.0
        self.f_base: float = 0.0
        self.n_base: float = 0.0
        # tokens / minute: EW means of x and x**2 (river's EWVar: tok_sd)
        self.tok_mean: float = 0.0
        self.tok_m2: float = 0.0
        # log input tokens of independent calls (token_spike, call-size rule):
        # slow per-minute EW mean and per-call variance, minutes learnt, a fast
        # decayed sum and count (~5 min), the current minute's sum, sum of
        # squares and count
        self.sz_mean: float = 0.0
        self.sz_var: float = 0.0
        self.sz_n: float = 0.0
        self.sz_fsum: float = 0.0
        self.sz_fn: float = 0.0
        self.sz_msum: float = 0.0
        self.sz_msq: float = 0.0
        self.sz_mn: float = 0.0
        self.m_calls = 0
        self.tok_n = 0
        self.calls = 0
        # call-size baselines per model, a chain in the order the models were
        # first seen (ModelCallBaseline.nxt): most consumers use one model, a
        # fifth two; a dict of the others cost 184 bytes
        self.mb1: ModelCallBaseline | None = None
        # agent runs: EW of log(calls) (t_) and log(tokens) (l_) per
        # completed normal run, from the first
        self.run: LogPair | None = None

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        # the settings come from the config at restore (Engine.restore)
        st = Volume.__getstate__(self)
        st[1].pop("hot", None)
        return st

    @property
    def cfg(self) -> Settings:
        return self.hot.cfg

    def tok_update(self, x: float, a: float) -> None:
        """Learn a minute's tokens ``x`` (``a``: the EW weight)."""
        n = self.tok_n
        self.tok_mean = ew_first(n, self.tok_mean, x, a)
        self.tok_m2 = ew_first(n, self.tok_m2, x * x, a)
        self.tok_n = n + 1

    def tok_fill_zeros(self, k: int, a: float) -> None:
        """Learn ``k`` empty minutes (at most :data:`MAX_FILL`: beyond, the
        weight of what came before is negligible)."""
        for _ in range(min(k, MAX_FILL)):
            self.tok_update(0.0, a)

    def tok_sd(self) -> float:
        """The EW standard deviation (river's ``EWVar``: m2 - mean**2)."""
        return math.sqrt(max(self.tok_m2 - self.tok_mean * self.tok_mean, 0.0))

    def model_baseline(self, model: str) -> ModelCallBaseline:
        """The (consumer, model) call-size baseline, created on first use."""
        b = self.mb1
        if b is None:
            b = self.mb1 = ModelCallBaseline(model)
            return b
        while b.model != model:
            nxt = b.nxt
            if nxt is None:
                nxt = b.nxt = ModelCallBaseline(model)
            b = nxt
        return b

    def model_count(self) -> int:
        n = 0
        b = self.mb1
        while b is not None:
            n += 1
            b = b.nxt
        return n

    def model_items(self) -> list[tuple[str, ModelCallBaseline]]:
        """(model, baseline) in the order the models were first seen."""
        out = []
        b = self.mb1
        while b is not None:
            out.append((b.model, b))
            b = b.nxt
        return out

    def learn_run(self, calls: float, tokens: float) -> None:
        """A completed normal run teaches the run-length baselines."""
        r = self.run
        if r is None:
            r = self.run = LogPair()
        r.t_update(calls, 0.05, 0.995)
        r.l_update(tokens, 0.05, 0.995)

    @property
    def runs(self) -> int:
        """Completed normal runs (that taught the run-length baselines)."""
        return 0 if self.run is None else int(self.run.t_n)

    @property
    def minute(self) -> int:
        """The current minute (the 5 min ring's)."""
        return self.m


class LogPair(Record):
    """Two log-scale baselines in one record, ``t_`` and ``l_``: each an EW
    mean and variance of ``log1p(x)`` and a slowly decaying maximum (the
    largest normal value seen lately) with its count, written out as float
    attributes (compiled, a native class stores them unboxed: one object
    instead of three, and no float boxed per read).  A consumer's agent
    runs keep one: calls (``t_``) and tokens (``l_``) per run;
    :class:`ModelCallBaseline` adds what a call-size baseline needs.

    >>> b = LogPair()
    >>> b.t_update(100.0, 0.02, 0.998); b.t_update(300.0, 0.02, 0.998)
    >>> round(b.t_geomean(), 1), b.t_rmax, int(b.t_n)
    (102.2, 300.0, 2)

    The usual high (``t_high``) is the limit, but never above the largest
    recent value: a log-normal fitted to a bounded or mixed distribution
    (agent runs of 1 to 30 calls, a few tiny failed runs) puts its tail far
    beyond anything seen (the fit said 56 calls and 7.2M tokens for a
    consumer whose longest runs were 25 calls and 173k tokens):

    >>> r = LogPair()
    >>> for x in [1, 30, 2, 25, 8, 3, 28, 1, 12, 30] * 3:
    ...     r.t_update(x, 0.05, 0.995)
    >>> round(r.t_limit(2.33)), round(r.t_high(2.33))
    (100, 30)
    """

    __slots__ = ("l_m", "l_n", "l_rmax", "l_v", "t_m", "t_n", "t_rmax", "t_v")

    def __init__(self) -> None:
        self.t_m = self.t_v = self.t_rmax = self.t_n = 0.0
        self.l_m = self.l_v = self.l_rmax = self.l_n = 0.0

    # the two recursions are written out twice, not shared through a helper
    # taking the record's figures: this runs for most calls
    def t_update(self, x: float, a: float, decay: float) -> None:
        """Learn ``x`` (``a``: the EW weight; ``decay``: the maximum's)."""
        lx = math.log1p(x)
        if self.t_n == 0:
            self.t_m = lx
        else:
            m = self.t_m
            d = lx - m
            inc = a * d
            self.t_m = m + inc
            self.t_v = (1.0 - a) * (self.t_v + d * inc)
        r = self.t_rmax * decay
        self.t_rmax = x if x > r else r
        self.t_n += 1.0

    def l_update(self, x: float, a: float, decay: float) -> None:
        """Learn ``x`` (second series)."""
        lx = math.log1p(x)
        if self.l_n == 0:
            self.l_m = lx
        else:
            m = self.l_m
            d = lx - m
            inc = a * d
            self.l_m = m + inc
            self.l_v = (1.0 - a) * (self.l_v + d * inc)
        r = self.l_rmax * decay
        self.l_rmax = x if x > r else r
        self.l_n += 1.0

    def t_limit(self, z: float, sd_floor: float = 0.25) -> float:
        """``expm1(mean + z sd)`` of the log values (sd at least ``sd_floor``)."""
        v = self.t_v
        sd = math.sqrt(v) if v > 0 else 0.0
        return math.expm1(self.t_m + z * max(sd, sd_floor))

    def l_limit(self, z: float, sd_floor: float = 0.25) -> float:
        """The same, second series."""
        v = self.l_v
        sd = math.sqrt(v) if v > 0 else 0.0
        return math.expm1(self.l_m + z * max(sd, sd_floor))

    def t_high(self, z: float, sd_floor: float = 0.25) -> float:
        """The limit, capped at the recent maximum (see the class doc)."""
        lim = self.t_limit(z, sd_floor)
        return lim if lim < self.t_rmax else self.t_rmax

    def l_high(self, z: float, sd_floor: float = 0.25) -> float:
        """The same, second series."""
        lim = self.l_limit(z, sd_floor)
        return lim if lim < self.l_rmax else self.l_rmax

    def t_geomean(self) -> float:
        return math.expm1(self.t_m)

    def l_geomean(self) -> float:
        return math.expm1(self.l_m)


class ModelCallBaseline(LogPair):
    """Size and duration of one call, for one (consumer, model) or one model:
    the thinking (``t_``: reasoning tokens, or output tokens for a model that
    reports no reasoning) and the duration in seconds (``l_``) as a
    :class:`LogPair`; ``has_r``, 1.0 once the model reported reasoning
    tokens; the model's name and the consumer's next model's baseline
    (``nxt``: a consumer's models are a chain, see :class:`ConsumerState`).

    >>> b = ModelCallBaseline("m")
    >>> b.l_update(2.5, 0.02, 0.998); round(b.l_geomean(), 9), b.has_reasoning, b.nxt
    (2.5, False, None)
    """

    __slots__ = ("has_r", "model", "nxt")

    def __init__(self, model: str = "") -> None:
        LogPair.__init__(self)
        self.has_r = 0.0
        self.model = model
        self.nxt: ModelCallBaseline | None = None

    @property
    def has_reasoning(self) -> bool:
        return self.has_r != 0.0


class RunState(Record):
    """One agent run (trace_id) or session (session_id)."""

    __slots__ = ("calls", "consumer", "failed", "first_ts", "flagged", "grow_first", "grow_inc",
                 "grow_n", "ids", "last_input", "last_ts", "model", "skipped", "tenant", "tokens")

    def __init__(self, consumer: str, tenant: str, ts: float, model: str) -> None:
        self.consumer = consumer
        self.tenant = tenant
        self.model = model
        self.first_ts = ts
        self.last_ts = ts
        self.calls = 0
        self.failed = 0  # failed calls (agent_loop counts the answered ones)
        self.tokens = 0
        self.last_input = -1
        self.grow_n = 0
        self.grow_first = 0
        self.grow_inc = 0.0  # EW increment of the input along the streak
        self.skipped = 0  # failed calls since the last successful one
        self.flagged = 0  # bits: 1 agent_loop, 2 context_bloat, 4 session record, 8 long growth
        self.ids: list[str] = []


class RepeatState(Record):
    """A request_hash of one consumer that was seen more than once recently."""

    __slots__ = (
        "c",
        "consumer",
        "f",
        "first_ts",
        "hash",
        "ident",
        "ids",
        "mixed",
        "model",
        "ok_total",
        "ok_uncached",
        "t",
        "total",
        "total_fail",
        "u",
        "win",
    )

    def __init__(self, consumer: str, rh: str, ts: float, model: str, ident: Any) -> None:
        self.consumer = consumer
        self.hash = rh
        self.first_ts = ts
        self.t = ts
        self.c = 1.0  # decayed attempts, counting the earlier sighting
        self.f = 0.0  # decayed failed attempts
        self.total = 1
        self.total_fail = 0
        self.ok_total = 0
        self.ok_uncached = 0
        self.u = 0.0  # decayed uncached answers (time constant: a prompt cache's life)
        self.model = model
        self.ident = ident
        self.mixed = False
        self.ids: list[str] = []
        self.win: HashWindow | None = None  # last attempts (retry_storm), lazily


class ModelState(Record):
    """Failure statistics of one model across all its consumers, in two
    buckets of ``model_window_s / 2`` (current and previous), per consumer:
    calls (consumer -> count) and failures (only consumers that failed)."""

    __slots__ = ("b_start", "calls", "check_at", "cur", "cur_f", "cur_n", "curf", "f_base",
                 "first_ts", "last_ts", "n_base", "prev", "prev_f", "prev_n", "prevf", "size")

    def __init__(self, ts: float) -> None:
        self.b_start = ts
        self.first_ts = ts  # the model's first call (the runaway stand-in's warm-up)
        self.cur: dict[str, int] = {}  # consumer -> calls
        self.curf: dict[str, int] = {}  # consumer -> failures (> 0)
        self.prev: dict[str, int] = {}
        self.prevf: dict[str, int] = {}
        self.cur_n = self.cur_f = self.prev_n = self.prev_f = 0.0
        self.f_base = 0.0
        self.n_base = 0.0
        self.calls = 0
        self.last_ts = ts
        self.check_at = -INF
        self.size = ModelCallBaseline()  # call sizes across consumers (runaway fallback)

    def window(self, consumer: str) -> tuple[float, float]:
        """(calls, failures) of one consumer in the window."""
        n = self.cur.get(consumer, 0) + self.prev.get(consumer, 0)
        f = self.curf.get(consumer, 0) + self.prevf.get(consumer, 0)
        return float(n), float(f)

    def failures(self, consumer: str) -> int:
        return self.curf.get(consumer, 0) + self.prevf.get(consumer, 0)

    def top_failing(self) -> tuple[str, float, float]:
        """The consumer with the most failures in the window (ties: the
        greatest name) with its (calls, failures); the window must hold a
        failure."""
        curf, prevf = self.curf, self.prevf
        best: tuple[int, str] | None = None
        for c, f in curf.items():
            k = (f + prevf.get(c, 0), c)
            if best is None or k > best:
                best = k
        for c, f in prevf.items():
            if c not in curf:
                k = (f, c)
                if best is None or k > best:
                    best = k
        assert best is not None
        c = best[1]
        return c, float(self.cur.get(c, 0) + self.prev.get(c, 0)), float(best[0])

    def n_failing(self) -> int:
        """Consumers with a failure in the window."""
        curf = self.curf
        return len(curf) + sum(1 for c in self.prevf if c not in curf)

    def n_active(self) -> int:
        """Consumers with a call in the window."""
        cur = self.cur
        return len(cur) + sum(1 for c in self.prev if c not in cur)
