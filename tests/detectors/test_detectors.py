"""Unit tests for the detection engine (synthetic traffic, event time only)."""

from __future__ import annotations

import json
import math
import random

import pytest

from detectors import DetectorConfig, Engine, Finding
from detectors.scoring import format_report, score
from ingest.event import UsageEvent

from .drive import first
from .extreme import extreme_events
from .synth import T0, Synth, event, iso, thinking_calls


def run(evs: list[dict], eng: Engine | None = None) -> list[Finding]:
    eng = eng or Engine()
    out: list[Finding] = []
    for i, d in enumerate(evs):
        out.extend(eng.observe(UsageEvent.model_validate(d)))
        if i % 200 == 199:
            out.extend(eng.advance(UsageEvent.model_validate(d).ts))
    return out


def kinds(fs: list[Finding], status: str = "firing") -> list[str]:
    return [f.kind for f in fs if f.revision == 0 and f.status == status]


def steady(consumer: str = "app", n: int = 600, gap: float = 6.0, model: str = "gpt-4o",
           start: float = T0, i0: int = 0, **kw) -> list[dict]:
    return [event(i0 + i, start + i * gap, consumer, model, request_hash=f"r{i0 + i}", **kw)
            for i in range(n)]


@pytest.fixture(scope="module")
def normal_traffic() -> list[dict]:
    return Synth(seed=7, hours=4, consumers=40, anomalies=False).events()


def test_normal_traffic_is_quiet(normal_traffic):
    """On/off bursts, empty minutes, 1-2 retries, cron repeats, FAQs, agent runs."""
    fs = run(normal_traffic)
    loud = [f for f in fs if f.revision == 0 and f.kind in (
        "runaway_reasoning", "retry_storm", "failure_spike", "agent_loop")]
    assert loud == [], [f.summary for f in loud]
    # known weakness: heavy-tailed minute totals still give some token spikes
    assert kinds(fs).count("token_spike") <= 3


def test_runaway_guardrail_at_the_call_and_escalation():
    evs = steady("r", 100, model="o3-mini", reasoning_tokens=200, output_tokens=300)
    t = T0 + 700
    evs += [event(1000 + k, t + 60 * k, "r", "o3-mini", output_tokens=41_000,
                  reasoning_tokens=40_000, latency_ms=700_000) for k in range(4)]
    fs = run(evs)
    run_f = [f for f in fs if f.kind == "runaway_reasoning"]
    assert run_f[0].detected_at.timestamp() == pytest.approx(t, abs=0.01)
    assert run_f[0].evidence["event_id"] == "e1000"
    assert "o3-mini call ran 700 s (typical 200 tokens" in run_f[0].summary
    assert len({f.finding_id for f in run_f}) == 1  # one episode
    assert any(f.severity == "critical" and f.action == "block" for f in run_f)


def test_runaway_relative_needs_warmup():
    # 10 normal calls then a 10x call: no baseline yet and no guardrail -> nothing
    evs = steady("w", 10, model="o3-mini", reasoning_tokens=1000, output_tokens=1200)
    evs.append(event(99, T0 + 100, "w", "o3-mini", reasoning_tokens=12_000,
                     output_tokens=12_500, latency_ms=90_000))
    assert kinds(run(evs)) == []
    # after warm-up the same call fires
    evs = steady("w", 60, model="o3-mini", reasoning_tokens=1000, output_tokens=1200)
    evs.append(event(99, T0 + 400, "w", "o3-mini", reasoning_tokens=30_000,
                     output_tokens=30_500, latency_ms=90_000))
    assert kinds(run(evs)) == ["runaway_reasoning"]


def _model_users(start: float, n: int = 500) -> list[dict]:
    """Six consumers of o3-mini thinking ~300 tokens a call, from ``start``."""
    return [e for c in range(6) for e in steady(f"o{c}", n, gap=1.2, model="o3-mini",
                                                start=start, i0=1000 * (c + 1),
                                                reasoning_tokens=300, output_tokens=400)]


def test_model_wide_stand_in_respects_the_consumers_own_calls():
    # a new heavy consumer (own baseline not warm yet) thinks ~5.5k tokens;
    # the model's other consumers ~300 (for 40 minutes already): judged on the
    # model-wide baseline a 7k call would be runaway, but it is 1.3x the
    # consumer's own largest
    t = T0 + 2400
    heavy = [event(9000 + k, t + 5 * k, "h", "o3-mini", reasoning_tokens=5000 + 25 * k,
                   output_tokens=5600 + 25 * k, request_hash=f"h{k}") for k in range(20)]
    others = _model_users(T0, 2500)
    big = event(9100, t + 720, "h", "o3-mini", reasoning_tokens=7000, output_tokens=7600,
                request_hash="hb")
    evs = sorted(heavy + others + [big], key=lambda d: d["ts"])
    assert kinds(run(evs)) == []
    huge = dict(big, reasoning_tokens=30_000, output_tokens=30_600)
    evs = sorted(heavy + others + [huge], key=lambda d: d["ts"])
    assert kinds(run(evs)) == ["runaway_reasoning"]


def test_model_wide_stand_in_waits_for_its_own_warm_up():
    # at a cold start every consumer is new: a heavy thinker's first calls
    # (15k tokens against the other consumers' 300) are its normal, and a
    # baseline of the model's first minutes cannot say otherwise
    heavy = [event(9000 + k, T0 + 60 + 20 * k, "h", "o3-mini", reasoning_tokens=15_000,
                   output_tokens=15_600, request_hash=f"h{k}") for k in range(5)]
    assert kinds(run(sorted(_model_users(T0) + heavy, key=lambda d: d["ts"]))) == []
    # a consumer new to the model once the model has 30 minutes of history,
    # thinking 30k tokens at its first call, is judged on the model-wide one
    late = [event(9000, T0 + 1900, "n", "o3-mini", reasoning_tokens=30_000,
                  output_tokens=30_600, request_hash="n0")]
    assert kinds(run(sorted(_model_users(T0, 2000) + late, key=lambda d: d["ts"]))) == [
        "runaway_reasoning"]
    # without the stand-in's warm-up, the cold start's first heavy call fired
    eager = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"standin_warmup_min": 0}}))
    assert kinds(run(sorted(_model_users(T0) + heavy, key=lambda d: d["ts"]), eager)) == [
        "runaway_reasoning"]


