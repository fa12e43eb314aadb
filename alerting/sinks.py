"""Alert sinks: Prometheus Alertmanager (v2 API), a signed generic webhook,
Slack incoming webhooks, and the worker that keeps them off the pipeline.

Every sink implements the small :class:`Sink` protocol: ``send(notes)``
delivers one batch or raises :class:`SinkError` (worth retrying) or
:class:`PermanentSinkError` (the receiver refused the payload: retrying cannot
help).  A :class:`SinkWorker` runs each sink on its own thread behind a
bounded queue, so a slow or dead receiver never stalls the pipeline:

* ``submit`` never blocks; when the queue is full the **oldest** batch is
  dropped (logged, ``tokenward_alerts_dropped{sink,reason="queue_full"}``);
* a failed send is retried with exponential backoff (``backoff_s`` doubling up
  to ``backoff_max_s``) up to ``max_attempts``; each failure counts in
  ``tokenward_alert_sink_failures{sink}``; after the last attempt the batch is
  dropped with a logged reason (``reason="retries_exhausted"``, or
  ``"rejected"`` for a permanent error);
* delivered alerts count in ``tokenward_alerts_sent{sink,state}``.

Webhook signature (for receivers): the body is JSON with ``sent_at`` (unix
seconds, also in the ``X-Tokenward-Timestamp`` header) and
``X-Tokenward-Signature: sha256=<hex>`` is HMAC-SHA256 of the **raw body**
with the shared secret.  Verify the HMAC over the exact bytes received
(constant-time compare), then reject a ``sent_at`` older than a few minutes
(replays).  ``X-Tokenward-Delivery`` is the same for every retry of one
delivery: use it to deduplicate.  See :func:`verify_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from alerting.lifecycle import Notification, iso
from alerting.policy import check_keys, get_number, get_str, parse_duration

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Tokenward-Signature"
TIMESTAMP_HEADER = "X-Tokenward-Timestamp"
DELIVERY_HEADER = "X-Tokenward-Delivery"


class SinkError(RuntimeError):
    """A delivery failed; it may succeed when retried."""


class PermanentSinkError(SinkError):
    """The receiver refused the payload (4xx): retrying will not help."""


class Sink(Protocol):
    name: str
    resend: bool  # re-send firing alerts periodically (Alertmanager needs it)

    def send(self, notes: Sequence[Notification]) -> None: ...

    def close(self) -> None: ...


class AlertMetrics(Protocol):
    """The counters the alerting package updates (implemented by api.metrics.Metrics)."""

    def alert_sent(self, sink: str, state: str, n: int = 1) -> None: ...

    def alert_sink_failure(self, sink: str) -> None: ...

    def alert_dropped(self, sink: str, reason: str, n: int = 1) -> None: ...

    def alert_queue_depth(self, sink: str, depth: int) -> None: ...

    def policy_decision(self, kind: str, decision: str) -> None: ...


class NullMetrics:
    def alert_sent(self, sink: str, state: str, n: int = 1) -> None:
        pass

    def alert_sink_failure(self, sink: str) -> None:
        pass

    def alert_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        pass

    def alert_queue_depth(self, sink: str, depth: int) -> None:
        pass

    def policy_decision(self, kind: str, decision: str) -> None:
        pass


def _check(resp: httpx.Response, sink: str) -> None:
    if resp.is_success:
        return
    detail = resp.text[:300].replace("\n", " ")
    msg = f"{sink}: HTTP {resp.status_code} from {resp.request.url}: {detail}"
    if 400 <= resp.status_code < 500 and resp.status_code not in (408, 425, 429):
        raise PermanentSinkError(msg)
    raise SinkError(msg)


class _HttpSink:
    name = "http"
    resend = False

    def __init__(self, url: str, *, timeout_s: float = 5.0,
                 headers: Mapping[str, str] | None = None,
                 client: httpx.Client | None = None) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self._own = client is None
        self.client = client or httpx.Client(timeout=timeout_s, follow_redirects=False)

    def _post(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            resp = self.client.post(url, content=body,
                                    headers={"Content-Type": "application/json",
                                             "User-Agent": "tokenward", **self.headers,
                                             **headers})
        except httpx.HTTPError as exc:
            raise SinkError(f"{self.name}: {type(exc).__name__}: {exc}") from exc
        _check(resp, self.name)

    def close(self) -> None:
        if self._own:
            self.client.close()


# -- Alertmanager ---------------------------------------------------------------------
class AlertmanagerSink(_HttpSink):
    """``POST {url}/api/v2/alerts``.  Firing alerts carry no ``endsAt`` (the
    Alertmanager sets now + ``resolve_timeout``) and are re-sent every
    ``resend_interval_s`` by the service; a resolved alert carries ``endsAt``.
    When an update changes the labels (e.g. the severity), the alert under the
    old labels is resolved in the same request."""

    resend = True

    def __init__(self, url: str, *, name: str = "alertmanager", timeout_s: float = 5.0,
                 headers: Mapping[str, str] | None = None, generator_url: str = "",
                 client: httpx.Client | None = None) -> None:
        super().__init__(url, timeout_s=timeout_s, headers=headers, client=client)
        self.name = name
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.generator_url = generator_url

    def payload(self, notes: Sequence[Notification]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for n in notes:
            if n.previous_labels:
                out.append({"labels": dict(n.previous_labels),
                            "annotations": dict(n.annotations),
                            "startsAt": iso(n.starts_at),
                            "endsAt": iso(datetime.fromtimestamp(n.at or time.time(), UTC))})
            a: dict[str, Any] = {"labels": dict(n.labels), "annotations": dict(n.annotations),
                                 "startsAt": iso(n.starts_at)}
            if n.state == "resolved" and n.ends_at is not None:
                a["endsAt"] = iso(n.ends_at)
            if self.generator_url:
                a["generatorURL"] = self.generator_url.replace("{finding_id}",
                                                               n.finding.finding_id)
            out.append(a)
        return out

    def send(self, notes: Sequence[Notification]) -> None:
        self._post(self.endpoint, json.dumps(self.payload(notes)).encode(), {})


# -- generic webhook ------------------------------------------------------------------
def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None, *,
                     max_age_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does: check the HMAC over the raw body, then freshness."""
    if not header or not hmac.compare_digest(sign(secret, body), header):
        return False
    try:
        sent = float(json.loads(body)["sent_at"])
    except (ValueError, KeyError, TypeError):
        return False
    return abs((time.time() if now is None else now) - sent) <= max_age_s


