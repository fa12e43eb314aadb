from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from alerting.policy import (
    BlockTarget,
    Policy,
    PolicyConfig,
    fmt_duration,
    parse_duration,
)
from tests.alerting._support import T0, Clock, finding


def policy(d: dict | None = None, clock: Clock | None = None) -> Policy:
    return Policy(PolicyConfig.from_dict(d or {}), clock=clock or Clock())


@pytest.mark.parametrize(
    ("kind", "severity", "scope", "alert", "block", "ttl"),
    [
        ("retry_storm", "warning", "consumer", True, True, 600.0),
        ("retry_storm", "critical", "consumer", True, True, 600.0),
        ("runaway_reasoning", "warning", "consumer", True, False, None),
        ("runaway_reasoning", "critical", "consumer", True, True, 1800.0),
        ("agent_loop", "critical", "consumer", True, True, 1800.0),
        ("agent_loop", "warning", "consumer", True, False, None),
        ("failure_spike", "critical", "model", True, False, None),
        ("failure_spike", "critical", "consumer", True, False, None),
        ("token_spike", "critical", "consumer", True, False, None),
        ("cost_spike", "critical", "consumer", True, False, None),
        ("context_bloat", "warning", "consumer", False, False, None),
        ("cache_opportunity", "info", "consumer", False, False, None),
        ("retry_storm", "info", "consumer", False, False, None),
    ],
)
def test_defaults(kind, severity, scope, alert, block, ttl):
    d = policy().decide(finding(kind, severity, scope, subject="gpt-4o" if scope == "model"
                                else "app-1"))
    assert (d.alert, d.block) == (alert, block)
    if block:
        assert d.ttl_s == ttl
        assert d.targets == (BlockTarget("consumer", "app-1", "acme"),)
        assert not d.dry_run


def test_upstream_outage_never_blocks_even_when_configured_to():
    p = policy({"kinds": {"failure_spike": {"block": True, "block_min_severity": "info"}},
                "overrides": [{"kind": "*", "block": True}]})
    outage = finding("failure_spike", "critical", "model", subject="gpt-4o", consumer=None)
    d = p.decide(outage)
    assert d.alert and not d.block
    assert "upstream" in d.note and d.action_text().startswith("alert only")
    # the same kind on one consumer (its own failures) may block when configured
    assert p.decide(finding("failure_spike", "critical", "consumer")).block
    # a consumer's retry storm into the outage is alerted, never blocked
    storm = finding("retry_storm", "critical", "consumer", evidence={"upstream_outage": True})
    d = p.decide(storm)
    assert d.alert and not d.block and "outage" in d.note
    assert p.decide(finding("retry_storm", "critical", "consumer",
                            evidence={"upstream_outage": False})).block


def test_budget_blocks_until_period_end():
    clock = Clock(T0.timestamp())
    end = T0 + timedelta(hours=12)
    f = finding("budget_exceeded", "critical", evidence={"period_end": end.isoformat()})
    d = policy(clock=clock).decide(f)
    assert d.block and d.ttl_s == pytest.approx(12 * 3600)
    # a warning stage alerts but does not block
    assert not policy(clock=clock).decide(finding("budget_exceeded", "warning")).block


def test_overrides_tenant_then_consumer_most_specific_wins():
    p = policy({"overrides": [
        {"consumer": "batch-*", "kind": "retry_storm", "block": True, "block_ttl": "1h"},
        {"tenant": "acme", "block": False},
        {"tenant": "acme", "kind": "cost_spike", "alert": False},
    ]})
    assert not p.decide(finding("retry_storm", subject="app-1")).block  # tenant override
    d = p.decide(finding("retry_storm", subject="batch-7"))  # consumer beats tenant
    assert d.block and d.ttl_s == 3600
    assert "override#0" in d.rule and "override#1" in d.rule
    assert not p.decide(finding("cost_spike")).alert
    assert p.decide(finding("cost_spike", tenant="other")).alert
    assert p.decide(finding("retry_storm", tenant="other")).block


def test_allowlist_is_never_blocked_but_alerted():
    p = policy({"allowlist": {"consumer": ["health-probe"], "tenant": ["internal"]}})
    d = p.decide(finding(subject="health-probe"))
    assert d.alert and not d.block and "allowlisted" in d.note
    assert "allowlisted" in d.action_text()
    assert not p.decide(finding(tenant="internal")).block
    assert p.decide(finding(subject="app-2")).block


def test_dry_run_global_and_per_override():
    d = policy({"dry_run": True}).decide(finding())
    assert d.block and d.dry_run
    assert d.action_text() == "would block consumer app-1 for 10m (dry-run)"
    p = policy({"overrides": [{"tenant": "trial-*", "dry_run": True}]})
    assert p.decide(finding(tenant="trial-1")).dry_run
    assert not p.decide(finding(tenant="acme")).dry_run


