"""Per-key state of the detection engine: compact ``__slots__`` records.

Memory matters (one :class:`ConsumerState` per tracked consumer, 100k+ of
them), so only the per-minute token and cost baselines use river objects
(:class:`~detectors.baselines.MinuteSeries`); everything else is a handful of
floats.  Per-(consumer, model) call-size baselines exist only for the models a
consumer actually uses, and request-hash trackers only once a hash repeats.
"""

from __future__ import annotations

from array import array
from typing import Any

from .baselines import EW, LogBaseline, MinuteSeries
from .config import Settings
from .reliability import FailWindow, HashWindow
from .volume import Volume

INF = float("inf")


class ConsumerState:
    __slots__ = (
        "calls",
        "cfg",
        "cpm",
        "f_base",
        "first_ts",
        "fl",
        "fs",
        "fwin",
        "key",
        "last_fail_model",
        "last_ts",
        "m_calls",
        "m_cost",
        "m_fail",
        "m_tok",
        "minute",
        "models",
        "n_base",
        "nl",
        "ns",
        "run_calls",
        "run_tok",
        "runs",
        "sz",
        "t_fail",
        "tenant",
        "tok",
        "vol",
    )

    def __init__(self, key: str, tenant: str, cfg: Settings, ts: float) -> None:
        self.key = key
        self.tenant = tenant
        self.cfg = cfg
        self.first_ts = ts
        self.last_ts = ts
        self.minute = int(ts // 60)
        self.m_tok = 0  # current minute's totals
        self.m_cost = 0.0
        self.m_calls = 0
        self.m_fail = 0
        ts_cfg = cfg.token_spike
        self.tok = MinuteSeries(ts_cfg.halflife_min)  # tokens / minute (river)
        self.cpm = EW()  # calls / minute
        self.vol = Volume(ts)  # 60 s / 5 min rate windows (token_spike, cost_spike)
        # log input tokens of independent calls (token_spike, call-size rule):
        # slow per-minute EW mean and per-call variance, minutes learnt, a
        # fast decayed sum and count (~5 min), the current minute's sum, sum
        # of squares and count
        self.sz = array("d", bytes(8 * 8))
        # failures: decayed counts (short and long window) and a slow baseline
        self.ns = self.fs = self.nl = self.fl = 0.0
        self.t_fail = ts
        self.f_base = 0.0  # EW failures / calls, counts with a half-life in calls
        self.n_base = 0.0
        self.calls = 0
        self.last_fail_model: str | None = None
        self.fwin: FailWindow | None = None  # last failures (failure_spike), lazily
        self.models: dict[str, ModelCallBaseline] = {}
        # agent runs: EW of log(calls) and log(tokens) per completed run
        self.runs = 0
        self.run_calls = LogBaseline()
        self.run_tok = LogBaseline()


class ModelCallBaseline:
    """Size and duration of one call, for one (consumer, model) or one model."""

    __slots__ = ("has_reasoning", "lat", "think")

    def __init__(self) -> None:
        self.think = LogBaseline()  # reasoning tokens (or output tokens without reasoning)
        self.lat = LogBaseline()  # seconds
        self.has_reasoning = False


class RunState:
    """One agent run (trace_id) or session (session_id)."""

    __slots__ = ("calls", "consumer", "first_ts", "flagged", "grow_first", "grow_inc", "grow_n",
                 "ids", "last_input", "last_ts", "model", "tenant", "tokens")

    def __init__(self, consumer: str, tenant: str, ts: float, model: str) -> None:
        self.consumer = consumer
        self.tenant = tenant
        self.model = model
        self.first_ts = ts
        self.last_ts = ts
        self.calls = 0
        self.tokens = 0
        self.last_input = -1
        self.grow_n = 0
        self.grow_first = 0
        self.grow_inc = 0.0  # EW increment of the input along the streak
        self.flagged = 0  # bits: 1 agent_loop, 2 context_bloat, 4 session record, 8 long growth
        self.ids: list[str] = []


class RepeatState:
    """A request_hash of one consumer that was seen more than once recently."""

    __slots__ = (
        "c",
        "consumer",
        "f",
        "first_ts",
        "hash",
        "ident",
        "ids",
        "mixed",
        "model",
        "ok_total",
        "ok_uncached",
        "t",
        "total",
        "total_fail",
        "u",
        "win",
    )

    def __init__(self, consumer: str, rh: str, ts: float, model: str, ident: Any) -> None:
        self.consumer = consumer
        self.hash = rh
        self.first_ts = ts
        self.t = ts
        self.c = 1.0  # decayed attempts, counting the earlier sighting
        self.f = 0.0  # decayed failed attempts
        self.total = 1
        self.total_fail = 0
        self.ok_total = 0
        self.ok_uncached = 0
        self.u = 0.0  # decayed uncached answers (time constant: a prompt cache's life)
        self.model = model
        self.ident = ident
        self.mixed = False
        self.ids: list[str] = []
        self.win: HashWindow | None = None  # last attempts (retry_storm), lazily


class ModelState:
    """Failure statistics of one model across all its consumers, in two
    buckets of ``model_window_s / 2`` (current and previous), per consumer."""

    __slots__ = ("b_start", "calls", "check_at", "cur", "cur_f", "cur_n", "f_base", "last_ts",
                 "n_base", "prev", "prev_f", "prev_n", "size")

    def __init__(self, ts: float) -> None:
        self.b_start = ts
        self.cur: dict[str, list[float]] = {}  # consumer -> [calls, failures]
        self.prev: dict[str, list[float]] = {}
        self.cur_n = self.cur_f = self.prev_n = self.prev_f = 0.0
        self.f_base = 0.0
        self.n_base = 0.0
        self.calls = 0
        self.last_ts = ts
        self.check_at = -INF
        self.size = ModelCallBaseline()  # call sizes across consumers (runaway fallback)

    def window(self, consumer: str) -> tuple[float, float]:
        """(calls, failures) of one consumer in the window."""
        a = self.cur.get(consumer)
        b = self.prev.get(consumer)
        n = (a[0] if a else 0.0) + (b[0] if b else 0.0)
        f = (a[1] if a else 0.0) + (b[1] if b else 0.0)
        return n, f

    def per_consumer(self) -> dict[str, list[float]]:
        out = {c: [v[0], v[1]] for c, v in self.prev.items()}
        for c, v in self.cur.items():
            o = out.get(c)
            if o is None:
                out[c] = [v[0], v[1]]
            else:
                o[0] += v[0]
                o[1] += v[1]
        return out
