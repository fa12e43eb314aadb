"""A real nginx enforces tokenward's blocks (auth_request -> GET /v1/check).

nginx (Debian package ``nginx``) runs ``deploy/nginx/tokenward-auth-request.conf``
as shipped (addresses and token substituted) in front of a stub model server;
tokenward runs in-process under uvicorn, with auth on and a policy whose
retry_storm blocks last a few seconds.  A consumer's retry storm, sent as
usage events through ``POST /v1/events``, goes through the real detectors and
the real policy; the test measures the time from the finding to the first
403 at nginx, checks that other consumers keep getting 200, and that the block
lifts at its TTL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import hash_token
from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "nginx" / "tokenward-auth-request.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
GATEWAY_TOKEN = "gw-" + uuid.uuid4().hex
INGEST_TOKEN = "in-" + uuid.uuid4().hex
ADMIN_TOKEN = "ad-" + uuid.uuid4().hex
BLOCK_TTL_S = 4


# -- stub model server ------------------------------------------------------------
class _ModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        doc = {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
               "model": body.get("model", "gpt-4o"),
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "hello"}}],
               "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
        out = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def model_server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ModelHandler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


# -- tokenward under uvicorn ---------------------------------------------------------------
@dataclass
class Tokenward:
    url: str
    svc: Any


@pytest.fixture(scope="module")
def tokenward(chdb_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tokenward]:
    import uvicorn

    from api.app import create_app
    from api.service import build_service
    from api.settings import load_settings

    d = tmp_path_factory.mktemp("tw-nginx")
    auth = d / "auth.toml"
    auth.write_text("".join(
        f'[[tokens]]\nname = "{n}"\nroles = ["{r}"]\nsha256 = "{hash_token(t)}"\n\n'
        for n, r, t in (("edge", "gateway", GATEWAY_TOKEN), ("feeder", "ingest", INGEST_TOKEN),
                        ("ops", "admin", ADMIN_TOKEN))))
    policy = d / "policy.toml"
    policy.write_text(f"[policy.kinds.retry_storm]\nblock_ttl = {BLOCK_TTL_S}\n")
    settings = load_settings(data_dir=chdb_dir, auth_file=str(auth), policy_file=str(policy))
    svc = build_service(settings, state_scope=None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            pytest.fail("tokenward (uvicorn) did not start")
        time.sleep(0.05)
    try:
        yield Tokenward(f"http://127.0.0.1:{port}", svc)
    finally:
        server.should_exit = True
        t.join(timeout=10)
        svc.close()


# -- nginx ----------------------------------------------------------------------------------
def render_example(tokenward_port: int, model_port: int, listen: int, *,
                   fail_open: bool = False) -> str:
    text = EXAMPLE.read_text()
    for old, new in (("127.0.0.1:8000", f"127.0.0.1:{tokenward_port}"),
                     ("127.0.0.1:9000", f"127.0.0.1:{model_port}"),
                     ("listen 8080;", f"listen 127.0.0.1:{listen};"),
                     ("REPLACE_WITH_GATEWAY_TOKEN", GATEWAY_TOKEN)):
        assert old in text, f"the example config no longer contains {old!r}"
        text = text.replace(old, new)
    if fail_open:
        line = "# error_page 500 502 503 504 = @tokenward_fail_open;"
        assert line in text
        text = text.replace(line, line[2:])
    return text


class Nginx:
    def __init__(self, prefix: Path, site: str, port: int) -> None:
        self.prefix = prefix
        self.port = port
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "site.conf").write_text(site)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the tmp dir
        conf = f"""{user}daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""
        (prefix / "nginx.conf").write_text(conf)
        args = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                "-e", str(prefix / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"nginx exited: {err}{(prefix / 'error.log').read_text()}")
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not start listening")
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _require_nginx() -> None:
    if not (os.path.isfile(NGINX) and os.access(NGINX, os.X_OK)):
        pytest.fail("nginx is not installed: apt-get install -y nginx (Debian package "
                    "'nginx', /usr/sbin/nginx); this test needs a real gateway")


