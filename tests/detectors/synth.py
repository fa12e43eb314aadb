"""A small traffic generator for detector tests and the adversarial evaluation.

Written independently of ``ingest.simulator`` on purpose: on/off (Markov
modulated) bursts instead of gamma minutes, log-normal token sizes, different
consumer sizes and different anomaly shapes.  Deterministic for a seed.
"""

from __future__ import annotations

import heapq
import math
import random
from datetime import UTC, datetime
from typing import Any

T0 = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", "claude-sonnet-4")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def event(i: int, t: float, consumer: str, model: str = "gpt-4o", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"event_id": f"e{i}", "ts": iso(t), "consumer": consumer,
                         "model": model, "status": 200, "input_tokens": 500,
                         "output_tokens": 100, "latency_ms": 2000.0, "finish_reason": "stop"}
    d.update(kw)
    return d


def thinking_calls(rng: random.Random, consumer: str, model: str, median: float, n: int,
                   gap: float, answer: int, ms_per_token: float, base_ms: float = 0.0,
                   tag: str = "", **kw: Any) -> list[dict[str, Any]]:
    """``n`` calls every ``gap`` s from T0 whose reasoning tokens are
    log-normal around ``median`` (sd 0.35 in log space), each answering in
    ``answer`` more output tokens and lasting ``base_ms`` + ``ms_per_token``
    per reasoning token."""
    out = []
    for k in range(n):
        rsn = int(rng.lognormvariate(math.log(median), 0.35))
        out.append(event(k, T0 + gap * k, consumer, model, reasoning_tokens=rsn,
                         output_tokens=rsn + answer, latency_ms=base_ms + ms_per_token * rsn,
                         request_hash=f"{tag or consumer}{k}", **kw))
    return out