def test_a_warming_up_consumers_own_calls_judge_a_runaway():
    # a light thinker new to the model (6 calls of ~400 tokens) thinks 25k
    # tokens; the model's other consumers include a heavy one, so the
    # model-wide stand-in's bar (3x the model's largest recent call) is above
    # 25k: the consumer's own few calls say it is 60x their largest
    heavy = [event(8000 + k, T0 + 30 * k, "h", "o3-mini", reasoning_tokens=12_000,
                   output_tokens=12_600, request_hash=f"hv{k}") for k in range(100)]
    light = [event(9000 + k, T0 + 2400 + 20 * k, "l", "o3-mini", reasoning_tokens=380 + 5 * k,
                   output_tokens=700, request_hash=f"l{k}") for k in range(6)]
    big = event(9100, T0 + 2600, "l", "o3-mini", reasoning_tokens=25_000, output_tokens=25_600,
                request_hash="lb")
    evs = sorted(_model_users(T0, 2500) + heavy + light + [big], key=lambda d: d["ts"])
    fs = [f for f in run(evs) if f.kind == "runaway_reasoning" and f.revision == 0]
    assert [f.consumer for f in fs] == ["l"]
    assert fs[0].evidence["baseline_calls"] == 6 and fs[0].threshold < 25_000
    # 15x their largest is not enough: the largest of a few calls is far
    # below the recent maximum a warm baseline would have (young_max_ratio 25)
    mid = dict(big, reasoning_tokens=6_000, output_tokens=6_600)
    assert kinds(run([mid if e is big else e for e in evs])) == []
    # four calls are not enough to judge on (young_min_calls 5)
    assert kinds(run([e for e in evs if e["event_id"] not in ("e9004", "e9005")])) == []
    # ... and without the rule the stand-in alone misses it
    off = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"young_min_calls": 99}}))
    assert kinds(run(evs, off)) == []


def _young_ratio(calls: int) -> float:
    """The young rule's ratio to the largest call: 25 at 5 calls, falling
    log-linearly to the warm rule's 6 at 30 (reasoning models)."""
    w = (calls - 5) / 25
    return float(25 ** (1 - w) * 6 ** w)


def test_the_young_ratio_falls_as_a_consumers_calls_grow():
    # a light thinker's 21 calls (200-390 tokens and one of 1,232) then one of
    # 25k tokens: 20x the largest, past the ratio at 21 calls (10.1x), though
    # under a flat 25x (held-out seed 36: the 25k, learnt, then hid the six
    # calls of an attack after it)
    heavy = [event(8000 + k, T0 + 30 * k, "h", "o3-mini", reasoning_tokens=12_000,
                   output_tokens=12_600, request_hash=f"hv{k}") for k in range(100)]
    sizes = [200 + 10 * k for k in range(20)] + [1232]
    light = [event(9000 + k, T0 + 2400 + 20 * k, "l", "o3-mini", reasoning_tokens=sz,
                   output_tokens=sz + 300, request_hash=f"l{k}") for k, sz in enumerate(sizes)]
    big = event(9100, T0 + 2900, "l", "o3-mini", reasoning_tokens=25_000, output_tokens=25_600,
                request_hash="lb")
    evs = sorted(_model_users(T0, 2500) + heavy + light + [big], key=lambda d: d["ts"])
    fs = [f for f in run(evs) if f.kind == "runaway_reasoning" and f.revision == 0]
    assert [(f.consumer, f.evidence["baseline_calls"]) for f in fs] == [("l", 21)]
    assert fs[0].threshold == pytest.approx(_young_ratio(21) * 1232, rel=0.01)
    # after 6 of those calls (the largest the same 1,232) the ratio is 23.6x:
    # 25k is no runaway on so little evidence
    few = [e for e in evs if e["consumer"] != "l" or e is big or e["event_id"] in (
        "e9000", "e9001", "e9002", "e9003", "e9004", "e9020")]
    assert kinds(run(few)) == []


def test_a_warming_up_consumers_own_calls_judge_a_slow_runaway():
    # a light thinker new to the model (6 calls of ~400 tokens, 20 s) has a
    # call think 9k tokens for 1244 s; the model also serves a heavy
    # thinker (12k tokens, 500 s), so the stand-in's bars (1.5x its largest
    # call for the 600 s guardrail, 3x its slowest for duration) are above
    # it, and 9k tokens are under 23.6x the consumer's largest call (the
    # young ratio at 6 calls): its own calls' durations say the call ran 60x
    # their slowest
    heavy = [event(8000 + k, T0 + 30 * k, "h", "o3-mini", reasoning_tokens=12_000,
                   output_tokens=12_600, latency_ms=500_000, request_hash=f"hv{k}")
             for k in range(100)]
    light = [event(9000 + k, T0 + 2400 + 20 * k, "l", "o3-mini", reasoning_tokens=380 + 2 * k,
                   output_tokens=700, latency_ms=20_000, request_hash=f"l{k}")
             for k in range(6)]
    slow = event(9100, T0 + 2900, "l", "o3-mini", reasoning_tokens=9_000, output_tokens=9_300,
                 latency_ms=1_244_000, request_hash="lb")
    evs = sorted(_model_users(T0, 2500) + heavy + light + [slow], key=lambda d: d["ts"])
    fs = [f for f in run(evs) if f.kind == "runaway_reasoning" and f.revision == 0]
    assert [(f.consumer, f.evidence["rule"]) for f in fs] == [("l", "latency")]
    assert fs[0].observed == pytest.approx(1244.0)
    assert fs[0].threshold == pytest.approx(_young_ratio(6) * 20.0, rel=0.01)  # x its slowest
    assert "o3-mini call ran 1244 s (typical 3" in fs[0].summary
    # as slow, but thinking no more than min_tokens: upstream latency, nothing
    little = dict(slow, reasoning_tokens=3_000, output_tokens=3_300)
    assert kinds(run([little if e is slow else e for e in evs])) == []
    # thinking as much, but 400 s (20x its slowest, under 23.6x): nothing
    quicker = dict(slow, latency_ms=400_000)
    assert kinds(run([quicker if e is slow else e for e in evs])) == []
    # ... and without the young rules the stand-in alone misses it
    off = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"young_min_calls": 99}}))
    assert kinds(run(evs, off)) == []


def test_a_plain_model_stuck_at_its_output_limit_is_runaway():
    # a chat consumer answering in ~100 tokens; one answer runs to its
    # max_tokens of 4096 (finish_reason=length): a model repeating itself
    evs = steady("p", 200, model="gpt-4o-mini")
    stuck = event(999, T0 + 1300, "p", "gpt-4o-mini", output_tokens=4096,
                  finish_reason="length", max_output_tokens=4096, latency_ms=40_000)
    fs = [f for f in run([*evs, stuck]) if f.kind == "runaway_reasoning"]
    assert [f.evidence["rule"] for f in fs] == ["tokens"]
    assert fs[0].observed == 4096 and fs[0].threshold == pytest.approx(4000)
    assert "call answered 4096 tokens" in fs[0].summary  # its output, not thinking
    # a long answer that ended on its own needs min_tokens (6000), as did
    # one stopped at its limit before length_min_output
    assert kinds(run([*evs, dict(stuck, finish_reason="stop")])) == []
    old = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"length_min_output": 6000}}))
    assert kinds(run([*evs, stuck], old)) == []
    # ... and a consumer whose answers often run long is not judged by it
    long = steady("p", 200, model="gpt-4o-mini", output_tokens=1500)
    assert kinds(run([*long, stuck])) == []


