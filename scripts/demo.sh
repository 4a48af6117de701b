#!/usr/bin/env bash
# Runs a local trusted compute pool on loopback and shows it working:
#
#   1. installs missing system packages (scripts/setup.sh) and builds;
#   2. manufactures two fresh software TPMs (swtpm, each with its own EK
#      certificate from its own local CA) and starts them;
#   3. writes a development pool with `attestctl init` (PKI, configs), starts
#      the attestation server (SQLite) and one host agent per TPM;
#   4. shows both hosts untrusted (no whitelist yet), accepts their PCR values
#      as whitelist, shows them trusted and the scheduler filter passing both;
#   5. extends PCR 7 of node2's TPM (a changed boot chain), shows node2 turn
#      untrusted with the PCR named, the filter passing node1 only, and
#      node2's CADF audit event of the failure.
#
# Everything it starts is stopped on exit, success or not.
#
# Usage: bash scripts/demo.sh
# Env:   DEMO_OUT  work directory, wiped at start (default: demo-out/ in the repo)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${DEMO_OUT:-$ROOT/demo-out}
BIN=$ROOT/target/release
HELPER=$ROOT/scripts/demo/helper.py
POOL=$WORK/pool
HOSTS=(node1 node2)
# Seconds between two attestations of an agent: short, so the demo is quick.
INTERVAL=2
# Bounds of the waits: enrolling creates keys on the TPM, which takes a while.
FIRST_VERDICT_TIMEOUT=120
TAMPER_TIMEOUT=60
AUDIT_TIMEOUT=20

# Processes started by this script, in start order, stopped in reverse order.
NAMES=()
declare -A PID_OF LOG_OF

section() { printf '\n==== %s ====\n' "$*"; }
say() { echo "demo: $*"; }

# The last lines of each log, so a failure explains itself.
show_logs() {
    local name
    for name in "${NAMES[@]}"; do
        if [[ -s "${LOG_OF[$name]}" ]]; then
            echo "---- last lines of ${LOG_OF[$name]} ($name) ----" >&2
            tail -n 15 "${LOG_OF[$name]}" >&2
        fi
    done
}

