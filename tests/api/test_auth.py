"""Bearer tokens and roles on every endpoint: no token, a wrong token, each role."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import Auth, build_auth, hash_token, parse_tokens
from api.routes import GatewayFastPath
from api.service import build_service
from api.settings import load_settings

TOKENS = {"gateway": "gw-Zm9vYmFy", "analyst": "an-YmF6cXV4", "ingest": "in-cXV1eA",
          "admin": "ad-c2VjcmV0"}
WRONG = "not-a-configured-token"

EVENT = {"event_id": "auth-1", "ts": "2026-01-05T10:00:00Z", "consumer": "web",
         "model": "gpt-4o", "status": 200, "input_tokens": 10, "output_tokens": 5}

# (method, path, json body, role needed)
ENDPOINTS: list[tuple[str, str, Any, str]] = [
    ("GET", "/v1/blocklist", None, "gateway"),
    ("GET", "/v1/check?consumer=web", None, "gateway"),
    ("GET", "/v1/check", None, "gateway"),
    ("POST", "/v1/blocks", {"value": "auth-victim", "reason": "test", "ttl": "1m"}, "admin"),
    ("DELETE", "/v1/blocks/consumer/nobody", None, "admin"),
    ("GET", "/v1/policy", None, "admin"),
    ("GET", "/v1/blocks", None, "analyst"),
    ("GET", "/v1/findings", None, "analyst"),
    ("GET", "/v1/alerts", None, "analyst"),
    ("GET", "/v1/consumers/web", None, "analyst"),
    ("POST", "/v1/query", {"sql": "SELECT 1"}, "analyst"),
    ("POST", "/v1/events", [EVENT], "ingest"),
]
IDS = [f"{m} {p}" for m, p, _, _ in ENDPOINTS]


def write_auth_file(path: Path) -> str:
    lines = []
    for role, tok in TOKENS.items():
        lines += ["[[tokens]]", f'name = "{role}-token"', f'roles = ["{role}"]',
                  f'sha256 = "{hash_token(tok)}"', ""]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(params=["fast_path", "fastapi_only"])
def client(request: pytest.FixtureRequest, store: Any, chdb_dir: str,
           tmp_path: Path) -> Iterator[TestClient]:
    auth_file = write_auth_file(tmp_path / "auth.toml")
    svc = build_service(load_settings(data_dir=chdb_dir, auth_file=auth_file), state_scope=None)
    app = create_app(svc)
    if request.param == "fastapi_only":  # the gateway GETs through FastAPI's routes
        app.user_middleware = [m for m in app.user_middleware if m.cls is not GatewayFastPath]
    try:
        with TestClient(app) as c:
            yield c
    finally:
        svc.close()


def call(c: TestClient, method: str, path: str, body: Any, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return c.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body", "role"), ENDPOINTS, ids=IDS)
def test_no_token_is_401_with_challenge(client: TestClient, method: str, path: str, body: Any,
                                        role: str) -> None:
    r = call(client, method, path, body, None)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path", "body", "role"), ENDPOINTS, ids=IDS)
def test_wrong_token_is_401(client: TestClient, method: str, path: str, body: Any,
                            role: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        r = call(client, method, path, body, WRONG)
    assert r.status_code == 401, r.text
    assert "invalid_token" in r.headers["www-authenticate"]
    assert WRONG not in caplog.text  # tokens are never logged
    # another scheme, or an empty bearer, is no better
    r = client.request(method, path, json=body, headers={"Authorization": f"Basic {WRONG}"})
    assert r.status_code == 401
    r = client.request(method, path, json=body, headers={"Authorization": "Bearer "})
    assert r.status_code == 401


@pytest.mark.parametrize(("method", "path", "body", "role"), ENDPOINTS, ids=IDS)
@pytest.mark.parametrize("who", list(TOKENS))
def test_each_role(client: TestClient, method: str, path: str, body: Any, role: str,
                   who: str) -> None:
    r = call(client, method, path, body, TOKENS[who])
    if who == role or who == "admin":
        assert r.status_code not in (401, 403), (who, r.status_code, r.text)
        assert r.status_code < 500, r.text
    else:
        assert r.status_code == 403, (who, r.status_code, r.text)
        assert "insufficient_scope" in r.headers["www-authenticate"]


def test_blocked_consumer_answers_403_with_reason_for_gateway(client: TestClient) -> None:
    """A 403 from /v1/check for a *blocked caller* is told apart from a role
    error by its body and X-Tokenward-Reason header."""
    r = call(client, "POST", "/v1/blocks", {"value": "bad-app", "reason": "retry storm",
                                            "ttl": 60}, TOKENS["admin"])
    assert r.status_code == 201 and r.json()["actor"] == "admin:admin-token"
    r = call(client, "GET", "/v1/check?consumer=bad-app", None, TOKENS["gateway"])
    assert r.status_code == 403 and r.json()["allowed"] is False
    assert r.headers["x-tokenward-reason"] == "consumer blocked: retry storm"


def test_open_endpoints(client: TestClient) -> None:
    for path in ("/healthz", "/metrics", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_auth_off_allows_everything_and_warns(store: Any, chdb_dir: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.auth"):
        svc = build_service(load_settings(data_dir=chdb_dir), with_alerting=False,
                            state_scope=None)
        app = create_app(svc)
    assert "UNAUTHENTICATED" in caplog.text
    with TestClient(app) as c:
        for method, path, body, _ in ENDPOINTS:
            r = call(c, method, path, body, None)
            assert r.status_code not in (401, 403), (path, r.text)
        r = call(c, "POST", "/v1/blocks", {"value": "x", "reason": "r"}, None)
        assert r.json()["actor"] == "admin:anonymous"
    svc.close()


def test_auth_file_errors(tmp_path: Path) -> None:
    h = hash_token("t")
    cases = [
        ({"tokens": [{"name": "a", "role": "root", "sha256": h}]}, "unknown role"),
        ({"tokens": [{"name": "a", "role": "admin"}]}, "sha256"),
        ({"tokens": [{"name": "a", "role": "admin", "sha256": "abc"}]}, "64-hex"),
        ({"tokens": [{"name": "a", "role": "admin", "token": "clear"}]}, "never the token"),
        ({"tokens": [{"role": "admin", "sha256": h}]}, "'name' is required"),
        ({"tokens": [{"name": "a", "sha256": h}]}, "role"),
        ({"tokens": [{"name": "a", "role": "admin", "sha256": h},
                     {"name": "a", "role": "gateway", "sha256": hash_token("u")}]}, "duplicate"),
        ({"token": []}, "unknown key"),
    ]
    for doc, msg in cases:
        with pytest.raises(ValueError, match=msg):
            parse_tokens(doc)
    with pytest.raises(ValueError, match="twice"):
        Auth(parse_tokens({"tokens": [{"name": "a", "role": "admin", "sha256": h},
                                      {"name": "b", "role": "admin", "sha256": h}]}))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[tokens]\n")
    with pytest.raises(SystemExit, match="auth file"):
        build_auth(str(bad))


def test_roles_list_and_admin_implies_all() -> None:
    auth = Auth(parse_tokens({"tokens": [
        {"name": "multi", "roles": ["gateway", "ingest"], "sha256": hash_token("m")},
        {"name": "root", "role": "admin", "sha256": hash_token("r")}]}))
    m = auth.authenticate("Bearer m")
    assert m is not None and m.has("gateway") and m.has("ingest") and not m.has("analyst")
    r = auth.authenticate("bearer r")
    assert r is not None and all(r.has(x) for x in ("gateway", "analyst", "ingest", "admin"))
