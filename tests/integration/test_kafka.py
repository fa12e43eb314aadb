"""KafkaSource against a real broker (Tansu) and the real pipeline + embedded store.

Each test uses its own topics, consumer groups and event-id prefix, because all
tests share the one embedded ClickHouse of the process (``embedded_store``).
The tests with ``_FakeHandler`` check the source's own retry/commit logic; the
rest run the real :class:`ingest.pipeline.Pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from ingest.kafka import (
    HEADER_DETAIL,
    HEADER_ORIGINAL_BYTES,
    HEADER_POSITION,
    HEADER_REASON,
    HEADER_SOURCE,
    KafkaConfig,
    KafkaSource,
    check_kafka,
    produce_events,
)
from ingest.pipeline import Pipeline
from ingest.source import BatchResult, RawMessage, StorageError

pytestmark = pytest.mark.integration

FAST = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


# -- helpers ---------------------------------------------------------------------

def event(eid: str, consumer: str, i: int = 0) -> dict[str, Any]:
    return {
        "event_id": eid,
        "ts": f"2026-01-05T10:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        "consumer": consumer,
        "tenant": "kafka-test",
        "model": "gpt-4o",
        "status": 200,
        "input_tokens": 100 + i % 50,
        "output_tokens": 20 + i % 7,
        "latency_ms": 350.0,
    }


def valid_events(prefix: str, n: int, consumers: int = 12) -> list[bytes]:
    return [json.dumps(event(f"{prefix}-{i}", f"{prefix}-c{i % consumers}", i)).encode()
            for i in range(n)]


def bad_messages(prefix: str) -> list[tuple[bytes, str]]:
    """(raw, expected reason) for each kind of bad input."""
    good = event(f"{prefix}-bad", f"{prefix}-c0")
    wrong_type = dict(good, event_id=f"{prefix}-wrongtype", status="two hundred")
    missing = {k: v for k, v in good.items() if k != "model"} | {"event_id": f"{prefix}-nomodel"}
    oversize = dict(good, event_id=f"{prefix}-big", route="x" * 70_000)
    return [
        (b"this is not json {", "invalid_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (json.dumps(wrong_type).encode(), "invalid_type"),
        (json.dumps(missing).encode(), "missing_field"),
        (json.dumps(oversize).encode(), "too_large"),
    ]


def send(bootstrap: str, topic: str, items: Sequence[tuple[bytes | None, bytes | None]]
         ) -> dict[int, int]:
    """Produce (key, value) pairs; return {partition: end offset}."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
                             max_request_size=2 * 1024 * 1024)
    futures = [producer.send(topic, key=k, value=v) for k, v in items]
    producer.flush()
    ends: dict[int, int] = {}
    for f in futures:
        md = f.get(timeout=30)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    producer.close()
    return ends


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        c.close(autocommit=False)


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list[Any]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                      auto_offset_reset="earliest")
    parts = c.partitions_for_topic(topic) or {0}
    c.assign([TopicPartition(topic, p) for p in parts])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=500).values():
            out.extend(recs)
    c.close(autocommit=False)
    return out


def config(bootstrap: str, topic: str, **kw: Any) -> KafkaConfig:
    base: dict[str, Any] = {
        "bootstrap": bootstrap, "topic": topic, "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "dead_letter_topic": f"{topic}.dlq", "batch_linger_ms": 50, "poll_timeout_ms": 200,
        "retry_backoff_initial_s": 0.05, "retry_backoff_max_s": 0.5, "lag_refresh_s": 0.5,
    }
    base.update(FAST)
    base.update(kw)
    return KafkaConfig(**base)


class Runner:
    """Run a KafkaSource in a thread; stop it when asked."""

    def __init__(self, source: KafkaSource, name: str = "kafka-source") -> None:
        self.source = source
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.source.run(self.stop)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, cond: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.error is not None:
                raise AssertionError("source failed") from self.error
            if not self.thread.is_alive():
                raise AssertionError("source thread ended")
            if time.monotonic() > deadline:
                import faulthandler
                import sys
                faulthandler.dump_traceback(file=sys.stderr)
                raise AssertionError(f"timed out; stats={self.source.stats} "
                                     f"owned={sorted(self.source._owned)} lag={self.source.lag()}")
            time.sleep(0.05)

    def finish(self, timeout: float = 30.0) -> KafkaSource:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "source did not stop"
        self.source.close()
        return self.source


