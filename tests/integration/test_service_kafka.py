"""The service as operators run it: ``tokenward simulate --to-kafka`` produces
realistic traffic into the real broker, ``tokenward run --kafka-bootstrap``
consumes it (own process, own embedded store), detects and stores; the API
answers for it; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

SIM = ["--seed", "3", "--duration", "20m", "--consumers", "15",
       "--scenarios", "retry_storm,runaway_reasoning"]


def test_run_consumes_kafka_detects_and_answers(tmp_path, tansu_broker, kafka_topic):
    topic = kafka_topic(partitions=3)
    # The same seed to a file tells how many events were produced.
    ref = tmp_path / "ref.jsonl"
    labels = tmp_path / "labels.jsonl"
    subprocess.run([sys.executable, "-m", "api", "simulate", *SIM, "--out", str(ref),
                    "--labels", str(labels), "--quiet"], check=True, timeout=120)
    victims = {json.loads(line)["consumer"] for line in labels.open()}
    assert victims
    expected = sum(1 for _ in ref.open())
    ids = {json.loads(line)["event_id"] for line in ref.open()}
    subprocess.run([sys.executable, "-m", "api", "simulate", *SIM, "--to-kafka", tansu_broker,
                    "--kafka-topic", topic, "--quiet"], check=True, timeout=120)

    port = free_port()
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "run", "--port", str(port), "--data-dir",
         str(tmp_path / "data"), "--kafka-bootstrap", tansu_broker, "--kafka-topic", topic,
         "--kafka-group", f"g-{topic}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        count = -1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"{base}/v1/query", json={
                    "sql": "SELECT count() AS n, uniqExact(event_id) AS u "
                           "FROM tokenward.usage_events"}, timeout=5)
                if r.status_code == 200:
                    n, u = r.json()["rows"][0]
                    count = int(n)
                    if count >= expected:
                        assert int(u) == count
                        break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert count == expected, (f"stored {count} of {expected}; service log:\n"
                                   + (tmp_path / "run.log").read_text()[-3000:])
        r = httpx.post(f"{base}/v1/query", json={
            "sql": "SELECT event_id FROM tokenward.usage_events", "max_rows": 1_000_000},
            timeout=30)
        assert r.json()["truncated"] is False
        assert {row[0] for row in r.json()["rows"]} == ids
        ready = httpx.get(f"{base}/readyz", timeout=10).json()
        assert ready["checks"] == {"storage": "ok", "kafka": "ok"}
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'tokenward_events_stored_total{source="kafka"}' in metrics
        assert "tokenward_consumer_lag" in metrics
        found = {f["consumer"] for f in
                 httpx.get(f"{base}/v1/findings?limit=1000", timeout=5).json()["findings"]}
        assert victims <= found, f"no finding on the injected anomalies of {victims - found}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
