#!/usr/bin/env bash
# Records TPM quote fixtures for verifier unit tests that must run without a
# TPM, and prepares the keylime reference quote alongside them.
#
#   fixtures/quotes/{rsa,ecc,rsapss}/  made here with a fresh swtpm + tpm2-tools
#   fixtures/keylime/                  copied from KEYLIME_VECTORS (see README)
#
# Every quote is checked with tpm2_checkquote, and every pcrs.json is checked
# against the quote's signed PCR digest, before the script succeeds.
#
# Usage: scripts/record-fixtures.sh
# Env:   KEYLIME_VECTORS  directory with keylime's files__* test data
#                         (default /work/shared/vectors/keylime)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUOTES_OUT="$ROOT/fixtures/quotes"
KEYLIME_OUT="$ROOT/fixtures/keylime"
KEYLIME_VECTORS=${KEYLIME_VECTORS:-/work/shared/vectors/keylime}

# Chosen once (32 random bytes) and kept fixed so the fixtures are stable.
NONCE=0b8cab300a1aac7a41412271979996c81bd9da14272f350ba131591c79489977
QUOTED_PCRS=0,1,2,3,4,5,6,7,8,9,10
# PCRs extended before quoting so the quoted values are not all zero.
EXTENDED_PCRS=(0 7 10)

for tool in swtpm swtpm_setup swtpm_localca tpm2_createek tpm2_createak tpm2_flushcontext \
    tpm2_pcrextend tpm2_pcrread tpm2_quote tpm2_checkquote tpm2_verifysignature \
    tpm2_print sha256sum; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool not found; run scripts/setup.sh" >&2
        exit 1
    }
done

WORK=$(mktemp -d -t record-fixtures.XXXXXX)
SWTPM_PID=""

stop_swtpm() {
    if [[ -n "$SWTPM_PID" ]]; then
        kill "$SWTPM_PID" 2>/dev/null || true
        wait "$SWTPM_PID" 2>/dev/null || true
        SWTPM_PID=""
    fi
}

cleanup() {
    stop_swtpm
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "record-fixtures: $*"; }

# A fresh TPM in $1 with its own local CA (not the shared /var/lib one).
manufacture_tpm() {
    bash "$ROOT/scripts/swtpm-manufacture.sh" "$1" test
}

# Starts swtpm on state $1 on a random port pair P, P+1 (the swtpm TCTI
# always uses P+1 for control); retries with other ports if one is taken.
start_swtpm() {
    local dir=$1 attempt port
    for attempt in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 40000))
        swtpm socket --tpm2 --tpmstate "dir=$dir/state" \
            --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
            --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
            --flags not-need-init,startup-clear >"$dir/swtpm.log" 2>&1 &
        SWTPM_PID=$!
        local waited
        for waited in $(seq 50); do
            if ! kill -0 "$SWTPM_PID" 2>/dev/null; then
                break
            fi
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port"
                log "swtpm pid $SWTPM_PID on port $port (attempt $attempt, ${waited}0 ms)"
                return 0
            fi
            sleep 0.01
        done
        log "swtpm did not start on port $port: $(cat "$dir/swtpm.log")"
        stop_swtpm
    done
    echo "error: swtpm did not start after 5 attempts" >&2
    return 1
}

# Prints the PCR values in tpm2_checkquote's YAML (or tpm2_pcrread's, given a
# "pcrs:" line first)
# as our wire format {"sha256": {"0": "hex", ...}}.
pcr_yaml_to_json() {
    awk '
        /^pcrs:/ { in_pcrs = 1; next }
        in_pcrs && /^  sha256:/ { in_bank = 1; next }
        in_pcrs && /^[^ ]/ { in_pcrs = 0; in_bank = 0 }
        in_bank && /^    [0-9]+ *: 0x/ {
            split($0, kv, ":")
            idx = kv[1]; gsub(/ /, "", idx)
            value = kv[2]; gsub(/ |0x/, "", value)
            values[n++] = sprintf("    \"%s\": \"%s\"", idx, tolower(value))
        }
        END {
            if (n == 0) { exit 1 }
            print "{"
            print "  \"sha256\": {"
            for (i = 0; i < n; i++) print values[i] (i < n - 1 ? "," : "")
            print "  }"
            print "}"
        }
    '
}

