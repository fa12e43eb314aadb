"""Adapters: the usage records LLM gateways already emit, as usage events v1.

Supported formats (``detect_format`` tells them apart):

``canonical``
    usage event v1 itself (DESIGN.md, "Usage event v1").
``openai``
    an OpenAI ``usage`` object (Chat Completions or Responses API), a whole
    ``chat.completion`` / ``response`` object, or an envelope
    ``{"response": <that>, <canonical fields>...}``.
``anthropic``
    an Anthropic Messages ``usage`` object, a whole ``message`` (or ``error``)
    object, or the same envelope.  Anthropic's ``input_tokens`` excludes cache
    reads and writes; they are added back so that ``input_tokens`` is every
    billed prompt token.
``otel``
    OpenTelemetry GenAI semantic-convention span attributes: a flat attribute
    dict, an OTLP/JSON span (attributes as ``[{key, value: {stringValue|...}}]``),
    an OTLP/JSON export holding one span, or an SDK ``span.to_json()`` dict.
``litellm``
    LiteLLM's ``StandardLoggingPayload`` (or ``{"standard_logging_object": ...}``).
``higress``
    the Higress ``ai-statistics`` plugin log: the ``ai_log`` object, or an access
    log line whose ``ai_log`` field holds it as a JSON string.

Rules common to all formats: a record without an id gets a deterministic one
(a hash of the record), so the same log line ingested twice is stored once; a
record without a time takes the format's own timestamps, then ``defaults``, and
is otherwise rejected (``missing_field``): the wall clock is never used, so
replays are deterministic.  ``defaults`` (canonical field names) fill in what
the format lacks, typically ``consumer`` and ``ts``.

>>> r = parse_any(b'{"id": "msg_01", "type": "message", "role": "assistant",'
...               b' "model": "claude-sonnet-4-5", "stop_reason": "end_turn",'
...               b' "usage": {"input_tokens": 10, "output_tokens": 5,'
...               b' "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}}',
...               defaults={"consumer": "app", "ts": "2026-01-01T00:00:00Z"})
>>> e = r.event
>>> e.event_id, e.input_tokens, e.cached_input_tokens, e.cache_write_tokens, e.finish_reason
('msg_01', 130, 100, 20, 'stop')
>>> detect_format({"ai_log": "{\\"model\\":\\"qwen-max\\",\\"input_token\\":\\"3\\"}"})
'higress'
>>> parse_any(b'{"hello": "world"}').reason
'unknown_format'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.event import (
    MAX_EVENT_BYTES,
    MAX_LABELS,
    ParseResult,
    Rejected,
    _truncate,
    validate_event,
)

FORMATS = ("canonical", "openai", "anthropic", "otel", "litellm", "higress")

_CANONICAL_FIELDS = frozenset({
    "event_id", "ts", "consumer", "model", "status", "tenant", "user", "client_ip", "gateway",
    "provider", "route", "error", "finish_reason", "input_tokens", "output_tokens",
    "reasoning_tokens", "cached_input_tokens", "cache_write_tokens", "max_output_tokens",
    "latency_ms", "ttft_ms", "request_hash", "session_id", "trace_id", "tool_calls", "attempt",
    "stream", "cost", "labels",
})
_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "error", "cancelled"})
_FINISH_MAP = {
    "end_turn": "stop", "stop_sequence": "stop", "completed": "stop", "complete": "stop",
    "finish_reason_stop": "stop", "pause_turn": "stop",
    "max_tokens": "length", "max_output_tokens": "length", "model_length": "length",
    "tool_use": "tool_calls", "function_call": "tool_calls",
    "safety": "content_filter", "refusal": "content_filter", "recitation": "content_filter",
    "prohibited_content": "content_filter", "blocklist": "content_filter",
    "canceled": "cancelled", "failed": "error",
}
_OPENAI_OBJECTS = frozenset({"chat.completion", "chat.completion.chunk", "response",
                             "text_completion"})
_ANTHROPIC_ERRORS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}
_EMPTY = ("", "-", "null", "none", "undefined")
_NO_ANSWER = frozenset({"timeout", "connect_error"})


class AdapterError(ValueError):
    """An input no adapter can turn into a usage event.

    ``reason`` is one of :data:`ingest.event.REJECT_REASONS`.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- detection
