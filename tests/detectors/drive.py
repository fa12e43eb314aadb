"""Feeding events to an engine in the detector tests."""

from __future__ import annotations

from detectors import Engine, Finding
from ingest.event import UsageEvent


def run(evs: list[dict], eng: Engine | None = None) -> list[Finding]:
    """Events in time order through ``eng``, advancing its clock every 200."""
    eng = eng or Engine()
    out: list[Finding] = []
    evs = sorted(evs, key=lambda d: d["ts"])
    for i, d in enumerate(evs):
        ev = UsageEvent.model_validate(d)
        out.extend(eng.observe(ev))
        if i % 200 == 199:
            out.extend(eng.advance(ev.ts))
    return out


def first(fs: list[Finding], kind: str) -> list[Finding]:
    """The opening revision of each episode of ``kind``."""
    return [f for f in fs if f.kind == kind and f.revision == 0 and f.status == "firing"]