die() {
    echo "demo: error: $*" >&2
    if ((${#NAMES[@]} > 0)); then
        show_logs
        echo "demo: all logs are in $WORK" >&2
    fi
    exit 1
}

# Stops one process by PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_process() {
    local name=$1 pid=${PID_OF[$1]} _
    if ! kill "$pid" 2>/dev/null; then
        # Already gone: just collect its exit status.
        wait "$pid" 2>/dev/null || true
        return 0
    fi
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$? i
    trap - EXIT INT TERM
    if ((${#NAMES[@]} > 0)); then
        section "Stopping"
        for ((i = ${#NAMES[@]} - 1; i >= 0; i--)); do
            stop_process "${NAMES[i]}"
        done
        for i in "${!NAMES[@]}"; do
            if kill -0 "${PID_OF[${NAMES[i]}]}" 2>/dev/null; then
                echo "demo: error: ${NAMES[i]} (pid ${PID_OF[${NAMES[i]}]}) is still running" >&2
                status=1
            fi
        done
        say "stopped ${NAMES[*]}"
    fi
    if ((status == 0)); then
        say "done in $((SECONDS - DEMO_START)) s after the build; files and logs are in $WORK"
    fi
    exit "$status"
}
DEMO_START=$SECONDS
trap cleanup EXIT
trap 'echo "demo: interrupted" >&2; exit 130' INT
trap 'echo "demo: terminated" >&2; exit 143' TERM

# Starts "$@" in the background as NAME with output to LOG, and records it.
start_process() {
    local name=$1 log=$2
    shift 2
    # NO_COLOR: plain log files, without terminal colour codes.
    NO_COLOR=1 "$@" >"$log" 2>&1 &
    NAMES+=("$name")
    PID_OF[$name]=$!
    LOG_OF[$name]=$log
}

# Fails the demo if a process it started has exited.
check_alive() {
    local name
    for name in "${NAMES[@]}"; do
        kill -0 "${PID_OF[$name]}" 2>/dev/null ||
            die "$name (pid ${PID_OF[$name]}) exited unexpectedly; see ${LOG_OF[$name]}"
    done
}

# wait_for WHAT SECONDS COMMAND...: runs COMMAND every second until it
# succeeds; fails the demo after SECONDS or as soon as a process died.
wait_for() {
    local what=$1 timeout=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@"; do
        check_alive
        ((SECONDS < deadline)) || die "no $what after ${timeout} s"
        sleep 1
    done
}

helper() { python3 "$HELPER" "$@"; }

# The current verdicts of all hosts as JSON, from the admin API.
verdicts() {
    "$BIN/attestctl" --config "$POOL/admin.toml" trust "${HOSTS[@]}" 2>"$WORK/attestctl.err"
}
all_verified() {
    local json
    json=$(verdicts) && helper all-verified <<<"$json"
}
host_has_trust() {
    local json
    json=$(verdicts) && helper trust-is "$1" "$2" <<<"$json"
}
print_verdicts() {
    local json
    json=$(verdicts) || die "attestctl trust failed: $(cat "$WORK/attestctl.err")"
    helper summary <<<"$json"
}

# Runs the scheduler filter on all hosts; prints what passed and why the
# others did not; sets FILTERED to the passing hosts, space-separated.
run_filter() {
    local out status=0
    echo "\$ scheduler-filter --config pool/scheduler.toml ${HOSTS[*]}"
    out=$("$BIN/scheduler-filter" --config "$POOL/scheduler.toml" "${HOSTS[@]}" 2>"$WORK/filter.err") ||
        status=$?
    # 1 means no host passed, which is an answer; anything else is an error.
    ((status <= 1)) || die "scheduler-filter failed (exit $status): $(cat "$WORK/filter.err")"
    FILTERED=$(echo "$out" | xargs)
    echo "  passes: ${FILTERED:-(none)}"
    if [[ -s "$WORK/filter.err" ]]; then
        sed 's/^/  denied: /' "$WORK/filter.err"
    fi
}

# A fresh TPM in directory $1 with its own local CA, as a test lab would
# manufacture it: EK, EK certificate and platform certificate.
manufacture_tpm() {
    bash "$ROOT/scripts/swtpm-manufacture.sh" "$1" demo || die "could not manufacture a TPM in $1"
}

# Starts swtpm NAME on state dir $2 on port $3 (commands) and $3+1 (control:
# the swtpm TCTI always uses the next port); sets TPM_PORT to the port used.
# Another program may take a port first: then it retries on fresh ports.
start_swtpm() {
    local name=$1 dir=$2 port=$3 attempt waited
    for attempt in 1 2 3 4 5; do
        start_process "$name" "$dir/swtpm.log" swtpm socket --tpm2 \
            --tpmstate "dir=$dir/state" \
            --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
            --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
            --flags not-need-init,startup-clear
        for waited in $(seq 100); do
            kill -0 "${PID_OF[$name]}" 2>/dev/null || break
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                TPM_PORT=$port
                say "$name: pid ${PID_OF[$name]}, ports $port and $((port + 1)) (ready after ~$((waited * 50)) ms)"
                return 0
            fi
            sleep 0.05
        done
        say "$name did not start on port $port (attempt $attempt): $(cat "$dir/swtpm.log")"
        stop_process "$name"
        unset 'NAMES[-1]'
        port=$(helper free-ports 1 0)
    done
    die "$name did not start after 5 attempts; see $dir/swtpm.log"
}

# Value of sha256 PCR $2 of the TPM on port $1, lowercase hex.
pcr_read() {
    TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$1" tpm2_pcrread "sha256:$2" |
        awk '/^ *[0-9]+ *: *0x/ { sub(/.*0x/, ""); print tolower($0) }'
}

section "Installing what is missing and building"
bash "$ROOT/scripts/setup.sh"
if ! command -v python3 >/dev/null; then
    # The demo's helper (ports, JSON) is Python; setup.sh does not need it.
    say "installing python3"
    as_root=()
    if [[ $(id -u) -ne 0 ]]; then
        as_root=(sudo)
    fi
    "${as_root[@]}" apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3
fi
build_start=$SECONDS
(cd "$ROOT" && cargo build --release --bins) || die "cargo build --release --bins failed"
for binary in attestation-server attestctl host-agent scheduler-filter; do
    [[ -x "$BIN/$binary" ]] || die "the build did not produce $BIN/$binary"
done
say "built in $((SECONDS - build_start)) s: $BIN/{attestation-server,attestctl,host-agent,scheduler-filter}"
DEMO_START=$SECONDS

section "Two fresh software TPMs"
case $WORK in
"" | / | "$ROOT" | "$HOME") die "refusing to wipe DEMO_OUT=$WORK" ;;
esac
rm -rf "$WORK"
mkdir -p "$WORK"
say "work directory $WORK (wiped)"
read -r port1 port2 server_port <<<"$(helper free-ports 2 1)"
declare -A TPM_PORT_OF
for host in "${HOSTS[@]}"; do
    say "manufacturing the TPM of $host (EK, EK certificate, platform certificate)"
    manufacture_tpm "$WORK/tpm-$host"
done
start_swtpm swtpm-node1 "$WORK/tpm-node1" "$port1"
TPM_PORT_OF[node1]=$TPM_PORT
start_swtpm swtpm-node2 "$WORK/tpm-node2" "$port2"
TPM_PORT_OF[node2]=$TPM_PORT

section "The pool: PKI and configuration (attestctl init)"
init_args=(--out "$POOL" --server-port "$server_port" --interval "$INTERVAL")
for host in "${HOSTS[@]}"; do
    init_args+=(--host "$host" --tcti "swtpm:host=127.0.0.1,port=${TPM_PORT_OF[$host]}")
done
# Servers that check EK certificates trust the TPMs' manufacturer CAs, here
# the swtpm local CAs.
if "$BIN/attestctl" init --help | grep -q -- '--ek-ca'; then
    for host in "${HOSTS[@]}"; do
        init_args+=(--ek-ca "$WORK/tpm-$host/localca/swtpm-localca-rootca-cert.pem"
            --ek-ca "$WORK/tpm-$host/localca/issuercert.pem")
    done
fi
echo "\$ attestctl init ${init_args[*]}"
"$BIN/attestctl" init "${init_args[@]}" >"$WORK/init.json" ||
    die "attestctl init failed"
say "wrote: $(cd "$POOL" && echo *)"
say "one CA; certificates with OU=agent (CN=node1, CN=node2), OU=scheduler, OU=admin"

section "Starting the attestation server and the host agents"
start_process attestation-server "$WORK/server.log" \
    "$BIN/attestation-server" --config "$POOL/server.toml"
# Ready when it answers an admin over mutual TLS (a bare TCP probe would
# only log a refused handshake).
server_answers() { verdicts >/dev/null; }
wait_for "answer from the attestation server on 127.0.0.1:$server_port" 30 server_answers
say "attestation-server: pid ${PID_OF[attestation-server]}, https://127.0.0.1:$server_port (mutual TLS), log $WORK/server.log"
for host in "${HOSTS[@]}"; do
    start_process "agent-$host" "$WORK/agent-$host.log" \
        "$BIN/host-agent" --config "$POOL/agent-$host.toml"
    say "host-agent of $host: pid ${PID_OF[agent-$host]}, TPM port ${TPM_PORT_OF[$host]}, log $WORK/agent-$host.log"
done

section "First verdicts: genuine evidence, but no whitelist yet"
say "each agent enrolls its attestation key, then answers a challenge every ${INTERVAL} s with a TPM quote"
wait_for "verdict for both hosts (see $WORK/server.log and $WORK/agent-*.log)" \
    "$FIRST_VERDICT_TIMEOUT" all_verified
# Servers that check EK certificates log each one they verified.
if grep -q 'EK certificate verified' "$WORK/server.log"; then
    say "at enrollment the server verified each TPM's EK certificate:"
    grep -h 'EK certificate verified' "$WORK/server.log" | sed 's/^[^ ]* *INFO *[^ ]* /  /'
fi
echo "\$ attestctl trust ${HOSTS[*]}"
print_verdicts
for host in "${HOSTS[@]}"; do
    host_has_trust "$host" untrusted || die "$host should be untrusted before its whitelist is set"
done

section "Whitelisting: the operator accepts each host's measured PCR values"
for host in "${HOSTS[@]}"; do
    echo "\$ attestctl whitelist accept $host"
    "$BIN/attestctl" --config "$POOL/admin.toml" whitelist accept "$host" >"$WORK/accept-$host.json" ||
        die "attestctl whitelist accept $host failed"
done
echo "\$ attestctl trust ${HOSTS[*]}"
print_verdicts
for host in "${HOSTS[@]}"; do
    host_has_trust "$host" trusted || die "$host is not trusted after its whitelist was accepted"
done
say "the scheduler filter (OU=scheduler) asks the server which candidates may run workloads"
run_filter
[[ "$FILTERED" == "node1 node2" ]] || die "the filter should pass node1 and node2, passed: '$FILTERED'"

section "Tampering: node2 boots something else (PCR 7 extended)"
tamper_digest=$(printf 'unsigned boot loader' | sha256sum | cut -d' ' -f1)
audit_lines=$( (cat "$POOL/audit.jsonl" 2>/dev/null || true) | wc -l)
echo "\$ TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=${TPM_PORT_OF[node2]} tpm2_pcrextend 7:sha256=$tamper_digest"
TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=${TPM_PORT_OF[node2]}" tpm2_pcrextend "7:sha256=$tamper_digest" ||
    die "tpm2_pcrextend failed on node2's TPM"
pcr7=$(pcr_read "${TPM_PORT_OF[node2]}" 7)
[[ -n "$pcr7" ]] || die "cannot read PCR 7 of node2's TPM"
say "node2's PCR 7 is now $pcr7"
say "waiting for node2's next attestation (every ${INTERVAL} s)"
wait_for "untrusted verdict for node2 after the tamper" "$TAMPER_TIMEOUT" host_has_trust node2 untrusted
json=$(verdicts) || die "attestctl trust failed: $(cat "$WORK/attestctl.err")"
echo "\$ attestctl trust node2"
helper host node2 <<<"$json"
echo
helper pcr-fault node2 <<<"$json"
[[ "$(helper pcr-actual node2 <<<"$json")" == "$pcr7" ]] ||
    die "the verdict's actual PCR value is not the one the TPM reports ($pcr7)"
run_filter
[[ "$FILTERED" == "node1" ]] || die "the filter should pass only node1, passed: '$FILTERED'"

section "Audit: node2's CADF event of the failed attestation ($POOL/audit.jsonl)"
last_failure() { helper last-failure node2 "$POOL/audit.jsonl" "$audit_lines" >"$WORK/node2-failure.json"; }
wait_for "failure event of node2 in $POOL/audit.jsonl" "$AUDIT_TIMEOUT" last_failure
python3 -m json.tool "$WORK/node2-failure.json"
grep -q '"reasonCode": "pcr_not_whitelisted"' "$WORK/node2-failure.json" ||
    die "node2's failure event does not give pcr_not_whitelisted as its reason"

section "Summary"
say "node1 and node2 attested with real (software) TPM quotes over mutual TLS;"
say "both became trusted once whitelisted; node2 turned untrusted after its PCR 7"
say "changed, the scheduler filter dropped it, and the audit trail records why."
