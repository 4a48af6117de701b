#!/usr/bin/env bash
# Installs what building and testing this workspace needs on Debian 12 or
# Ubuntu 22.04+: the TSS2 headers for tss-esapi, clang for its bindgen,
# swtpm for tests, tpm2-tools for fixtures. Safe to run again: it installs
# only what is missing and runs `apt-get update` only then.
#
# Run as root, or as a user with sudo.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# Debian package -> why the project needs it.
PACKAGES=(
    build-essential # cc and linker for Rust and the ring crate
    pkg-config      # lets tss-esapi find libtss2
    libtss2-dev     # TPM2 software stack headers and libraries (host-agent)
    clang           # bindgen, used by tss-esapi-sys
    libclang-dev    # bindgen, used by tss-esapi-sys
    swtpm           # software TPM for tests
    swtpm-tools     # swtpm_setup, swtpm_localca: manufacture test TPMs
    tpm2-tools      # tpm2_* tools for tests and scripts/record-fixtures.sh
    ca-certificates # TLS to crates.io for cargo
    python3         # scripts/check-cadf.py, scripts/demo/helper.py
    python3-pip     # installs pycadf for the CADF conformance check
    curl            # tests/faults/under-load.sh polls the server's /readyz
    postgresql-client # psql: tests/faults/under-load.sh makes its database
)

say() { echo "setup: $*"; }
die() {
    echo "setup: error: $*" >&2
    exit 1
}

# Keep only the package names (the array lines carry comments).
wanted=()
for entry in "${PACKAGES[@]}"; do
    wanted+=("${entry%% *}")
done

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    die "apt-get/dpkg not found: this script supports Debian 12 and Ubuntu 22.04+ only"
fi

if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null; then
    as_root=(sudo --preserve-env=DEBIAN_FRONTEND)
else
    as_root=()
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for package in "${wanted[@]}"; do
    if is_installed "$package"; then
        say "already installed: $package"
    else
        missing+=("$package")
    fi
done

if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 && ${#as_root[@]} -eq 0 ]]; then
        die "must install ${missing[*]} but not root and sudo is missing; rerun as root"
    fi
    say "installing: ${missing[*]}"
    "${as_root[@]}" apt-get update -q
    "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    for package in "${missing[@]}"; do
        is_installed "$package" || die "$package is still not installed"
    done
    say "installed: ${missing[*]}"
else
    say "all system packages present; nothing installed"
fi

# Tools the tests call by name: make sure the packages really provided them.
for tool in swtpm swtpm_setup swtpm_localca tpm2_pcrextend tpm2_quote tpm2_checkquote pkg-config clang; do
    command -v "$tool" >/dev/null || die "$tool not on PATH after installing its package"
done
pkg-config --exists tss2-esys || die "pkg-config cannot find tss2-esys (libtss2-dev)"
say "libtss2 $(pkg-config --modversion tss2-esys), $(swtpm --version 2>&1 | head -n1)"

if ! command -v cargo >/dev/null; then
    die "cargo not found. Install Rust (1.85 or newer) with rustup, as the user who builds:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
    . \"\$HOME/.cargo/env\"
then run this script again"
fi
# The workspace's rust-version.
required_minor=85
cargo_version=$(cargo --version)
minor=$(sed -n 's/^cargo 1\.\([0-9]*\)\..*/\1/p' <<<"$cargo_version")
if [[ -z "$minor" || "$minor" -lt "$required_minor" ]]; then
    die "$cargo_version is older than 1.$required_minor; run 'rustup update stable'"
fi
say "$cargo_version"

# pycadf: the OpenStack reference CADF library; scripts/check-cadf.py loads
# every audit event kind with it (scripts/test.sh). Installed per user.
if python3 -c 'import pycadf' 2>/dev/null; then
    say "already installed: pycadf (python)"
else
    command -v python3 >/dev/null || die "python3 not found (needed for the pycadf check)"
    say "installing: pycadf (python3 -m pip install --user)"
    python3 -m pip install --user --quiet pycadf ||
        python3 -m pip install --user --quiet --break-system-packages pycadf
    python3 -c 'import pycadf' || die "pycadf is still not importable"
fi
say "done: build with 'cargo build --workspace', test with 'cargo test --workspace'"
