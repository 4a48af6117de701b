#!/usr/bin/env bash
# Records, for every good UEFI event log in fixtures/eventlog/, the PCR values
# that tpm2-tools' independent parser (tpm2_eventlog) replays it to, so the
# proto crate's replay can be checked against a second implementation.
#
#   fixtures/eventlog/NAME.bin  ->  fixtures/eventlog/NAME.pcrs.json
#   JSON: {"tool": "tpm2_eventlog VERSION", "pcrs": {"sha256": {"0": "hex", ...}, ...}}
#
# The bogus and empty logs are skipped: tpm2_eventlog 5.4 refuses the empty
# one and crashes (SIGSEGV) on the bogus one, so it is no oracle for those.
#
# Usage: scripts/record-eventlog-oracle.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="$ROOT/fixtures/eventlog"

for tool in tpm2_eventlog jq awk; do
    command -v "$tool" >/dev/null || { echo "missing $tool (run scripts/setup.sh)" >&2; exit 1; }
done
VERSION=$(tpm2_eventlog --version | sed -n 's/.*version="\([^"]*\)".*/\1/p')

for log in "$DIR"/*.bin; do
    name=$(basename "$log" .bin)
    case "$name" in *-bogus|*-empty) continue ;; esac
    out="$DIR/$name.pcrs.json"
    # The "pcrs:" section at the end of tpm2_eventlog's YAML lists, per bank,
    # "  N : 0xHEX"; turn it into TSV "bank index hex" and then into JSON.
    tpm2_eventlog "$log" | awk '
        /^pcrs:/ { inpcrs = 1; next }
        inpcrs && /^  [a-z0-9]+:$/ { bank = $1; sub(":", "", bank); next }
        inpcrs && /^    [0-9]+ *: 0x/ { sub("0x", "", $3); print bank "\t" $1 "\t" $3 }
    ' | jq -R -s --arg tool "tpm2_eventlog $VERSION" '
        split("\n") | map(select(length > 0) | split("\t"))
        | reduce .[] as $r ({}; .[$r[0]][$r[1]] = ($r[2] | ascii_downcase))
        | {tool: $tool, pcrs: .}
    ' > "$out.tmp"
    if [ "$(jq '.pcrs | length' "$out.tmp")" -eq 0 ]; then
        echo "no PCR values from tpm2_eventlog for $log" >&2
        rm -f "$out.tmp"; exit 1
    fi
    mv "$out.tmp" "$out"
    echo "$out: $(jq -c '.pcrs | to_entries | map({(.key): (.value | length)}) | add' "$out")"
done
