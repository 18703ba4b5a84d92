# shellcheck shell=bash
# Shared by bench/run.sh and bench/soak.sh: logging, background processes
# and their clean-up, ports, the release build, waiting. Sourced after the
# caller sets ROOT, PORT_BASE and KEEP_TMP; it sets the EXIT/INT/TERM traps.
# A caller whose exit status 1 means a verdict, not an error, sets
# KEEP_TMP_ON_1=0 to remove its temporary directory after such a run.

exec 3>&2 # the script's own stderr, for messages from any context (traps included)
PIDS=()      # every background process we started, in start order
BUSY_PIDS=()
POLICY_CREATED=0
TMP=
FG_PID=
KEEP_TMP_ON_1=${KEEP_TMP_ON_1:-1}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&3; }

die() { log "FAILED: $*"; exit 1; }

track() { PIDS+=("$1"); }

# Runs a long command in the background and waits for it, so that a signal to
# this script is handled at once (bash defers traps while a foreground command
# runs) and cleanup can stop the command too.
run_waiting() { # output-file|- command...
    local rc=0 out=$1
    shift
    if [[ $out == - ]]; then "$@" & else "$@" >"$out" 2>&1 & fi
    FG_PID=$!
    wait "$FG_PID" || rc=$?
    FG_PID=
    return "$rc"
}

stop_pid() { # pid...: SIGTERM, up to 5 s, then SIGKILL
    local pid alive i
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $FG_PID ]]; then stop_pid "$FG_PID"; fi
    if ((${#BUSY_PIDS[@]})); then stop_pid "${BUSY_PIDS[@]}"; fi
    local rev=() i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do rev+=("${PIDS[i]}"); done
    if ((${#rev[@]})); then stop_pid "${rev[@]}"; fi
    ((POLICY_CREATED)) && rm -f /usr/sbin/policy-rc.d
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 || ($rc != 0 && ($rc != 1 || $KEEP_TMP_ON_1 == 1)) ]]; then
            log "temporary files kept in $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}

check_ports() {
    local p
    for p in "$@"; do
        if [[ -n $(ss -Htln "sport = :$p" 2>/dev/null) ]]; then
            die "port $p on this machine is in use; set PORT_BASE to move the script's ports"
        fi
    done
}

build() {
    if [[ -n ${TI_BIN:-} ]]; then
        [[ -x $TI_BIN ]] || die "TI_BIN=$TI_BIN is not an executable"
        log "using TI_BIN=$TI_BIN"
        return
    fi
    log "building token-injector (cargo build --release --locked)"
    run_waiting - bash -c 'cd "$1" && exec cargo build --release --locked --quiet' _ "$ROOT" || die "cargo build"
    TI_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/token-injector
    [[ -x $TI_BIN ]] || die "no binary at $TI_BIN"
}

# In the current directory: a CA and a server certificate for localhost /
# 127.0.0.1 (test fixtures only; the CA is named after $1), and the fixed
# 1 KiB and 64 KiB bodies under www/.
make_tls_fixtures() { # ca-name
    cat >ca.cnf <<EOF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = token-injector $1 CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    cat >server.ext <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.pem -days 30 -config ca.cnf 2>/dev/null &&
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null &&
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 30 -extfile server.ext -out server.pem 2>/dev/null || return 1
    mkdir -p www
    # Hex, exactly 1 KiB and 64 KiB. (No `| head -c`: under pipefail the
    # writer's SIGPIPE when head exits early failed the whole step at random.)
    openssl rand -hex 512 | tr -d '\n' >www/1k
    openssl rand -hex $((32 * 1024)) | tr -d '\n' >www/64k
}

wait_until() { # seconds description command...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 20; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.05
    done
    die "$what: not ready after ${secs}s"
}

expect_code() { # expected description curl-args...
    local want=$1 what=$2 got
    shift 2
    got=$(http_code "$@")
    [[ $got == "$want" ]] || die "$what: HTTP $got, expected $want"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