# Checks that the PCR values in JSON file $1, hashed in index order, give the
# pcrDigest signed in the TPMS_ATTEST file $2: pcrs.json is then exactly what
# the quote attests.
check_pcrs_json_digest() {
    local json=$1 attest=$2 escaped expected actual
    # The values in file order (index order), as \xNN escapes for printf %b,
    # which turns them into raw bytes, NUL included.
    escaped=$(sed -n 's/^ *"[0-9]*": "\([0-9a-f]*\)",\{0,1\}$/\1/p' "$json" |
        sed 's/../\\x&/g' | tr -d '\n')
    expected=$(tpm2_print -t TPMS_ATTEST "$attest" | awk '/pcrDigest:/ { print $2 }')
    actual=$(printf '%b' "$escaped" | sha256sum | cut -d' ' -f1)
    if [[ -z "$expected" || "$actual" != "$expected" ]]; then
        echo "error: $json hashes to $actual, quote $attest signs '$expected'" >&2
        return 1
    fi
}

# The qualifying data (nonce) of TPMS_ATTEST file $1, hex.
attest_nonce() {
    tpm2_print -t TPMS_ATTEST "$1" | awk '/^extraData:/ { print $2 }'
}

# Independent check of an RSASSA-PSS quote signature: the TPM uses a salt as
# long as the digest (32 bytes for sha256). Skipped if openssl is missing.
verify_pss_with_openssl() {
    local dir=$1 out=$2
    if ! command -v openssl >/dev/null; then
        log "openssl not found: skipping the independent PSS check"
        return 0
    fi
    tpm2_print -t TPM2B_PUBLIC -f pem "$out/ak.pub" >"$dir/ak.pem"
    # TPMT_SIGNATURE: sigAlg(2) hash(2) size(2) then the signature bytes.
    tail -c +7 "$out/quote.sig" >"$dir/quote.sig.raw"
    openssl dgst -sha256 -binary "$out/quote.msg" >"$dir/quote.digest"
    openssl pkeyutl -verify -pubin -inkey "$dir/ak.pem" -in "$dir/quote.digest" \
        -sigfile "$dir/quote.sig.raw" -pkeyopt rsa_padding_mode:pss \
        -pkeyopt digest:sha256 -pkeyopt rsa_pss_saltlen:32 >/dev/null
}

