"""ClickHouse storage: one writer, two backends that share every SQL statement.

* :class:`EmbeddedBackend` runs the ClickHouse engine in-process (chdb) on a
  data folder: the default, no server needed.  chdb allows one engine per
  process bound to one folder, so the backend is cached per folder and a
  second *process* on the same folder fails with a message saying so.
* :class:`ServerBackend` talks to a ClickHouse server or cluster over HTTP
  (clickhouse-connect).

Both implement the small :class:`Backend` protocol (command, select,
insert_arrow); :class:`Store` holds all SQL and the write logic on top.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from detectors.finding import Finding
from ingest import schema
from ingest.event import UsageEvent
from ingest.source import StorageError

log = logging.getLogger(__name__)

DB = schema.DATABASE
# Inserts must be visible to the next duplicate probe: the 26.x engine
# defaults to async_insert=1, whose buffered rows the probe would not see.
INSERT_SETTINGS = "SETTINGS async_insert = 0"


class Backend(Protocol):
    name: str

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None: ...

    def select(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]: ...

    def insert_arrow(self, table: str, tbl: pa.Table) -> None: ...

    def close(self) -> None: ...


class DataDirLocked(RuntimeError):
    pass


_EMBEDDED: dict[str, EmbeddedBackend] = {}
_EMBEDDED_LOCK = threading.Lock()


class EmbeddedBackend:
    """chdb on a local folder.  Use :func:`EmbeddedBackend.open` (one per folder)."""

    name = "embedded"

    def __init__(self, path: str) -> None:
        from chdb import session  # imported here: a server deployment never loads it

        self.path = path
        Path(path).mkdir(parents=True, exist_ok=True)
        locked = DataDirLocked(
            f"the data folder {path} is in use by another tokenward process "
            "(the embedded ClickHouse allows one process per folder). Stop it, use "
            "another --data-dir, or query the running service: "
            "tokenward sql --api http://HOST:PORT ..."
        )
        # chdb's own error for this case does not say why ("Error initializing
        # EmbeddedServer"), so test the engine's lock on its status file first.
        if _folder_locked(Path(path) / "status"):
            raise locked
        try:
            self._session = session.Session(path)
        except Exception as exc:  # chdb raises a bare RuntimeError/ChdbError
            if "lock" in str(exc).lower() or _folder_locked(Path(path) / "status"):
                raise locked from exc
            raise
        # chdb's session is not documented as thread-safe for concurrent queries;
        # the API and the consumer share it, so calls are serialised.
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: str) -> EmbeddedBackend:
        key = os.path.realpath(path)
        with _EMBEDDED_LOCK:
            be = _EMBEDDED.get(key)
            if be is None and _EMBEDDED:
                other = next(iter(_EMBEDDED))
                raise RuntimeError(
                    f"this process already uses the embedded ClickHouse in {other}; the "
                    f"embedded engine binds one data folder per process, so {key} cannot be "
                    "opened too (use one --data-dir, or a ClickHouse server)"
                )
            if be is None:
                be = cls(key)
                _EMBEDDED[key] = be
            return be

    def _query(self, sql: str, fmt: str, params: dict[str, Any] | None) -> Any:
        with self._lock:
            if params:
                return self._session.query(sql, fmt, params=_chdb_params(params))
            return self._session.query(sql, fmt)

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._query(sql, "CSV", params)

    def select(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        if readonly:
            sql = _with_readonly(sql)
        res = self._query(sql, "JSONCompact", params)
        text = res.bytes().decode() if hasattr(res, "bytes") else str(res)
        if not text.strip():
            return [], []
        doc = json.loads(text)
        cols = [m["name"] for m in doc.get("meta", [])]
        return cols, [tuple(r) for r in doc.get("data", [])]

    def insert_arrow(self, table: str, tbl: pa.Table) -> None:
        cols = ", ".join(f"`{c}`" for c in tbl.column_names)
        with self._lock:
            # The Python() table function reads the local variable `tbl`.
            self._session.query(
                f"INSERT INTO {table} ({cols}) {INSERT_SETTINGS} SELECT {cols} FROM Python(tbl)"
            )

    def close(self) -> None:
        # The engine lives as long as the process; closing and reopening chdb
        # sessions in one process is not supported, so this is a no-op.
        pass


class ServerBackend:
    """A ClickHouse server via clickhouse-connect (HTTP)."""

    name = "server"

    def __init__(self, url: str) -> None:
        import clickhouse_connect

        self.url = url
        self._client = clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
        self._lock = threading.RLock()

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._client.command(sql, parameters=params)

    def select(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = False
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        settings = {"readonly": 2} if readonly else None
        with self._lock:
            res = self._client.query(sql, parameters=params, settings=settings)
        return list(res.column_names), [tuple(_jsonable(v) for v in r) for r in res.result_rows]

    def insert_arrow(self, table: str, tbl: pa.Table) -> None:
        with self._lock:
            self._client.insert_arrow(table, tbl, settings={"async_insert": 0})

    def close(self) -> None:
        self._client.close()


def _folder_locked(status: Path) -> bool:
    import fcntl

    if not status.exists():
        return False
    try:
        with open(status, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _with_readonly(sql: str) -> str:
    # readonly=1 refuses every write, DDL and settings change for this query.
    return sql.rstrip().rstrip(";") + "\nSETTINGS readonly = 1"


def _chdb_params(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        if isinstance(v, list | tuple):
            out[k] = "[" + ",".join(_sql_literal(x) for x in v) + "]"
        elif isinstance(v, datetime):
            out[k] = v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        else:
            out[k] = str(v)
    return out


def _sql_literal(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    return v


@dataclass(slots=True)
class StoredEvent:
    event: UsageEvent
    cost_source: str
    source: str
    position: str


@dataclass(slots=True)
class RejectedRow:
    source: str
    position: str
    reason: str
    detail: str
    raw: str
    event_id: str | None = None


@dataclass(slots=True)
class WriteResult:
    stored: int
    duplicates: int
    findings: int
    duplicate_ids: set[str]


@dataclass(slots=True)
class BlockRow:
    block_id: str
    event: str  # block | unblock | expire | would_block
    scope: str
    value: str
    tenant: str
    reason: str
    finding_id: str
    actor: str
    dry_run: bool
    at: datetime
    expires_at: datetime | None


_TS = pa.timestamp("ms", tz="UTC")
_LABELS = pa.map_(pa.string(), pa.string())


class Store:
    """Everything tokenward writes to and reads from ClickHouse."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._write_lock = threading.Lock()

    # -- schema -----------------------------------------------------------
    def ensure_schema(self) -> None:
        for stmt in schema.DDL:
            self.backend.command(stmt)
        _, rows = self.backend.select(f"SELECT max(version) FROM {DB}.schema_version")
        current = int(rows[0][0] or 0) if rows else 0
        if current > schema.SCHEMA_VERSION:
            raise RuntimeError(
                f"the ClickHouse schema is version {current}, newer than this tokenward "
                f"({schema.SCHEMA_VERSION}); upgrade tokenward"
            )
        if current < schema.SCHEMA_VERSION:
            self.backend.command(
                f"INSERT INTO {DB}.schema_version {INSERT_SETTINGS} VALUES "
                f"({schema.SCHEMA_VERSION}, now64(3))"
            )

    def ping(self) -> bool:
        try:
            self.backend.select("SELECT 1")
            return True
        except Exception:
            return False

    # -- writes -----------------------------------------------------------
    def write(
        self,
        events: Sequence[StoredEvent],
        rejected: Sequence[RejectedRow] = (),
        findings: Sequence[Finding] = (),
    ) -> WriteResult:
        """Store one batch; raise StorageError if any part failed (then the
        whole batch is delivered again, and the duplicate probes make that safe)."""
        try:
            with self._write_lock:
                fresh = self._new_events(events)
                if fresh:
                    self.backend.insert_arrow(f"{DB}.usage_events", _events_table(fresh))
                if rejected:
                    self._write_rejected(rejected)
                nf = self._write_findings(findings) if findings else 0
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"ClickHouse write failed: {exc}") from exc
        fresh_ids = {se.event.event_id for se in fresh}
        dups = {se.event.event_id for se in events} - fresh_ids
        return WriteResult(stored=len(fresh), duplicates=len(events) - len(fresh), findings=nf,
                           duplicate_ids=dups)

    def _new_events(self, events: Sequence[StoredEvent]) -> list[StoredEvent]:
        if not events:
            return []
        seen: dict[str, StoredEvent] = {}
        for se in events:  # first occurrence wins inside a batch
            seen.setdefault(se.event.event_id, se)
        lo = min(se.event.ts for se in seen.values())
        hi = max(se.event.ts for se in seen.values())
        ids = list(seen)
        existing: set[str] = set()
        for i in range(0, len(ids), 10_000):
            chunk = ids[i : i + 10_000]
            _, rows = self.backend.select(
                f"SELECT event_id FROM {DB}.usage_events "
                "WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts <= {hi:DateTime64(3, 'UTC')} "
                "AND event_id IN {ids:Array(String)}",
                {"lo": lo, "hi": hi, "ids": chunk},
            )
            existing.update(r[0] for r in rows)
        return [se for eid, se in seen.items() if eid not in existing]

    def _write_rejected(self, rejected: Sequence[RejectedRow]) -> None:
        now = datetime.now(UTC)
        rows: dict[tuple[str, str, int], RejectedRow] = {}
        for r in rejected:
            h = int.from_bytes(hashlib.blake2b(r.raw.encode(), digest_size=8).digest(), "little")
            rows.setdefault((r.source, r.position, h), r)
        # A replayed file re-rejects the same lines at the same positions: skip those.
        keys = list(rows)
        _, have = self.backend.select(
            f"SELECT source, position, raw_hash FROM {DB}.rejected_events "
            "WHERE position IN {pos:Array(String)}",
            {"pos": sorted({k[1] for k in keys})},
        )
        existing = {(s, p, int(h)) for s, p, h in have}
        fresh = [(k, r) for k, r in rows.items() if k not in existing]
        if not fresh:
            return
        tbl = pa.table(
            {
                "received_at": pa.array([now] * len(fresh), _TS),
                "source": [r.source for _, r in fresh],
                "position": [r.position for _, r in fresh],
                "reason": [r.reason for _, r in fresh],
                "detail": [r.detail[:1000] for _, r in fresh],
                "event_id": [r.event_id or "" for _, r in fresh],
                "raw": [r.raw for _, r in fresh],
                "raw_hash": pa.array([k[2] for k, _ in fresh], pa.uint64()),
            }
        )
        self.backend.insert_arrow(f"{DB}.rejected_events", tbl)

    def _write_findings(self, findings: Sequence[Finding]) -> int:
        uniq: dict[tuple[str, int], Finding] = {}
        for f in findings:
            uniq[(f.finding_id, f.revision)] = f
        _, have = self.backend.select(
            f"SELECT finding_id, revision FROM {DB}.findings "
            "WHERE finding_id IN {ids:Array(String)}",
            {"ids": sorted({k[0] for k in uniq})},
        )
        existing = {(fid, int(rev)) for fid, rev in have}
        fresh = [f for k, f in uniq.items() if k not in existing]
        if fresh:
            self.backend.insert_arrow(f"{DB}.findings", findings_table(fresh))
        return len(fresh)

    def write_blocks(self, rows: Sequence[BlockRow]) -> None:
        if not rows:
            return
        tbl = pa.table(
            {
                "block_id": [r.block_id for r in rows],
                "event": [r.event for r in rows],
                "scope": [r.scope for r in rows],
                "value": [r.value for r in rows],
                "tenant": [r.tenant for r in rows],
                "reason": [r.reason for r in rows],
                "finding_id": [r.finding_id for r in rows],
                "actor": [r.actor for r in rows],
                "dry_run": pa.array([int(r.dry_run) for r in rows], pa.uint8()),
                "at": pa.array([r.at for r in rows], _TS),
                "expires_at": pa.array([r.expires_at for r in rows], _TS),
            }
        )
        try:
            with self._write_lock:
                self.backend.insert_arrow(f"{DB}.blocks", tbl)
        except Exception as exc:
            raise StorageError(f"ClickHouse write failed: {exc}") from exc

    # -- detector state ---------------------------------------------------
    def save_state(self, scope: str, state: bytes, event_time: datetime, offsets: str) -> None:
        import base64

        tbl = pa.table(
            {
                "scope": [scope],
                "saved_at": pa.array([datetime.now(UTC)], _TS),
                "event_time": pa.array([event_time], _TS),
                "offsets": [offsets],
                "state": [base64.b64encode(state).decode()],
            }
        )
        with self._write_lock:
            self.backend.insert_arrow(f"{DB}.detector_state", tbl)

    def load_state(self, scope: str) -> tuple[bytes, str] | None:
        import base64

        _, rows = self.backend.select(
            f"SELECT state, offsets FROM {DB}.detector_state WHERE scope = {{s:String}} "
            "ORDER BY saved_at DESC LIMIT 1",
            {"s": scope},
        )
        if not rows:
            return None
        return base64.b64decode(rows[0][0]), rows[0][1]

    # -- reads ------------------------------------------------------------
    def query(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = True
    ) -> list[dict[str, Any]]:
        cols, rows = self.backend.select(sql, params, readonly=readonly)
        return [dict(zip(cols, r, strict=False)) for r in rows]

    def query_table(
        self, sql: str, params: dict[str, Any] | None = None, *, readonly: bool = True
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self.backend.select(sql, params, readonly=readonly)

    def close(self) -> None:
        self.backend.close()


def _events_table(rows: Sequence[StoredEvent]) -> pa.Table:
    now = datetime.now(UTC)
    evs = [r.event for r in rows]
    n = len(evs)
    return pa.table(
        {
            "event_id": [e.event_id for e in evs],
            "ts": pa.array([e.ts for e in evs], _TS),
            "tenant": [e.tenant for e in evs],
            "consumer": [e.consumer for e in evs],
            "model": [e.model for e in evs],
            "status": pa.array([e.status for e in evs], pa.uint16()),
            "failed": pa.array([int(e.failed) for e in evs], pa.uint8()),
            "user": [e.user or "" for e in evs],
            "client_ip": [e.client_ip or "" for e in evs],
            "gateway": [e.gateway or "" for e in evs],
            "provider": [e.provider or "" for e in evs],
            "route": [e.route or "" for e in evs],
            "error": [e.error or "" for e in evs],
            "finish_reason": [e.finish_reason or "" for e in evs],
            "input_tokens": pa.array([e.input_tokens for e in evs], pa.uint32()),
            "output_tokens": pa.array([e.output_tokens for e in evs], pa.uint32()),
            "reasoning_tokens": pa.array([e.reasoning_tokens for e in evs], pa.uint32()),
            "cached_input_tokens": pa.array([e.cached_input_tokens for e in evs], pa.uint32()),
            "cache_write_tokens": pa.array([e.cache_write_tokens for e in evs], pa.uint32()),
            "max_output_tokens": pa.array([e.max_output_tokens for e in evs], pa.uint32()),
            "latency_ms": pa.array([e.latency_ms for e in evs], pa.float64()),
            "ttft_ms": pa.array([e.ttft_ms for e in evs], pa.float64()),
            "request_hash": [e.request_hash or "" for e in evs],
            "session_id": [e.session_id or "" for e in evs],
            "trace_id": [e.trace_id or "" for e in evs],
            "tool_calls": pa.array([e.tool_calls for e in evs], pa.uint32()),
            "attempt": pa.array([e.attempt for e in evs], pa.uint32()),
            "stream": pa.array([e.stream for e in evs], pa.bool_()),
            "cost": pa.array([e.cost or 0.0 for e in evs], pa.float64()),
            "cost_source": [r.cost_source for r in rows],
            "labels": pa.array([list(e.labels.items()) for e in evs], _LABELS),
            "source": [r.source for r in rows],
            "source_position": [r.position for r in rows],
            "ingested_at": pa.array([now] * n, _TS),
        }
    )


def findings_table(findings: Sequence[Finding]) -> pa.Table:
    now = datetime.now(UTC)
    fs = list(findings)
    return pa.table(
        {
            "finding_id": [f.finding_id for f in fs],
            "revision": pa.array([f.revision for f in fs], pa.uint32()),
            "kind": [f.kind for f in fs],
            "severity": [f.severity for f in fs],
            "scope": [f.scope for f in fs],
            "subject": [f.subject for f in fs],
            "tenant": [f.tenant for f in fs],
            "consumer": [f.consumer or "" for f in fs],
            "model": [f.model or "" for f in fs],
            "status": [f.status for f in fs],
            "first_event_ts": pa.array([f.first_event_ts for f in fs], _TS),
            "detected_at": pa.array([f.detected_at for f in fs], _TS),
            "updated_at": pa.array([f.updated_at or f.detected_at for f in fs], _TS),
            "resolved_at": pa.array([f.resolved_at for f in fs], _TS),
            "observed": pa.array([float(f.observed) for f in fs], pa.float64()),
            "baseline": pa.array([float(f.baseline) for f in fs], pa.float64()),
            "threshold": pa.array([float(f.threshold) for f in fs], pa.float64()),
            "action": [f.action for f in fs],
            "summary": [f.summary for f in fs],
            "evidence": [json.dumps(f.evidence, default=str, sort_keys=True) for f in fs],
            "recorded_at": pa.array([now] * len(fs), _TS),
        }
    )


def open_store(data_dir: str | None = None, url: str | None = None) -> Store:
    """Open (and create the schema of) the configured store: a server when
    ``url`` is given, else the embedded engine in ``data_dir``."""
    backend: Backend
    backend = ServerBackend(url) if url else EmbeddedBackend.open(data_dir or "./tokenward-data")
    store = Store(backend)
    store.ensure_schema()
    return store
