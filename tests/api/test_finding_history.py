"""GET /v1/findings/{id}: the history of one episode (auth off: no auth file)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient

from api.app import create_app
from api.service import build_service
from api.settings import load_settings
from detectors.finding import Finding

T0 = datetime(2026, 1, 5, 10, tzinfo=UTC)


def test_history_and_404(store, chdb_dir):
    revs = [Finding.new(kind="retry_storm", severity="critical", scope="consumer", subject="s",
                        first_event_ts=T0, detected_at=T0, observed=10 * (i + 1), baseline=1,
                        threshold=8, revision=i, status="resolved" if i == 2 else "firing")
            for i in range(3)]
    store.write([], [], revs)
    svc = build_service(load_settings(data_dir=chdb_dir), with_alerting=False, state_scope=None)
    with TestClient(create_app(svc)) as c:
        doc = c.get(f"/v1/findings/{revs[0].finding_id}").json()
        assert [f["revision"] for f in doc["findings"]] == [0, 1, 2]
        assert doc["findings"][-1]["status"] == "resolved"
        assert c.get("/v1/findings/nope").status_code == 404


def test_consumer_view_shows_detector_baselines(store, chdb_dir):
    import json
    from datetime import timedelta

    svc = build_service(load_settings(data_dir=chdb_dir), with_alerting=False, state_scope=None)
    events = [json.dumps({"event_id": f"b{i}", "ts": (T0 + timedelta(seconds=30 * i)).isoformat(),
                          "consumer": "kb-bot", "model": "gpt-4o-mini", "status": 200,
                          "input_tokens": 800, "output_tokens": 200, "latency_ms": 900})
              for i in range(120)]
    with TestClient(create_app(svc)) as c:
        r = c.post("/v1/events", content="\n".join(events),
                   headers={"Content-Type": "application/x-ndjson"})
        assert r.json()["accepted"] == 120
        doc = c.get("/v1/consumers/kb-bot").json()
    assert doc["baselines"], doc
    base = doc["baselines"][0]
    assert base["models"]["gpt-4o-mini"]["calls_seen"] > 0
    assert base["tokens_per_minute"]["minutes"] > 0