class WebhookSink(_HttpSink):
    """POSTs ``{"version": 1, "sent_at", "delivery_id", "alerts": [{"event",
    "state", "fingerprint", "labels", "annotations", "startsAt", "endsAt",
    "group_key", "finding": {...}}]}`` signed with the shared secret."""

    def __init__(self, url: str, secret: str | bytes, *, name: str = "webhook",
                 timeout_s: float = 5.0, headers: Mapping[str, str] | None = None,
                 client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(url, timeout_s=timeout_s, headers=headers, client=client)
        if not secret:
            raise ValueError(f"{name}: a webhook needs a shared secret")
        self.name = name
        self.secret = secret.encode() if isinstance(secret, str) else secret
        self.clock = clock

    def body(self, notes: Sequence[Notification], sent_at: int) -> tuple[bytes, str]:
        delivery = hashlib.blake2b("|".join(n.id for n in notes).encode(),
                                   digest_size=12).hexdigest()
        doc = {
            "version": 1,
            "sent_at": sent_at,
            "delivery_id": delivery,
            "alerts": [{**n.alert_dict(), "event": n.event, "group_key": n.group_key,
                        "finding": n.finding.to_json_dict()} for n in notes],
        }
        return json.dumps(doc, separators=(",", ":"), default=str).encode(), delivery

    def send(self, notes: Sequence[Notification]) -> None:
        ts = int(self.clock())
        body, delivery = self.body(notes, ts)  # re-signed (fresh timestamp) on every retry
        self._post(self.url, body, {SIGNATURE_HEADER: sign(self.secret, body),
                                    TIMESTAMP_HEADER: str(ts), DELIVERY_HEADER: delivery})


# -- Slack ------------------------------------------------------------------------------
def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_ICON = {("firing", "critical"): ":red_circle:", ("firing", "warning"): ":large_orange_circle:",
         ("firing", "info"): ":large_blue_circle:"}


class SlackSink(_HttpSink):
    """Slack incoming webhook: one message per batch, alerts grouped by
    tenant and kind, ``text`` (fallback and notifications) plus mrkdwn
    ``blocks``.  Re-sends are not posted (they would spam the channel)."""

    MAX_ALERTS = 20  # Slack allows 50 blocks per message

    def __init__(self, url: str, *, name: str = "slack", timeout_s: float = 5.0,
                 client: httpx.Client | None = None) -> None:
        super().__init__(url, timeout_s=timeout_s, client=client)
        self.name = name

    @staticmethod
    def line(n: Notification) -> str:
        sev = n.labels.get("severity", "")
        state = "RESOLVED" if n.state == "resolved" else n.event.upper()
        icon = ":white_check_mark:" if n.state == "resolved" else \
            _ICON.get(("firing", sev), ":warning:")
        a, lab = n.annotations, n.labels
        who = f"{lab.get('scope', '')} `{_esc(lab.get('subject', ''))}` · tenant " \
              f"`{_esc(lab.get('tenant', ''))}`"
        if lab.get("model"):
            who += f" · model `{_esc(lab['model'])}`"
        text = (f"{icon} *[{state}] {_esc(lab.get('alertname', ''))}* ({sev})\n{who}\n"
                f"{_esc(a.get('summary', ''))}\n"
                f"observed *{_esc(a.get('observed', ''))}* vs baseline "
                f"{_esc(a.get('baseline', ''))} (threshold {_esc(a.get('threshold', ''))})\n"
                f"*Action:* {_esc(a.get('action', ''))}")
        tail = f"finding `{_esc(n.finding.finding_id)}`"
        if a.get("runbook_url"):
            tail = f"<{a['runbook_url']}|runbook> · " + tail
        return (text + "\n" + tail)[:2900]  # a section's text is limited to 3000 chars

    def payload(self, notes: Sequence[Notification]) -> dict[str, Any]:
        notes = [n for n in notes if n.event != "resend"]
        groups: dict[str, list[Notification]] = {}
        for n in notes:
            groups.setdefault(n.group_key, []).append(n)
        blocks: list[dict[str, Any]] = []
        shown = 0
        for key, items in groups.items():
            firing = sum(1 for n in items if n.state == "firing")
            blocks.append({"type": "context", "elements": [{
                "type": "mrkdwn",
                "text": f"*tokenward* · {_esc(key)} · {firing} firing, "
                        f"{len(items) - firing} resolved"}]})
            for n in items:
                if shown >= self.MAX_ALERTS:
                    break
                blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": self.line(n)}})
                shown += 1
            blocks.append({"type": "divider"})
        if len(notes) > shown:
            blocks.append({"type": "context", "elements": [{
                "type": "mrkdwn", "text": f"... and {len(notes) - shown} more alerts"}]})
        first = notes[0] if notes else None
        text = "tokenward: " + (
            f"[{'RESOLVED' if first.state == 'resolved' else first.event.upper()}] "
            f"{first.labels.get('alertname')} {first.labels.get('scope')} "
            f"{first.labels.get('subject')}: {first.annotations.get('action', '')}"
            if first else "no alerts")
        if len(notes) > 1:
            text += f" (+{len(notes) - 1} more)"
        return {"text": text, "blocks": blocks[:50]}

    def send(self, notes: Sequence[Notification]) -> None:
        if all(n.event == "resend" for n in notes):
            return
        self._post(self.url, json.dumps(self.payload(notes)).encode(), {})


# -- config -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryConfig:
    queue_size: int = 1000  # batches waiting per sink
    max_attempts: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    max_batch: int = 200  # notifications merged into one request

    KEYS = ("queue_size", "max_attempts", "backoff", "backoff_max", "max_batch")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str,
                  base: RetryConfig | None = None) -> RetryConfig:
        b = base or cls()
        return cls(
            queue_size=int(get_number(d, "queue_size", where, b.queue_size, lo=1)),
            max_attempts=int(get_number(d, "max_attempts", where, b.max_attempts, lo=1,
                                        hi=100)),
            backoff_s=parse_duration(d.get("backoff", b.backoff_s), f"{where}.backoff"),
            backoff_max_s=parse_duration(d.get("backoff_max", b.backoff_max_s),
                                         f"{where}.backoff_max"),
            max_batch=int(get_number(d, "max_batch", where, b.max_batch, lo=1, hi=10_000)),
        )


