"""Kafka source: consume usage events at least once, dead-letter bad ones.

:class:`KafkaSource` feeds a :class:`~ingest.source.BatchHandler` (the
pipeline) from a Kafka topic with kafka-python.  Delivery follows DESIGN.md
("Delivery and state"):

* Offsets are committed, synchronously and exactly (last offset + 1 per
  partition), only after ``handler.handle(batch)`` returned, i.e. after the
  batch's events are stored, and after every rejected message of the batch
  was written to the dead-letter topic and flushed.  Storage is idempotent on
  ``event_id``, so a batch delivered twice leaves no duplicate rows.
* :class:`~ingest.source.StorageError` (the store did not take the batch) and
  a failed dead-letter write are *retryable*: nothing is committed, the
  partitions are paused, each partition of the batch is sought back to the
  batch's first offset, and the source backs off (exponentially, capped)
  while still calling ``poll()`` so it stays in the consumer group; then it
  resumes and fetches the same records again.  A store outage pauses
  consumption and loses nothing.  The outage is logged once, when it starts,
  and once when it ends; every retry is counted.
* A malformed message never stops a partition: the handler rejects it (not
  JSON, wrong types, missing fields, larger than 64 KiB, ...) and the source
  writes it to the dead-letter topic with its reason.  Tombstones (records
  with a null value) carry no event: they are skipped and counted, and their
  offsets are committed with the rest of the batch.
* Any *other* exception raised by ``handler.handle`` is a programming error,
  not a property of the data or of the store.  Retrying it would spin forever
  and dead-lettering would hide the bug behind data loss, so the source seeks
  the batch's partitions back (nothing is committed), logs the exception and
  re-raises it out of :meth:`KafkaSource.run`, which closes the consumer.  The
  process supervisor restarts the service and the batch is delivered again.

Rebalances.  kafka-python 3.x calls a ``ConsumerRebalanceListener`` on its IO
thread, where a blocking call such as ``commit()`` raises.  The listener here
only records what was revoked and assigned; the run loop applies the changes
between polls, on its own thread, in the order they happened:
``handler.partitions_revoked`` then ``handler.partitions_assigned``.  Since
offsets are committed after every processed batch there is nothing
uncommitted to save on revocation, except the records of the batch being
accumulated: a batch is built from several polls (up to ``batch_max`` records
or ``batch_linger_ms``), and a rebalance can happen inside any of those polls.
Records already accumulated for a revoked partition are dropped, never
handled; because kafka-python keeps a partition's fetch position when the
partition comes back in the new assignment (even with the eager protocol),
the source seeks such a partition back to the first dropped offset, otherwise
those records would be skipped and lost.  A partition that went elsewhere is
read by its new owner from the committed offset.  Records returned by a poll
that rebalanced are already fetched for the new assignment and are kept.

Detector state.  ``handler.partitions_assigned`` answers, per partition, the
offset its restored detector state has seen up to; when that is behind the
group's position the source seeks back there (at most ``state_replay_max``
records), so the detectors relearn what they missed while the store skips the
duplicates.  Before each ``handle()`` the source tells a handler that has a
``note_offset(partition, next_offset)`` method the offset after the batch, so
that a snapshot taken while handling it records where it stands.

Known limit: the handler learns of a revocation after the ``poll()`` that
performed it returned, so a new owner may load a partition's detector state
a moment before this consumer persisted it.  Detectors must therefore
tolerate slightly stale persisted baselines (DESIGN.md: "resume from persisted
or recomputed baselines").

Dead-letter records carry the original key and value (the value truncated to
``KafkaConfig.dlq_max_value_bytes`` so that an oversize message can always be
written) and the headers ``tokenward.reason``, ``tokenward.detail``,
``tokenward.position`` (``topic/partition/offset`` of the original),
``tokenward.source`` and, when truncated, ``tokenward.original_bytes``.
Dead-lettering is at least once: a batch delivered again writes its rejected
messages again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from ingest.source import BatchHandler, BatchResult, RawMessage, StorageError

log = logging.getLogger(__name__)

__all__ = [
    "HEADER_DETAIL",
    "HEADER_ORIGINAL_BYTES",
    "HEADER_POSITION",
    "HEADER_REASON",
    "HEADER_SOURCE",
    "KafkaConfig",
    "KafkaMetrics",
    "KafkaSource",
    "KafkaSourceStats",
    "check_kafka",
    "consumer_key",
    "ensure_topics",
    "produce_events",
]

HEADER_REASON = "tokenward.reason"
HEADER_DETAIL = "tokenward.detail"
HEADER_POSITION = "tokenward.position"
HEADER_SOURCE = "tokenward.source"
HEADER_ORIGINAL_BYTES = "tokenward.original_bytes"

_DETAIL_LIMIT = 1024


@dataclass(frozen=True)
class KafkaConfig:
    """Where and how to consume.  ``security`` is passed as is to kafka-python
    (``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``,
    ``sasl_plain_password``, ``ssl_cafile``, ...) for the consumer, the
    dead-letter producer and the admin client; ``consumer_extra`` only to the
    consumer."""

    bootstrap: str
    topic: str = "tokenward.usage"
    group_id: str = "tokenward"
    dead_letter_topic: str | None = "tokenward.usage.dlq"  # None: no dead-letter topic
    client_id: str = "tokenward"
    batch_max: int = 5000
    # After the first record of a batch, keep polling up to this long to fill
    # the batch: ClickHouse wants few large inserts, not one per record.
    batch_linger_ms: int = 200
    poll_timeout_ms: int = 500
    # kafka-python's 45 s default session makes a group join take ~23 s
    # against the test broker; these give ~3 s and still tolerate a GC pause.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    auto_offset_reset: str = "earliest"
    fetch_max_bytes: int = 50 * 1024 * 1024
    max_partition_fetch_bytes: int = 1024 * 1024
    fetch_max_wait_ms: int = 500
    commit_timeout_ms: int = 30_000
    retry_backoff_initial_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    dlq_max_value_bytes: int = 256 * 1024
    dlq_flush_timeout_s: float = 30.0
    # The most records re-delivered to catch a partition's restored detector
    # state up with the committed offset (see BatchHandler.partitions_assigned).
    state_replay_max: int = 1_000_000
    lag_refresh_s: float = 10.0
    security: Mapping[str, Any] = field(default_factory=dict)
    consumer_extra: Mapping[str, Any] = field(default_factory=dict)


class KafkaMetrics(Protocol):
    """Hooks the metrics layer may implement (prometheus stays out of here).
    A metrics object may implement any subset: missing hooks are skipped.
    Called from the run-loop thread."""

    def on_batch(self, records: int, seconds: float) -> None:
        """A batch was handled and committed: records polled, wall time of
        handle + dead-letter + commit."""

    def on_dead_letter(self, reason: str) -> None:
        """One rejected message was written to the dead-letter topic."""

    def on_retry(self) -> None:
        """A batch will be delivered again (StorageError or dead-letter failure)."""

    def on_tombstone(self) -> None:
        """A record with a null value was skipped."""

    def on_commit_failed(self) -> None:
        """An offset commit failed (rebalance, coordinator down): the batch's
        stored events will be delivered again and deduplicated by the store."""


def _noop(*_args: Any) -> None:
    pass


class _Hooks:
    """The hooks ``metrics`` implements, no-ops for the others."""

    def __init__(self, metrics: object | None) -> None:
        def hook(name: str) -> Callable[..., None]:
            fn = getattr(metrics, name, None) if metrics is not None else None
            return fn if callable(fn) else _noop

        self.on_batch = hook("on_batch")
        self.on_dead_letter = hook("on_dead_letter")
        self.on_retry = hook("on_retry")
        self.on_tombstone = hook("on_tombstone")
        self.on_commit_failed = hook("on_commit_failed")


@dataclass
class KafkaSourceStats:
    """Running totals, written by the run-loop thread only."""

    batches: int = 0
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    tombstones: int = 0
    retries: int = 0
    outages: int = 0
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    dropped_on_revoke: int = 0
    state_replays: int = 0


class _RetryableError(Exception):
    """The batch must be delivered again (store down, dead-letter write failed)."""


class _Listener(ConsumerRebalanceListener):
    """Only records changes: it runs on kafka-python's IO thread, where
    blocking consumer calls raise and the handler must not be called."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, frozenset[TopicPartition]]] = []

    def on_partitions_revoked(self, revoked: Any) -> None:
        with self._lock:
            self._events.append(("revoked", frozenset(revoked)))

    def on_partitions_lost(self, lost: Any) -> None:
        with self._lock:
            self._events.append(("revoked", frozenset(lost)))

    def on_partitions_assigned(self, assigned: Any) -> None:
        with self._lock:
            self._events.append(("assigned", frozenset(assigned)))

    def drain(self) -> list[tuple[str, frozenset[TopicPartition]]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class _Batch:
    """Records accumulated over one or more polls, in offset order per partition."""

    def __init__(self) -> None:
        self.records: dict[TopicPartition, list[Any]] = {}

    def add(self, polled: Mapping[TopicPartition, list[Any]]) -> None:
        for tp, recs in polled.items():
            if recs:
                self.records.setdefault(tp, []).extend(recs)

    def __len__(self) -> int:
        return sum(len(r) for r in self.records.values())

    def first_offsets(self) -> dict[TopicPartition, int]:
        return {tp: recs[0].offset for tp, recs in self.records.items() if recs}

    def next_offsets(self) -> dict[TopicPartition, int]:
        return {tp: recs[-1].offset + 1 for tp, recs in self.records.items() if recs}

    def drop(self, tp: TopicPartition) -> list[Any]:
        return self.records.pop(tp, [])


class KafkaSource:
    """Consume ``config.topic`` in the consumer group ``config.group_id`` into
    ``handler``.  ``run(stop)`` blocks until ``stop`` is set (or ``close()`` is
    called) and owns the consumer: one source per thread."""

    def __init__(
        self,
        config: KafkaConfig,
        handler: BatchHandler,
        metrics: KafkaMetrics | object | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.metrics = _Hooks(metrics)
        self.stats = KafkaSourceStats()
        self._listener = _Listener()
        self._closing = threading.Event()
        self._running = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None  # owned by the run thread
        self._lag: dict[int, int] = {}
        self._end_offsets: dict[TopicPartition, int] = {}
        self._end_offsets_at = 0.0
        self._owned: set[TopicPartition] = set()
        self._outage_started: float | None = None
        self._outage_retries = 0

    # -- public -------------------------------------------------------------

    def lag(self) -> dict[int, int]:
        """Records per assigned partition not yet committed by this consumer
        (end offset minus position), as of the last batch or idle poll.  Safe
        to call from any thread (it returns a snapshot)."""
        return dict(self._lag)

    def run(self, stop: threading.Event) -> None:
        if not self._running.acquire(blocking=False):
            raise RuntimeError("KafkaSource.run is already running")
        consumer: KafkaConsumer | None = None
        try:
            if self.config.dead_letter_topic and self._producer is None:
                self._producer = self._make_producer()
            consumer = self._consumer = self._make_consumer()
            while not self._stopping(stop):
                batch = self._poll_batch(consumer, stop)
                if not batch.records:
                    self._refresh_lag(consumer)
                    continue
                self._process(consumer, batch, stop)
        finally:
            try:
                if consumer is not None:
                    # autocommit=False: only _process commits.  Closing calls
                    # the listener's revoke, applied below on this thread.
                    consumer.close(autocommit=False)
            except Exception:
                log.exception("closing the Kafka consumer failed")
            finally:
                try:
                    self._apply_rebalance(consumer=None, batch=None)
                    self._revoke(set(self._owned))
                except Exception:
                    log.exception("handler.partitions_revoked failed while stopping")
                    self._owned.clear()
                finally:
                    self._lag = {}
                    self._running.release()

    def close(self, timeout: float = 30.0) -> None:
        """Stop ``run`` (if running, waits for it up to ``timeout``) and close
        the dead-letter producer.  Idempotent."""
        self._closing.set()
        acquired = self._running.acquire(timeout=timeout)
        try:
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    self._producer.close(timeout=5)
                self._producer = None
        finally:
            if acquired:
                self._running.release()

    # -- consumer lifecycle ---------------------------------------------------

    def _stopping(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._closing.is_set()

    def _make_consumer(self) -> KafkaConsumer:
        c = self.config
        options: dict[str, Any] = {
            "bootstrap_servers": c.bootstrap,
            "group_id": c.group_id,
            "client_id": c.client_id,
            "auto_offset_reset": c.auto_offset_reset,
            "session_timeout_ms": c.session_timeout_ms,
            "heartbeat_interval_ms": c.heartbeat_interval_ms,
            "max_poll_interval_ms": c.max_poll_interval_ms,
            "max_poll_records": c.batch_max,
            "fetch_max_bytes": c.fetch_max_bytes,
            "max_partition_fetch_bytes": c.max_partition_fetch_bytes,
            "fetch_max_wait_ms": c.fetch_max_wait_ms,
            **c.security,
            **c.consumer_extra,
        }
        # Not overridable: commits are this class's job (after storage).
        options["enable_auto_commit"] = False
        consumer = KafkaConsumer(**options)
        consumer.subscribe([c.topic], listener=self._listener)
        return consumer

    def _make_producer(self) -> KafkaProducer:
        c = self.config
        return KafkaProducer(
            bootstrap_servers=c.bootstrap,
            client_id=f"{c.client_id}-dlq",
            acks="all",
            linger_ms=5,
            retries=5,
            max_request_size=max(1024 * 1024, c.dlq_max_value_bytes + 64 * 1024),
            **dict(c.security),
        )

    # -- polling and rebalances ---------------------------------------------

    def _poll_batch(self, consumer: KafkaConsumer, stop: threading.Event) -> _Batch:
        c = self.config
        batch = _Batch()
        deadline: float | None = None
        while True:
            if deadline is None:
                timeout_ms = c.poll_timeout_ms
            else:
                timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            polled = consumer.poll(timeout_ms=timeout_ms, max_records=c.batch_max - len(batch))
            batch.add(polled)
            self._apply_rebalance(consumer, batch)
            if not batch.records:
                return batch
            if deadline is None:
                deadline = time.monotonic() + c.batch_linger_ms / 1000
            if (
                len(batch) >= c.batch_max
                or time.monotonic() >= deadline
                or self._stopping(stop)
            ):
                return batch

    def _apply_rebalance(self, consumer: KafkaConsumer | None, batch: _Batch | None) -> None:
        """Apply what the listener recorded, in order, on this thread."""
        events = self._listener.drain()
        if not events:
            return
        revoked_all: set[TopicPartition] = set()
        resume: dict[TopicPartition, int] = {}
        for kind, parts in events:
            self.stats.rebalances += 1
            if kind == "revoked":
                revoked_all |= parts
                self._revoke(set(parts))
                for tp in parts:
                    resume.pop(tp, None)
            else:
                resume.update(self._assign(set(parts)))
        if consumer is None:
            return
        assignment = consumer.assignment()
        # Records of a revoked partition that are already in the batch belong
        # to the old assignment: drop them.  If the partition came back to us
        # kafka-python kept its (advanced) position, so seek back to the first
        # dropped record or those records would never be read again.
        if batch is not None:
            for tp in list(batch.records):
                if tp not in revoked_all and tp in assignment:
                    continue
                dropped = batch.drop(tp)
                self.stats.dropped_on_revoke += len(dropped)
                if dropped and tp in assignment:
                    consumer.seek(tp, dropped[0].offset)
                log.info("rebalance: dropped %d fetched records of %s/%d (%s)",
                         len(dropped), tp.topic, tp.partition,
                         "sought back" if tp in assignment else "now owned elsewhere")
        for tp, offset in resume.items():
            if tp in assignment:
                self._resume_state(consumer, batch, tp, offset)

    def _resume_state(
        self, consumer: KafkaConsumer, batch: _Batch | None, tp: TopicPartition, offset: int
    ) -> None:
        """The handler's restored detector state of ``tp`` has seen the records
        before ``offset`` only: re-deliver from there if that is behind where
        the group stands (the store skips the duplicates, the detectors learn
        what they missed), within ``state_replay_max`` records."""
        first = batch.first_offsets().get(tp) if batch is not None else None
        try:
            current = first if first is not None else consumer.position(tp, timeout_ms=5000)
        except Exception as exc:
            log.warning("cannot resume detector state of %s/%d: %r", tp.topic, tp.partition, exc)
            return
        if current is None or offset >= current:
            return
        if current - offset > self.config.state_replay_max:
            log.warning("detector state of %s/%d is %d records behind the committed offset "
                        "(more than state_replay_max=%d): not replaying them",
                        tp.topic, tp.partition, current - offset, self.config.state_replay_max)
            return
        if batch is not None:
            batch.drop(tp)
        consumer.seek(tp, offset)
        self.stats.state_replays += 1
        log.info("%s/%d: replaying %d records from offset %d to catch up detector state",
                 tp.topic, tp.partition, current - offset, offset)

    def _revoke(self, parts: set[TopicPartition]) -> None:
        parts &= self._owned
        if not parts:
            return
        self._owned -= parts
        for tp in parts:
            self._lag.pop(tp.partition, None)
            self._end_offsets.pop(tp, None)
        self.handler.partitions_revoked(sorted(tp.partition for tp in parts))

    def _assign(self, parts: set[TopicPartition]) -> dict[TopicPartition, int]:
        parts -= self._owned
        if not parts:
            return {}
        self._owned |= parts
        resume = self.handler.partitions_assigned(sorted(tp.partition for tp in parts)) or {}
        topic = next(iter(parts)).topic
        return {TopicPartition(topic, p): int(o) for p, o in resume.items()
                if TopicPartition(topic, p) in parts and o is not None and int(o) >= 0}

    # -- one batch ------------------------------------------------------------

    def _process(self, consumer: KafkaConsumer, batch: _Batch, stop: threading.Event) -> None:
        started = time.monotonic()
        messages: list[RawMessage] = []
        for tp, recs in batch.records.items():
            for r in recs:
                if r.value is None:
                    self.stats.tombstones += 1
                    self.metrics.on_tombstone()
                    continue
                messages.append(RawMessage(
                    value=r.value,
                    source="kafka",
                    position=f"{tp.topic}/{tp.partition}/{r.offset}",
                    key=r.key,
                    partition=tp.partition,
                ))
        note_offset = getattr(self.handler, "note_offset", None)
        if note_offset is not None:
            # Before handle(): a detector snapshot taken while handling this
            # batch has seen it, so it must record the offset after it.
            for tp, nxt in batch.next_offsets().items():
                note_offset(tp.partition, nxt)
        try:
            result = self.handler.handle(messages) if messages else BatchResult()
            if result.rejected:
                self._dead_letter(result)
        except (StorageError, _RetryableError) as exc:
            self._retry_later(consumer, batch, stop, exc)
            return
        except BaseException:
            # A programming error: never commit, keep the records for the next
            # run, and let the supervisor see the crash.
            log.exception("handler failed on a batch of %d records; not committing", len(batch))
            self._rewind(consumer, batch)
            raise
        self._commit(consumer, batch)
        if self._outage_started is not None:
            log.warning("store is back after %.1f s and %d retries; consuming again",
                        time.monotonic() - self._outage_started, self._outage_retries)
            self._outage_started = None
            self._outage_retries = 0
        n = len(batch)
        self.stats.batches += 1
        self.stats.records += n
        self.stats.accepted += result.accepted
        self.stats.duplicates += result.duplicates
        self.stats.rejected += len(result.rejected)
        self.metrics.on_batch(n, time.monotonic() - started)
        self._refresh_lag(consumer, batch)

    def _dead_letter(self, result: BatchResult) -> None:
        topic = self.config.dead_letter_topic
        if not topic or self._producer is None:
            return
        limit = self.config.dlq_max_value_bytes
        futures = []
        try:
            for rej in result.rejected:
                msg = rej.message
                headers = [
                    (HEADER_REASON, rej.reason.encode()),
                    (HEADER_DETAIL, rej.detail[:_DETAIL_LIMIT].encode("utf-8", "replace")),
                    (HEADER_POSITION, msg.position.encode()),
                    (HEADER_SOURCE, msg.source.encode()),
                ]
                value = msg.value
                if len(value) > limit:
                    headers.append((HEADER_ORIGINAL_BYTES, str(len(value)).encode()))
                    value = value[:limit]
                futures.append(self._producer.send(topic, value=value, key=msg.key,
                                                   headers=headers))
            self._producer.flush(timeout=self.config.dlq_flush_timeout_s)
            for f in futures:
                f.get(timeout=self.config.dlq_flush_timeout_s)
        except KafkaError as exc:
            raise _RetryableError(f"dead-letter write failed: {exc!r}") from exc
        for rej in result.rejected:
            self.stats.dead_lettered += 1
            self.metrics.on_dead_letter(rej.reason)

    def _commit(self, consumer: KafkaConsumer, batch: _Batch) -> None:
        offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in batch.next_offsets().items()}
        try:
            consumer.commit(offsets, timeout_ms=self.config.commit_timeout_ms)
            self.stats.commits += 1
        except KafkaError as exc:
            # The events are stored; whoever reads these offsets next gets
            # them again and the store deduplicates them.
            self.stats.commit_failures += 1
            self.metrics.on_commit_failed()
            log.warning("offset commit failed (%r); the batch will be delivered again", exc)

    def _rewind(self, consumer: KafkaConsumer, batch: _Batch) -> None:
        assignment = consumer.assignment()
        for tp, off in batch.first_offsets().items():
            if tp in assignment:
                consumer.seek(tp, off)

    def _retry_later(
        self,
        consumer: KafkaConsumer,
        batch: _Batch,
        stop: threading.Event,
        exc: BaseException,
    ) -> None:
        """Deliver the batch again later: seek back, pause, back off while
        polling (to keep the group membership), resume."""
        self.stats.retries += 1
        self.metrics.on_retry()
        self._outage_retries += 1
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self.stats.outages += 1
            log.warning("batch of %d records not stored (%s); pausing consumption and "
                        "retrying with back-off up to %.0f s", len(batch), exc,
                        self.config.retry_backoff_max_s)
        else:
            log.debug("retry %d failed: %s", self._outage_retries, exc)
        self._rewind(consumer, batch)
        delay = min(self.config.retry_backoff_max_s,
                    self.config.retry_backoff_initial_s * 2 ** (self._outage_retries - 1))
        deadline = time.monotonic() + delay
        try:
            while not self._stopping(stop):
                consumer.pause(*consumer.assignment())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                polled = consumer.poll(timeout_ms=int(min(remaining, 1.0) * 1000))
                self._apply_rebalance(consumer, None)
                # Partitions assigned by a rebalance during the back-off are
                # not paused yet: give back anything they returned.
                assignment = consumer.assignment()
                for tp, recs in polled.items():
                    if recs and tp in assignment:
                        consumer.seek(tp, recs[0].offset)
        finally:
            consumer.resume(*consumer.paused())

    # -- lag ------------------------------------------------------------------

    def _refresh_lag(self, consumer: KafkaConsumer, batch: _Batch | None = None) -> None:
        now = time.monotonic()
        assignment = consumer.assignment()
        if not assignment:
            self._lag = {}
            return
        # The fetch high-water mark (updated by every fetch response, even an
        # empty one) is the end offset; ListOffsets is only asked, now and
        # then, for partitions not fetched yet.
        unknown = [tp for tp in assignment if consumer.highwater(tp) is None]
        if unknown and now - self._end_offsets_at >= self.config.lag_refresh_s:
            self._end_offsets_at = now
            try:
                self._end_offsets.update(consumer.end_offsets(unknown, timeout_ms=2000))
            except Exception as exc:  # lag is best effort; never stop consuming for it
                log.debug("end_offsets failed: %r", exc)
        nxt = batch.next_offsets() if batch is not None else {}
        lag = dict(self._lag)
        for tp in assignment:
            try:
                pos = nxt.get(tp)
                if pos is None:
                    pos = consumer.position(tp, timeout_ms=1000)
                # Take the larger: Tansu's ListOffsets answers the base offset
                # of the last record batch + 1, not the log end.
                hw = consumer.highwater(tp)
                end = max(hw if hw is not None else -1, self._end_offsets.get(tp, -1))
            except Exception:
                continue
            if pos is not None and end >= 0:
                lag[tp.partition] = max(0, end - pos)
        self._lag = lag


# -- producing, checks, topics --------------------------------------------------

def consumer_key(value: bytes) -> bytes | None:
    """Partition key of a canonical event: its ``consumer`` (one consumer's
    events go to one partition, which owns its baseline)."""
    try:
        obj = json.loads(value)
    except ValueError:
        return None
    if isinstance(obj, dict):
        consumer = obj.get("consumer")
        if isinstance(consumer, str):
            return consumer.encode()
    return None


def produce_events(
    bootstrap: str,
    topic: str,
    values: Iterable[bytes],
    key_fn: Callable[[bytes], bytes | None] | None = consumer_key,
    *,
    security: Mapping[str, Any] | None = None,
    linger_ms: int = 20,
    batch_size: int = 512 * 1024,
    compression_type: str | None = None,
    acks: int | str = "all",
    timeout_s: float = 120.0,
) -> int:
    """Send ``values`` to ``topic`` keyed by ``key_fn(value)`` (default: the
    event's consumer); wait until all are acknowledged.  Returns the number
    sent; raises the first delivery error."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="tokenward-producer",
        acks=acks,
        linger_ms=linger_ms,
        batch_size=batch_size,
        compression_type=compression_type,
        max_request_size=2 * 1024 * 1024,
        **dict(security or {}),
    )
    errors: list[BaseException] = []
    n = 0
    try:
        for value in values:
            key = key_fn(value) if key_fn is not None else None
            producer.send(topic, value=value, key=key).add_errback(errors.append)
            n += 1
            if errors:
                break
        producer.flush(timeout=timeout_s)
    finally:
        producer.close(timeout=10)
    if errors:
        raise errors[0]
    return n


def check_kafka(
    bootstrap: str,
    timeout: float = 5.0,
    *,
    topic: str | None = None,
    security: Mapping[str, Any] | None = None,
) -> str | None:
    """Readiness probe: ``None`` when the cluster answers a metadata request
    (and ``topic`` exists, if given), else what is wrong."""
    timeout_ms = max(1000, int(timeout * 1000))
    consumer = None
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id="tokenward-probe",
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=timeout_ms,
            connections_max_idle_ms=timeout_ms + 60_000,
            **dict(security or {}),
        )
        topics = consumer.topics()
        if topic is not None and topic not in topics:
            return f"topic {topic!r} does not exist"
        return None
    except Exception as exc:
        return f"kafka at {bootstrap} not reachable: {type(exc).__name__}: {exc}"
    finally:
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    security: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the missing ones of ``{topic: partitions}``; returns the names
    created.  Existing topics are left as they are (their partition count is
    not changed: that would move keys between partitions)."""
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tokenward-admin",
                             **dict(security or {}))
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, parts, replication_factor)
                   for name, parts in topics.items() if name not in existing]
        if not missing:
            return []
        with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
            admin.create_topics(missing)
        return [t.name for t in missing]
    finally:
        admin.close()
