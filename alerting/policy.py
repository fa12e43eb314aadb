"""Policy: what to do about a finding (alert, block, both, nothing).

The policy is configuration plus a little memory (who was blocked recently, for
escalation).  It never blocks or sends anything itself: :meth:`Policy.decide`
returns a :class:`Decision`, and :class:`alerting.service.AlertingService`
carries it out through the block list and the alert sinks.

Defaults (every one can be changed in the ``[policy]`` table of the policy
file, see ``deploy/policy.example.toml``):

==================  ======================  ==========================  =============
kind                alert from severity     block from severity         block TTL
==================  ======================  ==========================  =============
runaway_reasoning   warning                 critical (an attack)        30 min
retry_storm         warning                 warning                     10 min
failure_spike       warning                 never (upstream outages!)   -
token_spike         warning                 never                       -
cost_spike          warning                 never                       -
agent_loop          warning                 critical                    30 min
context_bloat       never (stored only)     never                       -
cache_opportunity   never (stored only)     never                       -
budget_exceeded     warning                 critical (budget spent)     until the period ends
==================  ======================  ==========================  =============

Hard rules that no configuration changes:

* a finding with scope ``model`` (a whole upstream failing or spiking) never
  blocks anyone: consumers are not at fault for an upstream outage; nor does
  a consumer's retry storm into such an outage (evidence ``upstream_outage``):
  it is alerted;
* an allowlisted consumer, user or tenant is never blocked (it is still alerted);
* a *stale* finding (its event time more than ``stale_after`` behind the wall
  clock, e.g. a replay of last week's events) is neither alerted nor blocked:
  blocking someone now for last week's storm would be wrong.  It is still stored.

>>> from datetime import datetime, UTC
>>> from detectors.finding import Finding
>>> t = datetime(2026, 1, 1, tzinfo=UTC)
>>> p = Policy(PolicyConfig(), clock=lambda: t.timestamp())
>>> f = Finding.new(kind="retry_storm", severity="critical", scope="consumer",
...                 subject="app-1", first_event_ts=t, detected_at=t,
...                 observed=40, baseline=1, threshold=8)
>>> d = p.decide(f)
>>> d.alert, d.block, d.ttl_s, d.action_text()
(True, True, 600.0, 'blocked consumer app-1 for 10m')
>>> outage = f.model_copy(update={"kind": "failure_spike", "scope": "model",
...                               "subject": "gpt-4o", "consumer": None})
>>> d = p.decide(outage)
>>> d.alert, d.block, d.action_text()
(True, False, 'alert only')
"""

from __future__ import annotations

import fnmatch
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from detectors.finding import KINDS, Finding

SEVERITIES = ("info", "warning", "critical")
SEV_RANK = {s: i for i, s in enumerate(SEVERITIES)}
ALLOW_SCOPES = ("consumer", "user", "ip", "tenant")

BlockMode = bool | Literal["suggested"]
Ttl = float | Literal["period_end"] | None


