"""Sink worker (queue, retries, drops, metrics), payload shapes and sink config."""

from __future__ import annotations

import json
import time

import pytest

from alerting.lifecycle import AlertBook, LifecycleConfig
from alerting.sinks import (
    AlertmanagerSink,
    RetryConfig,
    SinksConfig,
    SinkWorker,
    SlackSink,
    WebhookSink,
    sign,
    verify_signature,
)
from api.metrics import Metrics
from tests.alerting._support import Clock, RecordingSink, finding

FAST = RetryConfig(queue_size=3, max_attempts=3, backoff_s=0.01, backoff_max_s=0.02)


def notes(subject: str = "app-1", **kw):
    return AlertBook(LifecycleConfig(), clock=Clock()).apply(finding(subject=subject, **kw),
                                                             "alert only")


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_retries_with_backoff_then_delivers_and_counts():
    m = Metrics()
    sink = RecordingSink(fail=2)
    w = SinkWorker(sink, FAST, m)
    w.submit(notes())
    assert w.flush(5)
    assert sink.attempts == 3 and len(sink.notes) == 1
    assert sample(m, "tokenward_alert_sink_failures_total", sink="rec") == 2
    assert sample(m, "tokenward_alerts_sent_total", sink="rec", state="firing") == 1
    w.close()
    assert sink.closed


def test_drops_after_retry_budget_with_reason(caplog):
    m = Metrics()
    sink = RecordingSink(fail=100)
    w = SinkWorker(sink, FAST, m)
    w.submit(notes())
    assert w.flush(5)
    assert sink.attempts == 3 and sink.notes == []
    assert sample(m, "tokenward_alerts_dropped_total", sink="rec",
                  reason="retries_exhausted") == 1
    assert "retries_exhausted" in caplog.text
    w.close()


def test_permanent_error_is_not_retried():
    m = Metrics()
    sink = RecordingSink(fail=1, permanent=True)
    w = SinkWorker(sink, FAST, m)
    w.submit(notes())
    assert w.flush(5)
    assert sink.attempts == 1
    assert sample(m, "tokenward_alerts_dropped_total", sink="rec", reason="rejected") == 1
    w.close()


def test_full_queue_drops_oldest_and_never_blocks_the_caller():
    m = Metrics()
    sink = RecordingSink()
    sink.gate.clear()  # the receiver hangs
    w = SinkWorker(sink, RetryConfig(queue_size=3, max_batch=1), m)
    t0 = time.monotonic()
    w.submit(notes("first"))
    time.sleep(0.2)  # the worker took "first" and hangs in send()
    for i in range(6):
        w.submit(notes(f"s{i}"))
    assert time.monotonic() - t0 < 1.0
    assert sample(m, "tokenward_alerts_dropped_total", sink="rec", reason="queue_full") == 3
    sink.gate.set()
    assert w.flush(5)
    assert [n.labels["subject"] for n in sink.notes] == ["first", "s3", "s4", "s5"]
    w.close()


