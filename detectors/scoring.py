"""Score findings against labelled traffic (labels from ``ingest.simulator``
or any generator producing the same records).

Matching rules (documented here because the numbers depend on them):

* Only the first revision of each ``finding_id`` counts (updates and the
  resolution of an episode are not new detections).
* A finding matches a label when the kinds are equal, ``detected_at`` lies in
  ``[label.start, label.end + grace_s]`` and the subject matches:

  - label scope ``model``: a model-scope finding whose subject (or model) is
    the label's subject;
  - label scope ``consumer`` or ``user``: a finding whose ``consumer`` (or
    subject) is the label's consumer (findings are raised per consumer);
  - label scope ``session``: a finding whose subject, or evidence
    ``trace_id``/``session_id``, is the label's subject.

* A finding matching no label is a false positive, except that a
  consumer-scope ``failure_spike`` or ``retry_storm`` finding on a model
  while a model-scope outage label of that model is active (start to end +
  grace) is *explained*: neither true nor false positive.  Those are the
  upstream's failures seen from one consumer.  Likewise a consumer-scope
  ``failure_spike`` during a ``retry_storm`` label of the same consumer (a
  storm of failing calls is also a failure spike), and the converse, a
  consumer-scope ``retry_storm`` during a ``failure_spike`` label of the same
  consumer (its clients retry the failing calls: the request rate jumps
  while most calls fail, and a request retried past its client's limit is
  sent again and again, the issue's two definitions of a storm); a consumer-scope finding
  of a *secondary* kind (failure, token and cost spikes, context bloat, cache
  opportunity) on a consumer during a label of another kind on that consumer
  (a runaway or a storm does spike its cost; prompts growing bigger do bloat
  its sessions); and any finding matching a
  label marked ``weak`` (an injected change smaller than the consumer's own
  normal variation, see ``ingest.simulator``), which is also left out of
  recall.
* A label is detected when at least one finding matches it; its delay is
  the earliest matching ``detected_at`` minus the label's start (event time).
* precision = true positives / (true positives + false positives); false
  findings are also given per 1,000 consumer-hours of traffic.

>>> labels = [{"label_id": "L1", "kind": "retry_storm", "scope": "consumer", "subject": "a",
...            "consumer": "a", "model": "m", "start": "2026-01-01T00:00:00Z",
...            "end": "2026-01-01T00:10:00Z"}]
>>> findings = [{"finding_id": "f1", "kind": "retry_storm", "scope": "consumer",
...              "subject": "a", "consumer": "a", "revision": 0,
...              "detected_at": "2026-01-01T00:00:08Z"},
...             {"finding_id": "f2", "kind": "token_spike", "scope": "consumer",
...              "subject": "b", "consumer": "b", "revision": 0,
...              "detected_at": "2026-01-01T00:00:08Z"}]
>>> r = score(labels, findings, consumer_hours=100)
>>> r["kinds"]["retry_storm"]["recall"], r["kinds"]["token_spike"]["false_positives"]
(1.0, 1)
>>> print(format_report(r).splitlines()[0].split()[:3])
['kind', 'labels', 'weak']

Labels carry their scenario (``shape``, ``variant``, ``victim_size``), and
:func:`breakdown` splits recall and delay by them: a detector that finds
steps at once and ramps late, or large consumers and not small ones, shows
it there (``tokenward evaluate --by shape,victim_size``).

>>> rows = breakdown(r, ("shape",))
>>> [(x["kind"], x["shape"], x["labels"], x["recall"]) for x in rows]
[('retry_storm', None, 1, 1.0)]
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .finding import KINDS

# kinds that other anomalies cause as a side effect (see the module doc)
SECONDARY = ("failure_spike", "token_spike", "cost_spike", "context_bloat", "cache_opportunity")
# a consumer-scope finding of the key during a label of the value on the same
# consumer is explained: each of the two behaviours is also the other
_SIDE_EFFECT_OF = {"failure_spike": "retry_storm", "retry_storm": "failure_spike"}


def _ts(v: Any) -> float:
    if isinstance(v, datetime):
        return v.timestamp()
    if isinstance(v, int | float):
        return float(v)
    s = str(v)
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    return datetime.fromisoformat(s).timestamp()


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _subject_ok(label: dict[str, Any], f: dict[str, Any]) -> bool:
    scope = label.get("scope")
    if scope == "model":
        return f.get("scope") == "model" and label.get("subject") in (f.get("subject"),
                                                                      f.get("model"))
    if f.get("scope") == "model":
        return False
    if scope == "session":
        ev = f.get("evidence") or {}
        return label.get("subject") in (f.get("subject"), ev.get("trace_id"),
                                        ev.get("session_id"))
    who = label.get("consumer") or label.get("subject")
    return who in (f.get("consumer"), f.get("subject"))


def score(labels: list[dict[str, Any]], findings: list[dict[str, Any]], *,
          consumer_hours: float, grace_s: float = 300) -> dict[str, Any]:
    """Per-kind recall, precision, false findings per 1,000 consumer-hours and
    detection delay (see the module doc for the matching rules)."""
    first: dict[str, dict[str, Any]] = {}
    for f in findings:
        fid = f["finding_id"]
        cur = first.get(fid)
        if cur is None or f.get("revision", 0) < cur.get("revision", 0):
            first[fid] = f
    labs = [dict(lab, _s=_ts(lab["start"]), _e=_ts(lab["end"])) for lab in labels]
    outages = [lab for lab in labs if lab.get("scope") == "model"]
    kinds = sorted({*(lab["kind"] for lab in labs), *(f["kind"] for f in first.values())},
                   key=lambda k: KINDS.index(k) if k in KINDS else 99)
    delays: dict[str, float] = {}
    stats: dict[str, dict[str, Any]] = {
        k: {"labels": 0, "detected": 0, "findings": 0, "true_positives": 0,
            "false_positives": 0, "explained": 0, "weak": 0, "delays": []} for k in kinds}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    weak: dict[str, list[dict[str, Any]]] = {}
    for lab in labs:
        if lab.get("weak"):
            weak.setdefault(lab["kind"], []).append(lab)
            stats[lab["kind"]]["weak"] += 1
            continue
        by_kind.setdefault(lab["kind"], []).append(lab)
        stats[lab["kind"]]["labels"] += 1
    all_labs = labs
    labs = [lab for lab in labs if not lab.get("weak")]
    false_list = []
    for f in sorted(first.values(), key=lambda f: _ts(f["detected_at"])):
        st = stats[f["kind"]]
        st["findings"] += 1
        t = _ts(f["detected_at"])
        matched = False
        for lab in by_kind.get(f["kind"], ()):
            if lab["_s"] <= t <= lab["_e"] + grace_s and _subject_ok(lab, f):
                matched = True
                d = t - lab["_s"]
                if lab["label_id"] not in delays or d < delays[lab["label_id"]]:
                    delays[lab["label_id"]] = d
        if matched:
            st["true_positives"] += 1
            continue
        if f["kind"] in ("failure_spike", "retry_storm") and f.get("scope") != "model" and any(
                o["_s"] <= t <= o["_e"] + grace_s and o.get("subject") == f.get("model")
                for o in outages):
            st["explained"] += 1
            continue
        other = _SIDE_EFFECT_OF.get(f["kind"])
        if other is not None and f.get("scope") != "model" and any(
                lab["_s"] <= t <= lab["_e"] + grace_s and _subject_ok(lab, f)
                for lab in by_kind.get(other, ()) if lab.get("scope") != "model"):
            st["explained"] += 1
            continue
        if f["kind"] in SECONDARY and f.get("scope") != "model" and any(
                lab["_s"] <= t <= lab["_e"] + grace_s and lab["kind"] != f["kind"]
                and lab.get("consumer") is not None and lab.get("consumer") == f.get("consumer")
                for lab in all_labs):
            st["explained"] += 1
            continue
        if any(lab["_s"] <= t <= lab["_e"] + grace_s and _subject_ok(lab, f)
               for lab in weak.get(f["kind"], ())):
            st["explained"] += 1
            continue
        st["false_positives"] += 1
        false_list.append({k: f.get(k) for k in ("finding_id", "kind", "scope", "subject",
                                                  "detected_at", "summary")})
    for lab in labs:
        if lab["label_id"] in delays:
            st = stats[lab["kind"]]
            st["detected"] += 1
            st["delays"].append(delays[lab["label_id"]])
    out = {}
    for k, st in stats.items():
        tp, fp = st["true_positives"], st["false_positives"]
        out[k] = {
            "labels": st["labels"], "detected": st["detected"],
            "recall": st["detected"] / st["labels"] if st["labels"] else None,
            "findings": st["findings"], "true_positives": tp, "false_positives": fp,
            "explained": st["explained"], "weak_labels": st["weak"],
            "precision": tp / (tp + fp) if tp + fp else None,
            "false_per_1k_consumer_hours": 1000.0 * fp / consumer_hours if consumer_hours else None,
            "delay_p50_s": _pct(st["delays"], 0.5), "delay_p90_s": _pct(st["delays"], 0.9),
        }
    missed = [{k: lab.get(k) for k in ("label_id", "kind", "scope", "subject", "shape",
                                       "variant", "victim_size", "start")}
              for lab in labs if lab["label_id"] not in delays]
    found = [{"label_id": lab["label_id"], "kind": lab["kind"], "subject": lab.get("subject"),
              "shape": lab.get("shape"), "variant": lab.get("variant"),
              "victim_size": lab.get("victim_size"),
              "delay_s": round(delays[lab["label_id"]], 1)}
             for lab in labs if lab["label_id"] in delays]
    return {"kinds": out, "consumer_hours": consumer_hours, "grace_s": grace_s,
            "missed": missed, "false": false_list, "detected": found}


def combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the reports of several runs (seeds, generators): counts
    and consumer-hours add up, delays are pooled, so recall and precision are
    measured on all the labels together (a single run has too few labels per
    kind to tell 0.95 from 0.9).

    >>> lab = {"label_id": "L1", "kind": "retry_storm", "scope": "consumer", "subject": "a",
    ...        "consumer": "a", "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:10:00Z"}
    >>> hit = {"finding_id": "f1", "kind": "retry_storm", "scope": "consumer", "subject": "a",
    ...        "consumer": "a", "detected_at": "2026-01-01T00:00:08Z"}
    >>> r = combine([score([lab], [hit], consumer_hours=10), score([lab], [], consumer_hours=30)])
    >>> rs = r["kinds"]["retry_storm"]
    >>> rs["recall"], rs["delay_p50_s"], r["consumer_hours"]
    (0.5, 8.0, 40)
    """
    hours = sum(r["consumer_hours"] for r in reports)
    kinds = sorted({k for r in reports for k in r["kinds"]},
                   key=lambda k: KINDS.index(k) if k in KINDS else 99)
    out: dict[str, Any] = {}
    for k in kinds:
        rows = [r["kinds"][k] for r in reports if k in r["kinds"]]
        n = {c: sum(x[c] for x in rows) for c in (
            "labels", "detected", "findings", "true_positives", "false_positives", "explained",
            "weak_labels")}
        delays = [d["delay_s"] for r in reports for d in r["detected"] if d["kind"] == k]
        tp, fp = n["true_positives"], n["false_positives"]
        out[k] = n | {
            "recall": n["detected"] / n["labels"] if n["labels"] else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "false_per_1k_consumer_hours": 1000.0 * fp / hours if hours else None,
            "delay_p50_s": _pct(delays, 0.5), "delay_p90_s": _pct(delays, 0.9)}
    return {"kinds": out, "consumer_hours": hours,
            "grace_s": reports[0]["grace_s"] if reports else 300,
            "missed": [m for r in reports for m in r["missed"]],
            "false": [f for r in reports for f in r["false"]],
            "detected": [d for r in reports for d in r["detected"]]}