def test_a_plain_answer_cut_off_past_16k_tokens_is_runaway_without_a_baseline():
    # a consumer's very first gpt-4o call runs its answer to a 16,384-token
    # limit: no baseline of the consumer (or, for plain models, of the
    # model) exists, but like the reasoning budget hit it is a guardrail
    first = event(1, T0 + 60, "n", "gpt-4o", output_tokens=16_384, finish_reason="length",
                  max_output_tokens=16_384, latency_ms=200_000)
    [f] = [f for f in run([first]) if f.kind == "runaway_reasoning"]
    assert f.evidence["rule"] == "output_budget" and f.detected_at.timestamp() == T0 + 60
    assert f.observed == 16_384 and f.threshold == 16_384
    assert "cut off at its output limit (no baseline of the consumer" in f.summary
    # an answer that ended on its own, or one cut off at 8k, is no guardrail
    # hit; nor is a long answer of a reasoning model after its thinking
    assert kinds(run([dict(first, finish_reason="stop")])) == []
    assert kinds(run([dict(first, output_tokens=8192, max_output_tokens=8192)])) == []
    assert kinds(run([dict(first, model="o3-mini", reasoning_tokens=3000)])) == []
    # 0 disables it
    off = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"length_max_output": 0}}))
    assert kinds(run([first], off)) == []
    # a warm baseline judges it by its relative rules: a consumer whose
    # answers run to 3-5k tokens has one reach the limit
    long = steady("n", 200, model="gpt-4o", output_tokens=4000)

    def cut(k: int) -> dict:  # after the consumer's k-th call
        return event(5000, T0 + 6 * k - 1, "n", "gpt-4o", output_tokens=16_384,
                     finish_reason="length", max_output_tokens=16_384, latency_ms=200_000)

    assert kinds(run([*long, cut(200)])) == []
    [g] = [f for f in run([*long[:20], cut(20)]) if f.kind == "runaway_reasoning"]
    assert g.evidence["rule"] == "output_budget" and "(typical 4000 tokens" in g.summary


def test_the_reasoning_budget_guardrail_needs_the_limit_hit_while_thinking():
    # a heavy thinker (~5k reasoning tokens a call, a 32k output limit): a
    # call whose thinking used the whole limit (nothing left for the answer)
    # hit its reasoning budget; one that thought 30k (6x its typical) and was
    # cut off 2.7k tokens into its answer is a long answer, not runaway
    # reasoning, and below every other rule
    evs = thinking_calls(random.Random(4), "hv", "deepseek-reasoner", 5000, 300, 12, 600, 30,
                         max_output_tokens=32_768)
    t = T0 + 12 * 300 + 5

    def cut(rsn: int) -> dict:
        return event(999, t, "hv", "deepseek-reasoner", reasoning_tokens=rsn,
                     output_tokens=32_768, finish_reason="length", max_output_tokens=32_768,
                     latency_ms=400_000, request_hash="cut")

    [f] = [f for f in run([*evs, cut(32_768)]) if f.kind == "runaway_reasoning"]
    assert f.evidence["rule"] == "reasoning_budget" and f.detected_at.timestamp() == t
    assert kinds(run([*evs, cut(32_200)])) == ["runaway_reasoning"]  # a few answer tokens
    assert kinds(run([*evs, cut(30_000)])) == []
    # at a share of 0.9 (the default before 2026-12-07) it was reported
    loose = Engine(DetectorConfig.from_dict(
        {"runaway_reasoning": {"length_reasoning_share": 0.9}}))
    assert kinds(run([*evs, cut(30_000)], loose)) == ["runaway_reasoning"]


def test_retry_storm_fires_fast_and_blocks():
    evs = steady("s", 400)
    t = T0 + 2500
    evs += [event(5000 + k, t + 1.5 * k, "s", request_hash="same", status=503,
                  error="upstream_5xx", output_tokens=0) for k in range(30)]
    evs.sort(key=lambda d: d["ts"])
    fs = [f for f in run(evs) if f.kind == "retry_storm"]
    assert fs and fs[0].action == "block" and fs[0].consumer == "s"
    assert fs[0].detected_at.timestamp() - t <= 10


def test_one_or_two_retries_and_cron_do_not_fire():
    evs = steady("n", 400)
    for k in range(20):  # an error followed by two retries, 20 times
        t = T0 + 100 + 100 * k
        evs += [event(9000 + 3 * k + j, t + j * 2, "n", request_hash=f"x{k}",
                      status=503 if j < 2 else 200) for j in range(3)]
    for k in range(40):  # a cron job every 3 minutes
        evs.append(event(8000 + k, T0 + 50 + 180 * k, "n", request_hash="cron"))
    evs.sort(key=lambda d: d["ts"])
    assert "retry_storm" not in kinds(run(evs))


def test_failure_spike_needs_evidence():
    evs = steady("f", 400)
    # one failure in two calls after warm-up: not a spike
    evs += [event(7000, T0 + 2400.5, "f", status=500), event(7001, T0 + 2401, "f")]
    evs.sort(key=lambda d: d["ts"])
    assert "failure_spike" not in kinds(run(evs))
    # 60 % failing for 10 minutes: a spike, alert
    evs = steady("f", 400)
    evs += [event(7000 + k, T0 + 2400.5 + 6 * k, "f", status=401 if k % 5 < 3 else 200)
            for k in range(100)]
    evs.sort(key=lambda d: d["ts"])
    fs = [f for f in run(evs) if f.kind == "failure_spike" and f.revision == 0]
    assert fs and fs[0].scope == "consumer" and fs[0].action == "alert"


def test_model_outage_alerts_and_suppresses_consumer_findings():
    evs = []
    for c in range(8):
        evs += steady(f"m{c}", 500, gap=4.0, model="gpt-4o-mini", i0=c * 10_000)
    t = T0 + 1200
    for d in evs:
        ts = UsageEvent.model_validate(d).ts.timestamp()
        if t <= ts < t + 300 and int(d["event_id"][1:]) % 5 < 4:
            d.update(status=503, error="upstream_5xx", output_tokens=0)
    evs.sort(key=lambda d: d["ts"])
    fs = [f for f in run(evs) if f.revision == 0]
    model = [f for f in fs if f.scope == "model"]
    assert model and model[0].subject == "gpt-4o-mini" and model[0].action == "alert"
    assert all(f.action != "block" for f in fs)


