"""Derive the compact traffic profile the simulator draws from.

Reads the public traces in ``/work/shared/data`` (see its README) and writes
``ingest/data/traffic_profile.json``: quantile tables, histograms and a few
fitted figures, never raw traces.  Quantile tables are 101 values at the
percentiles 0, 1, ..., 100 so that the simulator samples them in O(1).

Sources (credited in the output's ``sources`` section):

- Azure LLM inference trace 2023 (Azure/AzurePublicDataset), CC-BY 4.0
- Mooncake conversation trace (kvcache-ai/Mooncake, FAST'25), Apache-2.0
- ServeGen language and deepseek-r1 reasoning traces (alibaba/ServeGen), Apache-2.0
- tau-bench historical trajectories, gpt-4o airline (sierra-research/tau-bench), MIT

Usage: ``python tools/derive_traffic_profile.py [DATA_DIR] [OUT_JSON]``
"""

from __future__ import annotations

import ast
import csv
import itertools
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from statistics import median, pstdev
from typing import Any

import numpy as np

DATA = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/data")
OUT = (
    Path(sys.argv[2])
    if len(sys.argv) > 2
    else Path(__file__).resolve().parents[1] / "ingest" / "data" / "traffic_profile.json"
)
PCTS = np.arange(101)


def pct_table(values: Sequence[float] | np.ndarray, digits: int = 4) -> list[float]:
    arr = np.asarray(values, dtype=float)
    return [round(float(x), digits) for x in np.percentile(arr, PCTS)]


def weighted_pct_table(values: np.ndarray, weights: np.ndarray, digits: int = 4) -> list[float]:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cdf = np.cumsum(w) / w.sum()
    out = []
    for p in PCTS / 100.0:
        i = int(np.searchsorted(cdf, p, side="left"))
        out.append(round(float(v[min(i, len(v) - 1)]), digits))
    return out


