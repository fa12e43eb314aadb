"""HTTP routes of the alerting layer: block list, check, manual blocks,
findings, alerts, consumers, read-only SQL.

Hot paths (``GET /v1/blocklist`` and ``GET /v1/check``, polled by gateways)
are ``async`` handlers with one ``async`` auth dependency: no thread-pool
hop, no validation of the response, pre-rendered bytes.  Everything that
touches ClickHouse is a plain ``def`` (FastAPI runs it in its thread pool, so
the event loop keeps serving gateways while a query runs).

Identity for ``GET /v1/check`` (the first non-empty value wins):

* consumer: query ``consumer``, header ``X-Tokenward-Consumer``, header ``X-Consumer``
* user: query ``user``, header ``X-Tokenward-User``, header ``X-User``
* ip: query ``ip``, header ``X-Tokenward-IP``, header ``X-Real-IP``, then the
  first address of ``X-Forwarded-For``.  Have the gateway set ``X-Real-IP``
  (or ``X-Tokenward-IP``) from the peer address itself: a client can put
  anything in ``X-Forwarded-For``.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import threading
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator

from alerting.blocklist import SCOPES, AllowlistedError, BlockList, parse_ttl
from api.app import ServiceDep
from api.auth import AdminAuth, AnalystAuth, GatewayAuth, build_auth
from detectors.finding import KINDS
from ingest.source import StorageError

log = logging.getLogger(__name__)

DB = "tokenward"


# -- models ----------------------------------------------------------------------
class BlockListEntry(BaseModel):
    scope: Literal["consumer", "user", "ip"]
    value: str
    reason: str
    finding_id: str
    expires_at: datetime | None = Field(None, description="RFC 3339; null = until unblocked")


class BlockListDoc(BaseModel):
    version: int = Field(description="bumps on every change, expiries included")
    generated_at: datetime
    entries: list[BlockListEntry]


class CheckResult(BaseModel):
    allowed: bool
    scope: Literal["consumer", "user", "ip"] | None = None
    value: str | None = None
    reason: str | None = None
    finding_id: str | None = None
    expires_at: datetime | None = None


class BlockRequest(BaseModel):
    scope: Literal["consumer", "user", "ip"] = "consumer"
    value: str = Field(min_length=1, max_length=512)
    reason: str = Field(min_length=1, max_length=1000)
    ttl: str | float | None = Field(
        None, description='seconds, or "30s", "10m", "2h", "1d"; null = until unblocked')
    tenant: str = "default"
    finding_id: str = ""
    dry_run: bool = Field(False, description="record a would_block audit row only")

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: str | float | None) -> str | float | None:
        parse_ttl(v)  # raises ValueError with a clear message
        return v


class BlockOut(BaseModel):
    scope: str
    value: str
    reason: str
    finding_id: str
    expires_at: datetime | None
    tenant: str
    actor: str
    created_at: datetime | None
    block_id: str
    dry_run: bool


class BlocksOut(BaseModel):
    version: int
    entries: list[BlockOut]


class UnblockOut(BaseModel):
    unblocked: bool
    scope: str
    value: str


class FindingOut(BaseModel):
    finding_id: str
    revision: int
    kind: str
    severity: str
    scope: str
    subject: str
    tenant: str
    consumer: str
    model: str
    status: str
    first_event_ts: datetime
    detected_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    observed: float
    baseline: float
    threshold: float
    action: str
    summary: str
    evidence: dict[str, Any]


class FindingsOut(BaseModel):
    findings: list[FindingOut]


class AlertsOut(BaseModel):
    enabled: bool = Field(description="false when no alerting layer runs")
    alerts: list[dict[str, Any]]


class ModelUsage(BaseModel):
    model: str
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cached_input_tokens: int
    cost: float


class ConsumerOut(BaseModel):
    consumer: str
    window_start: datetime | None = Field(description="usage window: the consumer's last "
                                          "hour of traffic (event time)")
    window_end: datetime | None
    usage: list[ModelUsage]
    baselines: list[dict[str, Any]] = Field(description="the detectors' current view of "
                                            "this consumer (empty when they expose none)")
    block: BlockOut | None
    open_findings: int


class QueryIn(BaseModel):
    sql: str = Field(min_length=1, max_length=100_000)
    max_rows: int = Field(10_000, ge=1, le=1_000_000)


class QueryOut(BaseModel):
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False


# -- helpers -----------------------------------------------------------------------
_JSON = "application/json"
_ALLOWED = b'{"allowed":true}'
_NO_CACHE = "no-cache"


def _blocklist(request: Request) -> BlockList:
    bl: BlockList = request.app.state.blocklist
    return bl


def _ts(v: Any) -> datetime | None:
    """ClickHouse time (chdb JSON: 'YYYY-MM-DD hh:mm:ss.fff'; server: ISO) -> UTC datetime."""
    if v is None or v == "":
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    d = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable_encoder(asdict(obj))
    return jsonable_encoder(obj)


def _etag_match(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    for tag in header.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def _first_ip(xff: str) -> str:
    return xff.split(",", 1)[0].strip()


# -- gateway routes (hot) -------------------------------------------------------------
def _blocklist_answer(bl: BlockList, if_none_match: str | None) -> tuple[int, bytes, str]:
    """(status, body, etag) for GET /v1/blocklist."""
    snap = bl.snapshot()
    if if_none_match is not None and _etag_match(if_none_match, snap.etag):
        return 304, b"", snap.etag
    return 200, snap.body, snap.etag


def _check_identity(
    consumer: str | None, user: str | None, ip: str | None, h: Any
) -> tuple[str | None, str | None, str | None]:
    """Fill what the query did not give from the headers (``h.get(name)``)."""
    if not consumer:
        consumer = h.get("x-tokenward-consumer") or h.get("x-consumer")
    if not user:
        user = h.get("x-tokenward-user") or h.get("x-user")
    if not ip:
        ip = h.get("x-tokenward-ip") or h.get("x-real-ip")
        if not ip:
            xff = h.get("x-forwarded-for")
            ip = _first_ip(xff) if xff else None
    return consumer, user, ip


def _gateway_routes(app: FastAPI) -> None:
    @app.get(
        "/v1/blocklist",
        tags=["gateway"],
        summary="The block list (poll with If-None-Match)",
        response_model=None,
        responses={
            200: {"model": BlockListDoc, "description": "the list, with an ETag"},
            304: {"description": "unchanged since the ETag in If-None-Match"},
            401: {"description": "missing or invalid token"},
            403: {"description": "token lacks the gateway role"},
        },
    )
    async def get_blocklist(request: Request, _: GatewayAuth) -> Response:
        """Every active block.  Send the last ``ETag`` in ``If-None-Match``:
        an unchanged list answers 304 with no body.  Entries carry
        ``expires_at``: a gateway that polls rarely should drop entries past it."""
        status, body, etag = _blocklist_answer(_blocklist(request),
                                               request.headers.get("if-none-match"))
        headers = {"ETag": etag, "Cache-Control": _NO_CACHE}
        if status == 304:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=_JSON, headers=headers)

    @app.get(
        "/v1/check",
        tags=["gateway"],
        summary="Is this caller allowed? 200 yes, 403 blocked (nginx auth_request, ext_authz)",
        response_model=None,
        responses={
            200: {"model": CheckResult, "description": "allowed"},
            403: {"model": CheckResult, "description": "blocked; reason also in the "
                  "X-Tokenward-Reason header"},
            401: {"description": "missing or invalid token"},
        },
    )
    async def get_check(
        request: Request,
        _: GatewayAuth,
        consumer: Annotated[str | None, Query(max_length=_MAX_ID)] = None,
        user: Annotated[str | None, Query(max_length=_MAX_ID)] = None,
        ip: Annotated[str | None, Query(max_length=_MAX_IP)] = None,
    ) -> Response:
        """Identity from the query, else from headers: ``X-Tokenward-Consumer``
        / ``X-Consumer``, ``X-Tokenward-User`` / ``X-User``, ``X-Tokenward-IP``
        / ``X-Real-IP`` / first ``X-Forwarded-For`` address."""
        consumer, user, ip = _check_identity(consumer, user, ip, request.headers)
        entry = _blocklist(request).check(consumer, user, ip)
        if entry is None:
            return Response(_ALLOWED, media_type=_JSON)
        return Response(entry.denied_body, status_code=403, media_type=_JSON,
                        headers={"X-Tokenward-Reason": entry.denied_reason,
                                 "X-Tokenward-Scope": entry.scope})


_MAX_ID = 512
_MAX_IP = 64
_CT_JSON = (b"content-type", b"application/json")
_CACHE = (b"cache-control", b"no-cache")
_ALLOWED_HEADERS = [_CT_JSON, (b"content-length", str(len(_ALLOWED)).encode())]
_QUERY_KEYS = frozenset({"consumer", "user", "ip"})


class GatewayFastPath:
    """ASGI fast path for the two hot gateway GETs.

    It answers only the common, *successful* case (an authorised caller, a
    well-formed query) straight from the pre-rendered bytes, skipping
    FastAPI's routing, dependency solving and response classes (about 3x the
    throughput and a far lower tail latency on one worker).  Everything else
    (no or a wrong token, a role it lacks, a malformed or oversized query,
    HEAD, other paths) goes down to the FastAPI routes above, which give the
    same answers plus the documented 401/403/422 errors: the semantics live
    there, and both paths share :func:`_blocklist_answer`,
    :func:`_check_identity` and :func:`api.auth.Auth.authenticate`.
    """

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == "/v1/check" or path == "/v1/blocklist":
                handled = await self._serve(path, scope, send)
                if handled:
                    return
        await self.app(scope, receive, send)

    async def _serve(self, path: str, scope: Any, send: Any) -> bool:
        h: dict[str, str] = {}
        for k, v in scope["headers"]:
            h[k.decode("latin-1")] = v.decode("latin-1")
        auth = self.state.auth
        if auth.enabled:
            principal = auth.authenticate(h.get("authorization"))
            if principal is None or not principal.has("gateway"):
                return False  # FastAPI answers 401/403
        bl: BlockList = self.state.blocklist
        if path == "/v1/blocklist":
            status, body, etag = _blocklist_answer(bl, h.get("if-none-match"))
            headers = [(b"etag", etag.encode()), _CACHE]
            if status == 200:
                headers += [_CT_JSON, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return True
        q: dict[str, str] = {}
        qs = scope["query_string"]
        if qs:
            for k, v in parse_qsl(qs.decode("latin-1"), keep_blank_values=True):
                if k in q or k not in _QUERY_KEYS:
                    return False  # repeated or unknown parameter: let FastAPI judge
                q[k] = v
            if len(q.get("ip", "")) > _MAX_IP or any(len(v) > _MAX_ID for v in q.values()):
                return False  # FastAPI answers 422
        consumer, user, ip = _check_identity(q.get("consumer"), q.get("user"), q.get("ip"), h)
        entry = bl.check(consumer, user, ip)
        if entry is None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": _ALLOWED_HEADERS})
            await send({"type": "http.response.body", "body": _ALLOWED})
            return True
        body = entry.denied_body
        await send({"type": "http.response.start", "status": 403, "headers": [
            _CT_JSON, (b"content-length", str(len(body)).encode()),
            (b"x-tokenward-reason", entry.denied_reason.encode("latin-1")),
            (b"x-tokenward-scope", entry.scope.encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
        return True


# -- admin: manual blocks ------------------------------------------------------------------
def _block_out(e: Any) -> BlockOut:
    return BlockOut.model_validate(e.to_dict())


def _admin_routes(app: FastAPI) -> None:
    @app.post("/v1/blocks", tags=["blocks"], status_code=201, response_model=BlockOut,
              summary="Block a consumer, user or ip (admin)",
              responses={409: {"description": "allowlisted"}, 503: {"description": "store down"}})
    def post_block(body: BlockRequest, request: Request, who: AdminAuth) -> BlockOut:
        """Blocking a value that is already blocked extends it (the later expiry
        wins).  ``dry_run`` records a ``would_block`` audit row and changes nothing."""
        try:
            e = _blocklist(request).block(
                body.scope, body.value, reason=body.reason, finding_id=body.finding_id,
                ttl_s=parse_ttl(body.ttl), actor=who.actor, tenant=body.tenant,
                dry_run=body.dry_run)
        except AllowlistedError as exc:
            raise HTTPException(409, str(exc)) from None
        except StorageError as exc:
            raise HTTPException(503, f"the block audit could not be written: {exc}") from None
        return _block_out(e)

    @app.delete("/v1/blocks/{scope}/{value:path}", tags=["blocks"], response_model=UnblockOut,
                summary="Lift a block (admin)",
                responses={404: {"description": "not blocked"}})
    def delete_block(
        scope: Annotated[Literal["consumer", "user", "ip"], Path()],
        value: Annotated[str, Path(min_length=1)],
        request: Request,
        who: AdminAuth,
        reason: Annotated[str, Query(max_length=1000)] = "manual unblock",
    ) -> UnblockOut:
        try:
            ok = _blocklist(request).unblock(scope, value, actor=who.actor, reason=reason)
        except StorageError as exc:
            raise HTTPException(503, f"the block audit could not be written: {exc}") from None
        if not ok:
            raise HTTPException(404, f"{scope} {value!r} is not blocked")
        return UnblockOut(unblocked=True, scope=scope, value=value)

    @app.get("/v1/policy", tags=["blocks"], summary="The effective alert/block policy (admin)",
             responses={404: {"description": "no alerting layer runs"}})
    def get_policy(svc: ServiceDep, _: AdminAuth) -> dict[str, Any]:
        describe = getattr(svc.alerting, "describe", None)
        if describe is None:
            raise HTTPException(404, "no alerting layer runs in this service")
        doc: dict[str, Any] = _jsonable(describe())
        return doc

    @app.get("/v1/blocks", tags=["blocks"], response_model=BlocksOut,
             summary="Active blocks with actor and creation time (analyst)")
    async def get_blocks(request: Request, _: AnalystAuth) -> BlocksOut:
        bl = _blocklist(request)
        snap = bl.snapshot()
        entries = sorted(bl.entries(), key=lambda e: (e.scope, e.value))
        return BlocksOut(version=snap.version, entries=[_block_out(e) for e in entries])


# -- analyst: findings, alerts, consumers, query ----------------------------------------------
_FINDING_COLS = (
    "finding_id, revision, kind, severity, scope, subject, tenant, consumer, model, status, "
    "first_event_ts, detected_at, updated_at, resolved_at, observed, baseline, threshold, "
    "action, summary, evidence"
)


def _finding(row: dict[str, Any]) -> FindingOut:
    ev = row.get("evidence") or "{}"
    try:
        evidence = json.loads(ev) if isinstance(ev, str) else dict(ev)
    except ValueError:
        evidence = {"raw": ev}
    d = dict(row)
    d["evidence"] = evidence if isinstance(evidence, dict) else {"value": evidence}
    for k in ("first_event_ts", "detected_at", "updated_at", "resolved_at"):
        d[k] = _ts(d.get(k))
    return FindingOut.model_validate(d)


_KINDS = tuple(KINDS)
_KINDS_DOC = "one of " + ", ".join(_KINDS)


def _analyst_routes(app: FastAPI) -> None:
    kinds = _KINDS

    @app.get("/v1/findings", tags=["analyst"], response_model=FindingsOut,
             summary="Findings, latest revision of each (analyst)")
    def get_findings(
        svc: ServiceDep,
        _: AnalystAuth,
        kind: Annotated[str | None, Query(description=_KINDS_DOC)] = None,
        consumer: Annotated[str | None, Query(max_length=512)] = None,
        tenant: Annotated[str | None, Query(max_length=256)] = None,
        status: Literal["firing", "resolved"] | None = None,
        since: Annotated[datetime | None, Query(
            description="RFC 3339; findings detected or updated since")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> FindingsOut:
        if kind is not None and kind not in kinds:
            raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(kinds)}")
        where = ["1"]
        params: dict[str, Any] = {"limit": limit}
        for col, val in (("kind", kind), ("consumer", consumer), ("tenant", tenant),
                         ("status", status)):
            if val is not None:
                where.append(f"{col} = {{{col}:String}}")
                params[col] = val
        if since is not None:
            where.append("updated_at >= {since:DateTime64(3, 'UTC')}")
            params["since"] = since if since.tzinfo else since.replace(tzinfo=UTC)
        sql = (f"SELECT {_FINDING_COLS} FROM {DB}.findings_latest WHERE {' AND '.join(where)} "
               "ORDER BY updated_at DESC, finding_id LIMIT {limit:UInt32}")
        try:
            rows = svc.store.query(sql, params)
        except Exception as exc:
            raise HTTPException(503, f"query failed: {_first_line(exc)}") from None
        return FindingsOut(findings=[_finding(r) for r in rows])

    @app.get("/v1/findings/{finding_id}", tags=["analyst"], response_model=FindingsOut,
             summary="Every revision of one finding, oldest first (analyst)",
             responses={404: {"description": "no such finding"}})
    def get_finding_history(
        svc: ServiceDep,
        _: AnalystAuth,
        finding_id: Annotated[str, Path(max_length=64)],
    ) -> FindingsOut:
        sql = (f"SELECT {_FINDING_COLS} FROM {DB}.findings "
               "WHERE finding_id = {fid:String} ORDER BY revision LIMIT 1 BY revision")
        try:
            rows = svc.store.query(sql, {"fid": finding_id})
        except Exception as exc:
            raise HTTPException(503, f"query failed: {_first_line(exc)}") from None
        if not rows:
            raise HTTPException(404, f"no finding {finding_id!r}")
        return FindingsOut(findings=[_finding(r) for r in rows])

    @app.get("/v1/alerts", tags=["analyst"], response_model=AlertsOut,
             summary="Alerts from the alerting layer (analyst)")
    def get_alerts(
        svc: ServiceDep,
        _: AnalystAuth,
        state: Annotated[str | None, Query(max_length=32,
                                           description="e.g. firing, resolved")] = None,
        tenant: Annotated[str | None, Query(max_length=256)] = None,
        kind: Annotated[str | None, Query(description=_KINDS_DOC)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    ) -> AlertsOut:
        fn = getattr(svc.alerting, "alerts", None)
        if fn is None:
            return AlertsOut(enabled=False, alerts=[])
        if kind is not None and kind not in kinds:
            raise HTTPException(422, f"unknown kind {kind!r}; use one of {', '.join(kinds)}")
        try:
            accepted = set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            accepted = set()
        given = {"state": state, "tenant": tenant, "kind": kind, "limit": limit}
        kw = {k: v for k, v in given.items() if v is not None and k in accepted}
        out = [_jsonable(a) for a in fn(**kw)]
        for k, v in given.items():  # filters the alerting layer did not take
            if k != "limit" and v is not None and k not in kw:
                out = [a for a in out if not isinstance(a, dict) or a.get(k) == v]
        return AlertsOut(enabled=True, alerts=out[:limit])

    @app.get("/v1/consumers/{consumer_id:path}", tags=["analyst"], response_model=ConsumerOut,
             summary="A consumer: recent usage per model, baselines, block (analyst)")
    def get_consumer(
        consumer_id: Annotated[str, Path(min_length=1, max_length=512)],
        svc: ServiceDep,
        request: Request,
        _: AnalystAuth,
    ) -> ConsumerOut:
        try:
            rows = svc.store.query(
                f"SELECT model, sum(requests) AS requests, sum(errors) AS errors, "
                "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
                "sum(reasoning_tokens) AS reasoning_tokens, "
                "sum(cached_input_tokens) AS cached_input_tokens, sum(cost) AS cost, "
                "min(minute) AS first_minute, max(minute) AS last_minute "
                f"FROM {DB}.usage_1m WHERE consumer = {{c:String}} AND minute >= "
                f"(SELECT max(minute) FROM {DB}.usage_1m WHERE consumer = {{c:String}}) "
                "- INTERVAL 59 MINUTE GROUP BY model ORDER BY cost DESC",
                {"c": consumer_id},
            )
            open_rows = svc.store.query(
                f"SELECT count() AS n FROM {DB}.findings_latest "
                "WHERE consumer = {c:String} AND status = 'firing'", {"c": consumer_id})
        except Exception as exc:
            raise HTTPException(503, f"query failed: {_first_line(exc)}") from None
        usage = [ModelUsage.model_validate({k: r[k] for k in ModelUsage.model_fields})
                 for r in rows]
        starts = [_ts(r["first_minute"]) for r in rows]
        ends = [_ts(r["last_minute"]) for r in rows]
        entry = _blocklist(request).check(consumer=consumer_id)
        return ConsumerOut(
            consumer=consumer_id,
            window_start=min((s for s in starts if s), default=None),
            window_end=max((e for e in ends if e), default=None),
            usage=usage,
            baselines=_baselines(svc, consumer_id),
            block=_block_out(entry) if entry is not None else None,
            open_findings=int(open_rows[0]["n"]) if open_rows else 0,
        )

    @app.post("/v1/query", tags=["analyst"], response_model=QueryOut,
              summary="Run one read-only SQL statement (analyst)",
              responses={400: {"description": "not read-only, or the query failed"}})
    def post_query(body: QueryIn, svc: ServiceDep, _: AnalystAuth) -> QueryOut:
        from api.cli import check_read_only

        problem = check_read_only(body.sql)
        if problem:
            raise HTTPException(400, problem)
        try:
            cols, rows = svc.store.query_table(body.sql, readonly=True)
        except Exception as exc:
            raise HTTPException(400, f"query failed: {_first_line(exc)}") from None
        truncated = len(rows) > body.max_rows
        return QueryOut(columns=cols, rows=jsonable_encoder([list(r) for r in
                                                             rows[: body.max_rows]]),
                        truncated=truncated)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else repr(exc)


def _baselines(svc: Any, consumer: str) -> list[dict[str, Any]]:
    """Ask every detector engine of the pipeline to ``describe(consumer)``
    (when it can); a failure there never fails the request."""
    engines = getattr(svc.pipeline, "engines", None)
    if callable(engines):
        found = list(engines())
    else:
        found = list(getattr(svc.pipeline, "_engines", {}).values())
    out: list[dict[str, Any]] = []
    for eng in found:
        describe = getattr(eng, "describe", None)
        if describe is None:
            continue
        for _attempt in range(3):  # the engine may be mutating under us
            try:
                res = describe(consumer)
                break
            except RuntimeError:
                continue
            except Exception as exc:
                log.warning("describe(%s) failed: %s", consumer, exc)
                res = None
                break
        else:
            res = None
        if not res:
            continue
        if isinstance(res, list):
            out.extend(_jsonable(x) for x in res)
        else:
            out.append(_jsonable(res))
    return out


# -- wiring ------------------------------------------------------------------------------------
def _expiry_thread(svc: Any, bl: BlockList, interval_s: float = 1.0) -> None:
    stop = getattr(svc, "stop", None)
    threads = getattr(svc, "threads", None)
    if stop is None or threads is None:
        bl.start(interval_s)
        return

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                bl.expire()
            except Exception as exc:  # the store may be down: retried next tick
                log.warning("block list expiry failed: %s", exc)

    t = threading.Thread(target=loop, name="blocklist-expiry", daemon=True)
    t.start()
    threads.append(t)


def include(app: FastAPI, *, fast_path: bool = True) -> None:
    """Add the routes; called by :func:`api.app.create_app`.  ``fast_path``
    serves the gateway GETs through :class:`GatewayFastPath`."""
    svc = app.state.service
    app.state.auth = build_auth(svc.settings.auth_file)
    bl = getattr(getattr(svc, "alerting", None), "blocklist", None)
    if bl is None:
        # No alerting layer (or it has no block list): manual blocks still work,
        # and expire in a thread the service stops and joins at close().
        bl = BlockList(svc.store)
        _expiry_thread(svc, bl)
    # else: the alerting layer's tick expires blocks (check() and the
    # snapshot enforce TTLs to the millisecond in any case).
    app.state.blocklist = bl
    # Everything built so far lives as long as the process: keep it out of the
    # cyclic GC's scans, which otherwise show up as gateway tail latency.
    gc.freeze()
    _gateway_routes(app)
    if fast_path:
        app.add_middleware(GatewayFastPath, state=app.state)
    _admin_routes(app)
    _analyst_routes(app)

    @app.exception_handler(StorageError)
    async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"detail": f"storage unavailable: {exc}"}, status_code=503,
                            headers={"Retry-After": "5"})


__all__ = ["SCOPES", "include"]
