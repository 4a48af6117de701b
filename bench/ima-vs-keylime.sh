#!/usr/bin/env bash
# Side by side: the same generated IMA list (ima-ng, SHA-256 file digests)
# and Keylime runtime policy through Keylime's
# keylime.ima.ima.process_measurement_list and through proto::ima
# (verify_ascii, criterion bench proto/benches/ima.rs), same
# machine, same run. Both replay PCR 10 in the SHA-256 bank and check it
# against the expected value. Prints entries/s of each and the ratio.
#
#   bash bench/ima-vs-keylime.sh            # 200,000 entries, 100,000 paths
#   ENTRIES=50000 RUNS=3 bash bench/ima-vs-keylime.sh
#
# Needs python3 (venv) and network access to PyPI the first time.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${IMA_BENCH_DIR:-/work/tgt-ima}"
VENV="${VENV:-$WORK/venv}"
ENTRIES="${ENTRIES:-200000}"
PATHS="${PATHS:-100000}"
RUNS="${RUNS:-5}"
OUT="$WORK/ima-vs-keylime"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WORK}"
mkdir -p "$OUT/stubs"

if ! "$VENV/bin/python" -c 'import keylime' 2>/dev/null; then
    python3 -m venv "$VENV"
    # keylime's wheel does not declare everything keylime.ima imports.
    "$VENV/bin/pip" install -q 'keylime==7.14.*' jsonschema cryptography pyyaml lark packaging pyasn1 pyasn1-modules
fi
KEYLIME_VERSION="$("$VENV/bin/pip" show keylime | awk '/^Version:/ {print $2}')"
# keylime.signing imports the gpgme binding (not on PyPI); IMA verification
# never calls it, so an empty module stands in.
echo '# stand-in for the gpgme binding; unused by keylime.ima' > "$OUT/stubs/gpg.py"

python3 "$ROOT/bench/ima-gen.py" "$ENTRIES" "$PATHS" "$OUT"

cat > "$OUT/keylime_run.py" <<'PY'
import json, logging, statistics, sys, time
from keylime.ima import ima
from keylime.common.algorithms import Hash
logging.disable(logging.CRITICAL)
log_path, policy_path, pcr_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(log_path) as f:
    lines = f.read().splitlines(keepends=True)
with open(pcr_path) as f:
    pcr = f.read().strip()
times = []
for _ in range(runs):
    with open(policy_path) as f:
        policy = json.load(f)  # outside the timing, as our policy compile is
    t0 = time.perf_counter()
    running, failure = ima.process_measurement_list(None, lines, policy, pcrval=pcr, hash_alg=Hash.SHA256)
    times.append(time.perf_counter() - t0)
    if failure or running != pcr:
        sys.exit(f"keylime: verification failed ({running})")
med = statistics.median(times)
print(json.dumps({"entries": len(lines), "median_s": med, "entries_per_s": len(lines) / med}))
PY

echo "== keylime $KEYLIME_VERSION: $RUNS runs of $ENTRIES entries" >&2
KEYLIME_JSON="$(PYTHONPATH="$OUT/stubs" "$VENV/bin/python" "$OUT/keylime_run.py" \
    "$OUT/ima.log" "$OUT/policy.json" "$OUT/pcr10-sha256.hex" "$RUNS" 2>/dev/null)"
echo "$KEYLIME_JSON" >&2

echo "== proto::ima (criterion)" >&2
(cd "$ROOT" && IMA_BENCH_LOG="$OUT/ima.log" IMA_BENCH_POLICY="$OUT/policy.json" \
    IMA_BENCH_PCR10="$OUT/pcr10-sha256.hex" \
    cargo bench -q -p proto --bench ima -- --warm-up-time 2 --measurement-time 10 \
    'keylime_input/' >&2)
EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/verify_ascii (streaming)/new/estimates.json' | head -1)"
TWO_STEP_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/parse+verify (sha256 bank)/new/estimates.json' | head -1)"
VERIFY_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/verify (parsed, sha256 bank)/new/estimates.json' | head -1)"

python3 - "$KEYLIME_JSON" "$EST" "$VERIFY_EST" "$ENTRIES" "$PATHS" "$KEYLIME_VERSION" "$TWO_STEP_EST" <<'PY'
import json, os, sys
k = json.loads(sys.argv[1])
n = int(sys.argv[4])
def rate(path):
    with open(path) as f:
        return n / (json.load(f)["median"]["point_estimate"] * 1e-9)
ours = rate(sys.argv[2])
ours_verify = rate(sys.argv[3])
ours_two_step = rate(sys.argv[7])
print(f"entries: {n}, policy paths: {sys.argv[5]}, bank: sha256, cpu: {os.cpu_count()} cores")
print(f"keylime {sys.argv[6]} process_measurement_list: {k['entries_per_s']:>12,.0f} entries/s (median)")
print(f"proto::ima verify_ascii (streaming):  {ours:>12,.0f} entries/s (median)")
print(f"proto::ima parse_ascii, then verify:  {ours_two_step:>12,.0f} entries/s (median)")
print(f"proto::ima verify (already parsed):   {ours_verify:>12,.0f} entries/s (median)")
print(f"ratio (verify_ascii / keylime):       {ours / k['entries_per_s']:>12.1f}x")
PY
