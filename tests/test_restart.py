"""Detection is deterministic on event time: an interrupted run (state saved,
process gone, state restored) and the live HTTP path give the same findings as
one uninterrupted replay.  Real engine, real embedded store."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.service import build_engine_factory, build_prices, build_service
from api.settings import load_settings
from ingest.pipeline import Pipeline
from ingest.simulator import SimConfig, Simulation
from ingest.source import RawMessage


@pytest.fixture(scope="module")
def traffic() -> list[bytes]:
    sim = Simulation(SimConfig(seed=5, duration_s=2 * 3600, n_consumers=25,
                               scenarios=["retry_storm", "runaway_reasoning", "token_spike",
                                          "agent_loop", "failure_spike"]))
    return [json.dumps(e).encode() for e in sim.events()]


def _key(f) -> tuple:
    return (f.finding_id, f.revision, f.kind, f.status, f.detected_at, round(f.observed, 6))


def _run(pipeline: Pipeline, msgs: list[bytes], start: int, collected: list) -> None:
    for i in range(0, len(msgs), 2000):
        part = [RawMessage(m, "file", f"f:{start + i + j}", partition=0)
                for j, m in enumerate(msgs[i:i + 2000])]
        pipeline.handle(part)


def _pipeline(store, chdb_dir, scope, collected) -> Pipeline:
    settings = load_settings(data_dir=chdb_dir)
    return Pipeline(store, prices=build_prices(settings),
                    engine_factory=build_engine_factory(settings),
                    on_findings=collected.extend, state_scope=scope)


def test_interrupted_run_gives_the_same_findings(store, chdb_dir, traffic):
    whole: list = []
    _run(_pipeline(store, chdb_dir, None, whole), traffic, 0, whole)
    assert len(whole) >= 3, "the scenario traffic should produce findings to compare"

    for t in ("usage_events", "findings", "detector_state", "usage_1m"):
        store.backend.command(f"TRUNCATE TABLE tokenward.{t}")
    parts: list = []
    half = len(traffic) // 2
    first = _pipeline(store, chdb_dir, "restart-test", parts)
    first.partitions_assigned([0])
    _run(first, traffic[:half], 0, parts)
    first.partitions_revoked([0])  # saves the state, like a shutdown or rebalance
    del first
    second = _pipeline(store, chdb_dir, "restart-test", parts)
    second.partitions_assigned([0])  # restores it
    _run(second, traffic[half:], half, parts)

    assert sorted(map(_key, parts)) == sorted(map(_key, whole))


def test_live_http_path_matches_replay(store, chdb_dir, traffic):
    replayed: list = []
    _run(_pipeline(store, chdb_dir, None, replayed), traffic, 0, replayed)
    for t in ("usage_events", "findings", "usage_1m"):
        store.backend.command(f"TRUNCATE TABLE tokenward.{t}")

    live: list = []
    svc = build_service(load_settings(data_dir=chdb_dir), with_alerting=False,
                        extra_sinks=[live.extend], state_scope=None)
    with TestClient(create_app(svc)) as client:
        for i in range(0, len(traffic), 1500):
            body = b"\n".join(traffic[i:i + 1500])
            r = client.post("/v1/events", content=body,
                            headers={"Content-Type": "application/x-ndjson"})
            assert r.status_code == 200
    assert sorted(map(_key, live)) == sorted(map(_key, replayed))