BREAKDOWN_FIELDS = ("shape", "variant", "victim_size")


def breakdown(report: dict[str, Any], by: tuple[str, ...]) -> list[dict[str, Any]]:
    """Recall and detection delay per kind and per value of the label fields
    ``by`` (of :data:`BREAKDOWN_FIELDS`), from a :func:`score` or
    :func:`combine` report; one row per group, in kind order."""
    bad = [f for f in by if f not in BREAKDOWN_FIELDS]
    if bad:
        raise ValueError(f"cannot break down by {', '.join(bad)}: "
                         f"choose from {', '.join(BREAKDOWN_FIELDS)}")
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rows, hit in ((report["detected"], True), (report["missed"], False)):
        for lab in rows:
            key = (lab["kind"], *(lab.get(f) for f in by))
            g = groups.setdefault(key, {"labels": 0, "detected": 0, "delays": []})
            g["labels"] += 1
            if hit:
                g["detected"] += 1
                g["delays"].append(lab["delay_s"])

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        k = key[0]
        return (KINDS.index(k) if k in KINDS else 99, k, *(str(v) for v in key[1:]))

    out = []
    for key in sorted(groups, key=order):
        g = groups[key]
        out.append({"kind": key[0], **dict(zip(by, key[1:], strict=True)),
                    "labels": g["labels"], "detected": g["detected"],
                    "recall": g["detected"] / g["labels"],
                    "delay_p50_s": _pct(g["delays"], 0.5),
                    "delay_p90_s": _pct(g["delays"], 0.9)})
    return out