# -- config helpers (shared by budget.py and sinks.py) ---------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any, key: str, *, allow_zero: bool = False) -> float:
    """Seconds from a number (seconds) or a string like ``"90s"``, ``"10m"``,
    ``"2h"``, ``"1d"``; raises ValueError naming ``key``."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a duration such as 600 or \"10m\", got {value!r}")
    if isinstance(value, int | float):
        secs = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        secs = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError(
            f"{key}: expected a duration such as 600 (seconds) or \"10m\", \"2h\", \"1d\", "
            f"got {value!r}")
    if not math.isfinite(secs) or secs < 0 or (secs == 0 and not allow_zero):
        raise ValueError(f"{key}: the duration must be {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}")
    return secs


def fmt_duration(secs: float | None) -> str:
    """``600 -> "10m"``, ``5400 -> "1h30m"``, ``None -> "until unblocked"``."""
    if secs is None:
        return "until unblocked"
    s = round(secs)
    if s < 60:
        return f"{s}s"
    parts = []
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            parts.append(f"{s // n}{unit}")
            s %= n
    return "".join(parts)


def check_keys(d: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a table, got {type(d).__name__}")
    allowed = list(allowed)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed)}")


def get_bool(d: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{where}.{key}: expected true or false, got {v!r}")
    return v


def get_str(d: Mapping[str, Any], key: str, where: str, default: str) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise ValueError(f"{where}.{key}: expected a string, got {v!r}")
    return v


def get_number(d: Mapping[str, Any], key: str, where: str, default: float, *,
               lo: float | None = None, hi: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{where}.{key}: expected a number, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{where}.{key}: must be >= {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{where}.{key}: must be <= {hi}, got {v!r}")
    return float(v)


def get_severity(d: Mapping[str, Any], key: str, where: str, default: str) -> str:
    v = d.get(key, default)
    if v not in SEV_RANK:
        raise ValueError(f"{where}.{key}: expected one of {', '.join(SEVERITIES)}, got {v!r}")
    return str(v)


def get_str_list(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = d.get(key, [])
    if isinstance(v, str) or not isinstance(v, list | tuple) or \
            not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"{where}.{key}: expected a list of non-empty strings, got {v!r}")
    return tuple(v)


# -- rules -----------------------------------------------------------------------
@dataclass(frozen=True)
class KindRule:
    """What to do about one kind of finding.

    ``block`` is ``true``, ``false`` or ``"suggested"`` (block when the detector
    suggested ``action = "block"``).  ``block_ttl`` is seconds, ``"period_end"``
    (budget findings: until the budget period ends) or None (until unblocked by
    hand).  ``dry_run`` None inherits the global setting."""

    alert: bool = True
    alert_min_severity: str = "warning"
    block: BlockMode = False
    block_min_severity: str = "critical"
    block_ttl: Ttl = 600.0
    dry_run: bool | None = None

    FIELDS = ("alert", "alert_min_severity", "block", "block_min_severity", "block_ttl",
              "dry_run")

    def patched(self, d: Mapping[str, Any], where: str) -> KindRule:
        """This rule with the fields set in ``d`` (a policy-file table) replaced."""
        check_keys(d, self.FIELDS, where)
        kw: dict[str, Any] = {}
        if "alert" in d:
            kw["alert"] = get_bool(d, "alert", where, True)
        if "alert_min_severity" in d:
            kw["alert_min_severity"] = get_severity(d, "alert_min_severity", where, "warning")
        if "block" in d:
            b = d["block"]
            if b not in (True, False, "suggested"):
                raise ValueError(f"{where}.block: expected true, false or \"suggested\", "
                                 f"got {b!r}")
            kw["block"] = b
        if "block_min_severity" in d:
            kw["block_min_severity"] = get_severity(d, "block_min_severity", where, "critical")
        if "block_ttl" in d:
            kw["block_ttl"] = parse_ttl(d["block_ttl"], f"{where}.block_ttl")
        if "dry_run" in d:
            kw["dry_run"] = get_bool(d, "dry_run", where, False)
        return replace(self, **kw)


def parse_ttl(v: Any, key: str) -> Ttl:
    if v == "period_end":
        return "period_end"
    if v in ("none", "forever", "until_unblocked"):
        return None
    return parse_duration(v, key)


DEFAULT_RULES: Mapping[str, KindRule] = {
    "runaway_reasoning": KindRule(block=True, block_min_severity="critical", block_ttl=1800.0),
    "retry_storm": KindRule(block=True, block_min_severity="warning", block_ttl=600.0),
    # scope "model" (an upstream outage) can never block, whatever this says.
    "failure_spike": KindRule(block=False),
    "token_spike": KindRule(block=False),
    "cost_spike": KindRule(block=False),
    "agent_loop": KindRule(block=True, block_min_severity="critical", block_ttl=1800.0),
    "context_bloat": KindRule(alert=False, block=False),
    "cache_opportunity": KindRule(alert=False, block=False),
    "budget_exceeded": KindRule(block=True, block_min_severity="critical",
                                block_ttl="period_end"),
}
assert set(DEFAULT_RULES) == set(KINDS), "a finding kind without a default policy rule"


@dataclass(frozen=True)
class Override:
    """A rule patch for the findings that match ``tenant``/``consumer``/``kind``
    (glob patterns; an unset field matches everything).  More specific
    overrides win: consumer beats tenant beats kind-only, then file order."""

    patch: Mapping[str, Any]
    tenant: str | None = None
    consumer: str | None = None
    kind: str | None = None
    index: int = 0

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        return (self.consumer is not None, self.tenant is not None, self.kind is not None,
                self.index)

    def matches(self, kind: str, tenant: str, consumer: str | None) -> bool:
        if self.kind is not None and not fnmatch.fnmatchcase(kind, self.kind):
            return False
        if self.tenant is not None and not fnmatch.fnmatchcase(tenant, self.tenant):
            return False
        return self.consumer is None or (
            consumer is not None and fnmatch.fnmatchcase(consumer, self.consumer))

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("tenant", self.tenant), ("consumer", self.consumer),
                                          ("kind", self.kind)) if v is not None]
        return f"override#{self.index}({','.join(parts)})"


@dataclass(frozen=True)
class EscalationConfig:
    """Repeat offenders get longer blocks: ``ttl * factor ** repeats`` where
    ``repeats`` counts earlier blocks of the same target (distinct findings)
    within ``window_s``, capped at ``max_ttl_s``."""

    enabled: bool = True
    window_s: float = 86400.0
    factor: float = 4.0
    max_ttl_s: float = 86400.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy.escalation") -> EscalationConfig:
        check_keys(d, ("enabled", "window", "factor", "max_ttl"), where)
        return cls(
            enabled=get_bool(d, "enabled", where, True),
            window_s=parse_duration(d.get("window", 86400), f"{where}.window"),
            factor=get_number(d, "factor", where, 4.0, lo=1.0, hi=1000.0),
            max_ttl_s=parse_duration(d.get("max_ttl", 86400), f"{where}.max_ttl"),
        )


@dataclass(frozen=True)
class Allowlist:
    """Values that are never blocked (exact match; ``ip`` also takes networks,
    which only the block list uses).  ``tenant``: no consumer of these tenants
    is blocked by the policy."""

    consumer: frozenset[str] = frozenset()
    user: frozenset[str] = frozenset()
    ip: frozenset[str] = frozenset()
    tenant: frozenset[str] = frozenset()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy.allowlist") -> Allowlist:
        check_keys(d, ALLOW_SCOPES, where)
        return cls(**{s: frozenset(get_str_list(d, s, where)) for s in ALLOW_SCOPES})

    def for_blocklist(self) -> dict[str, list[str]]:
        """The mapping :class:`alerting.blocklist.BlockList` takes (no tenants)."""
        return {"consumer": sorted(self.consumer), "user": sorted(self.user),
                "ip": sorted(self.ip)}

    def allows(self, scope: str, value: str, tenant: str) -> bool:
        vals: frozenset[str] = getattr(self, scope, frozenset())
        return value in vals or tenant in self.tenant


@dataclass(frozen=True)
class PolicyConfig:
    dry_run: bool = False
    stale_after_s: float | None = 3600.0  # None/0 = never stale
    runbook_base_url: str = ""
    actor: str = "tokenward-policy"
    rules: Mapping[str, KindRule] = field(default_factory=lambda: dict(DEFAULT_RULES))
    overrides: tuple[Override, ...] = ()
    allowlist: Allowlist = field(default_factory=Allowlist)
    escalation: EscalationConfig = field(default_factory=EscalationConfig)

    KEYS = ("dry_run", "stale_after", "runbook_base_url", "actor", "kinds", "overrides",
            "allowlist", "escalation")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy") -> PolicyConfig:
        """Build from the ``[policy]`` table; ValueError names the bad key."""
        check_keys(d, cls.KEYS, where)
        kinds = d.get("kinds", {})
        check_keys(kinds, KINDS, f"{where}.kinds")
        rules = {k: DEFAULT_RULES[k].patched(kinds[k], f"{where}.kinds.{k}") if k in kinds
                 else DEFAULT_RULES[k] for k in KINDS}
        raw_over = d.get("overrides", [])
        if not isinstance(raw_over, list):
            raise ValueError(f"{where}.overrides: expected an array of tables "
                             "([[policy.overrides]]), got {raw_over!r}")
        overrides = []
        for i, o in enumerate(raw_over):
            w = f"{where}.overrides[{i}]"
            check_keys(o, ("tenant", "consumer", "kind", *KindRule.FIELDS), w)
            match = {k: o[k] for k in ("tenant", "consumer", "kind") if k in o}
            for k, v in match.items():
                if not isinstance(v, str) or not v:
                    raise ValueError(f"{w}.{k}: expected a non-empty string (glob), got {v!r}")
            if "kind" in match and not any(fnmatch.fnmatchcase(k, match["kind"]) for k in KINDS):
                raise ValueError(f"{w}.kind: {match['kind']!r} matches no finding kind; "
                                 f"kinds: {', '.join(KINDS)}")
            patch = {k: v for k, v in o.items() if k in KindRule.FIELDS}
            if not patch:
                raise ValueError(f"{w}: sets nothing; add one of {', '.join(KindRule.FIELDS)}")
            KindRule().patched(patch, w)  # validate now, not at the first finding
            overrides.append(Override(patch=patch, index=i, **match))
        stale = d.get("stale_after", 3600)
        stale_s = None if stale in (0, "0", "never", False) else \
            parse_duration(stale, f"{where}.stale_after")
        url = get_str(d, "runbook_base_url", where, "")
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}.runbook_base_url: must start with http:// or https://, "
                             f"got {url!r}")
        return cls(
            dry_run=get_bool(d, "dry_run", where, False),
            stale_after_s=stale_s,
            runbook_base_url=url.rstrip("#"),
            actor=get_str(d, "actor", where, "tokenward-policy") or "tokenward-policy",
            rules=rules,
            overrides=tuple(sorted(overrides, key=lambda o: o.specificity)),
            allowlist=Allowlist.from_dict(d.get("allowlist", {}), f"{where}.allowlist"),
            escalation=EscalationConfig.from_dict(d.get("escalation", {}),
                                                  f"{where}.escalation"),
        )

    def runbook_url(self, kind: str) -> str:
        return f"{self.runbook_base_url}#{kind}" if self.runbook_base_url else ""


# -- decisions ---------------------------------------------------------------------
@dataclass(frozen=True)
class BlockTarget:
    scope: str  # consumer | user (block list scopes)
    value: str
    tenant: str = "default"


@dataclass(frozen=True)
class Decision:
    alert: bool
    block: bool  # a block is to be recorded (published unless dry_run)
    dry_run: bool = False
    targets: tuple[BlockTarget, ...] = ()
    ttl_s: float | None = None
    repeats: int = 0  # earlier blocks of the target within the escalation window
    rule: str = ""  # which rule/overrides applied, for the audit and the alert
    note: str = ""  # why nothing was blocked, when relevant
    stale: bool = False

    def action_text(self) -> str:
        """What was done, for the alert's annotations."""
        if self.block and self.targets:
            who = ", ".join(f"{t.scope} {t.value}" for t in self.targets[:5])
            if len(self.targets) > 5:
                who += f" and {len(self.targets) - 5} more"
            esc = f" (repeat offender x{self.repeats + 1})" if self.repeats else ""
            if self.dry_run:
                return f"would block {who} for {fmt_duration(self.ttl_s)} (dry-run){esc}"
            return f"blocked {who} for {fmt_duration(self.ttl_s)}{esc}"
        if self.note:
            return f"alert only ({self.note})"
        return "alert only"


