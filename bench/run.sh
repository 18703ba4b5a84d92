#!/usr/bin/env bash
# token-injector side by side with nginx and haproxy. See bench/README.md.
#
#   bash bench/run.sh            compare: 3 subjects + direct, 2 shapes, 2 bodies, 16/128 connections
#   bash bench/run.sh scale      1 / 100 / 10,000 routes and profiles; 16 -> 1,024 connections
#   bash bench/run.sh h2         HTTP/2 and unary gRPC: h2c in, HTTP/2 over TLS out (h2load; nginx grpc_pass)
#   bash bench/run.sh profile    where each subject's CPU goes under load (perf, cpu-clock samples)
#   bash bench/run.sh dpop       DPoP (RFC 9449) against Bearer: CPU per request, callgrind, signature cost
#   bash bench/run.sh cold       start-up: spawn to listening, token fetched, first proxied 200
#   QUICK=1 bash bench/run.sh    smoke test: 2 s runs, 1 round
#
# Everything runs on 127.0.0.1 from a temporary directory; every process this
# script starts is stopped when it exits. Results go to bench/results/<timestamp>/.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Environment (defaults in brackets):
  DURATION      seconds per measured run [10; QUICK: 2]
  WARMUP        seconds of unmeasured load before each run, same connections [2; QUICK: 1]
  ROUNDS        rounds; subjects are interleaved within each round [3; QUICK: 1]
  CONNS         connection counts of the compare mode ["16 128"]
  BODIES        response bodies ["1k 64k"]
  SHAPES        request shapes ["origin absolute"]
  SUBJECTS      ["token-injector nginx haproxy direct"]
  SCALE_COUNTS  route/profile counts of the scale mode ["1 100 10000"]
  SCALE_CONNS   connections for the route-count runs [128]
  SWEEP_CONNS   connection counts of the scale mode ["16 64 256 1024"; QUICK: "16 1024"]
  H2_SCENARIOS  h2 mode: "h2" (GET /1k) and "grpc" (unary call, 1 KiB answer) ["h2 grpc"]
  H2_CLIENTS    h2 mode: h2load connections [16]
  H2_STREAMS    h2 mode: concurrent streams per connection ["1 8"]
  PROXY_CPU     CPU of the subject [1]     LOAD_CPU  CPU of wrk and the upstream [0]
  BUSY          1: an idle-priority busy loop per CPU during measured runs [1]
  PORT_BASE     first port used on 127.0.0.1 [18400]
  UPSTREAM_HOST host in token-injector's route upstream URL: localhost or 127.0.0.1 [localhost]
  TI_BIN        use this token-injector binary instead of building one
  KEEP_TMP      1: keep the temporary directory (configs, logs) [0]
  profile mode: one run per subject (SUBJECTS, default token-injector nginx haproxy)
  at the first of SHAPES, BODIES and CONNS, DURATION s of perf samples;
  PROFILER=callgrind: token-injector only, under valgrind: instructions per request
  dpop mode: SHAPES [origin], BODIES [1k], ROUNDS [5; QUICK: 1], CONNS ["16 128"]
  DPOP_SUBJECTS     ["bearer dpop-es256 dpop-eddsa"]
  DPOP_PARTS        "runs" (interleaved wrk runs), "callgrind" (instructions per
                    request, h2load -n), "sign" (one proof: CPU, wall and callgrind)
                    ["runs callgrind sign"]
  DPOP_CG_REQUESTS  requests counted under callgrind, per subject [20000; QUICK: 4000]
  DPOP_CG_WARMUP    requests before counting starts [2000; QUICK: 500]
  DPOP_SIGN_PROOFS  proofs per timed repetition of examples/dpop_sign.rs [20000; QUICK: 5000]
  DPOP_SIGN_BIN     use this dpop_sign example binary instead of building one
  cold mode: a fresh process per start, SUBJECTS ["token-injector nginx haproxy"]
  COLD_RUNS         starts per subject, interleaved [20; QUICK: 5]
  COLD_POLL_MS      the client's connect/retry interval in ms [0.5]
  COLD_HOG          1: a busy loop at normal priority on PROXY_CPU during the starts,
                    a busy neighbour on the subject's core [0]
  TI_BASE_BIN       another token-injector build, as the subject token-injector-base
                    (e.g. SUBJECTS="token-injector token-injector-base nginx haproxy")
EOF
}

MODE=${1:-compare}
case $MODE in
    compare | scale | h2 | profile | dpop | cold) ;;
    -h | --help | help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

QUICK=${QUICK:-0}
if [[ $MODE == dpop ]]; then
    # DPoP against Bearer: 1 KiB origin-form by default, more rounds (each
    # is three short runs).
    BODIES=${BODIES:-1k}; SHAPES=${SHAPES:-origin}
    [[ $QUICK == 1 ]] || ROUNDS=${ROUNDS:-5}
fi
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-2}; WARMUP=${WARMUP:-1}; ROUNDS=${ROUNDS:-1}
    SWEEP_CONNS=${SWEEP_CONNS:-"16 1024"}
else
    DURATION=${DURATION:-10}; WARMUP=${WARMUP:-2}; ROUNDS=${ROUNDS:-3}
    SWEEP_CONNS=${SWEEP_CONNS:-"16 64 256 1024"}
fi
CONNS=${CONNS:-"16 128"}
BODIES=${BODIES:-"1k 64k"}
SHAPES=${SHAPES:-"origin absolute"}
if [[ $MODE == profile || $MODE == cold ]]; then
    SUBJECTS=${SUBJECTS:-"token-injector nginx haproxy"}
else
    SUBJECTS=${SUBJECTS:-"token-injector nginx haproxy direct"}
fi
SCALE_COUNTS=${SCALE_COUNTS:-"1 100 10000"}
SCALE_CONNS=${SCALE_CONNS:-128}
H2_SCENARIOS=${H2_SCENARIOS:-"h2 grpc"}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-"1 8"}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BUSY=${BUSY:-1}
PORT_BASE=${PORT_BASE:-18400}
KEEP_TMP=${KEEP_TMP:-0}
PROFILER=${PROFILER:-perf}
UPSTREAM_HOST=${UPSTREAM_HOST:-localhost}
DPOP_SUBJECTS=${DPOP_SUBJECTS:-"bearer dpop-es256 dpop-eddsa"}
DPOP_PARTS=${DPOP_PARTS:-"runs callgrind sign"}
if [[ $QUICK == 1 ]]; then
    DPOP_CG_REQUESTS=${DPOP_CG_REQUESTS:-4000}; DPOP_CG_WARMUP=${DPOP_CG_WARMUP:-500}
    DPOP_SIGN_PROOFS=${DPOP_SIGN_PROOFS:-5000}
else
    DPOP_CG_REQUESTS=${DPOP_CG_REQUESTS:-20000}; DPOP_CG_WARMUP=${DPOP_CG_WARMUP:-2000}
    DPOP_SIGN_PROOFS=${DPOP_SIGN_PROOFS:-20000}
fi
if [[ $QUICK == 1 ]]; then COLD_RUNS=${COLD_RUNS:-5}; else COLD_RUNS=${COLD_RUNS:-20}; fi
COLD_POLL_MS=${COLD_POLL_MS:-0.5}
COLD_HOG=${COLD_HOG:-0}

UPSTREAM_PORT=$((PORT_BASE + 43))
TOKEN_PORT=$((PORT_BASE + 44))
COLD_TOKEN_PORT=$((PORT_BASE + 45))
UPSTREAM_H2_PORT=$((PORT_BASE + 46))
UPSTREAM_DPOP_PORT=$((PORT_BASE + 47))
DPOP_PORT_BASE=$((PORT_BASE + 60)) # dpop subject i: +10*i (+0 proxy, +1 route, +9 admin)
TI_H2_PORT=$((PORT_BASE + 12))
NGINX_H2_PORT=$((PORT_BASE + 21))
HAPROXY_H2_PORT=$((PORT_BASE + 31))
TI_PROXY_PORT=$((PORT_BASE + 10))
TI_ROUTE_PORT=$((PORT_BASE + 11))
TI_ADMIN_PORT=$((PORT_BASE + 19))
NGINX_PORT=$((PORT_BASE + 20))
HAPROXY_PORT=$((PORT_BASE + 30))
COLD_PROXY_PORT=$((PORT_BASE + 50))
COLD_ROUTE_PORT=$((PORT_BASE + 51))
COLD_ADMIN_PORT=$((PORT_BASE + 59))
SCALE_PORT_BASE=$((PORT_BASE + 100)) # scale instance i: +10*i (+0 proxy, +1 route, +9 admin)

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$ROOT/bench/results/$STAMP-$MODE
CLK_TCK=$(getconf CLK_TCK)

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

# ---------------------------------------------------------------- processes