class _FakeHandler:
    """Records what it sees; raises what it is told to, per call."""

    def __init__(self, fail: Sequence[BaseException | None] = ()) -> None:
        self.fail = list(fail)
        self.calls: list[list[RawMessage]] = []
        self.threads: set[str] = set()
        self.assigned: list[list[int]] = []
        self.revoked: list[list[int]] = []
        self.hook: Callable[[int], None] | None = None
        self.resume: dict[int, int] = {}
        self.noted: dict[int, int] = {}

    def handle(self, batch: Sequence[RawMessage]) -> BatchResult:
        self.calls.append(list(batch))
        self.threads.add(threading.current_thread().name)
        if self.hook is not None:
            self.hook(len(self.calls))
        if self.fail:
            exc = self.fail.pop(0)
            if exc is not None:
                raise exc
        return BatchResult(accepted=len(batch))

    def partitions_assigned(self, partitions: Sequence[int]) -> dict[int, int]:
        self.threads.add(threading.current_thread().name)
        self.assigned.append(list(partitions))
        return {p: o for p, o in self.resume.items() if p in partitions}

    def note_offset(self, partition: int | None, next_offset: int) -> None:
        assert partition is not None
        self.noted[partition] = next_offset

    def partitions_revoked(self, partitions: Sequence[int]) -> None:
        self.threads.add(threading.current_thread().name)
        self.revoked.append(list(partitions))


def stored(store: Any, prefix: str) -> tuple[int, int]:
    row = store.query(
        "SELECT count() AS n, uniqExact(event_id) AS u FROM tokenward.usage_events "
        f"WHERE startsWith(event_id, '{prefix}-')")[0]
    return int(row["n"]), int(row["u"])


# -- the source's own logic (fake handler) -----------------------------------------

def test_storage_error_twice_then_success_commits_once(tansu_broker: str, kafka_topic) -> None:
    topic = kafka_topic(partitions=3)
    ends = send(tansu_broker, topic, [(f"k{i % 7}".encode(), f"v{i}".encode()) for i in range(90)])
    cfg = config(tansu_broker, topic, batch_max=1000, batch_linger_ms=300)
    handler = _FakeHandler(fail=[StorageError("down"), StorageError("still down")])
    seen_committed: list[dict[int, int | None]] = []

    def hook(call: int) -> None:
        if call <= 2:  # while the store is "down", nothing may be committed
            seen_committed.append(committed(tansu_broker, cfg.group_id, topic, 3))

    class PartialMetrics:  # implements only some hooks: the others are skipped
        def __init__(self) -> None:
            self.retries = 0
            self.batches: list[int] = []

        def on_retry(self) -> None:
            self.retries += 1

        def on_batch(self, records: int, seconds: float) -> None:
            assert seconds >= 0
            self.batches.append(records)

    metrics = PartialMetrics()
    handler.hook = hook
    run = Runner(KafkaSource(cfg, handler, metrics=metrics))
    run.wait_for(lambda: run.source.stats.records >= 90)
    src = run.finish()
    assert metrics.retries == 2 and sum(metrics.batches) == 90

    assert all(v is None for c in seen_committed for v in c.values()), seen_committed
    assert src.stats.retries == 2 and src.stats.outages == 1
    # The retried deliveries start at the same offsets as the failed one.
    first = {m.position for m in handler.calls[0]}
    assert first <= {m.position for m in handler.calls[1]}
    assert first <= {m.position for m in handler.calls[2]}
    delivered_ok = [m.position for call in handler.calls[2:] for m in call]
    assert len(delivered_ok) == len(set(delivered_ok)) == 90
    assert committed(tansu_broker, cfg.group_id, topic, 3) == {p: ends.get(p) for p in range(3)}
    assert handler.threads == {"kafka-source"}  # handler only ever called on the run thread
    assert src.stats.commits >= 1 and src.stats.commit_failures == 0
    assert src.lag() == {}  # cleared when stopped


def test_programming_error_propagates_and_commits_nothing(tansu_broker: str, kafka_topic) -> None:
    topic = kafka_topic(partitions=1)
    send(tansu_broker, topic, [(None, f"v{i}".encode()) for i in range(20)])
    cfg = config(tansu_broker, topic)
    run = Runner(KafkaSource(cfg, _FakeHandler(fail=[ValueError("bug")])))
    run.thread.join(60)
    assert isinstance(run.error, ValueError)
    assert committed(tansu_broker, cfg.group_id, topic, 1) == {0: None}
    # Nothing lost: the next run of the same group gets every record.
    handler = _FakeHandler()
    run2 = Runner(KafkaSource(cfg, handler))
    run2.wait_for(lambda: run2.source.stats.records >= 20)
    run2.finish()
    assert sorted(m.value for c in handler.calls for m in c) == sorted(
        f"v{i}".encode() for i in range(20))


