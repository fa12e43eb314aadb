"""Usage event v1: the canonical record of one model call, and its parser.

Every source (Kafka, HTTP, files, simulator) turns raw input into either an
:class:`Accepted` event or a :class:`Rejected` input with a machine-readable
reason, so that a bad message is recorded and counted instead of stopping a
partition.

>>> r = parse_event(b'{"event_id":"e1","ts":"2026-01-01T10:00:00+02:00",'
...                 b'"consumer":"app","model":"gpt-4o","status":200,"output_tokens":5}')
>>> r.event.ts.isoformat(), r.event.tenant, r.event.output_tokens
('2026-01-01T08:00:00+00:00', 'default', 5)
>>> parse_event(b'{"event_id":"e2"}').reason
'missing_field'
>>> parse_event(b'not json').reason
'invalid_json'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
MAX_LABELS = 32

# Bounded strings keep one hostile or broken gateway from filling ClickHouse
# with megabyte-long "model names".
Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256, strip_whitespace=True)]
Short = Annotated[str, StringConstraints(max_length=256)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
Count = Annotated[int, Field(ge=0, le=100_000_000)]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error", "cancelled"]


class UsageEvent(BaseModel):
    """One model call as a gateway saw it (DESIGN.md, "Usage event v1").

    Token counts follow the billing convention of the OpenAI ``usage`` object:
    ``output_tokens`` includes ``reasoning_tokens`` and ``input_tokens``
    includes ``cached_input_tokens``.  Providers that report those parts
    separately (Gemini's thoughts, Anthropic's cache reads) are normalised by
    :meth:`_normalise_token_parts`, and the correction is recorded in the
    ``labels`` under ``tokenward.normalised`` so that nothing changes silently.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Id
    ts: datetime
    consumer: Name
    model: Name
    status: Annotated[int, Field(ge=0, le=999)]
    tenant: Name = "default"
    user: Short | None = None
    client_ip: Annotated[str, StringConstraints(max_length=64)] | None = None
    gateway: Short | None = None
    provider: Short | None = None
    route: Short | None = None
    error: Short | None = None
    finish_reason: FinishReason | None = None
    input_tokens: Count = 0
    output_tokens: Count = 0
    reasoning_tokens: Count = 0
    cached_input_tokens: Count = 0
    cache_write_tokens: Count = 0
    max_output_tokens: Annotated[int, Field(ge=0, le=100_000_000)] | None = None
    latency_ms: Annotated[float, Field(ge=0, le=86_400_000)] | None = None
    ttft_ms: Annotated[float, Field(ge=0, le=86_400_000)] | None = None
    request_hash: Short | None = None
    session_id: Short | None = None
    trace_id: Short | None = None
    tool_calls: Annotated[int, Field(ge=0, le=100_000)] | None = None
    attempt: Annotated[int, Field(ge=0, le=100_000)] | None = None
    stream: bool | None = None
    cost: Annotated[float, Field(ge=0, le=1e9)] | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict)

    @field_validator("ts", mode="after")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        # A naive timestamp is taken as UTC: gateways that omit the offset
        # almost always log UTC, and guessing the server's zone would be worse.
        if v.tzinfo is None:
            return v.replace(tzinfo=UTC)
        return v.astimezone(UTC)

    @field_validator("finish_reason", mode="before")
    @classmethod
    def _finish_reason(cls, v: Any) -> Any:
        # Providers spell these differently; map the common aliases rather
        # than rejecting an otherwise good event.
        if isinstance(v, str):
            v = v.strip().lower()
            return _FINISH_ALIASES.get(v, v)
        return v

    @field_validator("labels", mode="after")
    @classmethod
    def _label_count(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels, got {len(v)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _normalise_token_parts(cls, data: Any) -> Any:
        """Make the token parts consistent with the billing convention.

        ``reasoning_tokens > output_tokens`` can only mean the provider
        reported output without the thinking (Gemini style), so the two are
        added.  ``cached_input_tokens > input_tokens`` means the same for cache
        reads (Anthropic style).  Rejecting these would lose real spend;
        clamping would under-bill.  Either fix is noted in the labels.
        """
        if not isinstance(data, dict):
            return data
        data = _fold_unknown_fields(data)
        if "reasoning_tokens" not in data and "cached_input_tokens" not in data:
            return data
        notes = []
        try:
            out = int(data.get("output_tokens") or 0)
            rsn = int(data.get("reasoning_tokens") or 0)
            inp = int(data.get("input_tokens") or 0)
            cached = int(data.get("cached_input_tokens") or 0)
        except (TypeError, ValueError):
            return data  # field validation reports the type error
        if rsn > out >= 0:
            data = {**data, "output_tokens": out + rsn}
            notes.append("reasoning_added_to_output")
        if cached > inp >= 0:
            data = {**data, "input_tokens": inp + cached}
            notes.append("cached_added_to_input")
        if notes:
            labels = dict(data.get("labels") or {})
            labels["tokenward.normalised"] = ",".join(notes)
            data = {**data, "labels": labels}
        return data

    def with_cost(self, cost: float) -> UsageEvent:
        """This event with its computed cost.  Set in place: the pipeline calls
        it right after parsing, before the event is shared with anything, and
        a full ``model_copy`` per event costs more than the parse itself."""
        self.__dict__["cost"] = cost
        return self

    @property
    def failed(self) -> bool:
        """A call that did not give the caller a usable answer."""
        return self.status == 0 or self.status >= 400 or self.finish_reason == "error"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _fold_unknown_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Keep unknown scalar fields as labels (while there is room), drop the rest.

    Gateways add fields of their own; DESIGN.md promises those are never
    fatal.  Nested objects are dropped: labels are flat strings.
    """
    if data.keys() <= _KNOWN_FIELDS:  # the common case, one C-level set test
        return data
    extra = [k for k in data if k not in _KNOWN_FIELDS]
    labels = data.get("labels") or {}
    if not isinstance(labels, dict):
        return {k: v for k, v in data.items() if k in _KNOWN_FIELDS}
    labels = dict(labels)
    for k in extra:
        v = data[k]
        if len(labels) >= MAX_LABELS or not isinstance(k, str) or len(k) > 64:
            break
        if isinstance(v, str | int | float | bool) and k not in labels:
            labels[k] = str(v)[:256]
    out = {k: v for k, v in data.items() if k in _KNOWN_FIELDS}
    out["labels"] = labels
    return out


_FINISH_ALIASES = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "completed": "stop",
    "max_tokens": "length",
    "max_output_tokens": "length",
    "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "safety": "content_filter",
    "refusal": "content_filter",
    "canceled": "cancelled",
}

_KNOWN_FIELDS = frozenset(UsageEvent.model_fields)

# Every reason a raw input can be rejected for; metrics and the
# rejected_events table use these exact strings.
REJECT_REASONS = (
    "too_large",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "invalid_type",
    "invalid_value",
    "too_many_labels",
    "unknown_format",
)


@dataclass(frozen=True, slots=True)
class Accepted:
    event: UsageEvent
    ok: Literal[True] = True


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str
    raw: str
    ok: Literal[False] = False
    event_id: str | None = None


ParseResult = Accepted | Rejected


def _truncate(raw: bytes | str, limit: int = 4096) -> str:
    if isinstance(raw, bytes):
        raw = raw[:limit].decode("utf-8", errors="replace")
    return raw[:limit]


def classify_validation_error(exc: ValidationError) -> tuple[str, str]:
    """Map pydantic's first error to one of :data:`REJECT_REASONS`."""
    errs = exc.errors(include_url=False)
    if errs:
        loc = ".".join(str(p) for p in errs[0]["loc"])
        typ, msg = errs[0]["type"], errs[0]["msg"]
    else:
        loc, typ, msg = "", "value_error", str(exc)
    detail = f"{loc}: {msg}" if loc else msg
    if len(errs) > 1:
        detail += f" (and {len(errs) - 1} more)"
    if typ == "missing":
        return "missing_field", detail
    if loc == "labels" and f"at most {MAX_LABELS} labels" in msg:
        return "too_many_labels", detail
    if typ.endswith("_type") or typ.endswith("_parsing") or typ in ("model_type", "dict_type"):
        return "invalid_type", detail
    return "invalid_value", detail


def _event_id_of(obj: Any) -> str | None:
    if isinstance(obj, dict):
        v = obj.get("event_id")
        if isinstance(v, str):
            return v[:128]
    return None


def validate_event(obj: Any, raw: bytes | str | None = None) -> ParseResult:
    """Validate an already-decoded JSON object in the canonical format."""
    if not isinstance(obj, dict):
        return Rejected("not_an_object", f"expected a JSON object, got {type(obj).__name__}",
                        _truncate(raw if raw is not None else json.dumps(obj, default=str)))
    try:
        return Accepted(UsageEvent.model_validate(obj))
    except ValidationError as exc:
        reason, detail = classify_validation_error(exc)
        text = raw if raw is not None else json.dumps(obj, default=str)
        return Rejected(reason, detail, _truncate(text), event_id=_event_id_of(obj))


def parse_event(raw: bytes | str) -> ParseResult:
    """Parse one raw canonical event (one JSON object)."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_EVENT_BYTES:
        return Rejected("too_large", f"{size} bytes > {MAX_EVENT_BYTES}", _truncate(raw))
    try:
        # The common case in one step: pydantic-core parses and validates.
        return Accepted(UsageEvent.model_validate_json(raw))
    except ValidationError:
        pass  # the slower path below names the precise reason
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Rejected("invalid_json", str(exc)[:200], _truncate(raw))
    return validate_event(obj, raw)


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of usage event v1 (``tokenward schema``)."""
    schema = UsageEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://tokenward.dev/schema/usage-event-v1.json"
    schema["title"] = "tokenward usage event v1"
    schema["description"] = (
        "One model call as an LLM gateway saw it. output_tokens includes reasoning_tokens; "
        "input_tokens includes cached_input_tokens. Raw events are limited to "
        f"{MAX_EVENT_BYTES} bytes and {MAX_LABELS} labels."
    )
    return schema
