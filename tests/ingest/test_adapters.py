"""Adapters from gateway formats to usage event v1.

Every sample payload below is shaped as the format's public documentation or
source shows it; the comment above each says where the shape comes from.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from ingest.adapters import (
    FORMATS,
    AdapterError,
    derive_event_id,
    detect_format,
    parse_any,
    to_canonical,
)
from ingest.event import MAX_EVENT_BYTES, Accepted, Rejected, UsageEvent, parse_event

# -- OpenAI --------------------------------------------------------------------
# OpenAI API reference, "Create chat completion" -> response example
# (https://platform.openai.com/docs/api-reference/chat/object); cached and
# reasoning counts set non-zero to exercise the *_details objects.
OPENAI_CHAT: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "The image shows a wooden boardwalk.",
                    "refusal": None, "annotations": []},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 10, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

# OpenAI API reference, "Responses" -> "The response object"
# (https://platform.openai.com/docs/api-reference/responses/object).
OPENAI_RESPONSE: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "o4-mini-2025-04-16",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
         "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "The image depicts a scenic landscape.",
                      "annotations": []}]},
    ],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": "medium", "summary": None},
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 32},
        "total_tokens": 380,
    },
    "user": None,
    "metadata": {},
}

# -- Anthropic -----------------------------------------------------------------
# Anthropic Messages API, response example and the prompt-caching usage fields
# (https://docs.anthropic.com/en/api/messages,
#  https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching).
ANTHROPIC_MESSAGE: dict[str, Any] = {
    "content": [{"text": "Hi! My name is Claude.", "type": "text"},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
                 "name": "get_weather", "input": {"location": "San Francisco, CA"}}],
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "model": "claude-sonnet-4-5-20250929",
    "role": "assistant",
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "type": "message",
    "usage": {"input_tokens": 2095, "output_tokens": 503,
              "cache_creation_input_tokens": 2051, "cache_read_input_tokens": 1800},
}

# Anthropic API "Errors" page: error body shape
# (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR: dict[str, Any] = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded"},
    "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
}

# -- OpenTelemetry -------------------------------------------------------------
# OTLP/JSON encoding as in opentelemetry-proto examples/trace.json, carrying the
# GenAI semantic-convention attributes of an inference span
# (https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/): span name
# "{gen_ai.operation.name} {gen_ai.request.model}", int64 values as strings.
OTLP_EXPORT: dict[str, Any] = {
    "resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "support-bot"}}]},
        "scopeSpans": [{
            "scope": {"name": "opentelemetry.instrumentation.openai_v2", "version": "2.1b0"},
            "spans": [{
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174",
                "parentSpanId": "eee19b7ec3c1b173",
                "name": "chat gpt-4o",
                "startTimeUnixNano": "1735732800000000000",
                "endTimeUnixNano": "1735732801500000000",
                "kind": 3,
                "attributes": [
                    {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                    {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
                    {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}},
                    {"key": "gen_ai.request.max_tokens", "value": {"intValue": "200"}},
                    {"key": "gen_ai.response.id",
                     "value": {"stringValue": "chatcmpl-9J3uIL87gldCFtiIbyaOvTeYBRA3l"}},
                    {"key": "gen_ai.response.model",
                     "value": {"stringValue": "gpt-4o-2024-08-06"}},
                    {"key": "gen_ai.response.finish_reasons",
                     "value": {"arrayValue": {"values": [{"stringValue": "stop"}]}}},
                    {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "97"}},
                    {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "52"}},
                    {"key": "gen_ai.usage.cache_read.input_tokens",
                     "value": {"intValue": "64"}},
                    {"key": "gen_ai.conversation.id", "value": {"stringValue": "conv_5j66"}},
                    {"key": "server.address", "value": {"stringValue": "api.openai.com"}},
                ],
                "status": {},
            }],
        }],
    }],
}

# GenAI semconv, OpenAI "chat completion" example attributes, flat (what
# an exporter's span.attributes dict holds), older prompt/completion names
# (semconv <= 1.26: gen_ai.system, gen_ai.usage.prompt_tokens/completion_tokens).
OTEL_FLAT_OLD: dict[str, Any] = {
    "gen_ai.system": "openai",
    "gen_ai.request.model": "gpt-4",
    "gen_ai.request.max_tokens": 200,
    "gen_ai.response.id": "chatcmpl-9J3uIL87gldCFtiIbyaOvTeYBRA3l",
    "gen_ai.response.model": "gpt-4-0613",
    "gen_ai.usage.completion_tokens": 47,
    "gen_ai.usage.prompt_tokens": 52,
    "gen_ai.response.finish_reasons": ["stop"],
}

# -- LiteLLM -------------------------------------------------------------------
# LiteLLM StandardLoggingPayload (docs/my-website/docs/proxy/logging_spec.md,
# litellm/types/utils.py): every field name below is from that spec.
LITELLM_SUCCESS: dict[str, Any] = {
    "id": "chatcmpl-2299b6a3-8f9a-4f5e-a5c2-7f7e8a8a8e8e",
    "trace_id": "97a3b2e4-2ad8-4c69-8d8e-4e7a9f0b1c2d",
    "call_type": "acompletion",
    "response_cost": 0.0001235,
    "response_cost_failure_debug_info": None,
    "status": "success",
    "total_tokens": 30,
    "prompt_tokens": 10,
    "completion_tokens": 20,
    "startTime": 1735732800.125,
    "endTime": 1735732801.625,
    "completionStartTime": 1735732800.425,
    "response_time": 1.5,
    "model_map_information": {"model_map_key": "gpt-4o", "model_map_value": None},
    "model": "gpt-4o",
    "model_id": "3c2a0c0f0e1b",
    "model_group": "gpt-4o-prod",
    "custom_llm_provider": "openai",
    "api_base": "https://api.openai.com/v1/",
    "metadata": {
        "user_api_key_hash": "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b",
        "user_api_key_alias": "prod-chatbot",
        "user_api_key_org_id": None,
        "user_api_key_team_id": "team-123",
        "user_api_key_user_id": "user-456",
        "user_api_key_team_alias": "search-team",
        "spend_logs_metadata": None,
        "requester_ip_address": "10.0.0.7",
        "requester_metadata": {},
    },
    "cache_hit": False,
    "cache_key": None,
    "saved_cache_cost": 0.0,
    "request_tags": [],
    "end_user": "customer-42",
    "requester_ip_address": "10.0.0.7",
    "messages": [{"role": "user", "content": "hi"}],
    "response": {
        "id": "chatcmpl-2299b6a3", "object": "chat.completion", "created": 1735732801,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"finish_reason": "stop", "index": 0,
                     "message": {"content": "hello", "role": "assistant"}}],
        "usage": {"completion_tokens": 20, "prompt_tokens": 10, "total_tokens": 30,
                  "prompt_tokens_details": {"cached_tokens": 4}},
    },
    "error_str": None,
    "error_information": {"error_code": "", "error_class": "", "llm_provider": ""},
    "model_parameters": {"max_tokens": 256, "stream": False},
    "hidden_params": {"model_id": "3c2a0c0f0e1b", "cache_key": None,
                      "api_base": "https://api.openai.com/v1/", "response_cost": "0.0001235",
                      "additional_headers": {}},
}


def _litellm_failure(error_code: str, error_class: str, error_str: str) -> dict[str, Any]:
    # StandardLoggingPayloadErrorInformation: error_code (eg. "429"), error_class
    # (eg. "RateLimitError"), llm_provider.
    p = copy.deepcopy(LITELLM_SUCCESS)
    p.update(status="failure", response=None, response_cost=0.0, prompt_tokens=0,
             completion_tokens=0, total_tokens=0, error_str=error_str,
             error_information={"error_code": error_code, "error_class": error_class,
                                "llm_provider": "openai"})
    return p


# -- Higress -------------------------------------------------------------------
# Higress ai-statistics README (plugins/wasm-go/extensions/ai-statistics): the
# access log gets '{"ai_log":"%FILTER_STATE(wasm.ai_log:PLAIN)%"}', a JSON
# *string*; the other fields are Higress's default JSON access-log format
# (https://higress.cn/en/docs/latest/ops/log). consumer comes from the
# x-mse-consumer attribute the README configures.
HIGRESS_AI_LOG: dict[str, Any] = {
    "model": "qwen-turbo",
    "input_token": "10",
    "output_token": "69",
    "llm_first_token_duration": "309",
    "llm_service_duration": "1955",
    "response_type": "stream",
    "chat_id": "chatcmpl-4f1b0c2e",
    "chat_round": 2,
    "consumer": "consumer-a",
}
HIGRESS_ACCESS: dict[str, Any] = {
    "ai_log": json.dumps(HIGRESS_AI_LOG),
    "authority": "dashscope.aliyuncs.com",
    "bytes_received": "336",
    "bytes_sent": "1675",
    "downstream_local_address": "10.1.0.12:80",
    "downstream_remote_address": "10.1.0.1:51334",
    "duration": "1990",
    "method": "POST",
    "path": "/v1/chat/completions",
    "protocol": "HTTP/1.1",
    "request_id": "5895f5a9-e4e3-425b-98db-6c6a926195b7",
    "requested_server_name": "-",
    "response_code": "200",
    "response_flags": "-",
    "route_name": "ai-route-aliyun.internal",
    "start_time": "2024-06-18T09:37:14.078Z",
    "trace_id": "-",
    "upstream_cluster": "outbound|443||llm-aliyun.internal.dns",
    "upstream_host": "47.93.243.91:443",
    "upstream_local_address": "10.1.0.12:40244",
    "upstream_service_time": "496",
    "upstream_transport_failure_reason": "-",
    "user_agent": "PostmanRuntime/7.37.3",
    "x_forwarded_for": "203.0.113.9, 10.0.0.1",
}

# Higress PR #3424 token details (.claude/skills/agent-session-monitor/
# TOKEN_DETAILS.md in alibaba/higress): cached and reasoning tokens, and the
# *_token_details objects as JSON strings; numbers as JSON numbers.
HIGRESS_AI_LOG_DETAILS: dict[str, Any] = {
    "session_id": "agent:main:discord:123",
    "model": "gpt-4o",
    "input_token": 150,
    "output_token": 100,
    "reasoning_tokens": 0,
    "cached_tokens": 120,
    "input_token_details": "{\"cached_tokens\":120}",
    "output_token_details": "{}",
}

TS = "2026-01-01T00:00:00Z"
DEFAULTS = {"consumer": "default-consumer", "ts": TS}


def _accept(raw: Any, **kw: Any) -> UsageEvent:
    r = parse_any(json.dumps(raw) if not isinstance(raw, bytes | str) else raw, **kw)
    assert isinstance(r, Accepted), r
    return r.event


# ================================================================= detection
@pytest.mark.parametrize(("payload", "fmt"), [
    (OPENAI_CHAT, "openai"),
    (OPENAI_RESPONSE, "openai"),
    (OPENAI_CHAT["usage"], "openai"),
    (OPENAI_RESPONSE["usage"], "openai"),
    ({"response": OPENAI_CHAT, "consumer": "c", "ts": TS}, "openai"),
    (ANTHROPIC_MESSAGE, "anthropic"),
    (ANTHROPIC_MESSAGE["usage"], "anthropic"),
    ({"input_tokens": 5, "output_tokens": 7}, "anthropic"),
    (ANTHROPIC_ERROR, "anthropic"),
    (OTLP_EXPORT, "otel"),
    (OTLP_EXPORT["resourceSpans"][0]["scopeSpans"][0]["spans"][0], "otel"),
    (OTEL_FLAT_OLD, "otel"),
    (LITELLM_SUCCESS, "litellm"),
    ({"standard_logging_object": LITELLM_SUCCESS}, "litellm"),
    (HIGRESS_ACCESS, "higress"),
    (HIGRESS_AI_LOG, "higress"),
    ({"event_id": "e1", "ts": TS, "consumer": "c", "model": "m", "status": 200}, "canonical"),
    ({"hello": "world"}, "unknown"),
    ([1, 2], "unknown"),
])
def test_detect_format(payload: Any, fmt: str) -> None:
    assert detect_format(payload) == fmt
    assert fmt in (*FORMATS, "unknown")


# ================================================================= OpenAI
def test_openai_chat_completion() -> None:
    e = _accept(OPENAI_CHAT, defaults={"consumer": "app"})
    assert e.event_id == "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
    assert e.model == "gpt-4o-2024-08-06"
    assert e.ts == datetime.fromtimestamp(1741570283, UTC)
    assert (e.input_tokens, e.cached_input_tokens, e.output_tokens, e.reasoning_tokens) == \
        (1117, 1024, 46, 10)
    assert e.status == 200 and e.finish_reason == "stop" and e.tool_calls == 0
    assert e.consumer == "app"


def test_openai_responses_object() -> None:
    e = _accept(OPENAI_RESPONSE, defaults={"consumer": "app"})
    assert e.event_id.startswith("resp_")
    assert (e.input_tokens, e.cached_input_tokens, e.output_tokens, e.reasoning_tokens) == \
        (328, 128, 52, 32)
    assert e.finish_reason == "stop" and e.status == 200
    assert e.ts == datetime.fromtimestamp(1741476777, UTC)


def test_openai_responses_incomplete_and_failed() -> None:
    inc = {**OPENAI_RESPONSE, "status": "incomplete",
           "incomplete_details": {"reason": "max_output_tokens"}}
    assert _accept(inc, defaults={"consumer": "a"}).finish_reason == "length"
    failed = {**OPENAI_RESPONSE, "status": "failed",
              "error": {"code": "rate_limit_exceeded", "message": "slow down"}}
    e = _accept(failed, defaults={"consumer": "a"})
    assert (e.status, e.error, e.finish_reason) == (429, "rate_limited", "error")
    assert e.failed
    pending = {**OPENAI_RESPONSE, "status": "in_progress", "usage": None}
    r = parse_any(json.dumps(pending), defaults={"consumer": "a"})
    assert isinstance(r, Rejected) and r.reason == "invalid_value"


def test_openai_bare_usage_needs_defaults() -> None:
    usage = OPENAI_CHAT["usage"]
    e = _accept(usage, defaults={"consumer": "app", "model": "gpt-4o", "ts": TS})
    assert (e.input_tokens, e.cached_input_tokens, e.status) == (1117, 1024, 200)
    r = parse_any(json.dumps(usage), defaults={"consumer": "app", "model": "gpt-4o"})
    assert isinstance(r, Rejected) and r.reason == "missing_field" and "ts" in r.detail


def test_openai_envelope_fields_override() -> None:
    env = {"response": OPENAI_CHAT, "consumer": "key-7", "tenant": "acme",
           "ts": "2026-02-02T10:00:00Z", "latency_ms": 812.5, "labels": {"region": "eu"}}
    e = _accept(env, defaults={"consumer": "ignored"})
    assert (e.consumer, e.tenant, e.latency_ms) == ("key-7", "acme", 812.5)
    assert e.ts == datetime(2026, 2, 2, 10, tzinfo=UTC)
    assert e.labels["region"] == "eu"
    assert e.event_id == OPENAI_CHAT["id"]


def test_openai_tool_calls_counted() -> None:
    resp = copy.deepcopy(OPENAI_CHAT)
    resp["choices"][0]["finish_reason"] = "tool_calls"
    resp["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    e = _accept(resp, defaults={"consumer": "a"})
    assert (e.tool_calls, e.finish_reason) == (2, "tool_calls")


# ================================================================= Anthropic
def test_anthropic_message_adds_cache_tokens_to_input() -> None:
    e = _accept(ANTHROPIC_MESSAGE, defaults=DEFAULTS)
    u = ANTHROPIC_MESSAGE["usage"]
    assert e.input_tokens == u["input_tokens"] + u["cache_read_input_tokens"] \
        + u["cache_creation_input_tokens"]
    assert e.cached_input_tokens == 1800 and e.cache_write_tokens == 2051
    assert e.output_tokens == 503
    assert (e.finish_reason, e.tool_calls, e.status) == ("tool_calls", 1, 200)
    assert e.event_id == "msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert "tokenward.normalised" not in e.labels  # already consistent: nothing to fix


def test_anthropic_without_time_is_rejected_not_stamped() -> None:
    r = parse_any(json.dumps(ANTHROPIC_MESSAGE), defaults={"consumer": "app"})
    assert isinstance(r, Rejected) and r.reason == "missing_field"


def test_anthropic_error_body() -> None:
    e = _accept(ANTHROPIC_ERROR, defaults={**DEFAULTS, "model": "claude-opus-4-1"})
    assert (e.status, e.error, e.finish_reason) == (529, "upstream_5xx", "error")
    assert e.event_id == "req_011CSHoEeqs5C35K2UUqR7Fy"


def test_anthropic_unknown_stop_reason_kept_in_labels() -> None:
    msg = {**ANTHROPIC_MESSAGE, "stop_reason": "model_context_window_exceeded_v9"}
    e = _accept(msg, defaults=DEFAULTS)
    assert e.finish_reason is None
    assert e.labels["finish_reason_raw"] == "model_context_window_exceeded_v9"


# ================================================================= OpenTelemetry
def test_otel_otlp_export() -> None:
    e = _accept(OTLP_EXPORT)
    assert e.event_id == "5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"
    assert e.trace_id == "5b8efff798038103d269b633813fc60c"
    assert e.consumer == "support-bot"  # resource service.name
    assert e.model == "gpt-4o" and e.provider == "openai"
    assert (e.input_tokens, e.output_tokens, e.cached_input_tokens) == (97, 52, 64)
    assert e.max_output_tokens == 200 and e.finish_reason == "stop"
    assert e.session_id == "conv_5j66"
    assert e.ts == datetime(2025, 1, 1, 12, 0, 1, 500000, tzinfo=UTC)
    assert e.latency_ms == pytest.approx(1500.0)
    assert e.status == 200
    assert e.labels["response_model"] == "gpt-4o-2024-08-06"


def test_otel_single_span_and_error() -> None:
    span = copy.deepcopy(OTLP_EXPORT["resourceSpans"][0]["scopeSpans"][0]["spans"][0])
    span["attributes"].append({"key": "error.type", "value": {"stringValue": "timeout"}})
    span["status"] = {"code": 2, "message": "Request timed out."}
    e = _accept(span, defaults={"consumer": "svc"})
    assert (e.status, e.error) == (0, "timeout")
    assert e.consumer == "svc"
    span["attributes"].append({"key": "http.response.status_code", "value": {"intValue": "429"}})
    span["attributes"][-2] = {"key": "error.type", "value": {"stringValue": "429"}}
    e = _accept(span, defaults={"consumer": "svc"})
    assert (e.status, e.error) == (429, "rate_limited")


def test_otel_flat_attributes_old_names() -> None:
    e = _accept(OTEL_FLAT_OLD, defaults=DEFAULTS)
    assert (e.input_tokens, e.output_tokens) == (52, 47)
    assert e.provider == "openai" and e.model == "gpt-4" and e.finish_reason == "stop"
    r = parse_any(json.dumps(OTEL_FLAT_OLD), defaults={"consumer": "c"})
    assert isinstance(r, Rejected) and r.reason == "missing_field"  # no time anywhere


def test_otel_export_with_two_spans_rejected() -> None:
    two = copy.deepcopy(OTLP_EXPORT)
    spans = two["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans.append(copy.deepcopy(spans[0]))
    r = parse_any(json.dumps(two))
    assert isinstance(r, Rejected) and r.reason == "invalid_value"


# ================================================================= LiteLLM
def test_litellm_success() -> None:
    e = _accept(LITELLM_SUCCESS)
    assert e.event_id == LITELLM_SUCCESS["id"]
    assert e.consumer == "prod-chatbot" and e.tenant == "search-team"
    assert e.user == "customer-42" and e.client_ip == "10.0.0.7"
    assert e.model == "gpt-4o-prod" and e.labels["upstream_model"] == "gpt-4o"
    assert e.provider == "openai" and e.gateway == "litellm"
    assert (e.input_tokens, e.output_tokens, e.cached_input_tokens) == (10, 20, 4)
    assert e.cost == pytest.approx(0.0001235)
    assert e.ts == datetime.fromtimestamp(1735732801.625, UTC)
    assert e.latency_ms == pytest.approx(1500.0)
    assert e.ttft_ms == pytest.approx(300.0)
    assert (e.status, e.finish_reason, e.max_output_tokens, e.stream) == (200, "stop", 256, False)


def test_litellm_consumer_falls_back_to_key_hash_and_team_id() -> None:
    p = copy.deepcopy(LITELLM_SUCCESS)
    p["metadata"]["user_api_key_alias"] = None
    p["metadata"]["user_api_key_team_alias"] = None
    e = _accept(p)
    assert e.consumer == p["metadata"]["user_api_key_hash"]
    assert e.tenant == "team-123"


@pytest.mark.parametrize(("code", "klass", "status", "error"), [
    ("429", "RateLimitError", 429, "rate_limited"),
    ("500", "InternalServerError", 500, "upstream_5xx"),
    ("408", "Timeout", 0, "timeout"),
    ("", "APIConnectionError", 0, "connect_error"),
    ("400", "ContextWindowExceededError", 400, "context_window_exceeded"),
])
def test_litellm_failures(code: str, klass: str, status: int, error: str) -> None:
    e = _accept(_litellm_failure(code, klass, f"litellm.{klass}: upstream said no"))
    assert (e.status, e.error, e.finish_reason) == (status, error, "error")
    assert e.failed


def test_litellm_wrapped_in_kwargs() -> None:
    e = _accept({"standard_logging_object": LITELLM_SUCCESS})
    assert e.event_id == LITELLM_SUCCESS["id"]


# ================================================================= Higress
def test_higress_access_log_line() -> None:
    e = _accept(HIGRESS_ACCESS)
    assert e.event_id == "5895f5a9-e4e3-425b-98db-6c6a926195b7"  # request_id
    assert e.model == "qwen-turbo" and e.consumer == "consumer-a"
    assert (e.input_tokens, e.output_tokens) == (10, 69)
    assert (e.ttft_ms, e.latency_ms, e.stream) == (309.0, 1955.0, True)
    # start_time + duration: when the call finished
    assert e.ts == datetime(2024, 6, 18, 9, 37, 16, 68000, tzinfo=UTC)
    assert e.status == 200 and e.gateway == "higress"
    assert e.route == "ai-route-aliyun.internal"
    assert e.client_ip == "203.0.113.9"
    assert e.trace_id is None  # "-" means empty
    assert e.labels["upstream_cluster"] == "outbound|443||llm-aliyun.internal.dns"
    assert e.labels["chat_round"] == "2"


def test_higress_ai_log_object_with_token_details() -> None:
    e = _accept(HIGRESS_AI_LOG_DETAILS, defaults=DEFAULTS)
    assert (e.input_tokens, e.cached_input_tokens, e.output_tokens) == (150, 120, 100)
    assert e.session_id == "agent:main:discord:123"
    assert e.status == 200  # ai_log alone: answered call unless defaults say otherwise
    e2 = _accept(HIGRESS_AI_LOG_DETAILS, defaults={**DEFAULTS, "status": 503})
    assert e2.status == 503


def test_higress_upstream_timeout() -> None:
    line = {**HIGRESS_ACCESS, "response_code": "504", "response_flags": "UT",
            "ai_log": json.dumps({"model": "qwen-max", "consumer": "consumer-a"})}
    e = _accept(line)
    assert (e.status, e.error) == (0, "timeout")
    assert e.failed


def test_higress_ai_log_not_json() -> None:
    r = parse_any(json.dumps({**HIGRESS_ACCESS, "ai_log": "{broken"}))
    assert isinstance(r, Rejected) and r.reason == "invalid_value"


# ================================================================= common rules
def test_deterministic_event_ids() -> None:
    usage = {"input_tokens": 5, "output_tokens": 7}  # Anthropic usage: no id of its own
    a = _accept(usage, defaults={"consumer": "c", "model": "claude-haiku-4-5", "ts": TS})
    b = _accept(json.dumps(usage, indent=2), defaults={"consumer": "c",
                                                      "model": "claude-haiku-4-5", "ts": TS})
    assert a.event_id == b.event_id  # same record, other whitespace
    assert a.event_id.startswith("anthropic-")
    c = _accept({"input_tokens": 5, "output_tokens": 8},
                defaults={"consumer": "c", "model": "claude-haiku-4-5", "ts": TS})
    assert c.event_id != a.event_id
    d = _accept(usage, defaults={"consumer": "other", "model": "claude-haiku-4-5", "ts": TS})
    assert d.event_id != a.event_id  # same usage object, another caller: another call
    line = {**HIGRESS_ACCESS, "request_id": "-"}
    assert _accept(line).event_id == _accept(line).event_id == derive_event_id(line, "higress")
    assert derive_event_id({"b": 1, "a": 2}, "x") == derive_event_id({"a": 2, "b": 1}, "x")


def test_format_identity_beats_defaults() -> None:
    e = _accept(LITELLM_SUCCESS, defaults={"consumer": "fallback", "tenant": "t0"})
    assert (e.consumer, e.tenant) == ("prod-chatbot", "search-team")


def test_unknown_format_rejected() -> None:
    r = parse_any(b'{"hello": "world"}')
    assert isinstance(r, Rejected) and r.reason == "unknown_format"
    r = parse_any(json.dumps(OPENAI_CHAT), fmt="grpc-log")
    assert isinstance(r, Rejected) and r.reason == "unknown_format"
    with pytest.raises(AdapterError) as exc:
        to_canonical({"hello": "world"})
    assert exc.value.reason == "unknown_format"


@pytest.mark.parametrize("raw", [
    b"not json",
    b"[1, 2, 3]",
    b'{"x": "' + b"a" * MAX_EVENT_BYTES + b'"}',
    b"\xff\xfe",
])
def test_raw_errors_match_parse_event(raw: bytes) -> None:
    a, b = parse_any(raw), parse_event(raw)
    assert isinstance(a, Rejected) and isinstance(b, Rejected)
    assert (a.reason, a.detail, a.raw) == (b.reason, b.detail, b.raw)


def test_canonical_passthrough_equals_parse_event() -> None:
    raw = json.dumps({"event_id": "e1", "ts": TS, "consumer": "app", "model": "gpt-4o",
                      "status": 200, "output_tokens": 5, "labels": {"k": "v"}})
    a, b = parse_any(raw), parse_event(raw)
    assert isinstance(a, Accepted) and isinstance(b, Accepted)
    assert a.event == b.event
    r = parse_any(json.dumps({"event_id": "e2", "ts": TS, "consumer": "app"}))
    assert isinstance(r, Rejected) and r.reason == "missing_field"


def test_explicit_format_skips_detection() -> None:
    e = _accept(ANTHROPIC_MESSAGE["usage"], fmt="anthropic",
                defaults={**DEFAULTS, "model": "claude-sonnet-4-5"})
    assert e.input_tokens == 2095 + 1800 + 2051


def test_labels_capped() -> None:
    env = {"response": OPENAI_CHAT, "consumer": "c",
           "labels": {f"k{i}": str(i) for i in range(40)}}
    e = _accept(env)
    assert len(e.labels) <= 32


@pytest.mark.parametrize("payload", [
    OPENAI_CHAT, OPENAI_RESPONSE, ANTHROPIC_MESSAGE, OTLP_EXPORT, LITELLM_SUCCESS,
    HIGRESS_ACCESS, HIGRESS_AI_LOG_DETAILS, OTEL_FLAT_OLD,
])
def test_round_trip_through_canonical_json(payload: dict[str, Any]) -> None:
    """An adapted event, serialised as canonical JSON, parses back unchanged."""
    e = _accept(payload, defaults=DEFAULTS)
    again = parse_event(e.model_dump_json())
    assert isinstance(again, Accepted) and again.event == e


def _paths(o: Any, pre: tuple[Any, ...] = ()) -> Any:
    items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
    for k, v in items:
        yield (*pre, k)
        yield from _paths(v, (*pre, k))


@pytest.mark.parametrize("sample", [
    OPENAI_CHAT, OPENAI_RESPONSE, ANTHROPIC_MESSAGE, ANTHROPIC_ERROR, OTLP_EXPORT,
    OTEL_FLAT_OLD, LITELLM_SUCCESS, HIGRESS_ACCESS, HIGRESS_AI_LOG_DETAILS,
])
def test_malformed_fields_never_raise(sample: dict[str, Any]) -> None:
    """Any field replaced by a value of the wrong type gives Accepted or Rejected."""
    weird: list[Any] = [None, -5, 1.5, "x", "", [], {}, [1], {"a": 1}, True, "-", 10**30]
    for path in list(_paths(sample)):
        for w in weird:
            o = copy.deepcopy(sample)
            t = o
            for k in path[:-1]:
                t = t[k]
            t[path[-1]] = w
            r = parse_any(json.dumps(o), defaults=DEFAULTS)
            assert isinstance(r, Accepted | Rejected)
