"""How often real clients surge on their own: the ServeGen language traces.

    python bench/trace_surges.py [--data /work/shared/data]

ServeGen (alibaba/ServeGen, Apache-2.0) gives, per production client, the
request rate of every 600 s window over 14 days.  For each window after an
hour with traffic, this counts the windows whose rate is at least k times the
mean of the six windows before it (a token_spike the size the held-out
generator injects: 5-30x the previous hour), and of those, the ones also k
times the highest window within 30 minutes of the same time the day before
(what a time-of-day baseline could excuse).  Printed per 1,000 client-hours,
the unit of the issue's false-finding target (at most 1 per 1,000
consumer-hours): a rate-based detector that finds injected 5-30x spikes also
finds these.
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import numpy as np

WIN_PER_H = 6
DAY = 144  # windows per day


def count(root: Path, ks: tuple[float, ...] = (5.0, 10.0, 30.0)) -> tuple[float, dict, dict]:
    hours = 0.0
    surges = dict.fromkeys(ks, 0)
    not_daily = dict.fromkeys(ks, 0)
    for f in sorted(glob.glob(str(root / "servegen/data/language/*/chunk-*-trace.csv"))):
        rate = np.loadtxt(f, delimiter=",", usecols=(1,), ndmin=1)
        if rate.mean() <= 0:
            continue
        for i in range(WIN_PER_H, len(rate)):
            prev = rate[i - WIN_PER_H:i]
            if not (prev > 0).any():
                continue
            hours += 1.0 / WIN_PER_H
            base = prev.mean()
            day = rate[i - DAY - 3:i - DAY + 4].max() if i >= DAY + 3 else None
            for k in ks:
                if rate[i] > k * base:
                    surges[k] += 1
                    if day is not None and rate[i] > k * day:
                        not_daily[k] += 1
    return hours, surges, not_daily


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("TOKENWARD_TRACE_DATA",
                                                     "/work/shared/data"))
    a = ap.parse_args()
    hours, surges, not_daily = count(Path(a.data))
    print(f"ServeGen language clients: {hours:,.0f} client-hours of 600 s windows")
    for k in surges:
        print(f"window >= {k:g}x the previous hour: {surges[k]:5d} "
              f"({1000 * surges[k] / hours:5.1f} per 1k client-hours); also >= {k:g}x the "
              f"same time yesterday (+-30 min): {not_daily[k]:5d} "
              f"({1000 * not_daily[k] / hours:5.1f} per 1k)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
