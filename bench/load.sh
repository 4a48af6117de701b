#!/usr/bin/env bash
# Load benchmark (docs/benchmarks.md, "Load: fleet simulator"): the
# attestation server and `attestctl simulate` on the same machine, on SQLite
# and on PostgreSQL. For each backend: a fresh pool and database, enroll the
# fleet once, measure sustained attestations (mTLS, durable verdicts, CADF
# events) with server RSS sampled from /proc, then the same with garbage
# hosts flooding the server. Prints one JSON object per phase.
#
#   HOSTS=10000 INTERVAL=30 DURATION=60 bash bench/load.sh
#
# Needs `cargo build --release -p attestation-server` first; PostgreSQL on
# 127.0.0.1:5432 (user postgres, trust auth) for the postgres backend.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
HOSTS=${HOSTS:-10000}
INTERVAL=${INTERVAL:-30}
DURATION=${DURATION:-60}
CONCURRENCY=${CONCURRENCY:-64}
# Seconds of the sustained phase's attestation left out of its figures
# (each host's first connection of the run is a full TLS handshake; a
# warm-up of one round or more measures a fleet that has been running).
WARMUP=${WARMUP:-0}
BACKENDS=${BACKENDS:-sqlite postgres}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
# Garbage hosts (added to the fleet) sending malformed evidence back to back.
GARBAGE_HOSTS=${GARBAGE_HOSTS:-32}
# Share of hosts whose PCR 7 is not whitelisted (untrusted verdicts).
TAMPERED=${TAMPERED:-0}
PORT=${PORT:-18943}
export RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attest-load.XXXXXX")
SERVER_PID=""
SAMPLER_PID=""
DB=""

cleanup() {
    [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    [ -n "$DB" ] && psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Sample the server's RSS every second into $1 (max is what we report).
sample_rss() {
    while kill -0 "$SERVER_PID" 2>/dev/null; do rss_kb "$SERVER_PID" >> "$1"; sleep 1; done
}
max_of() { sort -n "$1" | tail -1; }
# The server's CPU time so far (user + system), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Bytes the server handed to write(2)/pwrite(2) (sockets included).
wchar() { awk '/^wchar/ {print $2}' "/proc/$1/io" 2>/dev/null || echo 0; }
TICK_HZ=$(getconf CLK_TCK)

emit() { # phase backend json-from-simulate extra-json
    python3 -c 'import json,sys; d=json.loads(sys.argv[3]); d.update(json.loads(sys.argv[4])); d["phase"]=sys.argv[1]; n=d.get("attestations") or 0; d.update({"server_cpu_us_per_attestation": round(d["server_cpu_ms"]*1000/n)} if "server_cpu_ms" in d and n else {}); d.update({"server_written_bytes_per_attestation": round(d["server_written_bytes"]/n)} if "server_written_bytes" in d and n else {}); d["backend"]=sys.argv[2]; print(json.dumps(d))' "$@"
}

for backend in $BACKENDS; do
    dir=$WORK/$backend
    "$BIN/attestctl" init --out "$dir" --server-port "$PORT" --host placeholder \
        --interval "$INTERVAL" > /dev/null
    # Every key of the fleet comes from DIR/sim; its EK CA must be trusted.
    ek_ca=$("$BIN/attestctl" simulate --dir "$dir" --hosts "$((HOSTS + GARBAGE_HOSTS))" --prepare-only \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["ek_ca"])')
    sed -i "s|^ek_ca = \[\]|ek_ca = [\"$ek_ca\"]|" "$dir/server.toml"
    if [ "$backend" = postgres ]; then
        DB=attest_load_$$
        psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null
        psql -q "$PG/postgres" -c "CREATE DATABASE $DB" >/dev/null
        sed -i "s|^database_url = .*|database_url = \"$PG/$DB\"|" "$dir/server.toml"
    fi
    (cd "$dir" && exec "$BIN/attestation-server" --config server.toml) > "$dir/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        curl -ksf "https://127.0.0.1:$PORT/healthz" > /dev/null 2>&1 && break
        sleep 0.1
    done
    rss_start=$(rss_kb "$SERVER_PID")

    sim() { "$BIN/attestctl" simulate --dir "$dir" --concurrency "$CONCURRENCY" --interval "$INTERVAL" "$@"; }

    # 1. Enroll the fleet once (EK certificate, credential activation,
    #    whitelist, one attestation each).
    out=$(sim --hosts "$((HOSTS + GARBAGE_HOSTS))" --enroll-only)
    emit enroll "$backend" "$out" "{\"server_rss_kb\": $(rss_kb "$SERVER_PID"), \"server_rss_start_kb\": $rss_start}"

    # 2. Sustained attestation: every host every INTERVAL s for DURATION s.
    #    The server's CPU time per verified attestation is the figure that
    #    run-to-run noise (the simulator shares the machine) moves least.
    : > "$dir/rss"; sample_rss "$dir/rss" & SAMPLER_PID=$!
    #    With a warm-up, the server's counters are read when the simulator
    #    says its window opens (a line on stderr).
    echo "$(cpu_ticks "$SERVER_PID") $(wchar "$SERVER_PID")" > "$dir/window"
    out=$(sim --hosts "$HOSTS" --duration "$DURATION" --tampered "$TAMPERED" --warmup "$WARMUP" \
        2> >(while read -r line; do
                if [ "$line" = "simulate: warm-up over, measuring" ]; then
                    echo "$(cpu_ticks "$SERVER_PID") $(wchar "$SERVER_PID")" > "$dir/window"
                else
                    echo "$line" >&2
                fi
            done))
    read -r cpu0 wchar0 < "$dir/window"
    cpu1=$(cpu_ticks "$SERVER_PID"); wchar1=$(wchar "$SERVER_PID")
    kill "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=""
    cpu_ms=$(( (cpu1 - cpu0) * 1000 / TICK_HZ ))
    emit sustained "$backend" "$out" "{\"server_rss_max_kb\": $(max_of "$dir/rss"), \"server_hwm_kb\": $(hwm_kb "$SERVER_PID"), \"registered_hosts\": $((HOSTS + GARBAGE_HOSTS)), \"server_cpu_ms\": $cpu_ms, \"server_written_bytes\": $((wchar1 - wchar0))}"

    # 3. The same honest fleet plus GARBAGE_HOSTS hosts sending malformed
    #    evidence back to back (all enrolled in step 1; HOSTS hosts stay honest).
    if [ "$GARBAGE_HOSTS" -gt 0 ]; then
        total=$((HOSTS + GARBAGE_HOSTS))
        share=$(python3 -c "print($GARBAGE_HOSTS / $total)")
        out=$(sim --hosts "$total" --duration "$DURATION" --garbage "$share" --garbage-interval 0)
        emit garbage_flood "$backend" "$out" "{\"server_rss_kb\": $(rss_kb "$SERVER_PID")}"
    fi

    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
    if [ "$backend" = postgres ]; then
        psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null; DB=""
    fi
    rm -rf "$dir"
done
