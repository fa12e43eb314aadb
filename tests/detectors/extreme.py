"""Valid but extreme usage events, for robustness tests of the engine.

Every event passes the usage-event schema, yet the stream is what a gateway
with bugs or a hostile client could send: token counts at the schema's
limit, zero and day-long latencies, a cost of 1e9, attempt 100,000, clocks
that jump back three days or forward forty, bursts at one timestamp,
unknown models, status 0 and 999.  Deterministic for a seed.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from ingest.event import UsageEvent

_MODELS = ("gpt-4o", "o3-mini", "deepseek-reasoner", "claude-sonnet-4", "no-such-model")
# clock steps between events, seconds: mostly small (bursts at one timestamp,
# a little out of order), now and then a jump (a gateway's clock reset)
_STEPS = (0.0, 0.0, 0.0, 0.001, 0.05, 0.5, 0.5, 3.0, 60.0, -5.0)
_JUMPS = (3600.0, -3600.0, -3 * 86400.0, 40 * 86400.0)


def extreme_events(seed: int, n: int) -> list[UsageEvent]:
    """Up to ``n`` events (draws the schema rejects are skipped: a reasoning
    count past the limit can push the folded output count over it)."""
    r = random.Random(seed)
    consumers = [f"c{i}" for i in range(r.choice((1, 3, 20)))]
    hashes = [f"h{i}" for i in range(r.choice((1, 5, 50)))]
    t = datetime(2026, 1, 5, tzinfo=UTC)

    def count() -> int:
        return r.choice((0, 0, 1, 5, 100, 1000, 50_000, 100_000_000, r.randint(0, 10_000)))

    out: list[UsageEvent] = []
    for i in range(n):
        jump = r.random() < 0.002
        t += timedelta(seconds=r.choice(_JUMPS if jump else _STEPS))
        d: dict[str, Any] = dict(
            event_id=f"x{i}", ts=t, consumer=r.choice(consumers), model=r.choice(_MODELS),
            status=r.choice((200, 200, 200, 0, 429, 500, 503, 400, 999)),
            tenant=r.choice(("default", "acme")), input_tokens=count(),
            output_tokens=count(), reasoning_tokens=count(), cached_input_tokens=count(),
            finish_reason=r.choice((None, "stop", "length", "error", "tool_calls")),
            latency_ms=r.choice((None, 0.0, 1.0, 3000.0, 86_400_000.0)),
            request_hash=r.choice((None, *hashes)), session_id=r.choice((None, "s1", "s2")),
            trace_id=r.choice((None, "t1", "t2")), attempt=r.choice((None, 0, 1, 5, 100_000)),
            cost=r.choice((None, 0.0, 1e-6, 1.0, 1e9)),
            max_output_tokens=r.choice((None, 0, 4096)), tool_calls=r.choice((None, 0, 3)),
            user=r.choice((None, "u1", "u2")))
        try:
            out.append(UsageEvent(**d))
        except ValidationError:
            continue
    return out
