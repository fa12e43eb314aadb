"""Detector configuration: a frozen dataclass tree with per-tenant and
per-consumer overrides.

The API layer reads a TOML file and passes the resulting dict to
:meth:`DetectorConfig.from_dict`; detectors never do I/O.  Every key is
checked: an unknown key or a value of the wrong type or range raises
``ValueError`` naming the key and saying what to fix.

Layout of the dict (all sections optional)::

    [engine]                       # EngineConfig
    evict_idle_s = 691200
    [token_spike]                  # one section per detector kind
    min_tokens_per_min = 20000
    [tenants.acme.token_spike]     # override for every consumer of tenant "acme"
    ratio = 10
    [consumers."batch-job".token_spike]   # override for one consumer (wins over tenant)
    enabled = false

>>> cfg = DetectorConfig.from_dict({"token_spike": {"ratio": 8},
...                                 "consumers": {"batch": {"token_spike": {"enabled": False}}}})
>>> cfg.settings.token_spike.ratio, cfg.settings_for("default", "batch").token_spike.enabled
(8.0, False)
>>> cfg.settings_for("default", "other").token_spike.enabled
True
>>> DetectorConfig.from_dict({"token_spike": {"ratoi": 8}})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: token_spike.ratoi: unknown key; valid keys are: enabled, min_tokens_per_min, ...
>>> DetectorConfig.from_dict({"retry_storm": {"min_attempts": "many"}})
Traceback (most recent call last):
...
ValueError: retry_storm.min_attempts: expected a number, got 'many'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, get_type_hints


@dataclass(frozen=True, slots=True)
class RunawayConfig:
    """runaway_reasoning: one call whose thinking (reasoning tokens, or output
    tokens for models that report no reasoning) or duration is extreme."""

    enabled: bool = True
    warmup_calls: int = 30  # calls of a (consumer, model) before relative checks
    # before that, the model-wide baseline stands in once it has this much
    # history (minutes since the model's first call): a baseline of the first
    # minutes after a start has seen few of the model's consumers, and a
    # heavy consumer's ordinary first calls would stand out against it
    standin_warmup_min: float = 30.0
    # log-space z-score above the (consumer, model) mean.  Real reasoning
    # lengths have a tail heavier than log-normal: on held-out traffic built
    # from the public deepseek-r1 traces (18,000 consumer-hours), 5 sd
    # reported 14 more unlabelled calls than 6 sd (thinking, or a plain
    # model's output, 15-70x the consumer's typical, or slow calls of
    # ordinary thinking), and 6 sd kept every labelled runaway of the three
    # generators (docs/detectors.md)
    z: float = 6.0
    # calls past learn_z sd but under z are kept out of the baselines without
    # a finding, so the baselines learn as they did when 5 sd reported them
    # (a learn_z at or above z: every call not reported teaches them)
    learn_z: float = 5.0
    ratio_to_recent_max: float = 1.5  # and this many times the slowly decaying max
    ratio_to_mean: float = 6.0  # and this many times the geometric mean
    # ... or, instead of the z-score, this many times the recent max: thinking
    # is often capped (a budget), so its log spread overstates the tail
    extreme_max_ratio: float = 6.0
    # the same for the output tokens of a model that reports no reasoning:
    # long answers have a heavier natural tail than budgeted thinking
    extreme_max_ratio_output: float = 8.0
    min_tokens: int = 6000  # relative token findings need at least this many
    min_latency_s: float = 300.0  # relative duration findings need at least this
    max_latency_s: float = 600.0  # guardrail, no warm-up needed
    max_think_tokens: int = 64000  # guardrail on reasoning (or output) tokens
    length_min_reasoning: int = 16000  # finish_reason=length with this much reasoning
    # ... making up this share of the output: the limit was hit while the
    # model was still thinking (its answer empty or a few tokens).  A call
    # that finished thinking and was cut off in its answer is a long answer,
    # not runaway reasoning: at 0.9, heavy thinkers' answers cut at a 32k
    # limit after 29-31k tokens of thinking (5-10x their typical) were 7 of
    # the held-out traffic's unlabelled findings, and 0.98 lost no label
    length_reasoning_share: float = 0.98
    # a model that reports no reasoning and stopped at its output limit
    # (finish_reason=length) is judged by the relative rules from this many
    # output tokens instead of min_tokens: a plain model stuck repeating
    # itself up to a max_tokens of 4096 (a common limit) is the usual case
    length_min_output: int = 4000
    # while the (consumer, model) baseline has fewer than warmup_calls
    # calls: a model that reports no reasoning stopped at its output limit
    # (finish_reason=length) after this many output tokens is runaway, the
    # counterpart of the reasoning budget hit.  A plain model's answer cut
    # off past 16k tokens is a model running on (repeating itself), and a
    # consumer's first calls on a model have no baseline to judge it (nor
    # does the model's, for plain models: held-out seeds 16, 27 and 28,
    # answers run to 16,384 tokens against a usual 500-1,000, each the
    # consumer's first or twelfth call).  A warm baseline's relative rules
    # judge such a call: applied to them, it reported the answers of
    # consumers whose outputs had grown tenfold for an hour (cost spikes)
    # as they reached the limit.  0 disables
    length_max_output: int = 16000
    # while a (consumer, model) baseline warms up (fewer than warmup_calls):
    # once it has young_min_calls calls, a call at young_max_ratio x the
    # largest of them (and ratio_to_mean x their geometric mean, min_tokens)
    # is runaway on the consumer's own evidence, whatever the model's other
    # consumers do (the model-wide stand-in's bar is 2 x ratio_to_recent_max
    # x the model's largest recent call, above a light thinker's runaway).
    # The largest of a few calls sits 1-1.5 log sd below a warm baseline's
    # recent maximum, so 25x it is about as strict as extreme_max_ratio(_output)
    # x a warm maximum (10x fired on a heavy-tailed consumer's 20x-typical answer).
    # The largest of more calls sits closer to it: the ratio falls log-linearly
    # with the calls, to extreme_max_ratio(_output) at warmup_calls (about 10x
    # at 21 calls; a flat 25x missed a light thinker's 25k-token runaway at
    # 20x the largest of its 21 calls, and the 25k it then learnt hid the
    # attack's six calls after it: held-out seed 36).
    # The same for a reasoning model's duration (from min_latency_s), on a
    # call that also thought min_tokens and ratio_to_recent_max x the most of
    # them: 25x a light thinker's slowest call is far from its heavy-thinking
    # neighbours' ordinary ones, which set the stand-in's bars
    young_min_calls: int = 5
    young_max_ratio: float = 25.0
    repeat_count: int = 3  # runaway calls from one consumer within repeat_window_s
    repeat_window_s: float = 1800.0  # ... escalate to critical / block
    quiet_s: float = 1800.0
    # a consumer's runaway call within reopen_s of the end of its last runaway
    # episode, thinking no more than reopen_ratio x that episode's largest
    # thinking (tokens, whatever rule reported it: a finding's observed value
    # is tokens or seconds), reopens that episode (a new revision with
    # evidence.recurrences, its alert firing again) instead of opening a new
    # finding: a consumer whose calls run away every hour or so is one story
    # (on two days of held-out traffic, single consumers made 10 and 12
    # findings that way); a far bigger call is news.  0 disables
    reopen_s: float = 7200.0
    reopen_ratio: float = 1.5


@dataclass(frozen=True, slots=True)
class RetryStormConfig:
    """retry_storm: one request_hash repeated far beyond client retries, or a
    consumer's request rate jumping while most calls fail."""

    enabled: bool = True
    tau_s: float = 60.0  # time constant of the decayed counter (all-success rule)
    # attempts of one request_hash within window_s: 4 retries.  SDK defaults
    # retry twice (OpenAI, Anthropic), some clients and frameworks three times
    # (Google's SDK, many gateways' retry policies), and during an error spike
    # a request failing with all of those retries is normal: a storm is beyond
    # them.  (3 retries fired on real-trace traffic: an error and two failed
    # retries plus a popular prompt asked afresh, and 3-retry clients during
    # a failure spike.)
    min_attempts: float = 5.0
    window_s: float = 60.0  # sliding window of the same-request rule
    min_failed: int = 4  # failed attempts among those in the window
    min_fail_share: float = 0.5  # share of the recent (decayed) attempts that failed
    # a call whose caller reports this attempt number (from 0) is a storm on
    # its own: its earlier attempts may not have arrived yet (timeouts are
    # reported when they end, a minute or two later)
    attempt_alone: int = 6
    # single caller, same hash, no failures (decayed); only where the calls
    # name their caller (user or session): without, one caller cannot be
    # told from many users asking a popular prompt
    min_attempts_success: float = 30.0
    rate_min_calls: int = 12  # calls per minute (and in the window) for the rate-jump rule
    # failing *distinct* requests per minute, times the consumer's usual calls
    # per minute: the failures are extra calls, not normal calls that fail
    # (that is a failure spike)
    rate_ratio: float = 2.5
    rate_z: float = 3.0  # all calls per minute above mean + rate_z sd
    rate_min_fail_share: float = 0.6
    warmup_min: int = 30  # minutes of history before the rate-jump rule
    quiet_s: float = 180.0
    # a storm of the consumer that comes back within reopen_s of its
    # episode's end at no more than reopen_ratio x that episode's peak
    # reopens it (a new revision, alerting and blocking again) instead of
    # opening a new finding, as failure_spike's; 0 disables
    reopen_s: float = 1800.0
    reopen_ratio: float = 2.0


