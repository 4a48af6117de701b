#!/usr/bin/env bash
# Fault (issue 9): a host cut off from the server by the network for longer
# than the freshness window. The agent and its swtpm run in their own
# network namespace, joined to the server's by a veth pair; the fault takes
# the link down for CUT_SECS (longer than the pool's freshness_secs, 10).
#
# Asserted: while cut off, the host reads `unknown` once its verdict
# expires (never still `trusted`); when the link returns, the agent (never
# restarted or touched) attests again and the host reads `trusted`. Prints
# one JSON line; exits 1 on failure. Needs root (ip netns, veth).
#
#   cargo build --release -p attestation-server -p host-agent
#   sudo bash tests/faults/netns-partition.sh
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "needs root (ip netns, veth)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$(cd "${BIN:-$ROOT/target/release}" && pwd)
PORT=${PORT:-18981}
TPM_PORT=${TPM_PORT:-23811}
CUT_SECS=${CUT_SECS:-20}
# Addresses of the link: server side .1, host side .2.
NET=${NET:-10.231.77}
NS=attest-part-$$
VETH_SERVER=aps$$
VETH_HOST=aph$$
export RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/attest-netns.XXXXXX")
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    ip link del "$VETH_SERVER" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT
die() { echo "netns-partition: $*" >&2; exit 1; }

# The network: a namespace for the host, a veth pair to it.
ip netns add "$NS"
ip link add "$VETH_SERVER" type veth peer name "$VETH_HOST"
ip link set "$VETH_HOST" netns "$NS"
ip addr add "$NET.1/30" dev "$VETH_SERVER"
ip link set "$VETH_SERVER" up
ip netns exec "$NS" ip addr add "$NET.2/30" dev "$VETH_HOST"
ip netns exec "$NS" ip link set "$VETH_HOST" up
ip netns exec "$NS" ip link set lo up

# A freshly manufactured TPM (EK certificate from its own local CA),
# served inside the host's namespace.
tpm=$WORK/tpm
bash "$ROOT/scripts/swtpm-manufacture.sh" "$tpm" partition || die "could not manufacture a TPM in $tpm"
ip netns exec "$NS" swtpm socket --tpm2 --tpmstate "dir=$tpm/state" \
    --server "type=tcp,port=$TPM_PORT,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$((TPM_PORT + 1)),bindaddr=127.0.0.1" \
    --flags not-need-init,startup-clear > "$tpm/swtpm.log" 2>&1 &
PIDS+=($!)

# The pool. The server listens on every address; its certificate is issued
# again by the pool CA to name the link address too (init names 127.0.0.1).
dir=$WORK/pool
"$BIN/attestctl" init --out "$dir" --server-port "$PORT" --host node1 \
    --tcti "swtpm:host=127.0.0.1,port=$TPM_PORT" --interval 1 \
    --ek-ca "$tpm/localca/swtpm-localca-rootca-cert.pem" --ek-ca "$tpm/localca/issuercert.pem" > /dev/null
sed -i "s|^listen = .*|listen = \"0.0.0.0:$PORT\"|" "$dir/server.toml"
freshness=$(sed -n 's/^freshness_secs = //p' "$dir/server.toml")
[ "$CUT_SECS" -gt "$((freshness + 3))" ] || die "CUT_SECS ($CUT_SECS) must exceed freshness_secs ($freshness) by a few seconds"
openssl req -new -key "$dir/server.key" -subj "/CN=attestation-server" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:%s.1\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$NET" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
sed -i "s|^server_url = .*|server_url = \"https://$NET.1:$PORT\"|" "$dir/agent-node1.toml"

(cd "$dir" && exec "$BIN/attestation-server" --config server.toml) > "$dir/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    curl -ksf "https://127.0.0.1:$PORT/readyz" > /dev/null 2>&1 && break
    sleep 0.1
done
(cd "$dir" && exec ip netns exec "$NS" "$BIN/host-agent" --config agent-node1.toml) > "$dir/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")

trust() {
    "$BIN/attestctl" --config "$dir/admin.toml" trust node1 2>/dev/null |
        python3 -c 'import json,sys
d = json.load(sys.stdin)
hosts = d if isinstance(d, list) else d.get("hosts", [d])
print(hosts[0]["trust"] if hosts else "none")' 2>/dev/null || echo error
}
wait_for() { # state, seconds; prints the seconds it took
    local start=$SECONDS
    while [ $((SECONDS - start)) -le "$2" ]; do
        [ "$(trust)" = "$1" ] && { echo $((SECONDS - start)); return 0; }
        sleep 0.5
    done
    return 1
}

# Enrolled and attesting: accept its PCR values, then trusted.
for _ in $(seq 60); do
    "$BIN/attestctl" --config "$dir/admin.toml" whitelist accept node1 > /dev/null 2>&1 && break
    sleep 0.5
done
wait_for trusted 30 > /dev/null || die "node1 never became trusted; see $dir/agent.log (KEEP=1 keeps it)"

# The cut.
ip link set "$VETH_SERVER" down
cut_at=$SECONDS
to_unknown=-1
trusted_after_expiry=0
while [ $((SECONDS - cut_at)) -lt "$CUT_SECS" ]; do
    s=$(trust)
    if [ "$s" = unknown ] && [ "$to_unknown" -lt 0 ]; then
        to_unknown=$((SECONDS - cut_at))
    fi
    # The last verdict may still be valid for freshness_secs after the cut.
    if [ "$s" = trusted ] && [ $((SECONDS - cut_at)) -gt $((freshness + 2)) ]; then
        trusted_after_expiry=$((trusted_after_expiry + 1))
    fi
    sleep 1
done
unknown_at_end=$(trust)

# The link returns; nobody touches the agent.
ip link set "$VETH_SERVER" up
if recovered=$(wait_for trusted 60); then :; else recovered=-1; fi
agent_alive=false
kill -0 "$AGENT_PID" 2>/dev/null && agent_alive=true

pass=false
if [ "$trusted_after_expiry" -eq 0 ] && [ "$unknown_at_end" = unknown ] && [ "$to_unknown" -ge 0 ] &&
    [ "$recovered" -ge 0 ] && [ "$agent_alive" = true ]; then
    pass=true
fi
printf '{"fault": "agent partitioned by a network namespace", "cut_secs": %s, "freshness_secs": %s, "secs_to_unknown": %s, "state_at_end_of_cut": "%s", "trusted_reads_after_expiry": %s, "secs_to_trusted_after_relink": %s, "agent_restarted": false, "agent_alive": %s, "pass": %s}\n' \
    "$CUT_SECS" "$freshness" "$to_unknown" "$unknown_at_end" "$trusted_after_expiry" "$recovered" "$agent_alive" "$pass"
[ "$pass" = true ]
