"""Deterministic LLM-gateway traffic simulator with labelled anomaly injection.

Used by ``tokenward simulate``, the demo, the benchmarks and the detector
evaluations.  Pure generation: no I/O beyond reading the packaged profile.

Model of normal traffic
-----------------------
- **Consumers** (API keys) of very different sizes: mean rates are drawn from the
  per-client rate distribution of Alibaba ServeGen (heavy tail), rescaled so the
  median consumer sends about one call a minute and the biggest several a second.
  Each has a tenant, an archetype (chat, code, rag, agent, reasoning, batch), a
  main model (some reasoning models), a gateway, a few client IPs, users, an
  error rate (0.2-3 %), a retry policy and a token-size scale of its own.
- **Arrivals** per minute are Poisson around ``rate x daily cycle x slow AR(1)
  level x per-minute gamma burst``, with idle minutes; within a minute they come
  in clusters.  This reproduces the empty minutes and ~5x-median bursts of the
  Azure code trace.  The daily cycle is ServeGen's, sharpened and shifted per
  tenant.
- **Token sizes** come from 101-point quantile tables: Azure conv (chat), Azure
  code, Mooncake (long context, rag) and ServeGen deepseek-r1 (reasoning, with
  its ``reason_ratio``).  Prompt-cache hits follow Mooncake's prefix sharing.
- **Structure**: multi-turn sessions resend their history (kept within typical
  lengths), agent runs chain tool calls with the tau-bench depth distribution
  (0-27 tool calls, median 5), cron jobs resend the same prompt (same
  ``request_hash``, cached), chat apps get popular FAQ prompts, failed calls are
  retried 1-2 times (``attempt`` 1, 2) with backoff.  Latency follows tokens:
  TTFT = 0.2-1 s + input / (5-20k tok/s) (+ thinking), decoding 30-120 tok/s.

Anomaly episodes (see :data:`SCENARIOS`) are injected into chosen consumers after
a warm-up, with varied shapes and victim sizes.  Their ground truth is kept only
in :attr:`Simulation.labels` (never in the events, so detectors cannot cheat).

Profile ``"reference"`` makes every normal call 2048 input / 256 output tokens,
the standard LLM load-test shape.

Data credits (ingest/data/traffic_profile.json, built by
tools/derive_traffic_profile.py): Azure Public Dataset LLM inference trace 2023
(CC-BY 4.0), Mooncake conversation trace (Apache-2.0), Alibaba ServeGen
(Apache-2.0), tau-bench trajectories (MIT).

>>> sim = Simulation(SimConfig(seed=1, duration_s=300, n_consumers=10, scenarios="none"))
>>> evs = list(sim.events())
>>> evs[0]["ts"] <= evs[-1]["ts"] and sim.labels == []
True
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "qwen-plus", "gemini-2.5-flash",
                  "o3-mini", "deepseek-reasoner", "o4-mini")
SCENARIOS = ("runaway_reasoning", "retry_storm", "failure_spike", "failure_spike_model",
             "token_spike", "cost_spike", "agent_loop", "context_bloat", "cache_opportunity")

# model -> (provider, reasoning, context window, input $/M, output $/M)
_MODELS: dict[str, tuple[str, bool, int, float, float]] = {
    "gpt-4o": ("openai", False, 128_000, 2.5, 10.0),
    "gpt-4o-mini": ("openai", False, 128_000, 0.15, 0.6),
    "claude-sonnet-4": ("anthropic", False, 200_000, 3.0, 15.0),
    "qwen-plus": ("dashscope", False, 131_072, 0.4, 1.2),
    "gemini-2.5-flash": ("google", False, 1_048_576, 0.3, 2.5),
    "o3-mini": ("openai", True, 200_000, 1.1, 4.4),
    "deepseek-reasoner": ("deepseek", True, 65_536, 0.55, 2.19),
    "o4-mini": ("openai", True, 200_000, 1.1, 4.4),
    "o1": ("openai", True, 200_000, 15.0, 60.0),
    "claude-opus-4": ("anthropic", False, 200_000, 15.0, 75.0),
}
_EXPENSIVE = ("claude-opus-4", "o1")
_ROUTES = {"anthropic": "/v1/messages", "google": "/v1beta/models:generateContent"}
_ARCHETYPES = (("chat", 0.28), ("code", 0.14), ("rag", 0.12), ("agent", 0.16),
               ("reasoning", 0.14), ("batch", 0.16))
_TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell",
            "cyberdyne", "soylent", "aperture", "wonka", "oscorp", "vandelay", "monarch")
_APPS = ("search", "helpdesk", "copilot", "billing", "etl", "triage", "docs", "sales",
         "review", "insights", "assist", "ops", "crm", "legal", "tutor", "intake")
_GATEWAYS = ("higress-eu-1", "higress-eu-2", "litellm-us-1", "envoy-ai-us-2", "kong-ap-1")
# background error mix: (status, error class, weight, retryable)
_BG_ERRORS = ((429, "rate_limited", 40, True), (500, "upstream_5xx", 14, True),
              (503, "upstream_5xx", 20, True), (502, "upstream_5xx", 8, True),
              (0, "timeout", 10, True), (400, "bad_request", 8, False))
_MAX_OUT: dict[str, tuple[int | None, ...]] = {
    "code": (256, 512, 1024), "reasoning": (None, 8192, 16384, 32768)}
_MASK = (1 << 64) - 1
SMALL_RPS, LARGE_RPS = 0.05, 0.5


WEAK_EFFECT = 3.0  # see Simulation.labels
WEAK_FAILURES = 5


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)
    duration_s: float = 3600.0
    n_consumers: int = 120
    n_tenants: int = 10
    profile: str = "realistic"              # or "reference"
    scenarios: Sequence[str] | str = "all"  # names from SCENARIOS, "all" or "none"
    rate_scale: float = 1.0
    models: Sequence[str] = DEFAULT_MODELS
    episodes_per_kind: int | None = None    # default grows with sqrt(duration)
    warmup_s: float | None = None           # no anomalies before this (default 20 %, <= 1 h)


@lru_cache(maxsize=1)
def load_profile() -> dict[str, Any]:
    text = resources.files("ingest").joinpath("data/traffic_profile.json").read_text()
    prof: dict[str, Any] = json.loads(text)
    return prof


def _q(table: Sequence[float], u: float) -> float:
    """Inverse CDF from a 101-point percentile table, linear between points."""
    x = u * 100.0
    i = int(x)
    if i >= 100:
        return table[100]
    a = table[i]
    return a + (table[i + 1] - a) * (x - i)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam < 30:
        lim, k, p = math.exp(-lam), 0, rng.random()
        while p > lim:
            k += 1
            p *= rng.random()
        return k
    return max(0, int(rng.gauss(lam, math.sqrt(lam)) + 0.5))


def _hist_sampler(hist: dict[str, int]) -> tuple[list[int], list[int]]:
    vals = [int(k) for k in hist]
    cum, acc = [], 0
    for k in hist:
        acc += hist[k]
        cum.append(acc)
    return vals, cum


def _model_info(name: str) -> tuple[str, bool, int, float, float]:
    if name in _MODELS:
        return _MODELS[name]
    low = name.lower()
    reasoning = any(s in low for s in ("o1", "o3", "o4", "reason", "r1", "think", "qwq"))
    return ("openai-compatible", reasoning, 128_000, 1.0, 4.0)


class _Consumer:
    """One API key: its size, archetype, model, network identity and habits."""

    id: str
    tenant: str
    arch: str
    kind: str           # token table of its normal calls
    share: float        # probability that a prompt shares a cached prefix
    size: str           # small | medium | large (by rate)
    rate: float         # mean calls per second
    primary_rate: float  # arrivals per second (sessions and agent runs fan out)
    model: str
    alt: str            # second model used for ~10 % of calls
    provider: str
    route: str
    gateway: str
    ips: list[str]
    users: int
    err: float
    p_retry: float
    max_retries: int
    report_attempt: bool
    timeout: float
    stream: bool
    max_out: int | None
    caches: bool
    cache_write: bool
    tok_scale: float
    ctx: int
    speed: float
    sigma: float
    level: float
    k_burst: float
    idle: float
    phase: float
    amp: float
    faq: list[tuple[str, int]]
    cron: list[tuple[str, int]]
    cron_period: float
    cron_next: float
    mods: list[_Episode]


class _Req:
    """One logical request; a retry is a copy with attempt + 1."""

    __slots__ = ("attempt", "c", "cached", "cont", "ep", "finish", "inp", "lat", "max_out",
                 "model", "out", "rhash", "rsn", "session", "tools", "trace", "user", "write")

    def __init__(self, c: _Consumer, model: str, inp: int, out: int, rsn: int, rhash: str) -> None:
        self.c, self.model, self.inp, self.out, self.rsn = c, model, inp, out, rsn
        self.rhash = rhash
        self.cached = self.write = 0
        self.attempt = 0
        self.max_out: int | None = c.max_out
        self.session: str | None = None
        self.trace: str | None = None
        self.tools: int | None = None
        self.user: str | None = None
        self.finish: str | None = None
        self.lat: float | None = None  # forced duration (runaway calls)
        self.cont: Callable[[float, bool], None] | None = None
        self.ep: _Episode | None = None  # set by injectors: every call is anomalous

    def copy(self) -> _Req:
        r = _Req(self.c, self.model, self.inp, self.out, self.rsn, self.rhash)
        for k in ("cached", "write", "attempt", "max_out", "session", "trace", "tools", "user",
                  "finish", "lat", "cont", "ep"):
            setattr(r, k, getattr(self, k))
        return r


@dataclass
class _Episode:
    label_id: str
    kind: str
    variant: str
    shape: str
    c: _Consumer | None
    model: str | None
    t0: float
    t1: float
    params: dict[str, Any] = field(default_factory=dict)
    scope: str = "consumer"
    subject: str = ""
    victim_size: str = "small"
    inj: bool = False  # generates its own calls (else modifies the victim's normal calls)
    n: int = 0
    first: float = 0.0
    last: float = 0.0
    sample: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def level(self, t: float) -> float:
        """Intensity in [0, 1] of the episode at time t, by shape."""
        if self.shape == "ramp":
            return min(1.0, max(0.05, (t - self.t0) / max(1.0, self.t1 - self.t0) * 1.25))
        if self.shape == "intermittent":
            return 1.0 if int((t - self.t0) // self.params.get("period_s", 60)) % 2 == 0 else 0.0
        return 1.0


class Simulation:
    """A seeded simulation; iterate :meth:`events`, then read :attr:`labels`."""

    def __init__(self, cfg: SimConfig) -> None:
        if cfg.profile not in ("realistic", "reference"):
            raise ValueError(f"unknown profile {cfg.profile!r}")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.prof = load_profile()
        self.reference = cfg.profile == "reference"
        self.t_start = cfg.start.timestamp()
        self.t_end = self.t_start + cfg.duration_s
        self._seq = 0
        self._salt = random.Random(f"ids{cfg.seed}").getrandbits(64)
        self._heap: list[tuple[float, int, dict[str, Any], _Req, bool]] = []
        self.episodes: list[_Episode] = []
        self.outages: list[_Episode] = []
        self.injectors: list[_Episode] = []
        self.anomalous_events: dict[str, str] = {}  # event_id -> label_id (ground truth)
        # tokens and cost per minute of token/cost spike victims: a label's
        # realised effect is measured against the victim's previous hour
        self._victim_minutes: dict[str, dict[int, list[float]]] = {}
        self._prices: Any = None
        self._sec = -1
        self._prefix = ""
        tok = self.prof["tokens"]
        self.tables = {k: (v["input"], v["output"]) for k, v in tok.items()}
        self.reason_ratio = tok["reasoning"]["reason_ratio"]
        ps = self.prof["prefix_sharing"]
        self.cache_frac = ps["cached_fraction_when_shared"]
        self.hourly = self.prof["rates"]["daily_cycle_hourly"]
        ag = self.prof["agents"]
        self.tool_hist = _hist_sampler(ag["tool_calls_per_run"])
        self.turn_hist = _hist_sampler(ag["user_turns_per_session"])
        self.consumers = self._make_consumers()
        names = [s for s in SCENARIOS] if cfg.scenarios == "all" else (
            [] if cfg.scenarios == "none" else list(cfg.scenarios))
        for s in names:
            if s not in SCENARIOS:
                raise ValueError(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
        self._schedule(names)

    # ---------------------------------------------------------------- population
    def _make_consumers(self) -> list[_Consumer]:
        rng, cfg = self.rng, self.cfg
        rates_t = self.prof["rates"]["client_mean_rps"]
        med = rates_t[50]
        models = list(cfg.models)
        reasoning_models = [m for m in models if _model_info(m)[1]] or models
        plain_models = [m for m in models if not _model_info(m)[1]] or models
        tenants = [f"{_TENANTS[i % len(_TENANTS)]}{'' if i < len(_TENANTS) else i}"
                   for i in range(max(1, cfg.n_tenants))]
        tenant_phase = {t: rng.choice((0, 0, 1, 6, 7, 8, 13, 16)) for t in tenants}
        tenant_amp = {t: rng.uniform(1.0, 4.0) for t in tenants}
        archs, weights = zip(*_ARCHETYPES, strict=True)
        out = []
        for i in range(cfg.n_consumers):
            c = _Consumer()
            c.mods = []
            c.arch = rng.choices(archs, weights)[0]
            c.kind = {"code": "code", "rag": "long_context", "reasoning": "reasoning"}.get(
                c.arch, "chat")
            c.share = {"rag": 0.8, "code": 0.5}.get(c.arch, 0.3)
            c.tenant = rng.choice(tenants)
            c.id = f"{c.tenant}-{rng.choice(_APPS)}-{i:03d}"
            rate = _q(rates_t, rng.random()) / med * 0.02
            c.rate = min(6.0, max(1 / 1800, rate)) * cfg.rate_scale
            c.size = ("small" if c.rate < SMALL_RPS else "medium" if c.rate < LARGE_RPS
                      else "large")
            if c.arch == "reasoning" or (c.arch in ("chat", "agent") and rng.random() < 0.15):
                c.model = rng.choice(reasoning_models)
            else:
                c.model = rng.choice(plain_models)
            c.alt = rng.choice(reasoning_models if rng.random() < 0.5 else plain_models)
            prov = _model_info(c.model)[0]
            if prov == "openai" and rng.random() < 0.3:
                prov = "azure"
            elif prov == "anthropic" and rng.random() < 0.3:
                prov = "bedrock"
            c.provider = prov
            c.route = _ROUTES.get(prov, "/v1/chat/completions")
            c.gateway = rng.choice(_GATEWAYS)
            net = rng.randrange(1, 250)
            c.ips = [f"10.{net}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                     for _ in range(rng.choice((1, 1, 2, 4)))]
            c.users = rng.choice((0, 5, 50, 500, 5000)) if c.arch in ("chat", "agent", "code",
                                                                        "reasoning") else 0
            c.err = min(0.03, max(0.002, rng.lognormvariate(math.log(0.008), 0.6)))
            c.p_retry = rng.uniform(0.5, 0.95)
            c.max_retries = rng.choice((1, 2, 2))
            c.report_attempt = rng.random() < 0.7
            c.timeout = rng.choice((30.0, 60.0, 120.0, 600.0 if c.arch == "reasoning" else 120.0))
            c.stream = c.arch in ("chat", "code", "reasoning") and rng.random() < 0.85
            c.max_out = rng.choice(_MAX_OUT.get(c.arch, (None, 1024, 4096)))
            if c.max_out is None and _model_info(c.model)[1]:
                c.max_out = 32768
            c.caches = prov not in ("dashscope",) or rng.random() < 0.5
            c.cache_write = prov in ("anthropic", "bedrock") and rng.random() < 0.6
            c.tok_scale = rng.lognormvariate(0, 0.25)
            c.ctx = int(min(_model_info(c.model)[2], _model_info(c.alt)[2]) * 0.9)
            c.speed = rng.uniform(30, 120) if not _model_info(c.model)[1] else rng.uniform(40, 70)
            c.sigma = rng.uniform(0.15, 0.6)
            c.level = rng.gauss(0, c.sigma)
            c.k_burst = rng.choice((0.8, 1.5, 3.0, 8.0))
            c.idle = rng.choice((0.0, 0.0, 0.05, 0.15))
            c.phase = tenant_phase[c.tenant] + rng.uniform(-1, 1)
            c.amp = tenant_amp[c.tenant]
            mult = {"chat": 4.0, "agent": 6.5}.get(c.arch, 1.0)
            c.primary_rate = c.rate / mult
            c.faq = [(self._hash(), rng.randint(150, 900)) for _ in range(30)] \
                if c.arch == "chat" else []
            c.cron, c.cron_period, c.cron_next = [], 0.0, math.inf
            if c.arch == "batch" and rng.random() < 0.6:
                c.cron = [(self._hash(), int(rng.uniform(800, 12000))) for _ in
                          range(rng.randint(1, 3))]
                c.cron_period = rng.choice((300.0, 600.0, 900.0, 1800.0, 3600.0))
                c.cron_next = self.t_start + rng.uniform(0, c.cron_period)
            out.append(c)
        return out

    def _hash(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"

    # ---------------------------------------------------------------- normal requests
    def _tokens(self, c: _Consumer, kind: str) -> tuple[int, int]:
        if self.reference:
            return 2048, 256
        tin, tout = self.tables[kind]
        x = self.rng.random() * 100.0
        i = int(x)
        a = tin[i]
        inp = int((a + (tin[i + 1] - a) * (x - i)) * c.tok_scale) or 1
        x = self.rng.random() * 100.0
        i = int(x)
        a = tout[i]
        return inp, int(a + (tout[i + 1] - a) * (x - i)) or 1

    def _reasoning(self, c: _Consumer, model: str, out: int, native: bool) -> tuple[int, int]:
        """(output incl. reasoning, reasoning) for a reasoning model; normal tail capped."""
        if self.reference or not _model_info(model)[1]:
            return out, 0
        rr = _q(self.reason_ratio, self.rng.random())
        if native:
            if out > 9000:
                out = int(self.rng.uniform(5000, 9000))
            return out, int(out * rr)
        rsn = min(int(out * rr / max(0.05, 1 - rr)), int(self.rng.uniform(2000, 8000)))
        return out + rsn, rsn

    def _cached(self, c: _Consumer, inp: int, share: float) -> int:
        if self.reference or not c.caches or inp < 1024 or self.rng.random() >= share:
            return 0
        return int(inp * _q(self.cache_frac, self.rng.random())) // 128 * 128

    def _normal(self, c: _Consumer, t: float) -> None:
        rng = self.rng
        arch = c.arch
        kind = c.kind if arch != "batch" else ("long_context" if rng.random() < 0.4 else "chat")
        model = c.model if rng.random() < 0.9 else c.alt
        if arch == "chat" and rng.random() < 0.06 and not self.reference:
            h, inp = c.faq[int(30 ** rng.random()) - 1]  # log-uniform popularity
            out, rsn = self._reasoning(c, model, int(_q(self.tables["chat"][1], rng.random())),
                                       False)
            r = _Req(c, model, inp, out, rsn, h)
        else:
            inp, out = self._tokens(c, kind)
            inp = min(inp, c.ctx)
            out, rsn = self._reasoning(c, model, out, arch == "reasoning")
            r = _Req(c, model, inp, out, rsn, self._hash())
            r.cached = self._cached(c, inp, c.share)
        if c.users:
            r.user = f"u{int(rng.paretovariate(1.1)) % c.users:05d}"
        if arch == "chat" and (rng.random() < 0.45):
            vals, cum = self.turn_hist
            r.session = f"s-{self._hash()[:12]}"
            self._session(r, rng.choices(vals, cum_weights=cum)[0] - 1, r.inp + r.out)
        elif arch == "agent":
            vals, cum = self.tool_hist
            r.trace = f"tr-{self._hash()[:16]}"
            r.session = f"s-{self._hash()[:12]}" if rng.random() < 0.5 else None
            if not self.reference:
                r.inp = max(r.inp, int(rng.uniform(1500, 4000)))
            self._agent_step(r, rng.choices(vals, cum_weights=cum)[0], r.inp)
        self._call(r, t)

    def _session(self, r: _Req, turns_left: int, hist: int) -> None:
        if turns_left <= 0 or hist > 24_000:
            return

        def cont(t: float, ok: bool) -> None:
            if not ok:
                return
            c = r.c
            add_in, out = self._tokens(c, "chat")
            add_in = min(add_in, 600)
            out, rsn = self._reasoning(c, r.model, out, False)
            n = _Req(c, r.model, hist + add_in if not self.reference else 2048, out, rsn,
                     self._hash())
            n.session, n.user = r.session, r.user
            n.cached = 0 if self.reference or not c.caches or self.rng.random() < 0.2 \
                else hist // 128 * 128
            self._session(n, turns_left - 1, hist + add_in + out - rsn)
            self._call(n, t + self.rng.lognormvariate(math.log(40), 0.8))
        r.cont = cont

    def _agent_step(self, r: _Req, tools_left: int, hist: int) -> None:
        rng = self.rng
        if tools_left > 0:
            k = 2 if (tools_left >= 2 and rng.random() < 0.15) else 1
            r.tools, r.finish = k, "tool_calls"
            r.out = r.rsn + int(rng.uniform(20, 150)) * k if not self.reference else 256
        else:
            r.tools = 0
            return

        def cont(t: float, ok: bool) -> None:
            if not ok:
                return
            grow = int(rng.uniform(100, 1500)) * k
            n = _Req(r.c, r.model, hist + grow if not self.reference else 2048, 0, 0,
                     self._hash())
            _, out = self._tokens(r.c, "chat")
            n.out, n.rsn = self._reasoning(r.c, r.model, out, False)
            n.trace, n.session, n.user = r.trace, r.session, r.user
            n.cached = 0 if self.reference or not r.c.caches else hist // 128 * 128
            self._agent_step(n, tools_left - k, hist + grow + n.out)
            self._call(n, t + rng.uniform(0.2, 5.0))
        r.cont = cont

    # ---------------------------------------------------------------- one call
    def _call(self, r: _Req, start: float) -> None:
        rng = self.rng
        rnd = rng.random
        c = r.c
        ep = r.ep
        status, err = 200, None
        model, inp, out, rsn, max_out = r.model, r.inp, r.out, r.rsn, r.max_out
        finish = r.finish
        if ep is None and c.mods:
            for m in c.mods:
                if m.t0 <= start < m.t1:
                    lv = m.level(start)
                    if m.kind == "failure_spike":
                        if rng.random() < m.params["error_rate"] * lv:
                            ep, (status, err) = m, rng.choice(m.params["errors"])
                    elif m.kind == "cost_spike" and lv > 0:
                        ep = m
                        if m.variant == "model_switch":
                            model = m.params["to_model"]
                        else:
                            max_out = None
                            out = rsn + int((out - rsn) * m.params["output_x"] * (.7 + .7 * rnd()))
                    elif m.kind == "token_spike" and lv > 0:
                        ep = m
                        inp = min(c.ctx, int(inp * (1 + (m.params["x"] - 1) * lv)))
                        r.cached = 0
        if status == 200 and self.outages:
            for m in self.outages:
                if (model == m.model and m.t0 <= start < m.t1
                        and rng.random() < m.params["error_rate"] * m.level(start)):
                    status, err = rng.choice(m.params["errors"])
                    ep = ep or m
        if ep is not None and ep.kind == "retry_storm" and status == 200 \
                and rnd() < ep.params["fail_rate"]:
            status, err = rng.choice(ep.params["errors"])
        if status == 200 and (ep is None or ep.kind != "runaway_reasoning") \
                and rnd() < c.err * (4 if r.attempt else 1):
            status, err, _, _ = rng.choices(_BG_ERRORS, cum_weights=(40, 54, 74, 82, 92, 100))[0]
        info = _model_info(model)
        provider = c.provider if model == c.model else info[0]
        ok = status == 200
        stream = c.stream
        ttft: float | None
        if ok:
            if max_out and out > max_out:
                out, finish = max_out, "length"
                rsn = min(rsn, out)
            elif finish is None:
                finish = "content_filter" if rnd() < 0.0005 else "stop"
            speed = c.speed if model == c.model else 40 + 50 * rnd()
            ttft = 0.2 + 0.8 * rnd() + inp / (5000 + 15000 * rnd()) + rsn / speed
            lat = ttft + (out - rsn) / (speed * (0.85 + 0.3 * rnd()))
            if r.lat is not None:
                lat = ttft = r.lat
            cached = min(r.cached, inp)
            write = (inp - cached) // 2 if c.cache_write and cached == 0 and inp >= 1024 \
                and rnd() < 0.3 else 0
            tools = r.tools
        else:
            finish, out, rsn, cached, write, tools = "error", 0, 0, 0, 0, None
            inp = 0 if status in (0, 429, 401, 403) or status >= 500 else inp
            lat = c.timeout if status == 0 else (0.02 + 0.38 * rnd() if status < 500
                                                  else 0.1 + 20 * rnd() ** 2)
            ttft = None
        self._seq = seq = self._seq + 1
        eid = f"ev-{(seq * 0x9E3779B97F4A7C15 + self._salt) & _MASK:016x}"
        ev: dict[str, Any] = {
            "event_id": eid, "ts": "", "consumer": c.id, "model": model, "status": status,
            "tenant": c.tenant, "user": r.user, "client_ip": c.ips[seq % len(c.ips)],
            "gateway": c.gateway, "provider": provider,
            "route": c.route if provider == c.provider else _ROUTES.get(info[0],
                                                                       "/v1/chat/completions"),
            "error": err, "finish_reason": finish, "input_tokens": inp, "output_tokens": out,
            "reasoning_tokens": rsn, "cached_input_tokens": cached, "cache_write_tokens": write,
            "max_output_tokens": max_out, "latency_ms": round(lat * 1000, 1),
            "ttft_ms": round(ttft * 1000, 1) if (ttft is not None and stream) else None,
            "request_hash": r.rhash, "session_id": r.session, "trace_id": r.trace,
            "tool_calls": tools, "attempt": r.attempt if c.report_attempt else None,
            "stream": stream, "cost": None, "labels": {},
        }
        cur = r if ep is r.ep else r.copy()
        cur.ep = ep
        heapq.heappush(self._heap, (start + lat, seq, ev, cur, ok))

    def _after(self, r: _Req, t: float, ok: bool, status: int) -> None:
        """Follow-ups of an emitted call: client retries, next turn or agent step."""
        c = r.c
        inj = r.ep if (r.ep is not None and r.ep.inj) else None
        if inj is not None and inj.kind == "retry_storm":
            return  # the storm schedules its own calls
        if not ok and (status in (0, 429) or status >= 500) and r.attempt < c.max_retries \
                and self.rng.random() < c.p_retry:
            n = r.copy()
            n.attempt += 1
            n.ep = inj
            back = self.rng.uniform(1, 20) if status == 429 else \
                self.rng.uniform(0.5, 2.0) * 2 ** n.attempt
            self._call(n, t + back)
            return
        if r.cont is not None:
            r.cont(t, ok)

    # ---------------------------------------------------------------- episodes
    def _schedule(self, names: list[str]) -> None:
        rng, cfg = self.rng, self.cfg
        d = cfg.duration_s
        warm = cfg.warmup_s if cfg.warmup_s is not None else min(0.2 * d, 3600.0)
        per = cfg.episodes_per_kind or max(1, round(1.5 * math.sqrt(d / 3600) + 0.5))
        busy: dict[str, list[tuple[float, float]]] = {}
        n = 0
        for kind in names:
            sizes = ["small", "large", "medium"]
            rng.shuffle(sizes)
            for i in range(per):
                n += 1
                ep = self._make_episode(kind, sizes[i % 3], f"L{cfg.seed}-{n:03d}", warm, busy)
                if ep is not None:
                    self.episodes.append(ep)

    def _pick(self, size: str, busy: dict[str, list[tuple[float, float]]], t0: float, t1: float,
              ok: Callable[[_Consumer], bool]) -> _Consumer | None:
        order = ["small", "medium", "large"]
        pref = [size] + [s for s in order if s != size]
        for s in pref:
            cands = [c for c in self.consumers if c.size == s and ok(c) and not any(
                a < t1 + 600 and t0 - 600 < b for a, b in busy.get(c.id, ()))]
            if cands:
                c = self.rng.choice(cands)
                busy.setdefault(c.id, []).append((t0, t1))
                return c
        return None

    def _make_episode(self, kind: str, size: str, lid: str, warm: float,
                      busy: dict[str, list[tuple[float, float]]]) -> _Episode | None:
        rng = self.rng
        d = self.cfg.duration_s
        u = rng.uniform
        p: dict[str, Any] = {}
        shape, variant = "step", kind
        dur = 600.0

        def window(length: float) -> tuple[float, float]:
            length = min(length, max(60.0, d - warm - 60))
            s = u(warm, max(warm, d - length - 30))
            return self.t_start + s, self.t_start + s + length

        if kind == "runaway_reasoning":
            variant = rng.choice(("single", "single", "repeated"))
            shape = "single" if variant == "single" else "burst"
            p = {"calls": rng.randint(1, 3) if variant == "single" else rng.randint(8, 40)}
            dur = u(300, 1800) if variant == "single" else u(180, 900)
            ok: Callable[[_Consumer], bool] = lambda c: True  # noqa: E731
        elif kind == "retry_storm":
            variant = rng.choice(("single_hash", "single_hash", "multi_hash"))
            errs = rng.choice(([(429, "rate_limited")],
                               [(503, "upstream_5xx"), (500, "upstream_5xx")],
                               [(0, "timeout")],
                               [(429, "rate_limited"), (0, "timeout"), (502, "upstream_5xx")]))
            p = {"fail_rate": u(0.8, 1.0), "errors": errs}
            if variant == "single_hash":
                shape = rng.choice(("step", "intermittent"))
                p |= {"calls": int(math.exp(u(math.log(20), math.log(500)))),
                      "interval_s": math.exp(u(math.log(0.3), math.log(8))),
                      "attempt_mode": rng.choice(("count", "wrap"))}
                dur = min(3600.0, max(60.0, p["calls"] * p["interval_s"]
                                      * (2.5 if shape == "intermittent" else 1)))
            else:
                shape = rng.choice(("step", "ramp"))
                p |= {"x": u(5, 20), "fail_rate": u(0.7, 0.95)}
                dur = u(180, 1800)
            ok = lambda c: True  # noqa: E731
        elif kind == "failure_spike":
            errs = rng.choice(([(401, "authentication_error")], [(400, "bad_request")],
                               [(403, "permission_denied")], [(404, "model_not_found")],
                               [(400, "bad_request"), (413, "context_length_exceeded")]))
            shape = rng.choice(("step", "step", "ramp", "intermittent"))
            p = {"error_rate": u(0.3, 1.0), "errors": errs, "period_s": 120}
            dur = u(300, 1800)
            ok = lambda c: c.rate >= 0.015  # noqa: E731
        elif kind == "failure_spike_model":
            return self._outage(lid, warm)
        elif kind == "token_spike":
            variant = rng.choice(("more_calls", "bigger_prompts"))
            shape = rng.choice(("step", "ramp"))
            p = {"x": math.exp(u(math.log(5), math.log(50)))}
            dur = u(300, 1800)
            ok = (lambda c: True) if variant == "more_calls" else (
                lambda c: c.rate >= 0.02 and c.arch not in ("agent",))
        elif kind == "cost_spike":
            variant = rng.choice(("model_switch", "model_switch", "huge_outputs"))
            p = {"output_x": u(8, 20)} if variant == "huge_outputs" else {}
            dur = u(600, 2400)
            ok = lambda c: c.rate >= 0.015 and c.model not in _EXPENSIVE  # noqa: E731
        elif kind == "agent_loop":
            variant = rng.choice(("growing", "cycle"))
            shape = "ramp"
            p = {"calls": int(math.exp(u(math.log(60), math.log(500)))), "gap_s": u(1.0, 6.0),
                 "cycle": rng.randint(2, 5), "plateau": int(u(20_000, 110_000))}
            dur = p["calls"] * (p["gap_s"] + 8)
            if dur > d - warm - 60:
                p["calls"] = max(60, int((d - warm - 60) / (p["gap_s"] + 8)))
                dur = p["calls"] * (p["gap_s"] + 8)
            ok = lambda c: c.arch in ("agent", "chat", "reasoning")  # noqa: E731
        elif kind == "context_bloat":
            shape = "ramp"
            turns = rng.randint(20, 80)
            p = {"turns": turns, "grow": int(u(100_000, 180_000) / turns),
                 "gap_s": u(10, 60), "cached": rng.random() < 0.3}
            dur = turns * (p["gap_s"] + 20)
            ok = lambda c: (c.arch in ("chat", "agent", "rag", "code")  # noqa: E731
                            and _model_info(c.model)[2] >= 128_000)
        elif kind == "cache_opportunity":
            p = {"calls": rng.randint(30, 300), "input": int(math.exp(u(math.log(3000),
                                                                         math.log(30000))))}
            dur = min(3600.0, p["calls"] * u(5, 40))
            ok = lambda c: c.caches  # noqa: E731
        t0, t1 = window(dur)
        c = self._pick(size, busy, t0, t1, ok)
        if c is None:
            return None
        ep = _Episode(lid, kind, variant, shape, c, c.model, t0, t1, p, victim_size=c.size,
                      subject=c.id)
        if kind in ("token_spike", "cost_spike"):
            self._victim_minutes.setdefault(c.id, {})
        if kind == "failure_spike" and c.rate < 0.1:  # long enough for ~25 failures
            need = 25 / (c.rate * p["error_rate"] * (0.5 if shape == "intermittent" else 0.8))
            ep.t1 = min(self.t_end - 30, max(t1, t0 + need))
        if kind in ("failure_spike", "cost_spike") or (kind == "token_spike"
                                                       and variant == "bigger_prompts"):
            c.mods.append(ep)
            if kind == "cost_spike" and variant == "model_switch":
                p["to_model"] = rng.choice([m for m in _EXPENSIVE if m != c.model])
                ep.model = p["to_model"]
        else:
            self.injectors.append(ep)
            ep.inj = True
            ep.state["next"] = t0
            ep.state["done"] = 0
            if kind in ("runaway_reasoning",):
                ep.model = c.model if _model_info(c.model)[1] else (
                    c.alt if _model_info(c.alt)[1] else "o3-mini")
            if kind in ("agent_loop", "context_bloat"):
                ep.scope = "session"
                ep.subject = (f"tr-{self._hash()[:16]}" if kind == "agent_loop"
                              else f"s-{self._hash()[:12]}")
            if kind == "cache_opportunity":
                ep.state["hash"] = self._hash()
            if kind == "agent_loop":
                ep.state["cycle"] = [self._hash() for _ in range(p["cycle"])]
            if kind == "retry_storm" and variant == "single_hash":
                ep.state["hash"] = self._hash()
        return ep

    def _outage(self, lid: str, warm: float) -> _Episode | None:
        rng = self.rng
        use: dict[str, int] = {}
        for c in self.consumers:
            use[c.model] = use.get(c.model, 0) + 1
        taken = {o.model for o in self.outages}
        models = [m for m, k in sorted(use.items(), key=lambda x: -x[1])
                  if k >= 3 and m not in taken]
        if not models:
            return None
        model = rng.choice(models[:4])
        k = use[model]
        dur = rng.uniform(120, 1200)
        s = rng.uniform(warm, max(warm, self.cfg.duration_s - dur - 30))
        prov = _model_info(model)[0]
        errs = [(503, "upstream_5xx"), (500, "upstream_5xx"), (502, "upstream_5xx"),
                (0, "timeout")] + ([(529, "overloaded")] if prov == "anthropic" else [])
        ep = _Episode(lid, "failure_spike", "upstream_outage",
                      rng.choice(("step", "step", "ramp", "intermittent")), None, model,
                      self.t_start + s, self.t_start + s + dur,
                      {"error_rate": rng.uniform(0.5, 1.0), "errors": errs, "period_s": 90,
                       "consumers_using": k},
                      scope="model", subject=model,
                      victim_size="large" if k >= 10 else "medium" if k >= 4 else "small")
        self.outages.append(ep)
        return ep

    def _inject(self, ep: _Episode, w0: float, w1: float) -> None:
        """Generate an injector episode's own calls that start in [w0, w1)."""
        rng, st, p, c = self.rng, ep.state, ep.params, ep.c
        assert c is not None
        lo, hi = max(w0, ep.t0), min(w1, ep.t1)
        if ep.kind == "retry_storm" and ep.variant == "multi_hash":
            if hi <= lo:
                return
            lam = max(c.rate, 0.05) * (p["x"] - 1) * (hi - lo) * ep.level(lo)
            for t in sorted(rng.uniform(lo, hi)
                            for _ in range(_poisson(rng, lam))):
                inp, out = self._tokens(c, "chat")
                r = _Req(c, c.model, inp, out, 0, self._hash())
                r.ep = ep
                self._call(r, t)
            return
        if ep.kind == "token_spike":  # more_calls
            if hi <= lo:
                return
            lam = max(c.rate, 1 / 60) * (p["x"] - 1) * (hi - lo) * ep.level(lo)
            for t in sorted(rng.uniform(lo, hi)
                            for _ in range(_poisson(rng, lam))):
                kind = {"code": "code", "rag": "long_context"}.get(c.arch, "chat")
                inp, out = self._tokens(c, kind)
                out, rsn = self._reasoning(c, c.model, out, c.arch == "reasoning")
                r = _Req(c, c.model, inp, out, rsn, self._hash())
                r.ep = ep
                self._call(r, t)
            return
        while st["next"] < w1 and st["done"] < p.get("calls", 1) and st["next"] < ep.t1 + 600:
            t = st["next"]
            i = st["done"]
            st["done"] += 1
            if ep.kind == "runaway_reasoning":
                m = ep.model or "o3-mini"
                max_out = rng.choice((None, 32768, 65536, 100000)) \
                    if ep.variant == "single" else rng.choice((32768, 65536))
                rsn = int(rng.uniform(15_000, 60_000))
                r = _Req(c, m, int(_q(self.tables["reasoning"][0], rng.random())) + 200,
                         rsn + rng.randint(0, 1500), rsn, self._hash())
                r.max_out = max_out
                if rng.random() < 0.4:  # stuck thinking: the call itself lasts 10-30 min
                    r.lat = rng.uniform(620, 1800)
                r.ep = ep
                self._call(r, t)
                gap = ep.t1 - ep.t0
                st["next"] = t + (rng.uniform(0.2, 1.0) * gap / p["calls"] if ep.variant == "single"
                                  else rng.expovariate(p["calls"] / gap))
            elif ep.kind == "retry_storm":
                inp, out = self._tokens(c, "chat")
                r = _Req(c, c.model, inp, out, 0, st["hash"])
                r.attempt = i if p["attempt_mode"] == "count" else i % 3
                r.ep = ep
                self._call(r, t)
                iv = p["interval_s"] * rng.uniform(0.7, 1.3)
                if ep.shape == "intermittent" and i % 25 == 24:
                    iv += rng.uniform(30, 180)
                st["next"] = t + iv
            elif ep.kind == "cache_opportunity":
                inp = p["input"] + rng.randint(0, 3)
                r = _Req(c, c.model, inp, int(_q(self.tables["chat"][1], rng.random())), 0,
                         st["hash"])
                r.inp = p["input"]
                r.ep = ep
                self._call(r, t)
                st["next"] = t + (ep.t1 - ep.t0) / p["calls"] * rng.uniform(0.5, 1.5)
            elif ep.kind in ("agent_loop", "context_bloat"):
                st["next"] = math.inf  # a chain: each call schedules the next
                self._chain(ep, t, 0, 2500 if ep.kind == "agent_loop" else 1500)

    def _chain(self, ep: _Episode, t: float, i: int, hist: int) -> None:
        rng, p, c = self.rng, ep.params, ep.c
        assert c is not None
        last = i + 1 >= (p.get("calls") or p.get("turns") or 1)
        if ep.kind == "agent_loop":
            inp = min(hist, p["plateau"])
            rh = (ep.state["cycle"][i % p["cycle"]] if ep.variant == "cycle" and i >= 5
                  else self._hash())
            r = _Req(c, c.model, inp, 0, 0, rh)
            r.out = int(rng.uniform(30, 200))
            r.out, r.rsn = self._reasoning(c, c.model, r.out, False)
            r.tools, r.finish, r.trace = rng.choice((1, 1, 1, 2, 3)), "tool_calls", ep.subject
            r.cached = self._cached(c, inp, 0.8)
            nxt = hist + int(rng.uniform(200, 1500))
            gap = rng.uniform(0.3, 2 * p["gap_s"])
        else:
            inp = min(hist, int(_model_info(c.model)[2] * 0.95))
            r = _Req(c, c.model, inp, int(_q(self.tables["chat"][1], rng.random())), 0,
                     self._hash())
            r.out, r.rsn = self._reasoning(c, c.model, r.out, False)
            r.session = ep.subject
            r.cached = (hist - p["grow"]) // 128 * 128 if p["cached"] and i else 0
            r.max_out = None
            nxt = hist + int(p["grow"] * rng.uniform(0.6, 1.4)) + r.out - r.rsn
            gap = p["gap_s"] * rng.uniform(0.5, 1.5)
        r.user = f"u{rng.randrange(max(1, c.users or 1)):05d}"
        r.ep = ep
        if not last:
            def cont(t2: float, ok: bool) -> None:
                self._chain(ep, t2 + gap, i + 1, nxt)
            r.cont = cont
        self._call(r, t)

    # ---------------------------------------------------------------- main loop
    def _fmt(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((t - sec) * 1000):03d}Z"

    def _arrivals(self, w0: float) -> None:
        rng = self.rng
        hour = ((w0 - self.t_start) / 3600.0 + self.cfg.start.hour
                + self.cfg.start.minute / 60.0)
        a = math.exp(-1 / 30)
        b = math.sqrt(1 - a * a)
        for c in self.consumers:
            h = (hour + c.phase) % 24
            i = int(h)
            f = self.hourly[i] + (self.hourly[(i + 1) % 24] - self.hourly[i]) * (h - i)
            c.level = a * c.level + b * rng.gauss(0, c.sigma)
            if c.idle and rng.random() < c.idle:
                n = 0
            else:
                lam = (c.primary_rate * 60 * f ** c.amp * math.exp(c.level - c.sigma ** 2 / 2)
                       * rng.gammavariate(c.k_burst, 1 / c.k_burst) / (1 - c.idle))
                n = _poisson(rng, lam)
            if n:
                if n <= 3 or c.k_burst > 2:
                    ts = sorted(w0 + 60 * rng.random() for _ in range(n))
                else:  # clustered: a few sub-bursts inside the minute
                    centres = [w0 + 60 * rng.random() for _ in range(1 + n // 6)]
                    ts = sorted(min(w0 + 59.999, rng.choice(centres) + rng.expovariate(0.5))
                                for _ in range(n))
                for t in ts:
                    self._normal(c, t)
            while c.cron_next < w0 + 60:
                for h_, inp in c.cron:
                    out, rsn = self._reasoning(c, c.model, self._tokens(c, "chat")[1], False)
                    r = _Req(c, c.model, inp if not self.reference else 2048, out, rsn, h_)
                    r.cached = (0 if self.reference or not c.caches or inp < 1024
                                or rng.random() < 0.1 else int(inp * 0.9) // 128 * 128)
                    self._call(r, c.cron_next + rng.uniform(0, 5))
                c.cron_next += c.cron_period

    def events(self) -> Iterator[dict[str, Any]]:
        """Yield canonical event dicts in non-decreasing ``ts`` order."""
        heap = self._heap
        w0 = self.t_start
        while w0 < self.t_end:
            w1 = min(self.t_end, w0 + 60.0)
            self._arrivals(w0)
            for ep in self.injectors:
                if ep.t0 < w1 and w0 < ep.t1 + 600:
                    self._inject(ep, w0, w1)
            while heap and heap[0][0] < w1:
                t, _, ev, r, ok = heapq.heappop(heap)
                ev["ts"] = self._fmt(t)
                vm = self._victim_minutes.get(r.c.id)
                if vm is not None:
                    self._count_victim(vm, t, ev)
                lab = r.ep
                if lab is not None and not ok and lab.kind == "runaway_reasoning":
                    # an outage of its model failed the call (runaway calls
                    # are spared background errors): it thought nothing, so
                    # no detector can see it, and it is no part of the label
                    lab = None
                if lab is not None:
                    if not lab.n:
                        lab.first = t
                    lab.n += 1
                    lab.last = t
                    if len(lab.sample) < 5:
                        lab.sample.append(ev["event_id"])
                    self.anomalous_events[ev["event_id"]] = lab.label_id
                yield ev
                if not ok or r.cont is not None:
                    self._after(r, t, ok, ev["status"])
            w0 = w1

    def _count_victim(self, vm: dict[int, list[float]], t: float, ev: dict[str, Any]) -> None:
        if self._prices is None:
            from .pricing import PriceTable
            self._prices = PriceTable.load()
        p = self._prices.price_of(ev["model"])
        cost = 0.0 if p is None else p.base_cost(
            ev["input_tokens"], ev["cached_input_tokens"], ev["cache_write_tokens"],
            ev["output_tokens"])
        cell = vm.setdefault(int(t // 60), [0.0, 0.0])
        cell[0] += ev["input_tokens"] + ev["output_tokens"]
        cell[1] += cost

    def _effect(self, ep: _Episode) -> float | None:
        """How many times its previous hour's rate the victim's tokens (cost)
        per minute were during a token (cost) spike episode."""
        vm = self._victim_minutes.get(ep.c.id) if ep.c is not None else None
        if vm is None or ep.kind not in ("token_spike", "cost_spike"):
            return None
        i = 0 if ep.kind == "token_spike" else 1
        m0, m1 = int(ep.first // 60), int(ep.last // 60)
        during = sum(vm.get(m, (0.0, 0.0))[i] for m in range(m0, m1 + 1)) / (m1 - m0 + 1)
        before = sum(vm.get(m, (0.0, 0.0))[i] for m in range(m0 - 60, m0)) / 60.0
        return during / before if before > 0 else math.inf

    @property
    def labels(self) -> list[dict[str, Any]]:
        """Ground-truth records of the episodes that produced events so far.

        Token and cost spike labels carry ``effect``: the victim's tokens
        (cost) per minute during the episode over its previous hour's.  An
        injection can come out weaker than asked (prompts capped by the
        context window, a small consumer busier than its nominal rate, outputs
        a small part of the cost); below ``WEAK_EFFECT`` the label is marked
        ``weak``: not a spike beyond the consumer's own variation, and left
        out of recall by :func:`detectors.scoring.score`.  So is a consumer
        failure spike of fewer than ``WEAK_FAILURES`` failed calls (a small
        consumer's episode can be that short): no test can tell it from bad
        luck."""
        out = []
        for ep in self.episodes:
            if not ep.n:
                continue
            c = ep.c
            eff = self._effect(ep)
            extra: dict[str, Any] = {} if eff is None else {
                "effect": round(eff, 2) if eff < math.inf else None, "weak": eff < WEAK_EFFECT}
            if ep.kind == "failure_spike" and ep.scope == "consumer":
                # fewer failed calls than any significance test needs
                extra["weak"] = ep.n < WEAK_FAILURES
            out.append(extra | {
                "label_id": ep.label_id, "kind": ep.kind, "scope": ep.scope,
                "subject": ep.subject, "consumer": c.id if c else None,
                "tenant": c.tenant if c else None, "model": ep.model,
                "start": self._iso(ep.first), "end": self._iso(ep.last),
                "shape": ep.shape, "variant": ep.variant, "victim_size": ep.victim_size,
                "n_events": ep.n, "event_ids_sample": list(ep.sample),
                "params": {k: v for k, v in ep.params.items() if k != "errors"}
                | {"errors": sorted({e for _, e in ep.params.get("errors", [])})},
            })
        return out

    @staticmethod
    def _iso(t: float) -> str:
        sec = int(t)
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{base}.{int((t - sec) * 1000):03d}Z"


def simulate(cfg: SimConfig) -> Iterator[dict[str, Any]]:
    """The event stream of ``cfg`` (use :class:`Simulation` to also get labels)."""
    return Simulation(cfg).events()


def labels(cfg: SimConfig) -> list[dict[str, Any]]:
    """Run the simulation of ``cfg`` to the end and return its label records."""
    sim = Simulation(cfg)
    for _ in sim.events():
        pass
    return sim.labels
