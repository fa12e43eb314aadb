"""The boundary between event sources and the pipeline.

A source (Kafka, file replay, HTTP, simulator) hands the pipeline batches of
:class:`RawMessage`.  The pipeline parses, prices, detects and stores them and
answers with a :class:`BatchResult`, or raises :class:`StorageError` when the
store did not take the batch: the source must then deliver the same batch
again (Kafka: do not commit, seek back, back off), because at-least-once plus
idempotent storage is the delivery guarantee (DESIGN.md, "Delivery and state").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RawMessage:
    value: bytes
    source: str  # "kafka", "http", "file", "simulator"
    position: str  # where it came from: "topic/partition/offset", "path:line", "http:remote"
    key: bytes | None = None
    partition: int | None = None  # Kafka partition, used to scope detector state
    fmt: str | None = None  # input format when known ("canonical", "openai", ...); None = auto


@dataclass(slots=True)
class RejectedMessage:
    message: RawMessage
    reason: str
    detail: str


@dataclass(slots=True)
class BatchResult:
    accepted: int = 0
    duplicates: int = 0  # valid events already stored (replays): not stored again
    rejected: list[RejectedMessage] = field(default_factory=list)
    findings: int = 0
    per_message: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    """(status, event_id, reason) per input message, in input order, when asked for."""


class StorageError(RuntimeError):
    """The store did not take the batch; nothing of it may be committed."""


class BatchHandler(Protocol):
    def handle(self, batch: Sequence[RawMessage]) -> BatchResult:
        """Process one batch; raise StorageError if it must be delivered again."""
        ...

    def partitions_assigned(self, partitions: Sequence[int]) -> dict[int, int]:
        """Load detector state for newly owned Kafka partitions.

        Returns, per partition, the offset the saved detector state reflects
        (the next offset it has not seen).  When that is before the committed
        offset, the source seeks back to it: the re-delivered events are
        duplicates for the store (skipped) but teach the restored detectors
        what they missed, so a restart does not cause amnesia."""
        ...

    def partitions_revoked(self, partitions: Sequence[int]) -> None:
        """Persist and drop detector state of partitions given away."""
        ...
