"""Deployment artifacts (deploy/): the cluster DDL is generated from
ingest/schema.py and parses; the config files load with tokenward's own
loaders; the dashboard's SQL runs against the real schema; compose,
Kubernetes, Prometheus and Grafana files have the structure the rest relies on.

Docker, kubectl and a ClickHouse cluster are not available here, so these are
static checks plus what the embedded engine can verify.  YAML is parsed with
PyYAML when it is importable (it is not a tokenward dependency); otherwise the
same facts are checked on the text.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ingest import schema

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None


def _load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("cluster_ddl", ROOT / "tools" / "cluster_ddl.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cluster_ddl = _load_tool()


def _names(ddl: Any) -> dict[str, str]:
    """{object name: kind} of every CREATE in a sequence of statements."""
    out = {}
    for stmt in ddl:
        m = re.search(r"CREATE (TABLE|MATERIALIZED VIEW|VIEW) IF NOT EXISTS \w+\.(\w+)", stmt)
        if m:
            out[m[2]] = m[1]
    return out


def _yaml_docs(path: Path) -> list[Any]:
    assert yaml is not None
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -- ClickHouse cluster DDL -----------------------------------------------------
def test_cluster_sql_is_generated_from_schema() -> None:
    committed = (DEPLOY / "clickhouse" / "cluster.sql").read_text()
    assert committed == cluster_ddl.render(), (
        "deploy/clickhouse/cluster.sql is stale: run python tools/cluster_ddl.py")


def test_cluster_sql_keeps_every_name_of_the_schema() -> None:
    single = _names(schema.DDL)
    cluster = cluster_ddl.statements()
    names = _names(cluster)
    assert single, "no tables found in ingest.schema.DDL"
    for name, kind in single.items():
        # Same name and kind: tokenward's start-up CREATE ... IF NOT EXISTS are
        # no-ops on the cluster, and analysts' queries work unchanged.
        assert names.get(name) == kind, f"{name} ({kind}) missing from cluster.sql"
        if kind == "TABLE":
            assert names.get(name + "_local") == "TABLE", f"{name}_local missing"
    for stmt in cluster:
        assert "ON CLUSTER '{cluster}'" in stmt, stmt[:80]
        engine = re.search(r"ENGINE = (\w+)\((.*?)\)?$", stmt.splitlines()[-1]) or \
            re.search(r"ENGINE = (\w+)", stmt)
        if engine and "_local" in stmt.split("(")[0]:
            assert engine[1].startswith("Replicated"), stmt[:80]
            assert "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'" in stmt
    assert all(not re.search(r"ENGINE = (Replacing|Aggregating)?MergeTree\b", s) for s in cluster)


def test_cluster_sql_distribution() -> None:
    stmts = {(_names([s]) or {"db": ""}).popitem()[0]: s for s in cluster_ddl.statements()
             if "CREATE DATABASE" not in s}
    for t in ("usage_events", "usage_1m"):
        assert f"Distributed('{{cluster}}', 'tokenward', '{t}_local', cityHash64(consumer))" \
            in stmts[t]
    # Insert-time view: watches each shard's local events, writes the local rollup.
    mv = stmts["usage_1m_mv"]
    assert "TO tokenward.usage_1m_local" in mv and "FROM tokenward.usage_events_local" in mv
    # Distributed tables carry columns only (no skip indexes, no codecs).
    assert "INDEX" not in stmts["usage_events"] and "CODEC" not in stmts["detector_state"]
    assert "CODEC(ZSTD(3))" in stmts["detector_state_local"]
    assert "saved_at)" in stmts["detector_state_local"]  # ReplacingMergeTree(saved_at) kept


def test_cluster_ddl_refuses_a_table_without_sharding_key() -> None:
    extra = (*schema.DDL, "CREATE TABLE IF NOT EXISTS tokenward.new_table (a String) "
             "ENGINE = MergeTree ORDER BY a")
    with pytest.raises(SystemExit, match="new_table has no sharding key"):
        cluster_ddl.statements(extra)


def test_cluster_sql_parses(embedded_store: Any) -> None:
    # EXPLAIN AST parses a statement without running it (no cluster needed).
    for stmt in cluster_ddl.statements():
        embedded_store.query_table("EXPLAIN AST " + stmt, readonly=False)


# -- configuration files ---------------------------------------------------------
def test_config_files_load_with_tokenward_loaders() -> None:
    from detectors.config import DetectorConfig
    from ingest.pricing import PriceTable

    cfg = K8S / "config"
    DetectorConfig.from_dict(tomllib.loads((cfg / "detectors.toml").read_text()))
    deployed = PriceTable.load(cfg / "prices.toml")
    packaged = PriceTable.load()
    missing = set(packaged.models) - set(deployed.models)
    assert not missing, f"deploy prices.toml lacks packaged models {sorted(missing)}"
    policy = tomllib.loads((cfg / "policy.toml").read_text())
    try:
        from alerting.policy import PolicyConfig
    except ImportError:  # pragma: no cover - alerting layer not present
        assert "policy" in policy
    else:
        PolicyConfig.from_dict(policy["policy"])


def test_settings_names_are_real() -> None:
    from api.settings import Settings

    known = {"TOKENWARD_" + n.upper() for n in Settings.model_fields}
    texts = [(DEPLOY / "compose.yaml").read_text(), (K8S / "kustomization.yaml").read_text(),
             (K8S / "deployment.yaml").read_text()]
    used = set().union(*(re.findall(r"\bTOKENWARD_[A-Z_]+", t) for t in texts))
    assert {"TOKENWARD_KAFKA_BOOTSTRAP", "TOKENWARD_CLICKHOUSE_URL"} <= used
    assert used <= known, f"unknown settings: {sorted(used - known)}"


# -- compose and Kubernetes --------------------------------------------------------
def test_compose_structure() -> None:
    path = DEPLOY / "compose.yaml"
    text = path.read_text()
    services = {"tokenward", "redpanda", "clickhouse", "prometheus", "alertmanager", "grafana"}
    if yaml is not None:
        doc = yaml.safe_load(text)
        assert services <= set(doc["services"])
        tw = doc["services"]["tokenward"]
        assert tw["build"]["dockerfile"] == "deploy/Dockerfile"
        assert "/healthz" in " ".join(tw["healthcheck"]["test"])
        for svc in doc["services"].values():
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0]
                if src.startswith("./"):
                    assert (DEPLOY / src).exists() or src == "./alertmanager.yml", src
    else:
        for s in services:
            assert re.search(rf"^  {s}:$", text, re.M), s
        assert "dockerfile: deploy/Dockerfile" in text and "/healthz" in text
    assert "clickhouse/clickhouse-server" in text and "grafana-clickhouse-datasource" in text


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    # a build stage compiles the detectors into the wheel; the image installs
    # that wheel and refuses to build if the compiled detectors do not load
    assert text.count("FROM python:3.11-slim") == 2 and "AS build" in text
    assert "tools/build_compiled.py" in text and "pip wheel --no-deps" in text
    assert "IMPLEMENTATION != 'compiled'" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!tools/build_compiled.py" in ignore
    assert "pip install ." in text and re.search(r"^USER 10001", text, re.M)
    assert '"run", "--host", "0.0.0.0"' in text and "/healthz" in text


def test_kubernetes_manifests() -> None:
    kust = (K8S / "kustomization.yaml").read_text()
    for f in re.findall(r"^\s+- (config/\S+|\S+\.yaml)$", kust, re.M):
        assert (K8S / f).is_file(), f
    if yaml is None:
        dep = (K8S / "deployment.yaml").read_text()
        for s in ("path: /readyz", "path: /healthz", "kind: Deployment", "resources:"):
            assert s in dep, s
        for f, kind in (("pdb.yaml", "PodDisruptionBudget"), ("servicemonitor.yaml",
                        "ServiceMonitor"), ("hpa.yaml", "HorizontalPodAutoscaler"),
                        ("secret.example.yaml", "Secret"), ("service.yaml", "Service")):
            assert f"kind: {kind}" in (K8S / f).read_text()
        return
    docs = {d["kind"]: d for f in K8S.glob("*.yaml") for d in _yaml_docs(f)}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceMonitor", "Secret", "Kustomization"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and pod["securityContext"]["runAsNonRoot"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] <= 12  # partitions
    assert docs["Deployment"]["spec"]["replicas"] <= 12
    sel = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    for kind in ("Service", "PodDisruptionBudget"):
        got = docs[kind]["spec"]["selector"]
        assert sel == got.get("matchLabels", got), kind
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    auth = tomllib.loads(docs["Secret"]["stringData"]["auth.toml"])
    assert all(len(t["sha256"]) == 64 for t in auth["tokens"])
    gen = {g["name"]: g for g in docs["Kustomization"]["configMapGenerator"]}
    assert {"detectors.toml", "policy.toml", "prices.toml"} <= {
        Path(f).name for f in gen["tokenward-config"]["files"]}


# -- Prometheus ------------------------------------------------------------------------
METRICS = ("tokenward_consumer_lag", "tokenward_storage_failures_total",
           "tokenward_events_rejected_total", "tokenward_events_consumed_total",
           "tokenward_unknown_model_events_total", "tokenward_alert_sink_failures_total")
ALERTS = ("TokenwardConsumerLagGrowing", "TokenwardStorageFailing", "TokenwardRejectedRatioHigh",
          "TokenwardAlertSinkFailing", "TokenwardNoEventsConsumed", "TokenwardUnknownModelEvents")


def test_prometheus_rules_use_real_metrics() -> None:
    from api.metrics import Metrics

    families = {f.name for f in Metrics().registry.collect()}
    text = (DEPLOY / "prometheus" / "rules.yml").read_text()
    for name in METRICS:
        assert name in text, name
    dash = (DEPLOY / "grafana" / "tokenward-overview.json").read_text()
    for name in set(re.findall(r"\btokenward_[a-z_]+", text + dash)):
        if ":" in name or name.startswith("tokenward_blocks_"):
            continue
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in families, f"{name}: no such metric in api/metrics.py"
    if yaml is None:
        for a in ALERTS:
            assert f"alert: {a}" in text
        assert text.count("runbook_url:") >= len(ALERTS)
        return
    doc = yaml.safe_load(text)
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert set(ALERTS) <= set(alerts)
    for a in alerts.values():
        assert a["annotations"]["runbook_url"] and a["labels"]["severity"]
        anchor = a["annotations"]["runbook_url"].split("#")[1]
        assert anchor in _readme_anchors(), anchor
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules.yml"]


def _readme_anchors() -> set[str]:
    heads = re.findall(r"^#+ (.+)$", (DEPLOY / "README.md").read_text(), re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in heads}


# -- Grafana ---------------------------------------------------------------------------
def _expand_macros(sql: str) -> str:
    sql = re.sub(r"\$__conditionalAll\((.*?\)), \$\w+\)", "1 = 1", sql)
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 r"\1 >= toDateTime('2026-01-01 00:00:00', 'UTC') AND \1 <= now()", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)",
                 r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql)
    return sql.replace("$__interval_s", "60")


def test_dashboard_queries_run_on_the_schema(embedded_store: Any) -> None:
    dash = json.loads((DEPLOY / "grafana" / "tokenward-overview.json").read_text())
    ch_sql = [t["rawSql"] for p in dash["panels"] for t in p.get("targets", [])
              if "rawSql" in t]
    ch_sql += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    prom = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(ch_sql) >= 6 and len(prom) >= 4
    joined = "\n".join(ch_sql)
    for s in ("tokenward.usage_1m", "quantilesTDigestMerge(0.5, 0.9, 0.99)(latency_ms)",
              "tokenward.findings_latest", "tokenward.blocks", "sum(cost)"):
        assert s in joined, s
    for sql in ch_sql:
        expanded = _expand_macros(sql)
        assert "$" not in expanded, expanded
        embedded_store.query_table(expanded, readonly=True)
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {"${ch}", "${prom}"}
    ds = (DEPLOY / "grafana" / "provisioning" / "datasources" / "tokenward.yaml").read_text()
    for v in dash["templating"]["list"]:
        if v["type"] == "datasource":
            assert f"uid: {v['current']['value']}" in ds
    if yaml is not None:
        prov = yaml.safe_load(ds)
        types = {d["type"] for d in prov["datasources"]}
        assert types == {"grafana-clickhouse-datasource", "prometheus"}
