from __future__ import annotations

from datetime import timedelta

from alerting.lifecycle import AlertBook, LifecycleConfig, alertname, fingerprint
from tests.alerting._support import T0, Clock, finding


def book(clock: Clock, **kw) -> AlertBook:
    return AlertBook(LifecycleConfig(**kw), clock=clock,
                     runbook_url=lambda k: f"https://rb.example/tokenward#{k}")


def test_fingerprint_is_stable_and_identifies_the_alert():
    a = finding()
    assert fingerprint(a) == fingerprint(a.model_copy(update={"revision": 4, "observed": 99}))
    # another episode (other first event) of the same behaviour: same alert
    later = finding(at=T0 + timedelta(hours=3))
    assert later.finding_id != a.finding_id and fingerprint(later) == fingerprint(a)
    assert fingerprint(finding(subject="app-2")) != fingerprint(a)
    assert fingerprint(finding(tenant="other")) != fingerprint(a)
    assert fingerprint(finding("token_spike")) != fingerprint(a)
    b1 = finding("budget_exceeded", evidence={"alert_key": "daily/cost"})
    b2 = finding("budget_exceeded", evidence={"alert_key": "monthly/cost"})
    assert fingerprint(b1) != fingerprint(b2)
    assert len(fingerprint(a)) == 16 and int(fingerprint(a), 16) >= 0
    assert alertname("runaway_reasoning") == "TokenwardRunawayReasoning"


def test_labels_and_annotations():
    clock = Clock()
    [n] = book(clock).apply(finding(model="gpt-4o", consumer="app-1"),
                            "blocked consumer app-1 for 10m")
    assert dict(n.labels) == {
        "alertname": "TokenwardRetryStorm", "severity": "critical", "tenant": "acme",
        "kind": "retry_storm", "scope": "consumer", "subject": "app-1", "consumer": "app-1",
        "model": "gpt-4o"}
    a = n.annotations
    assert a["action"] == "blocked consumer app-1 for 10m"
    assert a["runbook_url"] == "https://rb.example/tokenward#retry_storm"
    assert a["finding_id"] == n.finding.finding_id
    assert "observed 40 vs baseline 1.2 (threshold 8)" in a["description"]
    assert n.starts_at == T0 and n.ends_at is None and n.group_key == "acme/retry_storm"


def test_dedup_update_resolve_and_refire():
    clock = Clock()
    b = book(clock)
    f = finding(severity="warning")
    assert [n.event for n in b.apply(f, "alert only")] == ["firing"]
    assert b.apply(f, "alert only") == []  # duplicate (a replayed batch)
    clock.advance(5)
    [u] = b.apply(f.model_copy(update={"revision": 1, "severity": "critical"}),
                  "blocked consumer app-1 for 10m")
    assert u.event == "updated" and u.labels["severity"] == "critical"
    assert u.previous_labels is not None and u.previous_labels["severity"] == "warning"
    [u2] = b.apply(f.model_copy(update={"revision": 2, "severity": "critical", "observed": 80}))
    assert u2.previous_labels is None and u2.annotations["action"] == \
        "blocked consumer app-1 for 10m"  # the action taken is kept
    assert b.apply(f.model_copy(update={"revision": 1})) == []  # older revision
    # a resolution of another episode does not resolve this one
    other = finding(at=T0 - timedelta(hours=1), status="resolved", revision=3)
    assert b.apply(other) == []
    clock.advance(10)
    [r] = b.apply(f.model_copy(update={"revision": 3, "status": "resolved"}))
    assert r.event == "resolved" and r.state == "resolved"
    assert r.ends_at is not None and r.ends_at.timestamp() == clock.t
    assert b.apply(f.model_copy(update={"revision": 3, "status": "resolved"})) == []
    assert b.active_count() == 0
    # a reopened episode (same finding, a later revision) fires again from
    # when it came back
    back = T0 + timedelta(seconds=12)  # the clock is at T0 + 15 s
    [re] = b.apply(f.model_copy(update={"revision": 4, "updated_at": back,
                                        "evidence": {"recurrences": 1}}), "alert only")
    assert re.event == "firing" and re.starts_at == back
    [re_end] = b.apply(f.model_copy(update={"revision": 5, "status": "resolved"}))
    assert re_end.event == "resolved" and b.active_count() == 0
    [again] = b.apply(finding(at=T0 + timedelta(hours=1)), "alert only")
    assert again.event == "firing" and again.fingerprint == r.fingerprint


def test_resend_interval_with_injected_clock():
    clock = Clock()
    b = book(clock, resend_interval_s=60)
    b.apply(finding(subject="a"), "x")
    clock.advance(30)
    b.apply(finding(subject="b"), "x")
    assert b.due_resends() == []
    clock.advance(30)
    assert [n.labels["subject"] for n in b.due_resends()] == ["a"]
    assert b.due_resends() == []  # marked as sent
    clock.advance(30)
    assert [n.labels["subject"] for n in b.due_resends()] == ["b"]
    b.apply(finding(subject="a", status="resolved", revision=1))
    clock.advance(120)
    assert [n.labels["subject"] for n in b.due_resends()] == ["b"]  # resolved: not re-sent


def test_alerts_view_and_history_pruning():
    clock = Clock()
    b = book(clock, history_s=3600, max_alerts=10)
    b.apply(finding(subject="a"), "x")
    b.apply(finding(subject="b"), "x")
    b.apply(finding(subject="a", status="resolved", revision=1))
    assert {a["labels"]["subject"] for a in b.alerts()} == {"a", "b"}
    assert [a["labels"]["subject"] for a in b.alerts("firing")] == ["b"]
    r = b.alerts("resolved")[0]
    assert set(r) >= {"fingerprint", "state", "labels", "annotations", "startsAt", "endsAt",
                      "finding_id"}
    assert r["endsAt"].endswith("Z")
    clock.advance(3601)
    b.due_resends()
    assert [a["labels"]["subject"] for a in b.alerts()] == ["b"]
    for i in range(20):
        b.apply(finding(subject=f"s{i}"), "x")
    assert len(b.alerts()) == 10
