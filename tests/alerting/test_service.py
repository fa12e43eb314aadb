"""AlertingService with the real BlockList, policy, lifecycle and a recording sink."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from alerting.blocklist import BlockList
from alerting.service import AlertingConfig, AlertingService, build
from alerting.sinks import RetryConfig, SinkWorker
from api.metrics import Metrics
from ingest.event import UsageEvent
from tests.alerting._support import T0, Clock, MemStore, RecordingSink, finding


def make(cfg: dict | None = None, clock: Clock | None = None, *, sink_resend: bool = True):
    clock = clock or Clock()
    config = AlertingConfig.from_dict(cfg or {})
    store = MemStore()
    bl = BlockList(store, clock=clock, restore=False,
                   allowlist=config.policy.allowlist.for_blocklist())
    sink = RecordingSink(resend=sink_resend)
    metrics = Metrics()
    svc = AlertingService(config, bl, [SinkWorker(sink, RetryConfig(backoff_s=0.01), metrics)],
                          metrics, clock=clock)
    return svc, store, sink, clock, metrics


def test_retry_storm_blocks_and_alerts_once_per_episode():
    svc, store, sink, clock, m = make()
    f = finding()
    svc.handle([f])
    e = svc.blocklist.check(consumer="app-1")
    assert e is not None and e.finding_id == f.finding_id and e.actor == "tokenward-policy"
    assert e.expires_at == pytest.approx(clock.t + 600)
    assert "retry_storm (critical)" in e.reason
    svc.handle([f.model_copy(update={"revision": 1, "observed": 90})])
    assert svc.flush(5)
    assert [n.event for n in sink.notes] == ["firing", "updated"]
    assert sink.notes[0].annotations["action"] == "blocked consumer app-1 for 10m"
    assert [r.event for r in store.rows] == ["block"]  # not blocked twice
    assert m.registry.get_sample_value("tokenward_policy_decisions_total",
                                       {"kind": "retry_storm", "decision": "block"}) == 2
    [a] = svc.alerts()
    assert a["state"] == "firing" and a["finding_id"] == f.finding_id
    svc.close()


def test_resolve_keeps_the_block_until_ttl():
    svc, store, sink, clock, _ = make()
    f = finding()
    svc.handle([f])
    clock.advance(120)
    svc.handle([f.model_copy(update={"revision": 1, "status": "resolved"})])
    assert svc.flush(5)
    assert [n.event for n in sink.notes] == ["firing", "resolved"]
    assert svc.alerts("resolved")[0]["endsAt"] is not None
    assert svc.blocklist.check(consumer="app-1") is not None  # still blocked
    clock.advance(600)
    svc.tick()  # expires the block
    assert svc.blocklist.check(consumer="app-1") is None
    assert [r.event for r in store.rows] == ["block", "expire"]
    svc.close()


def test_dry_run_records_would_block_and_enforces_nothing():
    svc, store, sink, _, _ = make({"policy": {"dry_run": True}})
    svc.handle([finding()])
    assert svc.flush(5)
    assert svc.blocklist.check(consumer="app-1") is None
    assert [(r.event, r.dry_run, r.value) for r in store.rows] == [("would_block", True, "app-1")]
    assert sink.notes[0].annotations["action"] == \
        "would block consumer app-1 for 10m (dry-run)"
    svc.close()


def test_escalation_across_episodes():
    svc, _, _, clock, _ = make()
    for i in range(3):
        at = datetime.fromtimestamp(clock.t, UTC)
        svc.handle([finding(at=at)])
        e = svc.blocklist.check(consumer="app-1")
        assert e is not None and e.expires_at == pytest.approx(clock.t + 600 * 4 ** i)
        clock.advance(600 * 4 ** i + 1)
    svc.close()


def test_outage_allowlist_and_info_kinds():
    svc, store, sink, _, _ = make({"policy": {"allowlist": {"consumer": ["probe"]}}})
    svc.handle([
        finding("failure_spike", scope="model", subject="gpt-4o", consumer=None),
        finding(subject="probe"),
        finding("context_bloat", severity="warning"),
    ])
    assert svc.flush(5)
    assert store.rows == []
    assert [n.labels["alertname"] for n in sink.notes] == ["TokenwardFailureSpike",
                                                          "TokenwardRetryStorm"]
    assert "allowlisted" in sink.notes[1].annotations["action"]
    svc.close()


def test_tick_resends_only_to_resending_sinks():
    svc, _, sink, clock, _ = make({"alerting": {"resend_interval": "60s"}})
    slack_like = RecordingSink("slack", resend=False)
    svc.workers.append(SinkWorker(slack_like, RetryConfig()))
    svc.handle([finding("token_spike")])
    clock.advance(61)
    svc.tick()
    assert svc.flush(5)
    assert [n.event for n in sink.notes] == ["firing", "resend"]
    assert [n.event for n in slack_like.notes] == ["firing"]
    svc.close()


def test_a_failing_block_list_does_not_stop_alerting():
    svc, _, sink, _, _ = make()

    class Broken:
        def write_blocks(self, rows):
            raise RuntimeError("ClickHouse down")

    svc.blocklist.store = Broken()
    svc.handle([finding()])
    assert svc.flush(5)
    assert "BLOCK FAILED" in sink.notes[0].annotations["action"]
    svc.close()


def test_budget_flow_blocks_until_the_period_ends():
    day = datetime.fromtimestamp(Clock().t, UTC).replace(hour=0, minute=0)
    clock = Clock((day + timedelta(hours=12)).timestamp())
    svc, _, sink, _, _ = make({"budgets": {"limits": [
        {"name": "app-day", "consumer": "app-1", "tenant": "acme", "period": "day", "cost": 5,
         "projection": False}]}},
        clock)
    evs = [UsageEvent(event_id=f"b{i}", ts=day + timedelta(hours=11, minutes=i),
                      consumer="app-1", tenant="acme", model="m", status=200, cost=1.0)
           for i in range(6)]
    found = svc.observe_events(evs)
    assert [f.evidence["stage"] for f in found] == ["warn_80", "exceeded"]
    svc.handle(found)
    e = svc.blocklist.check(consumer="app-1")
    assert e is not None and e.expires_at == pytest.approx((day + timedelta(days=1)).timestamp())
    resolved = svc.advance(day + timedelta(days=1, seconds=1))
    assert [f.status for f in resolved] == ["resolved"]
    svc.handle(resolved)
    assert svc.flush(5)
    assert [n.event for n in sink.notes] == ["firing", "updated", "resolved"]
    assert sink.notes[0].labels["budget"] == "app-day/cost"
    svc.close()


def test_config_load_errors_name_the_file_and_key(tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text("[policy]\ndry_run = true\n[policy.kinds.retry_storm]\nblock_tll = '5m'\n")
    with pytest.raises(ValueError) as exc:
        AlertingConfig.load(str(p))
    assert str(p) in str(exc.value) and "policy.kinds.retry_storm: unknown key(s) block_tll" \
        in str(exc.value)
    p.write_text("[polcy]\n")
    with pytest.raises(ValueError, match="policy file: unknown key"):
        AlertingConfig.load(str(p))
    p.write_text("not toml =")
    with pytest.raises(ValueError, match="cannot read the policy file"):
        AlertingConfig.load(str(p))


def test_example_policy_file_loads():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "policy.example.toml")
    env = {"TOKENWARD_WEBHOOK_SECRET": "x",
           "TOKENWARD_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/C"}
    c = AlertingConfig.load(path, env=env)
    assert c.policy.rules["retry_storm"].block is True
    assert {s.type for s in c.sinks.sinks} == {"alertmanager", "webhook", "slack"}
    assert c.budgets.limits


def test_build_against_the_embedded_store(embedded_store, tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text("[policy]\ndry_run = true\nstale_after = 0\n"
                 "[[budgets.limits]]\nname = 'd'\nconsumer = '*'\nperiod = 'day'\ncost = 100\n")
    settings = SimpleNamespace(policy_file=str(p), kafka_bootstrap=None)
    svc = build(settings, embedded_store, Metrics(), start=False)
    try:
        value = f"svc-test-{T0.timestamp():.0f}-{os.getpid()}"
        svc.handle([finding(subject=value)])
        rows = embedded_store.query(
            "SELECT event, dry_run FROM tokenward.blocks WHERE value = {v:String}", {"v": value})
        assert rows == [{"event": "would_block", "dry_run": 1}]
    finally:
        svc.close()
    with pytest.raises(SystemExit, match="policy file"):
        p.write_text("[policy]\nbogus = 1\n")
        build(settings, embedded_store, Metrics(), start=False)


def test_expiry_audited_at_the_ttl_not_at_the_next_tick():
    """The background loop wakes when a block's TTL runs out, even when the
    alert tick is a minute away: the ``expire`` audit row follows the TTL."""
    import time

    config = AlertingConfig.from_dict({"alerting": {"tick": 60}})
    store = MemStore()
    bl = BlockList(store, restore=False)  # the real wall clock
    svc = AlertingService(config, bl, [], Metrics())
    svc.start()
    try:
        time.sleep(0.1)  # the loop is waiting for its 60 s tick
        bl.block("consumer", "c1", reason="test", ttl_s=0.3, actor="test")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and [r.event for r in store.rows] != ["block", "expire"]:
            time.sleep(0.02)
        assert [r.event for r in store.rows] == ["block", "expire"]
    finally:
        svc.close()
