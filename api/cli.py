"""The ``tokenward`` command line.

Settings come from flags, then ``TOKENWARD_*`` environment variables, then
defaults; they are read here, once, and passed down.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from api.settings import Settings, load_settings

log = logging.getLogger("tokenward")


# -- progress -------------------------------------------------------------------
class Progress:
    """A one-line progress display on stderr: redrawn on a terminal, a plain
    line every 10 s otherwise (CI logs), silent with --quiet."""

    def __init__(self, label: str, quiet: bool = False, total: int | None = None) -> None:
        self.label = label
        self.quiet = quiet
        self.total = total
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.fields: dict[str, int] = {}

    def update(self, done: int, **fields: int) -> None:
        self.fields = fields
        now = time.monotonic()
        if self.quiet or now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        self._draw(done, now)

    def _draw(self, done: int, now: float, end: str = "") -> None:
        rate = done / max(now - self.t0, 1e-9)
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        of = f"/{self.total}" if self.total else ""
        line = f"{self.label}: {done}{of} ({rate:,.0f}/s) {extra}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line + end)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self, done: int) -> float:
        now = time.monotonic()
        if not self.quiet:
            self._draw(done, now, end="\n" if self.tty else "")
        return now - self.t0


# -- shared flags -----------------------------------------------------------------
def _storage_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    g.add_argument("--data-dir", help="embedded ClickHouse data folder "
                   "(env TOKENWARD_DATA_DIR, default ./tokenward-data)")
    g.add_argument("--clickhouse-url", help="use a ClickHouse server instead "
                   "(env TOKENWARD_CLICKHOUSE_URL), e.g. http://default:@localhost:8123/")


def _config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration files")
    g.add_argument("--prices-file", help="price table TOML (env TOKENWARD_PRICES_FILE)")
    g.add_argument("--detectors-file", help="detector thresholds and overrides TOML "
                   "(env TOKENWARD_DETECTORS_FILE)")
    g.add_argument("--policy-file", help="alert/block policy, budgets, sinks TOML "
                   "(env TOKENWARD_POLICY_FILE)")
    g.add_argument("--auth-file", help="API tokens (hashes) and roles TOML "
                   "(env TOKENWARD_AUTH_FILE)")


def _kafka_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kafka")
    g.add_argument("--kafka-bootstrap", help="host:port[,...]; when set, consume the topic "
                   "(env TOKENWARD_KAFKA_BOOTSTRAP)")
    g.add_argument("--kafka-topic", help="usage topic (default tokenward.usage)")
    g.add_argument("--kafka-group", help="consumer group (default tokenward)")


def _settings(args: argparse.Namespace) -> Settings:
    keys = ("data_dir", "clickhouse_url", "prices_file", "detectors_file", "policy_file",
            "auth_file", "kafka_bootstrap", "kafka_topic", "kafka_group", "host", "port",
            "log_level")
    return load_settings(**{k: getattr(args, k, None) for k in keys})


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- run ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.service import build_service, start_kafka

    settings = _settings(args)
    _setup_logging(settings.log_level)
    svc = build_service(settings)
    start_kafka(svc)
    app = create_app(svc)
    where = settings.clickhouse_url or os.path.abspath(settings.data_dir)
    import detectors

    # which build of the detectors runs (compiled costs about half per event)
    log.info("tokenward listening on http://%s:%s (store: %s, kafka: %s, detectors: %s)",
             settings.host, settings.port, where, settings.kafka_bootstrap or "off",
             detectors.IMPLEMENTATION)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with
    # the handler it found installed.  With the default handler that would kill
    # the process before svc.close() saves the detector state and stops the
    # consumer; this one lets the shutdown below finish.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    access_log=False)
    finally:
        log.info("shutting down: saving detector state, stopping the consumer")
        svc.close()
    return 0


# -- replay ------------------------------------------------------------------------------
def _open_text(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_file_messages(paths: Sequence[str], fmt: str | None) -> Iterator[Any]:
    from ingest.source import RawMessage

    for path in paths:
        name = os.path.basename(path)
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                yield RawMessage(line, "file", f"{name}:{lineno}", fmt=fmt)


def cmd_replay(args: argparse.Namespace) -> int:
    from api.service import build_service

    settings = _settings(args)
    _setup_logging(settings.log_level)
    for p in args.files:
        if p != "-" and not os.path.isfile(p):
            print(f"tokenward replay: no such file: {p}", file=sys.stderr)
            return 2
    latest: dict[str, Any] = {}

    def collect(findings: Sequence[Any]) -> None:
        for f in findings:
            cur = latest.get(f.finding_id)
            if cur is None or f.revision >= cur.revision:
                latest[f.finding_id] = f

    # A replay is a backtest: detectors start from nothing (not from the live
    # service's saved state) and run on event time, so the same files give the
    # same findings every time.  Storage stays idempotent.
    svc = build_service(settings, detect=not args.no_detect, extra_sinks=[collect],
                        with_alerting=args.alert, state_scope=None)
    prog = Progress("replay", quiet=args.quiet)
    batch: list[Any] = []
    n = stored = dups = rejected = 0
    reasons: dict[str, int] = {}

    def flush() -> None:
        nonlocal stored, dups, rejected
        if not batch:
            return
        res = svc.pipeline.handle(batch)
        stored += res.accepted
        dups += res.duplicates
        rejected += len(res.rejected)
        for r in res.rejected:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        batch.clear()

    try:
        for msg in iter_file_messages(args.files, args.format):
            batch.append(msg)
            n += 1
            if len(batch) >= args.batch_size:
                flush()
                prog.update(n, stored=stored, duplicates=dups, rejected=rejected)
        flush()
    finally:
        secs = prog.finish(n)
        svc.close()
    summary = {
        "read": n, "stored": stored, "duplicates": dups, "rejected": rejected,
        "rejected_by_reason": reasons, "findings": len(latest),
        "seconds": round(secs, 3), "events_per_s": round(n / secs) if secs > 0 else None,
    }
    if args.findings:
        ordered = sorted(latest.values(), key=lambda f: (f.detected_at, f.finding_id))
        with open(args.findings, "w") as out:
            for f in ordered:
                out.write(json.dumps(f.to_json_dict(), sort_keys=True) + "\n")
    print(json.dumps(summary), file=sys.stderr if args.quiet_summary else sys.stdout)
    return 0


# -- sql -------------------------------------------------------------------------------------
READ_ONLY_START = ("select", "with", "show", "describe", "desc", "explain", "exists")


def check_read_only(query: str) -> str | None:
    """Analysts' queries are read-only: one statement of a reading kind.  The
    engine enforces readonly=1 as well; this gives a clearer message first."""
    q = query.strip().rstrip(";").strip()
    if not q:
        return "empty query"
    if ";" in q:
        return "one statement at a time"
    first = q.split(None, 1)[0].lower()
    if first not in READ_ONLY_START:
        return f"only read-only queries ({', '.join(READ_ONLY_START).upper()}) are allowed"
    return None


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def print_rows(cols: list[str], rows: Sequence[Sequence[Any]], fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        for r in rows:
            out.write(json.dumps(dict(zip(cols, r, strict=False)), default=str) + "\n")
    elif fmt == "csv":
        w = csv.writer(out)
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(v) if isinstance(v, dict | list) else v for v in r])
    else:
        cells = [[_cell(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        widths = [min(w, 60) for w in widths]
        out.write(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)) + "\n")
        out.write("-+-".join("-" * w for w in widths) + "\n")
        for row in cells:
            out.write(" | ".join(c[:60].ljust(w) for c, w in zip(row, widths, strict=False))
                      + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def cmd_sql(args: argparse.Namespace) -> int:
    problem = check_read_only(args.query)
    if problem:
        print(f"tokenward sql: {problem}", file=sys.stderr)
        return 2
    if args.api:
        import httpx

        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        r = httpx.post(args.api.rstrip("/") + "/v1/query", json={"sql": args.query},
                       headers=headers, timeout=60)
        if r.status_code != 200:
            print(f"tokenward sql: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        doc = r.json()
        print_rows(doc["columns"], doc["rows"], args.format, sys.stdout)
        return 0
    from ingest.store import DataDirLocked, open_store

    settings = _settings(args)
    try:
        store = open_store(settings.data_dir, settings.clickhouse_url)
    except DataDirLocked as exc:
        print(f"tokenward sql: {exc}", file=sys.stderr)
        return 1
    try:
        cols, rows = store.query_table(args.query, readonly=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"tokenward sql: query failed: {msg}", file=sys.stderr)
        return 1
    print_rows(cols, rows, args.format, sys.stdout)
    return 0


# -- schema --------------------------------------------------------------------------------
def cmd_schema(args: argparse.Namespace) -> int:
    from ingest.event import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


# -- simulate / evaluate ------------------------------------------------------------------------
def _parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: use seconds or a number with s/m/h/d (e.g. 30m)"
        ) from None


def _scenarios(text: str | None) -> str | list[str]:
    if not text or text.strip() in ("none", "all"):
        return (text or "none").strip()
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_simulate(args: argparse.Namespace) -> int:
    from ingest import simulator

    start = datetime.fromisoformat(args.start.replace("Z", "+00:00")) if args.start else None
    kw: dict[str, Any] = {
        "seed": args.seed, "duration_s": args.duration, "n_consumers": args.consumers,
        "profile": args.profile, "rate_scale": args.rate_scale,
        "scenarios": _scenarios(args.scenarios),
    }
    if start is not None:
        kw["start"] = start.astimezone(UTC)
    if args.tenants:
        kw["n_tenants"] = args.tenants
    cfg = simulator.SimConfig(**kw)
    sim = simulator.Simulation(cfg)
    prog = Progress("simulate", quiet=args.quiet)
    n = 0
    sink = _event_sink(args)
    try:
        for ev in sim.events():
            sink.send(ev)
            n += 1
            if n % 1000 == 0:
                prog.update(n)
    finally:
        sink.close()
        prog.finish(n)
    if args.labels:
        with open(args.labels, "w") as fh:
            for lab in sim.labels:
                fh.write(json.dumps(lab, default=str) + "\n")
    return 0


class _EventSink:
    def send(self, ev: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _event_sink(args: argparse.Namespace) -> _EventSink:
    if args.to_http:
        return _HttpSink(args.to_http, args.token)
    if args.to_kafka:
        return _KafkaSink(args.to_kafka, args.kafka_topic or "tokenward.usage")
    return _FileSink(args.out)


class _FileSink(_EventSink):
    def __init__(self, path: str | None) -> None:
        self.own = bool(path and path != "-")
        if self.own and path:
            self.fh: IO[str] = (
                gzip.open(path, "wt") if path.endswith(".gz")  # noqa: SIM115
                else open(path, "w")  # noqa: SIM115
            )
        else:
            self.fh = sys.stdout

    def send(self, ev: dict[str, Any]) -> None:
        self.fh.write(json.dumps(ev, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.own:
            self.fh.close()
        else:
            self.fh.flush()


class _HttpSink(_EventSink):
    def __init__(self, url: str, token: str | None) -> None:
        import httpx

        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1/events")
                                      else "/v1/events")
        headers = {"Content-Type": "application/x-ndjson"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(headers=headers, timeout=60)
        self.buf: list[str] = []

    def send(self, ev: dict[str, Any]) -> None:
        self.buf.append(json.dumps(ev, separators=(",", ":")))
        if len(self.buf) >= 1000:
            self._flush()

    def _flush(self) -> None:
        if not self.buf:
            return
        body = "\n".join(self.buf).encode()
        self.buf.clear()
        for attempt in range(6):
            r = self.client.post(self.url, content=body)
            if r.status_code == 200:
                return
            if r.status_code in (429, 503):
                time.sleep(min(2**attempt, 10))
                continue
            raise SystemExit(f"tokenward simulate: {self.url} answered {r.status_code}: "
                             f"{r.text[:200]}")
        raise SystemExit(f"tokenward simulate: {self.url} kept refusing the events")

    def close(self) -> None:
        self._flush()
        self.client.close()


class _KafkaSink(_EventSink):
    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                      batch_size=256 * 1024, acks="all")
        self.topic = topic

    def send(self, ev: dict[str, Any]) -> None:
        # Keyed by consumer: one consumer's events stay in one partition, which
        # owns that consumer's baseline.
        self.producer.send(self.topic, json.dumps(ev, separators=(",", ":")).encode(),
                           key=str(ev.get("consumer", "")).encode())

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    out = []
    with _open_text(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detectors.scoring import breakdown, format_breakdown, format_report, score

    by = tuple(f.strip() for f in args.by.split(",") if f.strip()) if args.by else ()
    try:
        breakdown({"detected": [], "missed": []}, by)  # a wrong field fails before the work
    except ValueError as exc:
        print(f"tokenward evaluate: --by: {exc}", file=sys.stderr)
        return 2

    labels = _read_jsonl(args.labels)
    findings = _read_jsonl(args.findings)
    # Consumer-hours of traffic: per consumer, the span it was active, from the events.
    spans: dict[str, list[str]] = {}
    with _open_text(args.events) as fh:
        for line in fh:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict) or "consumer" not in ev or "ts" not in ev:
                continue
            s = spans.setdefault(str(ev["consumer"]), [ev["ts"], ev["ts"]])
            s[0] = min(s[0], ev["ts"])
            s[1] = max(s[1], ev["ts"])
    hours = 0.0
    for a, b in spans.values():
        ta = datetime.fromisoformat(a.replace("Z", "+00:00"))
        tb = datetime.fromisoformat(b.replace("Z", "+00:00"))
        hours += max((tb - ta).total_seconds(), 60.0) / 3600
    report = score(labels, findings, consumer_hours=hours, grace_s=args.grace)
    if by:
        report["breakdown"] = breakdown(report, by)
    if args.json:
        print(json.dumps(report, default=str, indent=2))
    else:
        print(format_report(report))
        if by:
            print()
            print(format_breakdown(report["breakdown"], by))
    return 0


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenward",
        description="Streaming observability and anomaly detection for LLM token spend.",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="run the service: HTTP API (+ Kafka consumption if set)",
                       description="Run the service: HTTP API on --host/--port, and Kafka "
                       "consumption when --kafka-bootstrap is set.")
    r.add_argument("--host", help="listen address (env TOKENWARD_HOST, default 127.0.0.1)")
    r.add_argument("--port", type=int, help="listen port (env TOKENWARD_PORT, default 8000)")
    _storage_flags(r)
    _kafka_flags(r)
    _config_flags(r)
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="process event files on event time and store them",
                        description="Process JSONL files (optionally gzip) in file order, on "
                        "the events' own timestamps: store every valid event once, record "
                        "every bad line with its reason, and run the detectors.")
    rp.add_argument("files", nargs="+", metavar="FILE", help="JSONL file(s); '-' = stdin")
    rp.add_argument("--format", default=None,
                    choices=["canonical", "openai", "anthropic", "otel", "litellm", "higress"],
                    help="input format (default: auto-detect per line)")
    rp.add_argument("--findings", metavar="OUT.jsonl",
                    help="write the findings (one per line, latest state) here")
    rp.add_argument("--batch-size", type=int, default=5000)
    rp.add_argument("--no-detect", action="store_true", help="store only, run no detectors")
    rp.add_argument("--alert", action="store_true",
                    help="also send alerts/blocks per the policy (off by default: a backtest)")
    rp.add_argument("--quiet", action="store_true", help="no progress display")
    rp.add_argument("--quiet-summary", action="store_true", help="summary to stderr")
    _storage_flags(rp)
    _config_flags(rp)
    rp.set_defaults(func=cmd_replay)

    q = sub.add_parser("sql", help="run a read-only query against the store",
                       description="Run a read-only ClickHouse query (embedded or server).")
    q.add_argument("query", help='e.g. "SELECT count() FROM tokenward.usage_events"')
    q.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="json = one JSON object per row (like JSONEachRow)")
    q.add_argument("--api", help="query a running service instead (its /v1/query)")
    q.add_argument("--token", default=os.environ.get("TOKENWARD_TOKEN"),
                   help="bearer token for --api (env TOKENWARD_TOKEN)")
    _storage_flags(q)
    q.set_defaults(func=cmd_sql)

    s = sub.add_parser("schema", help="print the JSON Schema of usage event v1")
    s.add_argument("--out", help="write to a file instead of stdout")
    s.set_defaults(func=cmd_schema)

    sm = sub.add_parser("simulate", help="generate realistic (optionally anomalous) traffic",
                        description="Generate realistic usage events: arrival patterns, token "
                        "sizes and reasoning ratios from public LLM traces, background errors "
                        "and client retries, optionally with labelled anomaly scenarios.")
    sm.add_argument("--seed", type=int, default=1)
    sm.add_argument("--duration", type=_parse_duration, default=3600.0,
                    help="event-time span (seconds, or 30m, 6h, 1d)")
    sm.add_argument("--consumers", type=int, default=200)
    sm.add_argument("--tenants", type=int, default=None)
    sm.add_argument("--start", help="first event time, RFC 3339 (default 2026-01-05T00:00Z)")
    sm.add_argument("--profile", choices=["realistic", "reference"], default="realistic",
                    help="reference = every call 2048 input / 256 output tokens")
    sm.add_argument("--scenarios", default=None,
                    help="comma list of anomaly scenarios, 'all' or 'none' (default none)")
    sm.add_argument("--rate-scale", type=float, default=1.0, help="multiply all rates")
    sm.add_argument("--out", "-o", help="events JSONL file (.gz compresses); default stdout")
    sm.add_argument("--labels", help="write the anomaly labels (JSONL) here")
    sm.add_argument("--to-http", metavar="URL", help="POST events to a running tokenward")
    sm.add_argument("--to-kafka", metavar="BOOTSTRAP", help="produce events to Kafka")
    sm.add_argument("--kafka-topic")
    sm.add_argument("--token", default=os.environ.get("TOKENWARD_TOKEN"))
    sm.add_argument("--quiet", action="store_true")
    sm.set_defaults(func=cmd_simulate)

    ev = sub.add_parser("evaluate", help="score findings against labelled anomalies",
                        description="Precision, recall and detection delay per kind.")
    ev.add_argument("--events", required=True, help="the events JSONL the findings came from")
    ev.add_argument("--labels", required=True, help="labels JSONL from tokenward simulate")
    ev.add_argument("--findings", required=True, help="findings JSONL from tokenward replay")
    ev.add_argument("--grace", type=float, default=300.0,
                    help="seconds after a label's end a detection still counts")
    ev.add_argument("--by", default="", metavar="FIELDS",
                    help="also recall and delay per label scenario: comma-separated of "
                         "shape, variant, victim_size (e.g. shape,victim_size)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    from api import demo

    demo.register(sub, _storage_flags, _config_flags, _settings)
    try:
        from api import commands  # block, unblock, token-hash (alerting layer)
    except ImportError:
        commands = None  # type: ignore[assignment]
    if commands is not None:
        commands.register(sub, _storage_flags, _config_flags, _settings)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        if "chdb" in sys.modules and argv is None:
            # Everything is stored and closed; chdb 4.4 can crash in its own
            # teardown threads at interpreter exit, so leave without it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"))  # noqa: SIM115
        return 0


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
    sys.exit(main())
