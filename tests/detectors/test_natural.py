"""The evaluation's weak labels for the normal traffic's own anomalies
(``bench/natural.py``)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.event import UsageEvent

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from natural import natural_labels

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ev(i: int, s: float, consumer: str = "c", **kw) -> UsageEvent:
    kw.setdefault("input_tokens", 1000)
    kw.setdefault("output_tokens", 500)
    return UsageEvent.model_validate(dict(event_id=f"e{consumer}{i}", ts=T0 + timedelta(seconds=s),
                                          consumer=consumer, model="o3-mini", status=200, **kw))


def steady(consumer: str, n: int = 300, **kw) -> list[UsageEvent]:
    return [ev(i, 20.0 * i, consumer, **kw) for i in range(n)]


def test_steady_traffic_has_no_natural_anomaly():
    assert natural_labels(steady("a") + steady("b", reasoning_tokens=300)) == []


def test_surge_of_a_consumer_is_a_weak_token_spike_label_of_its_own():
    evs = steady("a") + steady("b")
    # b: 80 calls of 6k tokens in two minutes (240k tokens a minute vs 4.5k)
    evs += [ev(1000 + k, 4000.0 + 1.5 * k, "b", input_tokens=6000) for k in range(80)]
    labs = natural_labels(sorted(evs, key=lambda e: e.ts))
    assert {(lab["kind"], lab["consumer"], lab["weak"]) for lab in labs} == {
        ("token_spike", "b", True)}
    [lab] = labs
    assert lab["start"] <= "2026-01-01T01:06:40Z" <= lab["end"]


def test_runaway_is_extreme_for_the_consumer_and_past_a_guardrail():
    evs = steady("a", reasoning_tokens=300)
    evs.append(ev(900, 6001.0, "a", latency_ms=650_000, reasoning_tokens=8000,
                  output_tokens=8200))  # 27x, > 600 s
    evs.append(ev(901, 6002.0, "a", finish_reason="length", reasoning_tokens=7000,
                  output_tokens=7100))  # 23x, the reasoning budget hit
    evs.append(ev(902, 6003.0, "a", reasoning_tokens=12_000, output_tokens=12_500))  # 40x
    evs.append(ev(903, 6004.0, "a", reasoning_tokens=3_000, output_tokens=3_500))  # 10x: no
    # 700 s but ordinary thinking for this consumer: slow, not runaway
    evs.append(ev(904, 6005.0, "a", latency_ms=700_000, reasoning_tokens=800))
    labs = natural_labels(evs)
    assert sorted(lab["variant"] for lab in labs) == ["budget", "duration", "tokens"]
    assert all(lab["kind"] == "runaway_reasoning" and lab["weak"] for lab in labs)
