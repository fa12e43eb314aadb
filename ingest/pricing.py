"""The price table: what one usage event cost, from tokens and list prices.

Prices live in a TOML file that users edit (the packaged default is
``ingest/data/prices.toml``; its header documents the format).  Costs follow
the billing convention of :class:`ingest.event.UsageEvent`::

    (input - cached) * input_price + cached * cached_input_price
      + cache_write * cache_write_price + output * output_price     (per million)

times the discount of the time-of-day window that contains the *event's* time
(never the wall clock, so a replay prices exactly like the live run), times the
tenant's currency rate when one is configured.

>>> from datetime import datetime, timezone
>>> from ingest.event import UsageEvent
>>> table = PriceTable.load()
>>> ev = UsageEvent(event_id="e1", ts=datetime(2026, 1, 1, 12, tzinfo=timezone.utc),
...                 consumer="app", model="gpt-4o-2024-08-06", status=200,
...                 input_tokens=1_000_000, cached_input_tokens=400_000,
...                 output_tokens=100_000)
>>> table.cost(ev)            # 0.6M * 2.50 + 0.4M * 1.25 + 0.1M * 10.00
(3.0, 'price_table')
>>> table.cost(ev.model_copy(update={"model": "no-such-model"}))
(0.0, 'unknown_model')
>>> table.cost(ev.model_copy(update={"cost": 0.42}))
(0.42, 'gateway')
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ingest.event import UsageEvent

CostSource = Literal["gateway", "price_table", "unknown_model"]

PER_MILLION = 1_000_000.0
_MEMO_LIMIT = 4096  # distinct model names remembered; a hostile stream cannot grow it further
_DEFAULT_RESOURCE = "prices.toml"

_MODEL_FIELDS = frozenset(
    {"provider", "input", "cached_input", "cache_write", "output", "aliases", "prefixes",
     "discounts"}
)
_DISCOUNT_FIELDS = frozenset({"start_utc", "end_utc", "discount"})
_TENANT_FIELDS = frozenset({"currency", "rate"})
_TOP_FIELDS = frozenset({"currency", "checked", "models", "tenants"})
_HHMM = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")

# Suffixes that name a snapshot of a model rather than a different model.
# Stripped one at a time, from the right, until a priced name appears.
_SNAPSHOT_SUFFIX = re.compile(
    r"(?:-v\d+(?::\d+)?"            # bedrock "-v1:0"
    r"|@\d{8}|@latest|@\d{3}"       # vertex "@20240620"
    r"|-\d{4}-\d{2}-\d{2}"          # openai "-2024-08-06"
    r"|-\d{8}"                      # anthropic "-20250805"
    r"|-\d{2}-\d{2}"                # gemini "-preview-05-20"
    r"|-\d{3,4}"                    # "-0613", "-001", qwen "-0919"
    r"|-latest|-preview|-exp)$"
)
# "us.anthropic.claude-..." (Bedrock cross-region inference profiles)
_VENDOR_PREFIX = re.compile(
    r"^(?:(?:us|eu|apac|ap|jp|au|ca|global)\.)?(?:anthropic|amazon|meta|mistral|deepseek|qwen)\."
)


@dataclass(frozen=True, slots=True)
class Discount:
    """A daily UTC window (``start`` inclusive, ``end`` exclusive, seconds of day)."""

    start: int
    end: int
    multiplier: float  # price factor inside the window: 1 - discount

    def contains(self, second_of_day: int) -> bool:
        if self.start <= self.end:
            return self.start <= second_of_day < self.end
        return second_of_day >= self.start or second_of_day < self.end  # crosses midnight


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """List prices of one model, USD (or the table's currency) per million tokens."""

    name: str
    input: float
    cached_input: float
    cache_write: float
    output: float
    provider: str | None = None
    discounts: tuple[Discount, ...] = ()

    def base_cost(self, input_tokens: int, cached: int, cache_write: int, output: int) -> float:
        uncached = input_tokens - cached if input_tokens > cached else 0
        return (
            uncached * self.input
            + cached * self.cached_input
            + cache_write * self.cache_write
            + output * self.output
        ) / PER_MILLION

    def multiplier_at(self, second_of_day: int) -> float:
        for d in self.discounts:
            if d.contains(second_of_day):
                return d.multiplier
        return 1.0


@dataclass(frozen=True, slots=True)
class TenantCurrency:
    currency: str
    rate: float


class PriceTable:
    """An immutable price table.  Build it with :meth:`load`."""

    __slots__ = ("_aliases", "_memo", "_prefixes", "checked", "currency", "models", "source",
                 "tenants")

    currency: str
    checked: str | None
    source: str
    models: Mapping[str, ModelPrice]
    tenants: Mapping[str, TenantCurrency]
    _aliases: Mapping[str, ModelPrice]
    _prefixes: tuple[tuple[str, ModelPrice], ...]
    _memo: dict[str, ModelPrice | None]

    def __init__(self, models: Mapping[str, ModelPrice], *, currency: str = "USD",
                 tenants: Mapping[str, TenantCurrency] | None = None,
                 aliases: Mapping[str, str] | None = None,
                 prefixes: Mapping[str, str] | None = None,
                 checked: str | None = None, source: str = "<memory>") -> None:
        set_ = object.__setattr__
        set_(self, "currency", currency)
        set_(self, "checked", checked)
        set_(self, "source", source)
        set_(self, "models", MappingProxyType({k.lower(): v for k, v in models.items()}))
        set_(self, "tenants", MappingProxyType(dict(tenants or {})))
        set_(self, "_aliases", MappingProxyType(
            {a.lower(): self.models[m.lower()] for a, m in (aliases or {}).items()}))
        pre = sorted(((p.lower(), self.models[m.lower()]) for p, m in (prefixes or {}).items()),
                     key=lambda pm: -len(pm[0]))
        set_(self, "_prefixes", tuple(pre))
        set_(self, "_memo", {})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PriceTable is immutable (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"PriceTable is immutable (tried to delete {name!r})")

    def __repr__(self) -> str:
        return f"PriceTable({len(self.models)} models, currency={self.currency!r}, " \
               f"source={self.source!r})"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path | None = None) -> PriceTable:
        """Load a price table; ``None`` loads the packaged default.

        A bad file raises :class:`ValueError` naming the file, the model (or
        section) and what to fix.
        """
        if path is None:
            res = resources.files("ingest").joinpath("data", _DEFAULT_RESOURCE)
            label = f"<packaged ingest/data/{_DEFAULT_RESOURCE}>"
            text = res.read_text(encoding="utf-8")
        else:
            label = str(path)
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"{label}: cannot read price file: {exc.strerror or exc}") \
                    from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{label}: not valid TOML ({exc}); fix the syntax") from exc
        return cls.from_dict(data, source=label)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> PriceTable:
        def fail(where: str, what: str) -> ValueError:
            return ValueError(f"{source}: {where}: {what}")

        unknown = set(data) - _TOP_FIELDS
        if unknown:
            raise fail("top level", f"unknown key(s) {sorted(unknown)}; allowed: "
                                    f"{sorted(_TOP_FIELDS)}")
        currency = data.get("currency", "USD")
        if not isinstance(currency, str) or not currency.strip():
            raise fail("top level", "'currency' must be a currency code such as \"USD\"")
        checked = data.get("checked")
        checked = None if checked is None else str(checked)

        raw_models = data.get("models")
        if not isinstance(raw_models, dict) or not raw_models:
            raise fail("top level", "no [models.\"<name>\"] tables; add at least one model")
        models: dict[str, ModelPrice] = {}
        aliases: dict[str, str] = {}
        prefixes: dict[str, str] = {}
        for name, spec in raw_models.items():
            where = f"model {name!r}"
            key = name.strip().lower()
            if not key:
                raise fail(where, "model name is empty")
            if key in models or key in aliases:
                raise fail(where, "defined twice (names are case-insensitive); keep one")
            if not isinstance(spec, dict):
                raise fail(where, "must be a table with input/output prices")
            extra = set(spec) - _MODEL_FIELDS
            if extra:
                raise fail(where, f"unknown key(s) {sorted(extra)}; allowed: "
                                  f"{sorted(_MODEL_FIELDS)}")
            inp = _price(spec, "input", None, fail, where)
            out = _price(spec, "output", None, fail, where)
            cached = _price(spec, "cached_input", inp, fail, where)
            write = _price(spec, "cache_write", inp, fail, where)
            provider = spec.get("provider")
            if provider is not None and not isinstance(provider, str):
                raise fail(where, "'provider' must be a string")
            discounts = tuple(_discount(d, fail, f"{where} discount #{i + 1}")
                              for i, d in enumerate(_list(spec, "discounts", fail, where)))
            models[key] = ModelPrice(name.strip(), inp, cached, write, out, provider, discounts)
            for a in _names(spec, "aliases", fail, where):
                if a in aliases and aliases[a] != key:
                    raise fail(where, f"alias {a!r} is also an alias of {aliases[a]!r}; "
                                      "keep it on one model")
                aliases[a] = key
            for p in _names(spec, "prefixes", fail, where):
                if p in prefixes and prefixes[p] != key:
                    raise fail(where, f"prefix {p!r} is also a prefix of {prefixes[p]!r}")
                prefixes[p] = key
        for a, m in aliases.items():
            if a in models and a != m:
                raise fail(f"model {m!r}", f"alias {a!r} is also a model name; remove one")

        tenants: dict[str, TenantCurrency] = {}
        raw_tenants = data.get("tenants", {})
        if not isinstance(raw_tenants, dict):
            raise fail("tenants", "must be a table of [tenants.<name>] sections")
        for tname, spec in raw_tenants.items():
            where = f"tenant {tname!r}"
            if not isinstance(spec, dict):
                raise fail(where, "must be a table with 'currency' and 'rate'")
            extra = set(spec) - _TENANT_FIELDS
            if extra:
                raise fail(where, f"unknown key(s) {sorted(extra)}; allowed: 'currency', 'rate'")
            cur = spec.get("currency")
            if not isinstance(cur, str) or not cur.strip():
                raise fail(where, "'currency' must be a currency code such as \"EUR\"")
            rate = spec.get("rate")
            if isinstance(rate, bool) or not isinstance(rate, int | float) \
                    or not math.isfinite(rate) or rate <= 0:
                raise fail(where, f"'rate' must be a number > 0 ({cur} per {currency}), "
                                  f"got {rate!r}")
            tenants[tname] = TenantCurrency(cur.strip(), float(rate))
        return cls(models, currency=currency.strip(), tenants=tenants, aliases=aliases,
                   prefixes=prefixes, checked=checked, source=source)

    # ------------------------------------------------------------------ lookups
    def price_of(self, model: str) -> ModelPrice | None:
        """The prices that apply to ``model`` (exact, alias, snapshot or prefix match)."""
        memo = self._memo
        try:
            return memo[model]
        except KeyError:
            pass
        found = self._resolve(model)
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[model] = found
        return found

    def _resolve(self, model: str) -> ModelPrice | None:
        for cand in _candidates(model):
            hit = self.models.get(cand) or self._aliases.get(cand)
            if hit is not None:
                return hit
        for cand in _candidates(model):
            for prefix, price in self._prefixes:
                if cand.startswith(prefix):
                    return price
        return None

    def currency_of(self, tenant: str) -> str:
        """The currency costs of ``tenant`` are reported in."""
        t = self.tenants.get(tenant)
        return t.currency if t is not None else self.currency

    def cost(self, event: UsageEvent) -> tuple[float, CostSource]:
        """``(cost, source)`` of one event, in the tenant's currency.

        ``source`` is ``"gateway"`` when the gateway already computed the cost
        (kept as is), ``"price_table"`` when priced here, ``"unknown_model"``
        (cost 0.0) when no price applies.
        """
        if event.cost is not None:
            return event.cost, "gateway"
        price = self.price_of(event.model)
        if price is None:
            return 0.0, "unknown_model"
        cost = price.base_cost(event.input_tokens, event.cached_input_tokens,
                               event.cache_write_tokens, event.output_tokens)
        if price.discounts:
            ts = event.ts  # UTC (UsageEvent normalises it)
            cost *= price.multiplier_at(ts.hour * 3600 + ts.minute * 60 + ts.second)
        if self.tenants:
            t = self.tenants.get(event.tenant)
            if t is not None:
                cost *= t.rate
        return cost, "price_table"


