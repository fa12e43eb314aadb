"""The webhook and Slack sinks against real local HTTP receivers (http.server
in a thread): signature checked by the receiver, retries proven by failing
the first requests."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from alerting.blocklist import BlockList
from alerting.service import AlertingConfig, AlertingService
from alerting.sinks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SinkWorker,
    build_sink,
    verify_signature,
)
from api.metrics import Metrics
from tests.alerting._support import MemStore, finding

pytestmark = pytest.mark.integration

SECRET = "correct horse battery staple"


class Receiver:
    """Records requests; ``respond(n, headers, body) -> (status, text)``."""

    def __init__(self, respond: Callable[[int, dict[str, str], bytes], tuple[int, str]]) -> None:
        self.respond = respond
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    n = len(outer.requests) + 1
                    status, text = outer.respond(n, headers, body)
                    outer.requests.append((headers, body, status))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(respond: Callable[[int, dict[str, str], bytes], tuple[int, str]]) -> Receiver:
        r = Receiver(respond)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def service(sinks: dict[str, Any]) -> AlertingService:
    config = AlertingConfig.from_dict(
        {"sinks": {**sinks, "backoff": "0.05s", "max_attempts": 4}},
        env={"HOOK_SECRET": SECRET})
    metrics = Metrics()
    workers = [SinkWorker(build_sink(c), c.retry, metrics) for c in config.sinks.sinks]
    return AlertingService(config, BlockList(MemStore(), restore=False), workers, metrics)


def sample(svc: AlertingService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0  # type: ignore[attr-defined]


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def test_webhook_signed_and_retried(receiver: Callable[..., Receiver]) -> None:
    def respond(n: int, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        if not verify_signature(SECRET.encode(), body, headers.get(SIGNATURE_HEADER.lower())):
            return 401, "bad signature"
        if int(headers[TIMESTAMP_HEADER.lower()]) != json.loads(body)["sent_at"]:
            return 400, "timestamp mismatch"
        return (500, "try again") if n <= 2 else (200, "ok")

    rec = receiver(respond)
    svc = service({"webhook": [{"url": rec.url, "secret_env": "HOOK_SECRET"}]})
    subject = f"app-{uuid.uuid4().hex[:6]}"
    try:
        f = finding(subject=subject, at=now())
        svc.handle([f])
        assert svc.flush(10)
    finally:
        svc.close()
    assert [s for _, _, s in rec.requests] == [500, 500, 200]
    deliveries = {h[DELIVERY_HEADER.lower()] for h, _, _ in rec.requests}
    assert len(deliveries) == 1  # the same delivery id on every retry
    doc = json.loads(rec.requests[-1][1])
    [a] = doc["alerts"]
    assert (a["event"], a["state"], a["labels"]["subject"]) == ("firing", "firing", subject)
    assert a["finding"]["finding_id"] == f.finding_id and a["finding"]["kind"] == "retry_storm"
    assert a["annotations"]["action"] == f"blocked consumer {subject} for 10m"
    assert sample(svc, "tokenward_alert_sink_failures_total", sink="webhook") == 2
    assert sample(svc, "tokenward_alerts_sent_total", sink="webhook", state="firing") == 1


def test_webhook_with_the_wrong_secret_is_refused_and_dropped(
        receiver: Callable[..., Receiver]) -> None:
    rec = receiver(lambda n, h, b: (200, "ok") if verify_signature(
        b"another secret", b, h.get(SIGNATURE_HEADER.lower())) else (401, "bad signature"))
    svc = service({"webhook": [{"url": rec.url, "secret_env": "HOOK_SECRET"}]})
    try:
        svc.handle([finding(at=now())])
        assert svc.flush(10)
    finally:
        svc.close()
    assert [s for _, _, s in rec.requests] == [401]  # a 4xx is not retried
    assert sample(svc, "tokenward_alerts_dropped_total", sink="webhook", reason="rejected") == 1


def test_webhook_gives_up_after_the_retry_budget(receiver: Callable[..., Receiver]) -> None:
    rec = receiver(lambda n, h, b: (503, "down"))
    svc = service({"webhook": [{"url": rec.url, "secret_env": "HOOK_SECRET"}]})
    try:
        t0 = time.monotonic()
        svc.handle([finding(at=now())])
        assert time.monotonic() - t0 < 0.5  # handle() never waits for the receiver
        assert svc.flush(10)
    finally:
        svc.close()
    assert len(rec.requests) == 4
    assert sample(svc, "tokenward_alerts_dropped_total", sink="webhook",
                  reason="retries_exhausted") == 1


def test_slack_payload_shape(receiver: Callable[..., Receiver]) -> None:
    def respond(n: int, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        try:
            doc = json.loads(body)
        except ValueError:
            return 400, "invalid_payload"
        ok = (headers.get("content-type") == "application/json"
              and isinstance(doc.get("text"), str) and doc["text"]
              and isinstance(doc.get("blocks"), list) and 0 < len(doc["blocks"]) <= 50
              and all(b.get("type") in ("section", "context", "divider") for b in doc["blocks"])
              and all(b["text"]["type"] == "mrkdwn" and len(b["text"]["text"]) <= 3000
                      for b in doc["blocks"] if b["type"] == "section"))
        return (200, "ok") if ok else (400, "invalid_blocks")

    rec = receiver(respond)
    svc = service({"slack": [{"url": rec.url}]})
    try:
        f = finding("runaway_reasoning", subject="agent-7", model="o3", at=now())
        svc.handle([f, finding("failure_spike", scope="model", subject="o3", consumer=None,
                               at=now())])
        assert svc.flush(10)
        svc.handle([f.model_copy(update={"revision": 1, "status": "resolved"})])
        assert svc.flush(10)
    finally:
        svc.close()
    assert [s for _, _, s in rec.requests] == [200, 200]
    first = json.loads(rec.requests[0][1])
    text = "\n".join(b["text"]["text"] for b in first["blocks"] if b["type"] == "section")
    assert "*[FIRING] TokenwardRunawayReasoning*" in text and "`agent-7`" in text
    assert "*Action:* blocked consumer agent-7 for 30m" in text
    assert "*Action:* alert only" in text  # the upstream outage: never blocked
    resolved = json.loads(rec.requests[1][1])
    assert resolved["text"].startswith("tokenward: [RESOLVED] TokenwardRunawayReasoning")
