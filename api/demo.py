"""``tokenward demo``: the whole service on the embedded default, fed with
realistic simulated traffic in which the classic incidents happen.

Simulated time runs ``--speed`` times faster than the wall clock and starts a
little in the past, so that baselines exist (warm-up) before the first
incident; detection runs on the events' own time as always.  The API is served
the whole time, and the data stays in the data folder for ``tokenward sql``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

DEMO_SCENARIOS = ["retry_storm", "runaway_reasoning", "failure_spike", "token_spike",
                  "agent_loop", "failure_spike_model", "cost_spike"]

_COLOURS = {"critical": "\x1b[31m", "warning": "\x1b[33m", "info": "\x1b[36m"}


def _fmt_num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


class Printer:
    """Prints findings, alerts and blocks as they happen, one line each."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def line(self, text: str, severity: str = "") -> None:
        with self.lock:
            if self.colour and severity in _COLOURS:
                text = f"{_COLOURS[severity]}{text}\x1b[0m"
            sys.stdout.write("\r\x1b[K" + text + "\n" if self.colour else text + "\n")
            sys.stdout.flush()

    def findings(self, findings: Sequence[Any]) -> None:
        for f in findings:
            at = f.detected_at.strftime("%H:%M:%S")
            if f.status == "resolved":
                self.line(f"[{at}] resolved  {f.kind:<18} {f.scope}={f.subject}")
                continue
            if f.revision > 0:
                continue
            self.counts[f.kind] = self.counts.get(f.kind, 0) + 1
            self.line(
                f"[{at}] {f.severity:<8}  {f.kind:<18} {f.scope}={f.subject} "
                f"tenant={f.tenant} observed={_fmt_num(f.observed)} "
                f"baseline={_fmt_num(f.baseline)} threshold={_fmt_num(f.threshold)} "
                f"-> {f.action}",
                f.severity,
            )


def _serve(app: Any, host: str, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, name="api", daemon=True)
    t.start()
    return server, t