record_quote() {
    local kind=$1 ek_alg=$2 ak_alg=$3 ak_scheme=$4
    local dir="$WORK/$kind" out="$QUOTES_OUT/$kind" pcr
    log "recording $kind quote (EK $ek_alg, AK $ak_alg/$ak_scheme)"
    mkdir -p "$dir" "$out"
    manufacture_tpm "$dir"
    start_swtpm "$dir"

    for pcr in "${EXTENDED_PCRS[@]}"; do
        tpm2_pcrextend "$pcr:sha256=$(printf 'fixture pcr %s' "$pcr" | sha256sum | cut -d' ' -f1)"
    done

    # Without a resource manager every tool leaves its objects loaded and
    # swtpm has only three slots: flush transient objects after each step.
    tpm2_createek -G "$ek_alg" -c "$dir/ek.ctx" -u "$dir/ek.pub" >/dev/null
    tpm2_flushcontext -t
    tpm2_createak -C "$dir/ek.ctx" -c "$dir/ak.ctx" -G "$ak_alg" -g sha256 -s "$ak_scheme" \
        -u "$out/ak.pub" -n "$dir/ak.name" >/dev/null
    tpm2_flushcontext -t
    tpm2_quote -c "$dir/ak.ctx" -l "sha256:$QUOTED_PCRS" -q "$NONCE" -g sha256 \
        --scheme "$ak_scheme" -m "$out/quote.msg" -s "$out/quote.sig" -o "$out/quote.pcrs" >/dev/null
    tpm2_flushcontext -t
    chmod 0644 "$out"/*
    printf '%s\n' "$NONCE" >"$out/nonce.hex"

    # The TPM's PCRs right after the quote are the quoted ones; proven below
    # by hashing them into the digest the quote signs.
    tpm2_pcrread "sha256:$QUOTED_PCRS" |
        awk '/^  sha256:/ { print "pcrs:"; print } /^    / { print }' |
        pcr_yaml_to_json >"$out/pcrs.json"
    check_pcrs_json_digest "$out/pcrs.json" "$out/quote.msg"
    if [[ "$(attest_nonce "$out/quote.msg")" != "$NONCE" ]]; then
        echo "error: $kind quote does not carry the nonce" >&2
        return 1
    fi

    if [[ "$ak_scheme" == rsapss ]]; then
        # tpm2_checkquote 5.x cannot verify RSASSA-PSS quotes (tpm2-tools
        # issue #3283), so check the signature with the TPM itself; nonce and
        # PCR digest were checked above.
        tpm2_verifysignature -c "$dir/ak.ctx" -g sha256 -m "$out/quote.msg" \
            -s "$out/quote.sig" -t "$dir/verified.ticket"
        tpm2_flushcontext -t
        verify_pss_with_openssl "$dir" "$out"
    else
        tpm2_checkquote -u "$out/ak.pub" -m "$out/quote.msg" -s "$out/quote.sig" \
            -f "$out/quote.pcrs" -g sha256 -q "$NONCE" >"$dir/checkquote.yaml"
        pcr_yaml_to_json <"$dir/checkquote.yaml" >"$dir/checkquote.json"
        cmp -s "$dir/checkquote.json" "$out/pcrs.json" || {
            echo "error: quote.pcrs disagrees with tpm2_pcrread for $kind" >&2
            diff "$dir/checkquote.json" "$out/pcrs.json" >&2 || true
            return 1
        }
    fi
    stop_swtpm
    log "$kind: signature, nonce and PCR digest verified"
}

record_keylime() {
    local file nonce
    log "preparing keylime fixtures from $KEYLIME_VECTORS"
    mkdir -p "$KEYLIME_OUT"
    for file in quote.out quotesig.out quotepcr.out ak.pub; do
        install -m 0644 "$KEYLIME_VECTORS/files__$file" "$KEYLIME_OUT/$file"
    done
    nonce=$(attest_nonce "$KEYLIME_OUT/quote.out")
    [[ -n "$nonce" ]] || {
        echo "error: no extraData in keylime quote" >&2
        return 1
    }
    printf '%s\n' "$nonce" >"$KEYLIME_OUT/nonce.hex"
    tpm2_checkquote -u "$KEYLIME_OUT/ak.pub" -m "$KEYLIME_OUT/quote.out" \
        -s "$KEYLIME_OUT/quotesig.out" -f "$KEYLIME_OUT/quotepcr.out" -g sha256 \
        -q "$nonce" >"$WORK/keylime-checkquote.yaml"
    pcr_yaml_to_json <"$WORK/keylime-checkquote.yaml" >"$KEYLIME_OUT/pcrs.json"
    check_pcrs_json_digest "$KEYLIME_OUT/pcrs.json" "$KEYLIME_OUT/quote.out"
    log "keylime: tpm2_checkquote ok (nonce $nonce), pcrs.json matches the signed PCR digest"
}

record_quote rsa rsa rsa rsassa
record_quote ecc ecc ecc ecdsa
record_quote rsapss rsa rsa rsapss
record_keylime

log "swtpm: $(swtpm --version 2>&1 | head -n1)"
log "tpm2-tools: $(tpm2_quote --version 2>&1 | head -n1)"
log "done: fixtures in $QUOTES_OUT and $KEYLIME_OUT"