untrack() { # pid: forget a process that has been stopped (its pid may be reused)
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ------------------------------------------------------------------- set-up

ensure_packages() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    [[ $MODE == h2 ]] && { command -v h2load >/dev/null && command -v nghttp >/dev/null || missing+=(nghttp2-client); }
    if [[ $MODE == dpop && " $DPOP_PARTS " == *" callgrind "* ]]; then
        command -v valgrind >/dev/null || missing+=(valgrind)
        command -v h2load >/dev/null || missing+=(nghttp2-client)
    fi
    if [[ $MODE == profile ]]; then
        if [[ $PROFILER == callgrind ]]; then
            command -v valgrind >/dev/null || missing+=(valgrind)
        else
            command -v perf >/dev/null || missing+=(linux-perf)
        fi
    fi
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        # Keep the packages' maintainer scripts from starting the Debian
        # services (nginx would bind :80): policy-rc.d exit 101 = "not now".
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            POLICY_CREATED=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        if ((POLICY_CREATED)); then rm -f /usr/sbin/policy-rc.d; POLICY_CREATED=0; fi
    fi
    # Should a Debian service be running anyway (a machine with an init
    # system and no policy-rc.d), stop it: it must not share the CPUs.
    local svc
    for svc in nginx haproxy; do
        if [[ -s /run/$svc.pid ]] && kill -0 "$(cat /run/$svc.pid)" 2>/dev/null; then
            log "stopping the Debian $svc service"
            service "$svc" stop >/dev/null 2>&1 || true
        fi
    done
}

make_fixtures() {
    TMP=$(mktemp -d /tmp/token-injector-bench.XXXXXX)
    mkdir -p "$TMP/www" "$TMP/nginx-tmp" "$TMP/logs"
    log "temporary directory $TMP"
    (
        cd "$TMP"
        make_tls_fixtures bench || exit 1
        echo "bench-client-secret" >client-secret
        # gRPC messages: a 5-byte prefix (not compressed, big-endian length),
        # then the message. The answer of /bench.Echo/Unary and a 100-byte request.
        mkdir -p www/bench.Echo
        python3 -c 'import os, struct, sys
for path, n in (("www/bench.Echo/Unary", 1024), ("grpc-request", 100)):
    open(path, "wb").write(b"\0" + struct.pack(">I", n) + os.urandom(n))'
    ) || die "making certificates and bodies"
    # A ~900-byte opaque access token (base64url characters, not a JWT).
    TOKEN=$(openssl rand -base64 800 | tr -d '\n=' | tr '+/' '-_')
    TOKEN=${TOKEN:0:900}
    [[ ${#TOKEN} == 900 ]] || die "token generation"
    : >"$TMP/token.log"
    : >"$TMP/upstream-conn.log"
}

render() { # template output
    sed -e "s|@TMP@|$TMP|g" -e "s|@TOKEN@|$TOKEN|g" \
        -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@UPSTREAM_HOST@|$UPSTREAM_HOST|g" -e "s|@TOKEN_PORT@|$TOKEN_PORT|g" \
        -e "s|@UPSTREAM_H2_PORT@|$UPSTREAM_H2_PORT|g" -e "s|@TI_H2_PORT@|$TI_H2_PORT|g" \
        -e "s|@UPSTREAM_DPOP_PORT@|$UPSTREAM_DPOP_PORT|g" \
        -e "s|@NGINX_H2_PORT@|$NGINX_H2_PORT|g" -e "s|@HAPROXY_H2_PORT@|$HAPROXY_H2_PORT|g" \
        -e "s|@NGINX_PORT@|$NGINX_PORT|g" -e "s|@HAPROXY_PORT@|$HAPROXY_PORT|g" \
        -e "s|@TI_PROXY_PORT@|$TI_PROXY_PORT|g" -e "s|@TI_ROUTE_PORT@|$TI_ROUTE_PORT|g" \
        -e "s|@TI_ADMIN_PORT@|$TI_ADMIN_PORT|g" -e "s|@USER@|$(id -un)|g" \
        "$1" >"$2"
    if grep -q '@[A-Z_]*@' "$2"; then die "unfilled placeholder in $2"; fi
}

http_code() { # curl args... -> status code on stdout
    curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" || true
}

start_upstream() {
    render "$BENCH_DIR/conf/upstream-nginx.conf" "$TMP/upstream.conf"
    taskset -c "$LOAD_CPU" nginx -e "$TMP/upstream-error.log" -c "$TMP/upstream.conf" \
        -g 'daemon off;' >"$TMP/logs/upstream.out" 2>&1 &
    track $!
    wait_until 10 "upstream nginx" curl -sf --cacert "$TMP/ca.pem" \
        -H "Authorization: Bearer $TOKEN" "https://localhost:$UPSTREAM_PORT/1k"
    # The correctness guard: without the exact token the upstream says 401.
    expect_code 401 "upstream without a token" --cacert "$TMP/ca.pem" "https://localhost:$UPSTREAM_PORT/1k"
    expect_code 401 "upstream with a wrong token" --cacert "$TMP/ca.pem" \
        -H "Authorization: Bearer x$TOKEN" "https://localhost:$UPSTREAM_PORT/1k"
    expect_code 200 "HTTP/2 upstream" --http2 --cacert "$TMP/ca.pem" \
        -H "Authorization: Bearer $TOKEN" "https://localhost:$UPSTREAM_H2_PORT/1k"
    expect_code 401 "HTTP/2 upstream without a token" --http2 --cacert "$TMP/ca.pem" \
        "https://localhost:$UPSTREAM_H2_PORT/1k"
    expect_code 200 "token endpoint" --cacert "$TMP/ca.pem" -d grant_type=client_credentials \
        "https://localhost:$TOKEN_PORT/token"
    if [[ $MODE == dpop ]]; then check_dpop_upstream; fi
    : >"$TMP/token.log"
    : >"$TMP/upstream-conn.log"
    log "upstream nginx https://localhost:$UPSTREAM_PORT, token endpoint https://localhost:$TOKEN_PORT/token (CPU $LOAD_CPU)"
}

# The DPoP upstream's guard and the token endpoint's answer to a DPoP token
# request (a proof is only checked for its shape there; see upstream-nginx.conf).
check_dpop_upstream() {
    local u=https://localhost:$UPSTREAM_DPOP_PORT/1k fake=eyJhIjoxfQ.eyJiIjoyfQ.c2ln got
    expect_code 200 "DPoP upstream with the bearer token" --cacert "$TMP/ca.pem" -H "Authorization: Bearer $TOKEN" "$u"
    expect_code 200 "DPoP upstream with a DPoP token and a proof" --cacert "$TMP/ca.pem" \
        -H "Authorization: DPoP $TOKEN" -H "DPoP: $fake" "$u"
    expect_code 401 "DPoP upstream without a token" --cacert "$TMP/ca.pem" "$u"
    expect_code 401 "DPoP upstream with a DPoP token and no proof" --cacert "$TMP/ca.pem" \
        -H "Authorization: DPoP $TOKEN" "$u"
    expect_code 401 "DPoP upstream with a wrong DPoP token" --cacert "$TMP/ca.pem" \
        -H "Authorization: DPoP x$TOKEN" -H "DPoP: $fake" "$u"
    expect_code 401 "DPoP upstream with the bearer token and a proof" --cacert "$TMP/ca.pem" \
        -H "Authorization: Bearer $TOKEN" -H "DPoP: $fake" "$u"
    got=$(curl -s --max-time 10 --cacert "$TMP/ca.pem" -H "DPoP: $fake" -d grant_type=client_credentials \
        "https://localhost:$TOKEN_PORT/token")
    [[ $got == *'"token_type":"DPoP"'* ]] || die "token endpoint: no DPoP token for a DPoP token request: $got"
    got=$(curl -s --max-time 10 --cacert "$TMP/ca.pem" -d grant_type=client_credentials \
        "https://localhost:$TOKEN_PORT/token")
    [[ $got == *'"token_type":"Bearer"'* ]] || die "token endpoint: no Bearer token for a plain token request: $got"
    log "DPoP upstream https://localhost:$UPSTREAM_DPOP_PORT accepts Bearer, or DPoP with a proof; the token endpoint answers a proof with token_type DPoP"
}

# Subjects. For each: SUBJ_PIDS[name] = processes whose CPU time is counted,
# SUBJ_MAIN[name] = the serving process (RSS, threads), SUBJ_ORIGIN[name] and
# SUBJ_PROXY[name] = where wrk sends origin-form and absolute-form requests.
declare -A SUBJ_PIDS SUBJ_MAIN SUBJ_ORIGIN SUBJ_PROXY SUBJ_IDLE_RSS SUBJ_IDLE_THREADS SUBJ_READY_S
# dpop mode: SUBJ_ADMIN[name] = the admin listener, for token_injector_dpop_proofs_total.
declare -A SUBJ_ADMIN

# Ready = /readyz lists every expected profile, each with a valid token. (Not
# just HTTP 200: a /readyz answered while the profiles are still being set up
# can latch 200 early; see bench/README.md.)
wait_ti_ready() { # admin-port profiles timeout-s
    python3 - "$@" <<'EOF'
import json, sys, time, urllib.error, urllib.request
port, want, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline, last = time.monotonic() + timeout, "no answer"
while time.monotonic() < deadline:
    try:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
                d = json.load(r)
        except urllib.error.HTTPError as e:  # 503 while not ready, with the same body
            d = json.load(e)
        states = [p["state"] for p in d["profiles"].values()]
        last = f"ready={d['ready']}, {len(states)} profiles listed, {states.count('valid')} valid"
        if len(states) == want and all(s == "valid" for s in states):
            sys.exit(0)
    except (OSError, ValueError) as e:
        last = str(e)
    time.sleep(0.05 if want < 1000 else 0.5)
sys.exit(f"not ready after {timeout:.0f} s: {last}")
EOF
}

start_token_injector() { # name config route-port proxy-port admin-port profiles [ready-timeout-s]
    local name=$1 cfg=$2 rport=$3 pport=$4 aport=$5 nprof=$6 timeout=${7:-30} pid t0
    t0=$(date +%s.%N)
    TOKEN_INJECTOR_WORKERS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" \
        "$TI_BIN" run --config "$cfg" >"$TMP/logs/$name.log" 2>&1 &
    pid=$!
    track "$pid"
    wait_ti_ready "$aport" "$nprof" "$timeout" || die "$name: not ready (see $TMP/logs/$name.log)"
    SUBJ_READY_S[$name]=$(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 3))")
    SUBJ_PIDS[$name]=$pid
    SUBJ_MAIN[$name]=$pid
    SUBJ_ORIGIN[$name]=http://127.0.0.1:$rport
    SUBJ_PROXY[$name]=http://127.0.0.1:$pport
}

# The h2 mode's subjects take h2c (HTTP/2 with prior knowledge) on their own port.
start_nginx_subject() { # [conf port curl-args...]
    local conf=${1:-nginx-proxy} port=${2:-$NGINX_PORT} master worker
    shift 2 || shift $#
    render "$BENCH_DIR/conf/$conf.conf" "$TMP/$conf.conf"
    taskset -c "$PROXY_CPU" nginx -e "$TMP/$conf-error.log" -c "$TMP/$conf.conf" \
        -g 'daemon off;' >"$TMP/logs/nginx.out" 2>&1 &
    master=$!
    track "$master"
    wait_until 10 "nginx subject" curl -sf "$@" "http://127.0.0.1:$port/1k"
    worker=$(pgrep -P "$master" | head -n1)
    [[ -n $worker ]] || die "nginx subject: no worker process"
    SUBJ_PIDS[nginx]="$master $worker"
    SUBJ_MAIN[nginx]=$worker
    SUBJ_ORIGIN[nginx]=http://127.0.0.1:$port
    SUBJ_PROXY[nginx]=http://127.0.0.1:$port
}

start_haproxy_subject() { # [conf port curl-args...]
    local conf=${1:-haproxy} port=${2:-$HAPROXY_PORT} pid
    shift 2 || shift $#
    render "$BENCH_DIR/conf/$conf.cfg" "$TMP/$conf.cfg"
    haproxy -c -q -f "$TMP/$conf.cfg" || die "haproxy config check"
    taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/$conf.cfg" >"$TMP/logs/haproxy.out" 2>&1 &
    pid=$!
    track "$pid"
    wait_until 10 "haproxy subject" curl -sf "$@" "http://127.0.0.1:$port/1k"
    SUBJ_PIDS[haproxy]=$pid
    SUBJ_MAIN[haproxy]=$pid
    SUBJ_ORIGIN[haproxy]=http://127.0.0.1:$port
    SUBJ_PROXY[haproxy]=http://127.0.0.1:$port
}

start_h2_subject() { # name
    case $1 in
        token-injector)
            render "$BENCH_DIR/conf/token-injector-h2.toml" "$TMP/token-injector-h2.toml"
            "$TI_BIN" check --config "$TMP/token-injector-h2.toml" >/dev/null || die "token-injector check"
            start_token_injector token-injector "$TMP/token-injector-h2.toml" \
                "$TI_H2_PORT" "$TI_PROXY_PORT" "$TI_ADMIN_PORT" 1
            ;;
        nginx) start_nginx_subject nginx-grpc "$NGINX_H2_PORT" --http2-prior-knowledge ;;
        haproxy) start_haproxy_subject haproxy-h2 "$HAPROXY_H2_PORT" --http2-prior-knowledge ;;
        direct) return ;;
        *) die "unknown subject $1" ;;
    esac
    verify_h2_subject "$1"
    record_idle "$1"
}

