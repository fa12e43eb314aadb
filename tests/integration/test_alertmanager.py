"""The Alertmanager sink against a real Prometheus Alertmanager.

The fixture starts ``/usr/bin/prometheus-alertmanager`` (Debian package
``prometheus-alertmanager``) on a free loopback port with clustering disabled,
a temporary storage path, ``resolve_timeout: 3s`` and a route to a receiver
that sends nothing.  A missing binary fails the tests (install it with
``apt-get install -y prometheus-alertmanager``); it never skips them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from alerting.blocklist import BlockList
from alerting.service import AlertingConfig, AlertingService
from alerting.sinks import SinkWorker, build_sink
from api.metrics import Metrics
from tests.alerting._support import MemStore, finding
from tests.conftest import free_port, stop_process, wait_until_ready

pytestmark = pytest.mark.integration

BINARY = "/usr/bin/prometheus-alertmanager"
CONFIG = """\
global:
  resolve_timeout: 3s
route:
  receiver: "null"
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


def _binary() -> str:
    path = BINARY if Path(BINARY).is_file() else shutil.which("prometheus-alertmanager") \
        or shutil.which("alertmanager")
    if not path:
        pytest.fail("Prometheus Alertmanager is not installed: run "
                    "`apt-get install -y prometheus-alertmanager` (binary "
                    f"{BINARY}) before the integration tests")
    return path


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _binary()
    d = tmp_path_factory.mktemp("alertmanager")
    (d / "am.yml").write_text(CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = d / "am.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={d / 'am.yml'}", f"--storage.path={d / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until_ready(proc, ready, "alertmanager", log_path, 20)
        yield url
    finally:
        stop_process(proc)


def service(url: str, resend: str = "60s", tick: str = "5s") -> AlertingService:
    config = AlertingConfig.from_dict({
        "policy": {"runbook_base_url": "https://wiki.example/tokenward"},
        "sinks": {"alertmanager": [{"url": url, "timeout": "2s"}], "backoff": "0.1s"},
        "alerting": {"resend_interval": resend, "tick": tick},
    })
    metrics = Metrics()
    workers = [SinkWorker(build_sink(c), c.retry, metrics) for c in config.sinks.sinks]
    return AlertingService(config, BlockList(MemStore(), restore=False), workers, metrics)


def am_alerts(url: str, subject: str, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v2/alerts",
                  params={"filter": f'subject="{subject}"', **params}, timeout=5)
    r.raise_for_status()
    return list(r.json())


def wait_for(fn: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def test_fire_read_back_and_resolve(alertmanager: str) -> None:
    subject = f"app-{uuid.uuid4().hex[:8]}"
    svc = service(alertmanager)
    try:
        f = finding(subject=subject, tenant="acme", model="gpt-4o", at=now())
        svc.handle([f])
        assert svc.flush(10)
        [a] = wait_for(lambda: am_alerts(alertmanager, subject))
        assert a["labels"] == {
            "alertname": "TokenwardRetryStorm", "severity": "critical", "tenant": "acme",
            "consumer": subject, "model": "gpt-4o", "kind": "retry_storm",
            "scope": "consumer", "subject": subject}
        ann = a["annotations"]
        assert ann["action"] == f"blocked consumer {subject} for 10m"
        assert ann["finding_id"] == f.finding_id
        assert ann["runbook_url"] == "https://wiki.example/tokenward#retry_storm"
        assert "observed 40 vs baseline 1.2 (threshold 8)" in ann["description"]
        assert a["status"]["state"] == "active"
        assert svc.blocklist.check(consumer=subject) is not None

        svc.handle([f.model_copy(update={"revision": 1, "status": "resolved"})])
        assert svc.flush(10)
        assert wait_for(lambda: not am_alerts(alertmanager, subject, active="true"))
        assert am_alerts(alertmanager, subject) == []  # resolved alerts are not listed
        m = svc.metrics
        assert m.registry.get_sample_value(  # type: ignore[attr-defined]
            "tokenward_alerts_sent_total", {"sink": "alertmanager", "state": "resolved"}) == 1
    finally:
        svc.close()


def test_severity_change_replaces_the_alert(alertmanager: str) -> None:
    subject = f"app-{uuid.uuid4().hex[:8]}"
    svc = service(alertmanager)
    try:
        f = finding("token_spike", severity="warning", subject=subject, at=now())
        svc.handle([f])
        assert svc.flush(10)
        assert wait_for(lambda: am_alerts(alertmanager, subject))
        svc.handle([f.model_copy(update={"revision": 1, "severity": "critical"})])
        assert svc.flush(10)
        active = wait_for(lambda: [a for a in am_alerts(alertmanager, subject, active="true")
                                   if a["labels"]["severity"] == "critical"])
        assert active
        got = am_alerts(alertmanager, subject)
        assert [a["labels"]["severity"] for a in got] == ["critical"]
    finally:
        svc.close()


def test_resend_keeps_a_firing_alert_alive(alertmanager: str) -> None:
    """resolve_timeout is 3 s: without the periodic re-send the alert would be
    resolved by Alertmanager itself after 3 s."""
    subject = f"app-{uuid.uuid4().hex[:8]}"
    svc = service(alertmanager, resend="1s", tick="0.2s")
    svc.start()
    try:
        svc.handle([finding("cost_spike", subject=subject, at=now())])
        assert svc.flush(10)
        assert wait_for(lambda: am_alerts(alertmanager, subject))
        time.sleep(4.5)
        [a] = am_alerts(alertmanager, subject, active="true")
        ends = datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00"))
        assert ends > datetime.now(UTC)
        assert svc.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
            "tokenward_alerts_sent_total", {"sink": "alertmanager", "state": "resend"}) >= 3
    finally:
        svc.close()
    # without re-sends, Alertmanager resolves it after resolve_timeout
    assert wait_for(lambda: not am_alerts(alertmanager, subject), timeout=6)


def test_unreachable_alertmanager_never_blocks_handle() -> None:
    svc = service(f"http://127.0.0.1:{free_port()}")
    try:
        t0 = time.monotonic()
        for i in range(50):
            svc.handle([finding("token_spike", subject=f"s{i}", at=now())])
        assert time.monotonic() - t0 < 1.0
    finally:
        svc.close(timeout=1)


def test_example_alertmanager_config_is_valid() -> None:
    amtool = Path(_binary()).with_name("amtool")
    if not amtool.is_file():
        pytest.fail(f"amtool not found next to {_binary()} (package prometheus-alertmanager)")
    cfg = Path(__file__).resolve().parents[2] / "deploy" / "alertmanager.yml"
    res = subprocess.run([str(amtool), "check-config", str(cfg)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