@dataclass(frozen=True, slots=True)
class FailureSpikeConfig:
    """failure_spike: a failure rate significantly above the baseline
    (one-sided binomial tail test on sliding windows anchored at the
    consumer's recent failures)."""

    enabled: bool = True
    # significance of the binomial tail test (consumer and model scope).
    # 1e-5, not 1e-7: a medium consumer's step to 70 % failures (a few calls
    # a minute) takes 1-2 minutes to reach 1e-7; on the five labelled runs
    # 1e-5 cost one false finding in 8,700 consumer-hours
    log10_alpha: float = -5.0
    prior_rate: float = 0.02  # prior failure rate (Beta prior mean)
    prior_calls: float = 50.0  # prior strength in calls
    client_prior_rate: float = 0.005  # prior rate of client errors (401, 403, 400, 404, ...)
    baseline_z: float = 1.5  # test against the baseline's upper bound (mean + z sd)
    window_failures: int = 16  # failures kept per consumer (windows scanned)
    max_window_s: float = 3600.0  # oldest failure a window may start at
    # a window shorter than this needs twice min_failures: a busy consumer's
    # few seconds of clustered errors (a rate limit hit during a burst: 5 of
    # 11 calls in 3 s at ten calls a second) pass the test, whose calls are
    # assumed independent, but are no spike; a lasting one spans this within
    # seconds, a dense one has the failures at once (only window_failures
    # are kept: at five failures a second they span 3 s)
    min_window_s: float = 10.0
    min_failures: float = 5.0
    min_rate: float = 0.2  # observed failure rate must reach this
    min_ratio: float = 3.0  # and this many times the baseline
    short_tau_s: float = 30.0
    long_tau_s: float = 300.0
    baseline_halflife_calls: float = 2000.0
    warmup_calls: int = 30
    quiet_s: float = 300.0
    # a consumer's failure spike that comes back within reopen_s of its
    # episode's end at no more than reopen_ratio x that episode's peak
    # failure rate reopens it (a new revision, alerting again) instead of
    # opening a new finding: an error source that flaps, or the last
    # failures of a spike arriving minutes later (timeouts, a retry), is one
    # incident (30 minutes: an hour merged a new failure spike into one of
    # the hour before on the held-out traffic); 0 disables
    reopen_s: float = 1800.0
    reopen_ratio: float = 2.0
    # model scope (upstream outage)
    model_enabled: bool = True
    model_min_consumers: int = 3  # distinct consumers failing on the model
    model_min_consumer_share: float = 0.3  # of the model's active consumers
    model_window_s: float = 120.0
    model_quiet_s: float = 300.0
    model_baseline_halflife_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class TokenSpikeConfig:
    """token_spike: the token rate far above the consumer's baseline, on a
    sliding 60 s window (every event) and a 5 min window (every minute, two in
    a row).  Windows are *trimmed*: their largest call does not count (one
    giant call is not a rate change); see :mod:`detectors.volume`."""

    enabled: bool = True
    min_tokens_per_min: float = 20000.0  # floor of the 60 s window: tiny consumers never page
    min_calls: int = 5  # calls in the window (a few huge calls are not a rate change)
    window_min_calls: int = 8  # ... in the 60 s window (a handful of calls is a burst)
    ratio: float = 6.0  # 60 s window: times its EW mean
    ratio_to_recent_max: float = 3.0  # ... and times the largest recent normal (trimmed) window
    # 5 min window: floor per minute.  A lasting rise of fewer tokens pages
    # nobody: on held-out real-trace traffic the 10k-25k windows were false
    # findings only (10k: 83 false, 20k: 79, 25k: 75; 30k lost two spikes)
    sustained_min_tokens_per_min: float = 25000.0
    sustained_ratio: float = 4.0  # 5 min window: times its EW mean
    sustained_ratio_to_recent_max: float = 4.0  # ... and times the largest recent normal one
    # ... or, for this many consecutive minutes, sustained_ratio x its EW mean
    # and half sustained_ratio_to_recent_max x the recent normal one (a step
    # of many small calls: bursts that high do not last)
    persist_windows: int = 4
    persist_min_calls: int = 24  # ... with this many calls in the 5 min window (a rate)
    # ... once the consumer has this much history: its recent high must have
    # seen its usual swings (on/off batch phases) before a lower bar applies
    persist_warmup_min: float = 120.0
    # two whole minutes in a row, each (trimmed) this many times the recent
    # normal 60 s high (and ratio x the EW mean, the 60 s floor, window_min_calls
    # calls each): a step below the 60 s window's bar that lasts; 0 disables
    pair_ratio_to_recent_max: float = 2.0
    # both windows: the second largest call (the largest is left out) at most
    # this share of the excess over the EW mean (two big calls are no rate change)
    spread_share: float = 1.0 / 3.0
    # call-size rule (prompts suddenly bigger): the recent calls' geometric
    # mean input (~5 min) this many times the consumer's usual one ...
    size_ratio: float = 6.0
    size_z: float = 5.0  # ... and this many standard errors above it
    # with the 5 min window at this x its EW mean and min_tokens_per_min (the
    # 60 s floor: a few big prompts of a small consumer are no spike)
    size_volume_ratio: float = 3.0
    size_warmup_min: int = 30  # minutes with calls before the rule
    halflife_min: float = 60.0  # EW mean (token and cost windows)
    max_halflife_min: float = 240.0  # the recent normal maximum halves in this time
    warmup_min: int = 40  # minutes since the consumer's first call before relative rules
    warmup_buckets: int = 60  # ... and 10 s buckets with calls (history of its windows)
    quiet_s: float = 300.0
    # a spike that comes back within reopen_s of its episode's end at no more
    # than reopen_ratio x that episode's peak reopens it (a bursty consumer's
    # next burst is not news; a bigger one is a new finding); 0 disables
    reopen_s: float = 7200.0
    reopen_ratio: float = 2.0
    # an open episode that rises past regrow_ratio x the peak of its first
    # regrow_after_s (checked once it is that old) ends and a new finding
    # opens: no baseline learns while it is open (for up to two hours), so a
    # level shift that opened it would hide a far bigger spike inside it
    # (held-out seed 15: a x17 spike 46 minutes into such an episode).  A
    # natural surge still ramping up inside its first half hour is not news;
    # past it, one of the ten held-out seeds' natural surges jumped 5x.  0
    # disables
    regrow_ratio: float = 4.0
    regrow_after_s: float = 1800.0
    max_tokens_per_min: float = 0.0  # guardrail without warm-up; 0 disables
    # time of day: the windows' bars are also ratio_to_recent_max (60 s) and
    # sustained_ratio_to_recent_max (5 min) x the highest window of this hour
    # of the day (or the next) on earlier days, that high kept x daily_decay
    # each day (0.5: halved); 0 disables (detectors.volume, Volume.prof)
    daily_decay: float = 0.5