def _outage_then_own_spike(hit_s: bool) -> list[dict]:
    """Eight consumers of gpt-4o-mini and a small one, "s" (a call every
    20 s); an outage fails 80 % of the model's calls for 5 minutes (s's too
    when ``hit_s``); 40 minutes later 4 in 10 of s's calls fail for 10 minutes."""
    evs = []
    for c in range(8):
        evs += steady(f"m{c}", 1000, gap=4.0, model="gpt-4o-mini", i0=c * 10_000)
    evs += steady("s", 300, gap=20.0, model="gpt-4o-mini", i0=100_000)
    for d in evs:
        ts = UsageEvent.model_validate(d).ts.timestamp()
        k = int(d["event_id"][1:])
        outage = T0 + 1200 <= ts < T0 + 1500 and k % 5 < 4 and (hit_s or d["consumer"] != "s")
        own = d["consumer"] == "s" and T0 + 3600 <= ts < T0 + 4200 and k % 10 < 4
        if outage or own:
            d.update(status=503, error="upstream_5xx", output_tokens=0)
    return sorted(evs, key=lambda d: d["ts"])


def test_an_outages_failures_do_not_teach_the_consumers_failure_baseline():
    # the outage's failures are the model scope's: for s they are no more
    # its normal than they are evidence against it, so its own spike later
    # is judged as if the outage had passed it by
    hit = [f for f in run(_outage_then_own_spike(True)) if f.revision == 0]
    spared = [f for f in run(_outage_then_own_spike(False)) if f.revision == 0]
    assert [(f.scope, f.subject) for f in hit] == [("model", "gpt-4o-mini"), ("consumer", "s")]
    assert [(f.scope, f.subject) for f in spared] == [("model", "gpt-4o-mini"),
                                                      ("consumer", "s")]
    # (the outage's first failure, before the model scope saw it, and the
    # calls it failed are the difference; learnt, its 12 failures made the
    # baseline 6.4 % against 3.0 %)
    assert hit[1].baseline < 1.5 * spared[1].baseline
    assert abs((hit[1].detected_at - spared[1].detected_at).total_seconds()) <= 60


def test_failures_deferred_only_because_others_fail_too_still_teach_the_baseline():
    # every 5 minutes three of a model's eight other consumers fail for
    # 40 s, too few failures for an outage; s's failures then (one call in
    # 15) are deferred to the model scope, so they are kept out of its
    # windows, but with no outage open they are its background and teach
    # its baseline: learning none of them left a busy consumer's baseline
    # at a third of its rate (held-out seed 22), too low to learn again
    evs = []
    for c in range(8):
        evs += steady(f"m{c}", 540, gap=20.0, model="gpt-4o-mini", i0=c * 10_000,
                      start=T0 + 2.5 * c)
    evs += steady("s", 540, gap=20.0, model="gpt-4o-mini", i0=100_000, start=T0 + 1.0)
    for d in evs:
        phase = (UsageEvent.model_validate(d).ts.timestamp() - T0) % 300
        others = d["consumer"] in ("m0", "m1", "m2") and 100 <= phase < 140
        own = d["consumer"] == "s" and 120 <= phase < 140
        if others or own:
            d.update(status=503, error="upstream_5xx", output_tokens=0)
    eng = Engine()
    assert [f for f in run(sorted(evs, key=lambda d: d["ts"]), eng) if f.revision == 0] == []
    described = eng.describe("s")
    assert described is not None
    assert described["failure_rate"] == pytest.approx(1 / 15, rel=0.1)


def _busy_consumer_and_small_one(b_from: float, s_from: float, everyone: bool = False
                                 ) -> list[dict]:
    """Six consumers of gpt-4o-mini (a call every 2 s) failing one call in 20, a busy one, "b"
    (a call a second), and a small one, "s" (one every 10 s), for 2 hours;
    9 in 10 of b's calls fail for 40 minutes from ``b_from`` s, 4 in 5 of
    s's for 5 minutes from ``s_from`` s (when ``everyone``, 4 in 5 of every
    consumer's calls fail from ``s_from`` too: an outage)."""
    evs = []
    for c in range(6):
        evs += steady(f"m{c}", 3600, gap=2.0, model="gpt-4o-mini", i0=c * 10_000,
                      start=T0 + 0.3 * c)
    evs += steady("b", 7200, gap=1.0, model="gpt-4o-mini", i0=100_000)
    evs += steady("s", 720, gap=10.0, model="gpt-4o-mini", i0=200_000, start=T0 + 0.5)
    for d in evs:
        t = UsageEvent.model_validate(d).ts.timestamp() - T0
        k = int(d["event_id"][1:])
        c = d["consumer"]
        fail = ((c.startswith("m") and k % 20 == 0)
                or (c == "b" and b_from <= t < b_from + 2400 and k % 10 < 9)
                or ((c == "s" or everyone) and s_from <= t < s_from + 300 and k % 5 < 4))
        if fail:
            d.update(status=503, error="upstream_5xx", output_tokens=0)
    return sorted(evs, key=lambda d: d["ts"])


def test_one_consumers_own_incident_does_not_hide_anothers_failure_spike():
    # b's broken client holds most of the model's failures.  s's failures
    # 15 minutes into it are s's own: b's incident was reported long
    # before, so they are not deferred to a model scope that never fires
    # (held-out seeds 11, 12 and 36: four labelled spikes missed that way)
    fs = first(run(_busy_consumer_and_small_one(3600.0, 4500.0)), "failure_spike")
    assert [(f.scope, f.subject) for f in fs] == [("consumer", "b"), ("consumer", "s")]
    assert (fs[1].detected_at.timestamp() - T0 - 4500.0) <= 120.0
    # at an outage's start the busiest consumer's finding is seconds old: the
    # small consumers' failures are still the model's, not theirs
    fs = first(run(_busy_consumer_and_small_one(4500.0, 4500.0, everyone=True)),
               "failure_spike")
    assert ("model", "gpt-4o-mini") in [(f.scope, f.subject) for f in fs]
    assert [f.subject for f in fs if f.scope == "consumer"] in ([], ["b"])


def test_a_reported_spikes_failures_are_no_evidence_of_a_new_one():
    # a client-error spike, its tail (a failing call every 30 s), silence,
    # then 45 minutes later one 503: windows reaching back into the reported
    # spike's failures would make a new finding of it
    evs = steady("f", 400)
    evs += [event(7000 + k, T0 + 2400.5 + 6 * k, "f", status=401 if k % 5 < 3 else 200)
            for k in range(100)]
    evs += [event(7200 + k, T0 + 3000.5 + 30 * k, "f", status=401) for k in range(8)]
    later = [event(7300, T0 + 5700.5, "f", status=503, error="upstream_5xx"),
             event(7301, T0 + 5710.5, "f")]
    fs = [f for f in run(sorted(evs + later, key=lambda d: d["ts"]))
          if f.kind == "failure_spike"]
    assert len({f.finding_id for f in fs}) == 1
    assert fs[-1].status == "resolved"
    # a new burst after it is a new finding (its own failures are evidence)
    burst = [event(7400 + k, T0 + 5720.5 + 5 * k, "f", status=503, error="upstream_5xx")
             for k in range(8)]
    fs = [f for f in run(sorted(evs + later + burst, key=lambda d: d["ts"]))
          if f.kind == "failure_spike" and f.revision == 0]
    assert len(fs) == 2 and fs[1].detected_at.timestamp() >= T0 + 5720


