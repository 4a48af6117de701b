#!/usr/bin/env bash
# The whole test suite: installs missing system packages, checks formatting
# and lints, then runs every test (unit, storage on SQLite and PostgreSQL,
# end-to-end on swtpm). Under CI=true a missing PostgreSQL fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (unwrap/expect/panic denied outside tests)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
rm -rf "${CARGO_TARGET_DIR:-target}/cadf-samples"
cargo test --workspace --locked

# The tests dump one event of every kind they made the server emit
# (attestation-server/tests/audit_trail.rs, tests/tests/audit.rs); pycadf must
# accept each without a warning.
echo "== CADF conformance (pycadf)"
python3 -W error scripts/check-cadf.py "${CARGO_TARGET_DIR:-target}"/cadf-samples/*.jsonl
