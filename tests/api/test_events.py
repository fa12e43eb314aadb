"""HTTP ingest (POST /v1/events), health, readiness and metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import build_service
from api.settings import load_settings


@pytest.fixture
def client(store, chdb_dir):
    svc = build_service(load_settings(data_dir=chdb_dir), with_alerting=False, state_scope=None)
    with TestClient(create_app(svc)) as c:
        yield c


def ev(i, **kw):
    d = {"event_id": f"h-{i}", "ts": "2026-01-05T10:00:00Z", "consumer": "web", "model": "gpt-4o",
         "status": 200, "input_tokens": 10, "output_tokens": 5}
    d.update(kw)
    return d


def test_json_array_answers_per_event(client):
    body = [ev(1), ev(2, status="bad"), ev(3), {"event_id": "h-4"}, ev(1)]
    r = client.post("/v1/events", json=body)
    assert r.status_code == 200
    doc = r.json()
    assert (doc["accepted"], doc["duplicates"], doc["rejected"]) == (2, 1, 2)
    st = [(x["index"], x["status"], x["reason"]) for x in doc["results"]]
    assert st == [(0, "accepted", None), (1, "rejected", "invalid_type"), (2, "accepted", None),
                  (3, "rejected", "missing_field"), (4, "duplicate", None)]
    assert "status" in doc["results"][1]["detail"]


def test_ndjson_and_single_object(client):
    nd = "\n".join(json.dumps(ev(i)) for i in range(10, 15)) + "\nnot json\n"
    r = client.post("/v1/events", content=nd, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 200 and r.json()["accepted"] == 5 and r.json()["rejected"] == 1
    r = client.post("/v1/events", json=ev(20))
    assert r.json()["accepted"] == 1
    # replaying the same request stores nothing again
    r = client.post("/v1/events", json=ev(20))
    assert r.json()["duplicates"] == 1 and r.json()["accepted"] == 0


def test_gateway_format_via_query_param(client):
    # an OpenAI chat.completion object with its usage block
    body = {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1767607200,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
    r = client.post("/v1/events?format=openai", json=[body])
    doc = r.json()
    assert r.status_code == 200, doc
    assert doc["results"][0]["status"] in ("accepted", "rejected")  # consumer may be missing
    if doc["results"][0]["status"] == "rejected":
        assert doc["results"][0]["reason"] == "missing_field"


def test_bad_bodies_get_clear_errors(client):
    assert client.post("/v1/events", content=b"").status_code == 400
    r = client.post("/v1/events", content=b"[1, 2", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    big = b"[" + b"1," * (9 * 1024 * 1024) + b"1]"
    assert client.post("/v1/events", content=big).status_code == 413
    # the service still works afterwards
    assert client.post("/v1/events", json=[ev(99)]).json()["accepted"] == 1


def test_health_ready_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["storage"] == "ok"
    client.post("/v1/events", json=[ev(50), ev(51, status="x")])
    m = client.get("/metrics").text
    assert 'tokenward_events_stored_total{source="http"}' in m
    assert 'tokenward_events_rejected_total{reason="invalid_type",source="http"} 1.0' in m
    assert "tokenward_batch_seconds_bucket" in m
