#!/usr/bin/env bash
# Gateway-facing throughput and latency of tokenward (GET /v1/blocklist and
# GET /v1/check), then the block latency a real nginx sees.
#
#   bash bench/gateway_bench.sh            # DURATION=15 CONNECTIONS=64 ENTRIES=1000
#
# Starts `tokenward run` (one uvicorn worker, auth ON with a gateway token) on
# a temporary data folder, blocks ENTRIES consumers through the API, then runs
# wrk (Debian package `wrk`) with CONNECTIONS connections for DURATION seconds
# per endpoint:
#   blocklist_304   GET /v1/blocklist with If-None-Match (the polling steady state)
#   blocklist_200   GET /v1/blocklist, full body (~ENTRIES entries)
#   check_allowed   GET /v1/check?consumer=<not blocked>
#   check_blocked   GET /v1/check?consumer=<blocked>  (403)
# and prints requests/s and p50/p99 per endpoint.  Finally it runs the nginx
# integration test, which prints the time from a retry storm's finding to the
# first 403 at nginx.  wrk and tokenward share this machine's cores.
set -euo pipefail

DURATION=${DURATION:-15}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ENTRIES=${ENTRIES:-1000}
PORT=${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
HERE=$(cd "$(dirname "$0")/.." && pwd)

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 2; }
command -v tokenward >/dev/null || { echo "tokenward not installed: pip install -e ." >&2; exit 2; }

TMP=$(mktemp -d)
TW_PID=""
cleanup() {
    if [ -n "$TW_PID" ]; then kill "$TW_PID" 2>/dev/null || true; wait "$TW_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

GW_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
AD_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
{
    echo '[[tokens]]'; echo 'name = "bench-gateway"'; echo 'roles = ["gateway"]'
    echo "sha256 = \"$(printf %s "$GW_TOKEN" | tokenward token-hash)\""
    echo '[[tokens]]'; echo 'name = "bench-admin"'; echo 'roles = ["admin"]'
    echo "sha256 = \"$(printf %s "$AD_TOKEN" | tokenward token-hash)\""
} > "$TMP/auth.toml"

# With 2+ cores, tokenward (one worker) gets core 0 and wrk core 1, so that
# they do not compete for the same CPU: PIN=1 (off by default: on a machine
# busy with other work the pinned core is shared with it, which is worse).
PIN=${PIN:-0}
TW_PIN=(); WRK_PIN=()
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    TW_PIN=(taskset -c 0); WRK_PIN=(taskset -c 1); THREADS=${THREADS_PINNED:-1}
fi

"${TW_PIN[@]}" tokenward --log-level warning run --data-dir "$TMP/data" --port "$PORT" \
    --auth-file "$TMP/auth.toml" > "$TMP/tokenward.log" 2>&1 &
TW_PID=$!
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 200); do
    curl -sf "$URL/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "$URL/healthz" >/dev/null || { cat "$TMP/tokenward.log" >&2; exit 1; }

echo "seeding $ENTRIES blocks ..." >&2
python - "$URL" "$AD_TOKEN" "$ENTRIES" <<'PY'
import sys, httpx
url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
    for i in range(n):
        r = c.post("/v1/blocks", json={"value": f"blocked-{i:05d}", "reason": "bench",
                                       "ttl": "1h", "finding_id": f"f{i}"})
        r.raise_for_status()
PY
ETAG=$(curl -s -D - -o "$TMP/list.json" -H "Authorization: Bearer $GW_TOKEN" "$URL/v1/blocklist" \
       | awk 'tolower($1)=="etag:" {print $2}' | tr -d '\r')
echo "block list: $(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(len(d['entries']), 'entries, version', d['version'])" "$TMP/list.json"), $(wc -c < "$TMP/list.json") bytes, ETag $ETAG" >&2

run() {  # name, then wrk arguments
    local name=$1; shift
    local out
    out=$("${WRK_PIN[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency \
          -H "Authorization: Bearer $GW_TOKEN" "$@")
    local rps p50 p99 non2xx
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx or 3xx/ {print $5}' <<<"$out")
    printf '%-15s %12s req/s   p50 %9s   p99 %9s   non-2xx/3xx %s\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}"
}

# Let the store settle (the seeding wrote one audit insert per block, which
# the engine merges in the background), then warm up.
sleep "${SETTLE:-10}"
"${WRK_PIN[@]}" wrk -t1 -c"$CONNECTIONS" -d3s -H "Authorization: Bearer $GW_TOKEN" \
    "$URL/v1/check?consumer=warmup" >/dev/null

echo "wrk: $THREADS threads, $CONNECTIONS connections, ${DURATION}s per endpoint, one tokenward worker, pinned: ${TW_PIN[*]:-no} / ${WRK_PIN[*]:-no}, load average now $(cut -d' ' -f1-3 /proc/loadavg)"
run blocklist_304 -H "If-None-Match: $ETAG" "$URL/v1/blocklist"
run blocklist_200 "$URL/v1/blocklist"
run check_allowed "$URL/v1/check?consumer=not-blocked"
run check_blocked "$URL/v1/check?consumer=blocked-00042"

kill "$TW_PID"; wait "$TW_PID" 2>/dev/null || true; TW_PID=""

echo
echo "retry storm -> 403 at a real nginx (tests/integration/test_nginx.py):"
cd "$HERE"
python -m pytest -q -s -p no:cacheprovider tests/integration/test_nginx.py \
    -k "retry_storm or manual_block" 2>&1 | grep -E "ms|lifted|passed|failed" || true
