"""File -> embedded ClickHouse ingest rate (events/s), median of several runs.

    python bench/ingest_bench.py [--events 200000] [--runs 3]

Each run replays the same simulated file (realistic traffic from
``tokenward simulate``) into a fresh data folder in its own process (the
embedded engine binds one folder per process), once storing only and once
with the detectors, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def replay(path: Path, data_dir: Path, detect: bool) -> float:
    cmd = [sys.executable, "-m", "api", "replay", str(path), "--data-dir", str(data_dir),
           "--quiet", "--batch-size", "10000"]
    if not detect:
        cmd.append("--no-detect")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    return doc["read"] / doc["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--consumers", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src = t / "sim.jsonl"
        # The realistic profile averages ~0.27 calls/s per consumer: over-generate, then cut.
        hours = max(0.1, args.events / (args.consumers * 0.27 * 3600) * 1.3)
        subprocess.run([sys.executable, "-m", "api", "simulate", "--duration", f"{hours}h",
                        "--consumers", str(args.consumers), "--scenarios", "all", "--quiet",
                        "--out", str(src)], check=True)
        lines = src.read_text().splitlines()[: args.events]
        src.write_text("\n".join(lines) + "\n")
        print(f"events: {len(lines)} (realistic simulated traffic, {args.consumers} consumers)")
        results: dict[str, list[float]] = {"store only": [], "store + detectors": []}
        for i in range(args.runs):
            results["store only"].append(replay(src, t / f"a{i}", detect=False))
            results["store + detectors"].append(replay(src, t / f"b{i}", detect=True))
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            print(f"{k:>18}: median {med[k]:,.0f} events/s  (runs: "
                  + ", ".join(f"{x:,.0f}" for x in v) + ")")
        print(f"ratio detectors/store-only: {med['store + detectors'] / med['store only']:.2f}")


if __name__ == "__main__":
    main()