@dataclass(frozen=True)
class SinkConfig:
    type: str  # alertmanager | webhook | slack
    name: str
    url: str
    secret: str = field(default="", repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout_s: float = 5.0
    generator_url: str = ""
    retry: RetryConfig = field(default_factory=RetryConfig)


_COMMON = ("name", "url", "url_env", "timeout", "headers", *RetryConfig.KEYS)
_TYPE_KEYS = {
    "alertmanager": (*_COMMON, "generator_url"),
    "webhook": (*_COMMON, "secret", "secret_env"),
    "slack": _COMMON,
}


def _env(d: Mapping[str, Any], key: str, where: str, env: Mapping[str, str]) -> str | None:
    name = d.get(key)
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.{key}: expected the name of an environment variable")
    val = env.get(name)
    if not val:
        raise ValueError(f"{where}.{key}: the environment variable {name} is not set")
    return val


@dataclass(frozen=True)
class SinksConfig:
    sinks: tuple[SinkConfig, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "sinks",
                  env: Mapping[str, str] | None = None) -> SinksConfig:
        env = os.environ if env is None else env
        check_keys(d, (*_TYPE_KEYS, *RetryConfig.KEYS), where)
        base = RetryConfig.from_dict(d, where)
        out: list[SinkConfig] = []
        for typ, keys in _TYPE_KEYS.items():
            raw = d.get(typ, [])
            items = [raw] if isinstance(raw, Mapping) else raw
            if not isinstance(items, list):
                raise ValueError(f"{where}.{typ}: expected a table or an array of tables "
                                 f"([[{where}.{typ}]])")
            for i, s in enumerate(items):
                w = f"{where}.{typ}[{i}]"
                check_keys(s, keys, w)
                url = _env(s, "url_env", w, env) or get_str(s, "url", w, "")
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"{w}.url: expected an http:// or https:// URL (or url_env "
                                     f"naming a variable that holds one), got {url!r}")
                secret = ""
                if typ == "webhook":
                    secret = _env(s, "secret_env", w, env) or get_str(s, "secret", w, "")
                    if not secret:
                        raise ValueError(f"{w}: set secret_env (an environment variable with "
                                         "the shared HMAC secret) or secret")
                headers = s.get("headers", {})
                if not isinstance(headers, Mapping) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
                    raise ValueError(f"{w}.headers: expected a table of string values")
                name = get_str(s, "name", w, typ if i == 0 else f"{typ}-{i}")
                out.append(SinkConfig(
                    type=typ, name=name, url=url, secret=secret, headers=dict(headers),
                    timeout_s=parse_duration(s.get("timeout", 5), f"{w}.timeout"),
                    generator_url=get_str(s, "generator_url", w, ""),
                    retry=RetryConfig.from_dict(s, w, base)))
        names = [s.name for s in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{where}: duplicate sink name(s) {', '.join(dup)}; set name = ...")
        return cls(tuple(out))


def build_sink(c: SinkConfig) -> Sink:
    if c.type == "alertmanager":
        return AlertmanagerSink(c.url, name=c.name, timeout_s=c.timeout_s, headers=c.headers,
                                generator_url=c.generator_url)
    if c.type == "webhook":
        return WebhookSink(c.url, c.secret, name=c.name, timeout_s=c.timeout_s,
                           headers=c.headers)
    if c.type == "slack":
        return SlackSink(c.url, name=c.name, timeout_s=c.timeout_s)
    raise ValueError(f"unknown sink type {c.type!r}")


# -- the worker -------------------------------------------------------------------------
class SinkWorker:
    """Runs one sink on a daemon thread behind a bounded queue (see the module
    docstring for the drop and retry rules)."""

    def __init__(self, sink: Sink, retry: RetryConfig | None = None,
                 metrics: AlertMetrics | None = None, *, start: bool = True) -> None:
        self.sink = sink
        self.retry = retry or RetryConfig()
        self.metrics: AlertMetrics = metrics or NullMetrics()
        self._q: deque[list[Notification]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._abort = threading.Event()
        self._busy = False
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @property
    def name(self) -> str:
        return self.sink.name

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}",
                                            daemon=True)
            self._thread.start()

    def submit(self, notes: Sequence[Notification]) -> None:
        """Queue a batch; never blocks.  Drops the oldest batch when full."""
        if not notes:
            return
        with self._cv:
            if self._closing:
                self._drop(list(notes), "shutdown")
                return
            while len(self._q) >= self.retry.queue_size:
                self._drop(self._q.popleft(), "queue_full")
            self._q.append(list(notes))
            self.metrics.alert_queue_depth(self.name, len(self._q))
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._q) + (1 if self._busy else 0)

    def _drop(self, notes: list[Notification], reason: str) -> None:
        log.warning("alert sink %s: dropping %d notification(s) (%s): %s", self.name,
                    len(notes), reason,
                    ", ".join(f"{n.labels.get('alertname')}/{n.event}" for n in notes[:5]))
        self.metrics.alert_dropped(self.name, reason, len(notes))

    def _take(self) -> list[Notification] | None:
        with self._cv:
            while not self._q:
                if self._closing:
                    return None
                self._cv.wait(timeout=1.0)
            batch = self._q.popleft()
            # Merge what else is waiting into one request (fewer round trips).
            while self._q and len(batch) + len(self._q[0]) <= self.retry.max_batch:
                batch.extend(self._q.popleft())
            self._busy = True
            self.metrics.alert_queue_depth(self.name, len(self._q))
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._deliver(batch)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _deliver(self, batch: list[Notification]) -> None:
        delay = self.retry.backoff_s
        for attempt in range(1, self.retry.max_attempts + 1):
            if self._abort.is_set():
                self._drop(batch, "shutdown")
                return
            try:
                self.sink.send(batch)
            except PermanentSinkError as exc:
                self.metrics.alert_sink_failure(self.name)
                log.error("alert sink %s refused the alerts: %s", self.name, exc)
                self._drop(batch, "rejected")
                return
            except Exception as exc:
                self.metrics.alert_sink_failure(self.name)
                if attempt >= self.retry.max_attempts:
                    log.error("alert sink %s failed %d times, last: %s", self.name, attempt, exc)
                    self._drop(batch, "retries_exhausted")
                    return
                log.warning("alert sink %s failed (attempt %d/%d, retry in %.1fs): %s",
                            self.name, attempt, self.retry.max_attempts, delay, exc)
                if self._abort.wait(delay):
                    self._drop(batch, "shutdown")
                    return
                delay = min(delay * 2, self.retry.backoff_max_s)
                continue
            counts: dict[str, int] = {}
            for n in batch:
                counts[n.event] = counts.get(n.event, 0) + 1
            for state, k in counts.items():
                self.metrics.alert_sent(self.name, state, k)
            return

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued was delivered or dropped."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._q or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(timeout=min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout``; drop the rest (logged)."""
        self.flush(timeout)
        with self._cv:
            self._closing = True
            rest = list(self._q)
            self._q.clear()
            self._cv.notify_all()
        for b in rest:
            self._drop(b, "shutdown")
        self._abort.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, self.sink_timeout()))
        try:
            self.sink.close()
        except Exception as exc:
            log.warning("alert sink %s close failed: %s", self.name, exc)

    def sink_timeout(self) -> float:
        client = getattr(self.sink, "client", None)
        t = getattr(getattr(client, "timeout", None), "read", None)
        return float(t) if isinstance(t, int | float) else 5.0
