"""ClickHouse schema of database ``tokenward`` (shared by the embedded engine and a server).

The table names are a public interface: dashboards and analysts' queries use
them.  Every statement is idempotent (``IF NOT EXISTS``) and the applied
version is recorded in ``schema_version`` so that a later release can migrate.

Duplicates.  A Kafka batch is re-delivered after a crash between store and
commit, and an operator may replay a file twice; analysts must still see every
event once, with plain ``count()``, no ``FINAL``.  So:

1. the writer removes duplicates *before* inserting: within the batch, and
   against ``usage_events`` (an ``event_id IN (...)`` probe on the batch's time
   range; the time-first sort key and the bloom-filter index make it cheap).
   Since duplicates never reach ``usage_events``, the materialized view never
   counts them into ``usage_1m`` either (a rollup fed by a view counts a retried
   batch again unless it has its own dedup);
2. ``usage_events`` is also a ``ReplacingMergeTree`` keyed on the event, a
   backstop for the one race the probe cannot see (two writers storing the same
   event at the same instant, which keyed partitions make rare): merges remove
   such a copy eventually.

We do not rely on ClickHouse's insert-block deduplication: it only matches
byte-identical blocks (a replay cut into other batches is not), needs a
deduplication window on every table including the rollup, and silently drops a
legitimately identical second batch.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
DATABASE = "tokenward"

DDL: tuple[str, ...] = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    # Sort key: time first (hour), then tenant and consumer.  Analysts filter on a
    # time range nearly always, then on tenant/consumer; the writer's duplicate
    # probe covers a narrow time range.  Ending in (ts, event_id) makes the key
    # unique per event, which is what ReplacingMergeTree collapses on.
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.usage_events
    (
        event_id String,
        ts DateTime64(3, 'UTC'),
        tenant LowCardinality(String),
        consumer String,
        model LowCardinality(String),
        status UInt16,
        failed UInt8,
        user String,
        client_ip String,
        gateway LowCardinality(String),
        provider LowCardinality(String),
        route LowCardinality(String),
        error LowCardinality(String),
        finish_reason LowCardinality(String),
        input_tokens UInt32,
        output_tokens UInt32,
        reasoning_tokens UInt32,
        cached_input_tokens UInt32,
        cache_write_tokens UInt32,
        max_output_tokens Nullable(UInt32),
        latency_ms Nullable(Float64),
        ttft_ms Nullable(Float64),
        request_hash String,
        session_id String,
        trace_id String,
        tool_calls Nullable(UInt32),
        attempt Nullable(UInt32),
        stream Nullable(Bool),
        cost Float64,
        cost_source LowCardinality(String),
        labels Map(String, String),
        source LowCardinality(String),
        source_position String,
        ingested_at DateTime64(3, 'UTC'),
        INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
        INDEX idx_request_hash request_hash TYPE bloom_filter(0.01) GRANULARITY 4,
        INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4
    )
    ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(ts)
    ORDER BY (toStartOfHour(ts), tenant, consumer, ts, event_id)
    """,
    # Per-minute rollup.  Sums are SimpleAggregateFunction (analysts use sum());
    # latency quantiles are t-digest states (quantilesTDigestMerge(0.5,0.9,0.99)).
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.usage_1m
    (
        minute DateTime('UTC'),
        tenant LowCardinality(String),
        consumer String,
        model LowCardinality(String),
        requests SimpleAggregateFunction(sum, UInt64),
        errors SimpleAggregateFunction(sum, UInt64),
        input_tokens SimpleAggregateFunction(sum, UInt64),
        output_tokens SimpleAggregateFunction(sum, UInt64),
        reasoning_tokens SimpleAggregateFunction(sum, UInt64),
        cached_input_tokens SimpleAggregateFunction(sum, UInt64),
        cache_write_tokens SimpleAggregateFunction(sum, UInt64),
        cost SimpleAggregateFunction(sum, Float64),
        latency_ms AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), Float64),
        ttft_ms AggregateFunction(quantilesTDigest(0.5, 0.9, 0.99), Float64)
    )
    ENGINE = AggregatingMergeTree
    PARTITION BY toYYYYMM(minute)
    ORDER BY (tenant, consumer, model, minute)
    """,
    f"""
    CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.usage_1m_mv TO {DATABASE}.usage_1m AS
    SELECT
        toStartOfMinute(ts) AS minute,
        tenant,
        consumer,
        model,
        count() AS requests,
        countIf(failed = 1) AS errors,
        sum(toUInt64(input_tokens)) AS input_tokens,
        sum(toUInt64(output_tokens)) AS output_tokens,
        sum(toUInt64(reasoning_tokens)) AS reasoning_tokens,
        sum(toUInt64(cached_input_tokens)) AS cached_input_tokens,
        sum(toUInt64(cache_write_tokens)) AS cache_write_tokens,
        sum(cost) AS cost,
        quantilesTDigestStateIf(0.5, 0.9, 0.99)(assumeNotNull(latency_ms), isNotNull(latency_ms))
            AS latency_ms,
        quantilesTDigestStateIf(0.5, 0.9, 0.99)(assumeNotNull(ttft_ms), isNotNull(ttft_ms))
            AS ttft_ms
    FROM {DATABASE}.usage_events
    GROUP BY minute, tenant, consumer, model
    """,
    # Every revision of every finding: the episode's history (firing, updates,
    # resolved).  (finding_id, revision) is unique; the writer skips revisions
    # already stored, so a replay adds nothing.  The newest state of a finding
    # is in the view findings_latest.
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.findings
    (
        finding_id String,
        revision UInt32,
        kind LowCardinality(String),
        severity LowCardinality(String),
        scope LowCardinality(String),
        subject String,
        tenant LowCardinality(String),
        consumer String,
        model LowCardinality(String),
        status LowCardinality(String),
        first_event_ts DateTime64(3, 'UTC'),
        detected_at DateTime64(3, 'UTC'),
        updated_at DateTime64(3, 'UTC'),
        resolved_at Nullable(DateTime64(3, 'UTC')),
        observed Float64,
        baseline Float64,
        threshold Float64,
        action LowCardinality(String),
        summary String,
        evidence String,
        recorded_at DateTime64(3, 'UTC')
    )
    ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(detected_at)
    ORDER BY (tenant, kind, detected_at, finding_id, revision)
    """,
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.findings_latest AS
    SELECT * FROM {DATABASE}.findings
    ORDER BY finding_id, revision DESC
    LIMIT 1 BY finding_id
    """,
    # The block audit: one row per block, unblock, expiry or dry-run "would block".
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.blocks
    (
        block_id String,
        event LowCardinality(String),
        scope LowCardinality(String),
        value String,
        tenant LowCardinality(String),
        reason String,
        finding_id String,
        actor String,
        dry_run UInt8,
        at DateTime64(3, 'UTC'),
        expires_at Nullable(DateTime64(3, 'UTC'))
    )
    ENGINE = MergeTree
    PARTITION BY toYYYYMM(at)
    ORDER BY (scope, value, at, block_id, event)
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.rejected_events
    (
        received_at DateTime64(3, 'UTC'),
        source LowCardinality(String),
        position String,
        reason LowCardinality(String),
        detail String,
        event_id String,
        raw String,
        raw_hash UInt64
    )
    ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(received_at)
    ORDER BY (source, position, raw_hash)
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.detector_state
    (
        scope String,
        saved_at DateTime64(3, 'UTC'),
        event_time DateTime64(3, 'UTC'),
        offsets String,
        state String CODEC(ZSTD(3))
    )
    ENGINE = ReplacingMergeTree(saved_at)
    ORDER BY scope
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {DATABASE}.schema_version
    (
        version UInt32,
        applied_at DateTime64(3, 'UTC')
    )
    ENGINE = ReplacingMergeTree
    ORDER BY version
    """,
)

EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "ts", "tenant", "consumer", "model", "status", "failed", "user", "client_ip",
    "gateway", "provider", "route", "error", "finish_reason", "input_tokens", "output_tokens",
    "reasoning_tokens", "cached_input_tokens", "cache_write_tokens", "max_output_tokens",
    "latency_ms", "ttft_ms", "request_hash", "session_id", "trace_id", "tool_calls", "attempt",
    "stream", "cost", "cost_source", "labels", "source", "source_position", "ingested_at",
)

FINDING_COLUMNS: tuple[str, ...] = (
    "finding_id", "revision", "kind", "severity", "scope", "subject", "tenant", "consumer",
    "model", "status", "first_event_ts", "detected_at", "updated_at", "resolved_at", "observed",
    "baseline", "threshold", "action", "summary", "evidence", "recorded_at",
)

REJECTED_COLUMNS: tuple[str, ...] = (
    "received_at", "source", "position", "reason", "detail", "event_id", "raw", "raw_hash",
)

BLOCK_COLUMNS: tuple[str, ...] = (
    "block_id", "event", "scope", "value", "tenant", "reason", "finding_id", "actor", "dry_run",
    "at", "expires_at",
)