@dataclass(frozen=True, slots=True)
class CostSpikeConfig:
    """cost_spike: cost per minute far above baseline, beyond what the token
    volume explains (a token spike is reported as token_spike)."""

    enabled: bool = True
    min_cost_per_min: float = 0.1  # absolute floor in the tenant's currency (60 s window)
    min_calls: int = 5  # calls in the window
    ratio: float = 6.0  # 60 s window: times its EW mean (same windows as token_spike)
    ratio_to_recent_max: float = 3.0  # ... and times the largest recent normal window
    sustained_min_cost_per_min: float = 0.05  # 5 min window: floor per minute
    sustained_ratio: float = 4.0
    sustained_ratio_to_recent_max: float = 4.0
    # cost per token this many times its baseline: a dearer model, or answers
    # grown far longer (output tokens cost 4-5x input ones: a chat consumer's
    # outputs x16 raise its price only ~1.8x; at 2.5x these were reported as
    # token spikes alone)
    price_ratio: float = 1.5
    price_jump: float = 4.0  # at this many times the baseline cost per token ...
    price_jump_volume_ratio: float = 3.0  # ... the 60 s cost need only be this x its mean
    # ... and the price (trimmed 60 s window) this many times the consumer's
    # recent high price of a minute (minutes of min_calls calls or more): a
    # consumer mixing a cheap model and a dear one pays 5-15x its mean price
    # in some minutes; on fresh held-out seeds such minutes were 7 of 11
    # false cost spikes.  0 disables
    price_high_ratio: float = 1.5
    quiet_s: float = 300.0
    reopen_s: float = 7200.0  # as token_spike's
    reopen_ratio: float = 2.0
    regrow_ratio: float = 4.0  # as token_spike's
    regrow_after_s: float = 1800.0
    max_cost_per_min: float = 0.0  # guardrail without warm-up; 0 disables