def _ts(f: Finding) -> datetime:
    return f.updated_at or f.detected_at


class Policy:
    """Decides per finding.  Thread-safe; ``clock`` is wall-clock seconds."""

    def __init__(self, config: PolicyConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._history: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def rule_for(self, kind: str, tenant: str, consumer: str | None) -> tuple[KindRule, str]:
        rule = self.config.rules[kind]
        applied = [f"kind:{kind}"]
        for o in self.config.overrides:  # ascending specificity: the most specific wins
            if o.matches(kind, tenant, consumer):
                rule = rule.patched(o.patch, o.describe())
                applied.append(o.describe())
        return rule, "; ".join(applied)

    def decide(self, f: Finding) -> Decision:
        rule, rule_desc = self.rule_for(f.kind, f.tenant, f.consumer)
        dry = self.config.dry_run if rule.dry_run is None else rule.dry_run
        if f.status != "firing":
            return Decision(alert=False, block=False, dry_run=dry, rule=rule_desc)
        sev = SEV_RANK[f.severity]
        alert = rule.alert and sev >= SEV_RANK[rule.alert_min_severity]
        now = self.clock()
        stale_s = self.config.stale_after_s
        if stale_s and now - _ts(f).timestamp() > stale_s:
            return Decision(alert=False, block=False, dry_run=dry, rule=rule_desc, stale=True,
                            note=f"stale: event time more than {fmt_duration(stale_s)} "
                                 "behind the wall clock (a replay?)")
        want = (rule.block is True or (rule.block == "suggested" and f.action == "block")) \
            and sev >= SEV_RANK[rule.block_min_severity]
        if want and (f.evidence or {}).get("upstream_outage"):
            return Decision(alert=alert, block=False, dry_run=dry, rule=rule_desc,
                            note="during an upstream outage of its model: alerted, never blocked")
        if not want:
            return Decision(alert=alert, block=False, dry_run=dry, rule=rule_desc)
        targets, note = self._targets(f)
        allowed = [t for t in targets if self.config.allowlist.allows(t.scope, t.value, t.tenant)]
        targets = [t for t in targets if t not in allowed]
        if allowed and not note:
            note = "allowlisted: " + ", ".join(f"{t.scope} {t.value}" for t in allowed[:5])
        if not targets:
            return Decision(alert=alert, block=False, dry_run=dry, rule=rule_desc,
                            note=note or "no blockable subject")
        repeats = max(self.repeats(t, now) for t in targets)
        ttl = self._ttl(rule.block_ttl, f, now, repeats)
        return Decision(alert=alert, block=True, dry_run=dry, targets=tuple(targets),
                        ttl_s=ttl, repeats=repeats, rule=rule_desc, note=note)

    def _targets(self, f: Finding) -> tuple[list[BlockTarget], str]:
        if f.scope == "model":
            return [], "model-wide finding (upstream): consumers are never blocked for it"
        if f.scope == "consumer":
            return [BlockTarget("consumer", f.consumer or f.subject, f.tenant)], ""
        if f.scope == "user":
            return [BlockTarget("user", f.subject, f.tenant)], ""
        if f.scope == "session":
            if f.consumer:
                return [BlockTarget("consumer", f.consumer, f.tenant)], ""
            return [], "session finding without a consumer"
        if f.scope == "tenant":
            # A tenant budget: block the consumers that spent in the period
            # (listed by the budget tracker in the evidence).
            cons = f.evidence.get("consumers") or []
            names = [c["consumer"] if isinstance(c, Mapping) else str(c) for c in cons]
            return [BlockTarget("consumer", n, f.tenant) for n in names if n], \
                "" if names else "tenant finding without consumers"
        return [], f"scope {f.scope} cannot be blocked"

    def _ttl(self, base: Ttl, f: Finding, now: float, repeats: int) -> float | None:
        if base is None:
            return None
        if base == "period_end":
            end = f.evidence.get("period_end")
            try:
                end_ts = datetime.fromisoformat(str(end)).timestamp()
            except ValueError:
                return 3600.0
            # Never shorter than a minute (clock skew between event and wall time).
            return max(60.0, end_ts - now)
        esc = self.config.escalation
        if esc.enabled and repeats:
            return min(base * esc.factor ** repeats, max(esc.max_ttl_s, base))
        return float(base)

    # -- escalation memory --------------------------------------------------------
    def repeats(self, target: BlockTarget, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        with self._lock:
            hist = self._history.get((target.scope, target.value))
            if not hist:
                return 0
            lo = now - self.config.escalation.window_s
            while hist and hist[0] < lo:
                hist.popleft()
            return len(hist)

    def record_block(self, target: BlockTarget, at: float | None = None) -> None:
        """Remember a block (one per finding) for escalation."""
        at = self.clock() if at is None else at
        with self._lock:
            hist = self._history.setdefault((target.scope, target.value), deque(maxlen=64))
            hist.append(at)
            if len(self._history) > 100_000:  # bound memory: forget the oldest targets
                lo = self.clock() - self.config.escalation.window_s
                for k in [k for k, h in self._history.items() if not h or h[-1] < lo]:
                    del self._history[k]

    def seed_history(self, rows: Iterable[tuple[str, str, float]]) -> None:
        """Earlier blocks ``(scope, value, epoch seconds)``, e.g. from the
        ``blocks`` audit at start-up, so a restart does not reset escalation."""
        for scope, value, at in sorted(rows, key=lambda r: r[2]):
            self.record_block(BlockTarget(scope, value), at)


__all__ = [
    "DEFAULT_RULES",
    "Allowlist",
    "BlockTarget",
    "Decision",
    "EscalationConfig",
    "KindRule",
    "Override",
    "Policy",
    "PolicyConfig",
    "fmt_duration",
    "parse_duration",
]

