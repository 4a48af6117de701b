#!/usr/bin/env bash
# Manufacture a fresh software TPM in DIR, as a test lab would: its own
# local CA (not the shared /var/lib one), an EK, an EK certificate and a
# platform certificate, SHA-256 PCR bank. Used by the demo, the fixture
# recorder and the network-partition fault test.
#
#   bash scripts/swtpm-manufacture.sh DIR [MODEL]
#
# Afterwards DIR/state is the TPM state for `swtpm socket --tpmstate
# dir=DIR/state`, and DIR/localca holds swtpm-localca-rootca-cert.pem and
# issuercert.pem, the EK CA chain a server should trust.
set -euo pipefail
dir=${1:?usage: swtpm-manufacture.sh DIR [MODEL]}
model=${2:-test}
mkdir -p "$dir/state" "$dir/localca"
dir=$(cd "$dir" && pwd)
cat >"$dir/swtpm-localca.conf" <<CONF
statedir = $dir/localca
signingkey = $dir/localca/signkey.pem
issuercert = $dir/localca/issuercert.pem
certserial = $dir/localca/certserial
CONF
cat >"$dir/swtpm-localca.options" <<CONF
--platform-manufacturer swtpm-$model
--platform-version 2.1
--platform-model $model
CONF
cat >"$dir/swtpm_setup.conf" <<CONF
create_certs_tool = swtpm_localca
create_certs_tool_config = $dir/swtpm-localca.conf
create_certs_tool_options = $dir/swtpm-localca.options
active_pcr_banks = sha256
CONF
# XDG_CONFIG_HOME: keep swtpm_setup away from the user's own config.
if ! XDG_CONFIG_HOME=$dir swtpm_setup --tpm2 --tpmstate "$dir/state" --createek \
    --create-ek-cert --create-platform-cert --overwrite \
    --config "$dir/swtpm_setup.conf" --logfile "$dir/swtpm_setup.log" \
    >/dev/null 2>&1 </dev/null; then
    echo "swtpm-manufacture: swtpm_setup failed for $dir:" >&2
    cat "$dir/swtpm_setup.log" >&2
    exit 1
fi
for f in swtpm-localca-rootca-cert.pem issuercert.pem; do
    if [[ ! -f "$dir/localca/$f" ]]; then
        echo "swtpm-manufacture: swtpm_setup did not create $dir/localca/$f" >&2
        exit 1
    fi
done
