"""The detection engine: events in, findings out, on event time only.

>>> from datetime import datetime, timedelta, UTC
>>> from ingest.event import UsageEvent
>>> eng = Engine()
>>> t0 = datetime(2026, 1, 5, tzinfo=UTC)
>>> ev = lambda i, **kw: UsageEvent(**{"event_id": f"e{i}", "consumer": "app", "model": "o3-mini",
...     "status": 200, "ts": t0 + timedelta(seconds=i), "output_tokens": 300, **kw})
>>> [f for i in range(50) for f in eng.observe(ev(i))]
[]
>>> [f] = eng.observe(ev(60, latency_ms=900_000, output_tokens=30_000, reasoning_tokens=29_000))
>>> f.kind, f.severity, f.consumer, f.evidence["rule"]
('runaway_reasoning', 'warning', 'app', 'max_latency')
>>> [r.status for r in eng.advance(t0 + timedelta(hours=2))]
['resolved']
>>> eng2 = Engine.restore(eng.snapshot()); eng2.tracked_consumers()
1

How the detectors decide is documented on each ``_rule_*`` method.  Shared
rules: nothing relative fires before a baseline exists (warm-up counts in the
config), only absolute guardrails do; calls and minutes that belong to an open
anomaly episode do not update the baselines of that anomaly; every finding
belongs to an episode (see :mod:`detectors.episodes`).
"""

from __future__ import annotations

import math
import pickle
from datetime import datetime
from typing import Any

from ingest.event import UsageEvent

from .baselines import LN10, LogBaseline, alpha_for_halflife, binom_surprise
from .config import DetectorConfig, Settings
from .episodes import EpisodeBook
from .finding import Finding
from .state import INF, ConsumerState, ModelCallBaseline, ModelState, RepeatState, RunState

SNAPSHOT_VERSION = 1
TICK_S = 15.0
SWEEP_S = 60.0
EVICT_SWEEP_S = 600.0
FAST_ALPHA = alpha_for_halflife(2.0)  # per-minute EW for the sustained spike rule
FAST_SD = math.sqrt(FAST_ALPHA / (2.0 - FAST_ALPHA))  # sd of that EW relative to one minute
MAX_DECAY = 0.5 ** (1.0 / 180.0)  # per minute: the recent-max of minute tokens halves in 3 h
LEARN_SAMPLE = 4  # settled (consumer, model) call-size baselines learn from 1 call in 4
MODEL_SAMPLE = 4  # model-wide call-size baselines learn from one call in this many
PRIOR_RUN_HI = 30.0  # calls in a long normal agent run (tau-bench: 0-27 tool calls)


def _fmt(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}"


