"""Detector cost: microseconds per event and bytes per tracked consumer.

    python bench/detectors_bench.py [--hours 1] [--consumers 300] [--runs 5] [--big 100000]
    python bench/detectors_bench.py --compare [--runs 5]
    python bench/detectors_bench.py --compare --traffic holdout --seed 16 --hours 6

``--traffic holdout`` times the held-out generator's traffic
(``tests/detectors/holdout.py``: replayed real clients, sparser than the
simulator's, so more of its calls close a rate-window bucket) instead of
the simulator's.

Every figure names the implementation that ran: ``compiled`` (the mypyc
build of ``tools/build_compiled.py``) or ``interpreted`` (the sources;
``TOKENWARD_PURE_PYTHON=1`` forces them).  ``--compare`` times both, each in
a fresh process, one after the other, and prints the ratio.

us/event: ``Engine.observe`` (plus ``advance`` every 500 events) over
realistic simulated traffic (``ingest.simulator``), events validated and
priced beforehand; the median of ``--runs`` runs.  ``--gc-freeze`` adds the
same figure with the loaded events moved out of the cyclic GC's reach
(``gc.freeze()``): the bench keeps all events alive, which makes every full
collection walk them; a service holds only the detector state (and could
freeze what it loads at start-up).
bytes/consumer (in a fresh process): ``--big`` consumers, each sending a few calls over a few
minutes, one of them failed (so every per-consumer structure exists: minute
baselines, per-model call sizes, failure counters and the failure ring that
nearly every consumer of real traffic holds); measured as RSS growth,
tracemalloc and snapshot size.

``--real SEED`` sizes the consumers of real traffic instead: the held-out
generator's seed (6 h, ``--consumers``), each tracked consumer's own objects
after the run (the objects it alone refers to, strings of the events it keeps
included; settings and model names that consumers share are not counted):
median, p90 and largest, then the same by kind of consumer (how many models'
call-size baselines it holds, agent-run baselines, a failure ring).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detectors
from detectors import Engine
from ingest.event import UsageEvent


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def feed(eng: Engine, evs: list[UsageEvent]) -> None:
    """Every event in order, the clock advanced every 500 events (as the
    pipeline's batches do)."""
    mx = evs[0].ts
    for i, ev in enumerate(evs):
        eng.observe(ev)
        if ev.ts > mx:
            mx = ev.ts
        if i % 500 == 499:
            eng.advance(mx)


def per_event(hours: float, consumers: int, runs: int, freeze: bool = False,
              traffic: str = "sim", seed: int = 1) -> tuple[float, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate_detectors import load
    evs, _, _ = load(traffic, seed, hours, consumers, cache=True)
    times = []
    for _ in range(runs):
        eng = Engine()
        gc.collect()
        if freeze:
            gc.freeze()
        t0 = time.perf_counter()
        feed(eng, evs)
        times.append((time.perf_counter() - t0) / len(evs) * 1e6)
        if freeze:
            gc.unfreeze()
    return statistics.median(times), len(evs)


def per_consumer(n: int) -> tuple[float, float, float, float]:
    t0 = datetime(2026, 1, 5, tzinfo=UTC)
    models = ("gpt-4o", "gpt-4o-mini", "o3-mini")
    evs = []
    for c in range(n):
        for k in range(4):
            # one call of each consumer fails (a client error, counted against it)
            evs.append(UsageEvent(event_id=f"e{c}-{k}", ts=t0 + timedelta(seconds=k * 70 + c % 60),
                                  consumer=f"consumer-{c:06d}", model=models[c % 3],
                                  status=400 if k == 2 else 200,
                                  error="bad_request" if k == 2 else None,
                                  input_tokens=800, output_tokens=200,
                                  reasoning_tokens=120 if c % 3 == 2 else 0, latency_ms=3000.0,
                                  request_hash=f"h{c}-{k}"))
    evs.sort(key=lambda e: e.ts)
    gc.collect()
    r0 = rss()
    eng = Engine()
    for ev in evs:
        eng.observe(ev)
    gc.collect()
    r1 = rss()
    assert eng.tracked_consumers() == n
    snap = len(eng.snapshot())
    del eng
    gc.collect()
    tracemalloc.start()
    m0 = tracemalloc.get_traced_memory()[0]
    eng = Engine()
    for ev in evs:
        eng.observe(ev)
    m1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (r1 - r0) / n, (m1 - m0) / n, snap / n, statistics.median(
        own_sizes(list(eng._consumers.values())[:2000]))


def own_sizes(states: list[Any], order: bool = True) -> list[int]:
    """Bytes of each consumer's own objects, sorted (``order``; else in the
    order of ``states``): what it alone refers to (objects two consumers
    refer to, such as settings and model and tenant names, are shared)."""
    from collections import Counter
    refs: Counter[int] = Counter()
    for cs in states:
        seen: set[int] = {0}
        _deep(cs, seen)
        refs.update(seen)
    shared = {i for i, c in refs.items() if c > 1}
    sizes = [_deep(cs, set(shared) | {0}) for cs in states]
    return sorted(sizes) if order else sizes


def _deep(o: object, seen: set[int]) -> int:
    """Bytes of ``o`` and what it refers to, once each (``seen``).  A
    compiled record's int and float attributes are stored unboxed in it."""
    if o is None or id(o) in seen:
        return 0
    seen.add(id(o))
    n = sys.getsizeof(o)
    if isinstance(o, dict):
        for k, v in o.items():
            n += _deep(k, seen) + _deep(v, seen)
    elif isinstance(o, (list, tuple)):
        for v in o:
            n += _deep(v, seen)
    native = hasattr(type(o), "__mypyc_attrs__")
    names: set[str] = set()
    for cls in type(o).__mro__:
        names.update(getattr(cls, "__slots__", ()), getattr(cls, "__mypyc_attrs__", ()))
    if hasattr(o, "__dict__") and not native:
        n += _deep(vars(o), seen)
    for name in names:
        v = getattr(o, name, None)
        if native and isinstance(v, (bool, int, float)):
            continue
        n += _deep(v, seen)
    return n


def real_consumers(seed: int, consumers: int) -> list[tuple[int, str]]:
    """Bytes of each tracked consumer's own objects after 6 h of the
    held-out generator's traffic (see the module doc), sorted, with what
    kind of consumer it is (its models, agent runs, failure ring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate_detectors import load
    evs, _, _ = load("holdout", seed, 6.0, consumers, cache=True)
    eng = Engine()
    feed(eng, evs)
    states = list(eng._consumers.values())
    kinds = [f"{cs.model_count()} model{'s' if cs.model_count() != 1 else ''}"
             + (", agent runs" if cs.runs else "")
             + (", failure ring" if cs.has_ring() else "") for cs in states]
    return sorted(zip(own_sizes(states, order=False), kinds, strict=True))


def compare(hours: float, consumers: int, runs: int, traffic: str = "sim", seed: int = 1) -> int:
    """us/event of both implementations, each in a fresh process."""
    res = {}
    for name in ("interpreted", "compiled"):
        env = {k: v for k, v in os.environ.items() if k != "TOKENWARD_PURE_PYTHON"}
        if name == "interpreted":
            env["TOKENWARD_PURE_PYTHON"] = "1"
        r = subprocess.run([sys.executable, __file__, "--timing-only", "--hours", str(hours),
                            "--consumers", str(consumers), "--runs", str(runs),
                            "--traffic", traffic, "--seed", str(seed)],
                           env=env, capture_output=True, text=True, check=True)
        line = r.stdout.strip().splitlines()[-1]
        print(line)
        got = line.split("(", 1)[1].split(")", 1)[0]
        if got != name:
            print(f"no {name} run (no usable build? python tools/build_compiled.py); "
                  f"{r.stderr.strip()}")
            return 1
        res[name] = float(line.split("): ", 1)[1].split()[0])
    print(f"compiled / interpreted: {res['interpreted'] / res['compiled']:.2f}x faster")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--consumers", type=int, default=300)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--traffic", choices=("sim", "holdout"), default="sim",
                    help="whose traffic to time: the simulator's (default) or the held-out "
                         "generator's (cached in /tmp like bench/evaluate_detectors.py)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--gc-freeze", action="store_true",
                    help="also time with the loaded events frozen out of the cyclic GC")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--real", type=int, metavar="SEED",
                    help="size the consumers of the held-out generator's traffic (seed)")
    ap.add_argument("--compare", action="store_true",
                    help="time the interpreted and the compiled detectors (fresh processes)")
    ap.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.compare:
        return compare(a.hours, a.consumers, a.runs, a.traffic, a.seed)
    if a.real is not None:
        sized = real_consumers(a.real, a.consumers)
        b = [n for n, _ in sized]
        print(f"state of {len(b)} consumers after 6 h of held-out traffic (seed {a.real}, "
              f"{detectors.IMPLEMENTATION}): median {statistics.median(b):.0f} bytes, "
              f"p90 {b[int(0.9 * len(b))]}, largest {b[-1]}; over 2 KiB: "
              f"{sum(1 for x in b if x > 2048)}")
        groups: dict[str, list[int]] = {}
        for n, kind in sized:
            groups.setdefault(kind, []).append(n)
        for kind, ns in sorted(groups.items(), key=lambda g: statistics.median(g[1])):
            many = "s" if len(ns) != 1 else ""
            print(f"  {kind}: {len(ns)} consumer{many}, "
                  f"median {statistics.median(ns):.0f} bytes, largest {ns[-1]}")
        return 0
    if a.memory_only:
        r, t, s, o = per_consumer(a.big)
        print(f"state at {a.big} consumers ({detectors.IMPLEMENTATION}): {r:.0f} bytes/consumer "
              f"(RSS growth, fresh process), {t:.0f} (tracemalloc, Python objects only), "
              f"{s:.0f} (snapshot); a consumer's own objects {o:.0f} (median; the rest is "
              "the engine's tables of request hashes and timers)")
        return 0
    us, n = per_event(a.hours, a.consumers, a.runs, traffic=a.traffic, seed=a.seed)
    what = "simulated" if a.traffic == "sim" else f"held-out (seed {a.seed})"
    print(f"detectors ({detectors.IMPLEMENTATION}): {us:.2f} us/event (median of {a.runs} runs "
          f"over {n} {what} events, {a.consumers} consumers, {a.hours} h)")
    if a.timing_only:
        return 0
    if a.gc_freeze:
        us, n = per_event(a.hours, a.consumers, a.runs, freeze=True, traffic=a.traffic,
                          seed=a.seed)
        print(f"detectors ({detectors.IMPLEMENTATION}): {us:.2f} us/event with the loaded "
              "events frozen out of the GC (gc.freeze)")
    # in a fresh process: after the timing runs, memory the allocator already
    # holds would be reused and the RSS growth would read too low
    return subprocess.call([sys.executable, __file__, "--memory-only", "--big", str(a.big)])


if __name__ == "__main__":
    raise SystemExit(main())
