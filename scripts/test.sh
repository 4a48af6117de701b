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
cargo test --workspace --locked