@dataclass(frozen=True, slots=True)
class AgentLoopConfig:
    """agent_loop: one trace (or session) with far more calls or tokens than
    the consumer's runs normally have."""

    enabled: bool = True
    min_calls: int = 40  # never below this many calls in one run (tau-bench: 0-27 tool calls)
    ratio: float = 1.5  # times the consumer's high run length (about p99)
    min_tokens: int = 2_000_000  # token rule floor
    token_ratio: float = 5.0
    # no run history yet (fewer than warmup_runs runs): ~1.5x the longest
    # normal agent run (tau-bench: 27 tool calls) ...
    guard_calls: int = 40
    # ... and its tokens: 12x the largest of tau-bench's 200 runs (166k
    # tokens, every step resending the history), so a first run that loops
    # on full-context calls is seen before ten runs have taught a baseline
    guard_tokens: int = 2_000_000
    session_min_calls: int = 100  # a session without trace_id: human turns (normal <= 30)
    critical_ratio: float = 3.0  # observed >= this x threshold: critical, block
    warmup_runs: int = 10
    run_idle_s: float = 600.0  # a run ends after this long without calls
    quiet_s: float = 600.0


@dataclass(frozen=True, slots=True)
class ContextBloatConfig:
    """context_bloat (info): input tokens growing call after call in a session."""

    enabled: bool = True
    min_calls: int = 10  # consecutive growing calls
    min_growth: float = 4.0  # last input / first input of the streak
    min_input_tokens: int = 80000  # normal agent runs reach ~60k, chat history ~24k
    # a history served from the prompt cache is still resent: it fills the
    # context window and costs 10-50 % of the input price; lower this to
    # report only mostly uncached sessions
    max_cached_share: float = 1.0
    quiet_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class CacheOpportunityConfig:
    """cache_opportunity (info): one request_hash answered many times without
    cached input tokens."""

    enabled: bool = True
    min_repeats: float = 10.0  # uncached answers, decayed with tau_s
    tau_s: float = 600.0  # about a prompt cache's lifetime: slower repeats gain nothing
    # providers cache prompts from 1,024 tokens; below 2k the saving is small
    min_input_tokens: int = 2048
    # uncached input tokens resent (decayed answers x input): worth a finding
    min_wasted_tokens: float = 50_000.0
    quiet_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Every detector's settings for one consumer."""

    runaway_reasoning: RunawayConfig = field(default_factory=RunawayConfig)
    retry_storm: RetryStormConfig = field(default_factory=RetryStormConfig)
    failure_spike: FailureSpikeConfig = field(default_factory=FailureSpikeConfig)
    token_spike: TokenSpikeConfig = field(default_factory=TokenSpikeConfig)
    cost_spike: CostSpikeConfig = field(default_factory=CostSpikeConfig)
    agent_loop: AgentLoopConfig = field(default_factory=AgentLoopConfig)
    context_bloat: ContextBloatConfig = field(default_factory=ContextBloatConfig)
    cache_opportunity: CacheOpportunityConfig = field(default_factory=CacheOpportunityConfig)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # forget a consumer idle this long.  Eight days: a consumer back after a
    # weekend or a week (a weekly job) is judged on its own baselines and
    # time-of-day highs, not warmed up afresh (its first 30-40 minutes
    # unwatched by the rate rules).  The state held is that of the consumers
    # active in that time, under 2 KiB each
    evict_idle_s: float = 8 * 86400.0
    max_lateness_s: float = 120.0  # events older than clock - this are counted, not scored
    update_interval_s: float = 300.0  # re-emit an open finding at most this often
    update_growth: float = 1.5  # ... or when observed grew by this factor
    repeat_horizon_s: float = 600.0  # request_hash repeats are looked for this far back


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    settings: Settings = field(default_factory=Settings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tenants: Mapping[str, Settings] = field(default_factory=lambda: MappingProxyType({}))
    consumers: Mapping[str, Settings] = field(default_factory=lambda: MappingProxyType({}))
    # the raw override dicts, kept so that a consumer override applies on top
    # of its tenant's override and not on top of the defaults only
    _tenant_raw: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False)
    _consumer_raw: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False)

    def settings_for(self, tenant: str, consumer: str) -> Settings:
        """Settings for one consumer: defaults < tenant override < consumer override."""
        if consumer in self.consumers:
            base = self.tenants.get(tenant, self.settings)
            return _apply(base, self._consumer_raw[consumer], f"consumers.{consumer}")
        return self.tenants.get(tenant, self.settings)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DetectorConfig:
        d = dict(d or {})
        engine = _build(EngineConfig, d.pop("engine", {}) or {}, "engine")
        tenants_raw = _section(d.pop("tenants", {}) or {}, "tenants")
        consumers_raw = _section(d.pop("consumers", {}) or {}, "consumers")
        settings = _apply(Settings(), d, "")
        tenants = {t: _apply(settings, v, f"tenants.{t}") for t, v in tenants_raw.items()}
        consumers = {c: _apply(settings, v, f"consumers.{c}") for c, v in consumers_raw.items()}
        return cls(settings=settings, engine=engine, tenants=MappingProxyType(tenants),
                   consumers=MappingProxyType(consumers),
                   _tenant_raw=MappingProxyType(tenants_raw),
                   _consumer_raw=MappingProxyType(consumers_raw))