class Synth:
    def __init__(self, seed: int = 0, hours: float = 3.0, consumers: int = 50,
                 anomalies: bool = True) -> None:
        self.rng = random.Random(seed)
        self.hours = hours
        self.n = consumers
        self.anomalies = anomalies
        self.heap: list[tuple[float, int, dict[str, Any]]] = []
        self.seq = 0
        self.labels: list[dict[str, Any]] = []
        self._built: list[dict[str, Any]] | None = None

    def _push(self, t: float, d: dict[str, Any]) -> None:
        self.seq += 1
        d.setdefault("event_id", f"x{self.seq}")
        d["ts"] = iso(t)
        heapq.heappush(self.heap, (t, self.seq, d))

    def _call(self, t: float, c: dict[str, Any], **kw: Any) -> dict[str, Any]:
        rng = self.rng
        model = kw.pop("model", c["model"])
        reasoning = model.startswith("o")
        out = int(rng.lognormvariate(math.log(c["out"]), 0.8))
        rsn = int(out * rng.uniform(0.5, 0.9)) if reasoning else 0
        d = {"consumer": c["id"], "tenant": c["tenant"], "model": model, "status": 200,
             "input_tokens": int(rng.lognormvariate(math.log(c["inp"]), 0.9)),
             "output_tokens": out, "reasoning_tokens": rsn, "finish_reason": "stop",
             "latency_ms": round(400 + out * rng.uniform(8, 30), 1),
             "request_hash": f"h{self.rng.getrandbits(48):012x}"}
        if rng.random() < c["err"]:
            d.update(status=rng.choice((429, 500, 503, 0)), output_tokens=0, reasoning_tokens=0,
                     finish_reason="error", error="upstream_5xx")
        d.update(kw)
        return d

    def events(self) -> list[dict[str, Any]]:
        if self._built is not None:
            return self._built
        rng = self.rng
        end = T0 + self.hours * 3600
        cons: list[dict[str, Any]] = []
        for i in range(self.n):
            size = rng.choice((0.02, 0.1, 0.5, 2.0, 8.0))  # calls per second when "on"
            cons.append({"id": f"c{i:04d}", "tenant": f"t{i % 5}", "rate": size,
                         "model": MODELS[i % len(MODELS)], "inp": rng.choice((300, 1500, 6000)),
                         "out": rng.choice((80, 300, 900)), "err": rng.uniform(0.002, 0.03),
                         "on": rng.uniform(0.2, 0.8), "agent": i % 4 == 0, "cron": i % 6 == 0,
                         "faq": i % 5 == 0})
        for c in cons:
            t = T0
            on = True
            while t < end:
                # on/off bursts: on periods 1-10 min at 1-6x the rate, off periods silent
                dur = rng.expovariate(1 / (300 if on else 300 * (1 - c["on"]) / c["on"] + 1))
                if on:
                    mult = rng.uniform(1, 6)
                    tt = t
                    while True:
                        tt += rng.expovariate(c["rate"] * mult / 10)
                        if tt >= min(t + dur, end):
                            break
                        self._normal(tt, c)
                t += dur
                on = not on
            if c["cron"]:
                per = rng.choice((120.0, 300.0, 600.0))
                t = T0 + rng.uniform(0, per)
                while t < end:
                    self._push(t, self._call(t, c, request_hash=f"cron-{c['id']}"))
                    t += per
        if self.anomalies:
            self._inject(cons, end)
        out = []
        while self.heap:
            out.append(heapq.heappop(self.heap)[2])
        self._built = out
        return out

    def _normal(self, t: float, c: dict[str, Any]) -> None:
        rng = self.rng
        if c["agent"] and rng.random() < 0.1:
            trace = f"tr-{rng.getrandbits(40):010x}"
            n = min(28, int(rng.lognormvariate(math.log(5), 0.7)))
            tt = t
            hist = 800
            for _ in range(n):
                self._push(tt, self._call(tt, c, trace_id=trace, input_tokens=hist,
                                          finish_reason="tool_calls"))
                hist += rng.randint(200, 1200)
                tt += rng.uniform(1, 8)
            return
        if c["faq"] and rng.random() < 0.2:
            d = self._call(t, c, request_hash=f"faq-{c['id']}-{int(rng.paretovariate(1.5))}",
                           user=f"u{rng.randrange(1000)}")
        else:
            d = self._call(t, c)
        self._push(t, d)
        if d["status"] != 200 and rng.random() < 0.7:  # one or two retries
            for k in range(rng.choice((1, 2))):
                t += rng.uniform(0.5, 3) * 2 ** k
                self._push(t, self._call(t, c, request_hash=d["request_hash"], attempt=k + 1))

    def _label(self, kind: str, scope: str, subject: str, c: dict[str, Any] | None,
               t0: float, t1: float, model: str | None = None) -> None:
        self.labels.append({"label_id": f"S{len(self.labels):03d}", "kind": kind, "scope": scope,
                            "subject": subject, "consumer": c["id"] if c else None,
                            "tenant": c["tenant"] if c else None, "model": model,
                            "start": iso(t0), "end": iso(t1), "shape": "synth",
                            "victim_size": c["rate"] if c else None, "event_ids_sample": []})

    def _inject(self, cons: list[dict[str, Any]], end: float) -> None:
        rng = self.rng
        warm = T0 + min(3600.0, 0.3 * (end - T0))
        pool = cons[:]
        rng.shuffle(pool)
        per = max(1, int(self.hours / 2))

        def when(length: float) -> float:
            return rng.uniform(warm, end - length - 60)

        for _ in range(per):
            # runaway: a few huge-reasoning calls on o3-mini
            c = pool.pop()
            t = when(600)
            k = rng.choice((1, 6))
            ts = []
            for j in range(k):
                tj = t + j * rng.uniform(20, 90)
                rsn = rng.randint(25_000, 50_000)
                self._push(tj, self._call(tj, c, model="o3-mini", reasoning_tokens=rsn,
                                          output_tokens=rsn + 500,
                                          latency_ms=rng.uniform(200, 500) * 1000))
                ts.append(tj)
            self._label("runaway_reasoning", "consumer", c["id"], c, ts[0], ts[-1], "o3-mini")
            # retry storm: one hash every 0.5-3 s, failing with timeouts
            c = pool.pop()
            t = when(900)
            iv = rng.uniform(0.5, 3)
            n = rng.randint(40, 300)
            for j in range(n):
                tj = t + j * iv * rng.uniform(0.8, 1.2)
                self._push(tj, self._call(tj, c, request_hash="storm", status=0, error="timeout",
                                          output_tokens=0, finish_reason="error", attempt=j))
            self._label("retry_storm", "consumer", c["id"], c, t, t + n * iv, c["model"])
            # failure spike: 60 % of a busy consumer's calls fail (no retries)
            busy = [x for x in pool if x["rate"] >= 0.5]
            if busy:
                c = busy[0]
                pool.remove(c)
                t = when(1200)
                c2 = dict(c, err=0.6)
                tt = t
                while tt < t + 1200:
                    tt += rng.expovariate(c["rate"] / 3)
                    self._push(tt, self._call(tt, c2, status=401, error="auth")
                               if rng.random() < 0.6 else self._call(tt, c))
                self._label("failure_spike", "consumer", c["id"], c, t, t + 1200, c["model"])
            # token spike: 15-40x more calls for 10-20 min on a mid consumer
            mid = [x for x in pool if 0.1 <= x["rate"] <= 2.0]
            if mid:
                c = mid[0]
                pool.remove(c)
                t = when(1200)
                x = rng.uniform(15, 40)
                tt = t
                stop = t + rng.uniform(600, 1200)
                while tt < stop:
                    tt += rng.expovariate(c["rate"] * x / 10)
                    self._push(tt, self._call(tt, c, status=200))
                self._label("token_spike", "consumer", c["id"], c, t, stop, c["model"])
            # agent loop: one trace with 120-400 calls
            c = pool.pop()
            t = when(1800)
            trace = f"loop-{rng.getrandbits(32):08x}"
            n = rng.randint(120, 400)
            tt = t
            for _ in range(n):
                self._push(tt, self._call(tt, c, trace_id=trace, input_tokens=4000,
                                          finish_reason="tool_calls"))
                tt += rng.uniform(1, 4)
            self._label("agent_loop", "session", trace, c, t, tt, c["model"])
        # one upstream outage of gpt-4o-mini: 70 % of its calls fail for 10 min
        t = when(600)
        victims = [c for c in cons if c["model"] == "gpt-4o-mini"]
        for c in victims:
            tt = t
            while tt < t + 600:
                tt += rng.expovariate(max(c["rate"], 0.05) / 5)
                if rng.random() < 0.7:
                    self._push(tt, self._call(tt, c, status=503, error="upstream_5xx",
                                              output_tokens=0, finish_reason="error"))
        self._label("failure_spike", "model", "gpt-4o-mini", None, t, t + 600, "gpt-4o-mini")