def test_lag_and_tombstones(tansu_broker: str, kafka_topic) -> None:
    topic = kafka_topic(partitions=2)
    items: list[tuple[bytes | None, bytes | None]] = [
        (f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(400)]
    items.append((b"k1", None))
    ends = send(tansu_broker, topic, items)
    gate = threading.Event()
    handler = _FakeHandler()
    lag_seen: list[dict[int, int]] = []
    src = KafkaSource(config(tansu_broker, topic, batch_max=50, batch_linger_ms=0), handler)

    def hook(call: int) -> None:
        if call == 3:
            lag_seen.append(src.lag())
            gate.wait(30)

    handler.hook = hook
    run = Runner(src)
    run.wait_for(lambda: bool(lag_seen))
    gate.set()
    run.wait_for(lambda: src.stats.records >= 401)
    run.wait_for(lambda: sum(src.lag().values()) == 0 and len(src.lag()) == 2, timeout=15)
    run.finish()
    assert 0 < sum(lag_seen[0].values()) <= 401 - 100
    assert src.stats.tombstones == 1
    assert sum(len(c) for c in handler.calls) == 400  # the tombstone is not handed on
    assert committed(tansu_broker, src.config.group_id, topic, 2) == {p: ends[p] for p in (0, 1)}


def test_restored_state_offset_replays_the_gap(tansu_broker: str, kafka_topic) -> None:
    """A handler whose saved detector state is behind the committed offset gets
    the missing records again (from the offset it names), once."""
    topic = kafka_topic(partitions=2)
    ends = send(tansu_broker, topic, [(f"k{i % 4}".encode(), f"v{i}".encode())
                                      for i in range(200)])
    cfg = config(tansu_broker, topic, batch_max=1000)
    first = _FakeHandler()
    run = Runner(KafkaSource(cfg, first))
    run.wait_for(lambda: run.source.stats.records >= 200)
    run.finish()
    assert first.noted == ends  # told the offset after each partition's last batch

    second = _FakeHandler()
    second.resume = {0: ends[0] - 30, 1: ends[1]}  # partition 0's state misses 30 records
    run = Runner(KafkaSource(cfg, second))
    run.wait_for(lambda: run.source.stats.records >= 30)
    time.sleep(1.0)  # nothing more may come
    src = run.finish()
    got = [m.position for c in second.calls for m in c]
    assert got == [f"{topic}/0/{o}" for o in range(ends[0] - 30, ends[0])]
    assert src.stats.state_replays == 1

    # Beyond state_replay_max: no replay.
    third = _FakeHandler()
    third.resume = {0: 0}
    run = Runner(KafkaSource(dataclasses.replace(cfg, state_replay_max=10), third))
    run.wait_for(lambda: bool(third.assigned))
    time.sleep(1.0)
    src = run.finish()
    assert src.stats.state_replays == 0 and third.calls == [] and third.assigned


def test_rebalance_two_consumers(tansu_broker: str, kafka_topic, embedded_store) -> None:
    """Two members share a 3-partition topic while events keep arriving; one
    leaves; every event is stored exactly once and handler callbacks only run
    on the source threads."""
    topic = kafka_topic(partitions=3)
    prefix = f"rb{uuid.uuid4().hex[:6]}"
    values = valid_events(prefix, 3000)
    group = f"g-{uuid.uuid4().hex[:8]}"
    cfg = config(tansu_broker, topic, group_id=group, batch_max=200)
    send(tansu_broker, topic, [(json.loads(v)["consumer"].encode(), v) for v in values[:1000]])

    class Tracked(Pipeline):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.threads: set[str] = set()
            self.assigned: list[list[int]] = []

        def partitions_assigned(self, partitions: Sequence[int]) -> dict[int, int]:
            self.threads.add(threading.current_thread().name)
            self.assigned.append(list(partitions))
            return super().partitions_assigned(partitions)

        def partitions_revoked(self, partitions: Sequence[int]) -> None:
            self.threads.add(threading.current_thread().name)
            super().partitions_revoked(partitions)

    pa, pb = Tracked(embedded_store), Tracked(embedded_store)
    a = Runner(KafkaSource(cfg, pa), "source-a")
    a.wait_for(lambda: a.source.stats.records >= 200)
    b = Runner(KafkaSource(cfg, pb), "source-b")
    b.wait_for(lambda: bool(pb.assigned))  # the group rebalanced: a and b share the topic
    a.wait_for(lambda: len(a.source._owned) < 3)
    send(tansu_broker, topic, [(json.loads(v)["consumer"].encode(), v) for v in values[1000:2000]])
    b.wait_for(lambda: b.source.stats.records > 0)
    a.finish()  # a leaves: b takes over everything
    send(tansu_broker, topic, [(json.loads(v)["consumer"].encode(), v) for v in values[2000:]])
    b.wait_for(lambda: stored(embedded_store, prefix)[1] == 3000, timeout=60)
    b.finish()

    assert stored(embedded_store, prefix) == (3000, 3000)
    assert pa.threads == {"source-a"} and pb.threads == {"source-b"}
    assert a.source.stats.rebalances >= 2  # initial assignment, then revoked when b joined
    assert sorted({p for ps in pb.assigned for p in ps}) == [0, 1, 2]  # b took over all
    delivered = a.source.stats.records + b.source.stats.records
    assert delivered >= 3000  # at least once; replays are deduplicated by the store
    assert committed(tansu_broker, group, topic, 3) is not None


# -- the real pipeline and store ---------------------------------------------------------

def test_valid_and_bad_events_stored_once_and_dead_lettered(
        tansu_broker: str, kafka_topic, embedded_store) -> None:
    topic = kafka_topic(partitions=3)
    prefix = f"vb{uuid.uuid4().hex[:6]}"
    values = valid_events(prefix, 1200)
    bad = bad_messages(prefix)
    items: list[tuple[bytes | None, bytes | None]] = [
        (json.loads(v)["consumer"].encode(), v) for v in values]
    for j, (raw, _) in enumerate(bad):  # spread the bad ones over the stream and partitions
        items.insert(100 + j * 211, (f"{prefix}-c{j}".encode(), raw))
    items.insert(700, (f"{prefix}-c3".encode(), None))  # a tombstone
    ends = send(tansu_broker, topic, items)
    cfg = config(tansu_broker, topic, batch_max=500, dlq_max_value_bytes=32 * 1024)
    reasons: list[str] = []

    class DlqMetrics:
        def on_dead_letter(self, reason: str) -> None:
            reasons.append(reason)

    run = Runner(KafkaSource(cfg, Pipeline(embedded_store), metrics=DlqMetrics()))
    run.wait_for(lambda: run.source.stats.records >= len(items))
    src = run.finish()
    assert sorted(reasons) == sorted(reason for _, reason in bad)

    assert stored(embedded_store, prefix) == (1200, 1200)
    assert src.stats.accepted == 1200 and src.stats.duplicates == 0
    assert src.stats.rejected == src.stats.dead_lettered == len(bad)
    assert src.stats.tombstones == 1
    assert committed(tansu_broker, cfg.group_id, topic, 3) == {p: ends.get(p) for p in range(3)}

    dlq = read_topic(tansu_broker, cfg.dead_letter_topic or "", len(bad))
    assert len(dlq) == len(bad)
    expected = {raw[:100]: reason for raw, reason in bad}
    for rec in dlq:
        h = {k: v.decode() for k, v in rec.headers}
        assert h[HEADER_REASON] == expected[rec.value[:100]]
        assert h[HEADER_DETAIL]
        assert h[HEADER_SOURCE] == "kafka"
        t, p, o = h[HEADER_POSITION].rsplit("/", 2)
        assert t == topic and 0 <= int(p) < 3 and int(o) >= 0
        if h[HEADER_REASON] == "too_large":
            assert int(h[HEADER_ORIGINAL_BYTES]) > 64 * 1024
            assert len(rec.value) == 32 * 1024  # truncated, so the DLQ write cannot fail
    positions = {dict((k, v.decode()) for k, v in r.headers)[HEADER_POSITION] for r in dlq}

    rows = embedded_store.query(
        "SELECT position, reason FROM tokenward.rejected_events "
        f"WHERE startsWith(position, '{topic}/')")
    assert sorted(r["reason"] for r in rows) == sorted(reason for _, reason in bad)
    assert {r["position"] for r in rows} == positions


def test_stop_restart_and_replay(tansu_broker: str, kafka_topic, embedded_store) -> None:
    topic = kafka_topic(partitions=3)
    prefix = f"sr{uuid.uuid4().hex[:6]}"
    n = 4000
    values = valid_events(prefix, n, consumers=30)
    assert produce_events(tansu_broker, topic, values) == n
    cfg = config(tansu_broker, topic, batch_max=250, batch_linger_ms=0)

    # First consumer: stopped after a few batches.
    run1 = Runner(KafkaSource(cfg, Pipeline(embedded_store)))
    run1.wait_for(lambda: run1.source.stats.batches >= 3)
    s1 = run1.finish()
    assert 0 < s1.stats.records < n, "stopped too late to prove a restart"
    mid_count = stored(embedded_store, prefix)
    assert mid_count == (s1.stats.accepted, s1.stats.accepted)

    # Second consumer, same group: continues from the committed offsets.
    run2 = Runner(KafkaSource(cfg, Pipeline(embedded_store)))
    run2.wait_for(lambda: s1.stats.records + run2.source.stats.records >= n)
    s2 = run2.finish()
    assert stored(embedded_store, prefix) == (n, n)
    assert s1.stats.records + s2.stats.records == n  # clean stop: nothing delivered twice
    assert s1.stats.accepted + s2.stats.accepted == n

    # Replay from the beginning with a new group: nothing stored twice.
    replay_cfg = config(tansu_broker, topic, group_id=f"replay-{uuid.uuid4().hex[:6]}",
                        batch_max=2000)
    run3 = Runner(KafkaSource(replay_cfg, Pipeline(embedded_store)))
    run3.wait_for(lambda: run3.source.stats.records >= n)
    s3 = run3.finish()
    assert s3.stats.accepted == 0 and s3.stats.duplicates == n
    assert stored(embedded_store, prefix) == (n, n)


def test_storage_outage_with_real_store_loses_nothing(
        tansu_broker: str, kafka_topic, embedded_store) -> None:
    topic = kafka_topic(partitions=3)
    prefix = f"so{uuid.uuid4().hex[:6]}"
    values = valid_events(prefix, 1500)
    values.insert(300, b"{broken")
    produce_events(tansu_broker, topic, values, key_fn=lambda v: v[:40])

    class FailingFirst(Pipeline):
        """The real pipeline whose store is "down" for the first N writes."""

        def __init__(self, store: Any, failures: int) -> None:
            super().__init__(store)
            self.failures = failures

        def handle(self, batch: Sequence[RawMessage], *, per_message: bool = False
                   ) -> BatchResult:
            if self.failures > 0:
                self.failures -= 1
                raise StorageError("injected: ClickHouse unavailable")
            return super().handle(batch, per_message=per_message)

    cfg = config(tansu_broker, topic, batch_max=400)
    run = Runner(KafkaSource(cfg, FailingFirst(embedded_store, failures=4)))
    run.wait_for(lambda: stored(embedded_store, prefix)[1] == 1500, timeout=90)
    run.wait_for(lambda: run.source.stats.records >= 1501)
    src = run.finish()
    assert stored(embedded_store, prefix) == (1500, 1500)
    assert src.stats.retries == 4 and src.stats.outages == 1
    assert src.stats.dead_lettered == 1
    rows = embedded_store.query("SELECT count() AS n FROM tokenward.rejected_events "
                                f"WHERE startsWith(position, '{topic}/')")
    assert int(rows[0]["n"]) == 1


# -- helpers of the module ------------------------------------------------------------

def test_produce_events_keys_by_consumer(tansu_broker: str, kafka_topic) -> None:
    topic = kafka_topic(partitions=3)
    prefix = f"pk{uuid.uuid4().hex[:6]}"
    values = valid_events(prefix, 600, consumers=9)
    assert produce_events(tansu_broker, topic, values) == 600
    recs = read_topic(tansu_broker, topic, 600)
    assert len(recs) == 600
    partitions_of: dict[str, set[int]] = {}
    for r in recs:
        partitions_of.setdefault(json.loads(r.value)["consumer"], set()).add(r.partition)
        assert r.key == json.loads(r.value)["consumer"].encode()
    assert all(len(ps) == 1 for ps in partitions_of.values())
    assert len({p for ps in partitions_of.values() for p in ps}) > 1


def test_check_kafka(tansu_broker: str, kafka_topic) -> None:
    topic = kafka_topic(partitions=1)
    assert check_kafka(tansu_broker, timeout=5) is None
    assert check_kafka(tansu_broker, timeout=5, topic=topic) is None
    assert "does not exist" in (check_kafka(tansu_broker, timeout=5, topic="no.such") or "")
    from tests.conftest import free_port

    t0 = time.monotonic()
    err = check_kafka(f"127.0.0.1:{free_port()}", timeout=1)
    assert err is not None and "not reachable" in err
    assert time.monotonic() - t0 < 10
