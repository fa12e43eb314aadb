from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from alerting.budget import BudgetConfig, BudgetTracker, period_bounds
from ingest.event import UsageEvent

_n = [0]


def ev(ts: datetime, cost: float = 0.0, *, consumer: str = "app", tenant: str = "acme",
       tokens: int = 0) -> UsageEvent:
    _n[0] += 1
    return UsageEvent(event_id=f"e{_n[0]}", ts=ts, consumer=consumer, model="gpt-4o",
                      status=200, tenant=tenant, input_tokens=tokens // 2,
                      output_tokens=tokens - tokens // 2, cost=cost)


def tracker(**limit) -> BudgetTracker:
    limit.setdefault("name", "b")
    return BudgetTracker(BudgetConfig.from_dict({"limits": [limit]}))


D = datetime(2026, 3, 10, tzinfo=UTC)


def test_warning_fraction_then_exceeded_one_episode():
    bt = tracker(consumer="app", period="day", cost=100, warn_at=[0.5, 0.8], projection=False)
    assert bt.observe(ev(D + timedelta(hours=1), 40)) == []
    [w1] = bt.observe(ev(D + timedelta(hours=2), 15))
    assert (w1.severity, w1.action, w1.evidence["stage"], w1.revision) == \
        ("warning", "alert", "warn_50", 0)
    assert (w1.scope, w1.subject, w1.consumer, w1.tenant) == ("consumer", "app", "app", "acme")
    assert bt.observe(ev(D + timedelta(hours=3), 5)) == []  # 60 %: nothing new
    [w2] = bt.observe(ev(D + timedelta(hours=4), 25))
    assert w2.evidence["stage"] == "warn_80" and w2.revision == 1
    [x] = bt.observe(ev(D + timedelta(hours=5), 20))
    assert (x.severity, x.action, x.evidence["stage"], x.revision) == \
        ("critical", "block", "exceeded", 2)
    assert x.observed == 105 and x.threshold == 100
    assert x.baseline == pytest.approx(100 * 5 / 24, rel=1e-3)
    assert x.evidence["period_end"] == (D + timedelta(days=1)).isoformat()
    assert len({w1.finding_id, w2.finding_id, x.finding_id}) == 1
    assert bt.observe(ev(D + timedelta(hours=6), 50)) == []  # exceeded: no more revisions
    # events of other consumers/tenants do not count
    assert bt.observe(ev(D + timedelta(hours=6), 500, consumer="other")) == []


def test_projection_warns_before_the_budget_runs_out():
    bt = tracker(consumer="app", period="day", cost=100)
    # 30 in the first 6 h -> 120 projected for the day (linear), 30 % used
    assert bt.observe(ev(D + timedelta(hours=1), 1)) == []  # too early to project
    [p] = bt.observe(ev(D + timedelta(hours=6), 29))
    assert p.evidence["stage"] == "projected" and p.severity == "warning"
    assert p.evidence["projected"] == pytest.approx(120)
    assert p.evidence["projected_exhaustion_at"] == (D + timedelta(hours=20)).isoformat()
    assert "projected to run out" in p.summary


def test_period_rolls_over_on_event_time_and_resolves():
    bt = tracker(consumer="app", period="hour", tokens=1000, projection=False)
    h = D + timedelta(hours=9)
    [x] = bt.observe(ev(h + timedelta(minutes=5), tokens=1200))
    assert x.evidence["metric"] == "tokens" and x.severity == "critical"
    # the next hour's first event resolves the old episode and starts afresh
    out = bt.observe(ev(h + timedelta(minutes=65), tokens=100))
    assert [(f.status, f.finding_id) for f in out] == [("resolved", x.finding_id)]
    assert out[0].resolved_at == h + timedelta(hours=1)
    # a late event of the closed hour is not counted anywhere
    assert bt.observe(ev(h + timedelta(minutes=30), tokens=5000)) == []
    [y] = bt.observe(ev(h + timedelta(minutes=70), tokens=950))
    assert y.finding_id != x.finding_id and y.revision == 0
    assert [f.status for f in bt.advance(h + timedelta(hours=2))] == ["resolved"]
    assert bt.status() == []


def test_tenant_budget_lists_top_consumers():
    bt = tracker(tenant="acme", period="month", cost=10, projection=False)
    bt.observe(ev(D, 4, consumer="a"))
    bt.observe(ev(D, 1, consumer="b"))
    bt.observe(ev(D, 100, consumer="x", tenant="other"))
    [x] = bt.observe(ev(D + timedelta(hours=1), 6, consumer="c"))
    assert (x.scope, x.subject, x.consumer) == ("tenant", "acme", None)
    assert [c["consumer"] for c in x.evidence["consumers"]] == ["c", "a", "b"]
    assert x.evidence["period_end"] == datetime(2026, 4, 1, tzinfo=UTC).isoformat()


def test_glob_gives_every_consumer_its_own_budget_and_both_metrics():
    bt = BudgetTracker(BudgetConfig.from_dict({"projection": False, "limits": [
        {"name": "per-consumer", "consumer": "*", "period": "day", "cost": 10, "tokens": 100}]}))
    first = bt.observe(ev(D, 9, consumer="a", tokens=10))
    assert [(f.evidence["metric"], f.evidence["stage"]) for f in first] == [("cost", "warn_80")]
    out = bt.observe(ev(D, 2, consumer="a", tokens=10))
    assert [(f.evidence["metric"], f.evidence["stage"]) for f in out] == [("cost", "exceeded")]
    assert bt.observe(ev(D, 2, consumer="b", tokens=10)) == []
    fids = {f.finding_id for f in out}
    out2 = bt.observe(ev(D, 0, consumer="a", tokens=200))
    assert [f.evidence["metric"] for f in out2] == ["tokens"]
    assert fids.isdisjoint({f.finding_id for f in out2})  # distinct episodes per metric
    assert out[0].evidence["alert_key"] != out2[0].evidence["alert_key"]


def test_same_input_same_findings():
    def run():
        bt = tracker(consumer="app", period="day", cost=10)
        out = []
        for i in range(20):
            out += bt.observe(ev(D + timedelta(hours=i), 1))
        return [(f.finding_id, f.revision, f.evidence["stage"]) for f in out]

    assert run() == run()


def test_seed_from_store_and_watermark_skips_redelivered_events():
    bt = tracker(consumer="app", period="day", cost=100, projection=False)
    wm = D + timedelta(hours=5)
    bt.seed("day", [("acme", "app", 79.0, 0.0), ("acme", "other", 5.0, 0.0)], wm)
    assert bt.observe(ev(D + timedelta(hours=4), 50)) == []  # before the watermark: counted
    [w] = bt.observe(ev(D + timedelta(hours=6), 2))
    assert w.evidence["spent"] == 81 and w.evidence["stage"] == "warn_80"


def test_period_bounds():
    t = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_bounds("month", t) == (datetime(2026, 12, 1, tzinfo=UTC),
                                         datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("hour", t)[0] == datetime(2026, 12, 31, 23, tzinfo=UTC)
    with pytest.raises(ValueError):
        period_bounds("week", t)


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"limits": [{"period": "week", "cost": 1}]}, "budgets.limits[0].period"),
        ({"limits": [{"period": "day"}]}, "budgets.limits[0]: set cost"),
        ({"limits": [{"period": "day", "cost": -5}]}, "budgets.limits[0].cost: must be >= 0"),
        ({"limits": [{"period": "day", "cost": 1, "costs": 2}]},
         "budgets.limits[0]: unknown key(s) costs"),
        ({"warn_at": [80]}, "budgets.warn_at: expected a list of fractions"),
        ({"limits": [{"name": "x", "period": "day", "cost": 1},
                     {"name": "x", "period": "hour", "cost": 1}]}, "duplicate name(s) x"),
        ({"limit": []}, "budgets: unknown key(s) limit"),
    ],
)
def test_bad_config(cfg, needle):
    with pytest.raises(ValueError) as exc:
        BudgetConfig.from_dict(cfg)
    assert needle in str(exc.value)