def _section(v: Any, where: str) -> dict[str, Mapping[str, Any]]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{where}: expected a table of name -> settings, got {v!r}")
    for k, sub in v.items():
        if not isinstance(sub, Mapping):
            raise ValueError(f"{where}.{k}: expected a table of detector settings, got {sub!r}")
    return {str(k): sub for k, sub in v.items()}


def _apply(base: Settings, d: Mapping[str, Any], where: str) -> Settings:
    kinds = {f.name for f in fields(Settings)}
    changes: dict[str, Any] = {}
    for kind, sub in d.items():
        key = f"{where}.{kind}" if where else kind
        if kind not in kinds:
            if not where:
                raise ValueError(f"{key}: unknown key; valid keys are: "
                                 + ", ".join(sorted(kinds | {"engine", "tenants", "consumers"})))
            raise ValueError(f"{key}: unknown detector; valid ones are: "
                             + ", ".join(sorted(kinds)))
        if not isinstance(sub, Mapping):
            raise ValueError(f"{key}: expected a table of settings, got {sub!r}")
        changes[kind] = _build(type(getattr(base, kind)), sub, key, getattr(base, kind))
    return replace(base, **changes) if changes else base


def _build(cls: type, d: Any, where: str, base: Any = None) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a table of settings, got {d!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kw: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{where}.{k}"
        if k not in hints:
            raise ValueError(f"{key}: unknown key; valid keys are: " + ", ".join(names))
        kw[k] = _check(hints[k], v, key)
    obj = replace(base, **kw) if base is not None else cls(**kw)
    _validate(obj, where)
    return obj


def _check(typ: Any, v: Any, key: str) -> Any:
    if typ is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{key}: expected true or false, got {v!r}")
        return v
    if typ is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ValueError(f"{key}: expected an integer, got {v!r}")
        return v
    if typ is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{key}: expected a number, got {v!r}")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{key}: expected a finite number, got {v!r}")
        return float(v)
    return v


