"""Usage event v1 validation: every rejection reason, normalisation rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.event import MAX_EVENT_BYTES, REJECT_REASONS, json_schema, parse_event, validate_event

BASE = {
    "event_id": "e-1",
    "ts": "2026-01-05T10:00:00Z",
    "consumer": "svc-a",
    "model": "gpt-4o",
    "status": 200,
}


def ev(**kw):
    d = dict(BASE)
    d.update(kw)
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def test_minimal_event_gets_defaults():
    r = parse_event(ev())
    assert r.ok
    e = r.event
    assert e.tenant == "default"
    assert (e.input_tokens, e.output_tokens, e.reasoning_tokens) == (0, 0, 0)
    assert e.labels == {}
    assert not e.failed


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"a string"', "not_an_object"),
        (ev(consumer=...), "missing_field"),
        (ev(event_id=...), "missing_field"),
        (ev(ts=...), "missing_field"),
        (ev(model=...), "missing_field"),
        (ev(status=...), "missing_field"),
        (ev(status="ok"), "invalid_type"),
        (ev(input_tokens="many"), "invalid_type"),
        (ev(labels=["a"]), "invalid_type"),
        (ev(ts="yesterday"), "invalid_type"),
        (ev(input_tokens=-1), "invalid_value"),
        (ev(event_id="x" * 129), "invalid_value"),
        (ev(event_id=""), "invalid_value"),
        (ev(status=1000), "invalid_value"),
        (ev(finish_reason="exploded"), "invalid_value"),
        (ev(labels={f"k{i}": "v" for i in range(33)}), "too_many_labels"),
        (ev(labels={"k": "v" * 300}), "invalid_value"),
    ],
)
def test_rejection_reasons(raw, reason):
    r = parse_event(raw)
    assert not r.ok
    assert r.reason == reason, r.detail
    assert r.reason in REJECT_REASONS
    assert r.detail


def test_too_large():
    raw = ev(user="u" * 10, labels={"pad": "x"}, route="r" * 200)
    big = raw[:-1] + b',"x":"' + b"y" * MAX_EVENT_BYTES + b'"}'
    r = parse_event(big)
    assert not r.ok and r.reason == "too_large"
    assert len(r.raw) <= 4096  # the stored raw payload is truncated


def test_rejected_keeps_event_id_for_tracing():
    r = parse_event(ev(status="bad"))
    assert r.event_id == "e-1"


def test_timestamps_normalised_to_utc():
    assert parse_event(ev(ts="2026-01-05T12:00:00+02:00")).event.ts.isoformat() == (
        "2026-01-05T10:00:00+00:00"
    )
    # a naive timestamp is taken as UTC
    assert parse_event(ev(ts="2026-01-05T10:00:00")).event.ts.utcoffset().total_seconds() == 0


def test_reasoning_beyond_output_is_added_and_noted():
    e = parse_event(ev(output_tokens=100, reasoning_tokens=400)).event
    assert e.output_tokens == 500
    assert e.labels["tokenward.normalised"] == "reasoning_added_to_output"


def test_cached_beyond_input_is_added_and_noted():
    e = parse_event(ev(input_tokens=10, cached_input_tokens=90)).event
    assert e.input_tokens == 100
    assert "cached_added_to_input" in e.labels["tokenward.normalised"]


def test_consistent_parts_untouched():
    e = parse_event(ev(output_tokens=500, reasoning_tokens=400)).event
    assert e.output_tokens == 500 and "tokenward.normalised" not in e.labels


def test_unknown_fields_kept_as_labels_never_fatal():
    e = parse_event(ev(x_gateway_region="eu-1", nested={"a": 1})).event
    assert e.labels == {"x_gateway_region": "eu-1"}


def test_finish_reason_aliases():
    assert parse_event(ev(finish_reason="end_turn")).event.finish_reason == "stop"
    assert parse_event(ev(finish_reason="max_tokens")).event.finish_reason == "length"
    assert parse_event(ev(finish_reason="tool_use")).event.finish_reason == "tool_calls"


def test_failed_property():
    assert parse_event(ev(status=0, error="timeout")).event.failed
    assert parse_event(ev(status=429)).event.failed
    assert parse_event(ev(status=200, finish_reason="error")).event.failed
    assert not parse_event(ev(status=200)).event.failed


def test_validate_event_on_dict():
    assert validate_event(json.loads(ev())).ok
    assert validate_event([1]).reason == "not_an_object"


def test_published_schema_is_current():
    """The JSON Schema in the repo (for gateway authors) matches the model."""
    path = Path(__file__).resolve().parents[2] / "schema" / "usage-event-v1.json"
    assert json.loads(path.read_text()) == json_schema(), (
        "schema/usage-event-v1.json is stale: run `tokenward schema --out "
        "schema/usage-event-v1.json`"
    )
