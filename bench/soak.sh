#!/usr/bin/env bash
# Soak test of token-injector. See bench/README.md, "Soak".
#
#   bash bench/soak.sh                  10 minutes
#   SOAK_MINUTES=2 bash bench/soak.sh   a shorter run
#
# Mixed traffic (forward-proxy absolute-form and origin-form on a route
# listener) through a release build for SOAK_MINUTES, with 5-second tokens
# that are all different, token-endpoint blips and config reloads. At the end
# it prints a verdict and writes it, with everything it measured, to
# bench/results/<stamp>-soak/. Exit status 0 = PASS, 1 = FAIL or error.
set -euo pipefail

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF2'

Environment (defaults in brackets):
  SOAK_MINUTES      duration [10]
  SOAK_CONNS        connections of each of the two wrk processes [8]
  SOAK_DELAY_MS     pause of each connection between requests [5]
  TOKEN_LIFETIME    expires_in of every token, seconds [5]
  BLIP_EVERY        seconds between token-endpoint blips (0: none) [30]
  BLIP_SECS         length of a blip: /token answers 503 [1.5]; longer than a
                    token's usable rest (e.g. 4 with 5 s tokens) makes blips
                    that straddle expiry: then 503s are allowed while the
                    endpoint is down and for retry_max_without_token (2 s) after
  RELOAD_EVERY      seconds between config reloads (0: none) [60]
  SAMPLE_EVERY      seconds between RSS/fd samples [2]
  RSS_TOLERANCE_PCT allowed growth of the last-minute RSS max over the first [10] (+ 1 MiB)
  FD_TOLERANCE      allowed growth of the last-minute fd max over the first [8]
  PROXY_CPU         CPU of token-injector [1]   LOAD_CPU  CPU of wrk, upstream, token endpoint [0]
  PORT_BASE         first port used on 127.0.0.1 [18700]
  TI_BIN            use this token-injector binary instead of building one
  KEEP_TMP          1: keep the temporary directory [0]
EOF2
}
case ${1:-} in
    -h | --help | help) usage; exit 0 ;;
    '') ;;
    *) usage >&2; exit 2 ;;
esac

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SOAK_DIR=$BENCH_DIR/soak
ROOT=$(cd "$BENCH_DIR/.." && pwd)

SOAK_MINUTES=${SOAK_MINUTES:-10}
SOAK_CONNS=${SOAK_CONNS:-8}
SOAK_DELAY_MS=${SOAK_DELAY_MS:-5}
TOKEN_LIFETIME=${TOKEN_LIFETIME:-5}
BLIP_EVERY=${BLIP_EVERY:-30}
BLIP_SECS=${BLIP_SECS:-1.5}
RELOAD_EVERY=${RELOAD_EVERY:-60}
SAMPLE_EVERY=${SAMPLE_EVERY:-2}
RSS_TOLERANCE_PCT=${RSS_TOLERANCE_PCT:-10}
FD_TOLERANCE=${FD_TOLERANCE:-8}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${PORT_BASE:-18700}
KEEP_TMP=${KEEP_TMP:-0}

UPSTREAM_PORT=$((PORT_BASE + 43))
TOKEN_PORT=$((PORT_BASE + 44))
TI_PROXY_PORT=$((PORT_BASE + 10))
TI_ROUTE_PORT=$((PORT_BASE + 11))
TI_ROUTE2_PORT=$((PORT_BASE + 12))
TI_ADMIN_PORT=$((PORT_BASE + 19))

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$ROOT/bench/results/$STAMP-soak

KEEP_TMP_ON_1=0 # exit status 1 is a FAIL verdict, not an error
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

# ------------------------------------------------------------------- set-up

check_tools() {
    local t
    for t in wrk nginx openssl curl python3 taskset; do
        command -v "$t" >/dev/null || die "$t is missing (bash bench/run.sh installs wrk, nginx, openssl and curl)"
    done
}

make_fixtures() {
    TMP=$(mktemp -d /tmp/token-injector-soak.XXXXXX)
    mkdir -p "$TMP/www" "$TMP/nginx-tmp" "$TMP/logs"
    log "temporary directory $TMP"
    (
        cd "$TMP"
        make_tls_fixtures soak || exit 1
        echo "soak-client-secret" >client-secret
        chmod 600 client-secret
    ) || die "making certificates and bodies"
}

