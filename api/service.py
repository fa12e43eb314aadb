"""Composition root: builds a running service from :class:`~api.settings.Settings`.

Nothing else in the project reads settings; every part below gets the frozen
configuration it needs from here.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.metrics import Metrics
from api.settings import Settings
from detectors.finding import Finding
from ingest.pipeline import EngineFactory, Pipeline, PipelineConfig
from ingest.store import Store, open_store

log = logging.getLogger(__name__)


def read_toml(path: str | None, what: str) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"tokenward: cannot read the {what} file {path}: {exc}") from None


def build_prices(settings: Settings) -> Any:
    from ingest.pricing import PriceTable

    try:
        return PriceTable.load(settings.prices_file)
    except ValueError as exc:
        raise SystemExit(f"tokenward: {exc}") from None


def build_engine_factory(settings: Settings) -> EngineFactory | None:
    try:
        from detectors import DetectorConfig, Engine
    except ImportError:  # pragma: no cover
        return None
    raw = read_toml(settings.detectors_file, "detectors")
    try:
        config = DetectorConfig.from_dict(raw) if raw else DetectorConfig()
    except ValueError as exc:
        raise SystemExit(f"tokenward: {settings.detectors_file}: {exc}") from None

    def factory(state: bytes | None) -> Any:
        if state:
            try:
                return Engine.restore(state, config)
            except Exception as exc:  # an unreadable state is recomputed, not fatal
                log.warning("discarding unreadable detector state: %s", exc)
        return Engine(config)

    return factory


@dataclass
class Service:
    settings: Settings
    store: Store
    metrics: Metrics
    pipeline: Pipeline
    alerting: Any = None
    kafka: Any = None
    started: float = 0.0
    threads: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
        try:
            self.pipeline.save_all()
        except Exception as exc:
            log.warning("could not save detector state at shutdown: %s", exc)
        if self.alerting is not None and hasattr(self.alerting, "close"):
            self.alerting.close()


def build_alerting(settings: Settings, store: Store, metrics: Metrics) -> Any:
    try:
        from alerting.service import build as build_alerting_service
    except ImportError:
        return None
    return build_alerting_service(settings, store, metrics)


def build_service(
    settings: Settings,
    *,
    detect: bool = True,
    extra_sinks: Sequence[Any] = (),
    with_alerting: bool = True,
    state_scope: str | None = "default",
) -> Service:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True) if not settings.clickhouse_url \
        else None
    store = open_store(settings.data_dir, settings.clickhouse_url)
    metrics = Metrics()
    alerting = build_alerting(settings, store, metrics) if with_alerting else None

    def on_findings(findings: Sequence[Finding]) -> None:
        metrics.count_findings(findings)
        if alerting is not None:
            alerting.handle(findings)
        for sink in extra_sinks:
            sink(findings)

    pipeline = Pipeline(
        store,
        prices=build_prices(settings),
        engine_factory=build_engine_factory(settings) if detect else None,
        on_findings=on_findings,
        metrics=metrics,
        config=PipelineConfig(detect=detect),
        state_scope=state_scope,
        observers=[alerting] if alerting is not None and alerting.budgets.enabled else [],
    )
    svc = Service(settings=settings, store=store, metrics=metrics, pipeline=pipeline,
                  alerting=alerting)
    return svc


def start_kafka(svc: Service) -> None:
    """Consume the Kafka topic in a background thread (when a bootstrap is set)."""
    s = svc.settings
    if not s.kafka_bootstrap:
        return
    from ingest.kafka import KafkaConfig, KafkaSource

    cfg = KafkaConfig(
        bootstrap=s.kafka_bootstrap,
        topic=s.kafka_topic,
        group_id=s.kafka_group,
        dead_letter_topic=s.kafka_dead_letter_topic,
        batch_max=s.kafka_batch_max,
    )
    source = KafkaSource(cfg, svc.pipeline, metrics=svc.metrics)
    svc.kafka = source
    svc.metrics.watch_lag(source.lag)

    def loop() -> None:
        try:
            source.run(svc.stop)
        except Exception:
            log.exception("Kafka consumer stopped")
        finally:
            source.close()

    t = threading.Thread(target=loop, name="kafka-consumer", daemon=True)
    t.start()
    svc.threads.append(t)
