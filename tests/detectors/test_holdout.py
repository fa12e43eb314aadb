"""Checks of the held-out traffic generator itself (tests/detectors/holdout.py).

It reads the real traces at generation time; CI has no copy of them, so this
module is skipped where the folder is missing (the generator is bench-only).
"""

from __future__ import annotations

import bisect
from datetime import datetime

import pytest

from ingest.event import Accepted, validate_event
from tests.detectors.holdout import Holdout, data_dir

pytestmark = pytest.mark.skipif(
    not data_dir().exists(),
    reason=f"{data_dir()}: trace data not present (bench-only generator)")

LABEL_FIELDS = ("label_id", "kind", "scope", "subject", "consumer", "tenant", "model",
                "start", "end")
KINDS = ("runaway_reasoning", "retry_storm", "failure_spike", "token_spike", "cost_spike",
         "agent_loop", "context_bloat", "budget_exceeded", "cache_opportunity")


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def run() -> Holdout:
    h = Holdout(seed=3, hours=2.5, consumers=45)
    h.events()
    return h


def test_deterministic_for_a_seed(run: Holdout) -> None:
    again = Holdout(seed=3, hours=2.5, consumers=45)
    assert again.events() == run.events()
    assert again.labels == run.labels
    other = Holdout(seed=4, hours=2.5, consumers=45)
    assert other.events()[:500] != run.events()[:500]


def test_events_valid_sorted_and_lean(run: Holdout) -> None:
    evs = run.events()
    assert len(evs) > 10_000
    ts = [e["ts"] for e in evs]
    assert ts == sorted(ts)
    assert all(t.endswith("Z") for t in ts)
    assert len({e["event_id"] for e in evs}) == len(evs)
    for e in evs[::7]:
        assert isinstance(validate_event(e), Accepted), e
        assert None not in e.values(), e
        assert "cost" not in e
    ok = [e for e in evs if e["status"] == 200]
    plain = [e for e in ok if e["model"] in ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")]
    assert plain and all(not e.get("reasoning_tokens") for e in plain)
    assert any(e.get("reasoning_tokens") for e in ok)
    assert any(e["status"] == 0 and e.get("error") == "timeout" for e in evs)
    assert any(e.get("attempt") == 1 for e in evs)
    assert any(e.get("cached_input_tokens") for e in ok)
    assert any(e.get("finish_reason") == "tool_calls" and e.get("trace_id") for e in ok)
    assert len({e["model"] for e in evs}) >= 5
    assert len({e["tenant"] for e in evs}) >= 3
    # background failures are a few %, not a failure storm
    assert 0.005 < sum(e["status"] != 200 for e in evs) / len(evs) < 0.15


def test_labels_in_the_scoring_format(run: Holdout) -> None:
    labs = run.labels
    assert labs
    assert len({lab["label_id"] for lab in labs}) == len(labs)
    first = _ts(run.events()[0]["ts"])
    for lab in labs:
        for f in LABEL_FIELDS:
            assert f in lab, (f, lab)
        assert lab["kind"] in KINDS
        assert _ts(lab["start"]) <= _ts(lab["end"])
        assert _ts(lab["start"]) >= first + 3600, lab   # the first hour is left alone
        assert lab["n_events"] > 0
        if lab["scope"] == "model":
            assert lab["kind"] == "failure_spike" and lab["consumer"] is None
            assert lab["subject"] == lab["model"]
        elif lab["scope"] == "session":
            assert lab["kind"] in ("agent_loop", "context_bloat")
            assert lab["consumer"] and lab["subject"] != lab["consumer"]
        else:
            assert lab["scope"] == "consumer" and lab["subject"] == lab["consumer"]
        if lab["kind"] in ("token_spike", "cost_spike"):
            assert lab["effect"] > 0 and lab["weak"] == (lab["effect"] < 3)


def test_every_label_has_its_events(run: Holdout) -> None:
    evs = run.events()
    by_consumer: dict[str, list[float]] = {}
    by_model: dict[str, list[tuple[float, int]]] = {}
    sessions: set[str] = set()
    for e in evs:
        t = _ts(e["ts"])
        by_consumer.setdefault(e["consumer"], []).append(t)
        by_model.setdefault(e["model"], []).append((t, e["status"]))
        for k in ("trace_id", "session_id"):
            if k in e:
                sessions.add(e[k])
    for lab in run.labels:
        s, end = _ts(lab["start"]) - 0.001, _ts(lab["end"]) + 0.001
        if lab["scope"] == "model":
            fails = [t for t, st in by_model[lab["subject"]] if s <= t <= end and st != 200]
            assert len(fails) >= 10, lab
            continue
        ts = by_consumer[lab["consumer"]]
        n = bisect.bisect_right(ts, end) - bisect.bisect_left(ts, s)
        assert n >= 1, lab
        if lab["scope"] == "session":
            assert lab["subject"] in sessions, lab


def test_missing_data_names_the_path(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "nope"
    monkeypatch.setenv("TOKENWARD_TRACE_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Holdout(seed=1, hours=1, consumers=3).events()
