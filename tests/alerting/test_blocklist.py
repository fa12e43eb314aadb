"""The block list: TTLs at check time, extension, dry run, allowlist, audit,
serialised snapshot, restore from the store, and the Kafka publisher."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from alerting.blocklist import AllowlistedError, BlockList, KafkaBlockPublisher, parse_ttl
from ingest.source import StorageError

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class MemStore:
    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.fail = False

    def write_blocks(self, rows: Any) -> None:
        if self.fail:
            raise StorageError("down")
        self.rows.extend(rows)


class MemPublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def publish_block(self, e: Any) -> None:
        self.sent.append(("block", e.scope, e.value))

    def publish_unblock(self, scope: str, value: str, reason: str) -> None:
        self.sent.append(("unblock", scope, value))

    def close(self) -> None:
        pass


def make(**kw: Any) -> tuple[BlockList, MemStore, Clock, MemPublisher]:
    st, clock, pub = MemStore(), Clock(), MemPublisher()
    bl = BlockList(st, pub, clock=clock, restore=False, **kw)
    return bl, st, clock, pub


def test_block_check_every_scope_and_audit() -> None:
    bl, st, _, pub = make()
    bl.block("consumer", "app-1", reason="retry storm", finding_id="f1", ttl_s=600,
             actor="policy", tenant="acme")
    bl.block("user", "u-9", reason="abuse", ttl_s=None, actor="admin:ops")
    bl.block("ip", "10.1.2.3", reason="scan", ttl_s=60, actor="admin:ops")
    assert bl.check(consumer="app-1").finding_id == "f1"
    assert bl.check(consumer="other", user="u-9").scope == "user"
    assert bl.check(consumer="other", ip="10.1.2.3").scope == "ip"
    assert bl.check(consumer="other", user="x", ip="10.1.2.4") is None
    assert bl.check() is None
    assert [(r.event, r.scope, r.value, r.actor) for r in st.rows] == [
        ("block", "consumer", "app-1", "policy"), ("block", "user", "u-9", "admin:ops"),
        ("block", "ip", "10.1.2.3", "admin:ops")]
    assert st.rows[0].tenant == "acme" and st.rows[0].reason == "retry storm"
    assert st.rows[1].expires_at is None and st.rows[0].expires_at is not None
    assert [p[0] for p in pub.sent] == ["block"] * 3


def test_expired_entry_never_answers_blocked_even_before_expire() -> None:
    bl, st, clock, pub = make()
    bl.block("consumer", "app-1", reason="r", ttl_s=10, actor="policy")
    clock.t += 9.999
    assert bl.check(consumer="app-1") is not None
    clock.t += 0.001
    assert bl.check(consumer="app-1") is None
    # the snapshot drops it too, before expire() wrote anything
    v = bl.version
    assert json.loads(bl.snapshot().body)["entries"] == []
    assert bl.version == v + 1
    assert [r.event for r in st.rows] == ["block"]
    gone = bl.expire()
    assert [e.value for e in gone] == ["app-1"]
    assert [r.event for r in st.rows] == ["block", "expire"]
    assert pub.sent[-1] == ("unblock", "consumer", "app-1")
    assert bl.expire() == []  # nothing twice


def test_expire_bumps_version_and_records_rows() -> None:
    bl, st, clock, _ = make()
    bl.block("consumer", "a", reason="r", ttl_s=5, actor="policy")
    bl.block("consumer", "b", reason="r", ttl_s=50, actor="policy")
    v = bl.version
    clock.t += 6
    assert [e.value for e in bl.expire()] == ["a"]
    assert bl.version == v + 1
    assert [e.value for e in bl.entries()] == ["b"]
    assert st.rows[-1].event == "expire" and st.rows[-1].value == "a"


def test_reblock_extends_and_keeps_block_id() -> None:
    bl, st, clock, _ = make()
    e1 = bl.block("consumer", "a", reason="first", ttl_s=60, actor="policy", finding_id="f1")
    clock.t += 30
    e2 = bl.block("consumer", "a", reason="again", ttl_s=60, actor="policy", finding_id="f2")
    assert e2.block_id == e1.block_id and e2.expires_at == T0 + 90
    # a shorter re-block never shortens
    e3 = bl.block("consumer", "a", reason="short", ttl_s=1, actor="policy")
    assert e3.expires_at == T0 + 90 and e3.reason == "short" and e3.finding_id == "f2"
    # until-unblocked wins over any TTL
    e4 = bl.block("consumer", "a", reason="forever", ttl_s=None, actor="admin:x")
    assert e4.expires_at is None
    e5 = bl.block("consumer", "a", reason="ttl again", ttl_s=10, actor="policy")
    assert e5.expires_at is None
    assert len(bl.entries()) == 1 and len(st.rows) == 5


def test_dry_run_records_would_block_and_changes_nothing() -> None:
    bl, st, _, pub = make()
    v = bl.version
    e = bl.block("consumer", "a", reason="r", ttl_s=60, actor="policy", dry_run=True)
    assert e.dry_run
    assert bl.check(consumer="a") is None and bl.version == v and pub.sent == []
    assert [(r.event, r.dry_run) for r in st.rows] == [("would_block", True)]


def test_unblock() -> None:
    bl, st, _, pub = make()
    bl.block("consumer", "a", reason="r", ttl_s=None, actor="policy")
    assert bl.unblock("consumer", "a", actor="admin:ops", reason="false positive")
    assert bl.check(consumer="a") is None
    assert not bl.unblock("consumer", "a", actor="admin:ops", reason="again")
    assert not bl.unblock("nope", "a", actor="admin:ops", reason="bad scope")
    assert (st.rows[-1].event, st.rows[-1].actor, st.rows[-1].reason) == \
        ("unblock", "admin:ops", "false positive")
    assert pub.sent[-1] == ("unblock", "consumer", "a")


def test_allowlist_values_and_networks() -> None:
    bl, st, _, _ = make(allowlist={"consumer": ["probe"], "ip": ["10.0.0.0/8", "192.0.2.1"]})
    assert bl.is_allowlisted("consumer", "probe") and not bl.is_allowlisted("consumer", "x")
    assert bl.is_allowlisted("ip", "10.200.1.1") and bl.is_allowlisted("ip", "192.0.2.1")
    assert not bl.is_allowlisted("ip", "11.0.0.1") and not bl.is_allowlisted("ip", "garbage")
    for scope, value in (("consumer", "probe"), ("ip", "10.9.9.9")):
        with pytest.raises(AllowlistedError):
            bl.block(scope, value, reason="r", ttl_s=60, actor="policy")
    assert st.rows == [] and bl.entries() == []
    with pytest.raises(ValueError, match="unknown scope"):
        BlockList(MemStore(), restore=False, allowlist={"tenant": ["x"]})


def test_bad_arguments() -> None:
    bl, _, _, _ = make()
    with pytest.raises(ValueError, match="scope"):
        bl.block("model", "gpt", reason="r", ttl_s=1, actor="a")
    with pytest.raises(ValueError, match="empty"):
        bl.block("consumer", "", reason="r", ttl_s=1, actor="a")
    with pytest.raises(ValueError, match="ttl"):
        bl.block("consumer", "a", reason="r", ttl_s=0, actor="a")


def test_failed_audit_write_does_not_block() -> None:
    bl, st, _, pub = make()
    st.fail = True
    with pytest.raises(StorageError):
        bl.block("consumer", "a", reason="r", ttl_s=60, actor="policy")
    assert bl.check(consumer="a") is None and pub.sent == []


def test_snapshot_is_rebuilt_only_on_change() -> None:
    bl, _, _, _ = make()
    s0 = bl.snapshot()
    assert bl.snapshot() is s0  # no change: the same bytes object
    bl.block("consumer", "b", reason="r2", ttl_s=None, actor="policy", finding_id="f")
    bl.block("consumer", "a", reason='quote " and \\', ttl_s=60, actor="policy")
    s1 = bl.snapshot()
    assert s1 is not s0 and s1.version == s0.version + 2 and s1.etag != s0.etag
    doc = json.loads(s1.body)
    assert set(doc) == {"version", "generated_at", "entries"}
    assert doc["version"] == s1.version
    assert doc["entries"][0] == {"scope": "consumer", "value": "a", "reason": 'quote " and \\',
                                 "finding_id": "", "expires_at": "2026-01-01T00:01:00.000Z"}
    assert doc["entries"][1]["expires_at"] is None
    # the ETag follows the content: back to the same list, back to the same ETag
    bl.unblock("consumer", "a", actor="x", reason="r")
    bl.unblock("consumer", "b", actor="x", reason="r")
    assert bl.snapshot().etag == s0.etag and bl.snapshot().version == s1.version + 2


def test_denied_body_and_reason_header_are_prerendered() -> None:
    bl, _, _, _ = make()
    e = bl.block("consumer", "a", reason="storm\r\nX-Evil: 1 é", ttl_s=None, actor="policy")
    assert json.loads(e.denied_body)["allowed"] is False
    assert "\r" not in e.denied_reason and "\n" not in e.denied_reason
    e.denied_reason.encode("ascii")


def test_check_is_constant_time_per_lookup() -> None:
    bl, _, _, _ = make()
    e = bl.block("consumer", "c0", reason="r", ttl_s=3600, actor="policy")
    for i in range(1, 20_000):  # a large list, without 20k snapshot rebuilds
        bl._consumers[f"c{i}"] = e
    t = time.perf_counter()
    for i in range(100_000):
        bl.check(consumer=f"c{i % 20000}", user="u", ip="1.2.3.4")
    assert time.perf_counter() - t < 1.0


def test_parse_ttl() -> None:
    assert parse_ttl("30s") == 30 and parse_ttl("2h") == 7200 and parse_ttl("1.5") == 1.5
    assert parse_ttl(None) is None and parse_ttl("forever") is None
    for bad in ("10x", "-5", "0", "abc", True):
        with pytest.raises(ValueError):
            parse_ttl(bad)  # type: ignore[arg-type]


# -- against the real (embedded) store -------------------------------------------------
def test_audit_in_clickhouse_and_restore_after_restart(store: Any) -> None:
    clock = Clock(time.time())
    bl = BlockList(store, clock=clock)
    bl.block("consumer", "keep", reason="storm", finding_id="f1", ttl_s=3600, actor="policy",
             tenant="acme")
    bl.block("consumer", "forever", reason="abuse", ttl_s=None, actor="admin:ops")
    bl.block("ip", "192.0.2.7", reason="short", ttl_s=5, actor="policy")
    bl.block("user", "lifted", reason="x", ttl_s=None, actor="policy")
    bl.unblock("user", "lifted", actor="admin:ops", reason="ok")
    bl.block("consumer", "dry", reason="x", ttl_s=60, actor="policy", dry_run=True)
    rows = store.query("SELECT event, scope, value, actor, reason, dry_run FROM tokenward.blocks "
                       "ORDER BY at")
    assert [(r["event"], r["value"]) for r in rows] == [
        ("block", "keep"), ("block", "forever"), ("block", "192.0.2.7"), ("block", "lifted"),
        ("unblock", "lifted"), ("would_block", "dry")]
    assert rows[4]["actor"] == "admin:ops" and rows[4]["reason"] == "ok"
    version = bl.version

    # "restart" 10 s later: the short block expired while down
    clock.t += 10
    bl2 = BlockList(store, clock=clock)
    assert {(e.scope, e.value) for e in bl2.entries()} == {("consumer", "keep"),
                                                           ("consumer", "forever")}
    keep = bl2.check(consumer="keep")
    assert keep is not None and keep.finding_id == "f1" and keep.tenant == "acme"
    assert keep.expires_at == pytest.approx(clock.t - 10 + 3600, abs=0.01)
    assert bl2.check(consumer="forever").expires_at is None  # type: ignore[union-attr]
    assert bl2.check(ip="192.0.2.7") is None and bl2.check(user="lifted") is None
    assert bl2.check(consumer="dry") is None
    assert bl2.version >= version  # monotonic across restarts
    assert bl2.snapshot().etag != BlockList(store, clock=clock, restore=False).snapshot().etag
    ev = store.query("SELECT event FROM tokenward.blocks WHERE value = '192.0.2.7' ORDER BY at")
    assert [r["event"] for r in ev] == ["block", "expire"]
    # re-blocking a restored entry extends it under the same block id
    again = bl2.block("consumer", "keep", reason="again", ttl_s=60, actor="policy")
    assert again.block_id == keep.block_id and again.expires_at == keep.expires_at


# -- Kafka compacted topic ------------------------------------------------------------------
def test_kafka_publisher_compacted_topic(tansu_broker: str) -> None:
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import ConfigResource, ConfigResourceType

    topic = f"tokenward.blocks.{uuid.uuid4().hex[:8]}"
    pub = KafkaBlockPublisher(tansu_broker, topic)
    admin = KafkaAdminClient(bootstrap_servers=tansu_broker)
    try:
        assert topic in admin.list_topics()
        try:
            res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            text = repr(res)
        except Exception as exc:  # a broker without DescribeConfigs: creation is what we own
            text = f"describe_configs unsupported: {exc}"
        print("topic config:", text[:500])
    finally:
        admin.close()
    KafkaBlockPublisher(tansu_broker, topic).close()  # existing topic: kept, no error

    clock = Clock(time.time())
    bl = BlockList(MemStore(), pub, clock=clock, restore=False)
    bl.block("consumer", "app-1", reason="storm", ttl_s=600, actor="policy", finding_id="f1")
    bl.block("ip", "192.0.2.1", reason="scan", ttl_s=None, actor="admin:ops")
    bl.block("consumer", "dry", reason="x", ttl_s=60, actor="policy", dry_run=True)
    bl.unblock("ip", "192.0.2.1", actor="admin:ops", reason="ok")
    pub.flush()

    consumer = KafkaConsumer(topic, bootstrap_servers=tansu_broker, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000)
    msgs = []
    deadline = time.monotonic() + 20
    while len(msgs) < 4 and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            msgs.extend(batch)
    consumer.close()
    got = [(m.key.decode(), json.loads(m.value)["op"] if m.value is not None else None)
           for m in msgs]
    assert got == [("consumer:app-1", "block"), ("ip:192.0.2.1", "block"),
                   ("ip:192.0.2.1", "unblock"), ("ip:192.0.2.1", None)]
    first = json.loads(msgs[0].value)
    assert first["reason"] == "storm" and first["finding_id"] == "f1" and first["expires_at"]
    bl.close()