# (field name -> check, message) applied to every config class that has the field
_SHARE = (lambda x: 0.0 <= x <= 1.0, "must be between 0 and 1")
_POS = (lambda x: x > 0, "must be > 0")
_NONNEG = (lambda x: x >= 0, "must be >= 0")
_RULES: dict[str, tuple[Any, str]] = {
    "min_fail_share": _SHARE, "rate_min_fail_share": _SHARE, "prior_rate": (
        lambda x: 0.0 < x < 1.0, "must be strictly between 0 and 1"),
    "client_prior_rate": (lambda x: 0.0 < x < 1.0, "must be strictly between 0 and 1"),
    "model_min_consumer_share": _SHARE, "length_reasoning_share": _SHARE,
    "max_cached_share": _SHARE, "min_rate": _SHARE, "spread_share": _SHARE,
    "log10_alpha": (lambda x: x < 0, "must be < 0 (e.g. -7 for 1e-7)"),
    "update_growth": (lambda x: x > 1, "must be > 1"),
    "min_failed": (lambda x: x >= 1, "must be >= 1"),
    "attempt_alone": (lambda x: x >= 1, "must be >= 1"),
    "extreme_max_ratio_output": (lambda x: x > 0, "must be > 0"),
    "persist_windows": (lambda x: x >= 2, "must be >= 2 (one window is a burst)"),
    "reopen_s": (lambda x: x >= 0, "must be >= 0 (0: an episode never reopens)"),
    "min_window_s": (lambda x: x >= 0, "must be >= 0 (0: windows of any length are tested)"),
    "reopen_ratio": _NONNEG, "price_high_ratio": _NONNEG,
    "regrow_ratio": (lambda x: x == 0 or x > 1, "must be 0 (disabled) or > 1"),
    # with no calls of its own a baseline's largest call is 0: every call
    # past min_tokens would be "25x" it
    "young_min_calls": (lambda x: x >= 1, "must be >= 1 (a young baseline needs calls "
                                          "of its own; set it to warmup_calls to disable)"),
    "standin_warmup_min": (lambda x: x >= 0, "must be >= 0 (0: the model-wide baseline "
                                             "stands in as soon as it has warmup_calls)"),
    "daily_decay": (lambda x: 0.0 <= x < 1.0,
                    "must be >= 0 and < 1 (the share of a high kept a day later; 0 disables)"),
}


def _validate(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, bool):
            continue
        rule = _RULES.get(f.name)
        if rule is None:
            if f.name.endswith(("_s", "_min", "ratio", "tau_s")) or f.name in (
                    "z", "learn_z", "rate_z", "prior_calls", "baseline_halflife_calls"):
                rule = _POS if not f.name.startswith("max_") else _NONNEG
            elif isinstance(v, int | float):
                rule = _NONNEG
            else:
                continue
        ok, msg = rule
        if not ok(v):
            raise ValueError(f"{where}.{f.name}: {msg}, got {v!r}")
