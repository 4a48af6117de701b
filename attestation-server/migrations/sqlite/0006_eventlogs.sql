-- Event logs on the attestation path (issue 7). ima_state is the host's
-- incremental IMA verification state (JSON: entries verified, replayed
-- PCR 10 per bank, the TPM reset count of its boot, the last runtime
-- faults); last_uefi_log is the UEFI event log of the last genuine evidence,
-- so a policy change can judge boot policies again without a new quote.
ALTER TABLE hosts ADD COLUMN ima_state TEXT;
ALTER TABLE hosts ADD COLUMN last_uefi_log BLOB;
