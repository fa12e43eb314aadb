"""Episodes: one finding per anomaly episode, updated and resolved on the
event-time clock.

A detector *touches* an episode every time it sees the behaviour again.  The
first touch emits revision 0; later touches emit a new revision only when the
severity or action escalates, when ``observed`` grew by ``growth`` since the
last emission, or at most every ``interval_s`` of event time.  An episode that
was not touched for its ``quiet_s`` is resolved (``status="resolved"``,
``resolved_at`` = last touch + quiet_s, a deterministic event time).

Some behaviour comes and goes: a bursty consumer's token rate spikes, calms
down and spikes again to the same level an hour later.  A kind touched with
``reopen_s`` keeps its resolved episode that long; the behaviour coming back
within that time at no more than ``reopen_ratio`` x the episode's peak
reopens it (a new revision, firing again, ``evidence["recurrences"]``
counted) instead of opening a second episode: the SRE already knows this
consumer does it.  Bigger than that, at a higher severity, or of another
class of behaviour (``cls``), at once or as it grows, it is news: a new
episode (a reopened one that grows past the bar or escalates is resolved
then).

>>> book = EpisodeBook(interval_s=300, growth=1.5)
>>> [f] = book.touch(kind="retry_storm", scope="consumer", subject="app", tenant="t",
...                consumer="app", model=None, now=100.0, first_ts=95.0, observed=10,
...                baseline=1, threshold=6, severity="warning", action="block",
...                summary="s", evidence={}, quiet_s=60)
>>> f.revision, f.status
(0, 'firing')
>>> book.touch(kind="retry_storm", scope="consumer", subject="app", tenant="t",
...            consumer="app", model=None, now=101.0, first_ts=95.0, observed=11,
...            baseline=1, threshold=6, severity="warning", action="block",
...            summary="s", evidence={}, quiet_s=60)
[]
>>> [(r.revision, r.status) for r in book.resolve_due(200.0)]
[(1, 'resolved')]

A burst that comes back (``reopen_s``) reopens its episode, a bigger one does not:

>>> kw = dict(kind="token_spike", scope="consumer", subject="app", tenant="t", consumer="app",
...           model=None, baseline=1, threshold=6, severity="warning", action="alert",
...           summary="s", evidence={}, quiet_s=60, reopen_s=3600, reopen_ratio=2.0)
>>> [f] = book.touch(now=100.0, first_ts=100.0, observed=10, **kw)
>>> [(r.revision, r.status) for r in book.resolve_due(200.0)]
[(1, 'resolved')]
>>> [(r.finding_id == f.finding_id, r.revision, r.status, r.evidence)
...  for r in book.touch(now=1000.0, first_ts=1000.0, observed=15, **kw)]
[(True, 2, 'firing', {'recurrences': 1})]
>>> [(r.finding_id == f.finding_id, r.revision, r.status)  # it grew past 2 x 10
...  for r in book.touch(now=1030.0, first_ts=1000.0, observed=25, **kw)]
[(True, 3, 'resolved'), (False, 0, 'firing')]
>>> _ = book.resolve_due(2000.0)
>>> [r.revision for r in book.touch(now=3000.0, first_ts=3000.0, observed=60, **kw)]
[0]

Only behaviour of the same class reopens (a consumer's revoked key after
the provider's 5xx):

>>> kw3 = dict(kw, kind="failure_spike", subject="fs", consumer="fs")
>>> [f] = book.touch(now=0.0, first_ts=0.0, observed=0.5, cls="upstream", **kw3)
>>> _ = book.resolve_due(100.0)
>>> [(r.finding_id == f.finding_id, r.revision)
...  for r in book.touch(now=200.0, first_ts=200.0, observed=0.5, cls="client", **kw3)]
[(False, 0)]

A long episode that rises far past the peak of its first
``regrow_after_s`` (``regrow_ratio``; checked once it is that old) ends,
and the rise is a finding of its own:

>>> kw2 = dict(kw, subject="svc", consumer="svc", quiet_s=900, regrow_ratio=4.0,
...            regrow_after_s=600.0)
>>> [f] = book.touch(now=0.0, first_ts=0.0, observed=10, **kw2)
>>> [(r.finding_id == f.finding_id, r.status)  # 5x, but only 5 min in: the same episode
...  for r in book.touch(now=300.0, first_ts=300.0, observed=50, **kw2)]
[(True, 'firing')]
>>> [(r.finding_id == f.finding_id, r.status)  # 15 min in: 3.6x that peak of 50
...  for r in book.touch(now=900.0, first_ts=900.0, observed=180, **kw2)]
[(True, 'firing')]
>>> [(r.finding_id == f.finding_id, r.status)  # 4.4x it, though 1.2x the peak so far
...  for r in book.touch(now=960.0, first_ts=960.0, observed=220, **kw2)]
[(True, 'resolved'), (False, 'firing')]
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from .finding import Finding
from .record import Record

_SEV_RANK: Final = {"info": 0, "warning": 1, "critical": 2}
_ACT_RANK: Final = {"none": 0, "alert": 1, "block": 2}


def dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Episode(Record):
    __slots__ = ("action", "baseline", "cls", "consumer", "detected_ts", "early_peak", "evidence",
                 "finding_id", "first_ts", "kind", "last_emit_obs", "last_emit_ts", "last_touch",
                 "model", "observed", "peak", "quiet_s", "recurrences", "reopen_base",
                 "reopen_ratio", "reopen_s", "resolved_ts", "revision", "scope", "severity",
                 "size_peak", "subject", "summary", "tenant", "threshold", "touches")
    action: str
    baseline: float
    cls: str  # the class of behaviour a reopening must share (``cls`` of touch)
    consumer: str | None
    detected_ts: float
    early_peak: float  # the peak of its first regrow_after_s (see EpisodeBook.touch)
    evidence: dict[str, Any]
    finding_id: str
    first_ts: float
    kind: str
    last_emit_obs: float
    last_emit_ts: float
    last_touch: float
    model: str | None
    observed: float
    peak: float
    quiet_s: float
    recurrences: int
    reopen_base: float  # the peak before it reopened
    reopen_ratio: float
    reopen_s: float
    resolved_ts: float
    revision: int
    scope: str
    severity: str
    # the largest size the reopen tests compare (``size`` of EpisodeBook.touch;
    # the observed value unless a kind reports in mixed units)
    size_peak: float
    subject: str
    summary: str
    tenant: str
    threshold: float
    touches: int

    def finding(self, status: str = "firing", resolved_at: float | None = None,
                now: float | None = None) -> Finding:
        kw: dict[str, Any] = dict(
            finding_id=self.finding_id, kind=self.kind, severity=self.severity,
            scope=self.scope, subject=self.subject, tenant=self.tenant,
            consumer=self.consumer, model=self.model, first_event_ts=dt(self.first_ts),
            detected_at=dt(self.detected_ts),
            updated_at=dt(now if now is not None else self.last_touch),
            resolved_at=dt(resolved_at) if resolved_at is not None else None,
            status=status, observed=float(self.observed),
            baseline=float(self.baseline), threshold=float(self.threshold),
            evidence=dict(self.evidence), action=self.action,
            summary=self.summary, revision=self.revision)
        return Finding(**kw)


class EpisodeBook:
    """Open episodes keyed by (kind, scope, subject, tenant); a kind kept in
    parts (``part`` of :meth:`touch`) is keyed ("kind|part", ...)."""

    def __init__(self, interval_s: float = 300.0, growth: float = 1.5) -> None:
        self.open: dict[tuple[str, str, str, str], Episode] = {}
        # open episodes per subject: a cheap "nothing open for this consumer"
        # test before building the (kind, scope, subject, tenant) key
        self.subjects: dict[str, int] = {}
        # resolved episodes that may still reopen (touched with reopen_s)
        self.closed: dict[tuple[str, str, str, str], Episode] = {}
        self.interval_s = interval_s
        self.growth = growth

    @staticmethod
    def key(kind: str, scope: str, subject: str, tenant: str,
            part: str = "") -> tuple[str, str, str, str]:
        """The key of an episode (a kind kept in parts: "kind|part")."""
        return (kind if not part else f"{kind}|{part}", scope, subject, tenant)

    def get(self, kind: str, scope: str, subject: str, tenant: str) -> Episode | None:
        return self.open.get((kind, scope, subject, tenant))

    def touch(self, *, kind: str, scope: str, subject: str, tenant: str,
              consumer: str | None, model: str | None, now: float, first_ts: float,
              observed: float, baseline: float, threshold: float, severity: str,
              action: str, summary: str, evidence: dict[str, Any], quiet_s: float,
              reopen_s: float = 0.0, reopen_ratio: float = 0.0,
              regrow_ratio: float = 0.0, regrow_after_s: float = 0.0,
              size: float = -1.0, part: str = "", cls: str = "") -> list[Finding]:
        """Open or update an episode; return the findings to emit (a resolution
        of an expired episode under the same key comes first).  A non-empty
        ``part`` keeps separate episodes (and finding ids) for one subject
        (runaway_reasoning: one per model of the consumer).  An episode
        open for ``regrow_after_s`` that rises past ``regrow_ratio`` x the
        peak of its first ``regrow_after_s`` ends, and a new one opens (0:
        never).  The reopen tests
        compare ``size`` (>= 0) instead of ``observed``: a kind whose findings
        report values in different units (runaway_reasoning: tokens or
        seconds, by rule) passes one unit for all of them.  Only behaviour of
        the same ``cls`` reopens an episode (failure_spike: upstream or
        client errors, different causes with different owners), and never at
        a higher severity or action than the episode had: an escalation is
        news, at once or once the episode has reopened."""
        key = self.key(kind, scope, subject, tenant, part)
        sz = size if size >= 0.0 else observed
        ep = self.open.get(key)
        out: list[Finding] = []
        if ep is not None and now - ep.last_touch > ep.quiet_s:
            out = self.resolve_due(now, key)
            ep = None
        elif (ep is not None and regrow_ratio > 0.0 and now - ep.detected_ts >= regrow_after_s
              and observed > regrow_ratio * getattr(ep, "early_peak", ep.peak)):
            # a far bigger behaviour inside a long episode is news (its first
            # minutes' peak: a sliding window rises by steps, each a fraction
            # more than the peak so far)
            out = [self._close(key, ep, now, False)]
            ep = None
        elif ep is not None and ep.recurrences and (
                sz > ep.reopen_ratio * ep.reopen_base
                or _SEV_RANK[severity] > _SEV_RANK[ep.severity]
                or _ACT_RANK[action] > _ACT_RANK[ep.action]):
            # it came back, then grew past the bar or escalated (a runaway
            # call an hour turning into an attack): news after all.  The
            # reopened episode ends here and a new one opens
            out = [self._close(key, ep, now, False)]
            ep = None
        if ep is None and self.closed:
            old = self.closed.pop(key, None)
            # (episodes restored from before size_peak existed: their peak)
            old_size = getattr(old, "size_peak", old.peak) if old is not None else 0.0
            if (old is not None and now - old.resolved_ts <= old.reopen_s
                    and sz <= old.reopen_ratio * old_size
                    and getattr(old, "cls", "") == cls
                    and _SEV_RANK[severity] <= _SEV_RANK[old.severity]
                    and _ACT_RANK[action] <= _ACT_RANK[old.action]):
                old.recurrences += 1
                old.revision += 1
                old.touches += 1
                old.reopen_base = old_size
                if observed > old.peak:
                    old.peak = observed
                old.size_peak = max(old_size, sz)
                self._set(old, now, observed, baseline, threshold, severity, action, summary,
                          {**evidence, "recurrences": old.recurrences}, quiet_s)
                out.append(self._open(key, old, now, observed))
                return out
        if ep is None:
            ep = Episode()
            ep.kind, ep.scope, ep.subject, ep.tenant = kind, scope, subject, tenant
            ep.consumer, ep.model = consumer, model
            ep.first_ts = min(first_ts, now)
            ep.detected_ts = now
            ep.finding_id = Finding.episode_id(kind, scope,
                                               f"{subject}|{part}" if part else subject,
                                               tenant, dt(ep.first_ts))
            ep.revision = 0
            ep.touches = 1
            ep.peak = ep.early_peak = observed
            ep.size_peak = sz
            ep.cls = cls
            ep.recurrences = 0
            ep.reopen_base = 0.0
            ep.reopen_s, ep.reopen_ratio = reopen_s, reopen_ratio
            ep.resolved_ts = 0.0
            self._set(ep, now, observed, baseline, threshold, severity, action, summary,
                      evidence, quiet_s)
            out.append(self._open(key, ep, now, observed))
            return out
        ep.touches += 1
        if ep.recurrences:
            evidence = {**evidence, "recurrences": ep.recurrences}
        escalated = (_SEV_RANK[severity] > _SEV_RANK[ep.severity]
                     or _ACT_RANK[action] > _ACT_RANK[ep.action])
        if _SEV_RANK[severity] < _SEV_RANK[ep.severity]:
            severity = ep.severity  # an episode never de-escalates while open
        if _ACT_RANK[action] < _ACT_RANK[ep.action]:
            action = ep.action
        if observed > ep.peak:
            ep.peak = observed
            if now - ep.detected_ts < regrow_after_s:
                ep.early_peak = observed
        if sz > getattr(ep, "size_peak", ep.peak):
            ep.size_peak = sz
        self._set(ep, now, observed, baseline, threshold, severity, action, summary,
                  evidence, quiet_s)
        grew = abs(observed) >= self.growth * abs(ep.last_emit_obs) and observed != 0
        due = now - ep.last_emit_ts >= self.interval_s and observed != ep.last_emit_obs
        if escalated or grew or due:
            ep.revision += 1
            ep.last_emit_ts, ep.last_emit_obs = now, observed
            out.append(ep.finding())
        return out

    def keep_alive(self, kind: str, scope: str, subject: str, tenant: str, now: float) -> bool:
        """Mark an open episode as still going without new figures."""
        ep = self.open.get((kind, scope, subject, tenant))
        if ep is None or now - ep.last_touch > ep.quiet_s:
            return False
        if now > ep.last_touch:
            ep.last_touch = now
        return True

    def _open(self, k: tuple[str, str, str, str], ep: Episode, now: float,
              observed: float) -> Finding:
        """Put a new or reopened episode among the open ones; its finding."""
        ep.last_emit_ts, ep.last_emit_obs = now, observed
        self.open[k] = ep
        self.subjects[k[2]] = self.subjects.get(k[2], 0) + 1
        return ep.finding()

    def _close(self, k: tuple[str, str, str, str], ep: Episode, end: float,
               may_reopen: bool) -> Finding:
        """Resolve an open episode at ``end``; keep it for reopening if asked."""
        del self.open[k]
        n = self.subjects[k[2]] - 1
        if n:
            self.subjects[k[2]] = n
        else:
            del self.subjects[k[2]]
        ep.revision += 1
        f = ep.finding(status="resolved", resolved_at=end, now=end)
        if may_reopen:
            ep.resolved_ts = end
            self.closed[k] = ep
        return f

    @staticmethod
    def _set(ep: Episode, now: float, observed: float, baseline: float, threshold: float,
             severity: str, action: str, summary: str, evidence: dict[str, Any],
             quiet_s: float) -> None:
        ep.observed, ep.baseline, ep.threshold = observed, baseline, threshold
        ep.severity, ep.action, ep.summary, ep.evidence = severity, action, summary, evidence
        ep.quiet_s = quiet_s
        if now > getattr(ep, "last_touch", -1.0):
            ep.last_touch = now

    def resolve_due(self, now: float, key: tuple[str, str, str, str] | None = None,
                    ) -> list[Finding]:
        """Resolve episodes quiet for their quiet_s (all, or just ``key``)."""
        out: list[Finding] = []
        if key is None and self.closed:
            for k in [k for k, ep in self.closed.items() if now - ep.resolved_ts > ep.reopen_s]:
                del self.closed[k]
        keys = [key] if key is not None else list(self.open)
        for k in keys:
            ep = self.open.get(k)
            if ep is None:
                continue
            end = ep.last_touch + ep.quiet_s
            if now >= end:
                out.append(self._close(k, ep, end, ep.reopen_s > 0.0))
        return out
