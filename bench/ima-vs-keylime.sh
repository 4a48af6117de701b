#!/usr/bin/env bash
# Side by side: the same generated IMA list (ima-ng, SHA-256 file digests)
# and Keylime runtime policy through Keylime's
# keylime.ima.ima.process_measurement_list and through proto::ima
# (verify_ascii on one core, verify_ascii_parallel on every core; criterion
# bench proto/benches/ima.rs; also the server's two steps,
# replay_ascii_to_quote then judge_replayed, on one core and on all), same
# machine, same run. Both replay PCR 10 in
# the SHA-256 bank and check it against the expected value. Prints
# entries/s of each, the ratios, and the load average before and after.
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
print(json.dumps({"entries": len(lines), "times": times, "median_s": med, "entries_per_s": len(lines) / med}))
PY

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "== keylime $KEYLIME_VERSION: $RUNS runs of $ENTRIES entries (load $LOAD_BEFORE)" >&2
run_keylime() {
    PYTHONPATH="$OUT/stubs" "$VENV/bin/python" "$OUT/keylime_run.py" \
        "$OUT/ima.log" "$OUT/policy.json" "$OUT/pcr10-sha256.hex" "$RUNS" 2>/dev/null
}
# Keylime runs before and after our side; the median is over both batches,
# so a change of load on the shared machine during the run hits both sides.
KEYLIME_JSON="$(run_keylime)"
echo "$KEYLIME_JSON" >&2

echo "== proto::ima (criterion)" >&2
(cd "$ROOT" && IMA_BENCH_LOG="$OUT/ima.log" IMA_BENCH_POLICY="$OUT/policy.json" \
    IMA_BENCH_PCR10="$OUT/pcr10-sha256.hex" \
    cargo bench -q -p proto --bench ima -- --warm-up-time 2 --measurement-time 10 \
    'keylime_input/' >&2)
EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/verify_ascii (streaming)/new/estimates.json' | head -1)"
TWO_STEP_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/parse+verify (sha256 bank)/new/estimates.json' | head -1)"
VERIFY_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/verify (parsed, sha256 bank)/new/estimates.json' | head -1)"
SERVER_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/server steps (replay_ascii_to_quote, judge_replayed)/new/estimates.json' | head -1)"
SERVER_PAR_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/server steps (all cores)/new/estimates.json' | head -1)"
PAR_EST="$(find "$CARGO_TARGET_DIR/criterion/keylime_input" -path '*/verify_ascii_parallel (all cores)/new/estimates.json' | head -1)"
echo "== keylime again, $RUNS runs" >&2
KEYLIME_JSON_2="$(run_keylime)"
echo "$KEYLIME_JSON_2" >&2
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$KEYLIME_JSON" "$EST" "$VERIFY_EST" "$ENTRIES" "$PATHS" "$KEYLIME_VERSION" "$TWO_STEP_EST" "$PAR_EST" "$LOAD_BEFORE" "$LOAD_AFTER" "$KEYLIME_JSON_2" "$SERVER_EST" "$SERVER_PAR_EST" <<'PY'
import json, os, statistics, sys
n = int(sys.argv[4])
times = json.loads(sys.argv[1])["times"] + json.loads(sys.argv[11])["times"]
k = {"entries_per_s": n / statistics.median(times)}
def rate(path):
    with open(path) as f:
        return n / (json.load(f)["median"]["point_estimate"] * 1e-9)
ours = rate(sys.argv[2])
ours_verify = rate(sys.argv[3])
ours_two_step = rate(sys.argv[7])
ours_par = rate(sys.argv[8])
ours_server = rate(sys.argv[12])
ours_server_par = rate(sys.argv[13])
cores = len(os.sched_getaffinity(0))
print(f"entries: {n}, policy paths: {sys.argv[5]}, bank: sha256, cpu: {cores} cores")
print(f"load average (1/5/15 min) before: {sys.argv[9]}, after: {sys.argv[10]}")
print(f"keylime {sys.argv[6]} process_measurement_list (1 core): {k['entries_per_s']:>12,.0f} entries/s (median of {len(times)})")
print("  keylime batches, entries/s (before, after ours): " + ", ".join(f"{json.loads(a)['entries_per_s']:,.0f}" for a in (sys.argv[1], sys.argv[11])))
print(f"proto::ima verify_ascii (1 core):               {ours:>12,.0f} entries/s (median)")
print(f"proto::ima verify_ascii_parallel ({cores} cores):     {ours_par:>12,.0f} entries/s (median)")
print(f"proto::ima parse_ascii, then verify (1 core):   {ours_two_step:>12,.0f} entries/s (median)")
print(f"proto::ima verify, already parsed (1 core):     {ours_verify:>12,.0f} entries/s (median)")
print(f"server's steps (1 core):                        {ours_server:>12,.0f} entries/s (median)")
print(f"server's steps ({cores} cores):                       {ours_server_par:>12,.0f} entries/s (median)")
print(f"ratio, 1 core vs 1 core (verify_ascii / keylime):           {ours / k['entries_per_s']:>6.1f}x")
print(f"ratio, 1 core vs 1 core (server's steps / keylime):         {ours_server / k['entries_per_s']:>6.1f}x")
print(f"ratio, {cores} cores vs 1 core (server's steps / keylime):        {ours_server_par / k['entries_per_s']:>6.1f}x")
print(f"ratio, {cores} cores vs 1 core (verify_ascii_parallel / keylime): {ours_par / k['entries_per_s']:>6.1f}x")
PY
