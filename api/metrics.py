"""Prometheus metrics (served at /metrics).  One registry per service, so that
tests and several in-process services never collide on the global registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detectors.finding import Finding
from ingest.source import BatchResult


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter("tokenward_events_consumed", "Raw messages received",
                                ["source"], registry=r)
        self.stored = Counter("tokenward_events_stored", "Events stored", ["source"],
                              registry=r)
        self.duplicates = Counter("tokenward_events_duplicate",
                                  "Valid events already stored (replays), not stored again",
                                  ["source"], registry=r)
        self.rejected = Counter("tokenward_events_rejected", "Rejected inputs by reason",
                                ["source", "reason"], registry=r)
        self.batch_seconds = Histogram(
            "tokenward_batch_seconds", "Time to process and store one batch", ["source"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.unknown_models = Counter("tokenward_unknown_model_events",
                                      "Events whose model is not in the price table (cost 0)",
                                      ["model"], registry=r)
        self.storage_failures = Counter("tokenward_storage_failures",
                                        "Batches the store refused (they are retried)",
                                        registry=r)
        self.findings = Counter("tokenward_findings", "Findings (new episodes) by kind",
                                ["kind", "severity"], registry=r)
        self.finding_updates = Counter("tokenward_finding_updates",
                                       "Finding revisions (updates and resolutions)",
                                       ["kind", "status"], registry=r)
        self.dead_letters = Counter("tokenward_dead_letters", "Messages sent to the DLQ topic",
                                    ["reason"], registry=r)
        self.kafka_retries = Counter("tokenward_kafka_batch_retries",
                                     "Kafka batches re-delivered after a storage failure",
                                     registry=r)
        self.kafka_tombstones = Counter("tokenward_kafka_tombstones",
                                        "Kafka messages without a value (skipped)", registry=r)
        self.kafka_commit_failures = Counter("tokenward_kafka_commit_failures",
                                             "Offset commits that failed (batch re-delivered)",
                                             registry=r)
        self.lag = Gauge("tokenward_consumer_lag", "Kafka consumer lag (messages)",
                         ["partition"], registry=r)
        self._known_models: set[str] = set()
        # --- alerting (alerting/: sinks, policy) -- begin ---------------------------
        self.alert_sink_failures = Counter(
            "tokenward_alert_sink_failures", "Failed delivery attempts per alert sink",
            ["sink"], registry=r)
        self.alerts_sent = Counter(
            "tokenward_alerts_sent", "Alert notifications delivered, per sink and event "
            "(firing, updated, resolved, resend)", ["sink", "state"], registry=r)
        self.alerts_dropped = Counter(
            "tokenward_alerts_dropped", "Alert notifications dropped (queue_full, "
            "retries_exhausted, rejected, shutdown)", ["sink", "reason"], registry=r)
        self.alert_queue = Gauge("tokenward_alert_queue_depth",
                                 "Batches waiting in an alert sink's queue", ["sink"], registry=r)
        self.policy_decisions = Counter(
            "tokenward_policy_decisions", "Policy decisions per finding revision (alert, block, "
            "would_block, none, stale, resolved)", ["kind", "decision"], registry=r)
        # --- alerting -- end -------------------------------------------------------

    # PipelineMetrics
    def batch(self, source: str, seconds: float, result: BatchResult) -> None:
        n = result.accepted + result.duplicates + len(result.rejected)
        self.consumed.labels(source).inc(n)
        self.stored.labels(source).inc(result.accepted)
        if result.duplicates:
            self.duplicates.labels(source).inc(result.duplicates)
        for rej in result.rejected:
            self.rejected.labels(source, rej.reason).inc()
        self.batch_seconds.labels(source).observe(seconds)

    def unknown_model(self, model: str) -> None:
        # Bound the label set: a gateway sending random model names must not
        # explode the metric's cardinality.
        if model not in self._known_models and len(self._known_models) >= 200:
            model = "_other"
        else:
            self._known_models.add(model)
        self.unknown_models.labels(model).inc()

    def storage_failure(self) -> None:
        self.storage_failures.inc()

    def count_findings(self, findings: Sequence[Finding]) -> None:
        for f in findings:
            if f.revision == 0 and f.status == "firing":
                self.findings.labels(f.kind, f.severity).inc()
            else:
                self.finding_updates.labels(f.kind, f.status).inc()

    # --- alerting hooks (alerting.sinks.AlertMetrics) -- begin ----------------------
    def alert_sent(self, sink: str, state: str, n: int = 1) -> None:
        self.alerts_sent.labels(sink, state).inc(n)

    def alert_sink_failure(self, sink: str) -> None:
        self.alert_sink_failures.labels(sink).inc()

    def alert_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        self.alerts_dropped.labels(sink, reason).inc(n)

    def alert_queue_depth(self, sink: str, depth: int) -> None:
        self.alert_queue.labels(sink).set(depth)

    def policy_decision(self, kind: str, decision: str) -> None:
        self.policy_decisions.labels(kind, decision).inc()
    # --- alerting hooks -- end ------------------------------------------------------

    # Kafka source hooks
    def on_dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(reason).inc()

    def on_retry(self) -> None:
        self.kafka_retries.inc()

    def on_tombstone(self) -> None:
        self.kafka_tombstones.inc()

    def on_commit_failed(self) -> None:
        self.kafka_commit_failures.inc()

    def watch_lag(self, lag_fn: Callable[[], dict[int, int]]) -> None:
        self._lag_fn = lag_fn

    def refresh_lag(self) -> None:
        fn = getattr(self, "_lag_fn", None)
        if fn is None:
            return
        try:
            lags = fn()
        except Exception:
            return
        # Partitions given away in a rebalance must not keep reporting old lag.
        self.lag.clear()
        for p, n in lags.items():
            self.lag.labels(str(p)).set(n)