def test_failure_windows_count_a_retried_request_once():
    # 2 in 10 requests fail with a 503, each retried twice in vain: 2 failed
    # requests per 14 calls (14 %), but 2 per 10 requests (20 %) at a
    # baseline of 1-2 %.  Failed retries count neither as failures nor as
    # calls, in the windows and the baseline alike
    evs = steady("f", 400)
    t = T0 + 2400.5
    for k in range(100):
        if k % 10 < 2:
            evs += [event(7000 + 10 * k + a, t + 6 * k + 1.5 * a, "f", status=503,
                          error="upstream_5xx", request_hash=f"x{k}", attempt=a)
                    for a in range(3)]
        else:
            evs.append(event(7000 + 10 * k, t + 6 * k, "f", request_hash=f"x{k}"))
    fs = [f for f in run(sorted(evs, key=lambda d: d["ts"]))
          if f.kind in ("failure_spike", "retry_storm") and f.revision == 0]
    assert [f.kind for f in fs] == ["failure_spike"]
    f = fs[0]
    # the window's calls are its requests: failures / calls near 2 in 10
    assert f.evidence["failures"] / f.evidence["calls"] == pytest.approx(f.observed)
    assert 0.18 <= f.observed <= 0.3


def test_token_spike_and_not_on_bursts():
    # a consumer alternating silence and 4x bursts for 2 h: normal
    evs = []
    i = 0
    for m in range(180):
        n = 0 if m % 3 == 0 else (12 if m % 7 == 0 else 3)
        for k in range(n):
            evs.append(event(i, T0 + 60 * m + k * 60 / max(n, 1), "b", input_tokens=2000))
            i += 1
    assert "token_spike" not in kinds(run(evs))
    # then 40x the calls for 5 minutes
    for m in range(180, 185):
        for k in range(120):
            evs.append(event(i, T0 + 60 * m + k * 0.5, "b", input_tokens=2000))
            i += 1
    fs = [f for f in run(evs) if f.kind == "token_spike"]
    assert fs and fs[0].detected_at.timestamp() - (T0 + 10800) <= 60


def call_size_only(evs: list[dict]) -> list[Finding]:
    """The token_spike findings of the call-size rule alone (the rate windows
    switched off); asserts there is one."""
    size_only = Engine(DetectorConfig.from_dict({"token_spike": {
        "ratio": 1e6, "sustained_ratio": 1e6}}))
    fs = [f for f in run(evs, size_only) if f.kind == "token_spike" and f.revision == 0]
    assert fs and fs[0].evidence["rule"] == "call_size", [f.summary for f in fs]
    return fs


def test_prompts_suddenly_bigger_at_the_usual_rate_is_a_token_spike():
    import random
    rng = random.Random(5)
    # 10 calls a minute in bursty clumps, prompt sizes log-normal around 2k
    evs = []
    t = T0
    for i in range(1500):
        t += rng.expovariate(1 / 6.0)
        evs.append(event(i, t, "p", input_tokens=int(rng.lognormvariate(7.6, 0.9)),
                         request_hash=f"p{i}"))
    quiet = run(evs)
    assert "token_spike" not in kinds(quiet)
    # then the same rate with prompts 10x bigger
    t0 = t
    for i in range(1500, 1560):
        t += rng.expovariate(1 / 6.0)
        evs.append(event(i, t, "p", input_tokens=int(10 * rng.lognormvariate(7.6, 0.9)),
                         request_hash=f"p{i}"))
    fs = [f for f in run(evs) if f.kind == "token_spike" and f.revision == 0]
    assert fs and fs[0].detected_at.timestamp() - t0 <= 180
    # the call-size rule alone (rate windows switched off) sees it too
    fs = call_size_only(evs)
    assert fs[0].detected_at.timestamp() - t0 <= 180
    assert fs[0].evidence["input_tokens_per_call"] > 5 * fs[0].evidence[
        "baseline_input_tokens_per_call"]


def test_a_first_minute_of_small_prompts_does_not_stall_the_call_size_baseline():
    """The consumer's first minute has prompts of ~600 tokens, every later
    one ~2k.  The usual size must still form (every warm-up minute counts):
    gated from the first minute on, no later minute taught it (each was more
    than 2x above), the rule never left its warm-up and missed prompts grown
    10x an hour later."""
    import random
    rng = random.Random(11)
    evs = [event(i, T0 + 10 * i, "f", input_tokens=int(rng.lognormvariate(6.4, 0.3)),
                 request_hash=f"f{i}") for i in range(6)]
    t = T0 + 60
    for i in range(6, 906):
        t += rng.expovariate(1 / 6.0)
        evs.append(event(i, t, "f", input_tokens=int(rng.lognormvariate(7.6, 0.9)),
                         request_hash=f"f{i}"))
    assert "token_spike" not in kinds(run(evs))
    t0 = t
    for i in range(906, 966):
        t += rng.expovariate(1 / 6.0)
        evs.append(event(i, t, "f", input_tokens=int(10 * rng.lognormvariate(7.6, 0.9)),
                         request_hash=f"f{i}"))
    fs = call_size_only(evs)
    assert fs[0].detected_at.timestamp() - t0 <= 180
    # the usual it was measured against is the later minutes' (~2k), not the first's
    assert 1200 < fs[0].evidence["baseline_input_tokens_per_call"] < 3500


def test_prompts_that_stay_bigger_become_the_usual_size():
    """Prompts 10x bigger from hour 3 on, for good (a new feature): one
    finding.  Once it is accepted (no finding open, two hours on) the usual
    size follows the new level, each minute's pull bounded, so that five
    hours later a burst of 3.8x the calls at the new size is no "prompts 10x
    bigger than usual" finding.  Kept out of the usual for good, minutes
    at the rule's ratio had left it at the old size forever."""
    import random
    rng = random.Random(21)
    evs = []
    t = T0
    i = 0
    while t < T0 + 8 * 3600:
        t += rng.expovariate(1 / 6.0)
        grow = 10 if t >= T0 + 3 * 3600 else 1
        evs.append(event(i, t, "nf", input_tokens=int(grow * rng.lognormvariate(7.6, 0.9)),
                         request_hash=f"nf{i}"))
        i += 1
    burst = t
    for k in range(228):  # 6 minutes at 3.8x the calls (38 a minute instead of 10)
        evs.append(event(i, burst + 60 + 360 * k / 228,
                         "nf", input_tokens=int(10 * rng.lognormvariate(7.6, 0.9)),
                         request_hash=f"nf{i}"))
        i += 1
    fs = [f for f in run(evs) if f.kind == "token_spike" and f.revision == 0]
    assert fs and fs[0].detected_at.timestamp() - (T0 + 3 * 3600) <= 300
    late = [f for f in fs if f.detected_at.timestamp() >= T0 + 6 * 3600]
    assert not late, [f.summary for f in late]