def _candidates(model: str) -> Iterator[str]:
    """The model name, then ever more normalised spellings of it."""
    name = model.strip().lower()
    yield name
    if "/" in name:  # "openai/gpt-4o", "models/gemini-2.0-flash", "vertex_ai/..."
        name = name.rsplit("/", 1)[1]
        yield name
    stripped = _VENDOR_PREFIX.sub("", name)
    if stripped != name:
        name = stripped
        yield name
    for _ in range(4):
        stripped = _SNAPSHOT_SUFFIX.sub("", name)
        if stripped == name or not stripped:
            return
        name = stripped
        yield name


def _price(spec: Mapping[str, Any], key: str, default: float | None, fail: Any,
           where: str) -> float:
    v = spec.get(key, default)
    if v is None:
        raise fail(where, f"missing '{key}' (price per million tokens, e.g. {key} = 2.50)")
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise fail(where, f"'{key}' must be a number >= 0 (price per million tokens), "
                          f"got {v!r}")
    return float(v)


def _list(spec: Mapping[str, Any], key: str, fail: Any, where: str) -> list[Any]:
    v = spec.get(key, [])
    if not isinstance(v, list):
        raise fail(where, f"'{key}' must be a list")
    return v


def _names(spec: Mapping[str, Any], key: str, fail: Any, where: str) -> list[str]:
    out = []
    for v in _list(spec, key, fail, where):
        if not isinstance(v, str) or not v.strip():
            raise fail(where, f"'{key}' must be a list of non-empty strings, got {v!r}")
        out.append(v.strip().lower())
    return out


