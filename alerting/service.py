"""The alerting service: findings in, alerts and blocks out.

Built by the composition root (:func:`build`, called by
``api.service.build_alerting``) from the policy file
(``settings.policy_file``, TOML: ``[policy]``, ``[budgets]``, ``[sinks]``,
``[alerting]``; see ``deploy/policy.example.toml``).  A bad file stops the
start-up with a message naming the key and what to fix.

Per finding (:meth:`AlertingService.handle`):

1. the :class:`~alerting.policy.Policy` decides: alert, block, both, nothing;
2. a block goes to the :class:`~alerting.blocklist.BlockList` (once per
   episode: a finding's later revisions do not block again, but an episode
   that escalates to a blocking severity is blocked then).  In dry-run the
   block list records a ``would_block`` audit row and publishes nothing;
3. the alert goes through the :class:`~alerting.lifecycle.AlertBook`
   (dedup per episode, firing/updated/resolved) to every sink's queue
   (:class:`~alerting.sinks.SinkWorker`: never blocks the caller).

A resolved finding resolves its alert but **does not lift the block**: a
retry storm "resolves" precisely because its consumer is blocked (no more
events reach the detectors), so unblocking on resolve would restart the storm
at once.  Blocks end at their TTL (escalated for repeat offenders) or by an
operator's unblock.

A background thread runs :meth:`AlertingService.tick` every ``tick`` seconds:
re-sends firing alerts to Alertmanager and expires blocks.

Budgets: :attr:`AlertingService.budgets` is a pure
:class:`~alerting.budget.BudgetTracker` on event time.  The pipeline must feed
it the new (non-duplicate, priced) events with :meth:`observe_events` and the
event-time clock with :meth:`advance`, store the returned findings with the
batch, and pass them to :meth:`handle` like detector findings.
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from alerting.budget import PERIODS, BudgetConfig, BudgetTracker, EventLike, period_bounds
from alerting.lifecycle import AlertBook, LifecycleConfig, Notification, fingerprint
from alerting.policy import (
    Decision,
    Policy,
    PolicyConfig,
    check_keys,
    fmt_duration,
    parse_duration,
)
from alerting.sinks import (
    AlertMetrics,
    NullMetrics,
    SinksConfig,
    SinkWorker,
    build_sink,
)
from detectors.finding import Finding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlertingConfig:
    """Everything in the policy file."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    tick_s: float = 5.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], env: Mapping[str, str] | None = None
                  ) -> AlertingConfig:
        check_keys(d, ("policy", "budgets", "sinks", "alerting"), "policy file")
        al = dict(d.get("alerting", {}))
        check_keys(al, (*LifecycleConfig.KEYS, "tick"), "alerting")
        tick = parse_duration(al.pop("tick", 5), "alerting.tick")
        return cls(
            policy=PolicyConfig.from_dict(d.get("policy", {})),
            budgets=BudgetConfig.from_dict(d.get("budgets", {})),
            sinks=SinksConfig.from_dict(d.get("sinks", {}), env=env),
            lifecycle=LifecycleConfig.from_dict(al),
            tick_s=tick,
        )

    @classmethod
    def load(cls, path: str | None, env: Mapping[str, str] | None = None) -> AlertingConfig:
        """Read the TOML file (None: all defaults, no sinks).  Raises ValueError
        with the file name and the bad key."""
        if not path:
            return cls()
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read the policy file {path}: {exc}") from None
        try:
            return cls.from_dict(raw, env=env)
        except ValueError as exc:
            raise ValueError(f"policy file {path}: {exc}") from None


def _reason(f: Finding) -> str:
    text = f.summary or (f"observed {f.observed:.4g} vs baseline {f.baseline:.4g} "
                         f"(threshold {f.threshold:.4g})")
    return f"{f.kind} ({f.severity}): {text}"[:300]


def _decision_label(d: Decision, status: str) -> str:
    if status != "firing":
        return "resolved"
    if d.stale:
        return "stale"
    if d.block:
        return "would_block" if d.dry_run else "block"
    return "alert" if d.alert else "none"


