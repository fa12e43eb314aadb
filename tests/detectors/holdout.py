"""A third, held-out labelled traffic generator, for evaluating the detectors only.

Written from DESIGN.md, ``detectors/scoring.py`` (the label format and the
matching rules), the public traces in ``/work/shared/data`` and the product
brief, *without* reading the detectors, their documentation or the two other
generators (``ingest/simulator.py``, ``tests/detectors/synth.py``).  It is not
tuned to make detection easier or harder: its normal traffic is built from the
real traces, read at generation time, and its anomalies from the brief.

Normal traffic
--------------
* Arrivals: each consumer is given one ServeGen client (per-client 600 s
  windows over 14 days: rate, inter-arrival family Gamma or Weibull and its
  shape), read from the same time of day for every consumer, so the daily
  cycle, the empty windows and the bursts are the real ones; a few consumers
  replay the real Azure 2023 timestamps instead (thinned and looped).
  Consumer sizes are heavy tailed (log-normal, sigma 1.6) and matched by rank
  to the clients' own sizes; cron consumers are periodic.
* Sizes: Azure code / conv rows, Mooncake rows (long contexts, with prefix
  caching from their ``hash_ids``), tau-bench's real agent runs (one call per
  assistant turn, input the history so far, 0-27 tool calls a run), and for
  the reasoning models the ServeGen deepseek-r1 per-client distributions of
  input, output and ``reason_ratio`` for that 6 h slot.
* Latency: time to first token plus per-token time per model; reasoning
  tokens come before the first visible token, so big reasoning outputs run
  for minutes.
* A few % of background errors (429, 5xx, timeouts with status 0, a few 400),
  retried 0-2 times with the same ``request_hash`` after a backoff of a second
  or a few, with ``attempt`` reported by some consumers; legitimately repeated
  prompts (FAQ, cron) with prompt caching where the provider caches; multi-turn
  sessions; several models and tenants; ``cost`` left to the evaluation.

Anomalies (each with a label; start = first anomalous event, end = last)
------------------------------------------------------------------------
runaway_reasoning, retry_storm (same hash / rate jump), failure_spike (consumer
and model scope), token_spike, cost_spike, agent_loop, context_bloat and
cache_opportunity.  See the ``_inject_*`` methods for the shapes.  Token and
cost spikes record their realised ``effect`` (the victim's tokens or cost per
minute during the episode over its previous hour) and are ``weak`` below 3.

The trace folder is ``$TOKENWARD_TRACE_DATA`` or ``/work/shared/data``.
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ENV = "TOKENWARD_TRACE_DATA"
DEFAULT_DATA = Path("/work/shared/data")
# The run starts at 06:00 UTC and reads every ServeGen client from 06:00 of
# its own day, so all consumers share one daily phase.
START = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)
START_TOD = 6 * 3600
WIN = 600.0
FREE_S = 3600.0          # the first hour carries no anomaly (baselines warm up)
MEAN_RATE = 0.22         # mean calls per second per consumer (before retries)
TOOL_SCHEMA_TOKENS = (400, 2500)


def data_dir() -> Path:
    """The trace folder: ``$TOKENWARD_TRACE_DATA`` or ``/work/shared/data``."""
    return Path(os.environ.get(ENV) or DEFAULT_DATA)


# ---------------------------------------------------------------------------
# models

@dataclass(frozen=True)
class ModelSpec:
    reasoning: bool
    ttft_s: float        # base time to first token
    prefill_s: float     # per input token
    tpot_s: float        # per output token
    ctx: int             # context window
    auto_cache: bool     # provider caches prompt prefixes without being asked
    max_out: int


MODELS: dict[str, ModelSpec] = {
    "gpt-4o": ModelSpec(False, 0.45, 6e-5, 0.012, 128_000, True, 16_384),
    "gpt-4o-mini": ModelSpec(False, 0.30, 3e-5, 0.007, 128_000, True, 16_384),
    "claude-sonnet-4": ModelSpec(False, 0.90, 7e-5, 0.016, 200_000, False, 64_000),
    "o3-mini": ModelSpec(True, 0.50, 4e-5, 0.006, 200_000, True, 100_000),
    "deepseek-reasoner": ModelSpec(True, 1.00, 8e-5, 0.030, 64_000, True, 65_536),
    # only reached by a cost spike's model switch
    "o1": ModelSpec(True, 0.80, 8e-5, 0.020, 200_000, True, 100_000),
    "claude-opus-4": ModelSpec(False, 1.20, 1e-4, 0.030, 200_000, False, 32_000),
}
PRICIER = {"gpt-4o-mini": ("gpt-4o", "claude-opus-4", "o1"), "gpt-4o": ("o1", "claude-opus-4"),
           "claude-sonnet-4": ("claude-opus-4",), "o3-mini": ("o1",),
           "deepseek-reasoner": ("o1",)}

ARCHETYPES = (("chat", 0.24), ("code", 0.16), ("rag", 0.12), ("agent", 0.16),
              ("reason", 0.18), ("faq", 0.08), ("cron", 0.06))
ARCH_MODELS = {
    "chat": (("gpt-4o-mini", 0.5), ("gpt-4o", 0.3), ("claude-sonnet-4", 0.2)),
    "code": (("gpt-4o", 0.4), ("claude-sonnet-4", 0.4), ("gpt-4o-mini", 0.2)),
    "rag": (("gpt-4o-mini", 0.5), ("gpt-4o", 0.3), ("claude-sonnet-4", 0.2)),
    "agent": (("gpt-4o", 0.5), ("claude-sonnet-4", 0.3), ("gpt-4o-mini", 0.2)),
    "reason": (("deepseek-reasoner", 0.55), ("o3-mini", 0.45)),
    "faq": (("gpt-4o-mini", 0.7), ("gpt-4o", 0.3)),
    "cron": (("gpt-4o-mini", 0.6), ("gpt-4o", 0.25), ("claude-sonnet-4", 0.15)),
}
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "default")
TENANT_W = (0.25, 0.18, 0.14, 0.12, 0.1, 0.08, 0.07, 0.06)


# ---------------------------------------------------------------------------
# the real traces

@dataclass
class _SGTrace:
    rate: np.ndarray
    fam: list[str]
    shape: np.ndarray


@dataclass
class _R1Dist:
    """One ServeGen deepseek-r1 client: per 6 h slot, (values, cumulative) pairs."""
    slots: dict[int, tuple[tuple[list[float], list[float]], ...]]

    def slot(self, tod: float) -> tuple[tuple[list[float], list[float]], ...]:
        s = int(tod // 21600) * 21600
        if s in self.slots:
            return self.slots[s]
        keys = sorted(self.slots, key=lambda k: min(abs(k - s), 86400 - abs(k - s)))
        return self.slots[keys[0]]


class _Traces:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(
                f"holdout generator: trace data folder {root} not found (set ${ENV} to the "
                f"folder holding azure_llm_2023/, mooncake/, servegen/ and tau_bench/)")
        self.root = root
        self.code = self._azure(root / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv")
        self.conv = self._azure(root / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv")
        mc = root / "mooncake" / "conversation_trace.jsonl"
        self.mc_in: list[int] = []
        self.mc_out: list[int] = []
        self.mc_blocks: list[tuple[int, ...]] = []
        with self._open(mc) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    self.mc_in.append(int(d["input_length"]))
                    self.mc_out.append(int(d["output_length"]))
                    self.mc_blocks.append(tuple(d.get("hash_ids") or ()))
        self.tau = self._tau(root / "tau_bench" / "gpt-4o-airline.json")
        lang = root / "servegen" / "data" / "language"
        self.sg_lang = sorted(str(p) for p in lang.glob("*/chunk-*-trace.csv"))
        r1 = root / "servegen" / "data" / "reason" / "deepseek-r1"
        self.sg_r1 = sorted(str(p) for p in r1.glob("chunk-*-trace.csv"))
        if not self.sg_lang or not self.sg_r1:
            raise FileNotFoundError(f"holdout generator: no ServeGen traces under {root}/servegen")
        self._sg: dict[str, _SGTrace] = {}
        self._r1: dict[str, _R1Dist | None] = {}

    @staticmethod
    def _open(p: Path) -> Any:
        if not p.exists():
            raise FileNotFoundError(f"holdout generator: trace file {p} not found")
        return p.open(encoding="utf-8")

    def _azure(self, p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ts, ctx, gen = [], [], []
        with self._open(p) as f:
            rd = csv.reader(f)
            next(rd)
            for row in rd:
                hms = row[0].split(" ")[1].split(":")
                ts.append(int(hms[0]) * 3600 + int(hms[1]) * 60 + float(hms[2]))
                ctx.append(int(row[1]))
                gen.append(int(row[2]))
        t = np.array(ts)
        return t - t.min(), np.array(ctx), np.array(gen)

    def _tau(self, p: Path) -> list[list[tuple[int, int, int, bool]]]:
        """Per real run, per assistant turn: (history tokens before it, its own
        tokens, its tool calls, whether a human turn follows)."""
        with self._open(p) as f:
            runs = json.load(f)
        out = []
        for run in runs:
            steps: list[tuple[int, int, int, bool]] = []
            hist = 0.0
            msgs = run.get("traj") or []
            for i, m in enumerate(msgs):
                tc = m.get("tool_calls") or []
                size = len(str(m.get("content") or "")) + len(json.dumps(tc, default=str))
                if m.get("role") == "assistant":
                    nxt = msgs[i + 1].get("role") if i + 1 < len(msgs) else None
                    steps.append((int(hist / 4), max(int(size / 4), 5), len(tc), nxt == "user"))
                hist += size
            if steps:
                out.append(steps)
        return out

    def sg(self, path: str) -> _SGTrace:
        tr = self._sg.get(path)
        if tr is None:
            rate, fam, shape = [], [], []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    p = line.rstrip("\n").split(",")
                    if len(p) < 6:
                        continue
                    rate.append(float(p[1]))
                    fam.append(p[3])
                    shape.append(float(p[4] or 0))
            tr = self._sg[path] = _SGTrace(np.array(rate), fam, np.array(shape))
        return tr

    def r1(self, trace_path: str) -> _R1Dist | None:
        if trace_path in self._r1:
            return self._r1[trace_path]
        ds = trace_path.replace("-trace.csv", "-dataset.json")
        res = None
        if os.path.exists(ds):
            with open(ds, encoding="utf-8") as f:
                d = json.load(f)
            slots = {}
            for k, v in d.items():
                parts = []
                for name in ("input_tokens", "output_tokens", "reason_ratio"):
                    pairs = re.findall(r"([-+\d.eE]+)\s*:\s*([-+\d.eE]+)", v.get(name) or "")
                    vals = [float(a) for a, b in pairs if float(b) > 0]
                    ps = [float(b) for a, b in pairs if float(b) > 0]
                    if not vals:
                        break
                    cum = list(np.cumsum(ps) / sum(ps))
                    parts.append((vals, cum))
                if len(parts) == 3:
                    slots[int(k)] = tuple(parts)
            res = _R1Dist(slots) if slots else None
        self._r1[trace_path] = res
        return res


@functools.lru_cache(maxsize=2)
def _traces(root: str) -> _Traces:
    return _Traces(Path(root))


def _draw(r: random.Random, dist: tuple[list[float], list[float]]) -> float:
    vals, cum = dist
    return vals[min(bisect.bisect_left(cum, r.random()), len(vals) - 1)]


# ---------------------------------------------------------------------------
# consumers

@dataclass
class Consumer:
    idx: int
    name: str
    tenant: str
    arch: str
    model: str
    alt_model: str | None
    alt_share: float
    rate: float                  # target calls per second
    r: random.Random
    g: np.random.Generator
    err: float = 0.01
    retry_max: int = 2
    retry_p: float = 0.8
    backoff: float = 1.0
    attempt_mode: int = 1        # 0 never reported, 1 on retries (1, 2), 2 always (0, 1, 2)
    timeout: float | None = 60.0
    in_scale: float = 1.0
    max_out: int | None = None
    stream: bool = False
    users: int = 0
    claude_cache: bool = False
    pool: np.ndarray | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    size: str = "small"
    busy: list[tuple[float, float]] = field(default_factory=list)
    # archetype state
    r1: _R1Dist | None = None
    mc_cursor: int = 0
    mc_end: int = 0
    mc_start: int = 0
    seen_blocks: dict[int, float] = field(default_factory=dict)
    faq: list[tuple[str, int, int]] = field(default_factory=list)
    faq_cum: list[float] = field(default_factory=list)
    novel: float = 0.3
    tool_tokens: int = 0
    sess_p: float = 0.5
    sess_len: float = 4.0
    n_id: int = 0

    def free(self, a: float, b: float) -> bool:
        return all(b + 1800 < s or a > e + 1800 for s, e in self.busy)

    def models(self) -> tuple[str, ...]:
        return (self.model,) if self.alt_model is None else (self.model, self.alt_model)


def _iso_factory() -> Callable[[float], str]:
    base = START.timestamp()
    cache: dict[int, str] = {}

    def iso(t: float) -> str:
        ms = round((base + t) * 1000)
        sec, frac = divmod(ms, 1000)
        p = cache.get(sec)
        if p is None:
            p = cache[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{p}.{frac:03d}Z"
    return iso


_iso = _iso_factory()


# ---------------------------------------------------------------------------
# the generator

class Holdout:
    """Held-out labelled traffic: ``Holdout(seed, hours, consumers).events()``
    (canonical usage-event v1 dicts sorted by ``ts``) and ``.labels``."""

    def __init__(self, seed: int, hours: float, consumers: int,
                 data: str | Path | None = None) -> None:
        self.seed = seed
        self.hours = float(hours)
        self.n = int(consumers)
        self.H = self.hours * 3600.0
        self.data = Path(data) if data is not None else data_dir()
        self.r = random.Random(seed * 7919 + 17)
        self.g = np.random.default_rng([seed, 4242])
        self._events: list[dict[str, Any]] | None = None
        self._labels: list[dict[str, Any]] = []
        self.cons: list[Consumer] = []
        self.outages: list[tuple[str, float, float]] = []
        self.timing: dict[str, float] = {}
        self.skipped: list[tuple[str, str]] = []

    # -- public ------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        if self._events is None:
            self._build()
        assert self._events is not None
        return self._events

    @property
    def labels(self) -> list[dict[str, Any]]:
        if self._events is None:
            self._build()
        return self._labels

    # -- build -------------------------------------------------------------
    def _build(self) -> None:
        t0 = time.perf_counter()
        self.tr = _traces(str(self.data))
        self._make_consumers()
        for c in self.cons:
            self._normal(c)
        t1 = time.perf_counter()
        self._classify()
        self._inject_all()
        t2 = time.perf_counter()
        evs: list[dict[str, Any]] = []
        for c in self.cons:
            evs.extend(c.events)
            c.events = []
        evs.sort(key=lambda e: e["ts"])
        pre = f"h{self.seed}-"
        for i, e in enumerate(evs):
            e["ts"] = _iso(e["ts"])
            e["event_id"] = f"{pre}{i}"
        self._events = evs
        self.timing = {"normal_s": t1 - t0, "anomalies_s": t2 - t1,
                       "finish_s": time.perf_counter() - t2}

    def _make_consumers(self) -> None:
        r, g = self.r, self.g
        n = self.n
        sizes = np.sort(g.lognormal(0.0, 1.6, n))[::-1]
        sizes = np.minimum(sizes * (MEAN_RATE / sizes.mean()), 12.0)
        archs = [a for a, _ in ARCHETYPES]
        aw = [w for _, w in ARCHETYPES]
        arch_of = [r.choices(archs, aw)[0] for _ in range(n)]
        # ServeGen clients: language ones for all but the reasoning consumers
        lang = list(self.tr.sg_lang)
        r.shuffle(lang)
        r1 = [p for p in self.tr.sg_r1 if self.tr.r1(p) is not None]
        r.shuffle(r1)
        n_reason = sum(a == "reason" for a in arch_of)
        cl_lang = [lang[i % len(lang)] for i in range(n - n_reason)]
        cl_r1 = [r1[i % len(r1)] for i in range(n_reason)]

        def mean_rate(p: str) -> float:
            return float(self.tr.sg(p).rate.mean())
        cl_lang.sort(key=mean_rate, reverse=True)
        cl_r1.sort(key=mean_rate, reverse=True)
        order = list(range(n))
        r.shuffle(order)   # consumer numbers do not reveal their size
        li = ri = 0
        for rank in range(n):
            idx = order[rank]
            arch = arch_of[rank]
            if arch == "reason":
                client, ri = cl_r1[ri], ri + 1
            else:
                client, li = cl_lang[li], li + 1
            c = self._consumer(idx, arch, float(sizes[rank]), client)
            self.cons.append(c)
        self.cons.sort(key=lambda c: c.idx)

    def _consumer(self, idx: int, arch: str, rate: float, client: str) -> Consumer:
        r = random.Random(self.seed * 1_000_003 + idx * 7 + 1)
        g = np.random.default_rng([self.seed, idx, 99])
        models = ARCH_MODELS[arch]
        model = r.choices([m for m, _ in models], [w for _, w in models])[0]
        alt = None
        if r.random() < 0.2:
            others = [m for m, _ in models if m != model]
            alt = r.choice(others)
        tenant = r.choices(TENANTS, TENANT_W)[0]
        c = Consumer(idx=idx, name=f"{tenant[:3]}-{arch}-{idx:04d}", tenant=tenant, arch=arch,
                     model=model, alt_model=alt, alt_share=r.uniform(0.05, 0.3), rate=rate,
                     r=r, g=g)
        c.err = min(0.06, max(0.001, r.lognormvariate(math.log(0.012), 0.7)))
        c.retry_max = r.choices((0, 1, 2), (0.15, 0.35, 0.5))[0]
        c.retry_p = r.uniform(0.6, 1.0)
        c.backoff = r.uniform(0.5, 3.0)
        c.attempt_mode = r.choices((0, 1, 2), (0.4, 0.4, 0.2))[0]
        reasoning = MODELS[model].reasoning
        # a total-time timeout; streaming clients only time out waiting for a chunk
        c.timeout = r.choice((300.0, 600.0, 600.0, 900.0, None, None)) if reasoning else \
            r.choice((30.0, 60.0, 60.0, 120.0, None))
        c.in_scale = r.lognormvariate(0, 0.4)
        c.stream = r.random() < (0.8 if arch in ("chat", "reason") else 0.3)
        c.users = r.choice((0, 20, 200, 2000)) if arch in ("chat", "faq", "agent") else 0
        c.claude_cache = r.random() < 0.5
        self._arrivals_source(c, client)
        if arch in ("chat", "faq", "cron"):
            src = self.tr.conv if (arch != "cron" or r.random() < 0.5) else self.tr.code
            c.pool = g.choice(len(src[1]), size=r.randint(300, 3000))
            c._src = src  # type: ignore[attr-defined]
        elif arch == "code":
            c.pool = g.choice(len(self.tr.code[1]), size=r.randint(300, 3000))
            c._src = self.tr.code  # type: ignore[attr-defined]
        elif arch == "rag":
            n_mc = len(self.tr.mc_in)
            span = r.randint(400, 3000)
            c.mc_start = r.randrange(0, max(1, n_mc - span))
            c.mc_end = c.mc_start + span
            c.mc_cursor = c.mc_start
        elif arch == "agent":
            c.tool_tokens = r.randint(*TOOL_SCHEMA_TOKENS)
            c.rate = c.rate / 11.0   # arrivals are run starts (about 11 calls a run)
        if arch == "reason":
            c.r1 = self.tr.r1(client)
            # the client's own cap shows in its output distribution (e.g. 4096, 32768)
            if c.r1 is not None:
                mx = max(max(s[1][0]) for s in c.r1.slots.values())
                c.max_out = int(mx) if int(mx) in (4096, 8192, 16384, 32768) else \
                    r.choice((None, None, 32768, 65536))
            if model == "deepseek-reasoner" and c.max_out and c.max_out > 65536:
                c.max_out = 65536
        elif r.random() < 0.5:
            c.max_out = r.choice((1024, 2048, 4096, 4096, 8192, 16384))
        if arch == "faq":
            k = r.randint(10, 200)
            for _ in range(k):
                j = int(c.pool[r.randrange(len(c.pool))])
                c.faq.append((self._hash(c), int(c._src[1][j] * c.in_scale) + 30,  # type: ignore[attr-defined]
                              int(c._src[2][j]) + 1))  # type: ignore[attr-defined]
            w = [1.0 / (i + 1) ** 1.1 for i in range(k)]
            c.faq_cum = list(np.cumsum(w) / sum(w))
            c.novel = r.uniform(0.1, 0.5)
        c.sess_p = r.uniform(0.3, 0.9)
        c.sess_len = r.uniform(2.0, 8.0)
        return c

    def _arrivals_source(self, c: Consumer, client: str) -> None:
        c._client = client  # type: ignore[attr-defined]
        c._azure = (c.arch in ("chat", "code") and c.r.random() < 0.15  # type: ignore[attr-defined]
                    and c.rate < 2.5)

    # -- arrivals ----------------------------------------------------------
    def _arrivals(self, c: Consumer) -> np.ndarray:
        if c.arch == "cron":
            return np.zeros(0)
        if getattr(c, "_azure", False):
            return self._azure_arrivals(c)
        tr = self.tr.sg(c._client)  # type: ignore[attr-defined]
        nw = math.ceil(self.H / WIN)
        L = len(tr.rate)
        per_day = 144
        days = max(1, L // per_day)
        start_w = None
        day_order = list(range(days))
        c.r.shuffle(day_order)
        shift = c.r.randint(-3, 3) if days == 1 else 0
        for d in day_order:
            sw = d * per_day + START_TOD // int(WIN) + shift
            seg = tr.rate[[(sw + j) % L for j in range(nw)]]
            if (seg > 0).mean() >= 0.2:
                start_w = sw
                break
        if start_w is None:
            nz = np.flatnonzero(tr.rate > 0)
            start_w = int(nz[0]) if len(nz) else 0
        idx = [(start_w + j) % L for j in range(nw)]
        seg = tr.rate[idx]
        m = float(seg.mean())
        if m <= 0:
            return np.zeros(0)
        scale = c.rate / m
        out = []
        g = c.g
        for j, w in enumerate(idx):
            lam = tr.rate[w] * scale
            if lam <= 0:
                continue
            fam, k = tr.fam[w], tr.shape[w]
            mean = 1.0 / lam
            need = lam * WIN
            n = int(need * 1.3) + 8
            chunks = []
            tot = 0.0
            first = True
            while tot < WIN:
                if fam == "Gamma" and k > 0:
                    kk = max(k, 0.03)
                    x = g.gamma(kk, 1.0 / kk, n) * mean
                elif fam == "Weibull" and k > 0:
                    kk = max(k, 0.15)
                    x = g.weibull(kk, n) / math.gamma(1 + 1 / kk) * mean
                else:
                    x = g.exponential(mean, n)
                if first:
                    x[0] *= g.random()
                    first = False
                chunks.append(x)
                tot += float(x.sum())
                if len(chunks) > 50:
                    break
            cs = np.cumsum(np.concatenate(chunks))
            cs = cs[cs < WIN]
            if len(cs) > need * 20 + 200:   # a degenerate fit, not a real burst
                cs = np.sort(g.uniform(0, WIN, int(g.poisson(need))))
            out.append(cs + j * WIN)
        if not out:
            return np.zeros(0)
        a = np.concatenate(out)
        return a[a < self.H]

    def _azure_arrivals(self, c: Consumer) -> np.ndarray:
        ts = (self.tr.conv if c.arch == "chat" else self.tr.code)[0]
        period = float(ts.max()) + 1.0
        tmpl_rate = len(ts) / period
        p = min(1.0, c.rate / tmpl_rate)
        out = []
        off = c.r.uniform(0, period)
        k = 0
        while k * period - off < self.H:
            keep = c.g.random(len(ts)) < p
            out.append(ts[keep] + k * period - off)
            k += 1
        a = np.concatenate(out)
        return np.sort(a[(a >= 0) & (a < self.H)])

    # -- one call (with background errors and normal retries) --------------
    def _hash(self, c: Consumer) -> str:
        return f"{c.r.getrandbits(64):016x}"

    def _latency(self, spec: ModelSpec, inp: int, out: int, rsn: int,
                 r: random.Random) -> tuple[float, float]:
        ttft = spec.ttft_s * r.lognormvariate(0, 0.35) + inp * spec.prefill_s * \
            r.lognormvariate(0, 0.25)
        tp = spec.tpot_s * r.lognormvariate(0, 0.25)
        ttft += rsn * tp
        total = ttft + max(out - rsn, 1) * tp
        if r.random() < 0.01:   # a slow replica or a queue, never past a 15 min gateway limit
            slow = min(r.uniform(2, 6), max(900.0 / total, 1.0))
            ttft *= slow
            total *= slow
        return total, ttft

    def _bg_error(self, c: Consumer) -> tuple[int, str, float]:
        r = c.r
        x = r.random()
        if x < 0.4:
            return 429, "rate_limited", r.uniform(0.03, 0.4)
        if x < 0.75:
            return r.choice((500, 502, 503)), "upstream_5xx", r.lognormvariate(0, 1.0)
        if x < 0.95:
            return 0, "timeout", c.timeout or r.uniform(60, 120)
        return 400, "bad_request", r.uniform(0.03, 0.3)

    def _base(self, c: Consumer, model: str) -> dict[str, Any]:
        e: dict[str, Any] = {"consumer": c.name, "model": model, "tenant": c.tenant}
        if c.users:
            e["user"] = f"u{c.r.randrange(c.users)}"
        return e

    def _emit(self, c: Consumer, t: float, model: str, inp: int, out: int, rsn: int = 0,
              cached: int = 0, rh: str | None = None, sess: str | None = None,
              trace: str | None = None, tools: int | None = None, fail_p: float | None = None,
              max_out: int | None = None, error: tuple[int, str, float] | None = None,
              retry: bool = True, attempt0: int = 0,
              into: list[dict[str, Any]] | None = None) -> tuple[float, bool]:
        """One logical call at start time ``t`` and its normal retries.
        Returns (end time of the last attempt, whether it was answered)."""
        r = c.r
        spec = MODELS[model]
        sink = c.events if into is None else into
        mo = max_out if max_out is not None else c.max_out
        if mo is not None:
            mo = min(mo, spec.max_out)
        finish = "tool_calls" if tools else "stop"
        if mo is not None and out >= mo:
            out, finish = mo, "length"
            rsn = min(rsn, out)
        inp = min(inp, spec.ctx)
        if rh is None:
            rh = self._hash(c)
        p = c.err if fail_p is None else fail_p
        attempt = attempt0
        while True:
            e = self._base(c, model)
            e["request_hash"] = rh
            if sess:
                e["session_id"] = sess
            if trace:
                e["trace_id"] = trace
            if c.attempt_mode == 2 or (c.attempt_mode == 1 and attempt > 0):
                e["attempt"] = attempt
            if mo is not None:
                e["max_output_tokens"] = mo
            if c.stream:
                e["stream"] = True
            lat, ttft = self._latency(spec, inp, out, rsn, r)
            failed = None
            if error is not None:
                failed = error
            elif r.random() < p:
                failed = self._bg_error(c)
            elif c.timeout is not None and not c.stream and lat > c.timeout:
                failed = (0, "timeout", c.timeout)
            if failed is None:
                e["status"] = 200
                e["input_tokens"] = inp
                e["output_tokens"] = out
                if rsn:
                    e["reasoning_tokens"] = rsn
                if cached:
                    e["cached_input_tokens"] = min(cached, inp)
                if tools:
                    e["tool_calls"] = tools
                e["finish_reason"] = finish
                e["latency_ms"] = round(lat * 1000, 1)
                if c.stream:
                    e["ttft_ms"] = round(ttft * 1000, 1)
                e["ts"] = t + lat
                sink.append(e)
                return t + lat, True
            status, err, flat = failed
            e["status"] = status
            e["error"] = err
            e["latency_ms"] = round(flat * 1000, 1)
            e["ts"] = t + flat
            sink.append(e)
            end = t + flat
            if not retry or status in (400, 401, 403, 404, 422) or attempt >= c.retry_max \
                    or r.random() >= c.retry_p:
                return end, False
            attempt += 1
            t = end + c.backoff * 2 ** (attempt - 1 - attempt0) * r.uniform(0.7, 1.5)
            error = None
            p = max(p, 0.35)   # upstream trouble tends to last a few seconds

    # -- sizes -------------------------------------------------------------
    def _cache_ok(self, c: Consumer, model: str) -> bool:
        return MODELS[model].auto_cache or (model.startswith("claude") and c.claude_cache)

    def _pick_model(self, c: Consumer) -> str:
        if c.alt_model is not None and c.r.random() < c.alt_share:
            return c.alt_model
        return c.model

    def _plain(self, c: Consumer, t: float) -> tuple[int, int, int]:
        """(input, output, reasoning) of one plain call of this consumer."""
        r = c.r
        if c.arch == "reason":
            if c.r1 is None:
                return 300, 1200, 900
            d = c.r1.slot((START_TOD + t) % 86400)
            inp = int(_draw(r, d[0]) * c.in_scale) + 10
            out = max(int(_draw(r, d[1])), 1)
            rsn = round(out * _draw(r, d[2]))
            return inp, out, min(rsn, out)
        if c.arch == "rag":
            i = c.mc_cursor
            c.mc_cursor = c.mc_cursor + 1 if c.mc_cursor + 1 < c.mc_end else c.mc_start
            return self.tr.mc_in[i], max(self.tr.mc_out[i], 1), 0
        if c.arch == "agent":
            run = self.tr.tau[r.randrange(len(self.tr.tau))]
            st = run[r.randrange(len(run))]
            return int(st[0] * c.in_scale) + c.tool_tokens, st[1], 0
        src = c._src  # type: ignore[attr-defined]
        assert c.pool is not None
        j = int(c.pool[r.randrange(len(c.pool))])
        return int(src[1][j] * c.in_scale) + 20, max(int(src[2][j]), 1), 0

    # -- normal traffic per archetype ----------------------------------------
    def _normal(self, c: Consumer) -> None:
        arr = self._arrivals(c)
        if c.arch == "chat":
            self._chat(c, arr)
        elif c.arch == "agent":
            self._agent(c, arr)
        elif c.arch == "cron":
            self._cron(c)
        elif c.arch == "faq":
            self._faq(c, arr)
        elif c.arch == "rag":
            self._rag(c, arr)
        else:   # code, reason
            for t in arr.tolist():
                inp, out, rsn = self._plain(c, t)
                model = self._pick_model(c)
                if not MODELS[model].reasoning:
                    rsn = 0
                self._emit(c, t, model, inp, out, rsn)

    def _chat(self, c: Consumer, arr: np.ndarray) -> None:
        r = c.r
        open_: list[list[Any]] = []   # [ready_t, sid, turns_left, prev_in, prev_out, end, model]
        for t in arr.tolist():
            if len(open_) > 40:
                open_.sort(key=lambda s: s[0])
                del open_[:10]
            sel = None
            for s in open_:
                if s[0] <= t and (sel is None or s[0] < sel[0]):
                    sel = s
            if sel is not None and (t - sel[5] > 1800 or sel[2] <= 0):
                open_.remove(sel)
                sel = None
            if sel is not None and r.random() < 0.8:
                model = sel[6]
                src = c._src  # type: ignore[attr-defined]
                assert c.pool is not None
                j = int(c.pool[r.randrange(len(c.pool))])
                msg = min(int(src[1][j] * 0.3), 1500) + 10
                inp = sel[3] + sel[4] + msg
                out = max(int(src[2][j]), 1)
                cached = 0
                if sel[3] >= 1024 and t - sel[5] < 600 and self._cache_ok(c, model) \
                        and r.random() < 0.9:
                    cached = sel[3] // 128 * 128
                end, ok = self._emit(c, t, model, inp, out, 0, cached, sess=sel[1])
                sel[2] -= 1
                if ok:
                    sel[3], sel[4] = inp, out
                sel[5] = end
                sel[0] = end + r.lognormvariate(math.log(20), 0.8)
                continue
            inp, out, _ = self._plain(c, t)
            model = self._pick_model(c)
            if r.random() < c.sess_p:
                c.n_id += 1
                sid = f"s{c.idx}-{c.n_id}"
                end, _ok = self._emit(c, t, model, inp, out, sess=sid)
                turns = min(int(r.expovariate(1.0 / c.sess_len)) + 1, 30)
                open_.append([end + r.lognormvariate(math.log(20), 0.8), sid, turns, inp, out,
                              end, model])
            else:
                self._emit(c, t, model, inp, out)

    def _agent(self, c: Consumer, arr: np.ndarray) -> None:
        r = c.r
        for t0 in arr.tolist():
            run = self.tr.tau[r.randrange(len(self.tr.tau))]
            model = self._pick_model(c)
            c.n_id += 1
            tid = f"run-{c.idx}-{c.n_id}"
            sid = tid if r.random() < 0.3 else None
            t = t0
            prev_in = 0
            for hist, out, ntool, human_next in run:
                inp = int(hist * c.in_scale) + c.tool_tokens
                cached = (prev_in // 128 * 128 if prev_in >= 1024 and self._cache_ok(c, model)
                          and r.random() < 0.9 else 0)
                end, ok = self._emit(c, t, model, inp, out, 0, cached, sess=sid, trace=tid,
                                     tools=ntool or None)
                if not ok and r.random() < 0.7:
                    break
                prev_in = inp
                gap = r.lognormvariate(math.log(15), 0.8) if human_next else \
                    r.lognormvariate(math.log(0.8), 0.7)
                t = end + gap
                if t >= self.H:
                    break

    def _cron(self, c: Consumer) -> None:
        r = c.r
        period = r.choice((60.0, 300.0, 300.0, 600.0, 900.0, 1800.0, 3600.0))
        jobs = max(1, min(60, round(c.rate * period * r.uniform(0.5, 1.5))))
        batch = r.random() < 0.5
        src = c._src  # type: ignore[attr-defined]
        assert c.pool is not None
        spec = []
        for _ in range(jobs):
            j = int(c.pool[r.randrange(len(c.pool))])
            off = r.uniform(0, 30) if batch else r.uniform(0, period)
            spec.append((self._hash(c), int(src[1][j] * c.in_scale) + 40,
                         max(int(src[2][j]), 1), off))
        k = 0
        while k * period < self.H:
            for h, inp, out, off in spec:
                t = k * period + off + r.uniform(0, 3)
                if t >= self.H:
                    continue
                cached = (inp - 64) // 128 * 128 if (
                    period <= 600 and inp >= 1024 and self._cache_ok(c, c.model)
                    and k > 0 and r.random() < 0.85) else 0
                o = max(1, int(out * r.uniform(0.7, 1.3)))
                self._emit(c, t, c.model, inp, o, 0, cached, rh=h)
            k += 1

    def _faq(self, c: Consumer, arr: np.ndarray) -> None:
        r = c.r
        last: dict[str, float] = {}
        for t in arr.tolist():
            model = self._pick_model(c)
            if r.random() < c.novel:
                inp, out, _ = self._plain(c, t)
                self._emit(c, t, model, inp, out)
                continue
            h, inp, out = c.faq[min(bisect.bisect_left(c.faq_cum, r.random()), len(c.faq) - 1)]
            cached = 0
            if inp >= 1024 and self._cache_ok(c, model) and t - last.get(h, -1e9) < 600 \
                    and r.random() < 0.85:
                cached = (inp - 64) // 128 * 128
            last[h] = t
            self._emit(c, t, model, inp, max(1, int(out * r.uniform(0.7, 1.3))), 0, cached, rh=h)

    def _rag(self, c: Consumer, arr: np.ndarray) -> None:
        for t in arr.tolist():
            i = c.mc_cursor
            c.mc_cursor = c.mc_cursor + 1 if c.mc_cursor + 1 < c.mc_end else c.mc_start
            inp, out = self.tr.mc_in[i], max(self.tr.mc_out[i], 1)
            model = self._pick_model(c)
            cached = 0
            if self._cache_ok(c, model):
                lead = 0
                for b in self.tr.mc_blocks[i]:
                    if t - c.seen_blocks.get(b, -1e9) < 3600:
                        lead += 1
                    else:
                        break
                cached = min(lead * 512, inp) if lead * 512 >= 1024 else 0
            for b in self.tr.mc_blocks[i]:
                c.seen_blocks[b] = t
            self._emit(c, t, model, inp, out, 0, cached)

    # -- victims -----------------------------------------------------------
    def _classify(self) -> None:
        counts = np.array([len(c.events) for c in self.cons], dtype=float)
        q50, q85 = np.quantile(counts, [0.5, 0.85]) if len(counts) else (0, 0)
        for c, k in zip(self.cons, counts, strict=True):
            c.size = "large" if k >= q85 else "medium" if k >= q50 else "small"
        self._sorted_ts: dict[int, np.ndarray] = {}

    def _ts(self, c: Consumer) -> np.ndarray:
        a = self._sorted_ts.get(c.idx)
        if a is None:
            a = self._sorted_ts[c.idx] = np.sort(np.array([e["ts"] for e in c.events]))
        return a

    def _count(self, c: Consumer, a: float, b: float) -> int:
        ts = self._ts(c)
        return int(np.searchsorted(ts, b) - np.searchsorted(ts, a))

    def _prev_hour(self, c: Consumer, t0: float) -> tuple[int, float, float]:
        """(calls, tokens, mean tokens per answered call) in the hour before t0."""
        n = 0
        tok = 0.0
        ok = 0
        for e in c.events:
            if t0 - 3600 <= e["ts"] < t0:
                n += 1
                x = e.get("input_tokens", 0) + e.get("output_tokens", 0)
                tok += x
                ok += 1 if x else 0
        return n, tok, tok / ok if ok else 0.0

    def _outage_conflict(self, c: Consumer, a: float, b: float) -> bool:
        return any(m in c.models() and a < e + 900 and b > s - 900 for m, s, e in self.outages)

    def _victim(self, pred: Callable[[Consumer], bool], size: str, a: float, b: float
                ) -> Consumer | None:
        def ok(c: Consumer) -> bool:
            return not c.busy and c.free(a, b) and not self._outage_conflict(c, a, b) and pred(c)
        cands = [c for c in self.cons if c.size == size and ok(c)]
        if not cands:
            cands = [c for c in self.cons if ok(c)]
        if not cands:
            return None
        return self.r.choice(cands)

    def _window(self, dur: float) -> float:
        hi = self.H - dur - 600
        lo = FREE_S + 120
        return self.r.uniform(lo, max(lo, hi))

    def _label(self, kind: str, c: Consumer | None, evs: list[dict[str, Any]], *,
               scope: str = "consumer", subject: str | None = None, model: str | None = None,
               shape: str, variant: str, **extra: Any) -> dict[str, Any] | None:
        if not evs:
            return None
        s = min(e["ts"] for e in evs)
        e_ = max(e["ts"] for e in evs)
        lab: dict[str, Any] = {
            "label_id": f"holdout-{self.seed}-{len(self._labels):03d}-{kind}",
            "kind": kind, "scope": scope,
            "subject": subject if subject is not None else (c.name if c else None),
            "consumer": c.name if c else None, "tenant": c.tenant if c else None,
            "model": model if model is not None else (c.model if c else None),
            "start": _iso(s), "end": _iso(e_), "shape": shape, "variant": variant,
            "victim_size": c.size if c else "many", "n_events": len(evs),
            "_s": s, "_e": e_}
        lab.update(extra)
        self._labels.append(lab)
        if c is not None:
            c.busy.append((s, e_))
            self._sorted_ts.pop(c.idx, None)
        return lab

    # -- shapes ------------------------------------------------------------
    def _shape(self, shape: str, t0: float, dur: float, on: tuple[float, float] = (60, 240),
               off: tuple[float, float] = (120, 360)) -> Callable[[float], float]:
        r = self.r
        if shape == "ramp":
            return lambda t: 0.0 if t < t0 or t > t0 + dur else max(0.05, (t - t0) / dur)
        if shape == "intermittent":
            spans = []
            t = t0
            while t < t0 + dur:
                d = r.uniform(*on)
                spans.append((t, min(t + d, t0 + dur)))
                t += d + r.uniform(*off)
            return lambda x: 1.0 if any(a <= x < b for a, b in spans) else 0.0
        return lambda t: 1.0 if t0 <= t <= t0 + dur else 0.0

    # -- anomalies ---------------------------------------------------------
    def _inject_all(self) -> None:
        if self.hours < 1.5:
            return
        n = max(1, round(2 * (self.hours - 1) * math.sqrt(self.n / 300)))
        n_out = max(1, round(n * 0.4))
        n_opt = max(1, n // 3)
        self._inject_outages(n_out)
        plan: list[tuple[str, int]] = []
        for i in range(n):
            plan += [("runaway_reasoning", i), ("retry_storm", i), ("failure_spike", i),
                     ("token_spike", i), ("cost_spike", i), ("agent_loop", i)]
        for i in range(n_opt):
            plan += [("context_bloat", i), ("cache_opportunity", i)]
        self.r.shuffle(plan)
        sizes = ("small", "medium", "large")
        for kind, i in plan:
            before = len(self._labels)
            getattr(self, f"_inject_{kind}")(i, sizes[i % 3])
            if len(self._labels) == before:   # no fitting victim or window: said, not hidden
                self.skipped.append((kind, sizes[i % 3]))
        self._effects()
        for lab in self._labels:
            lab.pop("_s", None)
            lab.pop("_e", None)

    def _fail(self, e: dict[str, Any], status: int, err: str, lat: float) -> None:
        start = e["ts"] - e.get("latency_ms", 0.0) / 1000.0
        for k in ("input_tokens", "output_tokens", "reasoning_tokens", "cached_input_tokens",
                  "ttft_ms", "tool_calls", "finish_reason"):
            e.pop(k, None)
        e["status"] = status
        e["error"] = err
        e["latency_ms"] = round(lat * 1000, 1)
        e["ts"] = start + lat

    def _retries(self, c: Consumer, orig: dict[str, Any], t_end: float,
                 p_fail: Callable[[float], float], err: tuple[int, str]) -> list[dict[str, Any]]:
        """The consumer's normal retries of a call that failed at t_end."""
        r = c.r
        out: list[dict[str, Any]] = []
        if c.retry_max == 0 or r.random() >= c.retry_p:
            return out
        base = orig.get("attempt", 0)
        t = t_end
        for k in range(1, c.retry_max + 1):
            t += c.backoff * 2 ** (k - 1) * r.uniform(0.7, 1.5)
            e = dict(orig)
            if c.attempt_mode:
                e["attempt"] = base + k
            if r.random() < p_fail(t):
                lat = r.uniform(0.1, 3.0) if err[0] else (c.timeout or 60.0)
                e["ts"] = t + orig.get("latency_ms", 0) / 1000.0
                self._fail(e, err[0], err[1], lat)
                out.append(e)
                t = e["ts"]
                continue
            e["ts"] = t + orig.get("latency_ms", 0) / 1000.0
            out.append(e)
            break
        return out

    def _abort_runs(self, c: Consumer, failed: list[dict[str, Any]]) -> set[int]:
        """An agent run whose call finally failed (after its retries) stops there, as
        in normal traffic (7 times in 10): its later calls are dropped.  Returns the
        ids of the dropped events."""
        cut: dict[str, float] = {}
        for e in failed:
            tid = e.get("trace_id")
            if tid and (tid not in cut or e["ts"] < cut[tid]):
                cut[tid] = e["ts"]
        cut = {t: x for t, x in sorted(cut.items()) if c.r.random() < 0.7}
        if not cut:
            return set()
        gone = {id(e) for e in c.events
                if e.get("trace_id") in cut and e["ts"] > cut[e["trace_id"]]}
        if gone:
            c.events = [e for e in c.events if id(e) not in gone]
        return gone

    def _inject_outages(self, n: int) -> None:
        """failure_spike, scope model: one model's calls fail across its consumers."""
        r = self.r
        users: dict[str, int] = {}
        for c in self.cons:
            for m in c.models():
                users[m] = users.get(m, 0) + 1
        models = [m for m, k in sorted(users.items(), key=lambda x: -x[1]) if k >= 8][:4]
        if not models:
            return
        for i in range(n):
            model = models[i % len(models)]
            for _try in range(20):
                dur = r.uniform(300, 1200)
                t0 = self._window(dur)
                if all(m != model or t0 > e + 1800 or t0 + dur < s - 1800
                       for m, s, e in self.outages):
                    break
            else:
                continue
            shape = ("step", "intermittent", "ramp", "step")[i % 4]
            level = r.uniform(0.6, 1.0)
            g = self._shape(shape, t0, dur, on=(30, 150), off=(20, 90))   # flapping
            status, err = r.choice(((503, "upstream_5xx"), (500, "upstream_5xx"),
                                    (529 if model.startswith("claude") else 502, "upstream_5xx"),
                                    (0, "timeout")))

            def pf(t: float, g: Callable[[float], float] = g, level: float = level) -> float:
                return level * g(t)
            hit: list[dict[str, Any]] = []
            final: list[dict[str, Any]] = []
            nc = 0
            for c in self.cons:
                if model not in c.models():
                    continue
                add: list[dict[str, Any]] = []
                touched = False
                for e in c.events:
                    if e["model"] != model or e["status"] != 200:
                        continue
                    start = e["ts"] - e.get("latency_ms", 0.0) / 1000.0
                    if not (t0 <= start <= t0 + dur) or c.r.random() >= pf(start):
                        continue
                    orig = dict(e)
                    lat = c.r.uniform(0.1, 3.0) if status else (c.timeout or 60.0)
                    self._fail(e, status, err, lat)
                    hit.append(e)
                    touched = True
                    rs = self._retries(c, orig, e["ts"], pf, (status, err))
                    add.extend(rs)
                    hit.extend(x for x in rs if x["status"] != 200)
                    if not rs or rs[-1]["status"] != 200:
                        final.append(rs[-1] if rs else e)
                c.events.extend(add)
                gone = self._abort_runs(c, final)
                if gone:
                    hit = [x for x in hit if id(x) not in gone]
                final.clear()
                nc += touched
            if nc < 3:
                continue
            lab = self._label("failure_spike", None, hit, scope="model", subject=model,
                              model=model, shape=shape, variant=f"outage_{status or 'timeout'}",
                              consumers_hit=nc)
            if lab:
                self.outages.append((model, lab["_s"], lab["_e"]))

    def _inject_runaway_reasoning(self, i: int, size: str) -> None:
        r = self.r
        variants = ("tokens", "duration", "budget", "repeated", "output")
        v = variants[i % len(variants)]
        dur = r.uniform(300, 1800) if v == "repeated" else 60
        t0 = self._window(dur)
        # victims whose client would let a long call run (streaming, or no total timeout)
        # and for whom the injected call is extreme: their own normal calls stay at a
        # few hundred to a few thousand tokens (no client whose real tail already
        # reaches tens of thousands) and finish within minutes
        key = "output_tokens" if v == "output" else "reasoning_tokens"

        def normal(c: Consumer) -> tuple[int, float, float]:
            prev = [e for e in c.events if e["model"] == c.model and e["status"] == 200
                    and e["ts"] < t0]
            vals = sorted(e.get(key, 0) for e in prev) or [500]
            lats = sorted(e.get("latency_ms", 0) / 1000 for e in prev) or [30.0]
            return (vals[min(len(vals) - 1, int(0.99 * len(vals)))],
                    lats[min(len(lats) - 1, int(0.99 * len(lats)))], lats[-1])

        def fits(c: Consumer) -> bool:
            if not (c.stream or c.timeout is None):
                return False
            if v == "output":
                if MODELS[c.model].reasoning or c.arch == "cron":
                    return False
            elif c.arch != "reason" or c.r1 is None:
                return False
            p99, lat99, lat_max = normal(c)
            if v in ("tokens", "repeated"):
                return p99 <= 4000 and (c.max_out is None or c.max_out >= 25_000)
            if v == "duration":
                return lat99 <= 150 and lat_max <= 600
            return p99 <= 4000 if v == "budget" else p99 <= 2000
        c = self._victim(fits, size, t0, t0 + dur)
        if c is None:
            return
        model = c.model
        p99, lat99, _ = normal(c)
        spec = MODELS[model]
        evs: list[dict[str, Any]] = []
        nrep = r.randint(3, 8) if v == "repeated" else 1
        times = sorted(r.uniform(t0, t0 + dur) for _ in range(nrep))
        rh = self._hash(c) if v == "repeated" and r.random() < 0.5 else None
        for t in times:
            inp, out, rsn = self._plain(c, t)
            e = self._base(c, model)
            e["request_hash"] = rh or self._hash(c)
            mo = None
            tp = spec.tpot_s * r.uniform(0.8, 1.2)
            if v in ("tokens", "repeated"):
                rsn = int(min(120_000, spec.max_out - 2000,
                              max(25_000, r.uniform(10, 25) * p99)))
                out = rsn + r.randint(200, 2000)
                fin = "stop"
                if c.max_out and out >= c.max_out:
                    out, rsn, fin = c.max_out, c.max_out, "length"
                lat = spec.ttft_s + out * tp
            elif v == "budget":
                mo = c.max_out or r.choice((32768, 65536))
                if mo < 8 * p99:
                    mo = 65536 if model == "deepseek-reasoner" else 100_000
                out = rsn = mo
                fin = "length"
                lat = spec.ttft_s + out * tp
            elif v == "duration":
                lat = min(max(720.0, 4 * lat99) * r.uniform(1.0, 1.8), 3600.0)
                rsn = int(min(lat / tp * r.uniform(0.2, 0.5), 60_000))
                out = rsn + r.randint(100, 1500)
                fin = "stop"
            else:   # output: a plain model stuck repeating itself to its limit
                mo = max(c.max_out or 0, 16_384) if (c.max_out or 0) < 8 * p99 else c.max_out
                mo = min(mo or 16_384, spec.max_out)
                out, rsn, fin = mo, 0, "length"
                lat = spec.ttft_s + out * tp
            e["status"] = 200
            e["input_tokens"] = min(inp, spec.ctx)
            e["output_tokens"] = out
            if rsn:
                e["reasoning_tokens"] = rsn
            e["finish_reason"] = fin
            if mo or c.max_out:
                e["max_output_tokens"] = mo or c.max_out
            if c.stream:
                e["stream"] = True
                e["ttft_ms"] = round((spec.ttft_s + rsn * tp) * 1000, 1)
            e["latency_ms"] = round(lat * 1000, 1)
            e["ts"] = t + lat
            evs.append(e)
        if max(e["ts"] for e in evs) > self.H:
            return
        c.events.extend(evs)
        self._label("runaway_reasoning", c, evs, shape="repeated" if nrep > 1 else "single",
                    variant=v, normal_p99=p99, normal_latency_p99_s=round(lat99, 1))

    def _inject_retry_storm(self, i: int, size: str) -> None:
        r = self.r
        v = ("same_hash", "same_hash", "rate_jump")[i % 3]
        if v == "same_hash":
            n = int(math.exp(r.uniform(math.log(30), math.log(400))))
            gap = math.exp(r.uniform(math.log(0.5), math.log(10)))
            est = n * (gap + 1)
            t0 = self._window(min(est, 5400))
            c = self._victim(lambda c: True, size, t0, t0 + est)
            if c is None:
                return
            model = self._pick_model(c)
            status, err = r.choice(((503, "upstream_5xx"), (429, "rate_limited"),
                                    (500, "upstream_5xx"), (0, "timeout"), (400, "bad_request")))
            report = r.random() < 0.5
            billed = r.random() < 0.3
            pattern = r.choice(("fixed", "backoff_capped"))
            inp, _, _ = self._plain(c, t0)
            rh = self._hash(c)
            evs = []
            t = t0
            for k in range(n):
                e = self._base(c, model)
                e["request_hash"] = rh
                if report:
                    e["attempt"] = k + 1
                if status == 0:
                    lat = min(gap, 5.0) * r.uniform(0.9, 1.0) + 1.0
                elif status == 429:
                    lat = r.uniform(0.03, 0.3)
                else:
                    lat = r.uniform(0.1, 2.0)
                last_ok = k == n - 1 and r.random() < 0.4
                if last_ok:
                    e["status"] = 200
                    e["input_tokens"] = inp
                    e["output_tokens"] = r.randint(20, 600)
                    e["finish_reason"] = "stop"
                    lat = r.uniform(1, 8)
                else:
                    e["status"] = status
                    e["error"] = err
                    if billed and status != 429:
                        e["input_tokens"] = inp
                e["latency_ms"] = round(lat * 1000, 1)
                e["ts"] = t + lat
                evs.append(e)
                w = gap * r.uniform(0.8, 1.2) if pattern == "fixed" else \
                    min(gap, 0.25 * 2 ** k) * r.uniform(0.7, 1.3)
                t = e["ts"] + w
                if t > self.H - 300:
                    break
            c.events.extend(evs)
            self._label("retry_storm", c, evs, shape=pattern, variant="same_hash",
                        attempts=len(evs), interval_s=round(gap, 2), status=status,
                        attempt_reported=report)
            return
        dur = r.uniform(300, 1200)
        t0 = self._window(dur)
        c = self._victim(lambda c: True, size, t0, t0 + dur)
        if c is None:
            return
        n_prev, _, _ = self._prev_hour(c, t0)
        base = n_prev / 3600.0
        rate = min(20.0, max(8 * base, r.uniform(0.5, 3.0)))
        fail = r.uniform(0.7, 0.95)
        model = self._pick_model(c)
        timeout = c.timeout or 30.0
        evs = []
        t = t0
        shape = r.choice(("step", "ramp"))
        g = self._shape(shape, t0, dur)
        while t < t0 + dur:
            t += r.expovariate(rate)
            if r.random() > g(t):
                continue
            inp, out, rsn = self._plain(c, t)
            if not MODELS[model].reasoning:
                rsn = 0
            x = r.random()
            err = None if r.random() >= fail else (
                (0, "timeout", min(timeout, 30.0)) if x < 0.5 else
                (503, "upstream_5xx", r.uniform(0.1, 2)) if x < 0.8 else
                (429, "rate_limited", r.uniform(0.03, 0.3)))
            sink: list[dict[str, Any]] = []
            self._emit(c, t, model, inp, out, rsn, error=err, fail_p=fail if err else 0.0,
                       into=sink)
            evs.extend(sink)
        c.events.extend(evs)
        self._label("retry_storm", c, evs, shape=shape, variant="rate_jump",
                    rate_rps=round(rate, 2), baseline_rps=round(base, 4),
                    fail_share=round(fail, 2))

    def _inject_failure_spike(self, i: int, size: str) -> None:
        r = self.r
        dur = r.uniform(300, 1800)
        t0 = self._window(dur)
        # enough calls to be sure: at least 60 in the window, about 25 of them failing
        c = None
        for _try in range(3):
            c = self._victim(lambda c, a=t0, b=t0 + dur: self._count(c, a, b) >= 60, size,
                             t0, t0 + dur)
            if c is not None and self._count(c, t0, t0 + dur) >= 60:
                break
            dur = 1800
            c = None
        if c is None:
            return
        variant = r.choice(("auth", "client_4xx", "upstream_5xx", "mixed"))
        shape = r.choice(("step", "ramp", "intermittent"))
        g = self._shape(shape, t0, dur)
        ts = self._ts(c)
        inside = ts[(ts >= t0) & (ts <= t0 + dur)].tolist()
        mean_g = sum(g(t) for t in inside) / max(len(inside), 1)
        level = r.uniform(0.3, 1.0)
        if level * mean_g * len(inside) < 25:
            level = min(1.0, 25 / max(mean_g * len(inside), 1e-9))
        evs: list[dict[str, Any]] = []
        add: list[dict[str, Any]] = []
        final: list[dict[str, Any]] = []
        for e in c.events:
            if e["status"] != 200:
                continue
            start = e["ts"] - e.get("latency_ms", 0.0) / 1000.0
            gv = g(start)
            if gv <= 0 or r.random() >= level * gv:
                continue
            vv = variant if variant != "mixed" else r.choice(("auth", "client_4xx",
                                                               "upstream_5xx"))
            if vv == "auth":
                st, er, lat = r.choice((401, 403)), "auth_error", r.uniform(0.01, 0.08)
            elif vv == "client_4xx":
                st, er, lat = r.choice((400, 404, 422)), "bad_request", r.uniform(0.02, 0.3)
            else:
                st, er, lat = r.choice((500, 502, 503)), "upstream_5xx", r.uniform(0.1, 4.0)
            orig = dict(e)
            self._fail(e, st, er, lat)
            evs.append(e)
            rs: list[dict[str, Any]] = []
            if st >= 500:
                rs = self._retries(c, orig, e["ts"], lambda t, g=g, lv=level: lv * g(t),
                                   (st, er))
                add.extend(rs)
                evs.extend(x for x in rs if x["status"] != 200)
            if not rs or rs[-1]["status"] != 200:
                final.append(rs[-1] if rs else e)
        c.events.extend(add)
        gone = self._abort_runs(c, final)
        if gone:
            evs = [x for x in evs if id(x) not in gone]
        if len(evs) < 10:
            return
        self._label("failure_spike", c, evs, shape=shape, variant=variant,
                    fail_level=round(level, 2))

    def _spike_victim(self, size: str, dur: float, t0: float,
                      pred: Callable[[Consumer], bool] = lambda c: True) -> Consumer | None:
        # a victim with a baseline: active in the hour before
        return self._victim(lambda c: pred(c) and self._count(c, t0 - 3600, t0) >= 5, size,
                            t0, t0 + dur)

    def _inject_token_spike(self, i: int, size: str) -> None:
        """token_spike: the victim's tokens per minute m times (5-30x, and at least an
        absolute floor of 40k-150k tokens a minute) its previous hour's, while the
        shape is on: more calls, bigger prompts (each call's prompt grows so that the
        call carries m times its tokens), or both (sqrt(m) each)."""
        r = self.r
        shape = ("step", "ramp", "intermittent")[(i // 3) % 3]
        variant = ("more_calls", "bigger_prompts", "both")[i % 3]
        dur = r.uniform(600, 1800) if shape == "ramp" else \
            r.uniform(1200, 2700) if shape == "intermittent" else r.uniform(300, 1800)
        t0 = self._window(dur)
        c = self._spike_victim(size, dur, t0)
        if c is None:
            return
        n_prev, tok_prev, per_call = self._prev_hour(c, t0)
        if per_call <= 0:
            per_call = float(np.mean([sum(self._plain(c, t0)[:2]) for _ in range(20)]))
        base_tpm = tok_prev / 60.0
        calls_pm = n_prev / 60.0
        mult = math.exp(r.uniform(math.log(5), math.log(30)))
        floor = r.uniform(40_000, 150_000)
        m = max(mult, floor / max(base_tpm, 1.0))      # the on-phase factor on tokens
        g = self._shape(shape, t0, dur)
        model = c.model
        spec = MODELS[model]
        evs: list[dict[str, Any]] = []
        # split m between the prompt factor (k) and the call factor (n)
        if variant == "more_calls":
            k_f, n_f = 1.0, m
        elif variant == "bigger_prompts":
            k_f, n_f = m, 1.0
        else:
            k_f = n_f = math.sqrt(m)
        added = 0.0
        if k_f > 1:
            for e in c.events:
                if e["status"] != 200 or not e.get("input_tokens"):
                    continue
                start = e["ts"] - e.get("latency_ms", 0.0) / 1000.0
                gv = g(start)
                if gv <= 0:
                    continue
                tot = e["input_tokens"] + e.get("output_tokens", 0)
                new = min(int(e["input_tokens"] + (k_f - 1) * gv * tot),
                          MODELS[e["model"]].ctx)
                if new > e["input_tokens"]:
                    added += new - e["input_tokens"]
                    e["input_tokens"] = new
                    evs.append(e)
        # extra calls: (n_f - 1) times the victim's calls, and whatever the prompt
        # factor could not carry (too few calls in the window, or the context window)
        on_min = dur / 60.0 * float(np.mean([g(t0 + x) for x in np.linspace(0, dur, 200)]))
        carried = added / max(on_min, 1.0)
        want = (m - 1) * base_tpm if base_tpm > 0 else floor
        want = max(want, floor - base_tpm)
        extra_tpm = max(want - carried, 0.0) if variant != "more_calls" else want
        call_tok = max(per_call * k_f, 1.0)
        if variant != "more_calls":
            extra_tpm = max(extra_tpm, (n_f - 1) * calls_pm * call_tok)
        lam = extra_tpm / call_tok / 60.0          # extra calls per second when on
        grow = 1.0
        if lam * dur > 30_000:                     # keep the event count sane: bigger calls
            grow = min(lam * dur / 30_000, max(spec.ctx / max(per_call * k_f, 1.0), 1.0))
            lam = lam / grow
        t = t0
        while lam > 0 and t < t0 + dur:
            t += r.expovariate(lam)
            gv = g(t)
            if gv <= 0 or r.random() > gv:
                continue
            inp, out, rsn = self._plain(c, t)
            if not spec.reasoning:
                rsn = 0
            inp = int(inp + (k_f * grow - 1) * (inp + out))
            sink: list[dict[str, Any]] = []
            self._emit(c, t, model, inp, out, rsn, into=sink)
            evs.extend(sink)
        if not evs:
            return
        self._add_new(c, evs)
        self._label("token_spike", c, evs, shape=shape, variant=variant,
                    planned_multiplier=round(m, 1), baseline_tpm=round(base_tpm),
                    _metric="tokens")

    def _add_new(self, c: Consumer, evs: list[dict[str, Any]]) -> None:
        """Append the events of evs not already in c.events (mutated ones are)."""
        have = {id(e) for e in c.events}
        c.events.extend(e for e in evs if id(e) not in have)

    def _inject_cost_spike(self, i: int, size: str) -> None:
        r = self.r
        shape = ("step", "ramp", "intermittent")[(i // 3) % 3]
        variant = ("model_switch", "huge_outputs", "switch_and_calls")[i % 3]
        dur = r.uniform(600, 1800) if shape != "step" else r.uniform(300, 1800)
        t0 = self._window(dur)
        c = self._spike_victim(size, dur, t0, lambda c: c.model in PRICIER)
        if c is None:
            return
        g = self._shape(shape, t0, dur)
        model = c.model
        new_model = r.choice(PRICIER[model]) if variant != "huge_outputs" else model
        evs: list[dict[str, Any]] = []
        for e in c.events:
            if e["model"] != model or e["status"] != 200:
                continue
            start = e["ts"] - e.get("latency_ms", 0.0) / 1000.0
            gv = g(start)
            if gv <= 0 or r.random() > gv:
                continue
            self._pricier(c, e, new_model, variant, start)
            evs.append(e)
        # a small (or momentarily idle) victim gets extra calls on the pricier model so
        # that the spike is real money
        n_prev, _, _ = self._prev_hour(c, t0)
        calls_pm = n_prev / 60.0
        lam = 0.0
        if variant == "switch_and_calls":
            lam = max(calls_pm * r.uniform(2, 6), 2.0) / 60.0
        elif min(calls_pm, len(evs) / (dur / 60.0)) < 2:
            lam = r.uniform(2, 6) / 60.0
        t = t0
        while lam > 0 and t < t0 + dur:
            t += r.expovariate(lam)
            gv = g(t)
            if gv <= 0 or r.random() > gv or t > t0 + dur:
                continue
            inp, out, rsn = self._plain(c, t)
            sink: list[dict[str, Any]] = []
            self._emit(c, t, model, inp, out, rsn, into=sink)
            for e in sink:
                if e["status"] == 200:
                    self._pricier(c, e, new_model, variant, t)
            evs.extend(sink)
        if not evs:
            return
        self._add_new(c, evs)
        self._label("cost_spike", c, evs, shape=shape, variant=variant, model=new_model,
                    from_model=model, _metric="cost")

    def _pricier(self, c: Consumer, e: dict[str, Any], new_model: str, variant: str,
                 start: float) -> None:
        r = c.r
        spec = MODELS[new_model]
        if variant == "huge_outputs":
            mo = min(spec.max_out, 16_384)
            out = min(int(e["output_tokens"] * r.uniform(10, 40)) + 2000, mo)
            e["output_tokens"] = out
            if out >= mo:
                e["finish_reason"] = "length"
                e["max_output_tokens"] = mo
        else:
            e["model"] = new_model
            e.pop("max_output_tokens", None)
            if spec.reasoning and not MODELS[c.model].reasoning:
                rsn = int(e["output_tokens"] * r.uniform(2, 6)) + 200
                e["reasoning_tokens"] = rsn
                e["output_tokens"] += rsn
            e["input_tokens"] = min(e["input_tokens"], spec.ctx)
            e.pop("cached_input_tokens", None) if not self._cache_ok(c, new_model) else None
        lat, ttft = self._latency(spec, e["input_tokens"], e["output_tokens"],
                                  e.get("reasoning_tokens", 0), r)
        e["latency_ms"] = round(lat * 1000, 1)
        if "ttft_ms" in e:
            e["ttft_ms"] = round(ttft * 1000, 1)
        e["ts"] = start + lat

    def _inject_agent_loop(self, i: int, size: str) -> None:
        r = self.r
        v = ("calls", "tokens", "session", "slow")[i % 4]
        n = (int(math.exp(r.uniform(math.log(100), math.log(500)))) if v in ("calls", "session")
             else r.randint(30, 60) if v == "tokens" else r.randint(80, 200))
        gap_med = 12.0 if v == "slow" else 1.0
        est = n * (gap_med + 4)
        t0 = self._window(min(est, self.H - FREE_S - 1500))
        c = self._victim(lambda c: c.arch == "agent", size, t0, t0 + est)
        if c is None:
            return
        model = c.model
        spec = MODELS[model]
        c.n_id += 1
        tid = f"run-{c.idx}-{c.n_id}"
        sid = f"s{c.idx}-{c.n_id}"
        trace = None if v == "session" else tid
        sess = sid if v == "session" or r.random() < 0.3 else None
        base_in = c.tool_tokens + int(r.uniform(1500, 4000) * c.in_scale)
        step = r.uniform(60, 400)
        window = int(r.uniform(15_000, 40_000))
        evs: list[dict[str, Any]] = []
        t = t0
        prev_in = 0
        for k in range(n):
            if v == "tokens":
                inp = min(int(r.uniform(40_000, 120_000)), spec.ctx - 2000)
            else:
                inp = base_in + int(k * step)
                if inp > window:   # the agent trims its history, and keeps going
                    inp = window - int(r.uniform(0, 0.3) * window)
            out = r.randint(20, 160)
            cached = (prev_in // 128 * 128 if prev_in >= 1024 and self._cache_ok(c, model)
                      and r.random() < 0.8 and v != "tokens" else 0)
            sink: list[dict[str, Any]] = []
            end, _ok = self._emit(c, t, model, inp, out, 0, min(cached, inp), sess=sess,
                                  trace=trace, tools=1, into=sink)
            evs.extend(sink)
            prev_in = inp
            t = end + (r.lognormvariate(math.log(gap_med), 0.6))
            if t > self.H - 300:
                break
        if len(evs) < 30:
            return
        c.events.extend(evs)
        subj = trace or sid
        self._label("agent_loop", c, evs, scope="session", subject=subj, shape="loop",
                    variant=v, calls=len(evs),
                    tokens=sum(e.get("input_tokens", 0) + e.get("output_tokens", 0)
                               for e in evs))

    def _inject_context_bloat(self, i: int, size: str) -> None:
        r = self.r
        turns = r.randint(25, 60)
        est = turns * 45
        t0 = self._window(est)
        c = self._victim(lambda c: c.arch in ("chat", "faq", "code"), size, t0, t0 + est)
        if c is None:
            return
        model = c.model
        cap = min(MODELS[model].ctx - 4000, 190_000)
        final = min(r.uniform(110_000, 180_000), cap)
        inp0 = r.uniform(3000, 10_000)
        grow = (final - inp0) / (turns - 1)
        c.n_id += 1
        sid = f"s{c.idx}-{c.n_id}"
        evs: list[dict[str, Any]] = []
        t = t0
        for k in range(turns):
            inp = int(inp0 + k * grow * r.uniform(0.8, 1.2))
            out = r.randint(150, 1500)
            sink: list[dict[str, Any]] = []
            end, _ok = self._emit(c, t, model, inp, out, sess=sid, into=sink, max_out=None)
            evs.extend(sink)
            t = end + r.uniform(10, 60)
            if t > self.H - 300:
                break
        c.events.extend(evs)
        self._label("context_bloat", c, evs, scope="session", subject=sid, shape="growth",
                    variant="history_resent",
                    max_input=max(e.get("input_tokens", 0) for e in evs))

    def _inject_cache_opportunity(self, i: int, size: str) -> None:
        r = self.r
        dur = r.uniform(1200, 5400)
        t0 = self._window(min(dur, self.H - FREE_S - 900))
        c = self._victim(lambda c: c.arch != "reason", size, t0, t0 + dur)
        if c is None:
            return
        model = c.model
        rh = self._hash(c)
        inp = int(r.uniform(20_000, 80_000))
        n = int(math.exp(r.uniform(math.log(30), math.log(200))))
        times = sorted(r.uniform(t0, t0 + dur) for _ in range(n))
        evs: list[dict[str, Any]] = []
        for t in times:
            sink: list[dict[str, Any]] = []
            self._emit(c, t, model, inp, r.randint(80, 600), rh=rh, into=sink, retry=False,
                       fail_p=0.0)
            evs.extend(sink)
        c.events.extend(evs)
        self._label("cache_opportunity", c, evs, shape="repeated", variant="uncached_prompt",
                    prompt_tokens=inp, repeats=len(evs))

    # -- realised effects --------------------------------------------------
    def _effects(self) -> None:
        price = None
        try:
            from ingest.event import UsageEvent
            from ingest.pricing import PriceTable
            table = PriceTable.load()

            def price(e: dict[str, Any]) -> float:
                d = {k: v for k, v in e.items() if k != "ts"}
                d["ts"] = _iso(e["ts"])
                d["event_id"] = "x"
                return float(table.cost(UsageEvent.model_validate(d))[0])
        except Exception:  # pragma: no cover - pricing not importable
            price = None
        by_name = {c.name: c for c in self.cons}
        for lab in self._labels:
            metric = lab.pop("_metric", None)
            if metric is None:
                continue
            c = by_name[lab["consumer"]]
            s, e_ = lab["_s"], lab["_e"]
            during = 0.0
            before = 0.0
            for e in c.events:
                t = e["ts"]
                if t < s - 3600 or t > e_:
                    continue
                if metric == "tokens":
                    x = e.get("input_tokens", 0) + e.get("output_tokens", 0)
                elif price is not None:
                    x = price(e)
                else:
                    x = 0.0
                if t >= s:
                    during += x
                else:
                    before += x
            mins = max((e_ - s) / 60.0, 1.0)
            per_min = during / mins
            base = before / 60.0
            eff = per_min / base if base > 0 else 999.0
            lab["effect"] = round(min(eff, 999.0), 2)
            lab["episode_per_min"] = round(per_min, 4)
            lab["baseline_per_min"] = round(base, 4)
            lab["weak"] = bool(eff < 3)


if __name__ == "__main__":  # pragma: no cover - a quick look
    import sys
    t0 = time.perf_counter()
    h = Holdout(int(sys.argv[1]) if len(sys.argv) > 1 else 1,
                float(sys.argv[2]) if len(sys.argv) > 2 else 2,
                int(sys.argv[3]) if len(sys.argv) > 3 else 50)
    ev = h.events()
    print(len(ev), "events", len(h.labels), "labels", round(time.perf_counter() - t0, 1), "s",
          h.timing, "skipped", h.skipped)
    for lab in h.labels:
        print(json.dumps(lab))