# Over h2c: GET /1k gives the whole body, and the gRPC call gives its whole
# answer and the trailer grpc-status: 0 (the upstream says 401 without the token).
verify_h2_subject() { # name
    local name=$1 url=${SUBJ_ORIGIN[$1]} got
    expect_code 200 "$name h2c /1k" --http2-prior-knowledge "$url/1k"
    got=$(curl -s --max-time 10 --http2-prior-knowledge "$url/1k" | wc -c)
    [[ $got == 1024 ]] || die "$name h2c /1k: $got bytes, expected 1024"
    # curl does not show HTTP/2 trailers; nghttp (h2c with prior knowledge for http://) does.
    timeout 10 nghttp -v -d "$TMP/grpc-request" -H 'content-type: application/grpc' -H 'te: trailers' \
        "$url/bench.Echo/Unary" >"$TMP/grpc-verbose" 2>&1 || die "$name gRPC call: nghttp failed"
    grep -aq ':status: 200' "$TMP/grpc-verbose" || die "$name gRPC call: not 200 (see $TMP/grpc-verbose)"
    grep -aq 'grpc-status: 0' "$TMP/grpc-verbose" || die "$name gRPC call: no grpc-status: 0 trailer (see $TMP/grpc-verbose)"
    timeout 10 nghttp -d "$TMP/grpc-request" -H 'content-type: application/grpc' -H 'te: trailers' \
        "$url/bench.Echo/Unary" >"$TMP/grpc-answer" 2>/dev/null || die "$name gRPC call: nghttp failed"
    cmp -s "$TMP/grpc-answer" "$TMP/www/bench.Echo/Unary" || die "$name gRPC call: wrong answer"
    log "$name: h2c $url answers GET /1k and the gRPC call (grpc-status 0) with the token"
}

start_subject() { # name
    case $1 in
        token-injector)
            render "$BENCH_DIR/conf/token-injector.toml" "$TMP/token-injector.toml"
            "$TI_BIN" check --config "$TMP/token-injector.toml" >/dev/null || die "token-injector check"
            start_token_injector token-injector "$TMP/token-injector.toml" \
                "$TI_ROUTE_PORT" "$TI_PROXY_PORT" "$TI_ADMIN_PORT" 1
            ;;
        nginx) start_nginx_subject ;;
        haproxy) start_haproxy_subject ;;
        direct) return ;;
        *) die "unknown subject $1" ;;
    esac
    verify_subject "$1"
    record_idle "$1"
}

# Both request shapes must give 200 and the whole body: the upstream answers
# 401 unless the subject sent the exact token.
verify_subject() { # name
    local name=$1 body
    for body in $BODIES; do
        expect_code 200 "$name origin-form /$body" "${SUBJ_ORIGIN[$name]}/$body"
        expect_code 200 "$name absolute-form /$body" -x "${SUBJ_PROXY[$name]}" "http://api.bench/$body"
        local got want
        got=$(curl -s --max-time 10 -x "${SUBJ_PROXY[$name]}" "http://api.bench/$body" | wc -c)
        want=$(wc -c <"$TMP/www/$body")
        [[ $got == "$want" ]] || die "$name /$body: $got bytes, expected $want"
    done
    log "$name: origin-form ${SUBJ_ORIGIN[$name]} and absolute-form via ${SUBJ_PROXY[$name]} answer 200 with the token"
}

status_kib() { # pid field -> kB value of a /proc/PID/status line
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}

