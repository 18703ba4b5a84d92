#!/usr/bin/env bash
# Fleet benchmark (issue 16): what a fleet of token-injector replicas costs the
# authorization server and Redis, with the shared token cache and without.
# See bench/README.md, "Fleet".
#
#   bash bench/fleet.sh                                    1, 10, 100, 1000 replicas; 60 s tokens, 10 min each
#   TOKEN_LIFETIME=6s DURATION=60s bash bench/fleet.sh     the same shape (10 lifetimes), 10x shorter
#   FLEET_SIZES="1 10" TOKEN_LIFETIME=4s DURATION=20s bash bench/fleet.sh   smoke test
#
# It starts its own redis-server on a random loopback port in a temporary
# directory, builds the driver (cargo build --release --locked --example fleet),
# and for each fleet size runs the fleet with [cache] (Redis) and without, each
# followed by a rolling restart. Results: bench/results/fleet-<stamp>.md (the
# table and how it was made) and fleet-<stamp>.jsonl (one raw line per run).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Environment (defaults in brackets):
  FLEET_SIZES     replicas per fleet ["1 10 100 1000"]
  TOKEN_LIFETIME  expires_in of every token, whole seconds [60s]
  DURATION        steady phase of each run [10m]
  MODES           "redis" (shared through [cache]) and/or "local" (no [cache]) ["redis local"]
  ROLLING         1: a rolling restart after each steady phase [1]
  APPEND_TO       an existing bench/results/fleet-*.md: add this run's section
                  (and raw lines) to it instead of starting a new file
  FLEET_BIN       use this driver binary instead of building one
  KEEP_TMP        1: keep the temporary directory (redis log, driver logs) [0]
EOF
}
case ${1:-} in
    -h | --help | help) usage; exit 0 ;;
    '') ;;
    *) usage >&2; exit 2 ;;
esac

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

FLEET_SIZES=${FLEET_SIZES:-"1 10 100 1000"}
TOKEN_LIFETIME=${TOKEN_LIFETIME:-60s}
DURATION=${DURATION:-10m}
MODES=${MODES:-"redis local"}
ROLLING=${ROLLING:-1}
APPEND_TO=${APPEND_TO:-}
KEEP_TMP=${KEEP_TMP:-0}
PORT_BASE=${PORT_BASE:-0} # lib.sh expects it; this script picks a free port
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

validate_settings() {
    local s
    [[ -n $FLEET_SIZES ]] || die "FLEET_SIZES is empty"
    for s in $FLEET_SIZES; do [[ $s =~ ^[1-9][0-9]*$ ]] || die "FLEET_SIZES: not a positive count: $s"; done
    for s in $MODES; do [[ $s == redis || $s == local ]] || die "MODES: unknown mode $s (redis, local)"; done
    [[ -n $MODES ]] || die "MODES is empty"
    [[ $ROLLING == 0 || $ROLLING == 1 ]] || die "ROLLING=$ROLLING: 0 or 1"
    [[ -z $APPEND_TO || -f $APPEND_TO ]] || die "APPEND_TO=$APPEND_TO: no such file"
    command -v redis-server >/dev/null || die "redis-server is missing (Debian: redis-server)"
    command -v redis-cli >/dev/null || die "redis-cli is missing (Debian: redis-tools)"
    command -v python3 >/dev/null || die "python3 is missing"
}

# Each replica holds a Redis connection, a keep-alive connection to the token
# endpoint and the endpoint's side of it (all in the driver), and
# redis-server holds one per replica: 4 descriptors per replica, plus slack.
raise_fd_limit() {
    local max=0 s need
    for s in $FLEET_SIZES; do ((s > max)) && max=$s; done
    need=$((4 * max + 512))
    if (($(ulimit -n) < need)); then
        ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    fi
    (($(ulimit -n) >= need)) || die "ulimit -n is $(ulimit -n) (hard $(ulimit -Hn)); $max replicas need about $need"
    log "ulimit -n $(ulimit -n) (about $need needed for $max replicas)"
}

