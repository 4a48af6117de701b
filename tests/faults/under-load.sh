#!/usr/bin/env bash
# Faults under load (issues 8 and 9). A fleet of simulated hosts attests
# against a real server; mid-run one fault is injected:
#
#   kill9       the server gets SIGKILL, stays down DOWN_SECS, is started
#               again on the same database (SQLite by default,
#               BACKEND=postgres for PostgreSQL)
#   pg-restart  the PostgreSQL cluster is stopped for DOWN_SECS and started
#               again (BACKEND is postgres); the server must answer 503
#               storage_unavailable meanwhile and recover by itself. The
#               cluster is the script's own (initdb in a directory of its
#               own, a free port or PG_PORT), so stopping it disturbs no other user of the
#               machine's PostgreSQL; needs PostgreSQL's server binaries
#               (PG_BIN, default the newest /usr/lib/postgresql/*/bin), and
#               runs them as the user postgres when run as root
#
# The fleet keeps going (it retries). Afterwards every attestation the fleet
# saw acknowledged (an HTTP 200 verdict) must be in the database as a CADF
# attestation event, the hash chain must verify, and the server must be
# ready. Prints one JSON line; exits 1 on any loss.
#
#   cargo build --release -p attestation-server
#   bash tests/faults/under-load.sh kill9
#   BACKEND=postgres bash tests/faults/under-load.sh pg-restart
set -euo pipefail
FAULT=${1:-kill9}
case "$FAULT" in
    kill9) ;;
    pg-restart) BACKEND=postgres ;;
    *) echo "unknown fault $FAULT (kill9, pg-restart)" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$(cd "${BIN:-$ROOT/target/release}" && pwd)
