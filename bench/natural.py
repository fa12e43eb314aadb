"""Unlabelled anomalies of the normal traffic itself, as weak labels.

A generator labels what it injects; its *normal* traffic, when it is built
from real traces, holds anomalies of the same kinds that nobody labelled: the
ServeGen clients' own 10-minute surges to 10-100x their previous hour, and the
deepseek-r1 clients' own 25-minute, 30k-token thoughts that hit the output
limit.  By the issue's definitions these are a token spike and a runaway call,
so a finding on them is neither false nor a miss.  ``natural_labels`` finds
them in the events with hindsight (whole windows, the whole previous hour) and
returns them as *weak* labels (``detectors.scoring``: a finding that matches a
weak label is explained, and weak labels are left out of recall).  The
thresholds are the issue's and the held-out generator's own, never the
detectors':

* runaway_reasoning: an answered call whose thinking (reasoning, else output
  tokens) is ``RUNAWAY_X`` times the median of that consumer and model's
  earlier answered calls (extreme for that consumer, the issue's words) and
  that also ran ``RUNAWAY_S`` (the issue's 600 s guardrail), or hit its
  output limit while thinking (``finish_reason=length``: the issue's
  "reasoning budget hit"), or thought at least ``RUNAWAY_MIN`` tokens (the
  held-out generator injects 10-25x its victim's 99th percentile, at least
  25k).  The guardrails alone would not do: real reasoning clients run past
  600 s or into their output limit hundreds of times per 1,000 consumer-hours
  (655 calls in the held-out seed 11's 1,800), most of them ordinary for
  their consumer;
* token_spike: a 5-minute window (sliding by a minute) of a consumer's tokens
  at ``SURGE_X`` times its mean 5-minute total over the hour before and at
  least ``SURGE_MIN_PER_MIN`` tokens a minute (the held-out generator injects
  5-30x the previous hour, with a floor of 40k-150k tokens a minute).

``bench/evaluate_detectors.py --natural`` adds them; the plain run does not,
and its figures stay the strict ones.

>>> from datetime import UTC, datetime, timedelta
>>> from ingest.event import UsageEvent
>>> t0 = datetime(2026, 1, 1, tzinfo=UTC)
>>> def ev(i, s, **kw):
...     return UsageEvent.model_validate(dict(event_id=f"e{i}", ts=t0 + timedelta(seconds=s),
...                                           consumer="c", model="o3-mini", status=200, **kw))
>>> evs = [ev(i, 60 * i, input_tokens=1000, output_tokens=500) for i in range(120)]
>>> evs += [ev(1000 + i, 7200 + i, input_tokens=9000) for i in range(60)]
>>> evs.append(ev(9999, 7300, output_tokens=12_100, reasoning_tokens=12_000, latency_ms=700_000))
>>> sorted({(lab["kind"], lab["weak"]) for lab in natural_labels(evs)})
[('runaway_reasoning', True), ('token_spike', True)]
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ingest.event import UsageEvent

RUNAWAY_S = 600.0
RUNAWAY_X = 20.0
RUNAWAY_MIN = 10_000
RUNAWAY_HISTORY = 50  # earlier calls before the relative test applies
SURGE_X = 5.0
SURGE_MIN_PER_MIN = 40_000.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def natural_labels(events: Iterable[UsageEvent]) -> list[dict[str, Any]]:
    """Weak labels for the runaway calls and token surges of ``events``."""
    labels: list[dict[str, Any]] = []
    per: dict[str, list[tuple[float, int]]] = defaultdict(list)
    seen: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in events:
        t = e.ts.timestamp()
        per[e.consumer].append((t, e.input_tokens + e.output_tokens))
        if e.status != 200:
            continue
        think = float(e.reasoning_tokens or e.output_tokens)
        hist = seen[(e.consumer, e.model)]
        why = None
        if (e.latency_ms or 0.0) >= RUNAWAY_S * 1000.0:
            why = "duration"
        elif e.finish_reason == "length" and e.reasoning_tokens > 0:
            why = "budget"
        elif think >= RUNAWAY_MIN:
            why = "tokens"
        if why is not None and (len(hist) < RUNAWAY_HISTORY or
                                think < RUNAWAY_X * statistics.median(hist[-500:])):
            why = None
        if why is not None:
            labels.append(_label("runaway_reasoning", e.consumer, e.model, t, t, why))
        hist.append(think)
    for consumer, xs in per.items():
        xs.sort()
        labels.extend(_surges(consumer, xs))
    for i, lab in enumerate(labels):
        lab["label_id"] = f"natural-{i:05d}-{lab['kind']}"
    return labels


def _surges(consumer: str, xs: list[tuple[float, int]]) -> list[dict[str, Any]]:
    """Merged 5-minute windows at SURGE_X x the hour before (see the module doc)."""
    ts = [t for t, _ in xs]
    cum = [0]
    for _, v in xs:
        cum.append(cum[-1] + v)

    def tokens(a: float, b: float) -> int:
        return cum[bisect.bisect_left(ts, b)] - cum[bisect.bisect_left(ts, a)]

    out: list[dict[str, Any]] = []
    start = ts[0] + 3600.0  # a full hour before
    m = int(start // 60.0) * 60.0
    cur: list[float] | None = None
    while m + 300.0 <= ts[-1] + 60.0:
        now = tokens(m, m + 300.0)
        before = tokens(m - 3600.0, m) / 12.0
        if now >= SURGE_MIN_PER_MIN * 5.0 and now >= SURGE_X * before:
            if cur is not None and m <= cur[1]:
                cur[1] = m + 300.0
            else:
                if cur is not None:
                    out.append(_label("token_spike", consumer, None, cur[0], cur[1], "surge"))
                cur = [m, m + 300.0]
        m += 60.0
    if cur is not None:
        out.append(_label("token_spike", consumer, None, cur[0], cur[1], "surge"))
    return out


def _label(kind: str, consumer: str, model: str | None, s: float, e: float,
           why: str) -> dict[str, Any]:
    return {"kind": kind, "scope": "consumer", "subject": consumer, "consumer": consumer,
            "model": model, "start": _iso(s), "end": _iso(e), "shape": "natural",
            "variant": why, "weak": True, "natural": True}
