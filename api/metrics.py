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
        self.lag = Gauge("tokenward_consumer_lag", "Kafka consumer lag (messages)",
                         ["partition"], registry=r)
        self._known_models: set[str] = set()

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

    # Kafka source hooks
    def on_dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(reason).inc()

    def on_retry(self) -> None:
        self.kafka_retries.inc()

    def watch_lag(self, lag_fn: Callable[[], dict[int, int]]) -> None:
        self._lag_fn = lag_fn

    def refresh_lag(self) -> None:
        fn = getattr(self, "_lag_fn", None)
        if fn is None:
            return
        try:
            for p, n in fn().items():
                self.lag.labels(str(p)).set(n)
        except Exception:
            pass
