"""The traffic simulator: determinism, validity, realism and labelled anomalies."""

from __future__ import annotations

import itertools
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from ingest.event import validate_event
from ingest.simulator import SCENARIOS, SimConfig, Simulation, labels, load_profile, simulate


@pytest.fixture(scope="module")
def run() -> tuple[list[dict[str, Any]], Simulation]:
    sim = Simulation(SimConfig(seed=11, duration_s=5400, n_consumers=80))
    return list(sim.events()), sim


def _by_label(events: list[dict[str, Any]], sim: Simulation) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        lid = sim.anomalous_events.get(e["event_id"])
        if lid:
            out[lid].append(e)
    return out


def test_deterministic_for_a_seed() -> None:
    cfg = SimConfig(seed=4, duration_s=900, n_consumers=30)
    a = list(simulate(cfg))
    b = list(simulate(cfg))
    assert a == b and len(a) > 100
    c = list(itertools.islice(simulate(SimConfig(seed=5, duration_s=900, n_consumers=30)), 50))
    assert c != a[:50]
    assert labels(cfg) == labels(cfg)


def test_events_validate_and_are_ordered(run: tuple[list[dict[str, Any]], Simulation]) -> None:
    events, _ = run
    rejected = [r for r in map(validate_event, events) if not r.ok]
    assert rejected == []
    assert all(a["ts"] <= b["ts"] for a, b in itertools.pairwise(events))
    assert len({e["event_id"] for e in events}) == len(events)
    assert events[0]["ts"].startswith("2026-01-05T") and events[0]["ts"].endswith("Z")
    assert not any(e["labels"] for e in events)  # no ground truth leaks into events


def test_reference_profile_exact_sizes() -> None:
    evs = list(simulate(SimConfig(seed=2, duration_s=600, n_consumers=30, profile="reference",
                                  scenarios="none")))
    ok = [e for e in evs if e["status"] == 200]
    assert len(ok) > 100
    assert all(e["input_tokens"] == 2048 for e in ok)
    assert all(e["output_tokens"] == 256 and e["reasoning_tokens"] == 0 for e in ok)


def test_every_kind_is_labelled(run: tuple[list[dict[str, Any]], Simulation]) -> None:
    events, sim = run
    labs = sim.labels
    kinds = {lab["kind"] for lab in labs}
    assert kinds == {k.replace("_model", "") for k in SCENARIOS}
    assert any(lab["scope"] == "model" for lab in labs)
    ids = {e["event_id"] for e in events}
    for lab in labs:
        assert set(lab) >= {"label_id", "kind", "scope", "subject", "consumer", "tenant", "model",
                            "start", "end", "shape", "victim_size", "event_ids_sample"}
        assert lab["start"] <= lab["end"]
        assert lab["event_ids_sample"] and set(lab["event_ids_sample"]) <= ids
        assert lab["victim_size"] in ("small", "medium", "large")
    assert len({lab["victim_size"] for lab in labs}) == 3


def test_scenario_character(run: tuple[list[dict[str, Any]], Simulation]) -> None:
    events, sim = run
    by = _by_label(events, sim)
    for lab in sim.labels:
        evs = by[lab["label_id"]]
        assert len(evs) == lab["n_events"]
        kind = lab["kind"]
        if kind == "retry_storm":
            failed = sum(e["status"] != 200 for e in evs)
            assert failed >= 0.6 * len(evs)
            assert {e["consumer"] for e in evs} == {lab["consumer"]}
            if lab["variant"] == "single_hash":
                assert Counter(e["request_hash"] for e in evs).most_common(1)[0][1] >= 20
        elif kind == "runaway_reasoning":
            assert all(e["reasoning_tokens"] >= 15_000 or e["latency_ms"] > 600_000
                       for e in evs)
        elif kind == "failure_spike":
            assert all(e["status"] != 200 for e in evs)
            if lab["scope"] == "model":
                assert {e["model"] for e in evs} == {lab["subject"]}
                assert len({e["consumer"] for e in evs}) >= 3
            else:
                assert len(evs) >= 5
        elif kind == "agent_loop":
            assert {e["trace_id"] for e in evs} == {lab["subject"]}
            assert len(evs) >= 60 and sum(e["tool_calls"] or 0 for e in evs) >= 60
        elif kind == "context_bloat":
            assert {e["session_id"] for e in evs} == {lab["subject"]}
            assert max(e["input_tokens"] for e in evs) >= 60_000
        elif kind == "cache_opportunity":
            assert Counter(e["request_hash"] for e in evs).most_common(1)[0][1] >= 25
            assert all(e["cached_input_tokens"] == 0 and e["input_tokens"] >= 1024
                       for e in evs if e["status"] == 200)
        elif kind == "cost_spike":
            if lab["variant"] == "model_switch":
                assert all(e["model"] in ("claude-opus-4", "o1") for e in evs)
        elif kind == "token_spike":
            assert len(evs) >= 5