def test_escalation_for_repeat_offenders_is_capped_and_windowed():
    clock = Clock()
    p = policy({"escalation": {"factor": 4, "window": "24h", "max_ttl": "6h"}}, clock)
    t = BlockTarget("consumer", "app-1", "acme")
    ttls = []
    for _ in range(4):
        d = p.decide(finding(at=datetime.fromtimestamp(clock.t, UTC)))
        ttls.append(d.ttl_s)
        p.record_block(t)
        clock.advance(3600)
    assert ttls == [600, 2400, 9600, 6 * 3600]
    clock.advance(25 * 3600)  # all earlier blocks left the window
    assert p.decide(finding(at=datetime.fromtimestamp(clock.t, UTC))).ttl_s == 600
    # another consumer is not affected
    assert p.repeats(BlockTarget("consumer", "app-2")) == 0


def test_escalation_text_and_disabled():
    clock = Clock()
    p = policy({}, clock)
    p.record_block(BlockTarget("consumer", "app-1"))
    d = p.decide(finding())
    assert d.repeats == 1 and d.action_text() == \
        "blocked consumer app-1 for 40m (repeat offender x2)"
    p2 = policy({"escalation": {"enabled": False}}, clock)
    p2.record_block(BlockTarget("consumer", "app-1"))
    assert p2.decide(finding()).ttl_s == 600


def test_stale_findings_neither_alert_nor_block():
    clock = Clock((T0 + timedelta(days=7)).timestamp())
    d = policy(clock=clock).decide(finding())
    assert d.stale and not d.alert and not d.block
    assert not policy({"stale_after": 0}, clock).decide(finding()).stale


def test_suggested_follows_the_detector_action():
    p = policy({"kinds": {"token_spike": {"block": "suggested", "block_min_severity": "warning"}}})
    assert p.decide(finding("token_spike", action="block")).block
    assert not p.decide(finding("token_spike", action="alert")).block


def test_targets_for_scopes():
    p = policy({"overrides": [{"kind": "*", "block": True, "block_min_severity": "info"}]})
    assert p.decide(finding("agent_loop", scope="session", subject="s-1",
                            consumer="app-9")).targets == (BlockTarget("consumer", "app-9",
                                                                       "acme"),)
    assert not p.decide(finding("agent_loop", scope="session", subject="s-1")).block
    assert p.decide(finding(scope="user", subject="u-1")).targets == (
        BlockTarget("user", "u-1", "acme"),)
    tenant = finding("budget_exceeded", scope="tenant", subject="acme", evidence={
        "consumers": [{"consumer": "a", "spent": 3}, {"consumer": "b", "spent": 1}]})
    assert [t.value for t in p.decide(tenant).targets] == ["a", "b"]


def test_resolved_findings_do_nothing():
    d = policy().decide(finding(status="resolved", revision=3))
    assert not d.alert and not d.block


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"dryrun": True}, "policy: unknown key(s) dryrun"),
        ({"kinds": {"retry_storms": {}}}, "policy.kinds: unknown key(s) retry_storms"),
        ({"kinds": {"retry_storm": {"block_ttl": "ten minutes"}}},
         "policy.kinds.retry_storm.block_ttl"),
        ({"kinds": {"retry_storm": {"alert_min_severity": "high"}}},
         "policy.kinds.retry_storm.alert_min_severity: expected one of info, warning"),
        ({"kinds": {"retry_storm": {"block": "yes"}}}, "policy.kinds.retry_storm.block"),
        ({"overrides": [{"kind": "retry_*"}]}, "policy.overrides[0]: sets nothing"),
        ({"overrides": [{"kind": "nope", "alert": False}]}, "policy.overrides[0].kind"),
        ({"overrides": [{"tenant": "a", "block_ttl": -1}]}, "policy.overrides[0].block_ttl"),
        ({"allowlist": {"consumers": ["x"]}}, "policy.allowlist: unknown key(s) consumers"),
        ({"allowlist": {"consumer": "x"}}, "policy.allowlist.consumer: expected a list"),
        ({"escalation": {"factor": 0.5}}, "policy.escalation.factor: must be >= 1"),
        ({"runbook_base_url": "wiki/runbook"}, "policy.runbook_base_url"),
        ({"dry_run": "yes"}, "policy.dry_run: expected true or false"),
    ],
)
def test_bad_config_names_the_key(cfg, needle):
    with pytest.raises(ValueError) as exc:
        PolicyConfig.from_dict(cfg)
    assert needle in str(exc.value)


def test_runbook_and_durations():
    c = PolicyConfig.from_dict({"runbook_base_url": "https://wiki.example/tokenward"})
    assert c.runbook_url("retry_storm") == "https://wiki.example/tokenward#retry_storm"
    assert parse_duration("90s", "k") == 90 and parse_duration("2h", "k") == 7200
    assert parse_duration(1.5, "k") == 1.5
    assert fmt_duration(5400) == "1h30m" and fmt_duration(None) == "until unblocked"
    with pytest.raises(ValueError, match="k: expected a duration"):
        parse_duration("soon", "k")
    assert PolicyConfig.from_dict({"kinds": {"retry_storm": {"block_ttl": "none"}}}) \
        .rules["retry_storm"].block_ttl is None