def test_bigger_prompts_in_a_chat_apps_conversations_are_a_token_spike():
    """Every call a turn of one of 60 conversations: the call-size rule
    counts each turn (the rate windows count a conversation once)."""
    import random
    rng = random.Random(5)
    evs = []
    t = T0
    for i in range(1560):
        t += rng.expovariate(1 / 6.0)
        if i == 1500:
            t0 = t
        size = rng.lognormvariate(7.6, 0.9) * (10 if i >= 1500 else 1)
        evs.append(event(i, t, "chat", input_tokens=int(size), request_hash=f"c{i}",
                         session_id=f"s{i % 60}"))
    assert "token_spike" not in kinds(run(evs[:1500]))
    fs = [f for f in run(evs) if f.kind == "token_spike" and f.revision == 0]
    assert fs and fs[0].evidence["rule"] == "call_size", [f.summary for f in fs]
    assert fs[0].detected_at.timestamp() - t0 <= 300


def test_bigger_prompts_in_an_agent_consumers_runs_are_a_token_spike():
    """An agent consumer: runs of 10 steps, one every ~40 s.  Only a run's
    first call is sized (later steps grow by design), but when every step's
    prompt grows 10x, that is the rise: the sized calls stand for the steps."""
    import random
    rng = random.Random(9)
    evs = []
    t = T0
    for r in range(700):
        t += rng.expovariate(1 / 40.0)
        if r == 600:
            t0 = t
        grow = 10 if r >= 600 else 1
        base = rng.lognormvariate(7.9, 0.4)
        for k in range(10):
            evs.append(event(len(evs), t + 3 * k, "ag", trace_id=f"run{r}",
                             input_tokens=int(grow * (base + 300 * k))))
    assert "token_spike" not in kinds(run([e for e in evs if e["ts"] < iso(t0)]))
    assert "token_spike" in kinds(run(evs))
    # the call-size rule alone (rate windows switched off) sees it
    assert call_size_only(evs)[0].detected_at.timestamp() - t0 <= 600


def normal_runs(consumer: str) -> list[dict]:
    """30 normal agent runs of 3-20 calls, one every 5 minutes from T0."""
    evs = []
    for r in range(30):
        for k in range(3 + r % 18):
            evs.append(event(len(evs), T0 + 300 * r + 5 * k, consumer, trace_id=f"run{r}"))
    return evs


def test_agent_loop_and_normal_runs():
    evs = normal_runs("ag")
    i = len(evs)
    evs += [event(i + k, T0 + 9500 + 3 * k, "ag", trace_id="loop") for k in range(400)]
    fs = run(evs)
    loops = [f for f in fs if f.kind == "agent_loop"]
    assert loops and loops[0].subject == "loop" and loops[0].consumer == "ag"
    assert {f.subject for f in loops} == {"loop"}
    assert any(f.severity == "critical" and f.action == "block" for f in loops)


def test_agent_loop_counts_answered_calls_not_retried_failures():
    def runs(timeouts: bool) -> list:
        evs = normal_runs("ag")
        i = len(evs)
        # a run of 20 steps during an outage: each step times out twice, then
        # goes through (60 calls, 20 answered), or 60 answered steps
        for k in range(60):
            fail = timeouts and k % 3 < 2
            evs.append(event(i + k, T0 + 9500 + 3 * k, "ag", trace_id="slow",
                             request_hash=f"step{k // 3 if timeouts else k}",
                             **({"status": 0, "error": "timeout", "output_tokens": 0}
                                if fail else {})))
        return [f for f in run(evs) if f.kind == "agent_loop"]

    assert runs(timeouts=True) == []
    [loop] = [f for f in runs(timeouts=False) if f.revision == 0]
    assert loop.subject == "slow" and loop.evidence["failed_calls"] == 0


def test_agent_loop_bar_is_the_longest_normal_run_not_a_log_normal_tail():
    # runs of 1 to 30 calls (tau-bench's tool calls reach 27), many of them
    # a single call: a log-normal fitted to them puts its 99th percentile
    # near 60 calls, past anything this consumer ever ran
    def runs(loop_calls: int) -> list:
        evs = []
        for r in range(60):
            n = (1, 30, 2, 25, 1, 28, 3, 1, 12, 30)[r % 10]
            for k in range(n):
                evs.append(event(len(evs), T0 + 300 * r + 5 * k, "ag", trace_id=f"run{r}"))
        i = len(evs)
        evs += [event(i + k, T0 + 18_500 + 3 * k, "ag", trace_id="long")
                for k in range(loop_calls)]
        return [f for f in run(evs) if f.kind == "agent_loop" and f.revision == 0]

    assert runs(30) == []  # as long as its longest normal runs
    [loop] = runs(48)  # 1.6x them
    assert loop.subject == "long" and loop.threshold <= 46


def test_a_first_run_looping_on_full_context_calls_is_an_agent_loop_before_a_baseline():
    # a consumer's first run: 32 steps (under the 40-call guard) each sending
    # 80k tokens, 2.6M in all; the largest of tau-bench's real runs is 166k
    def first_run(input_tokens: int) -> list:
        evs = [event(k, T0 + 5 * k, "ag", trace_id="first", input_tokens=input_tokens,
                     request_hash=f"step{k}") for k in range(32)]
        return [f for f in run(evs) if f.kind == "agent_loop" and f.revision == 0]

    assert first_run(5000) == []  # 160k tokens: a long normal run
    [loop] = first_run(80_000)
    assert loop.subject == "first" and loop.threshold == 2_000_000
    assert loop.observed >= 2_000_000 and loop.severity == "warning"


def test_context_bloat_is_info():
    evs = [event(k, T0 + 30 * k, "cb", session_id="s1", input_tokens=3000 + 7000 * k)
           for k in range(15)]
    fs = [f for f in run(evs) if f.kind == "context_bloat"]
    assert fs and fs[0].severity == "info" and fs[0].action == "none"
    assert fs[0].consumer == "cb" and fs[0].scope == "session"