def cv(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return pstdev(xs) / m if m > 0 else 0.0


def azure(name: str) -> dict:
    path = DATA / "azure_llm_2023" / f"AzureLLMInferenceTrace_{name}.csv"
    ts, inp, out = [], [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            t = datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f")
            ts.append(t.timestamp())
            inp.append(int(row["ContextTokens"]))
            out.append(int(row["GeneratedTokens"]))
    t0 = min(ts)
    minutes = Counter(int((t - t0) // 60) for t in ts)
    n_min = max(minutes) + 1
    counts = [minutes.get(i, 0) for i in range(n_min)]
    med = median(counts)
    ts.sort()
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    return {
        "input": pct_table(inp, 0),
        "output": pct_table(out, 0),
        "minute_counts": {
            "minutes": n_min,
            "empty_fraction": round(sum(c == 0 for c in counts) / n_min, 4),
            "median": med,
            "max_over_median": round(max(counts) / med, 3) if med else None,
            "ratio_to_median": pct_table([c / med for c in counts], 3) if med else None,
        },
        "interarrival_cv": round(cv(gaps), 3),
        "requests": len(ts),
    }


def mooncake() -> dict:
    inp, out, frac = [], [], []
    seen: set[int] = set()
    exact: Counter[tuple[int, ...]] = Counter()
    first_block: Counter[int] = Counter()
    with (DATA / "mooncake" / "conversation_trace.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            ids = r["hash_ids"]
            n = 0
            for h in ids:
                if h in seen:
                    n += 1
                else:
                    break
            il = int(r["input_length"])
            inp.append(il)
            out.append(int(r["output_length"]))
            frac.append(min(1.0, n * 512 / il) if il else 0.0)
            seen.update(ids)
            exact[tuple(ids)] += 1
            if ids:
                first_block[ids[0]] += 1
    nreq = len(inp)
    shared = [x for x in frac if x > 0]
    return {
        "input": pct_table(inp, 0),
        "output": pct_table(out, 0),
        "requests": nreq,
        "prefix_sharing": {
            "block_tokens": 512,
            "share_rate": round(len(shared) / nreq, 4),
            "cached_fraction_when_shared": pct_table(shared, 3),
            "exact_repeat_rate": round(sum(c - 1 for c in exact.values()) / nreq, 4),
            "top_first_block_share": round(max(first_block.values()) / nreq, 4),
        },
    }


def servegen_language() -> dict:
    base = DATA / "servegen" / "data" / "language"
    client_rates: list[float] = []
    by_group: dict[str, list[float]] = {}
    total = np.zeros(2016)
    cvs: list[float] = []
    window_ratio: list[float] = []
    empty_windows: list[float] = []
    dists: Counter[str] = Counter()
    for group in ("m-large", "m-mid", "m-small"):
        for path in sorted((base / group).glob("chunk-*-trace.csv")):
            rates = []
            with path.open() as f:
                for row in csv.reader(f):
                    i = int(float(row[0])) // 600
                    r = float(row[1])
                    rates.append(r)
                    if i < len(total):
                        total[i] += r
                    if r > 0 and row[2]:
                        c = float(row[2])
                        if math.isfinite(c):
                            cvs.append(c)
                        dists[row[3]] += 1
            mean = sum(rates) / len(rates)
            if mean <= 0:
                continue
            client_rates.append(mean)
            by_group.setdefault(group, []).append(mean)
            pos = [r for r in rates if r > 0]
            med = median(pos) if pos else 0
            empty_windows.append(1 - len(pos) / len(rates))
            if med > 0:
                window_ratio.extend(r / med for r in rates)
    hours = np.zeros(24)
    for i, v in enumerate(total):
        hours[(i * 600 % 86400) // 3600] += v
    hours = hours / hours.mean()
    days = total[: 14 * 144].reshape(14, 144).sum(axis=1)
    return {
        "clients": len(client_rates),
        "client_mean_rps": pct_table(client_rates, 6),
        "client_mean_rps_by_group": {g: pct_table(v, 6)[::10] for g, v in by_group.items()},
        "daily_cycle_hourly": [round(float(x), 3) for x in hours],
        "weekday_multipliers": [round(float(x), 3) for x in days / days.mean()],
        "window_cv": pct_table(cvs, 3),
        "window_rate_ratio_to_client_median": pct_table(window_ratio, 3),
        "client_empty_window_fraction": pct_table(empty_windows, 3),
        "interarrival_families": dict(dists.most_common()),
    }


def _pmf(text: str) -> dict[float, float]:
    d = ast.literal_eval(text)
    return {float(k): float(v) for k, v in d.items()}


def servegen_reason() -> dict:
    base = DATA / "servegen" / "data" / "reason" / "deepseek-r1"
    acc: dict[str, dict[float, float]] = {k: {} for k in ("input_tokens", "output_tokens",
                                                              "reason_ratio")}
    client_rates = []
    for path in sorted(base.glob("chunk-*-dataset.json")):
        trace = path.with_name(path.name.replace("dataset.json", "trace.csv"))
        rates = []
        with trace.open() as f:
            rates = [float(row[1]) for row in csv.reader(f)]
        mean = sum(rates) / max(1, len(rates))
        if mean > 0:
            client_rates.append(mean)
        spec = json.loads(path.read_text())
        for start, entry in spec.items():
            s = int(start) // 600
            # weight each 6-hour distribution by that client's requests in it
            weight = sum(rates[s : s + 36]) * 600
            if weight <= 0:
                continue
            for key in acc:
                for v, p in _pmf(entry[key]).items():
                    acc[key][v] = acc[key].get(v, 0.0) + p * weight
    out: dict[str, Any] = {}
    for key, pm in acc.items():
        vals = np.array(list(pm.keys()))
        w = np.array(list(pm.values()))
        out[key] = weighted_pct_table(vals, w, 4 if key == "reason_ratio" else 0)
    out["client_mean_rps"] = pct_table(client_rates, 6)
    out["clients"] = len(client_rates)
    return out


def tau_bench() -> dict:
    runs = json.loads((DATA / "tau_bench" / "gpt-4o-airline.json").read_text())
    tools, calls, turns = [], [], []
    for run in runs:
        traj = run["traj"]
        tools.append(sum(len(m.get("tool_calls") or []) for m in traj
                         if m.get("role") == "assistant"))
        calls.append(sum(1 for m in traj if m.get("role") == "assistant"))
        turns.append(sum(1 for m in traj if m.get("role") == "user"))

    def hist(xs: list[int]) -> dict[str, int]:
        return {str(k): v for k, v in sorted(Counter(xs).items())}

    return {
        "runs": len(runs),
        "tool_calls_per_run": hist(tools),
        "llm_calls_per_run": hist(calls),
        "user_turns_per_session": hist(turns),
        "tool_calls_quantiles": {p: float(np.percentile(tools, p)) for p in (50, 90, 99, 100)},
    }


def main() -> None:
    code, conv = azure("code"), azure("conv")
    profile: dict[str, Any] = {
        "version": 1,
        "about": "Compact traffic profile for ingest/simulator.py, derived by "
                 "tools/derive_traffic_profile.py. Quantile tables hold the 0th..100th "
                 "percentiles (101 values).",
        "sources": {
            "azure_llm_2023": {
                "what": "Azure LLM inference trace 2023, code and conversation "
                        "(Azure/AzurePublicDataset)",
                "licence": "CC-BY 4.0",
                "used_for": "chat and code token sizes, per-minute burstiness, inter-arrival cv",
            },
            "mooncake": {
                "what": "Mooncake conversation trace (kvcache-ai/Mooncake, FAST'25)",
                "licence": "Apache-2.0",
                "used_for": "long-context token sizes, prefix sharing (prompt-cache hits)",
            },
            "servegen": {
                "what": "Alibaba ServeGen language and deepseek-r1 reasoning traces "
                        "(alibaba/ServeGen)",
                "licence": "Apache-2.0",
                "used_for": "client size distribution, daily cycle, window cv, reasoning "
                            "token sizes and reason_ratio",
            },
            "tau_bench": {
                "what": "tau-bench historical trajectories, gpt-4o airline "
                        "(sierra-research/tau-bench)",
                "licence": "MIT",
                "used_for": "tool calls per agent run, LLM calls per run, user turns",
            },
        },
        "tokens": {
            "chat": {"input": conv["input"], "output": conv["output"]},
            "code": {"input": code["input"], "output": code["output"]},
            "long_context": {},
            "reasoning": {},
        },
        "burstiness": {
            "azure_code": code["minute_counts"] | {"interarrival_cv": code["interarrival_cv"]},
            "azure_conv": conv["minute_counts"] | {"interarrival_cv": conv["interarrival_cv"]},
        },
    }
    mc = mooncake()
    profile["tokens"]["long_context"] = {"input": mc["input"], "output": mc["output"]}
    profile["prefix_sharing"] = mc["prefix_sharing"]
    rs = servegen_reason()
    profile["tokens"]["reasoning"] = {
        "input": rs["input_tokens"], "output": rs["output_tokens"],
        "reason_ratio": rs["reason_ratio"],
    }
    lang = servegen_language()
    profile["rates"] = {
        "daily_cycle_hourly": lang["daily_cycle_hourly"],
        "daily_cycle_note": "hour of day as in the ServeGen trace clock; the simulator "
                            "shifts it per tenant time zone",
        "weekday_multipliers": lang["weekday_multipliers"],
        "client_mean_rps": lang["client_mean_rps"],
        "client_mean_rps_by_group": lang["client_mean_rps_by_group"],
        "reasoning_client_mean_rps": rs["client_mean_rps"],
        "window_cv": lang["window_cv"],
        "window_rate_ratio_to_client_median": lang["window_rate_ratio_to_client_median"],
        "client_empty_window_fraction": lang["client_empty_window_fraction"],
        "interarrival_families": lang["interarrival_families"],
        "clients": lang["clients"],
    }
    profile["agents"] = tau_bench()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(profile, separators=(",", ":"))
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({len(text) / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
