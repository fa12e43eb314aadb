"""Block list, check, manual blocks, findings, consumers, query: behaviour
and input validation (auth is off here; tests/api/test_auth.py covers roles)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alerting.blocklist import BlockList
from api.app import create_app
from api.routes import GatewayFastPath
from api.service import build_service
from api.settings import load_settings
from detectors.finding import Finding


@pytest.fixture(params=["fast_path", "fastapi_only"])
def app_client(request: pytest.FixtureRequest, store: Any,
               chdb_dir: str) -> Iterator[tuple[Any, TestClient]]:
    svc = build_service(load_settings(data_dir=chdb_dir), with_alerting=False, state_scope=None)
    app = create_app(svc)
    if request.param == "fastapi_only":
        app.user_middleware = [m for m in app.user_middleware if m.cls is not GatewayFastPath]
    with TestClient(app) as c:
        yield app, c
    svc.close()


@pytest.fixture
def client(app_client: tuple[Any, TestClient]) -> TestClient:
    return app_client[1]


def block(c: TestClient, value: str, scope: str = "consumer", **kw: Any) -> Any:
    return c.post("/v1/blocks", json={"scope": scope, "value": value, "reason": "test", **kw})


def test_blocklist_etag_304(client: TestClient) -> None:
    r = client.get("/v1/blocklist")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
    doc, etag = r.json(), r.headers["etag"]
    assert doc["entries"] == [] and isinstance(doc["version"], int) and doc["generated_at"]
    r = client.get("/v1/blocklist", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert client.get("/v1/blocklist", headers={"If-None-Match": f'W/{etag}, "x"'}
                      ).status_code == 304
    assert client.get("/v1/blocklist", headers={"If-None-Match": '"stale"'}).status_code == 200
    assert block(client, "app-1", ttl="10m", finding_id="f-1").status_code == 201
    r = client.get("/v1/blocklist", headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"] != etag
    doc2 = r.json()
    assert doc2["version"] > doc["version"]
    assert doc2["entries"] == [{"scope": "consumer", "value": "app-1", "reason": "test",
                                "finding_id": "f-1", "expires_at": doc2["entries"][0]
                                ["expires_at"]}]
    exp = datetime.fromisoformat(doc2["entries"][0]["expires_at"].replace("Z", "+00:00"))
    assert timedelta(minutes=9) < exp - datetime.now(UTC) <= timedelta(minutes=10)


def test_check_query_and_headers(client: TestClient) -> None:
    block(client, "bad-app")
    block(client, "bad-user", scope="user")
    block(client, "203.0.113.9", scope="ip", ttl=60)
    assert client.get("/v1/check?consumer=good").json() == {"allowed": True}
    r = client.get("/v1/check?consumer=bad-app")
    assert r.status_code == 403
    assert r.json() == {"allowed": False, "scope": "consumer", "value": "bad-app",
                        "reason": "test", "finding_id": "", "expires_at": None}
    assert r.headers["x-tokenward-reason"] == "consumer blocked: test"
    assert r.headers["x-tokenward-scope"] == "consumer"
    for headers in ({"X-Consumer": "bad-app"}, {"X-Tokenward-Consumer": "bad-app"},
                    {"X-User": "bad-user"}, {"X-Tokenward-User": "bad-user"},
                    {"X-Real-IP": "203.0.113.9"}, {"X-Tokenward-IP": "203.0.113.9"},
                    {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}):
        assert client.get("/v1/check", headers=headers).status_code == 403, headers
    # an empty query value (nginx passing an unset variable) falls back to the header
    assert client.get("/v1/check?consumer=", headers={"X-Consumer": "bad-app"}
                      ).status_code == 403
    # the query wins over the header
    assert client.get("/v1/check?consumer=good", headers={"X-Consumer": "bad-app"}
                      ).status_code == 200
    assert client.get("/v1/check", headers={"X-Forwarded-For": "10.0.0.1, 203.0.113.9"}
                      ).status_code == 200
    # percent-encoded identity
    block(client, "team/app é")
    assert client.get("/v1/check", params={"consumer": "team/app é"}).status_code == 403


def test_check_bad_params_are_422(client: TestClient) -> None:
    assert client.get("/v1/check?consumer=" + "x" * 600).status_code == 422
    assert client.get("/v1/check?ip=" + "1" * 100).status_code == 422
    # unknown or repeated parameters go to the full route (which ignores extras)
    assert client.get("/v1/check?consumer=a&foo=1").status_code == 200


def test_manual_block_unblock_and_validation(client: TestClient) -> None:
    r = block(client, "app-2", ttl="2h", tenant="acme")
    assert r.status_code == 201
    doc = r.json()
    assert doc["tenant"] == "acme" and doc["actor"] == "admin:anonymous" and not doc["dry_run"]
    assert block(client, "app-3", dry_run=True).json()["dry_run"] is True
    assert client.get("/v1/check?consumer=app-3").status_code == 200
    listed = client.get("/v1/blocks").json()
    assert [e["value"] for e in listed["entries"]] == ["app-2"]
    r = client.delete("/v1/blocks/consumer/app-2", params={"reason": "false positive"})
    assert r.status_code == 200 and r.json()["unblocked"] is True
    assert client.delete("/v1/blocks/consumer/app-2").status_code == 404
    # a value with a slash goes through the path
    block(client, "team/app")
    assert client.delete("/v1/blocks/consumer/team/app").status_code == 200
    for bad in ({"value": "x", "reason": "r", "ttl": "10x"}, {"value": "x", "reason": "r",
                "scope": "model"}, {"value": "", "reason": "r"}, {"value": "x"},
                {"value": "x", "reason": "r", "ttl": -5}):
        assert client.post("/v1/blocks", json=bad).status_code == 422, bad
    assert client.delete("/v1/blocks/tenant/x").status_code == 422


def test_allowlisted_is_409(app_client: tuple[Any, TestClient], store: Any) -> None:
    app, c = app_client
    app.state.blocklist = BlockList(store, allowlist={"consumer": ["health-probe"]})
    r = block(c, "health-probe")
    assert r.status_code == 409 and "allowlisted" in r.json()["detail"]


def _finding(subject: str, kind: str = "retry_storm", status: str = "firing",
             at: datetime | None = None) -> Finding:
    at = at or datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    f = Finding.new(kind=kind, severity="critical", scope="consumer", subject=subject,
                    tenant="acme", consumer=subject, model="gpt-4o", first_event_ts=at,
                    detected_at=at, observed=40, baseline=1.5, threshold=8,
                    evidence={"event_ids": ["e1", "e2"]}, summary="same request 40 times")
    return f.model_copy(update={"status": status})


def test_findings_filters_and_validation(client: TestClient, store: Any) -> None:
    t = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    store.write([], [], [_finding("a", at=t), _finding("b", "token_spike", at=t),
                         _finding("c", status="resolved", at=t + timedelta(hours=1))])
    doc = client.get("/v1/findings").json()
    assert len(doc["findings"]) == 3
    f = doc["findings"][0]
    assert f["subject"] == "c" and f["evidence"] == {"event_ids": ["e1", "e2"]}
    assert f["detected_at"].startswith("2026-01-05T11:00:00")
    assert [x["subject"] for x in client.get("/v1/findings?kind=retry_storm&status=firing")
            .json()["findings"]] == ["a"]
    assert [x["subject"] for x in client.get("/v1/findings?consumer=b").json()["findings"]] \
        == ["b"]
    assert len(client.get("/v1/findings?tenant=acme&limit=2").json()["findings"]) == 2
    assert client.get("/v1/findings?tenant=other").json()["findings"] == []
    assert [x["subject"] for x in client.get("/v1/findings",
            params={"since": "2026-01-05T10:30:00Z"}).json()["findings"]] == ["c"]
    for bad in ("limit=0", "limit=abc", "kind=nonsense", "status=open", "since=yesterday"):
        assert client.get(f"/v1/findings?{bad}").status_code == 422, bad


def test_consumer_usage(client: TestClient) -> None:
    evs = [{"event_id": f"cu-{i}", "ts": f"2026-01-05T10:{i:02d}:00Z", "consumer": "svc-a",
            "model": "gpt-4o" if i % 2 else "gpt-4o-mini", "status": 500 if i == 3 else 200,
            "input_tokens": 100, "output_tokens": 50} for i in range(10)]
    assert client.post("/v1/events", json=evs).json()["accepted"] == 10
    block(client, "svc-a", ttl=60)
    doc = client.get("/v1/consumers/svc-a").json()
    by = {u["model"]: u for u in doc["usage"]}
    assert by["gpt-4o"]["requests"] == 5 and by["gpt-4o"]["errors"] == 1
    assert by["gpt-4o"]["input_tokens"] == 500 and by["gpt-4o"]["cost"] > 0
    assert doc["window_end"].startswith("2026-01-05T10:09")
    assert doc["block"]["value"] == "svc-a" and isinstance(doc["baselines"], list)
    empty = client.get("/v1/consumers/nobody").json()
    assert empty["usage"] == [] and empty["block"] is None


def test_query_read_only(client: TestClient) -> None:
    r = client.post("/v1/query", json={"sql": "SELECT 1 AS one, 'x' AS s"})
    assert r.status_code == 200 and r.json() == {"columns": ["one", "s"], "rows": [[1, "x"]],
                                                 "truncated": False}
    r = client.post("/v1/query", json={"sql": "SELECT number FROM numbers(5)", "max_rows": 2})
    assert r.json()["rows"] == [[0], [1]] and r.json()["truncated"] is True
    for sql in ("DROP TABLE tokenward.blocks", "SELECT 1; SELECT 2",
                "INSERT INTO tokenward.blocks SELECT * FROM tokenward.blocks",
                "SELECT * FROM no_such_table"):
        r = client.post("/v1/query", json={"sql": sql})
        assert r.status_code == 400, sql
    # readonly is enforced by the engine too, not only by the statement check
    r = client.post("/v1/query", json={"sql": "SELECT * FROM url('http://x', CSV, 'a Int8') "
                                       "SETTINGS readonly = 0"})
    assert r.status_code == 400
    assert client.post("/v1/query", json={}).status_code == 422


def test_alerts_without_alerting_layer(client: TestClient) -> None:
    assert client.get("/v1/alerts").json() == {"enabled": False, "alerts": []}
    assert client.get("/v1/policy").status_code == 404


def test_openapi_lists_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/blocklist", "/v1/check", "/v1/blocks", "/v1/blocks/{scope}/{value}",
              "/v1/findings", "/v1/alerts", "/v1/consumers/{consumer_id}", "/v1/query"):
        assert p in paths, p
    assert json.dumps(paths["/v1/check"]).count("X-Tokenward-Reason") >= 1