def test_context_bloat_through_a_pasted_file_and_uneven_turns():
    # history resent turn after turn (+3k a turn), one turn pasting a file
    # (+20k), and every fifth call 30 % shorter than the longest so far (a
    # short reply, a client trimming a little): one growing conversation
    sizes, x = [], 6000
    for k in range(40):
        x += 20_000 if k == 12 else 3000
        sizes.append(int(x * 0.6) if k % 5 == 4 else x)
    evs = [event(k, T0 + 60 * k, "cb", "claude-sonnet-4", session_id="s1", input_tokens=n)
           for k, n in enumerate(sizes)]
    fs = [f for f in run(evs) if f.kind == "context_bloat"]
    assert [f.subject for f in fs if f.revision == 0] == ["s1"]
    assert fs[0].baseline == sizes[0]
    # a client that trims its history to under 60 % of its longest starts a
    # new streak: 9k -> 30k, trimmed to 12k, then 12k -> 39k is under 4x
    low = Engine(DetectorConfig.from_dict({"context_bloat": {"min_input_tokens": 20_000}}))
    trimmed = [9000 + 3000 * k for k in range(8)] + [12_000 + 3000 * k for k in range(10)]
    assert kinds(run([dict(e, input_tokens=n) for e, n in zip(evs, trimmed, strict=False)],
                     low)) == []
    # ... while one trimmed by a third goes on (9k -> 38k fires)
    kept = [9000 + 3000 * k for k in range(8)] + [20_000 + 3000 * k for k in range(7)]
    assert kinds(run([dict(e, input_tokens=n) for e, n in zip(evs, kept, strict=False)],
                     low)) == ["context_bloat"]


def test_episode_updates_and_resolves():
    evs = steady("s", 400)
    t = T0 + 2500
    evs += [event(5000 + k, t + 1.0 * k, "s", request_hash="same", status=503)
            for k in range(300)]
    evs.sort(key=lambda d: d["ts"])
    eng = Engine()
    fs = run(evs, eng)
    fs += eng.advance(UsageEvent.model_validate(evs[-1]).ts.replace(year=2027))
    storm = [f for f in fs if f.kind == "retry_storm"]
    assert len({f.finding_id for f in storm}) == 1
    assert [f.revision for f in storm] == list(range(len(storm)))
    assert storm[-1].status == "resolved" and storm[-1].resolved_at is not None
    assert len(storm) < 20  # rate-limited updates, not one per event


def test_determinism_and_snapshot_restore():
    evs = Synth(seed=3, hours=2, consumers=15).events()
    a = [f.to_json_dict() for f in run(evs)]
    b = [f.to_json_dict() for f in run(evs)]
    assert a == b and a
    eng = Engine()
    out = []
    half = len(evs) // 2
    for i, d in enumerate(evs):
        if i == half:
            eng = Engine.restore(eng.snapshot())
        out.extend(eng.observe(UsageEvent.model_validate(d)))
        if i % 200 == 199:
            out.extend(eng.advance(UsageEvent.model_validate(d).ts))
    assert [f.to_json_dict() for f in out] == a


def test_out_of_order_events_are_tolerated():
    evs = steady("o", 300)
    evs[100], evs[101] = evs[101], evs[100]
    assert kinds(run(evs)) == []


def _replay(evs: list[UsageEvent], restart_every: int = 0) -> list[str]:
    """Findings as JSON lines (NaN or infinity would raise); the engine
    snapshotted and restored every ``restart_every`` events if set."""
    eng = Engine()
    out: list[str] = []
    for i, ev in enumerate(evs):
        fs = eng.observe(ev)
        if i % 97 == 96:  # a clock tick now and then, as the pipeline sends
            fs += eng.advance(ev.ts)
        out += [json.dumps(f.to_json_dict(), sort_keys=True, allow_nan=False) for f in fs]
        if restart_every and i % restart_every == restart_every - 1:
            eng = Engine.restore(eng.snapshot())
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_extreme_but_valid_events_neither_crash_nor_poison_findings(seed):
    """Schema limits, day-long calls, a cost of 1e9, clocks jumping back days
    and forward weeks: the engine goes on, its findings stay finite JSON, and
    restarts from snapshots change nothing."""
    evs = extreme_events(seed, 6000)
    assert len(evs) > 5000
    found = _replay(evs)
    assert len({json.loads(f)["kind"] for f in found}) >= 3
    for f in map(json.loads, found):
        for key in ("observed", "baseline", "threshold"):
            assert f[key] is None or math.isfinite(f[key]), (key, f)
    assert _replay(evs, restart_every=1000) == found


def test_eviction_bounds_state():
    eng = Engine(DetectorConfig.from_dict({"engine": {"evict_idle_s": 3600}}))
    run(steady("old", 10), eng)
    run(steady("new", 10, start=T0 + 8000, i0=100), eng)
    eng.advance(UsageEvent.model_validate(event(0, T0 + 9000, "x")).ts)
    assert eng.tracked_consumers() == 1


def test_consumers_share_names_and_chain_their_models():
    """A consumer keeps the engine's one copy of its tenant's and models'
    names (each event brings its own string), its models' call-size
    baselines in the order first seen, and the run baselines in one record;
    all of it survives a snapshot."""
    def ev(i: int, c: str, m: str) -> UsageEvent:
        # names built at run time: each event holds strings of its own (as
        # events decoded one by one may; validation can return shared ones)
        e = UsageEvent.model_validate(event(i, T0 + i, c, model=m, tenant="acme"))
        return e.model_copy(update={"model": "".join(list(m)), "tenant": "".join(list("acme"))})

    models = ("m-a", "m-b", "m-c")
    evs = [ev(10 * n + k, c, m) for n, c in enumerate(("c1", "c2"))
           for k, m in enumerate(models * 2)]
    assert evs[0].tenant is not evs[-1].tenant and evs[0].model is not evs[3].model
    eng = Engine()
    for e in evs:
        eng.observe(e)
    c1, c2 = eng._consumers["c1"], eng._consumers["c2"]
    assert c1.tenant == "acme" and c1.tenant is c2.tenant
    assert [m for m, _ in c1.model_items()] == list(models) and c1.model_count() == 3
    for (m1, b1), (m2, b2) in zip(c1.model_items(), c2.model_items(), strict=True):
        assert m1 is m2 and b1 is not b2 and b1.t_n == 2
    assert c1.model_baseline("m-b") is c1.model_items()[1][1]
    c1.learn_run(5, 2000)
    c1.learn_run(9, 4000)
    assert c1.runs == 2 and c1.run is not None and (c1.run.t_rmax, c1.run.l_rmax) == (9, 4000)
    back = Engine.restore(eng.snapshot())
    r1, r2 = back._consumers["c1"], back._consumers["c2"]
    assert r1.tenant is r2.tenant and r1.runs == 2 and r1.cfg is back.config.settings
    assert [(m, b.t_n) for m, b in r1.model_items()] == [(m, 2) for m in models]
    # a consumer new after the restore shares the restored names
    back.observe(ev(99, "c3", "m-a"))
    c3 = back._consumers["c3"]
    assert c3.tenant is r1.tenant and c3.model_items()[0][0] is r1.model_items()[0][0]
    # an endless stream of names does not grow the table without bound
    from detectors.engine import MAX_NAMES
    for i in range(MAX_NAMES + 10):
        assert back._name(f"tenant-{i}") == f"tenant-{i}"
    assert len(back._names) <= MAX_NAMES


