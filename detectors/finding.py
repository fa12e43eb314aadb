"""Finding: what a detector reports (DESIGN.md, "Finding").

A finding describes one *episode* (a storm, a spike, a loop), not one event:
while the episode goes on its finding is updated under the same
``finding_id``; when the behaviour stops the finding is resolved.

>>> from datetime import datetime, UTC
>>> f = Finding.new(kind="retry_storm", severity="critical", scope="consumer",
...                 subject="app-1", tenant="acme", model="gpt-4o",
...                 first_event_ts=datetime(2026, 1, 1, tzinfo=UTC),
...                 detected_at=datetime(2026, 1, 1, 0, 0, 9, tzinfo=UTC),
...                 observed=40, baseline=1.2, threshold=8)
>>> f.finding_id == Finding.episode_id("retry_storm", "consumer", "app-1", "acme",
...                                    datetime(2026, 1, 1, tzinfo=UTC))
True
>>> f.status
'firing'
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal[
    "runaway_reasoning",
    "retry_storm",
    "failure_spike",
    "token_spike",
    "cost_spike",
    "agent_loop",
    "context_bloat",
    "budget_exceeded",
    "cache_opportunity",
]
KINDS: tuple[str, ...] = Kind.__args__  # type: ignore[attr-defined]
Severity = Literal["info", "warning", "critical"]
# "tenant": budget findings for a whole tenant (alerting/budget.py)
Scope = Literal["consumer", "user", "model", "session", "tenant"]
Action = Literal["alert", "block", "none"]
Status = Literal["firing", "resolved"]


class Finding(BaseModel):
    """One anomaly episode. Field meanings follow DESIGN.md."""

    model_config = ConfigDict(frozen=True)

    finding_id: str
    kind: Kind
    severity: Severity
    scope: Scope
    subject: str
    tenant: str = "default"
    consumer: str | None = None  # the consumer to act on, when there is one
    model: str | None = None
    first_event_ts: datetime
    detected_at: datetime  # event-time clock
    updated_at: datetime | None = None  # event time of the latest update
    resolved_at: datetime | None = None
    status: Status = "firing"
    observed: float
    baseline: float
    threshold: float
    evidence: dict[str, Any] = Field(default_factory=dict)
    action: Action = "alert"
    summary: str = ""
    revision: int = 0  # bumps with every update of the same episode

    @staticmethod
    def episode_id(kind: str, scope: str, subject: str, tenant: str, first: datetime) -> str:
        """Stable id of an episode: the same input always gives the same id,
        which keeps replays deterministic and alert fingerprints stable."""
        key = f"{kind}|{scope}|{subject}|{tenant}|{first.isoformat()}"
        return hashlib.blake2b(key.encode(), digest_size=10).hexdigest()

    @classmethod
    def new(cls, **kw: Any) -> Finding:
        kw.setdefault("consumer", kw["subject"] if kw.get("scope") == "consumer" else None)
        fid = cls.episode_id(kw["kind"], kw["scope"], kw["subject"], kw.get("tenant", "default"),
                             kw["first_event_ts"])
        return cls(finding_id=fid, **kw)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