threads_of() { # pid
    local t=(/proc/"$1"/task/*)
    echo "${#t[@]}"
}

cpu_ticks() { # pid... -> utime+stime summed, in clock ticks
    local pid stat rest f total=0
    for pid in "$@"; do
        stat=$(<"/proc/$pid/stat") || die "process $pid is gone"
        rest=${stat##*) }
        read -ra f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

reset_hwm() { # pid: VmHWM := VmRSS ("echo 5 > clear_refs", Linux >= 4.0)
    echo 5 >"/proc/$1/clear_refs" 2>/dev/null
}

record_idle() { # name: RSS and threads after start-up, before any load
    local name=$1 main=${SUBJ_MAIN[$1]}
    sleep 1
    SUBJ_IDLE_RSS[$name]=$(status_kib "$main" VmRSS)
    SUBJ_IDLE_THREADS[$name]=$(threads_of "$main")
    log "$name: idle RSS $((SUBJ_IDLE_RSS[$name] / 1024)) MiB (${SUBJ_IDLE_RSS[$name]} kB), ${SUBJ_IDLE_THREADS[$name]} threads (pid $main)"
}

start_busy() {
    ((BUSY)) || return 0
    local cpu sched=()
    command -v chrt >/dev/null && sched=(chrt -i 0)
    for cpu in $LOAD_CPU $PROXY_CPU; do
        nice -n 19 "${sched[@]}" taskset -c "$cpu" bash -c 'while :; do :; done' &
        BUSY_PIDS+=($!)
    done
    log "idle-priority busy loops on CPUs $LOAD_CPU and $PROXY_CPU (pids ${BUSY_PIDS[*]})"
}

stop_busy() {
    if ((${#BUSY_PIDS[@]})); then stop_pid "${BUSY_PIDS[@]}"; fi
}

lines() { wc -l <"$1"; }

POOL_PORT=$UPSTREAM_PORT # the upstream port whose connections count as the pool
pool_conns() { # pid -> established TCP connections from that process to the upstream
    ss -Htnp state established "( dport = :$POOL_PORT )" 2>/dev/null | grep -c "pid=$1," || true
}

# ------------------------------------------------------------------ measure

RAW=

run_wrk() { # seconds conns url shape body auth -> wrk output in $TMP/wrk.out
    local secs=$1 conns=$2 url=$3 shape=$4 body=$5 auth=$6 abs=''
    [[ $shape == absolute ]] && abs=api.bench
    BENCH_PATH=/$body BENCH_ABSOLUTE=$abs BENCH_AUTH=$auth \
        run_waiting "$TMP/wrk.out" taskset -c "$LOAD_CPU" wrk -t1 -c "$conns" -d "${secs}s" \
        --timeout 10s -s "$BENCH_DIR/wrk.lua" "$url/"
}

# h2 mode: conns = concurrent streams = H2_CLIENTS connections x streams each.
run_h2load() { # seconds conns url scenario auth -> h2load output in $TMP/h2load.out, log in $TMP/h2load.log
    local secs=$1 conns=$2 url=$3 scenario=$4 auth=$5 args=()
    args=(-c "$H2_CLIENTS" -m $((conns / H2_CLIENTS)) -t 1 -D "$secs" --log-file "$TMP/h2load.log")
    [[ -n $auth ]] && args+=(-H "authorization: $auth")
    case $scenario in
        h2) url=$url/1k ;;
        grpc)
            url=$url/bench.Echo/Unary
            args+=(-d "$TMP/grpc-request" -H 'content-type: application/grpc' -H 'te: trailers')
            ;;
    esac
    run_waiting "$TMP/h2load.out" taskset -c "$LOAD_CPU" h2load "${args[@]}" "$url"
}

run_load() { # seconds conns url shape body auth
    if [[ $MODE == h2 ]]; then run_h2load "$1" "$2" "$3" "$4" "$6"; else run_wrk "$@"; fi
}

load_json() { # the last run's figures, as wrk.lua's JSON line
    if [[ $MODE == h2 ]]; then
        python3 "$BENCH_DIR/h2load.py" "$TMP/h2load.out" "$TMP/h2load.log"
    else
        sed -n 's/^BENCHJSON //p' "$TMP/wrk.out"
    fi
}

load_output() { if [[ $MODE == h2 ]]; then cat "$TMP/h2load.out"; else cat "$TMP/wrk.out"; fi; }

# One measured run of one subject: warm-up, then DURATION seconds of load.
measure() { # mode round shape body conns subject [label]
    local mode=$1 round=$2 shape=$3 body=$4 conns=$5 subject=$6 label=${7:-$6}
    local url auth='' pids=() main=''
    if [[ $subject == direct ]]; then
        url=https://localhost:$UPSTREAM_PORT
        [[ $MODE == h2 ]] && url=https://localhost:$UPSTREAM_H2_PORT
        auth="Bearer $TOKEN"
    else
        if [[ $shape == absolute ]]; then url=${SUBJ_PROXY[$label]}; else url=${SUBJ_ORIGIN[$label]}; fi
        read -ra pids <<<"${SUBJ_PIDS[$label]}"
        main=${SUBJ_MAIN[$label]}
    fi

    local warm_conn0 warm_new=0
    warm_conn0=$(lines "$TMP/upstream-conn.log")
    local pool_before=null pool_after=null
    [[ -n $main ]] && pool_before=$(pool_conns "$main")
    if ((WARMUP > 0)); then
        run_load "$WARMUP" "$conns" "$url" "$shape" "$body" "$auth" || die "warm-up: $(load_output)"
        warm_new=$(($(lines "$TMP/upstream-conn.log") - warm_conn0))
    fi

    local hwm_reset=false cpu0=0 cpu1=0 tok0 tok1 conn0 conn1 out json proofs0 proofs=null
    local admin=${SUBJ_ADMIN[$label]:-}
    [[ -n $admin ]] && proofs0=$(dpop_proofs "$admin")
    if [[ -n $main ]] && reset_hwm "$main"; then hwm_reset=true; fi
    tok0=$(lines "$TMP/token.log")
    conn0=$(lines "$TMP/upstream-conn.log")
    ((${#pids[@]})) && cpu0=$(cpu_ticks "${pids[@]}")
    run_load "$DURATION" "$conns" "$url" "$shape" "$body" "$auth" || die "load: $(load_output)"
    out=$(load_output)
    ((${#pids[@]})) && cpu1=$(cpu_ticks "${pids[@]}")
    [[ -n $admin ]] && proofs=$(($(dpop_proofs "$admin") - proofs0))
    conn1=$(lines "$TMP/upstream-conn.log")
    tok1=$(lines "$TMP/token.log")
    json=$(load_json) || die "reading the load generator's figures"
    # Protocol and cipher of the upstream connections opened in warm-up and run.
    local tls
    tls=$(tail -n +$((warm_conn0 + 1)) "$TMP/upstream-conn.log" | awk '
        { n[$2 "/" $3]++ }
        END { s = ""; for (k in n) { s = s (s == "" ? "" : ",") "\"" k "\":" n[k] }; print "{" s "}" }')
    [[ -n $json ]] || die "no figures from the load generator: $out"

    local hwm=null rss=null threads=null idle_rss=null idle_threads=null
    if [[ -n $main ]]; then
        pool_after=$(pool_conns "$main")
        hwm=$(status_kib "$main" VmHWM)
        rss=$(status_kib "$main" VmRSS)
        threads=$(threads_of "$main")
        idle_rss=${SUBJ_IDLE_RSS[$label]:-null}
        idle_threads=${SUBJ_IDLE_THREADS[$label]:-null}
    fi
    printf '{"mode":"%s","round":%d,"shape":"%s","body":"%s","conns":%d,"subject":"%s","label":"%s","duration_s":%d,"cpu_ticks":%d,"clk_tck":%d,"peak_rss_kib":%s,"rss_after_kib":%s,"hwm_reset":%s,"idle_rss_kib":%s,"threads_idle":%s,"threads_after":%s,"new_upstream_conns":%d,"warmup_new_upstream_conns":%d,"token_requests":%d,"pool_before":%s,"pool_after":%s,"dpop_proofs":%s,"upstream_tls":%s,"wrk":%s}\n' \
        "$mode" "$round" "$shape" "$body" "$conns" "$subject" "$label" "$DURATION" \
        $((cpu1 - cpu0)) "$CLK_TCK" "$hwm" "$rss" "$hwm_reset" "$idle_rss" "$idle_threads" \
        "$threads" $((conn1 - conn0)) "$warm_new" $((tok1 - tok0)) "$pool_before" "$pool_after" "$proofs" "$tls" "$json" >>"$RAW"
    python3 "$BENCH_DIR/report.py" --line "$(tail -n1 "$RAW")" >&2
}

rotate() { # round words... -> the words rotated left by (round-1)
    local r=$1
    shift
    local a=("$@") n=$# i
    for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((i + r - 1) % n))]}"; done
}

cold_burst() {
    local cfg=$TMP/cold.toml
    render "$BENCH_DIR/conf/token-injector.toml" "$TMP/token-injector.toml"
    sed -e "s|$TOKEN_PORT/token|$COLD_TOKEN_PORT/token|" \
        -e "s|127.0.0.1:$TI_PROXY_PORT|127.0.0.1:$COLD_PROXY_PORT|" \
        -e "s|127.0.0.1:$TI_ROUTE_PORT|127.0.0.1:$COLD_ROUTE_PORT|" \
        -e "s|127.0.0.1:$TI_ADMIN_PORT|127.0.0.1:$COLD_ADMIN_PORT|" \
        "$TMP/token-injector.toml" >"$cfg"
    log "cold burst: 500 requests at a fresh token-injector whose token endpoint answers after 1 s"
    local out
    python3 "$BENCH_DIR/coldburst.py" --token-port "$COLD_TOKEN_PORT" --route-port "$COLD_ROUTE_PORT" \
        --admin-port "$COLD_ADMIN_PORT" --cert "$TMP/server.pem" --key "$TMP/server.key" \
        --token "$TOKEN" --delay 1 --n 500 --log "$TMP/logs/cold.log" -- \
        env TOKEN_INJECTOR_WORKERS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" \
        "$TI_BIN" run --config "$cfg" >"$TMP/cold.json" &
    local pid=$!
    track "$pid"
    wait "$pid" || die "cold burst check (see $TMP/logs/cold.log)"
    untrack "$pid"
    out=$(<"$TMP/cold.json")
    log "cold burst: $out"
    cp "$TMP/cold.json" "$RESULTS/cold_burst.json"
}

write_meta() {
    local subj extra=
    {
        printf '{"mode":"%s","stamp":"%s","quick":%s,"duration_s":%d,"warmup_s":%d,"rounds":%d,' \
            "$MODE" "$STAMP" "$QUICK" "$DURATION" "$WARMUP" "$ROUNDS"
        printf '"proxy_cpu":%d,"load_cpu":%d,"busy_loops":%d,"token_bytes":%d,"h2_clients":%d,' \
            "$PROXY_CPU" "$LOAD_CPU" "$BUSY" "${#TOKEN}" "$H2_CLIENTS"
        printf '"cold_runs":%d,"cold_poll_ms":%s,"cold_hog":%d,' "$COLD_RUNS" "$COLD_POLL_MS" "$COLD_HOG"
        printf '"git":"%s","ti_bin":"%s","ti_base_bin":"%s","kernel":"%s","cpu":"%s",' \
            "$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)" "$TI_BIN" "${TI_BASE_BIN:-}" \
            "$(uname -r)" "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
        printf '"versions":{"nginx":"%s","haproxy":"%s","wrk":"%s","token_injector":"%s"},' \
            "$(nginx -v 2>&1 | sed 's/.*nginx\///')" "$(haproxy -v | awk 'NR==1 {print $3}')" \
            "$(wrk -v 2>&1 | awk 'NR==1 {print $2}')$([[ $MODE == h2 ]] && h2load --version | awk 'NR==1 {print ", h2load " $2}')" "$("$TI_BIN" --version | awk '{print $NF}')"
        printf '"subjects":{'
        for subj in "${!SUBJ_MAIN[@]}"; do
            printf '%s"%s":{"pids":"%s","idle_rss_kib":%s,"threads_idle":%s,"ready_s":%s}' "$extra" \
                "$subj" "${SUBJ_PIDS[$subj]}" "${SUBJ_IDLE_RSS[$subj]:-null}" \
                "${SUBJ_IDLE_THREADS[$subj]:-null}" "${SUBJ_READY_S[$subj]:-null}"
            extra=,
        done
        printf '}}\n'
    } >"$RESULTS/meta.json"
}

# -------------------------------------------------------------------- modes

mode_compare() {
    local subj round shape body conns startup_tokens
    cold_burst
    for subj in $SUBJECTS; do start_subject "$subj"; done
    startup_tokens=$(lines "$TMP/token.log")
    log "token requests at start-up: $startup_tokens (token-injector fetches its one profile's token)"
    echo "$startup_tokens" >"$RESULTS/startup_token_requests"
    write_meta
    start_busy
    local runs=0 total
    total=$((ROUNDS * $(wc -w <<<"$SHAPES") * $(wc -w <<<"$BODIES") * $(wc -w <<<"$CONNS") * $(wc -w <<<"$SUBJECTS")))
    log "$total runs of ${WARMUP}+${DURATION} s"
    for ((round = 1; round <= ROUNDS; round++)); do
        for shape in $SHAPES; do
            for body in $BODIES; do
                for conns in $CONNS; do
                    # Rotate the order each round: A B C D, B C D A, ...
                    for subj in $(rotate "$round" $SUBJECTS); do
                        runs=$((runs + 1))
                        log "[$runs/$total] round $round $shape /$body c=$conns $subj"
                        measure compare "$round" "$shape" "$body" "$conns" "$subj"
                    done
                done
            done
        done
    done
    stop_busy
}

mode_scale() {
    local n i=0 label round subj conns variant
    local instances=()
    render "$BENCH_DIR/conf/token-injector.toml" "$TMP/token-injector.toml"
    # 1. Many routes / profiles: one instance per configuration, all idle but
    #    the one under load.
    for n in $SCALE_COUNTS; do
        for variant in routes profiles; do
            ((n == 1)) && [[ $variant == profiles ]] && continue # same as routes-1
            label=$variant-$n
            ((n == 1)) && label=routes-1
            local base=$((SCALE_PORT_BASE + 10 * i))
            i=$((i + 1))
            check_ports "$base" $((base + 1)) $((base + 9))
            local args=(--routes "$n" --proxy-port "$base" --route-port $((base + 1))
                --admin-port $((base + 9)) --token-port "$TOKEN_PORT" --upstream-port "$UPSTREAM_PORT")
            [[ $variant == profiles ]] && args+=(--own-profiles)
            python3 "$BENCH_DIR/scale_config.py" "${args[@]}" --upstream-host "$UPSTREAM_HOST" >"$TMP/$label.toml"
            "$TI_BIN" check --config "$TMP/$label.toml" >/dev/null || die "token-injector check $label"
            local tok0
            tok0=$(lines "$TMP/token.log")
            log "$label: starting ($n routes, $([[ $variant == profiles ]] && echo "$n" || echo 1) profiles)"
            local nprof=1
            [[ $variant == profiles ]] && nprof=$n
            start_token_injector "$label" "$TMP/$label.toml" $((base + 1)) "$base" $((base + 9)) "$nprof" 600
            verify_subject "$label"
            record_idle "$label"
            log "$label: ready after ${SUBJ_READY_S[$label]} s, $(($(lines "$TMP/token.log") - tok0)) token requests"
            instances+=("$label")
        done
    done
    write_meta
    start_busy
    local runs=0 total shape
    total=$((ROUNDS * ${#instances[@]} * 2))
    log "route-count runs: $total runs of ${WARMUP}+${DURATION} s at $SCALE_CONNS connections"
    for ((round = 1; round <= ROUNDS; round++)); do
        for shape in absolute origin; do
            for label in $(rotate "$round" "${instances[@]}"); do
                runs=$((runs + 1))
                log "[$runs/$total] round $round $shape /1k c=$SCALE_CONNS $label"
                measure routes "$round" "$shape" 1k "$SCALE_CONNS" token-injector "$label"
            done
        done
    done
    stop_busy
    for label in "${instances[@]}"; do
        stop_pid "${SUBJ_PIDS[$label]}"
        untrack "${SUBJ_PIDS[$label]}"
    done

    # 2. Connections 16 -> 1,024, all subjects.
    local subjects=()
    for subj in $SUBJECTS; do
        start_subject "$subj"
        subjects+=("$subj")
    done
    write_meta
    start_busy
    runs=0
    total=$((ROUNDS * $(wc -w <<<"$SWEEP_CONNS") * ${#subjects[@]}))
    log "connection sweep: $total runs of ${WARMUP}+${DURATION} s"
    for ((round = 1; round <= ROUNDS; round++)); do
        for conns in $SWEEP_CONNS; do
            for subj in $(rotate "$round" "${subjects[@]}"); do
                runs=$((runs + 1))
                log "[$runs/$total] round $round origin /1k c=$conns $subj"
                measure conns "$round" origin 1k "$conns" "$subj"
            done
        done
    done
    stop_busy
}

mode_h2() {
    local subj round scenario streams conns
    POOL_PORT=$UPSTREAM_H2_PORT
    for subj in $SUBJECTS; do start_h2_subject "$subj"; done
    write_meta
    start_busy
    local runs=0 total
    total=$((ROUNDS * $(wc -w <<<"$H2_SCENARIOS") * $(wc -w <<<"$H2_STREAMS") * $(wc -w <<<"$SUBJECTS")))
    log "$total runs of ${WARMUP}+${DURATION} s; $H2_CLIENTS h2c connections, streams each: $H2_STREAMS"
    for ((round = 1; round <= ROUNDS; round++)); do
        for scenario in $H2_SCENARIOS; do
            for streams in $H2_STREAMS; do
                conns=$((H2_CLIENTS * streams))
                for subj in $(rotate "$round" $SUBJECTS); do
                    runs=$((runs + 1))
                    log "[$runs/$total] round $round $scenario $H2_CLIENTS conns x $streams streams $subj"
                    measure h2 "$round" "$scenario" 1k "$conns" "$subj"
                done
            done
        done
    done
    stop_busy
}

# Where the CPU goes: for each subject, a warm-up, then DURATION s of load
# while `perf record -e cpu-clock` samples the subject's processes (software
# clock: this machine's hypervisor has no hardware counters). Writes
# profile-<subject>.txt (self time by binary and symbol) and prints the
# kernel/user split and the top symbols. Symbols of token-injector need no
# debug info (the release binary keeps its symbol table).
mode_profile() {
    if [[ $PROFILER == callgrind ]]; then
        profile_callgrind
        return
    fi
    [[ $PROFILER == perf ]] || die "PROFILER=$PROFILER: perf or callgrind"
    command -v perf >/dev/null || die "perf is missing (Debian: linux-perf)"
    local shape body conns subj url pids
    read -r shape _ <<<"$SHAPES"
    read -r body _ <<<"$BODIES"
    read -r conns _ <<<"$CONNS"
    for subj in $SUBJECTS; do
        [[ $subj == direct ]] && continue
        start_subject "$subj"
        if [[ $shape == absolute ]]; then url=${SUBJ_PROXY[$subj]}; else url=${SUBJ_ORIGIN[$subj]}; fi
        pids=$(tr ' ' ',' <<<"${SUBJ_PIDS[$subj]}")
        start_busy
        if ((WARMUP > 0)); then
            run_load "$WARMUP" "$conns" "$url" "$shape" "$body" "" || die "warm-up: $(load_output)"
        fi
        perf record -q -e cpu-clock -F 4999 -p "$pids" -o "$RESULTS/perf-$subj.data" -- sleep "$DURATION" \
            >"$TMP/logs/perf-$subj.out" 2>&1 &
        local perf_pid=$!
        track "$perf_pid"
        run_load "$DURATION" "$conns" "$url" "$shape" "$body" "" || die "load: $(load_output)"
        wait "$perf_pid" || die "perf record (see $TMP/logs/perf-$subj.out)"
        untrack "$perf_pid"
        stop_busy
        BUSY_PIDS=()
        local reqs
        reqs=$(load_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
        perf report -q --stdio -i "$RESULTS/perf-$subj.data" --no-children --sort dso,sym \
            --percent-limit 0.3 >"$RESULTS/profile-$subj.txt" 2>/dev/null || die "perf report"
        {
            echo "== $subj: $shape /$body c=$conns, $reqs requests in ${DURATION} s =="
            perf report -q --stdio -i "$RESULTS/perf-$subj.data" --no-children --sort dso 2>/dev/null | sed -n 1,8p
            head -n 25 "$RESULTS/profile-$subj.txt"
            echo
        } | tee -a "$RESULTS/table.txt"
        stop_pid ${SUBJ_PIDS[$subj]}
        local p
        for p in ${SUBJ_PIDS[$subj]}; do untrack "$p"; done
    done
}

# Instructions per request in token-injector's own process (user space:
# the kernel's share is not counted), the same run after run whatever else
# the machine does: the figure to compare two builds of the hot path
# (TI_BIN=...). Instrumentation starts after the warm-up and stops before exit,
# so start-up is not counted. Writes callgrind.out and profile-callgrind.txt.
profile_callgrind() {
    command -v valgrind >/dev/null || die "valgrind is missing"
    local shape body conns url pid reqs ir
    read -r shape _ <<<"$SHAPES"
    read -r body _ <<<"$BODIES"
    read -r conns _ <<<"$CONNS"
    render "$BENCH_DIR/conf/token-injector.toml" "$TMP/token-injector.toml"
    TOKEN_INJECTOR_WORKERS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" \
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$RESULTS/callgrind.out" \
        "$TI_BIN" run --config "$TMP/token-injector.toml" >"$TMP/logs/callgrind.log" 2>&1 &
    pid=$!
    track "$pid"
    wait_ti_ready "$TI_ADMIN_PORT" 1 120 || die "token-injector under valgrind: not ready (see $TMP/logs/callgrind.log)"
    if [[ $shape == absolute ]]; then url=http://127.0.0.1:$TI_PROXY_PORT; else url=http://127.0.0.1:$TI_ROUTE_PORT; fi
    if ((WARMUP > 0)); then
        run_load "$WARMUP" "$conns" "$url" "$shape" "$body" "" || die "warm-up: $(load_output)"
    fi
    callgrind_control -i on "$pid" >/dev/null || die "callgrind_control"
    run_load "$DURATION" "$conns" "$url" "$shape" "$body" "" || die "load: $(load_output)"
    callgrind_control -i off "$pid" >/dev/null || die "callgrind_control"
    reqs=$(load_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
    # callgrind writes its file at exit: give the drain (slow under
    # valgrind) up to a minute before stop_pid's SIGKILL.
    kill -TERM "$pid" 2>/dev/null || true
    wait_until 60 "token-injector under valgrind to exit" bash -c '! kill -0 "$1" 2>/dev/null' _ "$pid"
    stop_pid "$pid"
    untrack "$pid"
    callgrind_annotate --inclusive=no "$RESULTS/callgrind.out" >"$RESULTS/profile-callgrind.txt" 2>/dev/null ||
        die "callgrind_annotate"
    ir=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }' "$RESULTS/profile-callgrind.txt")
    [[ $ir =~ ^[0-9]+$ && $reqs =~ ^[1-9][0-9]*$ ]] || die "no instruction count ($ir) or no requests ($reqs)"
    {
        echo "== token-injector under callgrind: $shape /$body c=$conns, $reqs requests"
        echo "instructions per request (user space): $((ir / reqs))"
        grep -A 25 '^Ir ' "$RESULTS/profile-callgrind.txt" | tail -n +3 | cut -c1-160
    } | tee -a "$RESULTS/table.txt"
}

# ------------------------------------------------------------------ dpop mode

# token_injector_dpop_proofs_total of one instance, summed over profiles (0
# for a profile without DPoP: no such series).
dpop_proofs() { # admin-url
    curl -sf --max-time 10 "$1/metrics" |
        awk '/^token_injector_dpop_proofs_total/ { s += $NF } END { printf "%d\n", s }' ||
        die "reading $1/metrics"
}

dpop_ports() { # subject -> "proxy-port route-port admin-port"
    local i=0 s
    for s in bearer dpop-es256 dpop-eddsa; do
        [[ $s == "$1" ]] && break
        i=$((i + 1))
    done
    local base=$((DPOP_PORT_BASE + 10 * i))
    echo "$base $((base + 1)) $((base + 9))"
}

# The subject's config: conf/token-injector-dpop.toml with its own ports and
# its profile's DPoP lines. Everything else is the same for all three.
dpop_config() { # subject -> writes $TMP/<subject>.toml
    local subj=$1 lines proxy route admin
    read -r proxy route admin <<<"$(dpop_ports "$subj")"
    case $subj in
        bearer) lines='# Bearer: no DPoP' ;;
        dpop-es256) lines='dpop = true                 # a generated EC P-256 key, ES256 (the default dpop_alg)' ;;
        dpop-eddsa) lines='dpop = true\ndpop_alg = "EdDSA"          # a generated Ed25519 key' ;;
    esac
    sed -e "s|@DPOP_LINES@|$lines|" -e "s|@SUBJ_PROXY_PORT@|$proxy|g" -e "s|@SUBJ_ROUTE_PORT@|$route|g" \
        -e "s|@SUBJ_ADMIN_PORT@|$admin|g" "$BENCH_DIR/conf/token-injector-dpop.toml" >"$TMP/$subj.toml.in"
    render "$TMP/$subj.toml.in" "$TMP/$subj.toml"
    "$TI_BIN" check --config "$TMP/$subj.toml" >/dev/null || die "token-injector check $subj"
}

start_dpop_subject() { # subject
    local subj=$1 proxy route admin
    read -r proxy route admin <<<"$(dpop_ports "$subj")"
    dpop_config "$subj"
    start_token_injector "$subj" "$TMP/$subj.toml" "$route" "$proxy" "$admin" 1
    SUBJ_ADMIN[$subj]=http://127.0.0.1:$admin
    verify_subject "$subj"
    verify_dpop_proof "$subj"
    record_idle "$subj"
}

# What the upstream received: no DPoP header from the bearer subject; from
# the others a proof whose header names the algorithm and carries the public
# key, and whose claims are this request's (htm, htu), the token's ath, a
# fresh jti and a current iat. (The signature is verified by the unit tests
# of src/dpop.rs, not here.)
verify_dpop_proof() { # subject
    local subj=$1 url=${SUBJ_ORIGIN[$1]}/dpop-proof a b want_alg=none
    a=$(curl -sf --max-time 10 "$url") || [[ $subj == bearer ]] || die "$subj: GET /dpop-proof failed"
    b=$(curl -sf --max-time 10 "$url") || true
    case $subj in dpop-es256) want_alg=ES256 ;; dpop-eddsa) want_alg=EdDSA ;; esac
    python3 - "$subj" "$want_alg" "$TOKEN" "https://$UPSTREAM_HOST:$UPSTREAM_DPOP_PORT/dpop-proof" "$a" "$b" <<'EOF' ||
import base64, hashlib, json, sys, time
subj, want_alg, token, htu, a, b = sys.argv[1:]
if want_alg == "none":
    sys.exit(f"{subj}: the upstream got a DPoP header: {a[:60]}" if a else 0)
def part(p):
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
def check(proof):
    h, p, s = proof.split(".")
    h, p = part(h), part(p)
    assert h["typ"] == "dpop+jwt" and h["alg"] == want_alg, h
    assert h["jwk"]["kty"] == {"ES256": "EC", "EdDSA": "OKP"}[want_alg] and "d" not in h["jwk"], h
    ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()
    assert p["htm"] == "GET" and p["htu"] == htu and p["ath"] == ath, p
    assert abs(p["iat"] - time.time()) < 60 and len(p["jti"]) >= 16, p
    return p["jti"]
try:
    assert check(a) != check(b), "the same jti twice"
except Exception as e:
    sys.exit(f"{subj}: proof check failed: {e!r}")
EOF
        die "$subj: wrong DPoP proof at the upstream"
    local proofs
    proofs=$(dpop_proofs "${SUBJ_ADMIN[$subj]}")
    if [[ $subj == bearer ]]; then
        ((proofs == 0)) || die "$subj: $proofs DPoP proofs signed"
        log "$subj: the upstream got Authorization: Bearer and no DPoP header"
    else
        ((proofs > 0)) || die "$subj: no DPoP proofs counted"
        log "$subj: the upstream got Authorization: DPoP and a $want_alg proof (htm, htu, ath, jti, iat checked); $proofs proofs signed so far"
    fi
}

mode_dpop() {
    local subj
    POOL_PORT=$UPSTREAM_DPOP_PORT
    if [[ " $DPOP_PARTS " == *" runs "* ]]; then
        for subj in $DPOP_SUBJECTS; do start_dpop_subject "$subj"; done
        log "token requests at start-up: $(lines "$TMP/token.log") (one per subject)"
        write_meta
        start_busy
        local round shape body conns runs=0 total
        total=$((ROUNDS * $(wc -w <<<"$SHAPES") * $(wc -w <<<"$BODIES") * $(wc -w <<<"$CONNS") * $(wc -w <<<"$DPOP_SUBJECTS")))
        log "$total runs of ${WARMUP}+${DURATION} s, subjects interleaved"
        for ((round = 1; round <= ROUNDS; round++)); do
            for shape in $SHAPES; do
                for body in $BODIES; do
                    for conns in $CONNS; do
                        for subj in $(rotate "$round" $DPOP_SUBJECTS); do
                            runs=$((runs + 1))
                            log "[$runs/$total] round $round $shape /$body c=$conns $subj"
                            measure dpop "$round" "$shape" "$body" "$conns" "$subj"
                        done
                    done
                done
            done
        done
        stop_busy
        BUSY_PIDS=()
        for subj in $DPOP_SUBJECTS; do
            stop_pid "${SUBJ_PIDS[$subj]}"
            untrack "${SUBJ_PIDS[$subj]}"
        done
    else
        write_meta
    fi
    if [[ " $DPOP_PARTS " == *" callgrind "* ]]; then dpop_callgrind; fi
    if [[ " $DPOP_PARTS " == *" sign "* ]]; then dpop_sign; fi
}

# Instructions per request in each subject's process (user space), for the
# same number of requests: h2load --h1 -n (HTTP/1.1, keep-alive, one request
# at a time per connection) at the first of CONNS, origin-form /1k, after
# DPOP_CG_WARMUP requests. Writes callgrind-<subject>.out,
# callgrind-<subject>.txt (self cost by function) and a line per subject in
# dpop-callgrind.jsonl; report.py compares them.
dpop_callgrind() {
    command -v valgrind >/dev/null && command -v h2load >/dev/null || die "valgrind or h2load is missing"
    local conns subj proxy route admin pid ir p0 p1 t0 t1 c0 c1 out
    read -r conns _ <<<"$CONNS"
    : >"$RESULTS/dpop-callgrind.jsonl"
    for subj in $DPOP_SUBJECTS; do
        read -r proxy route admin <<<"$(dpop_ports "$subj")"
        [[ -s $TMP/$subj.toml ]] || dpop_config "$subj"
        log "callgrind: $subj, $DPOP_CG_WARMUP + $DPOP_CG_REQUESTS requests (h2load --h1, $conns connections)"
        TOKEN_INJECTOR_WORKERS=1 RUST_LOG=warn taskset -c "$PROXY_CPU" \
            valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$RESULTS/callgrind-$subj.out" \
            "$TI_BIN" run --config "$TMP/$subj.toml" >"$TMP/logs/callgrind-$subj.log" 2>&1 &
        pid=$!
        track "$pid"
        wait_ti_ready "$admin" 1 120 || die "$subj under valgrind: not ready (see $TMP/logs/callgrind-$subj.log)"
        run_h2load_n "$DPOP_CG_WARMUP" "$conns" "http://127.0.0.1:$route/1k" || die "warm-up: $(cat "$TMP/h2load.out")"
        p0=$(dpop_proofs "http://127.0.0.1:$admin")
        t0=$(lines "$TMP/token.log")
        c0=$(lines "$TMP/upstream-conn.log")
        callgrind_control -i on "$pid" >/dev/null 2>&1 || die "callgrind_control"
        run_h2load_n "$DPOP_CG_REQUESTS" "$conns" "http://127.0.0.1:$route/1k" || die "load: $(cat "$TMP/h2load.out")"
        callgrind_control -i off "$pid" >/dev/null 2>&1 || die "callgrind_control"
        p1=$(dpop_proofs "http://127.0.0.1:$admin")
        t1=$(lines "$TMP/token.log")
        c1=$(lines "$TMP/upstream-conn.log")
        kill -TERM "$pid" 2>/dev/null || true
        wait_until 60 "$subj under valgrind to exit" bash -c '! kill -0 "$1" 2>/dev/null' _ "$pid"
        stop_pid "$pid"
        untrack "$pid"
        callgrind_annotate --inclusive=no --threshold=100 "$RESULTS/callgrind-$subj.out" \
            >"$RESULTS/callgrind-$subj.txt" 2>/dev/null || die "callgrind_annotate"
        ir=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }' "$RESULTS/callgrind-$subj.txt")
        [[ $ir =~ ^[0-9]+$ ]] || die "$subj: no instruction count"
        out=$(printf '{"subject":"%s","requests":%d,"conns":%d,"ir":%d,"ir_per_request":%d,"dpop_proofs":%d,"token_requests":%d,"new_upstream_conns":%d}' \
            "$subj" "$DPOP_CG_REQUESTS" "$conns" "$ir" $((ir / DPOP_CG_REQUESTS)) $((p1 - p0)) $((t1 - t0)) $((c1 - c0)))
        echo "$out" >>"$RESULTS/dpop-callgrind.jsonl"
        log "callgrind: $out"
    done
}

run_h2load_n() { # requests conns url -> h2load output in $TMP/h2load.out; fails unless all got 2xx
    local n=$1
    run_waiting "$TMP/h2load.out" taskset -c "$LOAD_CPU" h2load --h1 -n "$n" -c "$2" -t 1 "$3" || return 1
    grep -q "requests: $n total, $n started, $n done, $n succeeded" "$TMP/h2load.out" &&
        grep -q "status codes: $n 2xx" "$TMP/h2load.out"
}

# One proof alone (examples/dpop_sign.rs, ring): wall-clock µs per proof on
# PROXY_CPU (ROUNDS rounds, the algorithms interleaved, 3 repetitions of
# DPOP_SIGN_PROOFS each, busy loops on), instructions per proof under
# callgrind (user space, deterministic), and where a proof's native CPU goes
# (perf, when installed). Lines in dpop-sign.jsonl.
dpop_sign() {
    local bin=${DPOP_SIGN_BIN:-} alg round out n=2000
    if [[ -z $bin ]]; then
        log "building examples/dpop_sign.rs (cargo build --release --locked --example dpop_sign)"
        run_waiting - bash -c 'cd "$1" && exec cargo build --release --locked --quiet --example dpop_sign' _ "$ROOT" ||
            die "cargo build --example dpop_sign"
        bin=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/dpop_sign
    fi
    [[ -x $bin ]] || die "no dpop_sign binary at $bin"
    : >"$RESULTS/dpop-sign.jsonl"
    start_busy
    for ((round = 1; round <= ROUNDS; round++)); do
        for alg in $(rotate "$round" ES256 EdDSA); do
            out=$(taskset -c "$PROXY_CPU" "$bin" "$alg" "$DPOP_SIGN_PROOFS" 3) || die "dpop_sign $alg"
            log "sign, round $round: $out"
            echo "{\"kind\":\"wall\",\"round\":$round,${out#\{}" >>"$RESULTS/dpop-sign.jsonl"
        done
    done
    stop_busy
    BUSY_PIDS=()
    for alg in ES256 EdDSA; do
        valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*sign_n*' \
            --callgrind-out-file="$RESULTS/callgrind-sign-$alg.out" "$bin" "$alg" "$n" 1 \
            >/dev/null 2>"$TMP/logs/callgrind-sign-$alg.log" || die "dpop_sign $alg under callgrind"
        callgrind_annotate --inclusive=no --threshold=100 "$RESULTS/callgrind-sign-$alg.out" \
            >"$RESULTS/callgrind-sign-$alg.txt" 2>/dev/null || die "callgrind_annotate"
        local ir
        ir=$(awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }' "$RESULTS/callgrind-sign-$alg.txt")
        [[ $ir =~ ^[0-9]+$ ]] || die "no instruction count for dpop_sign $alg"
        out="{\"kind\":\"callgrind\",\"alg\":\"$alg\",\"proofs\":$n,\"ir\":$ir,\"ir_per_proof\":$((ir / n))}"
        log "sign: $out"
        echo "$out" >>"$RESULTS/dpop-sign.jsonl"
        if command -v perf >/dev/null; then
            # Native: callgrind's CPUID hides ADX and SHA-NI, so ring takes
            # other code paths there than on this CPU.
            taskset -c "$PROXY_CPU" perf record -q -e cpu-clock -F 4999 -o "$RESULTS/perf-sign-$alg.data" -- \
                "$bin" "$alg" "$DPOP_SIGN_PROOFS" 1 >/dev/null 2>"$TMP/logs/perf-sign-$alg.log" || die "perf record dpop_sign"
            perf report -q --stdio -i "$RESULTS/perf-sign-$alg.data" --no-children --sort dso,sym \
                --percent-limit 0.5 >"$RESULTS/perf-sign-$alg.txt" 2>/dev/null || die "perf report"
        fi
    done
}

# Start-up: a fresh process per start. bench/cold.py spawns the subject on
# PROXY_CPU and, from CPU LOAD_CPU, connects every COLD_POLL_MS ms until the
# port accepts (listening), then sends GET /1k (origin-form), again on a new
# connection after each non-200, until the first 200 with its whole body.
# token-injector's token request and the first upstream request are timed by
# the token endpoint's and the upstream's logs ($msec, ms resolution).
cold_start() { # subject rep
    local subj=$1 rep=$2 port args=()
    case $subj in
        token-injector)
            port=$TI_ROUTE_PORT
            args=(-- "$TI_BIN" run --config "$TMP/token-injector.toml")
            ;;
        token-injector-base)
            port=$TI_ROUTE_PORT
            args=(-- "$TI_BASE_BIN" run --config "$TMP/token-injector.toml")
            ;;
        nginx)
            port=$NGINX_PORT
            args=(--cpu-children -- nginx -e "$TMP/nginx-proxy-error.log" -c "$TMP/nginx-proxy.conf" -g 'daemon off;')
            ;;
        haproxy)
            port=$HAPROXY_PORT
            args=(-- haproxy -db -f "$TMP/haproxy.cfg")
            ;;
    esac
    # The environment goes to every subject; only token-injector reads it.
    TOKEN_INJECTOR_WORKERS=1 RUST_LOG=warn run_waiting "$TMP/cold.out" python3 "$BENCH_DIR/cold.py" \
        --subject "$subj" --rep "$rep" --port "$port" --cpu "$PROXY_CPU" --client-cpu "$LOAD_CPU" \
        --poll-ms "$COLD_POLL_MS" --log "$TMP/logs/cold-$subj.log" \
        --token-log "$TMP/token.log" --conn-log "$TMP/upstream-conn.log" "${args[@]}" ||
        die "cold start of $subj: $(cat "$TMP/cold.out") (see $TMP/logs/cold-$subj.log)"
    cat "$TMP/cold.out" >>"$RAW"
    log "[$rep/$COLD_RUNS] $subj: $(python3 -c 'import json,sys
r = json.load(sys.stdin)
print(", ".join(f"{k} {r[k]}" for k in ("listening_ms", "token_ms", "upstream_ms", "first_200_ms", "cpu_ms_at_200") if r.get(k) is not None))' <"$TMP/cold.out")"
}

mode_cold() {
    local subj rep
    render "$BENCH_DIR/conf/token-injector.toml" "$TMP/token-injector.toml"
    "$TI_BIN" check --config "$TMP/token-injector.toml" >/dev/null || die "token-injector check"
    render "$BENCH_DIR/conf/nginx-proxy.conf" "$TMP/nginx-proxy.conf"
    render "$BENCH_DIR/conf/haproxy.cfg" "$TMP/haproxy.cfg"
    haproxy -c -q -f "$TMP/haproxy.cfg" || die "haproxy config check"
    write_meta
    # One unmeasured start each: binaries and libraries into the page cache.
    for subj in $SUBJECTS; do cold_start "$subj" 0; done
    : >"$RAW"
    start_busy
    if [[ $COLD_HOG == 1 ]]; then
        # Stopped with the busy loops (stop_busy).
        taskset -c "$PROXY_CPU" bash -c 'while :; do :; done' &
        BUSY_PIDS+=($!)
        log "a busy loop at normal priority on CPU $PROXY_CPU (pid $!)"
    fi
    log "$COLD_RUNS cold starts per subject, interleaved"
    for ((rep = 1; rep <= COLD_RUNS; rep++)); do
        for subj in $(rotate "$rep" $SUBJECTS); do cold_start "$subj" "$rep"; done
    done
    stop_busy
}

validate_settings() {
    local v b
    for v in DURATION WARMUP ROUNDS SCALE_CONNS PROXY_CPU LOAD_CPU PORT_BASE; do
        [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v}: expected a whole number"
    done
    ((DURATION > 0 && ROUNDS > 0)) || die "DURATION and ROUNDS must be at least 1"
    for b in $BODIES; do [[ $b == 1k || $b == 64k ]] || die "BODIES: unknown body $b (1k, 64k)"; done
    for b in $SHAPES; do [[ $b == origin || $b == absolute ]] || die "SHAPES: unknown shape $b"; done
    for b in $SUBJECTS; do
        if [[ $MODE == cold && $b == token-injector-base ]]; then
            [[ -x ${TI_BASE_BIN:-} ]] || die "SUBJECTS: token-injector-base needs TI_BASE_BIN, an executable"
            continue
        fi
        [[ $b =~ ^(token-injector|nginx|haproxy|direct)$ ]] || die "SUBJECTS: unknown subject $b"
        [[ $MODE != cold || $b != direct ]] || die "SUBJECTS: the cold mode has no direct subject"
    done
    [[ $COLD_RUNS =~ ^[1-9][0-9]*$ ]] || die "COLD_RUNS=$COLD_RUNS: expected a positive whole number"
    [[ $COLD_HOG == 0 || $COLD_HOG == 1 ]] || die "COLD_HOG=$COLD_HOG: 0 or 1"
    [[ $COLD_POLL_MS =~ ^[0-9]*\.?[0-9]+$ ]] || die "COLD_POLL_MS=$COLD_POLL_MS: expected a number of ms"
    for b in $H2_SCENARIOS; do [[ $b == h2 || $b == grpc ]] || die "H2_SCENARIOS: unknown scenario $b (h2, grpc)"; done
    for b in $DPOP_SUBJECTS; do
        [[ $b =~ ^(bearer|dpop-es256|dpop-eddsa)$ ]] || die "DPOP_SUBJECTS: unknown subject $b (bearer, dpop-es256, dpop-eddsa)"
    done
    for b in $DPOP_PARTS; do [[ $b =~ ^(runs|callgrind|sign)$ ]] || die "DPOP_PARTS: unknown part $b (runs, callgrind, sign)"; done
    for v in DPOP_CG_REQUESTS DPOP_CG_WARMUP DPOP_SIGN_PROOFS; do
        [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: expected a positive whole number"
    done
    for b in $CONNS $SWEEP_CONNS $SCALE_COUNTS $H2_CLIENTS $H2_STREAMS; do
        [[ $b =~ ^[0-9]+$ && $b -gt 0 ]] || die "not a positive count: $b"
    done
    [[ -n $CONNS && -n $BODIES && -n $SHAPES && -n $SUBJECTS ]] || die "empty CONNS, BODIES, SHAPES or SUBJECTS"
    ((PROXY_CPU != LOAD_CPU)) || die "PROXY_CPU and LOAD_CPU must differ"
}

main() {
    validate_settings
    ensure_packages
    ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    check_ports "$UPSTREAM_PORT" "$TOKEN_PORT" "$COLD_TOKEN_PORT" "$TI_PROXY_PORT" "$TI_ROUTE_PORT" \
        "$TI_ADMIN_PORT" "$NGINX_PORT" "$HAPROXY_PORT" "$COLD_PROXY_PORT" "$COLD_ROUTE_PORT" "$COLD_ADMIN_PORT" \
        "$UPSTREAM_H2_PORT" "$TI_H2_PORT" "$NGINX_H2_PORT" "$HAPROXY_H2_PORT" "$UPSTREAM_DPOP_PORT"
    if [[ $MODE == dpop ]]; then
        local s
        for s in bearer dpop-es256 dpop-eddsa; do check_ports $(dpop_ports "$s"); done
    fi
    build
    make_fixtures
    mkdir -p "$RESULTS"
    RAW=$RESULTS/runs.jsonl
    : >"$RAW"
    start_upstream
    "mode_$MODE"
    if [[ $MODE == profile ]]; then
        log "results in ${RESULTS#"$ROOT"/}"
        return
    fi
    if [[ $MODE == cold ]]; then
        python3 "$BENCH_DIR/cold.py" summary "$RAW" | tee "$RESULTS/table.txt"
        log "results in ${RESULTS#"$ROOT"/}"
        return
    fi
    if [[ $MODE == dpop ]]; then
        python3 "$BENCH_DIR/report.py" "$RESULTS" | tee "$RESULTS/table.txt"
        log "results in ${RESULTS#"$ROOT"/}"
        return
    fi
    log "token requests during measured runs: $(python3 -c "import json,sys; print(sum(json.loads(l)['token_requests'] for l in open(sys.argv[1])))" "$RAW")"
    python3 "$BENCH_DIR/report.py" "$RESULTS" | tee "$RESULTS/table.txt"
    log "results in ${RESULTS#"$ROOT"/}"
}

main
