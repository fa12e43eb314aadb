#!/bin/bash
# Run once by the clickhouse-server image on first start (empty data folder):
# a read-only user for Grafana.  readonly = 2 lets the Grafana plugin set
# max_execution_time; it still refuses every write and DDL.
set -euo pipefail
clickhouse-client --host 127.0.0.1 --user "${CLICKHOUSE_USER}" --password "${CLICKHOUSE_PASSWORD}" \
    --multiquery <<SQL
CREATE USER IF NOT EXISTS grafana IDENTIFIED WITH sha256_password BY '${GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS readonly = 2;
GRANT SELECT ON tokenward.* TO grafana;
SQL
