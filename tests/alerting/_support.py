"""Helpers shared by the alerting tests (no fixtures here: other test files
in this folder belong to other people)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from alerting.lifecycle import Notification
from detectors.finding import Finding

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A settable wall clock."""

    def __init__(self, t: float = T0.timestamp()) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def finding(kind: str = "retry_storm", severity: str = "critical", scope: str = "consumer",
            subject: str = "app-1", tenant: str = "acme", *, at: datetime = T0,
            revision: int = 0, status: str = "firing", **kw: Any) -> Finding:
    base: dict[str, Any] = dict(kind=kind, severity=severity, scope=scope, subject=subject,
                                tenant=tenant, first_event_ts=at, detected_at=at,
                                observed=40.0, baseline=1.2, threshold=8.0,
                                summary=f"{kind} on {subject}")
    base.update(kw)
    f = Finding.new(**base)
    upd: dict[str, Any] = {"revision": revision, "status": status}
    if status == "resolved":
        upd["resolved_at"] = at
    return f.model_copy(update=upd)


class MemStore:
    """The part of ingest.store.Store the block list writes to."""

    def __init__(self) -> None:
        self.rows: list[Any] = []

    def write_blocks(self, rows: Sequence[Any]) -> None:
        self.rows.extend(rows)


class RecordingSink:
    """A real Sink implementation that keeps what it was given; it can be told
    to fail the next ``fail`` sends or to block until released."""

    def __init__(self, name: str = "rec", *, resend: bool = True, fail: int = 0,
                 permanent: bool = False) -> None:
        self.name = name
        self.resend = resend
        self.fail = fail
        self.permanent = permanent
        self.batches: list[list[Notification]] = []
        self.attempts = 0
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False

    def send(self, notes: Sequence[Notification]) -> None:
        from alerting.sinks import PermanentSinkError, SinkError

        self.gate.wait(10)
        self.attempts += 1
        if self.fail > 0:
            self.fail -= 1
            raise (PermanentSinkError if self.permanent else SinkError)("boom")
        self.batches.append(list(notes))

    @property
    def notes(self) -> list[Notification]:
        return [n for b in self.batches for n in b]

    def close(self) -> None:
        self.closed = True
