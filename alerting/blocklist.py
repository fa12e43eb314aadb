"""The block list: who is blocked, why, and until when (DESIGN.md, "Block list").

Gateways poll ``GET /v1/blocklist`` or ask ``GET /v1/check`` per request, so
both paths must be cheap:

* :meth:`BlockList.check` is one dict lookup per scope (consumer, user, ip);
  an entry past its ``expires_at`` never answers "blocked", even before
  :meth:`BlockList.expire` has removed it;
* the serialised list (JSON bytes, its ``ETag`` and ``version``) is built
  once per change and handed out as is (:meth:`BlockList.snapshot`).

Every change is audited in the ClickHouse table ``blocks`` (one row per
``block``, ``unblock``, ``expire`` and dry-run ``would_block``, with the actor
and reason) and, when a publisher is set, pushed to a Kafka compacted topic
(:class:`KafkaBlockPublisher`).  At start-up the active blocks are restored
from the audit, so a restart forgets nothing.

>>> class MemStore:
...     def __init__(self): self.rows = []
...     def write_blocks(self, rows): self.rows.extend(rows)
>>> now = [1_000.0]
>>> bl = BlockList(MemStore(), clock=lambda: now[0], restore=False,
...                allowlist={"consumer": ["health-probe"]})
>>> e = bl.block("consumer", "app-1", reason="retry storm", ttl_s=60, actor="policy")
>>> bl.check(consumer="app-1").reason, bl.check(consumer="app-2")
('retry storm', None)
>>> now[0] += 61                  # past the TTL: no longer blocked, even before expire()
>>> bl.check(consumer="app-1") is None
True
>>> [x.value for x in bl.expire()], bl.version
(['app-1'], 3)
>>> bl.is_allowlisted("consumer", "health-probe")
True
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from ingest.store import BlockRow

log = logging.getLogger(__name__)

Scope = Literal["consumer", "user", "ip"]
SCOPES: tuple[str, ...] = ("consumer", "user", "ip")


class AllowlistedError(ValueError):
    """Raised by :meth:`BlockList.block` for an allowlisted value."""


class BlockStore(Protocol):
    def write_blocks(self, rows: list[BlockRow]) -> None: ...


class BlockPublisher(Protocol):
    """Pushes block list changes to gateways (e.g. a Kafka compacted topic)."""

    def publish_block(self, entry: BlockEntry) -> None: ...

    def publish_unblock(self, scope: str, value: str, reason: str) -> None: ...

    def close(self) -> None: ...


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_ttl(ttl: str | float | None) -> float | None:
    """A TTL in seconds: a number, or text like ``"30s"``, ``"10m"``, ``"2h"``,
    ``"1d"``; None, ``""``, ``"none"`` or ``"forever"`` mean until unblocked.

    >>> parse_ttl("10m"), parse_ttl(90), parse_ttl("forever")
    (600.0, 90.0, None)
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool):
        raise ValueError("ttl must be seconds or a duration such as 10m")
    if isinstance(ttl, int | float):
        val = float(ttl)
    else:
        text = ttl.strip().lower()
        if text in ("", "none", "forever", "never"):
            return None
        try:
            val = float(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else float(text)
        except ValueError:
            raise ValueError(f"bad ttl {ttl!r}: use seconds or a number with s/m/h/d "
                             "(e.g. 10m), or 'forever'") from None
    if not val > 0 or val == float("inf"):
        raise ValueError(f"bad ttl {ttl!r}: must be > 0")
    return val


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _header_safe(text: str) -> str:
    # HTTP header values: visible ASCII only, bounded length; no quote or
    # backslash either, so a gateway can put it inside a JSON string as is.
    text = text.replace('"', "'").replace("\\", "/")
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:200]