HOSTS=${HOSTS:-300}
DURATION=${DURATION:-20}
KILL_AFTER=${KILL_AFTER:-8}
DOWN_SECS=${DOWN_SECS:-2}
BACKEND=${BACKEND:-sqlite}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-18977}
export RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attest-fault.XXXXXX")
SERVER_PID=""
SIM_PID=""
DB=""
PGWORK=""
# PostgreSQL's server refuses to run as root.
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
own_pg() { # pg_ctl start|stop on the script's own cluster
    as_postgres "$PG_BIN/pg_ctl" -D "$PGWORK/data" -l "$PGWORK/log" -w -m fast \
        -o "-p $PG_PORT -k '$PGWORK' -c listen_addresses=127.0.0.1" "$1" > /dev/null
}
cleanup() {
    if [ -n "$SIM_PID" ]; then kill "$SIM_PID" 2>/dev/null || true; fi
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    [ -n "$DB" ] && psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    if [ -n "$PGWORK" ]; then own_pg stop 2>/dev/null || true; rm -rf "$PGWORK"; fi
    # KEEP=1 keeps the pool directory (server.log, the database) for a look.
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT
# A job cancelled (SIGTERM) still stops what the script started.
trap 'exit 143' TERM INT HUP

if [ "$FAULT" = pg-restart ]; then
    PG_BIN=${PG_BIN:-$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)}
    if [ ! -x "${PG_BIN:-}/initdb" ]; then
        echo "pg-restart needs PostgreSQL's server binaries (initdb, pg_ctl); set PG_BIN" >&2
        exit 2
    fi
    # A port nobody listens on now, unless PG_PORT says which.
    PG_PORT=${PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    PGWORK=$(mktemp -d "${TMPDIR:-/tmp}/attest-fault-pg.XXXXXX")
    if [ "$(id -u)" = 0 ]; then chown postgres "$PGWORK"; fi
    as_postgres "$PG_BIN/initdb" -D "$PGWORK/data" -U postgres --auth=trust -E UTF8 > /dev/null
    own_pg start
    PG=postgres://postgres@127.0.0.1:$PG_PORT
fi

dir=$WORK/pool
"$BIN/attestctl" init --out "$dir" --server-port "$PORT" --host placeholder --interval 1 > /dev/null
ek_ca=$("$BIN/attestctl" simulate --dir "$dir" --hosts "$HOSTS" --prepare-only \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["ek_ca"])')
sed -i "s|^ek_ca = \[\]|ek_ca = [\"$ek_ca\"]|" "$dir/server.toml"
if [ "$BACKEND" = postgres ]; then
    DB=attest_fault_$$
    psql -q "$PG/postgres" -c "CREATE DATABASE $DB" >/dev/null
    sed -i "s|^database_url = .*|database_url = \"$PG/$DB\"|" "$dir/server.toml"
fi

start_server() {
    (cd "$dir" && exec "$BIN/attestation-server" --config server.toml) >> "$dir/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        curl -ksf "https://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server did not become ready" >&2
    return 1
}
count_attestations() { # [since, seconds since the epoch]: stored attestations (from then on)
    "$BIN/attestctl" audit export --server-config "$dir/server.toml" --out "$dir/export.jsonl" > /dev/null
    python3 - "$dir/export.jsonl" "${1:-0}" <<'PY'
import datetime, json, sys
since = float(sys.argv[2])
n = 0
for line in open(sys.argv[1]):
    rec = json.loads(line)
    body = rec.get("event") or rec.get("body") or rec
    if isinstance(body, str):
        body = json.loads(body)
    if body.get("action") == "evaluate" and body.get("outcome") == "success":
        at = datetime.datetime.fromisoformat(body["eventTime"]).timestamp()
        n += at >= since
print(n)
PY
}

start_server
"$BIN/attestctl" simulate --dir "$dir" --hosts "$HOSTS" --enroll-only > "$dir/enroll.json"
before=$(count_attestations)

"$BIN/attestctl" simulate --dir "$dir" --hosts "$HOSTS" --interval 1 --duration "$DURATION" \
    --concurrency 32 > "$dir/run.json" &
SIM_PID=$!
sleep "$KILL_AFTER"
killed_at=$(date +%s.%N)
if [ "$FAULT" = kill9 ]; then
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    sleep "$DOWN_SECS"
    start_server
else
    own_pg stop
    sleep "$DOWN_SECS"
    own_pg start
    ready=""
    for _ in $(seq 1 300); do
        curl -ksf "https://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && { ready=1; break; }
        sleep 0.1
    done
    if [ -z "$ready" ]; then
        echo "the server did not become ready again after PostgreSQL came back" >&2
        exit 1
    fi
fi
ready_at=$(date +%s.%N)
restarted_in=$(python3 -c "import time; print(round(time.time() - $killed_at, 2))")
wait "$SIM_PID"; SIM_PID=""

after=$(count_attestations)
after_recovery=$(count_attestations "$ready_at")
verify=$("$BIN/attestctl" audit verify "$dir/export.jsonl" --public-key "$dir/token-signing.key" 2>&1 && echo ok || echo failed)
python3 - "$dir/run.json" "$before" "$after" "$restarted_in" "$verify" "$BACKEND" "$FAULT" "$after_recovery" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
before, after = int(sys.argv[2]), int(sys.argv[3])
fault, recovered = sys.argv[7], int(sys.argv[8])
acked = run["attestations"]
stored = after - before
# Nothing acknowledged lost, the chain intact, attestations stored again
# after the fault, and (PostgreSQL away) the outage told as 503
# storage_unavailable, not as some other failure.
told = fault != "pg-restart" or any("storage_unavailable" in k for k in run["errors"])
ok = acked > 0 and stored >= acked and recovered > 0 and told and sys.argv[5].strip().endswith("ok")
print(json.dumps({
    "fault": fault, "backend": sys.argv[6],
    "acknowledged": acked, "stored_during_run": stored, "stored_after_recovery": recovered,
    "errors_during_outage": run["errors"], "fault_to_ready_secs": float(sys.argv[4]),
    "chain_verify": sys.argv[5].strip().splitlines()[-1], "lost": max(0, acked - stored), "pass": ok,
}))
sys.exit(0 if ok else 1)
PY