render() { # template output
    sed -e "s|@TMP@|$TMP|g" -e "s|@USER@|$(id -un)|g" \
        -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@TOKEN_PORT@|$TOKEN_PORT|g" \
        -e "s|@TI_PROXY_PORT@|$TI_PROXY_PORT|g" -e "s|@TI_ROUTE_PORT@|$TI_ROUTE_PORT|g" \
        -e "s|@TI_ROUTE2_PORT@|$TI_ROUTE2_PORT|g" -e "s|@TI_ADMIN_PORT@|$TI_ADMIN_PORT|g" \
        "$1" >"$2"
    if grep -q '@[A-Z_0-9]*@' "$2"; then die "unfilled placeholder in $2"; fi
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" || true; }

start_backends() {
    taskset -c "$LOAD_CPU" python3 "$SOAK_DIR/token_server.py" --port "$TOKEN_PORT" \
        --cert "$TMP/server.pem" --key "$TMP/server.key" --lifetime "$TOKEN_LIFETIME" \
        --log "$TMP/token-endpoint.jsonl" >"$TMP/logs/token-endpoint.out" 2>&1 &
    track $!
    wait_until 10 "token endpoint" curl -sf --cacert "$TMP/ca.pem" "https://localhost:$TOKEN_PORT/control/stats"
    render "$SOAK_DIR/upstream-nginx.conf" "$TMP/upstream.conf"
    taskset -c "$LOAD_CPU" nginx -e "$TMP/upstream-error.log" -c "$TMP/upstream.conf" \
        -g 'daemon off;' >"$TMP/logs/upstream.out" 2>&1 &
    track $!
    # A token from the endpoint (a real issued one), then the guards.
    local tok tok2
    tok=$(curl -sf --cacert "$TMP/ca.pem" -u soak:x -d grant_type=client_credentials \
        "https://localhost:$TOKEN_PORT/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])') ||
        die "token endpoint does not issue tokens"
    tok2=$(curl -sf --cacert "$TMP/ca.pem" -u soak:x -d grant_type=client_credentials \
        "https://localhost:$TOKEN_PORT/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
    [[ $tok != "$tok2" ]] || die "token endpoint issued the same token twice"
    wait_until 10 "upstream nginx" curl -sf --cacert "$TMP/ca.pem" -H "Authorization: Bearer $tok" \
        "https://localhost:$UPSTREAM_PORT/1k"
    expect_code 401 "upstream without a token" --cacert "$TMP/ca.pem" "https://localhost:$UPSTREAM_PORT/1k"
    expect_code 401 "upstream with a wrong token" --cacert "$TMP/ca.pem" \
        -H "Authorization: Bearer x$tok" "https://localhost:$UPSTREAM_PORT/1k"
    expect_code 200 "upstream POST /echo" --cacert "$TMP/ca.pem" -H "Authorization: Bearer $tok" \
        -d hello "https://localhost:$UPSTREAM_PORT/echo"
    log "token endpoint https://localhost:$TOKEN_PORT/token ($TOKEN_LIFETIME s tokens, e.g. $tok), upstream https://localhost:$UPSTREAM_PORT (CPU $LOAD_CPU)"
}

TI_PID=
start_token_injector() {
    render "$SOAK_DIR/token-injector.toml" "$TMP/base.toml"
    render "$SOAK_DIR/token-injector-route2.toml" "$TMP/route2.toml"
    cp "$TMP/base.toml" "$TMP/token-injector.toml"
    cat "$TMP/base.toml" "$TMP/route2.toml" >"$TMP/check2.toml"
    "$TI_BIN" check --config "$TMP/token-injector.toml" >/dev/null || die "token-injector check"
    "$TI_BIN" check --config "$TMP/check2.toml" >/dev/null || die "token-injector check (with route 2)"
    rm -f "$TMP/check2.toml"
    TOKEN_INJECTOR_WORKERS=1 RUST_LOG=${RUST_LOG:-info} taskset -c "$PROXY_CPU" \
        "$TI_BIN" run --config "$TMP/token-injector.toml" >"$TMP/token-injector.log" 2>&1 &
    TI_PID=$!
    track "$TI_PID"
    wait_until 30 "token-injector ready" curl -sf "http://127.0.0.1:$TI_ADMIN_PORT/readyz"
    expect_code 200 "origin-form /1k" "http://127.0.0.1:$TI_ROUTE_PORT/1k"
    expect_code 200 "absolute-form /64k" -x "http://127.0.0.1:$TI_PROXY_PORT" "http://api.bench/64k"
    expect_code 200 "absolute-form POST /echo" -x "http://127.0.0.1:$TI_PROXY_PORT" -d hello "http://api.bench/echo"
    log "token-injector pid $TI_PID (CPU $PROXY_CPU, 1 worker): proxy :$TI_PROXY_PORT, route :$TI_ROUTE_PORT, admin :$TI_ADMIN_PORT"
}

write_settings() {
    # Renewal with the default [tokens] settings (README, Token behaviour ->
    # Renewal): at max(min(0.75 L, L - 60 s), 0.5 L), minus a random 0-10 %.
    python3 - "$TOKEN_LIFETIME" >"$RESULTS/settings.json" <<EOF
import json, sys
L = float(sys.argv[1])
at = max(min(0.75 * L, L - 60), 0.5 * L)
print(json.dumps({
    "stamp": "$STAMP", "duration_s": $((SOAK_MINUTES * 60)), "minutes": $SOAK_MINUTES,
    "conns_per_wrk": $SOAK_CONNS, "delay_ms": $SOAK_DELAY_MS, "token_lifetime_s": L,
    "expiry_skew_s": min(5.0, L / 10), "renew_lo_s": 0.9 * at, "renew_hi_s": at,
    "retry_initial_s": 0.5, "retry_max_s": 30.0, "retry_max_without_token_s": 2.0,
    "blip_every_s": $BLIP_EVERY, "blip_secs": $BLIP_SECS, "reload_every_s": $RELOAD_EVERY,
    "sample_every_s": $SAMPLE_EVERY, "rss_tolerance_pct": $RSS_TOLERANCE_PCT, "fd_tolerance": $FD_TOLERANCE,
    "profile": "soak", "ti_bin": "$TI_BIN",
    "git": "$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)",
    "version": "$("$TI_BIN" --version | awk '{print $NF}')",
}))
EOF
}

# -------------------------------------------------------------------- run

main() {
    [[ $SOAK_MINUTES =~ ^[0-9]+$ && $SOAK_MINUTES -ge 1 ]] || die "SOAK_MINUTES=$SOAK_MINUTES: expected a whole number >= 1"
    ((PROXY_CPU != LOAD_CPU)) || die "PROXY_CPU and LOAD_CPU must differ"
    check_tools
    ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    check_ports "$UPSTREAM_PORT" "$TOKEN_PORT" "$TI_PROXY_PORT" "$TI_ROUTE_PORT" "$TI_ROUTE2_PORT" "$TI_ADMIN_PORT"
    build
    make_fixtures
    mkdir -p "$RESULTS"
    start_backends
    start_token_injector
    write_settings

    local secs=$((SOAK_MINUTES * 60)) wrk_pids=()
    log "soak: $SOAK_MINUTES min, 2 x wrk $SOAK_CONNS connections (absolute-form via the proxy, origin-form on the route listener), ${SOAK_DELAY_MS} ms between requests per connection; blip ${BLIP_SECS} s every ${BLIP_EVERY} s; reload every ${RELOAD_EVERY} s"
    SOAK_ABSOLUTE=api.bench SOAK_DELAY_MS=$SOAK_DELAY_MS SOAK_ERRLOG=$RESULTS/errors.absolute \
        taskset -c "$LOAD_CPU" wrk -t1 -c "$SOAK_CONNS" -d "${secs}s" --timeout 10s \
        -s "$SOAK_DIR/soak.lua" "http://127.0.0.1:$TI_PROXY_PORT/" >"$RESULTS/wrk-absolute.out" 2>&1 &
    wrk_pids+=($!)
    track $!
    SOAK_DELAY_MS=$SOAK_DELAY_MS SOAK_ERRLOG=$RESULTS/errors.origin \
        taskset -c "$LOAD_CPU" wrk -t1 -c "$SOAK_CONNS" -d "${secs}s" --timeout 10s \
        -s "$SOAK_DIR/soak.lua" "http://127.0.0.1:$TI_ROUTE_PORT/" >"$RESULTS/wrk-origin.out" 2>&1 &
    wrk_pids+=($!)
    track $!
    run_waiting - taskset -c "$LOAD_CPU" python3 "$SOAK_DIR/soak.py" drive --out "$RESULTS" \
        --admin-port "$TI_ADMIN_PORT" --pid "$TI_PID" --token-port "$TOKEN_PORT" \
        --extra-port "$TI_ROUTE2_PORT" --proxy-port "$TI_PROXY_PORT" --duration "$secs" \
        --sample-every "$SAMPLE_EVERY" --blip-every "$BLIP_EVERY" --blip-secs "$BLIP_SECS" \
        --blip-first 10 --reload-every "$RELOAD_EVERY" --ca "$TMP/ca.pem" \
        --config "$TMP/token-injector.toml" --config-base "$TMP/base.toml" \
        --config-extra "$TMP/route2.toml" || die "soak driver"
    local p
    for p in "${wrk_pids[@]}"; do wait "$p" || die "wrk exited with an error"; done
    kill -0 "$TI_PID" 2>/dev/null || die "token-injector died (see $TMP/token-injector.log)"
    cp "$TMP/token-endpoint.jsonl" "$TMP/upstream-sample.log" "$RESULTS/"
    grep -E ' (WARN|ERROR) ' "$TMP/token-injector.log" >"$RESULTS/token-injector-warnings.log" || true
    tail -n 200 "$TMP/token-injector.log" >"$RESULTS/token-injector-tail.log"
    log "token-injector log: $(wc -l <"$TMP/token-injector.log") lines, $(wc -l <"$RESULTS/token-injector-warnings.log") at WARN/ERROR"
    local rc=0
    python3 "$SOAK_DIR/soak.py" verdict "$RESULTS" || rc=$?
    log "results in ${RESULTS#"$ROOT"/}"
    return "$rc"
}

main
