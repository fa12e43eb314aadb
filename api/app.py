"""The HTTP API (FastAPI).  Routers per resource; the running
:class:`~api.service.Service` reaches handlers through an ``Annotated``
dependency."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from api.auth import require
from api.service import Service
from ingest.source import RawMessage, StorageError


def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(get_service)]


# -- events -------------------------------------------------------------------
class EventResult(BaseModel):
    index: int
    event_id: str | None = None
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None = None
    detail: str | None = None


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[EventResult]


events_router = APIRouter(tags=["events"])


def _split_body(body: bytes, content_type: str) -> list[bytes] | str:
    """A JSON array, one JSON object, or NDJSON -> one raw message per event."""
    text = body.strip()
    if not text:
        return "empty body"
    is_ndjson = "ndjson" in content_type or "jsonl" in content_type or "json-seq" in content_type
    if not is_ndjson and text[:1] == b"[":
        try:
            arr = json.loads(text)
        except ValueError as exc:
            return f"body is not valid JSON: {exc}"
        if not isinstance(arr, list):
            return "expected a JSON array of events"
        # Re-encode each element: rejected events keep their own raw payload.
        return [json.dumps(x, separators=(",", ":")).encode() for x in arr]
    if not is_ndjson and text[:1] == b"{" and b"\n" not in text:
        return [text]
    return [line for line in text.split(b"\n") if line.strip()]


@events_router.post(
    "/v1/events",
    response_model=IngestResponse,
    summary="Ingest usage events (JSON array, one object, or NDJSON)",
    dependencies=[Depends(require("ingest"))],
    responses={413: {"description": "body too large"}, 503: {"description": "store down"}},
)
async def post_events(request: Request, svc: ServiceDep, format: str | None = None) -> Any:
    """Each event is answered on its own: accepted, duplicate (already stored,
    not stored again) or rejected with a reason.  ``format`` names a gateway
    format (openai, anthropic, otel, litellm, higress); default auto-detects."""
    limit = svc.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return JSONResponse({"detail": f"body larger than {limit} bytes"}, status_code=413)
    body = await request.body()
    if len(body) > limit:
        return JSONResponse({"detail": f"body larger than {limit} bytes"}, status_code=413)
    parts = _split_body(body, request.headers.get("content-type", ""))
    if isinstance(parts, str):
        return JSONResponse({"detail": parts}, status_code=400)
    remote = request.client.host if request.client else "unknown"
    stamp = f"{time.time_ns():x}"
    msgs = [
        RawMessage(p, "http", f"http:{remote}:{stamp}:{i}", fmt=format) for i, p in enumerate(parts)
    ]
    try:
        # The pipeline is synchronous (ClickHouse I/O); keep the event loop free.
        from starlette.concurrency import run_in_threadpool

        res = await run_in_threadpool(svc.pipeline.handle, msgs, per_message=True)
    except StorageError as exc:
        return JSONResponse(
            {"detail": f"storage unavailable, nothing stored; retry later ({exc})"},
            status_code=503, headers={"Retry-After": "5"},
        )
    reasons = iter(res.rejected)
    results = []
    for i, (status, eid, reason) in enumerate(res.per_message):
        detail = None
        if status == "rejected":
            rej = next(reasons)
            detail = rej.detail
        results.append(EventResult(index=i, event_id=eid, status=status,  # type: ignore[arg-type]
                                   reason=reason, detail=detail))
    return IngestResponse(accepted=res.accepted, duplicates=res.duplicates,
                          rejected=len(res.rejected), results=results)


# -- health and metrics ---------------------------------------------------------
health_router = APIRouter(tags=["operations"])


@health_router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get("/readyz", summary="Readiness: storage and (if configured) Kafka")
def readyz(svc: ServiceDep) -> Response:
    checks: dict[str, str] = {}
    checks["storage"] = "ok" if svc.store.ping() else "unavailable"
    if svc.settings.kafka_bootstrap:
        from ingest.kafka import check_kafka

        err = check_kafka(svc.settings.kafka_bootstrap, 2.0)
        checks["kafka"] = "ok" if err is None else f"unavailable: {err}"
        consumer = next((t for t in svc.threads if t.name == "kafka-consumer"), None)
        if consumer is not None and not consumer.is_alive() and not svc.stop.is_set():
            # The consumer stopped on an unexpected error (logged): not ready,
            # so that the orchestrator restarts this instance.
            checks["kafka"] = "consumer stopped (see the log)"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


@health_router.get("/metrics", summary="Prometheus metrics")
def metrics(svc: ServiceDep) -> Response:
    svc.metrics.refresh_lag()
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(svc: Service) -> FastAPI:
    app = FastAPI(
        title="tokenward",
        version="0.1.0",
        description="Usage events in; findings, alerts and a block list out.",
    )
    app.state.service = svc
    app.include_router(events_router)
    app.include_router(health_router)
    try:
        from api import routes  # added by the alerting layer: block list, findings, ...
    except ImportError:
        routes = None  # type: ignore[assignment]
    if routes is not None:
        routes.include(app)
    return app