@pytest.fixture(scope="module")
def gateway(tokenward: Tokenward, model_server: int,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    _require_nginx()
    tw_port = int(tokenward.url.rsplit(":", 1)[1])
    port = free_port()
    ngx = Nginx(tmp_path_factory.mktemp("nginx"), render_example(tw_port, model_server, port),
                port)
    yield ngx
    ngx.stop()


# -- the tests ----------------------------------------------------------------------------------
def chat(client: httpx.Client, url: str, consumer: str) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions",
                       headers={"Authorization": f"Bearer sk-{consumer}"},
                       json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_retry_storm_blocked_at_nginx_then_expires(store: Any, tokenward: Tokenward,
                                                   gateway: Nginx) -> None:
    run = uuid.uuid4().hex[:6]
    storm, good = f"storm-{run}", [f"good-{run}-{i}" for i in range(3)]
    api = httpx.Client(base_url=tokenward.url, timeout=10)
    client = httpx.Client(timeout=10)
    ingest = {"Authorization": f"Bearer {INGEST_TOKEN}"}

    # Everyone is served; normal traffic flows into tokenward.
    for c in [storm, *good]:
        assert chat(client, gateway.url, c).status_code == 200, c
    now = datetime.now(UTC)
    normal = [{"event_id": f"n-{run}-{c}-{i}", "ts": _iso(now - timedelta(seconds=60 - i)),
               "consumer": c, "model": "gpt-4o", "status": 200, "input_tokens": 500,
               "output_tokens": 120, "request_hash": f"h-{c}-{i}"}
              for c in [storm, *good] for i in range(20)]
    r = api.post("/v1/events", json=normal, headers=ingest)
    assert r.status_code == 200 and r.json()["accepted"] == len(normal), r.text

    # The storm: the same request, failing, over and over (as a broken retry
    # loop sends it), one POST per attempt as a gateway would report them.
    finding_at = None
    last_post_done = 0.0
    for i in range(40):
        ev = {"event_id": f"s-{run}-{i}", "ts": _iso(datetime.now(UTC)), "consumer": storm,
              "model": "gpt-4o", "status": 503, "error": "upstream_5xx", "attempt": i + 1,
              "input_tokens": 800, "output_tokens": 0, "request_hash": f"same-{run}"}
        r = api.post("/v1/events", json=[ev], headers=ingest)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        last_post_done = time.time()
        rows = store.query("SELECT toUnixTimestamp64Milli(min(recorded_at)) AS t, count() AS n "
                           "FROM tokenward.findings WHERE consumer = {c:String} "
                           "AND kind = 'retry_storm'", {"c": storm})
        if int(rows[0]["n"]):
            finding_at = int(rows[0]["t"]) / 1000
            break
        time.sleep(0.05)
    assert finding_at is not None, "the detectors found no retry storm in 40 identical failures"

    # nginx refuses the storming consumer within a few seconds of the finding...
    first_403 = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = chat(client, gateway.url, storm)
        if r.status_code == 403:
            first_403 = time.time()
            break
        assert r.status_code == 200
        time.sleep(0.01)
    assert first_403 is not None, "nginx never refused the storming consumer"
    delay = first_403 - finding_at
    print(f"\nfinding recorded -> first 403 at nginx: {delay * 1000:.0f} ms "
          f"(last storm event POST -> 403: {(first_403 - last_post_done) * 1000:.0f} ms)")
    assert delay < 3.0
    assert r.json()["error"]["code"] == "blocked"
    assert "retry_storm" in r.headers["x-tokenward-reason"]
    # the block is the policy's, audited with the finding
    audit = store.query("SELECT event, actor, finding_id, expires_at FROM tokenward.blocks "
                        "WHERE value = {c:String} ORDER BY at", {"c": storm})
    assert audit[0]["event"] == "block" and audit[0]["finding_id"] and audit[0]["expires_at"]
    assert audit[0]["actor"] != "" and not audit[0]["actor"].startswith("admin:")

    # ...while the others keep being served.
    for _ in range(5):
        for c in good:
            assert chat(client, gateway.url, c).status_code == 200, c
    # the block list shows it to polling gateways too
    bl = api.get("/v1/blocklist", headers={"Authorization": f"Bearer {GATEWAY_TOKEN}"}).json()
    assert storm in [e["value"] for e in bl["entries"]]

    # The block lifts at its TTL.
    deadline = time.monotonic() + BLOCK_TTL_S + 5
    lifted = None
    while time.monotonic() < deadline:
        if chat(client, gateway.url, storm).status_code == 200:
            lifted = time.time()
            break
        time.sleep(0.1)
    assert lifted is not None, f"still blocked {BLOCK_TTL_S + 5} s after the block"
    print(f"block lifted {lifted - first_403:.1f} s after the first 403 (TTL {BLOCK_TTL_S} s)")
    assert lifted - first_403 <= BLOCK_TTL_S + 1.5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the expiry is audited (background thread)
        ev = [r["event"] for r in store.query(
            "SELECT event FROM tokenward.blocks WHERE value = {c:String} ORDER BY at",
            {"c": storm})]
        if "expire" in ev:
            break
        time.sleep(0.05)
    assert ev[-1] == "expire", ev
    print(f"expiry audited {time.time() - lifted:.2f} s after the block lifted")


def test_manual_block_and_spoofed_identity(tokenward: Tokenward, gateway: Nginx) -> None:
    """An admin block bites at nginx at once; a client cannot dodge it by
    sending identity headers of its own."""
    victim = f"manual-{uuid.uuid4().hex[:6]}"
    api = httpx.Client(base_url=tokenward.url, timeout=10,
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    client = httpx.Client(timeout=10)
    r = api.post("/v1/blocks", json={"value": victim, "reason": "manual test", "ttl": "1m"})
    assert r.status_code == 201, r.text
    t0 = time.time()
    r = chat(client, gateway.url, victim)
    print(f"\nmanual block -> 403 at nginx: {(time.time() - t0) * 1000:.1f} ms")
    assert r.status_code == 403 and r.headers["x-tokenward-reason"].endswith("manual test")
    r = client.post(f"{gateway.url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer sk-{victim}",
                             "X-Tokenward-Consumer": "someone-else", "X-Consumer": "x",
                             "X-Forwarded-For": "1.2.3.4"}, json={"model": "gpt-4o"})
    assert r.status_code == 403
    assert api.delete(f"/v1/blocks/consumer/{victim}").status_code == 200
    assert chat(client, gateway.url, victim).status_code == 200


def test_fail_closed_by_default_and_fail_open_variant(model_server: int,
                                                      tmp_path: Path) -> None:
    """tokenward unreachable: the example answers 500 (fail closed); with the
    documented error_page line uncommented, calls go through (fail open)."""
    _require_nginx()
    dead = free_port()  # nothing listens there
    client = httpx.Client(timeout=10)
    for fail_open, expected in ((False, 500), (True, 200)):
        port = free_port()
        ngx = Nginx(tmp_path / f"ngx-{fail_open}", render_example(dead, model_server, port,
                                                                  fail_open=fail_open), port)
        try:
            r = chat(client, ngx.url, "anyone")
            assert r.status_code == expected, (fail_open, r.status_code, r.text)
        finally:
            ngx.stop()
    log = (tmp_path / "ngx-False" / "error.log").read_text()
    assert re.search(r"connect\(\) failed|refused", log), log[-500:]