def format_breakdown(rows: list[dict[str, Any]], by: tuple[str, ...]) -> str:
    """:func:`breakdown` as a fixed-width table."""
    cols = ("kind", *by, "labels", "detected", "recall", "delay p50", "delay p90")
    cells = [[str(r["kind"]), *(str(r[f]) for f in by), str(r["labels"]), str(r["detected"]),
              format(r["recall"], ".2f"),
              "-" if r["delay_p50_s"] is None else format(r["delay_p50_s"], ".1f"),
              "-" if r["delay_p90_s"] is None else format(r["delay_p90_s"], ".1f")]
             for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c)
         for i, c in enumerate(cols)]
    n_left = 1 + len(by)  # kind and the group values: text, left aligned
    return "\n".join("  ".join(c.ljust(w[i]) if i < n_left else c.rjust(w[i])
                               for i, c in enumerate(row)) for row in [list(cols), *cells])


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width table, one line per kind."""
    cols = ("kind", "labels", "weak", "detected", "recall", "findings", "TP", "FP", "expl",
            "precision", "FP/1k c-h", "delay p50", "delay p90")
    w = (18, 6, 4, 8, 6, 8, 5, 5, 5, 9, 9, 9, 9)
    lines = ["  ".join(c.ljust(n) if i == 0 else c.rjust(n) for i, (c, n) in
                       enumerate(zip(cols, w, strict=True)))]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for k, s in report["kinds"].items():
        row = (k, str(s["labels"]), str(s.get("weak_labels", 0)), str(s["detected"]),
               f(s["recall"], ".2f"),
               str(s["findings"]), str(s["true_positives"]), str(s["false_positives"]),
               str(s["explained"]), f(s["precision"], ".2f"),
               f(s["false_per_1k_consumer_hours"], ".2f"), f(s["delay_p50_s"], ".1f"),
               f(s["delay_p90_s"], ".1f"))
        lines.append("  ".join(c.ljust(n) if i == 0 else c.rjust(n) for i, (c, n) in
                               enumerate(zip(row, w, strict=True))))
    lines.append(f"consumer-hours: {report['consumer_hours']:.0f}, grace {report['grace_s']:.0f} s")
    return "\n".join(lines)
