"""Evaluate the detectors on labelled traffic and print the per-kind table.

    python bench/evaluate_detectors.py --seed 1 --hours 6 --consumers 500
    python bench/evaluate_detectors.py --traffic adversarial --seed 2 --hours 6 --consumers 400

``--traffic sim`` uses ``ingest.simulator`` (the project's generator);
``--traffic adversarial`` uses ``tests/detectors/synth.py``, written
independently of it with different burstiness, sizes and anomaly shapes, to
check that the detectors are not tuned to one generator; ``--traffic holdout``
uses ``tests/detectors/holdout.py``, a third generator written without looking
at the detectors or the other two, from the real traces in
``/work/shared/data`` (or ``$TOKENWARD_TRACE_DATA``), as a held-out check.
Events go through
``ingest.event.validate_event`` and get their cost from ``ingest.pricing``
when the pipeline's price table is available.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectors import DetectorConfig, Engine
from detectors.scoring import breakdown, combine, format_breakdown, format_report, score
from ingest.event import Accepted, UsageEvent, validate_event

sys.path.insert(0, str(Path(__file__).resolve().parent))
from natural import natural_labels  # bench/natural.py


def _price_fn() -> Any:
    try:
        from ingest.pricing import PriceTable
        table = PriceTable.load()
    except Exception:  # pragma: no cover - pricing not available
        return None

    def price(ev: UsageEvent) -> UsageEvent:
        if ev.cost is not None:
            return ev
        c, _ = table.cost(ev)
        return ev.model_copy(update={"cost": c})
    return price


def generate(traffic: str, seed: int, hours: float, consumers: int,
             episodes: int | None = None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if traffic == "sim":
        from ingest.simulator import SimConfig, Simulation
        sim = Simulation(SimConfig(seed=seed, duration_s=hours * 3600, n_consumers=consumers,
                                   episodes_per_kind=episodes))
        evs = list(sim.events())
        return evs, sim.labels
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "detectors"))
    if traffic == "holdout":
        from holdout import Holdout
        h = Holdout(seed=seed, hours=hours, consumers=consumers)
        return h.events(), h.labels
    from synth import Synth
    s = Synth(seed=seed, hours=hours, consumers=consumers)
    return s.events(), s.labels


def _intern_fields(evs: list[UsageEvent]) -> None:
    """Give unpickled events the interned field names that validation gives
    every ingested event.  pickle does not intern: the names it restores are
    strings of their own, and each of the detectors' field reads would then
    compare characters instead of identities, timing them slower than they
    run on ingested events (4 % more instructions per event, callgrind)."""
    names = {k: sys.intern(k) for k in UsageEvent.model_fields}
    for e in evs:
        d = e.__dict__
        items = list(d.items())
        d.clear()
        d.update((names.get(k, k), v) for k, v in items)


def _window(traffic: str, evs: list[UsageEvent], hours: float) -> list[UsageEvent]:
    """The events stamped within the traffic's ``hours``, as an export of a
    time range by event time holds them.  The held-out and independent
    generators stop new calls at the end but still emit the calls running
    then, stamped when they end: for up to 15 minutes the only events are
    long calls and timeouts (held-out seed 21: 279 events, 14 % failing,
    against 3,500 a minute and 2 % before), which look like upstream
    outages to any detector.  The simulator stops at its end already."""
    if traffic == "sim" or not evs:
        return evs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "detectors"))
    if traffic == "holdout":
        from holdout import START
        start = START.timestamp()
    else:
        from synth import T0
        start = T0
    end = start + hours * 3600.0
    return [e for e in evs if e.ts.timestamp() < end]


def load(traffic: str, seed: int, hours: float, consumers: int, cache: bool,
         episodes: int | None = None
         ) -> tuple[list[UsageEvent], list[dict[str, Any]], float]:
    """Events (within the traffic's window), labels and generation time."""
    res = _load(traffic, seed, hours, consumers, cache, episodes)
    return _window(traffic, res[0], hours), res[1], res[2]


def _load(traffic: str, seed: int, hours: float, consumers: int, cache: bool,
          episodes: int | None = None
          ) -> tuple[list[UsageEvent], list[dict[str, Any]], float]:
    import pickle
    ep = f"-e{episodes}" if episodes else ""
    path = Path(f"/tmp/tokenward-eval-{traffic}-{seed}-{hours}-{consumers}{ep}.pkl")
    if cache and path.exists():
        res: Any = pickle.loads(path.read_bytes())
        _intern_fields(res[0])
        return res
    t0 = time.perf_counter()
    raw, labels = generate(traffic, seed, hours, consumers, episodes)
    price = _price_fn()
    evs = []
    for d in raw:
        r = validate_event(d)
        if isinstance(r, Accepted):
            evs.append(price(r.event) if price else r.event)
    print(f"generated {len(evs)} events, {len(labels)} labels in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    res = (evs, labels, time.perf_counter() - t0)
    if cache:
        path.write_bytes(pickle.dumps(res))
    return res


def run(evs: list[UsageEvent], batch: int = 500, config: DetectorConfig | None = None
        ) -> tuple[list[dict[str, Any]], float]:
    eng = Engine(config)
    out = []
    t0 = time.perf_counter()
    mx = None
    for i, ev in enumerate(evs):
        out.extend(eng.observe(ev))
        if mx is None or ev.ts > mx:
            mx = ev.ts
        if i % batch == batch - 1:
            out.extend(eng.advance(mx))
    dt = time.perf_counter() - t0
    if mx is not None:
        out.extend(eng.advance(mx + timedelta(hours=2)))
    return [f.to_json_dict() for f in out], dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", help="several seeds, comma separated (e.g. 11,12,13,14,15): "
                                    "one line per seed, then the table of all their labels "
                                    "together (a single run has too few labels per kind)")
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--consumers", type=int, default=500)
    ap.add_argument("--traffic", choices=("sim", "adversarial", "holdout"), default="sim")
    ap.add_argument("--episodes", type=int, default=None,
                    help="anomaly episodes per kind (--traffic sim only; default grows "
                         "with sqrt(hours))")
    ap.add_argument("--cache", action="store_true", help="cache generated events in /tmp")
    ap.add_argument("--details", action="store_true", help="list misses and false findings")
    ap.add_argument("--natural", action="store_true",
                    help="also mark the normal traffic's own runaway calls and token surges "
                         "(the issue's definitions, see bench/natural.py) as weak labels: "
                         "findings on them are explained, not false")
    ap.add_argument("--by", default="", metavar="FIELDS",
                    help="also recall and delay per label scenario: comma-separated of "
                         "shape, variant, victim_size")
    ap.add_argument("--json", help="write the report as JSON to this file")
    ap.add_argument("--detectors-file", metavar="TOML",
                    help="detector settings, as `tokenward run --detectors-file` reads them "
                         "(e.g. deploy/detectors.quiet.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KIND.KEY=VALUE",
                    help="override a detector setting (repeatable; wins over --detectors-file)")
    a = ap.parse_args(argv)
    by = tuple(f.strip() for f in a.by.split(",") if f.strip())
    try:
        breakdown({"detected": [], "missed": []}, by)
    except ValueError as exc:
        ap.error(f"--by: {exc}")
    over: dict[str, dict[str, Any]] = {}
    if a.detectors_file:
        from api.service import read_toml  # the service's own reader and errors

        over = read_toml(a.detectors_file, "detectors")
    for kv in a.set:
        k, v = kv.split("=", 1)
        kind, key = k.split(".", 1)
        over.setdefault(kind, {})[key] = json.loads(v)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    reports, all_findings = [], []
    for seed in seeds:
        evs, labels, _ = load(a.traffic, seed, a.hours, a.consumers, a.cache, a.episodes)
        if a.natural:
            labels = labels + natural_labels(evs)
        findings, dt = run(evs, config=DetectorConfig.from_dict(over))
        reports.append(score(labels, findings, consumer_hours=a.consumers * a.hours))
        all_findings.extend(findings)
        print(f"traffic={a.traffic} seed={seed} hours={a.hours} consumers={a.consumers} "
              f"events={len(evs)} detectors {1e6 * dt / max(len(evs), 1):.2f} us/event "
              f"(incl. finding creation)")
        del evs
    report = combine(reports) if len(reports) > 1 else reports[0]
    if len(reports) > 1:
        print(f"seeds {','.join(map(str, seeds))} together:")
    print(format_report(report))
    if by:
        report["breakdown"] = breakdown(report, by)
        print()
        print(format_breakdown(report["breakdown"], by))
    if a.details:
        for d in report["detected"]:
            print("FOUND ", json.dumps(d))
        for m in report["missed"]:
            print("MISSED", json.dumps(m))
        for f in report["false"]:
            print("FALSE ", json.dumps(f))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
        Path(a.json + ".findings").write_text(json.dumps(all_findings, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