build_driver() {
    if [[ -n ${FLEET_BIN:-} ]]; then
        [[ -x $FLEET_BIN ]] || die "FLEET_BIN=$FLEET_BIN is not an executable"
        log "using FLEET_BIN=$FLEET_BIN"
        FLEET_BIN_GIVEN=$FLEET_BIN
        return
    fi
    log "building the driver (cargo build --release --locked --example fleet)"
    run_waiting - bash -c 'cd "$1" && exec cargo build --release --locked --quiet --example fleet' _ "$ROOT" ||
        die "cargo build"
    FLEET_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/fleet
    [[ -x $FLEET_BIN ]] || die "no driver at $FLEET_BIN"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

REDIS_PORT=
start_redis() {
    REDIS_PORT=$(free_port)
    mkdir -p "$TMP/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP/redis" \
        --maxclients 10000 --logfile "$TMP/logs/redis.log" &
    track $!
    wait_until 10 "redis-server on port $REDIS_PORT" redis-cli -p "$REDIS_PORT" ping
    log "redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') on 127.0.0.1:$REDIS_PORT"
}

redis_commands() {
    redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | sed -n 's/^total_commands_processed://p'
}

# One run of the driver: appends its JSON line (plus the mode and what
# redis-server counted) to $RAW.
run_fleet() { # size mode
    local size=$1 mode=$2 before after line args=()
    args=(--replicas "$size" --token-lifetime "$TOKEN_LIFETIME" --duration "$DURATION")
    if [[ $mode == redis ]]; then args+=(--redis "redis://127.0.0.1:$REDIS_PORT"); else args+=(--no-redis); fi
    ((ROLLING)) && args+=(--rolling-restart)
    before=$(redis_commands)
    run_waiting "$TMP/logs/fleet-$size-$mode.log" bash -c '"$@" >"$0"' "$TMP/out.json" "$FLEET_BIN" "${args[@]}" ||
        die "fleet $size $mode (see $TMP/logs/fleet-$size-$mode.log)"
    after=$(redis_commands)
    line=$(head -n 1 "$TMP/out.json")
    python3 - "$mode" "$((after - before))" "${args[*]}" "$line" >>"$RAW" <<'EOF' || die "fleet $size $mode: no JSON line"
import json, sys
mode, commands, args, line = sys.argv[1:]
d = json.loads(line)
d["mode"] = mode
d["redis_server_commands"] = int(commands)
d["args"] = args
print(json.dumps(d, sort_keys=True))
EOF
    python3 - "$line" <<'EOF' >&3
import json, sys
d = json.loads(sys.argv[1])
r = d.get("restart") or {}
print(f"      {d['token_requests']} token requests in {d['lifetimes']} lifetimes = {d['as_requests_per_lifetime']}/lifetime; "
      f"Redis ops/replica/lifetime {d['redis_ops_per_replica_per_lifetime']}; fallbacks {d['fallbacks']}; "
      f"leases {d['leases']}; reads {d['reads']}; samples without token {d['samples_without_token']}; "
      f"restart: ttft p50 {r.get('ttft_p50_ms')} p99 {r.get('ttft_p99_ms')} max {r.get('ttft_max_ms')} ms, "
      f"{r.get('token_requests')} token requests")
EOF
}

# The markdown section for this invocation's runs.
report() {
    python3 - "$RAW_THIS" "$STAMP" "$TOKEN_LIFETIME" "$DURATION" "$FLEET_SIZES" "$MODES" "$ROLLING" \
        "$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)" \
        "$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')" "$(nproc)" \
        "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" "$(uptime | sed 's/.*load average: //')" "${FLEET_BIN_GIVEN:-}" <<'EOF'
import json, sys
raw, stamp, lifetime, duration, sizes, modes, rolling, git, redis_v, cores, cpu, load, fleet_bin = sys.argv[1:]
runs = [json.loads(l) for l in open(raw) if l.strip()]
by = {(r["replicas"], r["mode"]): r for r in runs}

def f(x, nd=2):
    return "-" if x is None else f"{x:,.{nd}f}"

def ttft(r, key="ttft_p99_ms"):
    return f((r.get("restart") or {}).get(key), 2) if r else "-"

lone = by.get((1, "local"))

def per_round(r):
    if not r or r.get("as_requests_per_round") is None:
        return "-"
    return f"{f(r['as_requests_per_round'])} ({r['token_requests']}/{r['renewal_rounds']})"
print(f"## {stamp}: {lifetime} tokens, {duration} steady phase per run\n")
print(f"Command: `FLEET_SIZES=\"{sizes}\" TOKEN_LIFETIME={lifetime} DURATION={duration} MODES=\"{modes}\" ROLLING={rolling} bash bench/fleet.sh`  ")
if fleet_bin:
    print(f"Driver: `FLEET_BIN={fleet_bin}` (its build, not necessarily the commit below).  ")
print(f"Commit `{git}`, redis-server {redis_v}, {cores} cores ({cpu}), load average at the end {load}.  ")
if runs:
    t = runs[0]["tokens"]
    print(f"`[tokens]` in every replica: refresh_fraction {t['refresh_fraction']}, refresh_margin {t['refresh_margin_ms']} ms, "
          f"expiry_skew {t['expiry_skew_ms']} ms, request_timeout {t['request_timeout_ms']} ms (also the renewal lease's TTL); "
          f"`[cache]` operation_timeout default (250 ms).")
print("Token side only: each replica is its own `Profiles` (HTTP client, `[cache]` backend, Redis connection) and `Metrics` in one "
      "driver process (examples/fleet.rs); no proxy listeners (requests only read the local store). Figures are from the steady phase "
      "(after every replica holds its first token); ttft is from the rolling restart after it.\n")
print("| fleet size | AS requests per lifetime | Redis ops per replica per lifetime | ttft p99 warm (ms) | without Redis: AS requests per lifetime | without Redis: ttft p99 (ms) | shared ÷ one replica alone | shared: AS requests per renewal round |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in sorted({r["replicas"] for r in runs}):
    s, l = by.get((n, "redis")), by.get((n, "local"))
    ratio = "-"
    if s and lone and lone["as_requests_per_lifetime"]:
        ratio = f(s["as_requests_per_lifetime"] / lone["as_requests_per_lifetime"])
    print(f"| {n:,} | {f(s and s['as_requests_per_lifetime'])} | {f(s and s['redis_ops_per_replica_per_lifetime'])} | {ttft(s)} "
          f"| {f(l and l['as_requests_per_lifetime'])} | {ttft(l)} | {ratio} | {per_round(s)} |")
print()
print("Details (steady phase unless said): token requests (at the endpoint) over lifetimes; leases won/waited/taken over; "
      "reads hit/miss/stale/undecryptable/error; fallbacks; Redis ops by op (get/lease/set/release/ping+probe); sampled replica-states without a usable token (every 50 ms); "
      "first start (all replicas at once): seconds until all hold a token, token requests; rolling restart: ttft p50/p99/max ms, "
      "token requests during it; commands redis-server processed over the whole run (start, steady, restart, connection set-up).\n")
print("| fleet | mode | token reqs / lifetimes | leases w/wt/to | reads h/m/s/u/e | fallbacks | Redis ops g/l/s/r/p | without token | start s, reqs | restart ttft p50/p99/max, reqs | redis-server cmds |")
print("|---:|---|---|---|---|---:|---|---|---|---|---:|")
for r in sorted(runs, key=lambda r: (r["replicas"], r["mode"] != "redis")):
    le, rd, rs = r["leases"], r["reads"], r.get("restart") or {}
    g = lambda m, k: m.get(k, 0)
    leases = "-" if r["mode"] == "local" else f"{g(le,'won')}/{g(le,'waited')}/{g(le,'taken_over')}"
    reads = "-" if r["mode"] == "local" else "/".join(str(g(rd, k)) for k in ("hit", "miss", "stale", "undecryptable", "error"))
    ops = r["steady"]["redis_ops_by_op"]
    opsf = "-" if r["mode"] == "local" else "/".join(str(g(ops, k)) for k in ("get", "lease", "set", "release")) + f"/{g(ops, 'ping') + g(ops, 'probe')}"
    restart = "-" if not rs else f"{f(rs.get('ttft_p50_ms'))}/{f(rs.get('ttft_p99_ms'))}/{f(rs.get('ttft_max_ms'))}, {rs.get('token_requests')}"
    print(f"| {r['replicas']:,} | {r['mode']} | {r['token_requests']:,} / {r['lifetimes']:g} | {leases} | {reads} | {r['fallbacks']} | {opsf} "
          f"| {r['samples_without_token']} of {r['samples']:,} | {f(r['startup_s'], 3)}, {r['startup_token_requests']:,} | {restart} "
          f"| {r['redis_server_commands']:,} |")
print()
# The issue's targets, checked.
miss = []
for r in runs:
    if r["mode"] != "redis":
        continue
    if r["as_requests_per_lifetime"] > 1.05:
        miss.append(f"{r['replicas']:,} replicas: {r['as_requests_per_lifetime']} AS requests per lifetime (target ≤ 1.05)")
    if (r.get("as_requests_per_round") or 0) > 1.05:
        miss.append(f"{r['replicas']:,} replicas: {r['as_requests_per_round']} AS requests per renewal round "
                    f"({r['token_requests']} in {r['renewal_rounds']} rounds, up to {r['most_requests_in_a_round']} in one)")
    if r["redis_ops_per_replica_per_lifetime"] > 4:
        miss.append(f"{r['replicas']:,} replicas: {r['redis_ops_per_replica_per_lifetime']} Redis ops per replica per lifetime (target ≤ 4)")
    if r["fallbacks"] or r["samples_without_token"]:
        miss.append(f"{r['replicas']:,} replicas: {r['fallbacks']} fallbacks, {r['samples_without_token']} samples without a token")
print("Targets (≤ 1.05 AS requests per lifetime, and per renewal round; ≤ 4 Redis ops per replica per lifetime): "
      + ("all met." if not miss else "missed:\n" + "\n".join(f"- {m}" for m in miss)))
print()
EOF
}

main() {
    validate_settings
    raise_fd_limit
    TMP=$(mktemp -d /tmp/token-injector-fleet.XXXXXX)
    mkdir -p "$TMP/logs"
    log "temporary directory $TMP"
    build_driver
    start_redis
    mkdir -p "$ROOT/bench/results"
    local md raw
    if [[ -n $APPEND_TO ]]; then
        md=$APPEND_TO
        raw=${APPEND_TO%.md}.jsonl
    else
        md=$ROOT/bench/results/fleet-$STAMP.md
        raw=$ROOT/bench/results/fleet-$STAMP.jsonl
        printf '# Fleet benchmark (bench/fleet.sh)\n\nRaw lines: `%s`.\n\n' "$(basename "$raw")" >"$md"
    fi
    RAW=$raw
    RAW_THIS=$TMP/runs.jsonl
    : >"$RAW_THIS"
    local size mode runs=0 total
    total=$(($(wc -w <<<"$FLEET_SIZES") * $(wc -w <<<"$MODES")))
    log "$total runs of $DURATION (+ start and rolling restart) with $TOKEN_LIFETIME tokens"
    for size in $FLEET_SIZES; do
        for mode in $MODES; do
            runs=$((runs + 1))
            log "[$runs/$total] $size replicas, $mode"
            local n0
            n0=$(lines "$RAW")
            run_fleet "$size" "$mode"
            tail -n +$((n0 + 1)) "$RAW" >>"$RAW_THIS"
        done
    done
    report | tee -a "$md"
    log "results in ${md#"$ROOT"/} (raw: ${raw#"$ROOT"/})"
}

lines() { if [[ -f $1 ]]; then wc -l <"$1"; else echo 0; fi; }

# One line: bash reads the script as it runs, so an edit during a long run
# must not change what comes after main.
main "$@"; exit
