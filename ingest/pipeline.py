"""The pipeline: raw messages in, events priced, detected and stored.

Every source hands batches to :meth:`Pipeline.handle`.  Order of work for one
batch:

1. parse each message into OK or DROP(reason) (a bad message is recorded, never
   fatal);
2. price every event from the price table (a gateway's own cost is kept);
3. run the detectors on event time (one engine per Kafka partition: the
   partition owns its consumers' baselines);
4. store events, rejected inputs and findings in one write; if the store fails
   the whole batch raises :class:`StorageError` and is delivered again.
   Detectors have already seen that batch, so the ids of its events are kept
   and skipped by the detectors on re-delivery, and its findings are kept and
   written with the retry: re-delivery neither double-counts nor loses anything;
5. hand the stored findings to the finding sink (alerting).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from detectors.finding import Finding
from ingest.event import UsageEvent, parse_event
from ingest.source import BatchResult, RawMessage, RejectedMessage, StorageError
from ingest.store import RejectedRow, Store, StoredEvent

log = logging.getLogger(__name__)


class Detector(Protocol):
    """What the pipeline needs of a detector engine (``detectors.engine.Engine``)."""

    def observe(self, event: UsageEvent) -> list[Finding]: ...

    def advance(self, now: datetime) -> list[Finding]: ...

    def snapshot(self) -> bytes: ...


class Pricer(Protocol):
    def cost(self, event: UsageEvent) -> tuple[float, str]: ...


class PipelineMetrics(Protocol):
    def batch(self, source: str, seconds: float, result: BatchResult) -> None: ...

    def unknown_model(self, model: str) -> None: ...

    def storage_failure(self) -> None: ...


FindingSink = Callable[[Sequence[Finding]], None]


class StoredEventObserver(Protocol):
    """Sees every event exactly once, after it is stored (budgets count spend:
    a re-delivered or replayed event must not be counted twice)."""

    def observe_events(self, events: Sequence[UsageEvent]) -> list[Finding]: ...

    def advance(self, now: datetime) -> list[Finding]: ...


EngineFactory = Callable[[bytes | None], Detector]


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    # How often (event time) a partition's detector state is persisted.
    snapshot_every_s: float = 300.0
    # Per-message outcome lists are only built when a caller (HTTP) asks.
    detect: bool = True


def _first_copies(events: list[UsageEvent]) -> list[UsageEvent]:
    seen: set[str] = set()
    out = []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            out.append(e)
    return out


def _parse(msg: RawMessage) -> Any:
    if msg.fmt in (None, "canonical"):
        res = parse_event(msg.value)
        if res.ok or msg.fmt == "canonical":
            return res
        # Auto-detect: a payload that is not a canonical event may still be
        # one of the gateway formats the adapters know.
        if res.reason in ("too_large", "invalid_json", "not_an_object"):
            return res
    try:
        from ingest.adapters import parse_any
    except ImportError:  # pragma: no cover - adapters ship with the package
        return parse_event(msg.value)
    return parse_any(msg.value, None if msg.fmt in (None, "auto") else msg.fmt)


class Pipeline:
    """Implements :class:`ingest.source.BatchHandler`."""

    def __init__(
        self,
        store: Store,
        prices: Pricer | None = None,
        engine_factory: EngineFactory | None = None,
        on_findings: FindingSink | None = None,
        metrics: PipelineMetrics | None = None,
        config: PipelineConfig | None = None,
        state_scope: str | None = "default",
        observers: Sequence[StoredEventObserver] = (),
    ) -> None:
        self.store = store
        self.prices = prices
        self.engine_factory = engine_factory
        self.on_findings = on_findings
        self.metrics = metrics
        self.config = config or PipelineConfig()
        self.state_scope = state_scope
        self.observers = list(observers)
        self._engines: dict[int | None, Detector] = {}
        self._snapshot_at: dict[int | None, datetime] = {}
        self._offsets: dict[int | None, int] = {}
        self._retry_ids: set[str] = set()
        self._pending: list[Finding] = []
        self._lock = threading.Lock()
        self.event_time: datetime | None = None

    # -- detector state per partition --------------------------------------
    def _scope(self, partition: int | None) -> str | None:
        if self.state_scope is None:  # a backtest: always start from nothing
            return None
        return self.state_scope if partition is None else f"{self.state_scope}/{partition}"

    def engine(self, partition: int | None = None) -> Detector | None:
        if self.engine_factory is None or not self.config.detect:
            return None
        eng = self._engines.get(partition)
        if eng is None:
            saved = None
            scope = self._scope(partition)
            try:
                saved = self.store.load_state(scope) if scope else None
            except Exception as exc:  # a missing state is normal, a broken one is logged
                log.warning("could not load detector state %s: %s", self._scope(partition), exc)
            eng = self.engine_factory(saved[0] if saved else None)
            if saved and saved[1]:
                self._offsets[partition] = int(saved[1])
            self._engines[partition] = eng
        return eng

    def partitions_assigned(self, partitions: Sequence[int]) -> dict[int, int]:
        resume: dict[int, int] = {}
        with self._lock:
            for p in partitions:
                self._engines.pop(p, None)
                self.engine(p)
                if p in self._offsets:
                    resume[p] = self._offsets[p]
        return resume

    def partitions_revoked(self, partitions: Sequence[int]) -> None:
        with self._lock:
            for p in partitions:
                self._save(p)
                self._engines.pop(p, None)
                self._snapshot_at.pop(p, None)

    def note_offset(self, partition: int | None, next_offset: int) -> None:
        """Sources tell the pipeline the next offset after a stored batch, so a
        saved detector state knows where it stands in the partition."""
        self._offsets[partition] = next_offset

    def _save(self, partition: int | None) -> None:
        eng = self._engines.get(partition)
        scope = self._scope(partition)
        if eng is None or self.event_time is None or scope is None:
            return
        try:
            self.store.save_state(
                scope,
                eng.snapshot(),
                self.event_time,
                str(self._offsets.get(partition, "")),
            )
        except Exception as exc:
            log.warning("could not save detector state %s: %s", self._scope(partition), exc)

    def save_all(self) -> None:
        with self._lock:
            for p in list(self._engines):
                self._save(p)

    # -- the batch ---------------------------------------------------------
    def handle(self, batch: Sequence[RawMessage], *, per_message: bool = False) -> BatchResult:
        with self._lock:
            return self._handle(batch, per_message)

    def _handle(self, batch: Sequence[RawMessage], per_message: bool) -> BatchResult:
        t0 = time.perf_counter()
        result = BatchResult()
        stored: list[StoredEvent] = []
        rejected_rows: list[RejectedRow] = []
        by_partition: dict[int | None, list[UsageEvent]] = {}
        for msg in batch:
            res = _parse(msg)
            if not res.ok:
                result.rejected.append(RejectedMessage(msg, res.reason, res.detail))
                rejected_rows.append(
                    RejectedRow(msg.source, msg.position, res.reason, res.detail, res.raw,
                                res.event_id)
                )
                if per_message:
                    result.per_message.append(("rejected", res.event_id, res.reason))
                continue
            ev = res.event
            source = "gateway"
            if self.prices is not None:
                cost, source = self.prices.cost(ev)
                if source == "unknown_model" and self.metrics is not None:
                    self.metrics.unknown_model(ev.model)
                if ev.cost is None or source != "gateway":
                    ev = ev.with_cost(cost)
            elif ev.cost is None:
                source = "unpriced"
            stored.append(StoredEvent(ev, source, msg.source, msg.position))
            by_partition.setdefault(msg.partition, []).append(ev)
            if per_message:
                result.per_message.append(("accepted", ev.event_id, None))

        findings = self._pending + self._detect(by_partition)
        try:
            wr = self.store.write(stored, rejected_rows, findings)
        except StorageError:
            if self.metrics is not None:
                self.metrics.storage_failure()
            # Remember what the detectors already saw, to skip it on re-delivery.
            self._retry_ids.update(se.event.event_id for se in stored)
            self._pending = findings
            raise
        self._retry_ids.clear()
        self._pending = []
        if self.observers and wr.stored:
            fresh = [se.event for se in stored if se.event.event_id not in wr.duplicate_ids]
            extra = self._observe_stored(_first_copies(fresh))
            if extra:
                findings = findings + extra
        result.accepted = wr.stored
        result.duplicates = wr.duplicates
        result.findings = len(findings)
        if per_message and wr.duplicates:
            self._mark_duplicates(result, set(wr.duplicate_ids))
        for p in by_partition:
            self._maybe_snapshot(p)
        if findings and self.on_findings is not None:
            try:
                self.on_findings(findings)
            except Exception:  # alerting must never fail ingestion
                log.exception("finding sink failed")
        if self.metrics is not None:
            self.metrics.batch(batch[0].source if batch else "none",
                               time.perf_counter() - t0, result)
        return result

    @staticmethod
    def _mark_duplicates(result: BatchResult, dup_ids: set[str]) -> None:
        """Already stored, or a repeat inside this batch: "duplicate"."""
        out = []
        for s, eid, r in result.per_message:
            if s == "accepted" and eid is not None:
                if eid in dup_ids:
                    s = "duplicate"
                dup_ids.add(eid)  # later copies in this batch are duplicates
            out.append((s, eid, r))
        result.per_message = out

    def _observe_stored(self, events: list[UsageEvent]) -> list[Finding]:
        out: list[Finding] = []
        for obs in self.observers:
            try:
                out.extend(obs.observe_events(events))
            except Exception:
                log.exception("stored-event observer failed")
        if out:
            try:
                self.store.write([], [], out)
            except StorageError:
                # The events are stored; their budget findings are retried with
                # the next batch rather than failing (and re-counting) this one.
                self._pending.extend(out)
        return out

    def _detect(self, by_partition: dict[int | None, list[UsageEvent]]) -> list[Finding]:
        out: list[Finding] = []
        if self.engine_factory is None or not self.config.detect:
            return out
        for partition, events in by_partition.items():
            eng = self.engine(partition)
            if eng is None:
                continue
            latest = None
            for ev in events:
                if ev.event_id in self._retry_ids:
                    continue
                out.extend(eng.observe(ev))
                if latest is None or ev.ts > latest:
                    latest = ev.ts
            if latest is not None:
                out.extend(eng.advance(latest))
                if self.event_time is None or latest > self.event_time:
                    self.event_time = latest
        return out

    def _maybe_snapshot(self, partition: int | None) -> None:
        if partition not in self._engines or self.event_time is None:
            return
        last = self._snapshot_at.get(partition)
        if last is None:
            self._snapshot_at[partition] = self.event_time
            return
        if (self.event_time - last).total_seconds() >= self.config.snapshot_every_s:
            self._save(partition)
            self._snapshot_at[partition] = self.event_time

    def advance(self, now: datetime) -> list[Finding]:
        """Move every engine's event-time clock (end of a replay, idle live stream)."""
        out: list[Finding] = []
        with self._lock:
            for eng in self._engines.values():
                out.extend(eng.advance(now))
            for obs in self.observers:
                out.extend(obs.advance(now))
            if out:
                self.store.write([], [], out)
        if out and self.on_findings is not None:
            self.on_findings(out)
        return out
