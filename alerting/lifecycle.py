"""Alert lifecycle: one alert per episode, firing -> updated -> resolved.

An alert is identified by a stable **fingerprint** made of the finding's
``kind``, ``scope``, ``subject`` and ``tenant`` (plus the budget name for
budget findings): the same values always give the same fingerprint and the
same Alertmanager labels, so Alertmanager deduplicates and groups them, and a
new episode of the same behaviour re-fires the same alert.

:class:`AlertBook` turns findings into :class:`Notification` objects:

* a firing finding with no active alert for its fingerprint -> ``firing``;
* a newer revision (or another episode) while the alert is active ->
  ``updated`` (a repeated or older revision is a duplicate: nothing);
* a resolved finding of the active episode -> ``resolved`` (``endsAt`` set);
* :meth:`AlertBook.due_resends` -> ``resend`` notifications for the alerts
  still firing whose last notification is older than ``resend_interval_s``
  (Alertmanager resolves an alert that is not re-sent within its
  ``resolve_timeout``).

Notifications are immutable snapshots: the sink threads never see an alert
change under them.  Times: ``startsAt`` is the finding's detection time (event
time, never later than the wall clock); ``endsAt`` the wall-clock time the
resolution was seen.

>>> from datetime import datetime, UTC
>>> from detectors.finding import Finding
>>> t = datetime(2026, 1, 1, tzinfo=UTC)
>>> now = [t.timestamp()]
>>> book = AlertBook(LifecycleConfig(resend_interval_s=60), clock=lambda: now[0])
>>> f = Finding.new(kind="retry_storm", severity="warning", scope="consumer",
...                 subject="app-1", first_event_ts=t, detected_at=t,
...                 observed=40, baseline=1, threshold=8)
>>> [(n.event, n.labels["alertname"]) for n in book.apply(f, "alert only")]
[('firing', 'TokenwardRetryStorm')]
>>> book.apply(f, "alert only")
[]
>>> now[0] += 61
>>> [n.event for n in book.due_resends()]
['resend']
>>> [n.event for n in book.apply(f.model_copy(update={"status": "resolved", "revision": 1}))]
['resolved']
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from alerting.policy import check_keys, get_number, parse_duration
from detectors.finding import Finding


def alertname(kind: str) -> str:
    """``retry_storm`` -> ``TokenwardRetryStorm``."""
    return "Tokenward" + "".join(p.capitalize() for p in kind.split("_"))


def fingerprint(f: Finding) -> str:
    """Stable id of the alert for a finding (independent of the episode)."""
    key = f"{f.kind}|{f.scope}|{f.subject}|{f.tenant}|{f.evidence.get('alert_key', '')}"
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(x: float) -> str:
    return f"{x:.4g}"


def labels_for(f: Finding) -> dict[str, str]:
    """Alertmanager labels: they identify the alert, so only stable values."""
    labels = {
        "alertname": alertname(f.kind),
        "severity": f.severity,
        "tenant": f.tenant,
        "kind": f.kind,
        "scope": f.scope,
        "subject": f.subject,
    }
    if f.consumer:
        labels["consumer"] = f.consumer
    if f.model:
        labels["model"] = f.model
    if f.evidence.get("alert_key"):
        labels["budget"] = str(f.evidence["alert_key"])
    return labels


def annotations_for(f: Finding, action: str, runbook_url: str) -> dict[str, str]:
    what = f.kind.replace("_", " ")
    where = f"{f.scope} {f.subject} (tenant {f.tenant}" + (f", model {f.model})" if f.model
                                                          else ")")
    evidence = json.dumps(f.evidence, default=str, sort_keys=True, separators=(",", ":"))
    if len(evidence) > 600:
        evidence = evidence[:597] + "..."
    desc = (f"{what} on {where}: observed {_num(f.observed)} vs baseline {_num(f.baseline)} "
            f"(threshold {_num(f.threshold)}), since {iso(f.first_event_ts)}. "
            f"Action: {action}. Evidence: {evidence}")
    ann = {
        "summary": f.summary or f"{what} on {f.scope} {f.subject}",
        "description": desc,
        "action": action,
        "observed": _num(f.observed),
        "baseline": _num(f.baseline),
        "threshold": _num(f.threshold),
        "finding_id": f.finding_id,
        "revision": str(f.revision),
    }
    if runbook_url:
        ann["runbook_url"] = runbook_url
    return ann


@dataclass(frozen=True)
class LifecycleConfig:
    resend_interval_s: float = 60.0  # keep < Alertmanager's resolve_timeout (default 5m)
    history_s: float = 86400.0  # resolved alerts kept for the API this long
    max_alerts: int = 10_000  # alerts kept in memory (the oldest resolved ones go first)

    KEYS = ("resend_interval", "history", "max_alerts")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "alerting") -> LifecycleConfig:
        check_keys(d, cls.KEYS, where)
        return cls(
            resend_interval_s=parse_duration(d.get("resend_interval", 60),
                                             f"{where}.resend_interval"),
            history_s=parse_duration(d.get("history", 86400), f"{where}.history"),
            max_alerts=int(get_number(d, "max_alerts", where, 10_000, lo=10)),
        )


@dataclass(frozen=True)
class Notification:
    """One thing to tell the sinks about one alert (an immutable snapshot)."""

    event: str  # firing | updated | resolved | resend
    fingerprint: str
    state: str  # firing | resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime | None
    finding: Finding
    group_key: str
    previous_labels: Mapping[str, str] | None = None  # labels changed (e.g. severity)
    at: float = 0.0  # wall clock when it was made
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def alert_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "state": self.state,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": iso(self.starts_at),
            "endsAt": iso(self.ends_at),
            "finding_id": self.finding.finding_id,
        }


@dataclass
class Alert:
    fingerprint: str
    finding: Finding
    state: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: datetime
    ends_at: datetime | None
    action: str
    last_sent: float
    updated: float

    @property
    def finding_id(self) -> str:
        return self.finding.finding_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "state": self.state,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": iso(self.starts_at),
            "endsAt": iso(self.ends_at),
            "finding_id": self.finding_id,
            "revision": self.finding.revision,
            "updatedAt": iso(datetime.fromtimestamp(self.updated, UTC)),
        }


class AlertBook:
    """The alerts tokenward knows about.  Thread-safe."""

    def __init__(self, config: LifecycleConfig | None = None, *,
                 runbook_url: Callable[[str], str] = lambda kind: "",
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or LifecycleConfig()
        self.runbook_url = runbook_url
        self.clock = clock
        self._alerts: dict[str, Alert] = {}
        self._lock = threading.Lock()

    def _note(self, a: Alert, event: str, now: float,
              previous: Mapping[str, str] | None = None) -> Notification:
        return Notification(
            event=event, fingerprint=a.fingerprint, state=a.state, labels=dict(a.labels),
            annotations=dict(a.annotations), starts_at=a.starts_at, ends_at=a.ends_at,
            finding=a.finding, group_key=f"{a.labels['tenant']}/{a.labels['kind']}",
            previous_labels=dict(previous) if previous is not None else None, at=now)

    def apply(self, f: Finding, action: str | None = None) -> list[Notification]:
        """Feed one finding; ``action`` is what the policy did (annotation).
        Returns the notifications to send (none for a duplicate)."""
        now = self.clock()
        now_dt = datetime.fromtimestamp(now, UTC)
        fp = fingerprint(f)
        with self._lock:
            a = self._alerts.get(fp)
            if f.status == "resolved":
                if a is None or a.state != "firing" or a.finding_id != f.finding_id:
                    return []
                a.state = "resolved"
                a.finding = f
                a.ends_at = now_dt
                a.annotations = annotations_for(f, a.action, self.runbook_url(f.kind))
                a.last_sent = a.updated = now
                return [self._note(a, "resolved", now)]
            if a is not None and a.state == "firing":
                if a.finding_id == f.finding_id and f.revision <= a.finding.revision:
                    return []  # a duplicate (replayed batch) or an older revision
                act = action if action is not None else a.action
                labels = labels_for(f)
                previous = a.labels if labels != a.labels else None
                a.finding, a.labels, a.action = f, labels, act
                a.annotations = annotations_for(f, act, self.runbook_url(f.kind))
                a.last_sent = a.updated = now
                return [self._note(a, "updated", now, previous)]
            act = action or "alert only"
            # a reopened episode (a spike that came back) fires again from
            # when it came back, not from its first detection
            start = f.detected_at
            if f.evidence.get("recurrences") and f.updated_at is not None:
                start = f.updated_at
            a = Alert(fingerprint=fp, finding=f, state="firing", labels=labels_for(f),
                      annotations=annotations_for(f, act, self.runbook_url(f.kind)),
                      starts_at=min(start, now_dt), ends_at=None, action=act,
                      last_sent=now, updated=now)
            self._alerts.pop(fp, None)  # re-insert: dict order = recency
            self._alerts[fp] = a
            self._prune(now)
            return [self._note(a, "firing", now)]

    def due_resends(self, now: float | None = None) -> list[Notification]:
        """Firing alerts not notified for ``resend_interval_s``; marks them sent."""
        now = self.clock() if now is None else now
        out = []
        with self._lock:
            for a in self._alerts.values():
                if a.state == "firing" and now - a.last_sent >= self.config.resend_interval_s:
                    a.last_sent = now
                    out.append(self._note(a, "resend", now))
            self._prune(now)
        return out

    def get(self, fp: str) -> dict[str, Any] | None:
        with self._lock:
            a = self._alerts.get(fp)
            return a.to_dict() if a is not None else None

    def alerts(self, state: str | None = None, *, tenant: str | None = None,
               kind: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Current and recent alerts, newest first."""
        with self._lock:
            sel = [a for a in self._alerts.values()
                   if (state is None or a.state == state)
                   and (tenant is None or a.labels.get("tenant") == tenant)
                   and (kind is None or a.labels.get("kind") == kind)]
            sel.sort(key=lambda a: a.updated, reverse=True)
            return [a.to_dict() for a in sel[: max(0, limit)]]

    def active_count(self) -> int:
        with self._lock:
            return sum(1 for a in self._alerts.values() if a.state == "firing")

    def _prune(self, now: float) -> None:
        lo = now - self.config.history_s
        for fp in [fp for fp, a in self._alerts.items()
                   if a.state == "resolved" and a.updated < lo]:
            del self._alerts[fp]
        excess = len(self._alerts) - self.config.max_alerts
        if excess > 0:  # drop the oldest resolved first, then the oldest firing
            order = sorted(self._alerts.values(),
                           key=lambda a: (a.state == "firing", a.updated))
            for a in order[:excess]:
                del self._alerts[a.fingerprint]
