"""Budgets: cost or token limits per tenant or consumer, per hour, day or month.

:class:`BudgetTracker` is pure logic on the **event-time** clock (like the
detectors): ``observe(event) -> findings`` and ``advance(now) -> findings``.
Periods are calendar periods in UTC (``hour``: HH:00, ``day``: 00:00 UTC,
``month``: the 1st, 00:00 UTC); an event counts in the period its ``ts``
falls in.  Spend is the event's ``cost`` (computed by the pipeline from the
price table when the gateway did not send one) and its tokens
(``input_tokens + output_tokens``).

Each budget and period is one *episode* (one ``finding_id``): the first
revision is emitted when a warning fraction (default 80 %) is reached or the
projection says the budget will run out before the period ends; later
revisions when a further stage is reached (another fraction, the projection,
the budget exceeded); the episode resolves when the period ends (an event of
the next period arrives, or ``advance`` passes the end).  Findings:

* ``kind="budget_exceeded"``; ``severity`` ``warning`` before the limit and
  ``critical`` once it is exceeded (``action="block"`` then, else ``"alert"``);
* consumer budgets: ``scope="consumer"``, ``subject`` = the consumer;
  tenant budgets: ``scope="tenant"``, ``subject`` = the tenant, and the top
  spending consumers of the period in ``evidence["consumers"]`` (the policy
  blocks those when a tenant budget is exceeded and its rule blocks);
* ``observed`` = spend so far, ``threshold`` = the limit, ``baseline`` = the
  pro-rata budget for the elapsed part of the period;
* ``evidence``: ``budget`` (name), ``metric`` (cost|tokens), ``period``,
  ``period_start``, ``period_end`` (the policy's ``block_ttl="period_end"``
  uses it), ``limit``, ``spent``, ``fraction``, ``projected``,
  ``projected_exhaustion_at``, ``stage``.

The projection is linear: spend rate so far in the period times the period
length; it is only made after ``projection_min_elapsed`` of the period has
passed (default 10 %), to avoid warning on the first burst of the day.

Wiring (the pipeline owns the events): call :meth:`BudgetTracker.observe` for
every *new* event (not for duplicates of a replay: a replayed batch would be
counted twice) after pricing, and ``advance(latest_event_ts)`` after a batch;
store the findings with the batch and hand them to
:meth:`alerting.service.AlertingService.handle`, exactly like detector
findings.  :meth:`alerting.service.AlertingService.observe_events` does the
observing part.  Limitation: with several tokenward processes sharing a Kafka
consumer group, each sees only its partitions: consumer budgets stay exact
(events are keyed by consumer) but a tenant budget is split between processes.

>>> from datetime import datetime, UTC
>>> from types import SimpleNamespace as E
>>> cfg = BudgetConfig.from_dict({"limits": [
...     {"name": "app-daily", "consumer": "app", "period": "day", "cost": 10}]})
>>> bt = BudgetTracker(cfg)
>>> ev = lambda h, cost: E(event_id=f"e{h}", tenant="default", consumer="app",
...     ts=datetime(2026, 3, 1, h, tzinfo=UTC), cost=cost, input_tokens=0, output_tokens=0)
>>> bt.observe(ev(1, 1.0))
[]
>>> [(f.severity, f.evidence["stage"]) for f in bt.observe(ev(22, 7.5))]
[('warning', 'warn_80')]
>>> [(f.severity, f.action, f.revision) for f in bt.observe(ev(23, 2.0))]
[('critical', 'block', 1)]
>>> [f.status for f in bt.advance(datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC))]
['resolved']
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from alerting.policy import check_keys, get_bool, get_number, get_str
from detectors.finding import Finding

PERIODS = ("hour", "day", "month")
METRICS = ("cost", "tokens")


class EventLike(Protocol):
    """What the tracker reads of an event (:class:`ingest.event.UsageEvent`)."""

    event_id: str
    ts: datetime
    tenant: str
    consumer: str
    cost: float | None
    input_tokens: int
    output_tokens: int


def period_bounds(period: str, ts: datetime) -> tuple[datetime, datetime]:
    """``[start, end)`` of the UTC calendar period containing ``ts``."""
    t = ts.astimezone(UTC)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else \
            start.replace(month=start.month + 1)
        return start, end
    raise ValueError(f"unknown period {period!r}; use one of {', '.join(PERIODS)}")


def _fractions(v: Any, key: str) -> tuple[float, ...]:
    if not isinstance(v, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < 1 for x in v):
        raise ValueError(f"{key}: expected a list of fractions between 0 and 1 "
                         f"(e.g. [0.5, 0.8]), got {v!r}")
    return tuple(sorted(set(float(x) for x in v)))


@dataclass(frozen=True)
class BudgetLimit:
    """One budget.  ``tenant``/``consumer`` are glob patterns; every matching
    tenant (or (tenant, consumer)) gets its own budget of this size.  Without
    ``consumer`` it is a tenant budget (all consumers of the tenant together)."""

    name: str
    period: str
    tenant: str = "*"
    consumer: str | None = None
    cost: float | None = None
    tokens: float | None = None
    warn_at: tuple[float, ...] | None = None  # None: the [budgets] default
    projection: bool | None = None

    KEYS = ("name", "period", "tenant", "consumer", "cost", "tokens", "warn_at", "projection")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> BudgetLimit:
        check_keys(d, cls.KEYS, where)
        period = d.get("period")
        if period not in PERIODS:
            raise ValueError(f"{where}.period: expected one of {', '.join(PERIODS)}, "
                             f"got {period!r}")
        if "cost" not in d and "tokens" not in d:
            raise ValueError(f"{where}: set cost (in the tenant's currency) and/or tokens")
        cost = get_number(d, "cost", where, 0.0, lo=0.0) if "cost" in d else None
        tokens = get_number(d, "tokens", where, 0.0, lo=0.0) if "tokens" in d else None
        if (cost is not None and cost <= 0) or (tokens is not None and tokens <= 0):
            raise ValueError(f"{where}: cost and tokens must be > 0")
        tenant = get_str(d, "tenant", where, "*") or "*"
        consumer = get_str(d, "consumer", where, "") if "consumer" in d else None
        if consumer == "":
            raise ValueError(f"{where}.consumer: must not be empty (omit it for a tenant budget)")
        default_name = f"{consumer or tenant}-{period}"
        return cls(
            name=get_str(d, "name", where, default_name) or default_name,
            period=str(period), tenant=tenant, consumer=consumer, cost=cost, tokens=tokens,
            warn_at=_fractions(d["warn_at"], f"{where}.warn_at") if "warn_at" in d else None,
            projection=get_bool(d, "projection", where, True) if "projection" in d else None,
        )

    def matches(self, tenant: str, consumer: str) -> bool:
        return fnmatch.fnmatchcase(tenant, self.tenant) and (
            self.consumer is None or fnmatch.fnmatchcase(consumer, self.consumer))


@dataclass(frozen=True)
class BudgetConfig:
    limits: tuple[BudgetLimit, ...] = ()
    warn_at: tuple[float, ...] = (0.8,)
    projection: bool = True
    projection_min_elapsed: float = 0.1  # fraction of the period before projecting
    top_consumers: int = 10  # consumers listed in a tenant budget's evidence

    KEYS = ("warn_at", "projection", "projection_min_elapsed", "top_consumers", "limits")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "budgets") -> BudgetConfig:
        check_keys(d, cls.KEYS, where)
        raw = d.get("limits", [])
        if not isinstance(raw, list):
            raise ValueError(f"{where}.limits: expected an array of tables ([[budgets.limits]])")
        limits = tuple(BudgetLimit.from_dict(x, f"{where}.limits[{i}]")
                       for i, x in enumerate(raw))
        names = [lim.name for lim in limits]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{where}.limits: duplicate name(s) {', '.join(dup)}; "
                             "give each budget a unique name")
        return cls(
            limits=limits,
            warn_at=_fractions(d.get("warn_at", [0.8]), f"{where}.warn_at"),
            projection=get_bool(d, "projection", where, True),
            projection_min_elapsed=get_number(d, "projection_min_elapsed", where, 0.1,
                                              lo=0.0, hi=1.0),
            top_consumers=int(get_number(d, "top_consumers", where, 10, lo=0, hi=1000)),
        )


@dataclass
class _Meter:
    limit: BudgetLimit
    metric: str
    amount: float  # the limit
    tenant: str
    consumer: str | None
    start: datetime
    end: datetime
    spent: float = 0.0
    first_ts: datetime | None = None
    detected_at: datetime | None = None
    emitted: set[str] = field(default_factory=set)
    revision: int = -1
    by_consumer: dict[str, float] = field(default_factory=dict)
    last: Finding | None = None


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


class BudgetTracker:
    """Budget state on the event-time clock.  Thread-safe (one lock)."""

    def __init__(self, config: BudgetConfig) -> None:
        self.config = config
        self._meters: dict[tuple[str, str, str, str], _Meter] = {}
        self._watermark: dict[str, datetime] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.config.limits)

    # -- input ------------------------------------------------------------------
    def observe(self, event: EventLike) -> list[Finding]:
        if not self.config.limits:
            return []
        tokens = float((event.input_tokens or 0) + (event.output_tokens or 0))
        cost = float(event.cost or 0.0)
        out: list[Finding] = []
        with self._lock:
            for lim in self.config.limits:
                if not lim.matches(event.tenant, event.consumer):
                    continue
                wm = self._watermark.get(lim.period)
                if wm is not None and event.ts <= wm:
                    continue  # already counted in the seed from the store
                for metric, amount in (("cost", lim.cost), ("tokens", lim.tokens)):
                    if amount is None:
                        continue
                    m = self._meter(lim, metric, amount, event.tenant, event.consumer,
                                    event.ts, out)
                    if m is None:
                        continue  # a late event of a closed period
                    value = cost if metric == "cost" else tokens
                    m.spent += value
                    if m.first_ts is None or event.ts < m.first_ts:
                        m.first_ts = event.ts
                    if lim.consumer is None and value:
                        m.by_consumer[event.consumer] = m.by_consumer.get(event.consumer, 0.0) \
                            + value
                    f = self._evaluate(m, event.ts)
                    if f is not None:
                        out.append(f)
        return out

    def advance(self, now: datetime) -> list[Finding]:
        """Resolve the episodes whose period ended before ``now`` (event time)
        and forget their state."""
        out: list[Finding] = []
        with self._lock:
            for key, m in list(self._meters.items()):
                if m.end <= now:
                    r = self._resolve(m)
                    if r is not None:
                        out.append(r)
                    del self._meters[key]
        return out

    def seed(self, period: str, rows: Iterable[tuple[str, str, float, float]],
             watermark: datetime) -> None:
        """Start-up: the spend already stored for the current ``period``
        (``(tenant, consumer, cost, tokens)`` per consumer, from
        ``usage_events``) up to the event time ``watermark``.  Later events at
        or before the watermark are taken as already counted (re-deliveries)."""
        start, _ = period_bounds(period, watermark)
        with self._lock:
            for tenant, consumer, cost, tokens in rows:
                for lim in self.config.limits:
                    if lim.period != period or not lim.matches(tenant, consumer):
                        continue
                    for metric, amount in (("cost", lim.cost), ("tokens", lim.tokens)):
                        if amount is None:
                            continue
                        m = self._meter(lim, metric, amount, tenant, consumer, watermark, [])
                        if m is None:
                            continue
                        v = float(cost if metric == "cost" else tokens)
                        m.spent += v
                        m.first_ts = m.first_ts or start
                        if lim.consumer is None and v:
                            m.by_consumer[consumer] = m.by_consumer.get(consumer, 0.0) + v
            self._watermark[period] = watermark

    # -- state ------------------------------------------------------------------
    def _meter(self, lim: BudgetLimit, metric: str, amount: float, tenant: str, consumer: str,
               ts: datetime, out: list[Finding]) -> _Meter | None:
        cons = consumer if lim.consumer is not None else None
        key = (lim.name, metric, tenant, cons or "")
        m = self._meters.get(key)
        if m is not None:
            if ts < m.start:
                return None
            if ts < m.end:
                return m
            r = self._resolve(m)  # the period rolled over
            if r is not None:
                out.append(r)
        start, end = period_bounds(lim.period, ts)
        m = _Meter(lim, metric, amount, tenant, cons, start, end)
        self._meters[key] = m
        return m

    def _stages(self, m: _Meter, ts: datetime) -> tuple[list[str], float | None, datetime | None]:
        frac = m.spent / m.amount
        stages = [f"warn_{round(w * 100):d}" for w in (m.limit.warn_at or self.config.warn_at)
                  if frac >= w]
        projected = exhaust = None
        total = (m.end - m.start).total_seconds()
        elapsed = max((ts - m.start).total_seconds(), 1.0)
        proj_on = self.config.projection if m.limit.projection is None else m.limit.projection
        if elapsed / total >= self.config.projection_min_elapsed and m.spent > 0:
            rate = m.spent / elapsed
            projected = rate * total
            if frac < 1 and proj_on and projected >= m.amount:
                exhaust = m.start + timedelta(seconds=m.amount / rate)
                stages.append("projected")
        if frac >= 1:
            stages.append("exceeded")
        return stages, projected, exhaust

    def _evaluate(self, m: _Meter, ts: datetime) -> Finding | None:
        stages, projected, exhaust = self._stages(m, ts)
        new = [s for s in stages if s not in m.emitted]
        if not new or "exceeded" in m.emitted:
            return None
        m.emitted.update(stages)
        m.revision += 1
        if m.detected_at is None:
            m.detected_at = ts
        stage = "exceeded" if "exceeded" in stages else new[-1]
        m.last = self._finding(m, ts, stage, projected, exhaust, "firing")
        return m.last

    def _resolve(self, m: _Meter) -> Finding | None:
        if m.last is None:
            return None
        m.revision += 1
        return self._finding(m, m.end, str(m.last.evidence.get("stage", "")),
                             m.last.evidence.get("projected"), None, "resolved")

    def _finding(self, m: _Meter, ts: datetime, stage: str, projected: float | None,
                 exhaust: datetime | None, status: str) -> Finding:
        lim = m.limit
        scope = "consumer" if m.consumer is not None else "tenant"
        subject = m.consumer if m.consumer is not None else m.tenant
        total = (m.end - m.start).total_seconds()
        elapsed = min(max((ts - m.start).total_seconds(), 0.0), total)
        unit = "" if m.metric == "cost" else " tokens"
        exceeded = stage == "exceeded"
        if exceeded:
            what = "exceeded"
        elif stage == "projected" and exhaust is not None:
            what = f"projected to run out at {exhaust.strftime('%Y-%m-%d %H:%M UTC')}"
        else:
            what = f"{m.spent / m.amount:.0%} used"
        summary = (f"{lim.period}ly {m.metric} budget {lim.name!r} of {scope} {subject} {what}: "
                   f"{m.spent:.6g}{unit} of {m.amount:.6g}{unit}")
        evidence: dict[str, Any] = {
            "budget": lim.name, "metric": m.metric, "period": lim.period,
            "period_start": _iso(m.start), "period_end": _iso(m.end), "limit": m.amount,
            "spent": round(m.spent, 6), "fraction": round(m.spent / m.amount, 4),
            "projected": None if projected is None else round(projected, 6),
            "projected_exhaustion_at": None if exhaust is None else _iso(exhaust),
            "stage": stage,
            # Budgets are distinct alerts even for the same subject.
            "alert_key": f"{lim.name}/{m.metric}",
        }
        if m.consumer is None:
            top = sorted(m.by_consumer.items(), key=lambda kv: -kv[1])[: self.config.top_consumers]
            evidence["consumers"] = [{"consumer": c, "spent": round(v, 6)} for c, v in top]
        fid = Finding.episode_id("budget_exceeded", scope, f"{subject}|{lim.name}|{m.metric}",
                                 m.tenant, m.start)
        return Finding(
            finding_id=fid, kind="budget_exceeded",
            severity="critical" if exceeded else "warning",
            scope=scope,  # type: ignore[arg-type]
            subject=subject, tenant=m.tenant, consumer=m.consumer, model=None,
            first_event_ts=m.first_ts or m.start, detected_at=m.detected_at or ts,
            updated_at=ts, resolved_at=m.end if status == "resolved" else None,
            status=status,  # type: ignore[arg-type]
            observed=round(m.spent, 6), baseline=round(m.amount * elapsed / total, 6),
            threshold=m.amount, evidence=evidence,
            action="block" if exceeded else "alert", summary=summary, revision=m.revision,
        )

    def status(self) -> list[dict[str, Any]]:
        """Current spend per budget (for the API / CLI)."""
        with self._lock:
            return [
                {"budget": m.limit.name, "metric": m.metric, "period": m.limit.period,
                 "tenant": m.tenant, "consumer": m.consumer, "period_start": _iso(m.start),
                 "period_end": _iso(m.end), "limit": m.amount, "spent": round(m.spent, 6),
                 "fraction": round(m.spent / m.amount, 4)}
                for m in self._meters.values()
            ]