def test_normal_traffic_shape(run: tuple[list[dict[str, Any]], Simulation]) -> None:
    events, sim = run
    normal = [e for e in events if e["event_id"] not in sim.anomalous_events]
    err = sum(e["status"] != 200 for e in normal) / len(normal)
    assert 0.003 < err < 0.03
    # client retries: attempts 1-2 only, same hash as a failed call before them
    attempts = Counter(e["attempt"] for e in normal if e["attempt"])
    assert attempts and set(attempts) <= {1, 2}
    # agent depth like tau-bench, sessions kept to typical lengths
    depth = Counter(e["trace_id"] for e in normal if e["trace_id"])
    assert max(depth.values()) <= 40 and 2 <= statistics.median(depth.values()) <= 10
    assert max(e["input_tokens"] for e in normal if e["session_id"] and not e["trace_id"]) < 40_000
    # reasoning models think, but within the legitimate range
    rsn = [e for e in normal if e["reasoning_tokens"]]
    assert rsn and max(e["reasoning_tokens"] for e in rsn) < 15_000
    assert max(e["latency_ms"] for e in rsn) < 300_000
    assert any(e["cached_input_tokens"] for e in normal)
    assert {e["finish_reason"] for e in normal} >= {"stop", "length", "tool_calls", "error"}


def test_burstiness_like_profile(run: tuple[list[dict[str, Any]], Simulation]) -> None:
    events, sim = run
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        if e["event_id"] not in sim.anomalous_events:
            per[e["consumer"]][e["ts"][:16]] += 1
    minutes = sorted({e["ts"][:16] for e in events})
    peaks, empties = [], []
    for cnt in per.values():
        counts = [cnt.get(m, 0) for m in minutes]
        med = statistics.median(counts)
        if med >= 5:
            peaks.append(max(counts) / med)
            empties.append(sum(c == 0 for c in counts) / len(counts))
    assert peaks, "no busy consumer"
    # the Azure code trace peaks at ~5.6x its median minute; ours should reach that range
    ref = load_profile()["burstiness"]["azure_code"]["max_over_median"]
    assert max(peaks) >= 0.6 * ref and statistics.median(peaks) >= 1.5
    assert max(empties) > 0.0  # some busy consumers have idle minutes
    sizes = sorted(len(list(c.elements())) for c in per.values())
    assert sizes[-1] > 50 * max(1, sizes[len(sizes) // 2])  # heavy-tailed consumer sizes


def test_throughput() -> None:
    cfg = SimConfig(seed=1, duration_s=1800)
    t0 = time.perf_counter()
    n = sum(1 for _ in simulate(cfg))
    dt = time.perf_counter() - t0
    print(f"\nsimulator: {n} events in {dt:.2f} s = {n / dt:,.0f} events/s")


def test_a_runaway_call_failed_by_an_outage_is_not_labelled() -> None:
    """Runaway and outage scenarios together: a labelled runaway call that an
    outage of its model failed (no tokens, a few seconds) was a label no
    detector could see.  Such calls stay in the traffic, unlabelled; every
    labelled runaway call is answered."""
    sim = Simulation(SimConfig(seed=2, duration_s=3 * 3600, n_consumers=40,
                               scenarios=("runaway_reasoning", "failure_spike_model"),
                               episodes_per_kind=12))
    events = list(sim.events())
    kinds = {lab["label_id"]: lab["kind"] for lab in sim.labels}
    runaway = [e for e in events
               if kinds.get(sim.anomalous_events.get(e["event_id"], "")) == "runaway_reasoning"]
    assert runaway
    assert all(e["status"] == 200 and e["reasoning_tokens"] >= 15_000 for e in runaway)
    # the case is there: big reasoning calls failed during an outage of their model
    outages = [lab for lab in sim.labels if lab["scope"] == "model"]
    failed = [e for e in events if e["status"] != 200 and e["model"] in {
        lab["subject"] for lab in outages} and e["event_id"] not in sim.anomalous_events
        and e["model"] in ("o3-mini", "o4-mini", "deepseek-reasoner")]
    assert failed
    for lab in sim.labels:
        if lab["kind"] == "runaway_reasoning":
            assert lab["n_events"] == sum(
                1 for e in runaway if sim.anomalous_events[e["event_id"]] == lab["label_id"])