@dataclass(slots=True)
class BlockEntry:
    """One active (or, for dry runs, would-be) block."""

    scope: str
    value: str
    reason: str
    actor: str
    tenant: str = "default"
    finding_id: str = ""
    created_at: float = 0.0  # epoch seconds
    expires_at: float | None = None  # epoch seconds; None = until unblocked
    block_id: str = ""
    dry_run: bool = False
    # Pre-rendered 403 body and reason header for /v1/check (built once).
    denied_body: bytes = field(default=b"", repr=False, compare=False)
    denied_reason: str = field(default="", repr=False, compare=False)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def public(self) -> dict[str, Any]:
        """The block list contract's entry: what gateways see."""
        return {
            "scope": self.scope,
            "value": self.value,
            "reason": self.reason,
            "finding_id": self.finding_id,
            "expires_at": _iso(self.expires_at),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, for operators (``GET /v1/blocks``, the CLI)."""
        d = self.public()
        d.update(tenant=self.tenant, actor=self.actor, created_at=_iso(self.created_at),
                 block_id=self.block_id, dry_run=self.dry_run)
        return d

    def _render(self) -> None:
        body = {"allowed": False, **self.public()}
        self.denied_body = json.dumps(body, separators=(",", ":")).encode()
        self.denied_reason = _header_safe(f"{self.scope} blocked: {self.reason}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The serialised block list, rebuilt on every change."""

    version: int
    etag: str  # quoted, as sent in the ETag header
    body: bytes
    generated_at: float


class BlockList:
    """Active blocks per scope, with TTLs, an allowlist, an audit trail and a
    cached serialisation.  Thread-safe: writers take a lock, readers
    (:meth:`check`, :meth:`snapshot`) read without one.

    ``allowlist`` maps a scope to values that are never blocked (for ``ip``,
    addresses or networks such as ``10.0.0.0/8``).  ``restore=True`` (the
    default) loads the active blocks from the store's ``blocks`` table; the
    store must then have ``query`` (:class:`ingest.store.Store` does).
    """

    def __init__(
        self,
        store: Any,
        publisher: BlockPublisher | None = None,
        clock: Callable[[], float] = time.time,
        allowlist: Mapping[str, Iterable[str]] | None = None,
        *,
        restore: bool = True,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self._allow: dict[str, frozenset[str]] = {s: frozenset() for s in SCOPES}
        self._allow_nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for scope, values in (allowlist or {}).items():
            if scope not in SCOPES:
                raise ValueError(f"allowlist: unknown scope {scope!r}; use one of {SCOPES}")
            vals = set()
            for v in values:
                if scope == "ip" and "/" in v:
                    try:
                        self._allow_nets.append(ipaddress.ip_network(v, strict=False))
                    except ValueError as exc:
                        raise ValueError(f"allowlist.ip: {exc}") from None
                else:
                    vals.add(v)
            self._allow[scope] = frozenset(vals)
        self._active: dict[str, dict[str, BlockEntry]] = {s: {} for s in SCOPES}
        # Per-scope dicts bound to attributes: check() does no extra indirection.
        self._consumers = self._active["consumer"]
        self._users = self._active["user"]
        self._ips = self._active["ip"]
        self._lock = threading.RLock()
        self._last_ms = 0
        self._next_expiry: float = float("inf")
        self._lazy_expired: list[BlockEntry] = []
        self.version = 0
        self._snapshot: Snapshot = Snapshot(0, '""', b"", 0.0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # called (outside the lock) when a block brings the next expiry forward,
        # so a loop that sleeps until the next expiry can wake up
        self.expiry_listeners: list[Callable[[], None]] = []
        if restore:
            self._restore()
        self._rebuild()

    # -- reads (hot) --------------------------------------------------------
    def check(
        self, consumer: str | None = None, user: str | None = None, ip: str | None = None
    ) -> BlockEntry | None:
        """The active block that applies to this caller, or None (allowed)."""
        now = 0.0
        if consumer:
            e = self._consumers.get(consumer)
            if e is not None:
                now = self.clock()
                if e.expires_at is None or e.expires_at > now:
                    return e
        if user:
            e = self._users.get(user)
            if e is not None:
                now = now or self.clock()
                if e.expires_at is None or e.expires_at > now:
                    return e
        if ip:
            e = self._ips.get(ip)
            if e is not None:
                now = now or self.clock()
                if e.expires_at is None or e.expires_at > now:
                    return e
        return None

    def snapshot(self) -> Snapshot:
        """The serialised list.  Entries past their TTL are dropped here too
        (in memory; their audit rows are written by the next :meth:`expire`)."""
        if self._next_expiry <= self.clock() and self._lock.acquire(blocking=False):
            # Never wait here (a writer may be waiting on the store): if the
            # lock is busy, the previous snapshot is served and check() still
            # refuses to apply expired entries.
            try:
                self._lazy_expired.extend(self._expire_memory(self.clock()))
            finally:
                self._lock.release()
        return self._snapshot

    @property
    def etag(self) -> str:
        return self.snapshot().etag

    @property
    def body(self) -> bytes:
        return self.snapshot().body

    def entries(self) -> list[BlockEntry]:
        now = self.clock()
        return [e for d in self._active.values() for e in list(d.values()) if not e.expired(now)]

    def is_allowlisted(self, scope: str, value: str) -> bool:
        if value in self._allow.get(scope, ()):
            return True
        if scope == "ip" and self._allow_nets:
            try:
                addr = ipaddress.ip_address(value)
            except ValueError:
                return False
            return any(addr in net for net in self._allow_nets)
        return False

    # -- changes --------------------------------------------------------------
    def block(
        self,
        scope: str,
        value: str,
        *,
        reason: str,
        finding_id: str = "",
        ttl_s: float | None,
        actor: str,
        tenant: str = "default",
        dry_run: bool = False,
    ) -> BlockEntry:
        """Block ``value`` in ``scope`` for ``ttl_s`` seconds (None: until
        unblocked).  Blocking a value that is already blocked extends it (the
        later expiry wins; the reason and finding become the latest ones) and
        keeps its ``block_id``.  ``dry_run`` only records a ``would_block``
        audit row.  Raises :class:`AllowlistedError` for an allowlisted value
        and ``ValueError`` for a bad scope, value or TTL."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        if not value:
            raise ValueError("value must not be empty")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds or None, got {ttl_s!r}")
        if self.is_allowlisted(scope, value):
            raise AllowlistedError(f"{scope} {value!r} is allowlisted and cannot be blocked")
        with self._lock:
            now, at = self._now()
            expires = None if ttl_s is None else now + ttl_s
            if dry_run:
                entry = BlockEntry(scope, value, reason, actor, tenant, finding_id, now, expires,
                                   uuid.uuid4().hex, dry_run=True)
                self._audit("would_block", entry, at)
                return entry
            cur = self._active[scope].get(value)
            if cur is not None and not cur.expired(now):
                if cur.expires_at is None or expires is None:
                    expires = None
                else:
                    expires = max(cur.expires_at, expires)
                entry = replace(cur, reason=reason, finding_id=finding_id or cur.finding_id,
                                actor=actor, tenant=tenant, expires_at=expires)
            else:
                entry = BlockEntry(scope, value, reason, actor, tenant, finding_id, now,
                                   expires, uuid.uuid4().hex)
            entry._render()
            # Audit first: a block the store did not record would be forgotten
            # at the next restart, so the caller learns about a failed write.
            self._audit("block", entry, at)
            self._active[scope][value] = entry
            sooner = expires is not None and expires < self._next_expiry
            if sooner:
                self._next_expiry = expires  # type: ignore[assignment]
            self._rebuild()
        if sooner:
            for fn in self.expiry_listeners:
                fn()
        self._publish_block(entry)
        return entry

    def unblock(self, scope: str, value: str, *, actor: str, reason: str) -> bool:
        """Lift a block; False when ``value`` was not blocked."""
        with self._lock:
            cur = self._active.get(scope, {}).get(value)
            if cur is None:
                return False
            now, at = self._now()
            if cur.expired(now):
                self._lazy_expired.extend(self._expire_memory(now))
                self._flush_expired()
                return False
            gone = replace(cur, actor=actor, reason=reason)
            self._audit("unblock", gone, at)
            del self._active[scope][value]
            self._rebuild()
        self._publish_unblock(scope, value, reason)
        return True

    def next_expiry(self) -> float:
        """When :meth:`expire` next has work (clock seconds; inf: no TTL pending).
        Entries already dropped from memory by the hot path and still waiting
        for their audit row are due at once."""
        return float("-inf") if self._lazy_expired else self._next_expiry

    def expire(self) -> list[BlockEntry]:
        """Remove the entries past their TTL; record an ``expire`` row each."""
        with self._lock:
            self._lazy_expired.extend(self._expire_memory(self.clock()))
            return self._flush_expired()

    # -- background expiry ----------------------------------------------------
    def start(self, interval_s: float = 1.0) -> None:
        """Run :meth:`expire` every ``interval_s`` in a daemon thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.expire()
                except Exception as exc:  # the store may be down: retried next tick
                    log.warning("block list expiry failed: %s", exc)

        self._thread = threading.Thread(target=loop, name="blocklist-expiry", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.publisher is not None:
            try:
                self.publisher.close()
            except Exception as exc:
                log.warning("block publisher close failed: %s", exc)

    # -- internals ------------------------------------------------------------
    def _now(self) -> tuple[float, datetime]:
        """Clock time, and a strictly increasing ms timestamp for the audit
        (so a block and its unblock never share a timestamp)."""
        now = self.clock()
        ms = max(int(now * 1000), self._last_ms + 1)
        self._last_ms = ms
        return now, datetime.fromtimestamp(ms / 1000, UTC)

    def _audit(self, event: str, e: BlockEntry, at: datetime) -> None:
        self._audit_many([(event, e, at)])

    def _audit_many(self, items: list[tuple[str, BlockEntry, datetime]]) -> None:
        rows = [
            BlockRow(
                block_id=e.block_id, event=event, scope=e.scope, value=e.value, tenant=e.tenant,
                reason=e.reason, finding_id=e.finding_id, actor=e.actor, dry_run=e.dry_run,
                at=at,
                expires_at=None if e.expires_at is None else datetime.fromtimestamp(
                    e.expires_at, UTC),
            )
            for event, e, at in items
        ]
        if rows:
            self.store.write_blocks(rows)

    def _expire_memory(self, now: float) -> list[BlockEntry]:
        gone: list[BlockEntry] = []
        nxt = float("inf")
        for d in self._active.values():
            for v, e in list(d.items()):
                if e.expires_at is None:
                    continue
                if e.expires_at <= now:
                    gone.append(e)
                    del d[v]
                elif e.expires_at < nxt:
                    nxt = e.expires_at
        self._next_expiry = nxt
        if gone:
            self._rebuild()
        return gone

    def _flush_expired(self) -> list[BlockEntry]:
        pending = self._lazy_expired
        if not pending:
            return []
        items = []
        for e in pending:
            _, at = self._now()
            items.append(("expire", replace(e, actor="expiry", reason=e.reason), at))
        self._audit_many(items)  # on failure the entries stay pending: retried
        self._lazy_expired = []
        for e in pending:
            self._publish_unblock(e.scope, e.value, "expired")
        return pending

    def _rebuild(self) -> None:
        self.version += 1
        now = self.clock()
        entries = sorted(
            (e.public() for d in self._active.values() for e in d.values()),
            key=lambda x: (x["scope"], x["value"]),
        )
        ent_json = json.dumps(entries, separators=(",", ":"))
        # The ETag follows the content (not the version): a restarted service
        # with the same blocks keeps answering 304, and no two contents share one.
        etag = '"' + hashlib.blake2b(ent_json.encode(), digest_size=10).hexdigest() + '"'
        body = (
            f'{{"version":{self.version},"generated_at":"{_iso(now)}","entries":{ent_json}}}'
        ).encode()
        self._snapshot = Snapshot(self.version, etag, body, now)

    def _restore(self) -> None:
        """Load the active blocks from the audit: per (scope, value), the latest
        non-dry-run row; active if it is a ``block`` not yet expired."""
        if not hasattr(self.store, "query"):
            return
        rows = self.store.query(
            "SELECT scope, value, "
            "argMax(tuple(event, tenant, reason, finding_id, actor, block_id, "
            "  if(isNull(expires_at), -1, toUnixTimestamp64Milli(assumeNotNull(expires_at)))), "
            "  at) AS last, "
            "toUnixTimestamp64Milli(max(at)) AS last_at "
            "FROM tokenward.blocks WHERE dry_run = 0 GROUP BY scope, value",
            readonly=True,
        )
        now = self.clock()
        n_rows = self.store.query(
            "SELECT count() AS n FROM tokenward.blocks WHERE dry_run = 0", readonly=True)
        # Every change writes at least one audit row: counting them keeps the
        # version monotonic across restarts.
        self.version = int(n_rows[0]["n"]) if n_rows else 0
        stale: list[BlockEntry] = []
        for r in rows:
            event, tenant, reason, finding_id, actor, block_id, exp_ms = r["last"]
            self._last_ms = max(self._last_ms, int(r["last_at"]))
            if event != "block" or r["scope"] not in SCOPES:
                continue
            exp = None if int(exp_ms) < 0 else int(exp_ms) / 1000
            # created_at: the latest audit row's time (a restored entry's
            # first block time is in the audit, not needed here).
            e = BlockEntry(r["scope"], r["value"], reason, actor, tenant, finding_id,
                           int(r["last_at"]) / 1000, exp, block_id)
            if e.expired(now):
                stale.append(e)
                continue
            e._render()
            self._active[e.scope][e.value] = e
            if exp is not None and exp < self._next_expiry:
                self._next_expiry = exp
        if stale:  # expired while the service was down: close them in the audit
            self._lazy_expired.extend(stale)
            try:
                self._flush_expired()
            except Exception as exc:
                log.warning("could not record %d expiries: %s", len(stale), exc)
        n = sum(len(d) for d in self._active.values())
        if n:
            log.info("restored %d active block(s) from the audit", n)

    def _publish_block(self, entry: BlockEntry) -> None:
        if self.publisher is not None:
            try:
                self.publisher.publish_block(entry)
            except Exception as exc:
                log.warning("block publisher failed: %s", exc)

    def _publish_unblock(self, scope: str, value: str, reason: str) -> None:
        if self.publisher is not None:
            try:
                self.publisher.publish_unblock(scope, value, reason)
            except Exception as exc:
                log.warning("block publisher failed: %s", exc)


# -- Kafka push -------------------------------------------------------------------
class KafkaBlockPublisher:
    """Publishes block list changes to a Kafka **compacted** topic, for
    gateways that prefer push to polling.

    * key: ``"{scope}:{value}"`` (UTF-8);
    * on block (and extension): value = JSON ``{"op": "block", "scope",
      "value", "reason", "finding_id", "expires_at", "tenant", "at"}``;
    * on unblock or expiry: value = JSON ``{"op": "unblock", "scope",
      "value", "reason", "at"}`` followed by a tombstone (null value), so that
      compaction eventually forgets the key.  A consumer that reads the topic
      from the beginning rebuilds the current list: the latest value per key
      (``op == "block"`` and not past ``expires_at``) is active.

    The topic is created with ``cleanup.policy=compact`` when missing.  A
    publishing failure is logged and never fails the block itself (the API
    and the audit table remain the source of truth).
    """

    def __init__(self, bootstrap: str, topic: str = "tokenward.blocks", *,
                 partitions: int = 1, replication: int = 1, max_block_ms: int = 2000) -> None:
        from kafka import KafkaProducer

        self.bootstrap = bootstrap
        self.topic = topic
        self.ensure_topic(partitions, replication)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                      max_block_ms=max_block_ms, retries=5)

    def ensure_topic(self, partitions: int = 1, replication: int = 1) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            if self.topic in set(admin.list_topics()):
                return
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator
                admin.create_topics([NewTopic(self.topic, partitions, replication,
                                              topic_configs={"cleanup.policy": "compact"})])
        finally:
            admin.close()

    @staticmethod
    def key(scope: str, value: str) -> bytes:
        return f"{scope}:{value}".encode()

    def _send(self, key: bytes, value: bytes | None) -> None:
        try:
            self.producer.send(self.topic, key=key, value=value)
        except Exception as exc:
            log.warning("could not publish block command %s: %s", key.decode(), exc)

    def publish_block(self, entry: BlockEntry) -> None:
        cmd = {"op": "block", **entry.public(), "tenant": entry.tenant, "at": _iso(time.time())}
        self._send(self.key(entry.scope, entry.value), json.dumps(cmd).encode())

    def publish_unblock(self, scope: str, value: str, reason: str) -> None:
        k = self.key(scope, value)
        cmd = {"op": "unblock", "scope": scope, "value": value, "reason": reason,
               "at": _iso(time.time())}
        self._send(k, json.dumps(cmd).encode())
        self._send(k, None)

    def flush(self, timeout: float = 10.0) -> None:
        self.producer.flush(timeout=timeout)

    def close(self) -> None:
        try:
            self.producer.flush(timeout=5)
        finally:
            self.producer.close(timeout=5)