def detect_format(obj: Any) -> str:
    """Name the format of a decoded record, or ``"unknown"``."""
    if not isinstance(obj, dict):
        return "unknown"
    if "ai_log" in obj:
        return "higress"
    if isinstance(obj.get("standard_logging_object"), dict) or _is_litellm(obj):
        return "litellm"
    if _is_otel(obj):
        return "otel"
    if "input_token" in obj or "output_token" in obj or "llm_service_duration" in obj:
        return "higress"
    inner = obj.get("response")
    if isinstance(inner, dict):
        fmt = _provider_format(inner)
        if fmt != "unknown":
            return fmt
    if ("event_id" in obj or "consumer" in obj or "ts" in obj) and "usage" not in obj \
            and "choices" not in obj:
        return "canonical"
    fmt = _provider_format(obj)
    if fmt != "unknown":
        return fmt
    return "unknown"


def _is_litellm(obj: Mapping[str, Any]) -> bool:
    if "call_type" in obj and ("startTime" in obj or "response_cost" in obj):
        return True
    return "startTime" in obj and "endTime" in obj and "prompt_tokens" in obj


def _is_otel(obj: Mapping[str, Any]) -> bool:
    if "resourceSpans" in obj:
        return True
    attrs = obj.get("attributes")
    if isinstance(attrs, list) and ("startTimeUnixNano" in obj or "spanId" in obj
                                    or "traceId" in obj):
        return True
    if isinstance(attrs, dict) and (any(str(k).startswith("gen_ai.") for k in attrs)
                                    or "context" in obj):
        return True
    return any(isinstance(k, str) and k.startswith("gen_ai.") for k in obj)


def _provider_format(obj: Mapping[str, Any]) -> str:
    typ = obj.get("type")
    if typ == "message":
        return "anthropic"
    err = obj.get("error")
    if typ == "error" and isinstance(err, dict) and _str(err.get("type")) in _ANTHROPIC_ERRORS:
        return "anthropic"
    if _str(obj.get("object")) in _OPENAI_OBJECTS or "choices" in obj:
        return "openai"
    usage: Mapping[str, Any] = _dict(obj.get("usage")) if "usage" in obj else obj
    if "stop_reason" in obj and "usage" in obj:
        return "anthropic"
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
        return "anthropic"
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return "openai"
    if "input_tokens" in usage and "output_tokens" in usage:
        if "total_tokens" in usage or "input_tokens_details" in usage \
                or "output_tokens_details" in usage:
            return "openai"  # Responses API
        return "anthropic"
    return "unknown"


