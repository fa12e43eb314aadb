"""What tells token_spike's false findings from its labelled spikes, and would
a lagged-level rule for steady consumers find the ramps it misses?

    python bench/token_spike_study.py --seeds 11,12,13,14,15,16,17,18,19,20

Uses the held-out traffic of ``bench/evaluate_detectors.py`` (same cache in
/tmp, so run that first with ``--cache`` to save the generation).  Two parts:

1. **Features of the findings.** Each token_spike finding's first revision,
   scored as true, false or explained (``detectors.scoring``), against what
   the consumer's own per-minute tokens looked like before it: the mean of
   the previous hour (minutes -60 to -5), the median and 90th percentile of
   its active minutes so far, and the share of its minutes that had calls.
   Printed as percentiles per group.
2. **A lagged-level rule, offline.** On the same minute series, per consumer:
   the 5 min window (its largest call left out, ``min_calls`` calls) at
   ``R`` x the mean and ``Q`` x the highest minute of minutes -60 to -20,
   with calls in at least ``A`` of those minutes, two minutes in a row, above
   the 5 min floor.  Prints, for a grid of (A, R, Q), how many labelled
   spikes its episodes overlap, how many of those the detectors miss today,
   and its episodes that overlap no label of any kind on the consumer (which
   would be false findings).

Nothing here changes the detectors: it measures an idea before it is built
(docs/detectors.md, "Why token_spike and runaway_reasoning fall short").
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_detectors import load, run  # bench/evaluate_detectors.py

from detectors.scoring import _ts, score

LAG = (60, 20)  # minutes before the window that make the lagged level
FLOOR = 25_000.0  # tokens a minute: the 5 min window's floor (token_spike config)
MIN_CALLS = 24  # calls in the 5 min window (persist_min_calls)


def _series(evs: list[Any], t0: float, n_min: int) -> tuple[dict[str, np.ndarray], ...]:
    """Per consumer: answered tokens, calls and the largest call per minute."""
    tok: dict[str, np.ndarray] = {}
    cnt: dict[str, np.ndarray] = {}
    big: dict[str, np.ndarray] = {}
    for e in evs:
        if e.status != 200:
            continue
        m = int((e.ts.timestamp() - t0) // 60)
        if not 0 <= m < n_min:
            continue
        c = e.consumer
        if c not in tok:
            tok[c], cnt[c], big[c] = np.zeros(n_min), np.zeros(n_min), np.zeros(n_min)
        x = (e.input_tokens or 0) + (e.output_tokens or 0)
        tok[c][m] += x
        cnt[c][m] += 1
        big[c][m] = max(big[c][m], x)
    return tok, cnt, big


def _features(findings: list[dict[str, Any]], report: dict[str, Any],
              labels: list[dict[str, Any]], tok: dict[str, np.ndarray], t0: float
              ) -> list[dict[str, Any]]:
    false_ids = {f["finding_id"] for f in report["false"]}
    spikes = [lab for lab in labels if lab["kind"] == "token_spike"]
    rows = []
    for f in findings:
        if f["kind"] != "token_spike" or f["revision"] != 0:
            continue
        t = _ts(f["detected_at"])
        m = int((t - t0) // 60)
        s = tok.get(f["consumer"], np.zeros(1))
        before = s[max(m - 60, 0):max(m - 5, 0)]
        so_far = s[:max(m - 5, 0)]
        active = so_far[so_far > 0]
        true = any(lab["consumer"] == f["consumer"]
                   and _ts(lab["start"]) <= t <= _ts(lab["end"]) + report["grace_s"]
                   for lab in spikes)
        rows.append({
            "status": "false" if f["finding_id"] in false_ids else "true" if true else "expl",
            "obs": float(f["observed"]),
            "prev_hour": float(before.mean()) if len(before) else 0.0,
            "active_p90": float(np.percentile(active, 90)) if len(active) else 0.0,
            "active_share": len(active) / max(len(so_far), 1),
        })
    return rows


def _lagged(tok: np.ndarray, cnt: np.ndarray, big: np.ndarray, a0: float, r: float, q: float
            ) -> list[int]:
    """Minutes at which the lagged-level rule opens an episode (30 min apart)."""
    cs = np.concatenate([[0.0], np.cumsum(tok)])
    cc = np.concatenate([[0.0], np.cumsum(cnt)])
    starts, run_, last = [], 0, -10_000
    for t in range(LAG[0] + 5, len(tok)):
        w = (cs[t + 1] - cs[t - 4] - big[t - 4:t + 1].max()) / 5.0
        lag = tok[t - LAG[0]:t - LAG[1]]
        hit = (w >= FLOOR and cc[t + 1] - cc[t - 4] >= MIN_CALLS
               and (lag > 0).mean() >= a0 and w >= r * lag.mean() and w >= q * lag.max())
        run_ = run_ + 1 if hit else 0
        if run_ >= 2:
            if t - last > 30:
                starts.append(t)
            last = t
    return starts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="11,12,13,14,15,16,17,18,19,20")
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--consumers", type=int, default=300)
    a = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    grid = list(itertools.product((0.8, 0.9, 0.97), (3.0, 4.0), (1.5, 2.0, 2.5)))
    overlapped: dict[tuple[float, ...], set[str]] = {g: set() for g in grid}
    found_new: dict[tuple[float, ...], set[str]] = {g: set() for g in grid}  # missed today
    unlabelled = dict.fromkeys(grid, 0)
    n_min = int(a.hours * 60) + 10
    for seed in (int(x) for x in a.seeds.split(",")):
        evs, labels, _ = load("holdout", seed, a.hours, a.consumers, True)
        findings, _ = run(evs)
        report = score(labels, findings, consumer_hours=a.consumers * a.hours)
        missed = {m["label_id"] for m in report["missed"] if m["kind"] == "token_spike"}
        t0 = evs[0].ts.timestamp()
        tok, cnt, big = _series(evs, t0, n_min)
        del evs
        rows += _features(findings, report, labels, tok, t0)
        spans = [(lab.get("consumer"), lab["kind"], lab["label_id"],
                  (_ts(lab["start"]) - t0) / 60.0, (_ts(lab["end"]) - t0) / 60.0)
                 for lab in labels]
        for g in grid:
            for c in tok:
                for t in _lagged(tok[c], cnt[c], big[c], *g):
                    on = [s for s in spans if s[0] == c and s[3] - 1 <= t <= s[4] + 5]
                    spikes = [s[2] for s in on if s[1] == "token_spike"]
                    overlapped[g].update(spikes)
                    found_new[g].update(x for x in spikes if x in missed)
                    unlabelled[g] += not on
        print(f"seed {seed} done", file=sys.stderr)
    print("token_spike first revisions: percentiles 10/25/50/75/90")
    for st in ("true", "false"):
        grp = [r for r in rows if r["status"] == st]
        print(f"  {st} ({len(grp)} findings)")
        for name, vals in (
                ("observed tokens/min", [r["obs"] for r in grp]),
                ("observed / previous hour's mean", [r["obs"] / max(r["prev_hour"], 1.0)
                                                     for r in grp]),
                ("observed / p90 of active minutes", [r["obs"] / max(r["active_p90"], 1.0)
                                                      for r in grp]),
                ("share of minutes active", [r["active_share"] for r in grp])):
            p = np.percentile(vals, [10, 25, 50, 75, 90]) if vals else []
            print(f"    {name:34s} " + " ".join(f"{x:9.2f}" for x in p))
    print("\nlagged-level rule (A: share of lag minutes active, R x lag mean, Q x lag max):")
    print("     A    R    Q  labels overlapped  of them missed today  unlabelled episodes")
    for g in grid:
        print(f"  {g[0]:4.2f} {g[1]:4.1f} {g[2]:4.1f}  {len(overlapped[g]):17d}  "
              f"{len(found_new[g]):20d}  {unlabelled[g]:19d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