class AlertingService:
    """Carries out the policy.  Thread-safe: ``handle`` (pipeline thread),
    ``tick`` (its own thread) and ``alerts`` (API threads) may run at once."""

    def __init__(
        self,
        config: AlertingConfig,
        blocklist: Any,
        workers: Sequence[SinkWorker] = (),
        metrics: AlertMetrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.blocklist = blocklist
        self.workers = list(workers)
        self.metrics: AlertMetrics = metrics or NullMetrics()
        self.clock = clock
        self.policy = Policy(config.policy, clock)
        self.book = AlertBook(config.lifecycle, runbook_url=config.policy.runbook_url,
                              clock=clock)
        self.budgets = BudgetTracker(config.budgets)
        self._acted: dict[str, tuple[float, str]] = {}  # finding_id -> (when, action text)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # the tick loop: stop, or a block expires sooner
        listeners = getattr(blocklist, "expiry_listeners", None)
        if listeners is not None:
            listeners.append(self._wake.set)
        self._thread: threading.Thread | None = None

    # -- findings -------------------------------------------------------------------
    def handle(self, findings: Sequence[Finding]) -> None:
        """Decide, block and alert for a batch of new/updated/resolved findings.
        Never raises (alerting must not fail ingestion); never waits for a sink."""
        notes: list[Notification] = []
        with self._lock:
            for f in findings:
                try:
                    notes.extend(self._handle_one(f))
                except Exception:
                    log.exception("alerting failed for finding %s (%s)", f.finding_id, f.kind)
        self._dispatch(notes)

    def _handle_one(self, f: Finding) -> list[Notification]:
        d = self.policy.decide(f)
        self.metrics.policy_decision(f.kind, _decision_label(d, f.status))
        if f.status != "firing":
            return self.book.apply(f)
        if d.block:
            done = self._acted.get(f.finding_id)
            action = done[1] if done is not None else self._block(f, d)
        else:
            done = self._acted.get(f.finding_id)
            action = done[1] if done is not None else d.action_text()
        if not d.alert:
            return []
        return self.book.apply(f, action)

    def _block(self, f: Finding, d: Decision) -> str:
        from alerting.blocklist import AllowlistedError

        done, refused, failed = [], [], []
        for t in d.targets:
            try:
                self.blocklist.block(t.scope, t.value, reason=_reason(f),
                                     finding_id=f.finding_id, ttl_s=d.ttl_s,
                                     actor=self.config.policy.actor, tenant=t.tenant,
                                     dry_run=d.dry_run)
            except AllowlistedError:
                refused.append(t)
                continue
            except Exception as exc:
                log.error("could not block %s %s for finding %s: %s", t.scope, t.value,
                          f.finding_id, exc)
                failed.append(t)
                continue
            self.policy.record_block(t)
            done.append(t)
        if done:
            text = Decision(alert=d.alert, block=True, dry_run=d.dry_run, targets=tuple(done),
                            ttl_s=d.ttl_s, repeats=d.repeats).action_text()
        else:
            text = "alert only"
        if refused:
            text += "; not blocked (allowlisted): " + ", ".join(
                f"{t.scope} {t.value}" for t in refused[:5])
        if failed:
            text += "; BLOCK FAILED for " + ", ".join(f"{t.scope} {t.value}" for t in failed[:5])
        if not failed:  # a failed block is tried again at the next revision
            self._acted[f.finding_id] = (self.clock(), text)
            self._prune_acted()
        log.info("finding %s %s %s: %s", f.finding_id, f.kind, f.subject, text)
        return text

    def _prune_acted(self) -> None:
        if len(self._acted) < 50_000:
            return
        lo = self.clock() - 2 * 86400
        for k in [k for k, (t, _) in self._acted.items() if t < lo]:
            del self._acted[k]
        while len(self._acted) > 50_000:
            self._acted.pop(next(iter(self._acted)))

    def _dispatch(self, notes: list[Notification], *, resend_only: bool = False) -> None:
        if not notes:
            return
        for w in self.workers:
            if resend_only and not w.sink.resend:
                continue
            w.submit(notes)

    # -- budgets --------------------------------------------------------------------
    def observe_events(self, events: Iterable[EventLike]) -> list[Finding]:
        """Budget findings for new events (pure: nothing is stored or sent;
        the caller stores them with the batch and passes them to handle())."""
        if not self.budgets.enabled:
            return []
        out: list[Finding] = []
        latest: datetime | None = None
        for e in events:
            out.extend(self.budgets.observe(e))
            if latest is None or e.ts > latest:
                latest = e.ts
        if latest is not None:
            out.extend(self.budgets.advance(latest))
        return out

    def advance(self, now: datetime) -> list[Finding]:
        """Move the budgets' event-time clock (resolves ended periods)."""
        return self.budgets.advance(now) if self.budgets.enabled else []

    # -- periodic -------------------------------------------------------------------
    def tick(self) -> None:
        """Re-send firing alerts that are due; expire blocks."""
        try:
            self._dispatch(self.book.due_resends(), resend_only=True)
        except Exception:
            log.exception("alert re-send failed")
        try:
            self.blocklist.expire()
        except Exception as exc:  # the store may be down: tried again next tick
            log.warning("block expiry failed: %s", exc)

    def start(self) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            # Wake at the tick, or sooner when a block's TTL runs out: gateways
            # already stop refusing at the TTL (check() enforces it), and the
            # ``expire`` audit row and block-topic tombstone should follow it
            # within a fraction of a second, not a whole tick later.
            tick_s = self.config.tick_s
            next_tick = time.monotonic() + tick_s
            early = True  # False after a failed expiry: the store may be down, wait for the tick
            while True:
                wait = next_tick - time.monotonic()
                if early:
                    wait = min(wait, self.blocklist.next_expiry() - self.blocklist.clock() + 0.01)
                self._wake.wait(max(0.05, wait))
                self._wake.clear()
                if self._stop.is_set():
                    return
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick_s
                    early = True
                    self.tick()
                elif early and self.blocklist.next_expiry() <= self.blocklist.clock():
                    try:
                        self.blocklist.expire()
                    except Exception as exc:
                        early = False
                        log.warning("block expiry failed (retried at the next tick): %s", exc)

        self._thread = threading.Thread(target=loop, name="alerting-tick", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.close(timeout=max(0.1, deadline - time.monotonic()))
        close = getattr(self.blocklist, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:
                log.warning("block list close failed: %s", exc)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every sink delivered (or dropped) what is queued (tests, CLI)."""
        deadline = time.monotonic() + timeout
        return all(w.flush(max(0.0, deadline - time.monotonic())) for w in self.workers)

    # -- reads (API) ------------------------------------------------------------------
    def alerts(self, state: str | None = None, *, tenant: str | None = None,
               kind: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Current and recent alerts, newest first: dicts with ``fingerprint``,
        ``state``, ``labels``, ``annotations``, ``startsAt``, ``endsAt``,
        ``finding_id``, ``revision``, ``updatedAt``."""
        return self.book.alerts(state, tenant=tenant, kind=kind, limit=limit)

    def alert_for(self, f: Finding) -> dict[str, Any] | None:
        return self.book.get(fingerprint(f))

    def budget_status(self) -> list[dict[str, Any]]:
        return self.budgets.status()

    def describe(self) -> dict[str, Any]:
        """The effective configuration, for operators (no secrets)."""
        p = self.config.policy
        return {
            "dry_run": p.dry_run,
            "stale_after_s": p.stale_after_s,
            "rules": {k: {"alert": r.alert, "alert_min_severity": r.alert_min_severity,
                          "block": r.block, "block_min_severity": r.block_min_severity,
                          "block_ttl": r.block_ttl if isinstance(r.block_ttl, str)
                          else fmt_duration(r.block_ttl), "dry_run": r.dry_run}
                      for k, r in p.rules.items()},
            "overrides": [o.describe() for o in p.overrides],
            "escalation": asdict(p.escalation),
            "allowlist": {k: sorted(v) for k, v in asdict(p.allowlist).items()},
            "budgets": [b.name for b in self.config.budgets.limits],
            "sinks": [{"type": s.type, "name": s.name} for s in self.config.sinks.sinks],
        }


# -- start-up from the store -------------------------------------------------------------
def seed_from_store(svc: AlertingService, store: Any) -> None:
    """Restore what a restart would forget: recent blocks (escalation) and
    the spend of the current budget periods.  Failures are logged, not fatal."""
    now = svc.clock()
    try:
        lo = datetime.fromtimestamp(now - svc.config.policy.escalation.window_s, UTC)
        rows = store.query(
            "SELECT scope, value, toUnixTimestamp64Milli(at) AS at_ms FROM tokenward.blocks "
            "WHERE event IN ('block', 'would_block') AND at >= {lo:DateTime64(3, 'UTC')}",
            {"lo": lo}, readonly=True)
        svc.policy.seed_history((r["scope"], r["value"], int(r["at_ms"]) / 1000)
                                for r in rows)
    except Exception as exc:
        log.warning("could not load recent blocks for escalation: %s", exc)
    periods = {lim.period for lim in svc.config.budgets.limits}
    for period in PERIODS:
        if period not in periods:
            continue
        start, _ = period_bounds(period, datetime.fromtimestamp(now, UTC))
        try:
            rows = store.query(
                "SELECT tenant, consumer, sum(cost) AS cost, "
                "sum(input_tokens + output_tokens) AS tokens, "
                "toUnixTimestamp64Milli(max(ts)) AS last_ms "
                "FROM tokenward.usage_events FINAL "
                "WHERE ts >= {lo:DateTime64(3, 'UTC')} GROUP BY tenant, consumer",
                {"lo": start}, readonly=True)
        except Exception as exc:
            log.warning("could not load the %sly budget spend: %s", period, exc)
            continue
        if not rows:
            continue
        wm = datetime.fromtimestamp(max(int(r["last_ms"]) for r in rows) / 1000, UTC)
        svc.budgets.seed(period, ((r["tenant"], r["consumer"], float(r["cost"]),
                                   float(r["tokens"])) for r in rows), wm)
        log.info("budgets: restored %sly spend of %d consumer(s) up to %s", period, len(rows),
                 wm.isoformat())


def build(settings: Any, store: Any, metrics: AlertMetrics | None = None, *,
          start: bool = True) -> AlertingService:
    """The alerting service for ``settings`` (reads ``settings.policy_file``).
    Exits with a clear message when the policy file is wrong."""
    from alerting.blocklist import BlockList, KafkaBlockPublisher

    path = getattr(settings, "policy_file", None)
    try:
        config = AlertingConfig.load(path)
    except ValueError as exc:
        raise SystemExit(f"tokenward: {exc}") from None
    publisher = None
    bootstrap = getattr(settings, "kafka_bootstrap", None)
    if bootstrap:
        try:
            publisher = KafkaBlockPublisher(bootstrap,
                                            getattr(settings, "kafka_block_topic",
                                                    "tokenward.blocks"))
        except Exception as exc:  # gateways can still poll the API
            log.error("block commands will not be pushed to Kafka: %s", exc)
    blocklist = BlockList(store, publisher,
                          allowlist=config.policy.allowlist.for_blocklist())
    workers = [SinkWorker(build_sink(c), c.retry, metrics) for c in config.sinks.sinks]
    svc = AlertingService(config, blocklist, workers, metrics)
    seed_from_store(svc, store)
    if config.policy.dry_run:
        log.warning("policy dry-run: blocks are recorded as would_block and not enforced")
    if start:
        svc.start()
    return svc