def _hhmm(v: Any, fail: Any, where: str, key: str) -> int:
    m = _HHMM.match(v) if isinstance(v, str) else None
    if m is None or (m.group(1) == "24" and m.group(2) != "00"):
        raise fail(where, f"'{key}' must be a UTC time \"HH:MM\" (00:00-24:00), got {v!r}")
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60


def _discount(d: Any, fail: Any, where: str) -> Discount:
    if not isinstance(d, dict):
        raise fail(where, "must be a table with start_utc, end_utc and discount")
    extra = set(d) - _DISCOUNT_FIELDS
    if extra:
        raise fail(where, f"unknown key(s) {sorted(extra)}; allowed: {sorted(_DISCOUNT_FIELDS)}")
    start = _hhmm(d.get("start_utc"), fail, where, "start_utc")
    end = _hhmm(d.get("end_utc"), fail, where, "end_utc")
    if start == 86400:
        raise fail(where, "'start_utc' must be before 24:00; use \"00:00\"")
    if start == end:
        raise fail(where, "start_utc and end_utc are equal; the window would be empty")
    off = d.get("discount")
    if isinstance(off, bool) or not isinstance(off, int | float) or not 0 < off <= 1:
        raise fail(where, f"'discount' must be the fraction off, 0 < discount <= 1 "
                          f"(0.5 = half price), got {off!r}")
    return Discount(start, end, 1.0 - float(off))
