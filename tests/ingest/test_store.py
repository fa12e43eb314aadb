"""Storage against the real ClickHouse engine (chdb; or a server when
TOKENWARD_TEST_CLICKHOUSE_URL is set: the same tests and the same SQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from detectors.finding import Finding
from ingest.event import parse_event
from ingest.store import RejectedRow, StoredEvent

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def mk(i: int, *, consumer: str = "svc", status: int = 200, minute: int = 0, **kw) -> StoredEvent:
    d = {
        "event_id": f"ev-{i}",
        "ts": (T0 + timedelta(minutes=minute, seconds=i % 60)).isoformat(),
        "consumer": consumer,
        "model": "gpt-4o",
        "status": status,
        "input_tokens": 1000,
        "output_tokens": 200,
        "reasoning_tokens": 50,
        "cached_input_tokens": 100,
        "latency_ms": 100.0 + i,
        "cost": 0.01,
        "labels": {"team": "x"},
    }
    d.update(kw)
    return StoredEvent(parse_event(json.dumps(d)).event, "gateway", "test", f"t:{i}")


def count(store, sql):
    return store.query(sql)[0]["n"]


def test_schema_is_idempotent_and_versioned(store):
    store.ensure_schema()
    store.ensure_schema()
    assert store.query("SELECT max(version) AS v FROM tokenward.schema_version")[0]["v"] == 1
    tables = {r["name"] for r in store.query("SHOW TABLES FROM tokenward")}
    for t in ("usage_events", "usage_1m", "findings", "blocks", "rejected_events"):
        assert t in tables


def test_events_stored_once_across_replays(store):
    batch = [mk(i) for i in range(100)]
    r1 = store.write(batch)
    assert (r1.stored, r1.duplicates) == (100, 0)
    # the same batch again (a re-delivered Kafka batch), and cut differently
    r2 = store.write(batch)
    r3 = store.write(batch[50:] + [mk(i) for i in range(100, 110)])
    assert (r2.stored, r2.duplicates) == (0, 100)
    assert (r3.stored, r3.duplicates) == (10, 50)
    assert count(store, "SELECT count() AS n FROM tokenward.usage_events") == 110
    # the rollup counted each event once too
    assert count(store, "SELECT sum(requests) AS n FROM tokenward.usage_1m") == 110


def test_duplicates_inside_one_batch(store):
    r = store.write([mk(1), mk(1), mk(2)])
    assert (r.stored, r.duplicates) == (2, 1)
    assert r.duplicate_ids == set()  # ids already stored before this batch
    r = store.write([mk(2), mk(3)])
    assert r.duplicate_ids == {"ev-2"}


def test_rollup_per_minute(store):
    evs = [mk(i, minute=i % 3, status=500 if i % 4 == 0 else 200) for i in range(30)]
    store.write(evs)
    rows = store.query(
        "SELECT minute, sum(requests) AS req, sum(errors) AS err, sum(input_tokens) AS inp, "
        "sum(cached_input_tokens) AS cached, sum(reasoning_tokens) AS rsn, sum(cost) AS cost, "
        "quantilesTDigestMerge(0.5, 0.9, 0.99)(latency_ms) AS lat "
        "FROM tokenward.usage_1m GROUP BY minute ORDER BY minute"
    )
    assert [r["req"] for r in rows] == [10, 10, 10]
    assert sum(r["err"] for r in rows) == 8
    assert rows[0]["inp"] == 10_000 and rows[0]["cached"] == 1000 and rows[0]["rsn"] == 500
    assert abs(sum(r["cost"] for r in rows) - 0.3) < 1e-9
    assert 100 <= rows[0]["lat"][0] <= 130


def test_event_columns_round_trip(store):
    store.write([mk(7, user="u1", request_hash="h", session_id="s", trace_id="t", stream=True)])
    row = store.query("SELECT * FROM tokenward.usage_events")[0]
    assert row["event_id"] == "ev-7" and row["user"] == "u1" and row["request_hash"] == "h"
    assert row["labels"] == {"team": "x"}
    assert row["stream"] in (True, 1)
    assert row["max_output_tokens"] is None
    assert row["cost_source"] == "gateway"


def test_rejected_rows_dedup_on_replay(store):
    rows = [RejectedRow("file", "f.jsonl:3", "invalid_json", "bad", "{x"),
            RejectedRow("file", "f.jsonl:9", "missing_field", "consumer", '{"a":1}', "e9")]
    store.write([], rows)
    store.write([], rows)
    got = store.query("SELECT reason, position, event_id FROM tokenward.rejected_events "
                      "ORDER BY position")
    assert [(r["reason"], r["position"], r["event_id"]) for r in got] == [
        ("invalid_json", "f.jsonl:3", ""), ("missing_field", "f.jsonl:9", "e9")]


def _finding(rev: int, status: str = "firing") -> Finding:
    return Finding.new(kind="retry_storm", severity="critical", scope="consumer", subject="svc",
                       tenant="t", first_event_ts=T0, detected_at=T0, observed=50, baseline=1,
                       threshold=10, revision=rev, status=status, evidence={"ids": ["a"]})


def test_findings_history_and_latest(store):
    store.write([], [], [_finding(0)])
    store.write([], [], [_finding(0), _finding(1), _finding(2, "resolved")])
    assert count(store, "SELECT count() AS n FROM tokenward.findings") == 3
    latest = store.query("SELECT revision, status, evidence FROM tokenward.findings_latest")
    assert len(latest) == 1 and latest[0]["revision"] == 2 and latest[0]["status"] == "resolved"
    assert json.loads(latest[0]["evidence"]) == {"ids": ["a"]}


def test_detector_state_round_trip(store):
    store.save_state("p/1", b"\x00\x01state", T0, "42")
    store.save_state("p/1", b"newer", T0, "43")
    assert store.load_state("p/1") == (b"newer", "43")
    assert store.load_state("p/2") is None


def test_read_only_queries_refuse_writes(store):
    with pytest.raises(Exception, match=r"(?i)readonly|read-only"):
        store.query("CREATE TABLE tokenward.evil (a UInt8) ENGINE = Memory")
    with pytest.raises(Exception, match=r"(?i)readonly|syntax|parse"):
        store.query("INSERT INTO tokenward.blocks (block_id) SELECT 'x'")
    assert count(store, "SELECT count() AS n FROM tokenward.blocks") == 0
    assert count(store, "SELECT count() AS n FROM system.tables WHERE name = 'evil'") == 0
