"""The command line, run as users run it (subprocesses, each with its own data folder)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest


def tw(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "api", *args], capture_output=True, text=True,
                       timeout=300, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"tokenward {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


def write_mixed_file(path, n=300):
    lines = []
    for i in range(n):
        lines.append(json.dumps({
            "event_id": f"f-{i}", "ts": f"2026-01-05T10:{i // 60:02d}:{i % 60:02d}Z",
            "consumer": f"c{i % 5}", "model": "gpt-4o-mini", "status": 200,
            "input_tokens": 300, "output_tokens": 40}))
    bad = ["{broken", '{"event_id": "nope"}', '{"event_id":"b3","ts":"2026-01-05T10:00:00Z",'
           '"consumer":"c","model":"m","status":200,"output_tokens":-3}', "[]"]
    dup = lines[:25]
    with open(path, "w") as fh:
        fh.write("\n".join(lines + bad + dup) + "\n")
    return n, len(bad), len(dup)


def test_replay_stores_once_rejects_bad_and_is_idempotent(tmp_path):
    f = tmp_path / "events.jsonl"
    n, nbad, ndup = write_mixed_file(f)
    d = str(tmp_path / "data")
    out = json.loads(tw("replay", str(f), "--data-dir", d, "--quiet").stdout)
    assert (out["stored"], out["rejected"], out["duplicates"]) == (n, nbad, ndup)
    assert out["rejected_by_reason"] == {"invalid_json": 1, "missing_field": 1,
                                         "invalid_value": 1, "not_an_object": 1}
    q = tw("sql", "SELECT count() AS n FROM tokenward.usage_events", "--format", "json",
           "--data-dir", d).stdout
    assert json.loads(q) == {"n": n}
    again = json.loads(tw("replay", str(f), "--data-dir", d, "--quiet").stdout)
    assert again["stored"] == 0 and again["duplicates"] == n + ndup
    q = tw("sql", "SELECT count() AS n FROM tokenward.usage_events", "--format", "json",
           "--data-dir", d).stdout
    assert json.loads(q) == {"n": n}
    rej = tw("sql", "SELECT count() AS n FROM tokenward.rejected_events", "--format", "json",
             "--data-dir", d).stdout
    assert json.loads(rej) == {"n": nbad}


def test_replay_gzip_and_sql_formats(tmp_path):
    f = tmp_path / "e.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        for i in range(10):
            fh.write(json.dumps({"event_id": f"g{i}", "ts": "2026-01-05T10:00:00Z",
                                 "consumer": "a,b", "model": "gpt-4o", "status": 200}) + "\n")
    d = str(tmp_path / "data")
    tw("replay", str(f), "--data-dir", d, "--quiet")
    csv_out = tw("sql", "SELECT consumer, count() AS n FROM tokenward.usage_events GROUP BY "
                 "consumer", "--format", "csv", "--data-dir", d).stdout
    assert csv_out.splitlines() == ["consumer,n", '"a,b",10']
    table = tw("sql", "SELECT 1 AS one", "--data-dir", d).stdout
    assert "one" in table and "(1 row)" in table


def test_sql_refuses_writes_with_a_clear_message(tmp_path):
    r = tw("sql", "DROP TABLE tokenward.usage_events", "--data-dir", str(tmp_path), check=False)
    assert r.returncode == 2 and "read-only" in r.stderr
    r = tw("sql", "SELECT nosuchcolumn FROM tokenward.usage_events", "--data-dir",
           str(tmp_path), check=False)
    assert r.returncode == 1 and "query failed" in r.stderr and "Traceback" not in r.stderr


def test_bad_config_fails_at_start_with_what_to_fix(tmp_path):
    r = tw("replay", "x.jsonl", "--prices-file", str(tmp_path / "missing.toml"), check=False)
    assert r.returncode != 0 and "prices_file" in r.stderr and "not found" in r.stderr
    r = tw("run", "--kafka-bootstrap", "nohostport", "--data-dir", str(tmp_path), check=False)
    assert r.returncode != 0 and "kafka_bootstrap" in r.stderr and "host:port" in r.stderr


def test_schema_command_prints_json_schema():
    doc = json.loads(tw("schema").stdout)
    assert doc["title"] == "tokenward usage event v1"
    assert set(doc["required"]) == {"event_id", "ts", "consumer", "model", "status"}


@pytest.mark.parametrize("cmd", ["run", "replay", "sql", "simulate", "evaluate", "schema"])
def test_help_everywhere(cmd):
    assert "usage: tokenward" in tw(cmd, "--help").stdout


def test_simulate_reference_profile_to_file(tmp_path):
    out = tmp_path / "sim.jsonl"
    tw("simulate", "--profile", "reference", "--duration", "5m", "--consumers", "20",
       "--out", str(out), "--quiet")
    evs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(evs) > 50
    ok = [e for e in evs if e["status"] == 200]
    assert {e["input_tokens"] for e in ok} == {2048}
    assert {e["output_tokens"] for e in ok} == {256}


def test_backtest_simulate_replay_evaluate(tmp_path):
    """The analysts' loop (docs/detectors.md, Evaluation): labelled traffic,
    findings on the events' own clock, and the per-kind and per-scenario
    scores of those findings."""
    ev, lab, fnd = (tmp_path / n for n in ("E.jsonl", "L.jsonl", "F.jsonl"))
    tw("simulate", "--seed", "3", "--duration", "2h", "--consumers", "20", "--scenarios",
       "retry_storm,runaway_reasoning,agent_loop", "--out", str(ev), "--labels", str(lab),
       "--quiet")
    labels = [json.loads(x) for x in lab.read_text().splitlines()]
    kinds = {x["kind"] for x in labels}
    assert kinds == {"retry_storm", "runaway_reasoning", "agent_loop"}
    summary = json.loads(tw("replay", str(ev), "--data-dir", str(tmp_path / "d"), "--findings",
                            str(fnd), "--quiet").stdout)
    assert summary["findings"] == len(fnd.read_text().splitlines()) > 0
    report = json.loads(tw("evaluate", "--events", str(ev), "--labels", str(lab), "--findings",
                           str(fnd), "--json", "--by", "shape").stdout)
    for k in kinds:
        s = report["kinds"][k]
        assert s["labels"] == sum(x["kind"] == k for x in labels)
        assert s["recall"] >= 0.5 and s["precision"] >= 0.5, (k, s)
        rows = [r for r in report["breakdown"] if r["kind"] == k]
        assert {r["shape"] for r in rows} == {x["shape"] for x in labels if x["kind"] == k}
        assert sum(r["labels"] for r in rows) == s["labels"]
        assert sum(r["detected"] for r in rows) == s["detected"]
    table = tw("evaluate", "--events", str(ev), "--labels", str(lab), "--findings", str(fnd),
               "--by", "shape,victim_size").stdout
    head = [x.split() for x in table.splitlines() if x.startswith("kind")]
    assert head[-1][:3] == ["kind", "shape", "victim_size"]
    bad = tw("evaluate", "--events", str(ev), "--labels", str(lab), "--findings", str(fnd),
             "--by", "colour", check=False)
    assert bad.returncode == 2 and "cannot break down by colour" in bad.stderr