def test_the_token_series_is_rivers_ewvar_in_two_floats():
    """The per-minute token baseline keeps river's EWMean and EWVar as two
    floats (a river object per consumer costs about 370 bytes of a 2 KiB
    budget): the same figures, bit for bit, over bursts and empty minutes."""
    from river import stats

    from detectors.baselines import alpha_for_halflife
    from detectors.state import ConsumerState

    a = alpha_for_halflife(60.0)
    cs = ConsumerState("c", "t", DetectorConfig().settings_for("t", "c"), 0.0)
    mean, var = stats.EWMean(fading_factor=a), stats.EWVar(fading_factor=a)
    rng = random.Random(7)
    for _ in range(500):
        if rng.random() < 0.3:  # a gap of empty minutes
            k = rng.choice((1, 3, 30, 300))
            cs.tok_fill_zeros(k, a)
            for _ in range(min(k, 240)):
                mean.update(0.0)
                var.update(0.0)
        x = float(rng.choice((0, 850, 1200, 40_000, rng.randint(1, 10**6))))
        cs.tok_update(x, a)
        mean.update(x)
        var.update(x)
        assert cs.tok_mean == mean.get()
        assert cs.tok_sd() == math.sqrt(max(var.get(), 0.0))


def test_overrides_and_tenant_settings():
    cfg = DetectorConfig.from_dict({
        "runaway_reasoning": {"max_latency_s": 900},
        "tenants": {"acme": {"runaway_reasoning": {"max_latency_s": 300}}},
        "consumers": {"quiet": {"runaway_reasoning": {"enabled": False}}}})
    assert cfg.settings_for("x", "y").runaway_reasoning.max_latency_s == 900
    assert cfg.settings_for("acme", "y").runaway_reasoning.max_latency_s == 300
    assert not cfg.settings_for("acme", "quiet").runaway_reasoning.enabled
    assert cfg.settings_for("acme", "quiet").runaway_reasoning.max_latency_s == 300
    big = {"latency_ms": 1_000_000, "output_tokens": 30_000, "reasoning_tokens": 29_000}
    evs = [event(0, T0, "quiet", **big), event(1, T0 + 1, "loud", **big)]
    assert [f.consumer for f in run(evs, Engine(cfg))] == ["loud"]


@pytest.mark.parametrize("bad, needle", [
    ({"token_spike": {"nope": 1}}, "token_spike.nope: unknown key"),
    ({"nope": {}}, "nope: unknown key"),
    ({"retry_storm": {"min_fail_share": 2}}, "retry_storm.min_fail_share: must be between"),
    ({"failure_spike": {"warmup_calls": "x"}}, "failure_spike.warmup_calls: expected an integer"),
    ({"agent_loop": {"enabled": 1}}, "agent_loop.enabled: expected true or false"),
    ({"tenants": {"a": {"bogus": {}}}}, "tenants.a.bogus: unknown detector"),
    ({"engine": {"evict_idle_s": -1}}, "engine.evict_idle_s: must be > 0"),
    ({"runaway_reasoning": {"young_min_calls": 0}},
     "runaway_reasoning.young_min_calls: must be >= 1"),
    ({"failure_spike": {"min_window_s": -1}}, "failure_spike.min_window_s: must be >= 0"),
    ({"retry_storm": {"reopen_s": -5}}, "retry_storm.reopen_s: must be >= 0"),
    ({"token_spike": {"regrow_ratio": 0.5}}, "token_spike.regrow_ratio: must be 0"),
])
def test_config_errors(bad, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        DetectorConfig.from_dict(bad)


def test_scoring_on_synthetic_anomalies():
    s = Synth(seed=11, hours=3, consumers=30)
    fs = [f.to_json_dict() for f in run(s.events())]
    rep = score(s.labels, fs, consumer_hours=90)
    assert "retry_storm" in format_report(rep)
    for kind in ("runaway_reasoning", "retry_storm", "agent_loop"):
        assert rep["kinds"][kind]["recall"] == 1.0, (kind, rep["missed"])
    # a finding shows the bar its observed value passed (an SRE reads "why"
    # from the two): never a threshold above the observation
    below = [f["summary"] for f in fs if f["revision"] == 0
             and f["observed"] < f["threshold"] * (1 - 1e-9)]
    assert below == []
    assert {f["kind"] for f in fs} >= {"runaway_reasoning", "retry_storm", "failure_spike"}


def test_scoring_weak_labels_and_side_effects():
    lab = {"scope": "consumer", "subject": "a", "consumer": "a", "model": "m",
           "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:10:00Z"}
    labels = [dict(lab, label_id="L1", kind="token_spike", weak=True),
              dict(lab, label_id="L2", kind="retry_storm")]

    def f(fid: str, kind: str) -> dict:
        return {"finding_id": fid, "kind": kind, "scope": "consumer", "subject": "a",
                "consumer": "a", "revision": 0, "detected_at": "2026-01-01T00:01:00Z"}

    rep = score(labels, [f("f1", "token_spike"), f("f2", "failure_spike"),
                         f("f3", "retry_storm"), f("f4", "agent_loop")], consumer_hours=10)
    k = rep["kinds"]
    # ... and a retry storm during a failure spike of the consumer, whose
    # clients retry: explained; another consumer's failure spike explains nothing
    spike = dict(lab, label_id="L3", kind="failure_spike")
    other = dict(spike, subject="b", consumer="b")
    for labs, want in (([spike], (1, 0)), ([other], (0, 1)), ([], (0, 1))):
        rs = score(labs, [f("f5", "retry_storm")], consumer_hours=10)["kinds"]["retry_storm"]
        assert (rs["explained"], rs["false_positives"]) == want, labs
    # a weak label is neither a miss nor a hit; a finding on it is explained
    assert k["token_spike"]["labels"] == 0 and k["token_spike"]["weak_labels"] == 1
    assert k["token_spike"]["explained"] == 1 and k["token_spike"]["false_positives"] == 0
    # a failure spike during a retry storm is explained, the storm is detected
    assert k["failure_spike"]["explained"] == 1 and k["retry_storm"]["recall"] == 1.0
    # a primary kind with no label of its own is a false finding
    assert k["agent_loop"]["false_positives"] == 1
