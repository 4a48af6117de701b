#!/usr/bin/env bash
# Run every cargo-fuzz target one after another for SECONDS each (default
# 600) and print one summary line per target. See docs/security.md.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# The stable toolchain is enough: libfuzzer-sys needs -Z flags, which
# RUSTC_BOOTSTRAP=1 unlocks. Runs are niced and single-process because
# build machines are shared. The grown corpus goes to
# $CARGO_TARGET_DIR/fuzz-corpus/<target> (not committed); the committed
# seeds in fuzz/corpus/<target> are read, never written.
set -euo pipefail

secs="${1:-600}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/fuzz/target}"
# The config target loads real config files: the loaders' environment
# layers must not leak in from the caller.
while IFS= read -r var; do unset "$var"; done < <(env | sed -n 's/^\(ATTEST_SERVER_[^=]*\|HOST_AGENT_[^=]*\)=.*/\1/p')

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$root/fuzz"
# -a: debug assertions, so integer overflow is a crash, not a silent wrap.
# -s none: the targets are safe Rust; AddressSanitizer only slows them.
build_flags=(-O -a -s none)
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
nice -n 10 cargo fuzz build "${build_flags[@]}"
# Run the binaries just built rather than `cargo fuzz run`, which rebuilds
# first: every target of one run then tests the same source tree even if
# the working tree changes meanwhile.
bindir="$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"

logdir="$CARGO_TARGET_DIR/fuzz-logs"
mkdir -p "$logdir"
# The config target writes its input to $TMPDIR/attest-fuzz-config-<pid>/;
# keep those scratch files in one place that is removed afterwards.
export TMPDIR="$CARGO_TARGET_DIR/fuzz-tmp"
mkdir -p "$TMPDIR"
trap 'rm -rf "$TMPDIR"' EXIT
status=0
summaries=()
for t in "${targets[@]}"; do
    grown="$CARGO_TARGET_DIR/fuzz-corpus/$t"
    mkdir -p "$grown" "artifacts/$t"
    log="$logdir/$t.log"
    before=$(find "artifacts/$t" -type f | wc -l)
    set +e
    nice -n 19 "$bindir/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 \
        -print_final_stats=1 "$grown" "corpus/$t" >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "artifacts/$t" -type f | wc -l)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | grep 'cov:' | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$last")
    crashes=$((after - before))
    line=$(printf '%-12s rc=%s runs=%s exec/s=%s cov=%s ft=%s corpus=%s new_artifacts=%s log=%s' \
        "$t" "$rc" "${runs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes" "$log")
    echo "$line"
    summaries+=("$line")
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        status=1
    fi
done
echo "== summary ($secs s per target) =="
printf '%s\n' "${summaries[@]}"
exit "$status"