def test_close_drops_what_cannot_be_delivered():
    m = Metrics()
    sink = RecordingSink(fail=1000)
    w = SinkWorker(sink, RetryConfig(max_attempts=50, backoff_s=0.5), m)
    w.submit(notes("a"))
    w.submit(notes("b"))
    t0 = time.monotonic()
    w.close(timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert sample(m, "tokenward_alerts_dropped_total", sink="rec", reason="shutdown") == 2
    w.submit(notes("c"))  # after close: dropped, not queued
    assert sample(m, "tokenward_alerts_dropped_total", sink="rec", reason="shutdown") == 3


def test_alertmanager_payload():
    clock = Clock()
    b = AlertBook(LifecycleConfig(), clock=clock)
    f = finding(severity="warning")
    b.apply(f, "alert only")
    [u] = b.apply(f.model_copy(update={"revision": 1, "severity": "critical"}), "blocked")
    sink = AlertmanagerSink("http://am:9093/", generator_url="http://tw/v1/findings/{finding_id}")
    assert sink.endpoint == "http://am:9093/api/v2/alerts"
    old, new = sink.payload([u])
    assert old["labels"]["severity"] == "warning" and "endsAt" in old  # resolves the old labels
    assert new["labels"]["severity"] == "critical" and "endsAt" not in new
    assert new["generatorURL"] == f"http://tw/v1/findings/{f.finding_id}"
    clock.advance(5)
    [r] = b.apply(f.model_copy(update={"revision": 2, "status": "resolved"}))
    [pr] = sink.payload([r])
    assert pr["endsAt"].endswith("Z") and pr["startsAt"] < pr["endsAt"]
    sink.close()


def test_webhook_body_and_signature():
    sink = WebhookSink("http://x/hook", "s3cret", clock=lambda: 1_800_000_000)
    n = notes()
    body, delivery = sink.body(n, 1_800_000_000)
    doc = json.loads(body)
    assert doc["sent_at"] == 1_800_000_000 and doc["delivery_id"] == delivery
    [a] = doc["alerts"]
    assert a["event"] == "firing" and a["state"] == "firing"
    assert a["finding"]["finding_id"] == n[0].finding.finding_id
    assert a["labels"]["alertname"] == "TokenwardRetryStorm"
    sig = sign(b"s3cret", body)
    assert verify_signature(b"s3cret", body, sig, now=1_800_000_010)
    assert not verify_signature(b"wrong", body, sig, now=1_800_000_010)
    assert not verify_signature(b"s3cret", body + b" ", sig, now=1_800_000_010)
    assert not verify_signature(b"s3cret", body, sig, now=1_800_009_999)  # too old
    assert sink.body(n, 1)[1] == delivery  # stable across retries
    sink.close()


def test_slack_payload_groups_and_escapes():
    b = AlertBook(LifecycleConfig(), clock=Clock())
    ns = b.apply(finding(subject="a<b>"), "blocked consumer a<b> for 10m")
    ns += b.apply(finding(subject="c", severity="warning"), "alert only")
    ns += b.apply(finding("token_spike", subject="d"), "alert only")
    p = SlackSink("http://x").payload(ns)
    assert p["text"].startswith("tokenward: [FIRING] TokenwardRetryStorm")
    assert "(+2 more)" in p["text"]
    sections = [blk["text"]["text"] for blk in p["blocks"] if blk["type"] == "section"]
    assert len(sections) == 3
    assert "a&lt;b&gt;" in sections[0] and "<b>" not in sections[0]
    assert ":red_circle:" in sections[0] and ":large_orange_circle:" in sections[1]
    contexts = [blk for blk in p["blocks"] if blk["type"] == "context"]
    assert "acme/retry_storm · 2 firing" in contexts[0]["elements"][0]["text"]


def test_sinks_config(monkeypatch):
    env = {"HOOK_SECRET": "abc", "SLACK_URL": "https://hooks.slack.com/services/T/B/X"}
    c = SinksConfig.from_dict({
        "max_attempts": 4,
        "alertmanager": [{"url": "http://am1:9093"}, {"url": "http://am2:9093"}],
        "webhook": {"url": "https://hooks.example/tw", "secret_env": "HOOK_SECRET",
                    "backoff": "2s"},
        "slack": [{"url_env": "SLACK_URL", "name": "sre-slack"}],
    }, env=env)
    assert [(s.type, s.name) for s in c.sinks] == [
        ("alertmanager", "alertmanager"), ("alertmanager", "alertmanager-1"),
        ("webhook", "webhook"), ("slack", "sre-slack")]
    assert c.sinks[2].secret == "abc" and c.sinks[2].retry.backoff_s == 2
    assert all(s.retry.max_attempts == 4 for s in c.sinks)
    assert "abc" not in repr(c)


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"webhook": [{"url": "http://x"}]}, "sinks.webhook[0]: set secret_env"),
        ({"webhook": [{"url": "http://x", "secret_env": "NOPE"}]},
         "sinks.webhook[0].secret_env: the environment variable NOPE is not set"),
        ({"slack": [{"url": "hooks.slack.com"}]}, "sinks.slack[0].url"),
        ({"alertmanager": [{"url": "http://a", "secret": "x"}]},
         "sinks.alertmanager[0]: unknown key(s) secret"),
        ({"pagerduty": []}, "sinks: unknown key(s) pagerduty"),
        ({"alertmanager": [{"url": "http://a"}, {"url": "http://b", "name": "alertmanager"}]},
         "duplicate sink name(s) alertmanager"),
        ({"max_attempts": 0}, "sinks.max_attempts: must be >= 1"),
    ],
)
def test_bad_sinks_config(cfg, needle):
    with pytest.raises(ValueError) as exc:
        SinksConfig.from_dict(cfg, env={})
    assert needle in str(exc.value)