def cmd_demo(args: argparse.Namespace, settings_fn: Callable[[argparse.Namespace], Any]) -> int:
    from api.app import create_app
    from api.cli import Progress
    from api.service import build_service
    from ingest import simulator
    from ingest.source import RawMessage

    settings = settings_fn(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    printer = Printer(colour=sys.stdout.isatty() and not args.no_colour)
    svc = build_service(settings, extra_sinks=[printer.findings], state_scope=None)
    blocklist = getattr(svc.alerting, "blocklist", None)
    server = None
    if not args.no_api:
        server, _ = _serve(create_app(svc), settings.host, settings.port)
        printer.line(f"API on http://{settings.host}:{settings.port} (docs: /docs, block list: "
                     f"/v1/blocklist, findings: /v1/findings, metrics: /metrics)")

    # Simulated time: warm-up in the past, then `speed` x the wall clock.
    warmup = timedelta(minutes=args.warmup_minutes)
    sim_start = datetime.now(UTC).replace(microsecond=0) - warmup
    # Until interrupted: a day of simulated traffic with an incident of each kind
    # every two simulated hours or so, so that something keeps happening.
    live_s = args.duration * args.speed if args.duration else 86400.0
    incidents = max(args.incidents, round(live_s / 7200)) if not args.duration else args.incidents
    cfg = simulator.SimConfig(
        seed=args.seed, start=sim_start, duration_s=live_s + warmup.total_seconds(),
        n_consumers=args.consumers, scenarios=DEMO_SCENARIOS,
        warmup_s=warmup.total_seconds(), episodes_per_kind=incidents,
    )
    sim = simulator.Simulation(cfg)
    printer.line(
        f"simulating {args.consumers} consumers from {sim_start:%Y-%m-%d %H:%M} UTC at "
        f"{args.speed:g}x; {args.warmup_minutes} min of warm-up traffic first (baselines)")
    printer.line(f"data folder: {settings.clickhouse_url or settings.data_dir}")
    stop = threading.Event()

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the demo as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    wall0 = time.monotonic()
    deadline = wall0 + args.duration if args.duration else None
    prog = Progress("demo", quiet=args.quiet)
    batch: list[Any] = []
    n = 0
    seen_blocks: set[tuple[str, str]] = set()

    def flush() -> None:
        if batch:
            svc.pipeline.handle(batch)
            batch.clear()
        if blocklist is not None:
            for e in blocklist.entries():
                key = (e.scope, e.value)
                if key not in seen_blocks:
                    seen_blocks.add(key)
                    exp = getattr(e, "expires_at", None)
                    until = "until unblocked"
                    if exp is not None:
                        wall = datetime.fromtimestamp(exp, UTC)
                        until = f"until {wall:%H:%M:%S} UTC (wall clock)"
                    printer.line(f"           BLOCKED {e.scope}={e.value} {until}: {e.reason}",
                                 "critical")
            current = {(e.scope, e.value) for e in blocklist.entries()}
            for key in list(seen_blocks - current):
                seen_blocks.discard(key)
                printer.line(f"           unblocked {key[0]}={key[1]} (expired)")

    try:
        for ev in sim.events():
            ts = datetime.fromisoformat(ev["ts"].replace("Z", "+00:00"))
            sim_elapsed = (ts - sim_start).total_seconds() - warmup.total_seconds()
            if sim_elapsed > 0:
                # Pace: simulated second s is due at wall second s / speed.
                due = wall0 + sim_elapsed / args.speed
                now = time.monotonic()
                if due > now + 0.2:
                    flush()
                    time.sleep(min(due - now, 1.0))
            if deadline is not None and time.monotonic() >= deadline:
                break
            batch.append(RawMessage(json.dumps(ev).encode(), "simulator", f"demo:{n}"))
            n += 1
            if len(batch) >= 2000:
                flush()
            prog.update(n, findings=sum(printer.counts.values()))
            if stop.is_set():
                break
        flush()
    except KeyboardInterrupt:
        printer.line("interrupted; stopping cleanly")
    finally:
        with contextlib.suppress(Exception):
            flush()
        prog.finish(n)
        if server is not None:
            server.should_exit = True
        svc.close()
    printer.line("findings by kind: " + (", ".join(
        f"{k}={v}" for k, v in sorted(printer.counts.items())) or "none"))
    printer.line('query the data: tokenward sql "SELECT kind, severity, subject, summary '
                 'FROM tokenward.findings_latest ORDER BY detected_at"'
                 + (f" --data-dir {settings.data_dir}" if args.data_dir else ""))
    return 0


def register(sub: Any, storage_flags: Callable[..., None], config_flags: Callable[..., None],
             settings_fn: Callable[[argparse.Namespace], Any]) -> None:
    d = sub.add_parser(
        "demo", help="run the whole service on simulated traffic with incidents",
        description="Run the service on the embedded default with realistic simulated "
        "traffic in which a retry storm, a runaway reasoning call, a failure spike, a token "
        "spike and an agent loop happen; print findings, alerts and blocks as they occur; "
        "serve the API; keep the data for tokenward sql.")
    d.add_argument("--duration", type=float, default=0,
                   help="stop after this many wall-clock seconds (default: until Ctrl-C)")
    d.add_argument("--speed", type=float, default=60.0,
                   help="simulated seconds per wall-clock second (default 60)")
    d.add_argument("--warmup-minutes", type=int, default=90,
                   help="simulated minutes of normal traffic before incidents (baselines)")
    d.add_argument("--consumers", type=int, default=80)
    d.add_argument("--incidents", type=int, default=1, help="incidents of each kind")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--host", help="API listen address (default 127.0.0.1)")
    d.add_argument("--port", type=int, help="API port (default 8000)")
    d.add_argument("--no-api", action="store_true", help="do not serve the API")
    d.add_argument("--no-colour", action="store_true")
    d.add_argument("--quiet", action="store_true", help="no progress line")
    storage_flags(d)
    config_flags(d)
    d.set_defaults(func=lambda a: cmd_demo(a, settings_fn))
