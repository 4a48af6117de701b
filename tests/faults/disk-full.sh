#!/usr/bin/env bash
# Fault: the disk holding the SQLite database fills up (issue 9). The server
# must answer writes with 503 storage_unavailable (nothing half-written),
# keep answering reads, and recover by itself once space is freed.
# Needs root (it mounts a small tmpfs). Prints one JSON line; exits 1 on
# failure.
#
#   cargo build --release -p attestation-server && sudo bash tests/faults/disk-full.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$(cd "${BIN:-$ROOT/target/release}" && pwd)
PORT=${PORT:-18978}
export RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attest-full.XXXXXX")
MNT=$WORK/db
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    umount "$MNT" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$MNT"
mount -t tmpfs -o size=4m tmpfs "$MNT"
"$BIN/attestctl" init --out "$WORK/pool" --server-port "$PORT" --host placeholder > /dev/null
sed -i "s|^database_url = .*|database_url = \"sqlite://$MNT/attest.db\"|" "$WORK/pool/server.toml"
(cd "$WORK/pool" && exec "$BIN/attestation-server" --config server.toml) > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
    curl -ksf "https://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && break
    sleep 0.1
done
ctl() { "$BIN/attestctl" --config "$WORK/pool/admin.toml" "$@"; }
ctl host register before > /dev/null

# Fill the file system, leaving nothing for the database to grow into.
dd if=/dev/zero of="$MNT/filler" bs=64k 2> /dev/null || true
refused=0
codes=""
for i in $(seq 1 200); do
    if out=$(ctl host register "full-$i" 2>&1); then :; else
        refused=$((refused + 1))
        codes="$codes $(echo "$out" | grep -o 'storage_unavailable' | head -1)"
    fi
done
read_ok=$(ctl host show before > /dev/null 2>&1 && echo true || echo false)
alive=$(kill -0 "$SERVER_PID" 2>/dev/null && echo true || echo false)

rm -f "$MNT/filler"
sleep 1
after=$(ctl host register after > /dev/null 2>&1 && echo true || echo false)
python3 - "$refused" "$codes" "$read_ok" "$alive" "$after" <<'PY'
import json, sys
refused, codes, read_ok, alive, after = sys.argv[1:]
codes = sorted(set(codes.split()))
ok = int(refused) > 0 and codes == ["storage_unavailable"] and read_ok == "true" and alive == "true" and after == "true"
print(json.dumps({"fault": "disk full (SQLite on a full tmpfs)", "writes_refused": int(refused),
                  "codes": codes, "reads_served": read_ok == "true", "server_alive": alive == "true",
                  "recovered_after_freeing": after == "true", "pass": ok}))
sys.exit(0 if ok else 1)
PY