class Engine:
    """Streaming anomaly detection over usage events (see module doc)."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        ec = self.config.engine
        self._now = -INF
        self._consumers: dict[str, ConsumerState] = {}
        self._models: dict[str, ModelState] = {}
        self._runs: dict[str, RunState] = {}
        self._repeats: dict[str, RepeatState] = {}
        self._seen_cur: set[str] = set()
        self._seen_prev: set[str] = set()
        self._seen_rotate = -INF
        self._runaway_ts: dict[str, list[float]] = {}
        self._book = EpisodeBook(ec.update_interval_s, ec.update_growth)
        self._next_tick = -INF
        self._next_sweep = -INF
        self._next_evict = -INF
        self._alphas: dict[float, float] = {}

    # ------------------------------------------------------------------ API
    def observe(self, event: UsageEvent) -> list[Finding]:
        """Process one event; return new, updated and resolved findings."""
        ts = event.ts.timestamp()
        out: list[Finding] = []
        if ts > self._now:
            self._now = ts
            if ts >= self._next_tick:
                out.extend(self._tick(ts))
        consumer = event.consumer
        cs = self._consumers.get(consumer)
        if cs is None:
            cs = self._new_consumer(event, ts)
        cfg = cs.cfg
        status = event.status
        failed = status == 0 or status >= 400 or event.finish_reason == "error"
        tokens = event.input_tokens + event.output_tokens
        cost = event.cost or 0.0

        # -- per-minute totals (token_spike, cost_spike, rate rules)
        m = int(ts // 60)
        if m > cs.minute:
            self._close_minutes(cs, m, ts, out)
        cs.m_tok += tokens
        cs.m_cost += cost
        cs.m_calls += 1
        cs.calls += 1
        if ts > cs.last_ts:
            cs.last_ts = ts

        # -- request-hash repeats (retry_storm, cache_opportunity)
        rh = event.request_hash
        repeat_fail = False
        if rh is not None:
            repeat_fail = self._repeat(cs, event, rh, ts, failed, out)

        # -- decayed call / failure counts (failure_spike, retry_storm rate rule)
        fc = cfg.failure_spike
        dt = ts - cs.t_fail
        if dt > 0:
            ds = math.exp(-dt / fc.short_tau_s)
            dl = math.exp(-dt / fc.long_tau_s)
            cs.ns *= ds
            cs.fs *= ds
            cs.nl *= dl
            cs.fl *= dl
            cs.t_fail = ts
        cs.ns += 1.0
        cs.nl += 1.0
        ms = self._models.get(event.model)
        if ms is None:
            ms = self._models[event.model] = ModelState(ts)
        self._model_calls(ms, event, ts, failed, out)
        if failed:
            cs.last_fail_model = event.model
            if not repeat_fail:
                cs.fs += 1.0
                cs.fl += 1.0
            self._rule_failures(cs, ms, event, ts, out)
        # failure baseline (calls that belong to an open failure episode do not teach it)
        if (cs.fs < fc.min_failures or cs.fs < 2.0 * cs.ns * (cs.f_base + 1.0) / (
                cs.n_base + 50.0)) and not self._failure_open(cs):
            a = 1.0 / fc.baseline_halflife_calls
            cs.n_base = cs.n_base * (1.0 - a) + 1.0
            cs.f_base = cs.f_base * (1.0 - a) + (1.0 if failed and not repeat_fail else 0.0)

        # -- call size (runaway_reasoning)
        if not failed and (event.output_tokens or event.latency_ms):
            self._rule_runaway(cs, ms, event, ts, out)

        # -- runs and sessions (agent_loop, context_bloat)
        tid = event.trace_id
        sid = event.session_id
        if tid is not None or sid is not None:
            self._rule_runs(cs, event, ts, tokens, failed, tid, sid, out)

        # -- spikes inside the current minute
        if cs.m_tok > cs.thr_tok and cs.m_calls >= cfg.token_spike.min_calls:
            self._rule_token_spike(cs, ts, event, out, sustained=False)
        if cs.m_cost > cs.thr_cost:
            self._rule_cost_spike(cs, ts, event, out, sustained=False)
        return out

    def advance(self, now: datetime) -> list[Finding]:
        """Move the event-time clock to ``now``; resolve quiet episodes."""
        ts = now.timestamp()
        if ts > self._now:
            self._now = ts
        return self._tick(self._now, force=True)

    def snapshot(self) -> bytes:
        """The full state, as bytes (pickle; river is pinned)."""
        state = {k: v for k, v in self.__dict__.items() if k != "config"}
        return pickle.dumps((SNAPSHOT_VERSION, state), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, data: bytes, config: DetectorConfig | None = None) -> Engine:
        version, state = pickle.loads(data)
        if version != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {version} is not supported "
                             f"(expected {SNAPSHOT_VERSION})")
        eng = cls(config)
        eng.__dict__.update(state)
        # settings come from the (possibly new) config, not from the snapshot
        cache: dict[tuple[str, str], Settings] = {}
        for cs in eng._consumers.values():
            key = (cs.tenant, cs.key)
            s = cache.get(key)
            if s is None:
                s = cache[key] = eng.config.settings_for(cs.tenant, cs.key)
            cs.cfg = s
        ec = eng.config.engine
        eng._book.interval_s, eng._book.growth = ec.update_interval_s, ec.update_growth
        return eng

    def tracked_consumers(self) -> int:
        return len(self._consumers)

    def open_findings(self) -> list[Finding]:
        """The current revision of every open episode."""
        return [ep.finding() for ep in self._book.open.values()]

    # ------------------------------------------------------------ plumbing
    def _new_consumer(self, event: UsageEvent, ts: float) -> ConsumerState:
        cfg = self.config.settings_for(event.tenant, event.consumer)
        cs = ConsumerState(event.consumer, event.tenant, cfg, ts)
        self._consumers[event.consumer] = cs
        return cs

    def _alpha(self, halflife: float) -> float:
        a = self._alphas.get(halflife)
        if a is None:
            a = self._alphas[halflife] = alpha_for_halflife(halflife)
        return a

    def _tick(self, now: float, force: bool = False) -> list[Finding]:
        out: list[Finding] = []
        if now < self._next_tick and not force:
            return out
        self._next_tick = now + TICK_S
        out.extend(self._book.resolve_due(now))
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            self._sweep_runs(now)
            self._sweep_repeats(now)
        if now >= self._next_evict:
            self._next_evict = now + EVICT_SWEEP_S
            self._evict(now)
        return out

    def _evict(self, now: float) -> None:
        limit = now - self.config.engine.evict_idle_s
        for k in [k for k, cs in self._consumers.items() if cs.last_ts < limit]:
            del self._consumers[k]
            self._runaway_ts.pop(k, None)
        for name in [n for n, ms in self._models.items() if ms.last_ts < limit]:
            del self._models[name]
        for k in [k for k, v in self._runaway_ts.items() if not v or v[-1] < now - 86400]:
            del self._runaway_ts[k]

    def _fire(self, out: list[Finding], *, kind: str, scope: str, subject: str, tenant: str,
              consumer: str | None, model: str | None, ts: float, first_ts: float,
              observed: float, baseline: float, threshold: float, severity: str, action: str,
              summary: str, evidence: dict[str, Any], quiet_s: float) -> None:
        book = self._book
        ep = book.open.get((kind, scope, subject, tenant))
        if (ep is not None and ts - ep.last_touch <= ep.quiet_s and ts - ep.last_touch < 10.0
                and observed < book.growth * ep.last_emit_obs and severity == ep.severity
                and action == ep.action):
            # cheap path while an episode goes on: keep it alive, no new revision
            if ts > ep.last_touch:
                ep.last_touch = ts
            return
        out.extend(book.touch(kind=kind, scope=scope, subject=subject, tenant=tenant,
                              consumer=consumer, model=model, now=ts, first_ts=first_ts,
                              observed=observed, baseline=baseline, threshold=threshold,
                              severity=severity, action=action, summary=summary,
                              evidence=evidence, quiet_s=quiet_s))

    def _is_open(self, kind: str, scope: str, subject: str, tenant: str, ts: float) -> bool:
        ep = self._book.open.get((kind, scope, subject, tenant))
        return ep is not None and ts - ep.last_touch <= ep.quiet_s

    # ------------------------------------------------------------- minutes
    def _close_minutes(self, cs: ConsumerState, m: int, ts: float, out: list[Finding]) -> None:
        """Close the consumer's current minute (and the empty minutes after it)
        and compute the thresholds for minute ``m``."""
        cfg = cs.cfg
        tc = cfg.token_spike
        cc = cfg.cost_spike
        gap = m - cs.minute - 1
        x_tok, x_cost, x_calls = cs.m_tok, cs.m_cost, cs.m_calls
        # the sustained rule: a 2-minute EW of the minute totals against the baseline
        f1 = 1.0 - FAST_ALPHA
        cs.tok_fast += FAST_ALPHA * (x_tok - cs.tok_fast)
        cs.cost_fast += FAST_ALPHA * (x_cost - cs.cost_fast)
        cs.calls_fast += FAST_ALPHA * (x_calls - cs.calls_fast)
        thr_max = cs.tok_max * tc.ratio_to_recent_max
        tok, cost = cs.tok, cs.cost
        warm = tok.n >= tc.warmup_min
        if warm and cs.calls_fast >= tc.min_calls / 2.0:
            if cs.tok_fast > max(thr_max * 0.5, self._fast_thr(
                    tok.mean, tok.sd(), tc.ratio, tc.z, tc.min_tokens_per_min)):
                self._rule_token_spike(cs, ts, None, out, sustained=True)
            if cs.cost_fast > self._fast_thr(cost.mean, cost.sd(), cc.ratio, cc.z,
                                             cc.min_cost_per_min):
                self._rule_cost_spike(cs, ts, None, out, sustained=True)
        if gap > 0:
            d = f1 ** min(gap, 10_000)
            cs.tok_fast *= d
            cs.cost_fast *= d
            cs.calls_fast *= d
        # the baselines learn from normal minutes only: a minute inside an open
        # spike episode is skipped (after two hours the level shift is learnt,
        # clipped at the threshold, so a permanent change stops firing)
        tenant, key = cs.tenant, cs.key
        tok_ep = self._book.open.get(("token_spike", "consumer", key, tenant))
        cost_ep = self._book.open.get(("cost_spike", "consumer", key, tenant))
        ca = self._alpha(tc.halflife_min)
        if tok_ep is None or ts - tok_ep.first_ts > 7200:
            tok.update(min(x_tok, cs.thr_tok) if tok_ep is not None else x_tok)
            mx = cs.tok_max * MAX_DECAY ** (gap + 1)
            cs.tok_max = x_tok if x_tok > mx else mx
            cs.cpm.update(x_calls, ca)
        if cost_ep is None or ts - cost_ep.first_ts > 7200:
            cost.update(min(x_cost, cs.thr_cost) if cost_ep is not None else x_cost)
        if gap > 0:
            tok.fill_zeros(gap)
            cost.fill_zeros(gap)
            cs.cpm.fill_zeros(gap, ca)
        cs.minute = m
        cs.m_tok = 0
        cs.m_cost = 0.0
        cs.m_calls = 0
        cs.m_fail = 0
        if tok.n >= tc.warmup_min:
            cs.thr_tok = (max(tc.min_tokens_per_min, tc.ratio * tok.mean,
                              tok.mean + tc.z * tok.sd(), tc.ratio_to_recent_max * cs.tok_max)
                          if tc.enabled else INF)
            cs.thr_cost = (max(cc.min_cost_per_min, cc.ratio * cost.mean,
                               cost.mean + cc.z * cost.sd()) if cc.enabled else INF)
        else:
            cs.thr_tok = tc.max_tokens_per_min if tc.enabled and tc.max_tokens_per_min else INF
            cs.thr_cost = cc.max_cost_per_min if cc.enabled and cc.max_cost_per_min else INF

    @staticmethod
    def _fast_thr(mean: float, sd: float, ratio: float, z: float, floor: float) -> float:
        # a sustained level: half the single-minute ratio, and a z-test on the
        # EW mean of the last few minutes (its sd is FAST_SD x a minute's sd)
        return max(floor, 0.5 * ratio * mean, mean + z * FAST_SD * sd, 2.0 * mean)

    # ------------------------------------------------------- token / cost
    def _rule_token_spike(self, cs: ConsumerState, ts: float, event: UsageEvent | None,
                          out: list[Finding], *, sustained: bool) -> None:
        """token_spike: the current minute's tokens above
        max(floor, ratio x mean, mean + z x sd) of the consumer's per-minute
        baseline (EW with empty minutes as zeros, so bursts and silences are
        part of normal), or the last few minutes' EW level above half that
        ratio (a sustained rise)."""
        tc = cs.cfg.token_spike
        if not tc.enabled:
            return
        tok = cs.tok
        if sustained:
            obs, thr = cs.tok_fast, self._fast_thr(tok.mean, tok.sd(), tc.ratio, tc.z,
                                                   tc.min_tokens_per_min)
            thr = max(thr, 0.5 * tc.ratio_to_recent_max * cs.tok_max)
        else:
            obs, thr = float(cs.m_tok), cs.thr_tok
        base = tok.mean
        evidence: dict[str, Any] = {"rule": "sustained" if sustained else "minute",
                                    "tokens_this_minute": cs.m_tok,
                                    "baseline_mean": round(base, 1),
                                    "baseline_sd": round(tok.sd(), 1)}
        if event is not None:
            evidence["event_id"] = event.event_id
        self._fire(out, kind="token_spike", scope="consumer", subject=cs.key, tenant=cs.tenant,
                   consumer=cs.key, model=event.model if event is not None else None, ts=ts,
                   first_ts=cs.minute * 60.0, observed=obs, baseline=base, threshold=thr,
                   severity="warning", action="alert",
                   summary=(f"{cs.key}: {_fmt(obs)} tokens/min vs a baseline of {_fmt(base)} "
                            f"(threshold {_fmt(thr)})"),
                   evidence=evidence, quiet_s=tc.quiet_s)

    def _rule_cost_spike(self, cs: ConsumerState, ts: float, event: UsageEvent | None,
                         out: list[Finding], *, sustained: bool) -> None:
        """cost_spike: cost per minute above its threshold (as token_spike)
        and *not explained by token volume*: either tokens are below their own
        threshold or the cost per token is ``price_ratio`` x its baseline
        (a switch to an expensive model, or outputs instead of inputs)."""
        cc = cs.cfg.cost_spike
        if not cc.enabled:
            return
        cost, tok = cs.cost, cs.tok
        if sustained:
            obs, thr = cs.cost_fast, self._fast_thr(cost.mean, cost.sd(), cc.ratio, cc.z,
                                                    cc.min_cost_per_min)
            obs_tok = cs.tok_fast
        else:
            obs, thr = cs.m_cost, cs.thr_cost
            obs_tok = float(cs.m_tok)
        base_price = cost.mean / tok.mean if tok.mean > 0 else 0.0
        price = obs / obs_tok if obs_tok > 0 else 0.0
        if not (base_price > 0 and price >= cc.price_ratio * base_price):
            return  # volume, not price: a token spike, reported as such
        evidence: dict[str, Any] = {
            "rule": "sustained" if sustained else "minute", "cost_this_minute": round(cs.m_cost, 4),
            "tokens_this_minute": cs.m_tok, "baseline_mean": round(cost.mean, 4),
            "cost_per_mtok": round(price * 1e6, 3), "baseline_cost_per_mtok": round(
                base_price * 1e6, 3)}
        if event is not None:
            evidence["event_id"] = event.event_id
            evidence["model"] = event.model
        self._fire(out, kind="cost_spike", scope="consumer", subject=cs.key, tenant=cs.tenant,
                   consumer=cs.key, model=event.model if event is not None else None, ts=ts,
                   first_ts=cs.minute * 60.0, observed=obs, baseline=cost.mean, threshold=thr,
                   severity="warning", action="alert",
                   summary=(f"{cs.key}: cost {obs:.3f}/min vs a baseline of {cost.mean:.3f} "
                            f"(threshold {thr:.3f}); {price * 1e6:.2f} per Mtok vs "
                            f"{base_price * 1e6:.2f}"),
                   evidence=evidence, quiet_s=cc.quiet_s)

    # ----------------------------------------------------------- failures
    def _failure_open(self, cs: ConsumerState) -> bool:
        return ("failure_spike", "consumer", cs.key, cs.tenant) in self._book.open

    def _p0(self, f_base: float, n_base: float, prior_rate: float, prior_calls: float) -> float:
        return (f_base + prior_rate * prior_calls) / (n_base + prior_calls)

    def _rule_failures(self, cs: ConsumerState, ms: ModelState, event: UsageEvent, ts: float,
                       out: list[Finding]) -> None:
        """failure_spike (consumer scope) and the retry_storm rate rule.

        failure_spike: the failures of *distinct* requests (retries of a
        failing request_hash are not counted twice) in a decayed window
        (short: 30 s, long: 300 s) against the consumer's baseline rate p0
        (EW over calls with a Beta prior of ``prior_rate``): fires when there
        are at least ``min_failures``, the rate is at least
        max(min_rate, min_ratio x p0), and the one-sided binomial test
        rejects p0 at ``10**log10_alpha`` (Chernoff bound).  It defers to the
        model scope when other consumers of the model fail too (an upstream
        outage is not the consumer's fault) and to retry_storm when the call
        rate jumped.

        retry_storm (rate rule): calls in the last ~30 s, per minute, above
        max(rate_min_calls, rate_ratio x mean + rate_z x sd) of the consumer's
        calls per minute, most of them failing.
        """
        cfg = cs.cfg
        fc = cfg.failure_spike
        rc = cfg.retry_storm
        model = event.model
        if len(cs.models) > 1:
            # the model this consumer's recent failures are on
            best = -1.0
            for name in cs.models:
                m2 = self._models.get(name)
                if m2 is not None:
                    fw = m2.window(cs.key)[1]
                    if fw > best:
                        best, model, ms = fw, name, m2
        outage = self._is_open("failure_spike", "model", model, "*", ts)
        # rate rule
        rate_now = cs.ns * 60.0 / fc.short_tau_s
        cpm = cs.cpm
        cpm_sd = cpm.sd()
        warm_rate = cs.tok.n >= rc.warmup_min
        rate_thr = max(rc.rate_min_calls, rc.rate_ratio * cpm.mean + rc.rate_z * cpm_sd)
        fs_all = cs.fs
        if (rc.enabled and warm_rate and rate_now >= rate_thr and not outage
                and fs_all >= rc.rate_min_fail_share * cs.ns):
            self._fire(out, kind="retry_storm", scope="consumer", subject=cs.key,
                       tenant=cs.tenant, consumer=cs.key, model=model, ts=ts, first_ts=ts - 30,
                       observed=rate_now, baseline=cpm.mean, threshold=rate_thr,
                       severity="critical", action="block",
                       summary=(f"{cs.key}: {rate_now:.0f} calls/min vs a baseline of "
                                f"{cpm.mean:.1f}, {100 * fs_all / cs.ns:.0f}% failing"),
                       evidence={"rule": "rate_jump", "event_id": event.event_id,
                                 "error": event.error, "status": event.status,
                                 "fail_share": round(fs_all / cs.ns, 3)},
                       quiet_s=rc.quiet_s)
            return
        if not fc.enabled or cs.calls < fc.warmup_calls or outage:
            return
        p0 = self._p0(cs.f_base, cs.n_base, fc.prior_rate, fc.prior_calls)
        need = -fc.log10_alpha * LN10
        floor = max(fc.min_rate, fc.min_ratio * p0)
        hit = None
        for n, f in ((cs.ns, cs.fs), (cs.nl, cs.fl)):
            if f >= fc.min_failures and f >= floor * n:
                s = binom_surprise(f, n, p0)
                if s >= need:
                    hit = (n, f, s)
                    break
        if hit is None:
            return
        if self._is_open("retry_storm", "consumer", cs.key, cs.tenant, ts):
            return
        if rate_now >= max(10.0, 2.0 * (cpm.mean + cpm_sd)) and warm_rate:
            return  # a rate jump: the retry_storm rate rule decides
        if self._model_failing_elsewhere(ms, cs.key):
            return  # looks like the upstream: the model scope decides
        n, f, s = hit
        self._fire(out, kind="failure_spike", scope="consumer", subject=cs.key, tenant=cs.tenant,
                   consumer=cs.key, model=model, ts=ts, first_ts=ts - 30, observed=f / n,
                   baseline=p0, threshold=floor, severity="warning", action="alert",
                   summary=(f"{cs.key}: {100 * f / n:.0f}% of {n:.0f} recent calls failed vs a "
                            f"baseline of {100 * p0:.1f}% (p < 1e{-s / LN10:.0f})"),
                   evidence={"event_id": event.event_id, "status": event.status,
                             "error": event.error, "failures": round(f, 1),
                             "calls": round(n, 1), "log10_p": round(-s / LN10, 1)},
                   quiet_s=fc.quiet_s)

    def _model_failing_elsewhere(self, ms: ModelState, consumer: str) -> bool:
        """Do other consumers of this model fail too (an upstream problem)?"""
        n = ms.cur_n + ms.prev_n
        f = ms.cur_f + ms.prev_f
        my_n, my_f = ms.window(consumer)
        rest_n, rest_f = n - my_n, f - my_f
        if rest_f < 2 or rest_n <= 0:
            return False
        fc = self.config.settings.failure_spike
        p0 = self._p0(ms.f_base, ms.n_base, fc.prior_rate, fc.prior_calls)
        if rest_f / rest_n < max(3.0 * p0, 0.1):
            return False
        others = sum(1 for c, v in ms.cur.items() if c != consumer and v[1] > 0)
        others += sum(1 for c, v in ms.prev.items()
                      if c != consumer and v[1] > 0 and c not in ms.cur)
        return others >= 2

    def _model_calls(self, ms: ModelState, event: UsageEvent, ts: float, failed: bool,
                     out: list[Finding]) -> None:
        """failure_spike, scope model (upstream outage): the model's failure
        rate over the last ``model_window_s``, *leaving out its most failing
        consumer* (one broken client is not an outage), significantly above
        the model's baseline (binomial test as for consumers), with failures
        at ``model_min_consumers`` consumers or more and at least
        ``model_min_consumer_share`` of the model's active consumers.  Action
        is always alert; while it is open, consumer-scope failure_spike and
        retry_storm findings for failures on this model are suppressed."""
        fc = self.config.settings.failure_spike
        half = fc.model_window_s / 2.0
        if ts >= ms.b_start + half:
            # the finished bucket teaches the baseline unless it was anomalous
            p0 = self._p0(ms.f_base, ms.n_base, fc.prior_rate, fc.prior_calls)
            if (ms.cur_f <= max(fc.min_failures, 3.0 * p0 * ms.cur_n)
                    and not self._is_open("failure_spike", "model", event.model, "*", ts)):
                a = self._alpha(fc.model_baseline_halflife_s / half)
                ms.n_base = ms.n_base * (1.0 - a) + ms.cur_n
                ms.f_base = ms.f_base * (1.0 - a) + ms.cur_f
            if ts < ms.b_start + 2 * half:
                ms.prev, ms.prev_n, ms.prev_f = ms.cur, ms.cur_n, ms.cur_f
            else:
                ms.prev, ms.prev_n, ms.prev_f = {}, 0.0, 0.0
            ms.cur, ms.cur_n, ms.cur_f = {}, 0.0, 0.0
            ms.b_start = ts - (ts - ms.b_start) % half
        if ts > ms.last_ts:
            ms.last_ts = ts
        ms.calls += 1
        consumer = event.consumer
        e = ms.cur.get(consumer)
        if e is None:
            e = ms.cur[consumer] = [0.0, 0.0]
        e[0] += 1.0
        ms.cur_n += 1.0
        if failed:
            e[1] += 1.0
            ms.cur_f += 1.0
        n = ms.cur_n + ms.prev_n
        f = ms.cur_f + ms.prev_f
        p0 = self._p0(ms.f_base, ms.n_base, fc.prior_rate, fc.prior_calls)
        floor = max(fc.min_rate, fc.min_ratio * p0)
        if f < 2.0 * fc.min_failures or f < floor * n:
            return
        if not failed or not fc.model_enabled or ts < ms.check_at:
            return
        ms.check_at = ts + 2.0  # the per-consumer scan runs at most every 2 s
        per = ms.per_consumer()
        _top_c, top = max(per.items(), key=lambda kv: (kv[1][1], kv[0]))
        rest_n, rest_f = n - top[0], f - top[1]
        if rest_f < fc.min_failures or rest_f < floor * rest_n:
            return
        s = binom_surprise(rest_f, rest_n, p0)
        if s < -fc.log10_alpha * LN10:
            return
        n_fail = sum(1 for v in per.values() if v[1] > 0)
        n_act = len(per)
        if n_fail < fc.model_min_consumers or n_fail < fc.model_min_consumer_share * n_act:
            return
        rate = f / n
        self._fire(out, kind="failure_spike", scope="model", subject=event.model, tenant="*",
                   consumer=None, model=event.model, ts=ts, first_ts=ts - half, observed=rate,
                   baseline=p0, threshold=floor, severity="critical", action="alert",
                   summary=(f"upstream {event.model} ({event.provider or 'provider ?'}): "
                            f"{100 * rate:.0f}% of calls failing across {n_fail} of {n_act} "
                            f"active consumers vs a baseline of {100 * p0:.1f}%"),
                   evidence={"event_id": event.event_id, "provider": event.provider,
                             "error": event.error, "status": event.status,
                             "consumers_failing": n_fail, "consumers_active": n_act,
                             "log10_p": round(-s / LN10, 1)},
                   quiet_s=fc.model_quiet_s)

    # ------------------------------------------------------------ repeats
    def _repeat(self, cs: ConsumerState, event: UsageEvent, rh: str, ts: float, failed: bool,
                out: list[Finding]) -> bool:
        """Track a request_hash; return True when this call repeats a failing request.

        retry_storm (hash rule): attempts of one request_hash counted with
        exponential decay (``tau_s``): fires at ``min_attempts`` decayed
        attempts of which ``min_fail_share`` failed (1-2 retries after an
        error stay far below; a cron job every few minutes decays to ~1), or
        ``min_attempts_success`` attempts that all come from one caller (same
        user/session) without failures.  A popular FAQ repeats from many users
        and is never a storm.

        cache_opportunity (info): ``min_repeats`` successful answers of the
        same hash, none of them with cached input tokens.
        """
        if ts >= self._seen_rotate:
            self._seen_prev = self._seen_cur
            self._seen_cur = set()
            self._seen_rotate = ts + self.config.engine.repeat_horizon_s / 2.0
        k = cs.key + "\x1f" + rh
        rs = self._repeats.get(k)
        if rs is None:
            if k not in self._seen_cur and k not in self._seen_prev:
                self._seen_cur.add(k)
                return False
            rs = self._repeats[k] = RepeatState(cs.key, rh, ts, event.model,
                                                (event.user, event.session_id))
        rc = cs.cfg.retry_storm
        prev_fail = rs.f > 0.5 or rs.total_fail > 0
        dt = ts - rs.t
        if dt > 0:
            d = math.exp(-dt / rc.tau_s)
            rs.c *= d
            rs.f *= d
            rs.t = ts
        rs.c += 1.0
        rs.total += 1
        if len(rs.ids) < 4:
            rs.ids.append(event.event_id)
        if not rs.mixed and (event.user, event.session_id) != rs.ident:
            rs.mixed = True
        if failed:
            rs.f += 1.0
            rs.total_fail += 1
        else:
            rs.ok_total += 1
            co = cs.cfg.cache_opportunity
            if event.cached_input_tokens == 0:
                rs.ok_uncached += 1
                rs.u = rs.u * math.exp(-max(ts - rs.first_ts, 0.0) / co.tau_s) + 1.0 \
                    if rs.u == 0.0 else rs.u * math.exp(-max(dt, 0.0) / co.tau_s) + 1.0
            if (co.enabled and rs.u >= co.min_repeats
                    and event.input_tokens >= co.min_input_tokens
                    and event.cached_input_tokens == 0
                    and rs.ok_uncached >= 0.9 * rs.ok_total):
                self._fire(out, kind="cache_opportunity", scope="consumer", subject=cs.key,
                           tenant=cs.tenant, consumer=cs.key, model=event.model, ts=ts,
                           first_ts=rs.first_ts, observed=round(rs.u, 1), baseline=0.0,
                           threshold=co.min_repeats, severity="info", action="none",
                           summary=(f"{cs.key}: request {rh[:16]} answered {rs.ok_uncached} "
                                    f"times without prompt caching ({event.input_tokens} "
                                    f"input tokens each)"),
                           evidence={"request_hash": rh, "event_ids": list(rs.ids),
                                     "input_tokens": event.input_tokens},
                           quiet_s=co.quiet_s)
        if rc.enabled and rs.c >= rc.min_attempts and (
                (rs.f >= rc.min_fail_share * rs.c)
                or (not rs.mixed and rs.c >= rc.min_attempts_success)) and not (
                failed and self._is_open("failure_spike", "model", event.model, "*", ts)):
            fail_share = rs.f / rs.c
            self._fire(out, kind="retry_storm", scope="consumer", subject=cs.key,
                       tenant=cs.tenant, consumer=cs.key, model=event.model, ts=ts,
                       first_ts=rs.first_ts, observed=rs.c, baseline=1.0 + 2 * fail_share,
                       threshold=rc.min_attempts, severity="critical", action="block",
                       summary=(f"{cs.key}: request {rh[:16]} sent {rs.total} times "
                                f"(~{rs.c:.0f} in the last {rc.tau_s:.0f} s), "
                                f"{100 * fail_share:.0f}% failing"),
                       evidence={"rule": "same_request", "request_hash": rh,
                                 "event_ids": list(rs.ids), "attempts": rs.total,
                                 "failed": rs.total_fail, "error": event.error,
                                 "attempt": event.attempt},
                       quiet_s=rc.quiet_s)
        return failed and prev_fail

    def _sweep_repeats(self, now: float) -> None:
        lim = now - self.config.engine.repeat_horizon_s
        for k in [k for k, rs in self._repeats.items() if rs.t < lim]:
            del self._repeats[k]

    # ------------------------------------------------------------ runaway
    def _rule_runaway(self, cs: ConsumerState, ms: ModelState, event: UsageEvent, ts: float,
                      out: list[Finding]) -> None:
        """runaway_reasoning: one call whose thinking (reasoning tokens, or
        output tokens for a model that reports none) or duration is extreme:

        * guardrails (no warm-up): duration >= ``max_latency_s``; thinking >=
          ``max_think_tokens``; ``finish_reason=length`` with at least
          ``length_min_reasoning`` reasoning tokens making up most of the output
          (the reasoning budget was hit);
        * relative: above ``min_tokens`` (or ``min_latency_s``) and above the
          (consumer, model) log-scale mean + z sd, ``ratio_to_mean`` x its
          geometric mean and ``ratio_to_recent_max`` x the largest call seen
          lately.  Before the (consumer, model) baseline has
          ``warmup_calls`` calls, the model-wide baseline is used.

        ``repeat_count`` runaway calls within ``repeat_window_s`` escalate the
        consumer's episode to critical / block (an attack on a reasoning model).
        Runaway calls never teach the baselines.
        """
        rcfg = cs.cfg.runaway_reasoning
        model = event.model
        b = cs.models.get(model)
        if b is None:
            b = cs.models[model] = ModelCallBaseline()
        rsn = event.reasoning_tokens
        if rsn > 0:
            b.has_reasoning = True
            ms.size.has_reasoning = True
        think = float(rsn if b.has_reasoning else event.output_tokens)
        lat = (event.latency_ms or 0.0) / 1000.0
        if not rcfg.enabled:
            return
        rule = None
        # before the (consumer, model) baseline is warm, a reasoning model's
        # model-wide baseline stands in (output sizes of plain models vary too
        # much between consumers for that)
        ref: ModelCallBaseline | None = b if b.think.n >= rcfg.warmup_calls else (
            ms.size if ms.size.think.n >= rcfg.warmup_calls and ms.size.has_reasoning
            else None)
        if lat >= rcfg.max_latency_s and event.output_tokens > 0:
            rule = "max_latency"
        elif think >= rcfg.max_think_tokens:
            rule = "max_tokens"
        elif (event.finish_reason == "length" and rsn >= rcfg.length_min_reasoning
              and rsn >= rcfg.length_reasoning_share * event.output_tokens):
            rule = "reasoning_budget"
        elif ref is not None:
            # the model-wide baseline mixes consumers of very different sizes,
            # so its variance says little: there the largest recent call of
            # the model (x 2 x ratio_to_recent_max) replaces the z-test
            own = ref is b
            t = ref.think
            rmax_ratio = rcfg.ratio_to_recent_max * (1.0 if own else 2.0)
            if (think >= rcfg.min_tokens and (not own or think >= t.limit(rcfg.z))
                    and think >= rmax_ratio * t.rmax
                    and think >= rcfg.ratio_to_mean * t.geomean()):
                rule = "tokens"
            else:
                la = ref.lat
                if (lat >= rcfg.min_latency_s and (not own or lat >= la.limit(rcfg.z))
                        and lat >= rmax_ratio * la.rmax
                        and lat >= rcfg.ratio_to_mean * la.geomean()):
                    rule = "latency"
        if rule is None:
            n = b.think.n
            if n >= 200 and cs.calls % LEARN_SAMPLE:
                # a settled baseline learns its mean/variance from one call in
                # LEARN_SAMPLE; the recent maximum sees every call
                bt, bl = b.think, b.lat
                r = bt.rmax * 0.998
                bt.rmax = think if think > r else r
                r = bl.rmax * 0.998
                bl.rmax = lat if lat > r else r
                return
            a = 0.02
            decay = 0.998
            _learn(b.think, think, a, decay)
            if lat > 0:
                _learn(b.lat, lat, a, decay)
            if ms.calls % MODEL_SAMPLE == 0:
                _learn(ms.size.think, think, a, decay)
                if lat > 0:
                    _learn(ms.size.lat, lat, a, decay)
            return
        hist = self._runaway_ts.setdefault(cs.key, [])
        hist.append(ts)
        lim = ts - rcfg.repeat_window_s
        while hist and hist[0] < lim:
            hist.pop(0)
        if len(hist) > 64:
            del hist[:-64]
        repeated = len(hist) >= rcfg.repeat_count
        base_t = ref.think.geomean() if ref is not None else 0.0
        base_l = ref.lat.geomean() if ref is not None else 0.0
        if rule in ("max_latency", "latency"):
            obs, base, thr = lat, base_l, (rcfg.max_latency_s if rule == "max_latency" else
                                           ref.lat.limit(rcfg.z) if ref else 0.0)
            what = f"ran {lat:.0f} s"
        else:
            obs, base = think, base_t
            thr = (rcfg.max_think_tokens if rule == "max_tokens" else
                   float(event.max_output_tokens or event.output_tokens)
                   if rule == "reasoning_budget" else ref.think.limit(rcfg.z) if ref else 0.0)
            what = f"thought {think:.0f} tokens"
        summary = (f"{cs.key}: a {model} call {what} (typical {_fmt(base_t)} tokens, "
                   f"{base_l:.0f} s; rule {rule})")
        if repeated:
            summary = (f"{cs.key}: {len(hist)} runaway {model} calls in "
                       f"{rcfg.repeat_window_s / 60:.0f} min, latest {what}: "
                       "looks like an attack on a reasoning model")
        self._fire(out, kind="runaway_reasoning", scope="consumer", subject=cs.key,
                   tenant=cs.tenant, consumer=cs.key, model=model, ts=ts, first_ts=ts,
                   observed=obs, baseline=base, threshold=thr,
                   severity="critical" if repeated else "warning",
                   action="block" if repeated else "alert", summary=summary,
                   evidence={"rule": rule, "event_id": event.event_id,
                             "reasoning_tokens": rsn, "output_tokens": event.output_tokens,
                             "latency_s": round(lat, 1), "finish_reason": event.finish_reason,
                             "runaway_calls_in_window": len(hist)},
                   quiet_s=rcfg.quiet_s)

    # --------------------------------------------------------------- runs
    def _rule_runs(self, cs: ConsumerState, event: UsageEvent, ts: float, tokens: int,
                   failed: bool, tid: str | None, sid: str | None, out: list[Finding]) -> None:
        """agent_loop and context_bloat.

        agent_loop: a run (trace_id, else session_id) with more calls than
        max(min_calls, ratio x the consumer's long run), the long run being
        exp(mean + 2.33 sd) of log(calls) over the consumer's completed runs
        (before ``warmup_runs`` runs: ``guard_calls``), or more tokens than
        max(min_tokens, token_ratio x the same for tokens).  Critical (block)
        at ``critical_ratio`` x the threshold.

        context_bloat (info): within a session (session_id, else trace_id),
        ``min_calls`` consecutive calls whose input grows each time, by
        ``min_growth`` x overall, to at least ``min_input_tokens``.
        """
        key = cs.key + "\x1f" + (tid if tid is not None else sid)  # type: ignore[operator]
        runs = self._runs
        r = runs.get(key)
        if r is None:
            r = runs[key] = RunState(cs.key, cs.tenant, ts, event.model)
        r.calls += 1
        r.tokens += tokens
        if ts > r.last_ts:
            r.last_ts = ts
        if len(r.ids) < 3:
            r.ids.append(event.event_id)
        ac = cs.cfg.agent_loop
        if ac.enabled and (r.calls >= ac.min_calls or r.tokens >= ac.min_tokens):
            if cs.runs >= ac.warmup_runs:
                thr_c = max(ac.min_calls, ac.ratio * cs.run_calls.limit(2.33, 0.1))
                thr_t = max(ac.min_tokens, ac.token_ratio * cs.run_tok.limit(2.33, 0.1))
            else:
                thr_c = max(ac.min_calls, ac.guard_calls)
                thr_t = max(ac.min_tokens, 10 * ac.min_tokens)
            if r.calls >= thr_c or (r.tokens >= thr_t and r.calls >= 0.5 * thr_c):
                r.flagged |= 1
                by_calls = r.calls / thr_c >= r.tokens / thr_t
                obs, thr = (float(r.calls), thr_c) if by_calls else (float(r.tokens), thr_t)
                crit = obs >= ac.critical_ratio * thr
                base = (cs.run_calls.geomean() if by_calls else cs.run_tok.geomean()
                        ) if cs.runs else 0.0
                rid = tid if tid is not None else sid
                self._fire(out, kind="agent_loop", scope="session", subject=rid or "",
                           tenant=cs.tenant, consumer=cs.key, model=event.model, ts=ts,
                           first_ts=r.first_ts, observed=obs, baseline=base, threshold=thr,
                           severity="critical" if crit else "warning",
                           action="block" if crit else "alert",
                           summary=(f"{cs.key}: run {rid} made {r.calls} calls / "
                                    f"{_fmt(r.tokens)} tokens in {ts - r.first_ts:.0f} s "
                                    f"(typical run {base:.0f} "
                                    f"{'calls' if by_calls else 'tokens'}, threshold "
                                    f"{_fmt(thr)})"),
                           evidence={"trace_id": tid, "session_id": sid, "calls": r.calls,
                                     "tokens": r.tokens, "event_ids": list(r.ids),
                                     "last_event_id": event.event_id},
                           quiet_s=ac.quiet_s)
        # context bloat, on the session
        if sid is not None and tid is not None and sid != tid:
            skey = cs.key + "\x1f" + sid
            s = runs.get(skey)
            if s is None:
                s = runs[skey] = RunState(cs.key, cs.tenant, ts, event.model)
                s.flagged |= 4  # a session record kept only for context_bloat
            if ts > s.last_ts:
                s.last_ts = ts
        else:
            s = r
        if failed:
            return
        inp = event.input_tokens
        if inp > s.last_input >= 0:
            s.grow_n += 1
        else:
            s.grow_n = 0
            s.grow_first = inp
        s.last_input = inp
        bc = cs.cfg.context_bloat
        if (bc.enabled and s.grow_n + 1 >= bc.min_calls and inp >= bc.min_input_tokens
                and inp >= bc.min_growth * max(s.grow_first, 1)):
            s.flagged |= 2
            sub = sid if sid is not None else tid
            self._fire(out, kind="context_bloat", scope="session", subject=sub or "",
                       tenant=cs.tenant, consumer=cs.key, model=event.model, ts=ts,
                       first_ts=s.first_ts, observed=float(inp), baseline=float(s.grow_first),
                       threshold=bc.min_growth * max(s.grow_first, 1), severity="info",
                       action="none",
                       summary=(f"{cs.key}: session {sub} resends its history: input grew "
                                f"{s.grow_first} -> {inp} tokens over {s.grow_n + 1} calls"),
                       evidence={"session_id": sid, "trace_id": tid, "input_tokens": inp,
                                 "first_input_tokens": s.grow_first,
                                 "growing_calls": s.grow_n + 1,
                                 "cached_input_tokens": event.cached_input_tokens,
                                 "event_id": event.event_id},
                       quiet_s=bc.quiet_s)

    def _sweep_runs(self, now: float) -> None:
        """Finish runs idle for ``run_idle_s``: normal ones teach the
        consumer's run-length baseline."""
        done = []
        for k, r in self._runs.items():
            cs = self._consumers.get(r.consumer)
            idle = cs.cfg.agent_loop.run_idle_s if cs is not None else 600.0
            if now - r.last_ts >= idle:
                done.append(k)
                if cs is not None and not r.flagged:
                    _learn(cs.run_calls, float(r.calls), 0.05, 0.995)
                    _learn(cs.run_tok, float(r.tokens), 0.05, 0.995)
                    cs.runs += 1
        for k in done:
            del self._runs[k]


def _learn(b: LogBaseline, x: float, a: float, decay: float) -> None:
    """Inline-friendly LogBaseline.update (the hot path calls it a lot)."""
    lx = math.log1p(x)
    if b.n == 0:
        b.lmean = lx
    else:
        d = lx - b.lmean
        inc = a * d
        b.lmean += inc
        b.lvar = (1.0 - a) * (b.lvar + d * inc)
    r = b.rmax * decay
    b.rmax = x if x > r else r
    b.n += 1