# --------------------------------------------------------------------------- public API
def to_canonical(obj: Mapping[str, Any], fmt: str | None = None,
                 defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Turn one decoded record into a canonical usage-event dict (not yet validated).

    ``fmt`` ``None`` detects the format.  ``defaults`` (canonical field names)
    fill in fields the record lacks.  Raises :class:`AdapterError`.
    """
    if not isinstance(obj, Mapping):
        raise AdapterError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if fmt is None:
        fmt = detect_format(obj)
    adapter = _ADAPTERS.get(fmt)
    if adapter is None:
        if fmt == "unknown":
            raise AdapterError("unknown_format",
                               "not a usage event v1, OpenAI, Anthropic, OpenTelemetry GenAI, "
                               "LiteLLM or Higress ai-statistics record")
        raise AdapterError("unknown_format", f"no adapter named {fmt!r}; known: {FORMATS}")
    try:
        out = adapter(obj)
    except AdapterError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        # A field of an unexpected type deep inside a record: reject the
        # record, never stop the stream.
        raise AdapterError("invalid_type",
                           f"{fmt} record has an unexpected shape: {exc!r}"[:300]) from exc
    if fmt != "canonical" and out.get("error") in _NO_ANSWER:
        out["status"] = 0  # DESIGN.md: 0 when the gateway got no answer
    return _finish(out, obj, fmt, defaults)


def parse_any(raw: bytes | str, fmt: str | None = None,
              defaults: Mapping[str, Any] | None = None) -> ParseResult:
    """Parse one raw record of any supported format into Accepted or Rejected.

    Size and JSON errors are reported exactly as :func:`ingest.event.parse_event`
    reports them.
    """
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_EVENT_BYTES:
        return Rejected("too_large", f"{size} bytes > {MAX_EVENT_BYTES}", _truncate(raw))
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Rejected("invalid_json", str(exc)[:200], _truncate(raw))
    if not isinstance(obj, dict):
        return validate_event(obj, raw)  # the not_an_object rejection
    try:
        canon = to_canonical(obj, fmt, defaults)
    except AdapterError as exc:
        return Rejected(exc.reason, exc.detail[:500], _truncate(raw),
                        event_id=_str(obj.get("event_id") or obj.get("id")))
    return validate_event(canon, raw)


# --------------------------------------------------------------------------- finishing
def _finish(out: dict[str, Any], original: Mapping[str, Any], fmt: str,
            defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Drop empty values, apply defaults, derive an event id, cap the labels.

    Precedence, lowest first: the adapter's fallbacks, ``defaults``, what the
    record itself says, the canonical fields of an envelope around it.
    """
    envelope = out.pop("_envelope", None)
    fallback = out.pop("_fallback", None) or {}
    if fmt == "canonical":  # already canonical: validation reports what is wrong
        result = {k: v for k, v in (defaults or {}).items() if k in _CANONICAL_FIELDS}
        result.update(out)
        return result
    result = {}
    if defaults:
        for k, v in defaults.items():
            if k in _CANONICAL_FIELDS and v is not None:
                result[k] = v
    default_labels = result.pop("labels", None)
    labels: dict[str, Any] = dict(default_labels) if isinstance(default_labels, dict) else {}
    for k, v in out.items():
        if v is None or k == "labels":
            continue
        result[k] = v
    labels.update(out.get("labels") or {})
    if envelope:
        for k, v in envelope.items():
            if k == "labels" and isinstance(v, dict):
                labels.update(v)
            elif k in _CANONICAL_FIELDS and v is not None:
                result[k] = v
    for k, v in fallback.items():
        result.setdefault(k, v)
    if not result.get("event_id"):
        result["event_id"] = derive_event_id(original, fmt, defaults)
    if labels:
        # Keys the event model would reject are dropped here rather than
        # failing the whole event; counts over the limit keep the first ones.
        clean = {str(k)[:64]: ("" if v is None else str(v))[:256]
                 for k, v in labels.items() if k}
        result["labels"] = dict(list(clean.items())[:MAX_LABELS])
    return result


def derive_event_id(obj: Any, fmt: str, defaults: Mapping[str, Any] | None = None) -> str:
    """A deterministic event id: the same record always gets the same id.

    The ``defaults`` the record was completed with are part of the hash: two
    identical bare usage objects from different consumers or times are
    different calls.
    """
    subject = [obj, dict(defaults)] if defaults else obj
    blob = json.dumps(subject, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return f"{fmt}-{hashlib.sha256(blob.encode()).hexdigest()[:40]}"


# --------------------------------------------------------------------------- canonical
def _canonical(obj: Mapping[str, Any]) -> dict[str, Any]:
    return dict(obj)


# --------------------------------------------------------------------------- OpenAI
def _envelope(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    inner = obj.get("response")
    if isinstance(inner, dict) and _provider_format(inner) != "unknown":
        env = {k: v for k, v in obj.items() if k != "response"}
        return inner, env
    return obj, None


def _openai(obj: Mapping[str, Any]) -> dict[str, Any]:
    resp, env = _envelope(obj)
    usage = resp.get("usage")
    if usage is None and ("prompt_tokens" in resp or "input_tokens" in resp):
        usage = resp  # a bare usage object
    if not isinstance(usage, dict):
        if resp.get("status") in ("in_progress", "queued"):
            raise AdapterError("invalid_value",
                               f"response status {resp.get('status')!r}: call not finished")
        usage = {}
    out: dict[str, Any] = {"_envelope": env, "labels": {}}
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # Chat Completions
        out["input_tokens"] = _int(usage.get("prompt_tokens"))
        out["output_tokens"] = _int(usage.get("completion_tokens"))
        cached = _int(_get(usage, "prompt_tokens_details", "cached_tokens"))
        if cached is None:  # DeepSeek's OpenAI-compatible spelling
            cached = _int(usage.get("prompt_cache_hit_tokens"))
        out["cached_input_tokens"] = cached
        out["reasoning_tokens"] = _int(_get(usage, "completion_tokens_details",
                                            "reasoning_tokens"))
    else:  # Responses API
        out["input_tokens"] = _int(usage.get("input_tokens"))
        out["output_tokens"] = _int(usage.get("output_tokens"))
        out["cached_input_tokens"] = _int(_get(usage, "input_tokens_details", "cached_tokens"))
        out["reasoning_tokens"] = _int(_get(usage, "output_tokens_details",
                                            "reasoning_tokens"))
    if resp is usage:
        out["_fallback"] = {"status": 200}  # a usage object comes from an answered call
        return out
    out["event_id"] = _str(resp.get("id"))
    out["model"] = _str(resp.get("model"))
    out["ts"] = _epoch(resp.get("completed_at")) or _epoch(resp.get("created_at")) \
        or _epoch(resp.get("created"))
    out["user"] = _str(resp.get("user"))
    out["max_output_tokens"] = _int(resp.get("max_output_tokens"))
    obj_type = _str(resp.get("object"))
    if isinstance(resp.get("error"), dict) and obj_type is None:  # an OpenAI error body
        err = resp["error"]
        code = _str(err.get("code")) or _str(err.get("type"))
        out["status"] = _int(err.get("status")) or 500
        out["error"] = _error_kind(out["status"], code)
        out["finish_reason"] = "error"
        return out
    choices = resp.get("choices")
    if isinstance(choices, list) and choices:
        first = choices[0] if isinstance(choices[0], dict) else {}
        out["finish_reason"] = _finish_reason(first.get("finish_reason"), out["labels"])
        calls = 0
        for ch in choices:
            msg = (ch.get("message") or ch.get("delta")) if isinstance(ch, dict) else None
            if isinstance(msg, dict) and isinstance(msg.get("tool_calls"), list):
                calls += len(msg["tool_calls"])
        out["tool_calls"] = calls
        out["status"] = 200
    elif obj_type == "response" or "output" in resp:
        status = resp.get("status")
        out["status"] = 200
        items = resp.get("output")
        if isinstance(items, list):
            out["tool_calls"] = sum(1 for it in items if isinstance(it, dict)
                                    and str(it.get("type", "")).endswith("_call"))
        if status == "incomplete":
            reason = _get(resp, "incomplete_details", "reason")
            out["finish_reason"] = _finish_reason(reason, out["labels"]) or "length"
        elif status == "failed":
            code = _str(_get(resp, "error", "code"))
            out["finish_reason"] = "error"
            out["status"] = 429 if code == "rate_limit_exceeded" else 500
            out["error"] = _error_kind(out["status"], code)
        elif status in ("cancelled", "canceled"):
            out["finish_reason"] = "cancelled"
        elif status in ("in_progress", "queued"):
            raise AdapterError("invalid_value", f"response status {status!r}: call not finished")
        elif out.get("tool_calls"):
            out["finish_reason"] = "tool_calls"
        else:
            out["finish_reason"] = "stop"
    else:
        out["status"] = 200
    return out


# --------------------------------------------------------------------------- Anthropic
def _anthropic(obj: Mapping[str, Any]) -> dict[str, Any]:
    msg, env = _envelope(obj)
    out: dict[str, Any] = {"_envelope": env, "labels": {}}
    if msg.get("type") == "error" and isinstance(msg.get("error"), dict):
        etype = str(msg["error"].get("type"))
        out["status"] = _ANTHROPIC_ERRORS.get(etype, 500)
        out["error"] = _error_kind(out["status"], etype)
        out["finish_reason"] = "error"
        out["event_id"] = _str(msg.get("request_id"))
        return out
    bare = "usage" not in msg and msg.get("type") != "message"
    usage: Mapping[str, Any] = msg if bare else _dict(msg.get("usage"))
    base = _int(usage.get("input_tokens")) or 0
    read = _int(usage.get("cache_read_input_tokens")) or 0
    write = _int(usage.get("cache_creation_input_tokens")) or 0
    # Anthropic's input_tokens counts only the uncached part of the prompt.
    out["input_tokens"] = base + read + write
    out["cached_input_tokens"] = read
    out["cache_write_tokens"] = write
    out["output_tokens"] = _int(usage.get("output_tokens"))
    if bare:
        out["_fallback"] = {"status": 200}
        return out
    out["event_id"] = _str(msg.get("id"))
    out["model"] = _str(msg.get("model"))
    out["status"] = 200
    out["finish_reason"] = _finish_reason(msg.get("stop_reason"), out["labels"])
    content = msg.get("content")
    if isinstance(content, list):
        out["tool_calls"] = sum(1 for b in content if isinstance(b, dict)
                                and b.get("type") == "tool_use")
    return out


# --------------------------------------------------------------------------- OpenTelemetry
def _otlp_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:  # int64 is a JSON string in OTLP/JSON
        return _int(v["intValue"])
    if "doubleValue" in v:
        return _float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "arrayValue" in v:
        return [_otlp_value(x) for x in _list(_dict(v["arrayValue"]).get("values"))]
    if "kvlistValue" in v:
        return _otlp_attrs(_dict(v["kvlistValue"]).get("values"))
    return None


def _otlp_attrs(attrs: Any) -> dict[str, Any]:
    if isinstance(attrs, dict):
        return dict(attrs)
    out: dict[str, Any] = {}
    if isinstance(attrs, list):
        for kv in attrs:
            if isinstance(kv, dict) and isinstance(kv.get("key"), str):
                out[kv["key"]] = _otlp_value(kv.get("value"))
    return out


def _otel(obj: Mapping[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = {}
    span: Mapping[str, Any] = obj
    if "resourceSpans" in obj:  # an OTLP/JSON export: accept exactly one span
        found: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
        for rs in _list(obj.get("resourceSpans")):
            res = _otlp_attrs(_get(rs, "resource", "attributes"))
            for ss in _list(_dict(rs).get("scopeSpans")) \
                    or _list(_dict(rs).get("instrumentationLibrarySpans")):
                found.extend((res, sp) for sp in _list(_dict(ss).get("spans"))
                             if isinstance(sp, dict))
        if len(found) != 1:
            raise AdapterError("invalid_value",
                               f"OTLP export holds {len(found)} spans; send one span per event")
        resource, span = found[0]
    if "attributes" in span and isinstance(span.get("attributes"), list | dict):
        attrs = _otlp_attrs(span["attributes"])
        if isinstance(span.get("resource"), dict):  # SDK span.to_json()
            resource = {**_otlp_attrs(span["resource"].get("attributes", span["resource"])),
                        **resource}
    else:
        attrs = dict(span)
    a = attrs.get
    out: dict[str, Any] = {"labels": {}}
    out["model"] = _str(a("gen_ai.request.model")) or _str(a("gen_ai.response.model"))
    resp_model = _str(a("gen_ai.response.model"))
    if resp_model and resp_model != out["model"]:
        out["labels"]["response_model"] = resp_model
    out["provider"] = _str(a("gen_ai.provider.name")) or _str(a("gen_ai.system"))
    inp = _int(a("gen_ai.usage.input_tokens"))
    out["input_tokens"] = inp if inp is not None else _int(a("gen_ai.usage.prompt_tokens"))
    outp = _int(a("gen_ai.usage.output_tokens"))
    out["output_tokens"] = outp if outp is not None else _int(a("gen_ai.usage.completion_tokens"))
    out["cached_input_tokens"] = _int(a("gen_ai.usage.cache_read.input_tokens")) \
        or _int(a("gen_ai.usage.cache_read_input_tokens"))
    out["cache_write_tokens"] = _int(a("gen_ai.usage.cache_creation.input_tokens")) \
        or _int(a("gen_ai.usage.cache_creation_input_tokens"))
    out["reasoning_tokens"] = _int(a("gen_ai.usage.reasoning.output_tokens"))
    out["max_output_tokens"] = _int(a("gen_ai.request.max_tokens"))
    reasons = a("gen_ai.response.finish_reasons")
    if isinstance(reasons, str):
        try:
            reasons = json.loads(reasons) if reasons.startswith("[") else [reasons]
        except ValueError:
            reasons = [reasons]
    if isinstance(reasons, list) and reasons:
        out["finish_reason"] = _finish_reason(reasons[0], out["labels"])
    out["session_id"] = _str(a("gen_ai.conversation.id"))
    out["user"] = _str(a("enduser.id")) or _str(a("user.id"))
    out["client_ip"] = _str(a("client.address"))
    out["consumer"] = _str(a("tokenward.consumer")) or _str(a("consumer")) \
        or _str(resource.get("service.name")) or _str(a("service.name"))
    out["tenant"] = _str(a("tokenward.tenant")) or _str(a("tenant"))
    if a("gen_ai.response.id") is not None:
        out["labels"]["response_id"] = a("gen_ai.response.id")
    op = _str(a("gen_ai.operation.name"))
    if op:
        out["labels"]["operation"] = op

    # ids and times: OTLP/JSON, SDK to_json(), or keys next to flat attributes
    ctx = _dict(span.get("context"))
    trace = _str(span.get("traceId")) or _str(ctx.get("trace_id"))
    span_id = _str(span.get("spanId")) or _str(ctx.get("span_id"))
    out["trace_id"] = trace
    if trace and span_id:
        out["event_id"] = f"{trace}-{span_id}"
    start = _nanos(span.get("startTimeUnixNano")) or _iso(span.get("start_time"))
    end = _nanos(span.get("endTimeUnixNano")) or _iso(span.get("end_time"))
    out["ts"] = end or start
    if start and end and end >= start:
        out["latency_ms"] = (end - start).total_seconds() * 1000.0

    http_status = _int(a("http.response.status_code")) or _int(a("http.status_code"))
    err = _str(a("error.type"))
    status_obj = _dict(span.get("status"))
    code = status_obj.get("code", status_obj.get("status_code"))
    span_failed = code in (2, "2", "STATUS_CODE_ERROR", "ERROR")
    if http_status is not None:
        out["status"] = http_status
    elif err or span_failed:
        out["status"] = _status_for_error(err or _str(status_obj.get("message")))
    else:
        out["status"] = 200
    if err or span_failed or out["status"] >= 400 or out["status"] == 0:
        out["error"] = _error_kind(out["status"], err or _str(status_obj.get("message")))
    return out


# --------------------------------------------------------------------------- LiteLLM
def _litellm(obj: Mapping[str, Any]) -> dict[str, Any]:
    p: Mapping[str, Any] = obj["standard_logging_object"] \
        if isinstance(obj.get("standard_logging_object"), dict) else obj
    md = _dict(p.get("metadata"))
    hidden = _dict(p.get("hidden_params"))
    params = _dict(p.get("model_parameters"))
    resp = _dict(p.get("response"))
    usage = _dict(resp.get("usage"))
    out: dict[str, Any] = {"labels": {}, "gateway": "litellm"}
    out["event_id"] = _str(p.get("id"))
    out["trace_id"] = _str(p.get("trace_id"))
    out["consumer"] = _str(md.get("user_api_key_alias")) or _str(md.get("user_api_key_hash"))
    out["tenant"] = _str(md.get("user_api_key_team_alias")) \
        or _str(md.get("user_api_key_team_id")) or _str(md.get("user_api_key_org_id"))
    out["user"] = _str(p.get("end_user")) or _str(md.get("user_api_key_end_user_id")) \
        or _str(md.get("user_api_key_user_id"))
    out["client_ip"] = _str(p.get("requester_ip_address")) \
        or _str(md.get("requester_ip_address"))
    requested = _str(p.get("model_group")) or _str(p.get("model"))
    out["model"] = requested
    upstream = _str(p.get("model"))
    if upstream and upstream != requested:
        out["labels"]["upstream_model"] = upstream
    out["provider"] = _str(p.get("custom_llm_provider")) \
        or _str(hidden.get("custom_llm_provider")) \
        or _str(_get(p, "error_information", "llm_provider"))
    api_base = _str(p.get("api_base")) or _str(hidden.get("api_base"))
    if api_base:
        out["labels"]["api_base"] = api_base
    if p.get("call_type"):
        out["labels"]["call_type"] = p["call_type"]
    if p.get("cache_hit") is not None:
        out["labels"]["cache_hit"] = str(bool(p.get("cache_hit"))).lower()

    out["input_tokens"] = _int(p.get("prompt_tokens"))
    out["output_tokens"] = _int(p.get("completion_tokens"))
    out["cached_input_tokens"] = _int(_get(usage, "prompt_tokens_details", "cached_tokens")) \
        or _int(usage.get("cache_read_input_tokens"))
    out["cache_write_tokens"] = _int(usage.get("cache_creation_input_tokens"))
    out["reasoning_tokens"] = _int(_get(usage, "completion_tokens_details", "reasoning_tokens"))
    out["max_output_tokens"] = _int(params.get("max_tokens")) \
        or _int(params.get("max_completion_tokens"))
    if isinstance(params.get("stream"), bool):
        out["stream"] = params["stream"]
    out["cost"] = _float(p.get("response_cost"))

    start, end = _when(p.get("startTime")), _when(p.get("endTime"))
    first = _when(p.get("completionStartTime"))
    out["ts"] = end or start
    if start and end and end >= start:
        out["latency_ms"] = (end - start).total_seconds() * 1000.0
    if start and first and end and start <= first < end:
        out["ttft_ms"] = (first - start).total_seconds() * 1000.0

    choices = resp.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        out["finish_reason"] = _finish_reason(choices[0].get("finish_reason"), out["labels"])
        msg = choices[0].get("message")
        if isinstance(msg, dict) and isinstance(msg.get("tool_calls"), list):
            out["tool_calls"] = len(msg["tool_calls"])

    if p.get("status") == "failure":
        info = _dict(p.get("error_information"))
        klass = _str(info.get("error_class")) or _str(p.get("error_str"))
        code = _int(info.get("error_code"))
        out["status"] = code if code is not None and 100 <= code <= 599 \
            else _status_for_error(klass)
        out["error"] = _error_kind(out["status"], klass)
        out["finish_reason"] = "error"
    else:
        out["status"] = 200
    return out


# --------------------------------------------------------------------------- Higress
def _higress(obj: Mapping[str, Any]) -> dict[str, Any]:
    access: Mapping[str, Any] = {}
    ai: Any = obj
    if "ai_log" in obj:
        access = obj
        ai = obj["ai_log"]
        if isinstance(ai, str):
            if ai.strip() in _EMPTY:
                ai = {}
            else:
                try:
                    ai = json.loads(ai)
                except ValueError as exc:
                    raise AdapterError("invalid_value",
                                       f"ai_log is not a JSON object: {exc}") from exc
        if not isinstance(ai, dict):
            raise AdapterError("invalid_type", "ai_log must be a JSON object or a JSON string")
    a = ai.get
    out: dict[str, Any] = {"labels": {}, "gateway": "higress"}
    out["model"] = _str(a("model"))
    out["input_tokens"] = _int(a("input_token"))
    out["output_tokens"] = _int(a("output_token"))
    in_details = _json_obj(a("input_token_details"))
    out_details = _json_obj(a("output_token_details"))
    out["cached_input_tokens"] = _int(a("cached_tokens")) \
        or _int(in_details.get("cached_tokens"))
    out["reasoning_tokens"] = _int(a("reasoning_tokens")) \
        or _int(out_details.get("reasoning_tokens"))
    out["ttft_ms"] = _float(a("llm_first_token_duration"))
    out["latency_ms"] = _float(a("llm_service_duration")) or _float(access.get("duration"))
    rtype = _str(a("response_type"))
    if rtype:
        out["stream"] = rtype == "stream"
    out["session_id"] = _str(a("session_id"))
    out["consumer"] = _str(a("consumer")) or _str(access.get("consumer"))
    out["route"] = _str(access.get("route_name")) or _str(a("api")) or _str(a("route"))
    out["trace_id"] = _str(access.get("trace_id"))
    xff = _str(access.get("x_forwarded_for"))
    remote = _str(access.get("downstream_remote_address"))
    out["client_ip"] = xff.split(",")[0].strip() if xff else _host(remote)
    if a("chat_id") is not None:
        out["labels"]["chat_id"] = a("chat_id")
    if a("chat_round") is not None:
        out["labels"]["chat_round"] = a("chat_round")
    cluster = _str(access.get("upstream_cluster")) or _str(a("cluster"))
    if cluster:
        out["labels"]["upstream_cluster"] = cluster
    out["event_id"] = _str(access.get("request_id")) or _str(a("request_id"))

    start = _iso(access.get("start_time"))
    dur = _float(access.get("duration"))
    out["ts"] = start
    if start and dur is not None and 0 <= dur < 86_400_000:
        out["ts"] = start + timedelta(milliseconds=dur)
    code = _int(access.get("response_code"))
    flags = _str(access.get("response_flags"))
    if code is not None:
        out["status"] = code
        if code == 0 or code >= 400:
            out["error"] = _envoy_error(flags) or _error_kind(code, flags)
    else:
        # ai_log alone carries no status: the plugin logs it for answered
        # calls, so 200 unless the caller's defaults say otherwise.
        out["_fallback"] = {"status": 200}
    return out


_ENVOY_FLAGS = {"UT": "timeout", "SI": "timeout", "DT": "timeout", "UF": "connect_error",
                "UH": "no_healthy_upstream", "UO": "overflow", "URX": "retry_limit",
                "RL": "rate_limited", "UC": "upstream_reset", "UR": "upstream_reset",
                "DC": "client_disconnected", "LR": "upstream_reset", "NR": "no_route"}


def _envoy_error(flags: str | None) -> str | None:
    if not flags:
        return None
    for f in flags.split(","):
        if f.strip() in _ENVOY_FLAGS:
            return _ENVOY_FLAGS[f.strip()]
    return None


# --------------------------------------------------------------------------- helpers
def _get(obj: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _str(v: Any) -> str | None:
    if v is None or isinstance(v, dict | list):
        return None
    s = str(v).strip()
    return None if s.lower() in _EMPTY else s


def _int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        f = float(str(v).strip())
    except ValueError:
        return None
    return int(f) if f == f and abs(f) != float("inf") else None


def _float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(str(v).strip()) if not isinstance(v, int | float) else float(v)
    except ValueError:
        return None
    return f if f == f and abs(f) != float("inf") else None


def _json_obj(v: Any) -> dict[str, Any]:
    if isinstance(v, dict):
        return v
    if isinstance(v, str) and v.strip().startswith("{"):
        try:
            d = json.loads(v)
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}
    return {}


def _epoch(v: Any) -> datetime | None:
    f = _float(v)
    if f is None or f <= 0:
        return None
    if f > 1e14:  # nanoseconds
        f /= 1e9
    elif f > 1e11:  # milliseconds
        f /= 1e3
    try:
        return datetime.fromtimestamp(f, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _nanos(v: Any) -> datetime | None:
    n = _int(v)
    if not n or n <= 0:
        return None
    try:
        return datetime.fromtimestamp(n // 1_000_000_000, UTC) + timedelta(
            microseconds=(n % 1_000_000_000) // 1000)
    except (OverflowError, OSError, ValueError):
        return None


def _iso(v: Any) -> datetime | None:
    s = _str(v)
    if not s:
        return None
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def _when(v: Any) -> datetime | None:
    """Epoch seconds (LiteLLM's floats) or an ISO string."""
    if isinstance(v, str) and not v.strip().replace(".", "", 1).isdigit():
        return _iso(v)
    return _epoch(v)


def _host(addr: str | None) -> str | None:
    if not addr:
        return None
    if addr.startswith("["):  # [::1]:1234
        return addr[1:addr.index("]")] if "]" in addr else addr
    return addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr


def _finish_reason(v: Any, labels: dict[str, Any]) -> str | None:
    s = _str(v)
    if s is None:
        return None
    low = s.lower()
    low = _FINISH_MAP.get(low, low)
    if low in _FINISH:
        return low
    labels["finish_reason_raw"] = s  # an unknown spelling is kept, never fatal
    return None


def _status_for_error(text: str | None) -> int:
    """HTTP status for an error known only by name: 0 when no answer came back."""
    kind = _error_kind(None, text)
    if kind in ("timeout", "connect_error"):
        return 0
    return {"rate_limited": 429, "auth": 401, "bad_request": 400,
            "context_window_exceeded": 400, "content_filter": 400, "not_found": 404}.get(
        kind or "", 500)


def _error_kind(status: int | None, text: str | None) -> str | None:
    """A short error class (``timeout``, ``rate_limited``, ``upstream_5xx``, ...)."""
    t = (text or "").lower().replace("_", "").replace(" ", "").replace("-", "")
    if "timeout" in t or "timedout" in t or "deadline" in t:
        return "timeout"
    if "connect" in t or "connectionerror" in t or "unreachable" in t:
        return "connect_error"
    if status == 429 or "ratelimit" in t or "toomanyrequests" in t:
        return "rate_limited"
    if "contextwindow" in t or "contextlength" in t or "toolong" in t:
        return "context_window_exceeded"
    if "contentpolicy" in t or "contentfilter" in t or "safety" in t:
        return "content_filter"
    if status in (401, 403) or "auth" in t or "permission" in t:
        return "auth"
    if status == 404 or "notfound" in t:
        return "not_found"
    if (status is not None and status >= 500) or "overloaded" in t or "internalserver" in t \
            or "serviceunavailable" in t or "apierror" in t or "badgateway" in t:
        return "upstream_5xx"
    if (status is not None and 400 <= status < 500) or "badrequest" in t or "invalid" in t:
        return "bad_request"
    return (text or "")[:64] or None


_ADAPTERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "canonical": _canonical,
    "openai": _openai,
    "anthropic": _anthropic,
    "otel": _otel,
    "litellm": _litellm,
    "higress": _higress,
}
