"""The pipeline's batch semantics, against the real embedded store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from detectors.finding import Finding
from ingest.pipeline import Pipeline
from ingest.source import RawMessage, StorageError
from ingest.store import Store

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def raw(i: int, **kw) -> RawMessage:
    d = {"event_id": f"p-{i}", "ts": (T0 + timedelta(seconds=i)).isoformat(),
         "consumer": f"c{i % 3}", "model": "gpt-4o", "status": 200,
         "input_tokens": 1_000_000, "output_tokens": 0}
    d.update(kw)
    return RawMessage(json.dumps(d).encode(), "test", f"t:{i}", partition=i % 2)


class FlakyStore(Store):
    """The real store, made to refuse the first ``fail`` writes (a ClickHouse outage)."""

    def __init__(self, inner: Store, fail: int) -> None:
        super().__init__(inner.backend)
        self.fail = fail

    def write(self, *a, **kw):
        if self.fail > 0:
            self.fail -= 1
            raise StorageError("simulated outage")
        return super().write(*a, **kw)


class CountingEngine:
    """Counts what the detectors saw and reports one finding per 5 events."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe(self, ev):
        self.seen.append(ev.event_id)
        if len(self.seen) % 5 == 0:
            return [Finding.new(kind="token_spike", severity="warning", scope="consumer",
                                subject=ev.consumer, first_event_ts=ev.ts, detected_at=ev.ts,
                                observed=1, baseline=0, threshold=0)]
        return []

    def advance(self, now):
        return []

    def snapshot(self):
        return json.dumps(self.seen).encode()


def test_prices_and_rejects(store):
    from ingest.pricing import PriceTable

    p = Pipeline(store, prices=PriceTable.load())
    res = p.handle([raw(1), RawMessage(b"oops", "test", "t:x"), raw(2, model="no-such-model")])
    assert res.accepted == 2 and [r.reason for r in res.rejected] == ["invalid_json"]
    rows = {r["event_id"]: r for r in store.query(
        "SELECT event_id, cost, cost_source FROM tokenward.usage_events")}
    assert rows["p-1"]["cost_source"] == "price_table" and rows["p-1"]["cost"] > 0
    assert rows["p-2"]["cost_source"] == "unknown_model" and rows["p-2"]["cost"] == 0


def test_gateway_cost_is_kept(store):
    from ingest.pricing import PriceTable

    Pipeline(store, prices=PriceTable.load()).handle([raw(1, cost=1.25)])
    assert store.query("SELECT cost, cost_source FROM tokenward.usage_events")[0] == {
        "cost": 1.25, "cost_source": "gateway"}


def test_storage_outage_loses_nothing_and_detectors_see_each_event_once(store):
    engines: list[CountingEngine] = []

    def factory(state):
        engines.append(CountingEngine())
        return engines[-1]

    flaky = FlakyStore(store, fail=2)
    p = Pipeline(flaky, engine_factory=factory, state_scope=None)
    batch = [raw(i) for i in range(20)]
    for _ in range(2):
        with pytest.raises(StorageError):
            p.handle(batch)
    res = p.handle(batch)  # re-delivered after the outage
    assert res.accepted == 20
    assert sum(len(e.seen) for e in engines) == 20  # not 60
    assert store.query("SELECT count() AS n FROM tokenward.usage_events")[0]["n"] == 20
    # the findings of the failed attempt were kept and stored with the retry
    assert store.query("SELECT count() AS n FROM tokenward.findings")[0]["n"] == res.findings
    assert res.findings == 4


def test_detector_state_saved_and_restored_per_partition(store):
    made = []

    def factory(state):
        eng = CountingEngine()
        if state:
            eng.seen = json.loads(state)
        made.append(eng)
        return eng

    p = Pipeline(store, engine_factory=factory, state_scope="unit")
    p.handle([raw(i) for i in range(10)])
    p.note_offset(0, 5)
    p.partitions_revoked([0, 1])
    p2 = Pipeline(store, engine_factory=factory, state_scope="unit")
    resume = p2.partitions_assigned([0])
    assert resume == {0: 5}
    assert made[-1].seen == [f"p-{i}" for i in range(0, 10, 2)]


def test_per_message_answers(store):
    p = Pipeline(store)
    p.handle([raw(1)])
    res = p.handle([raw(1), raw(2), RawMessage(b"{}", "http", "h:2")], per_message=True)
    assert [s for s, _, _ in res.per_message] == ["duplicate", "accepted", "rejected"]
