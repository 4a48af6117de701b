-- Host identity: the EK pinned to each host, AK activation state, the last
-- TPM clock seen (reboot and replay detection), and pending enrollments.
ALTER TABLE hosts ADD COLUMN ek_public BLOB;
ALTER TABLE hosts ADD COLUMN ek_name TEXT;
ALTER TABLE hosts ADD COLUMN ek_certified BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE hosts ADD COLUMN ak_activated BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE hosts ADD COLUMN rekey_allowed BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE hosts ADD COLUMN clock BIGINT;
ALTER TABLE hosts ADD COLUMN reset_count BIGINT;
ALTER TABLE hosts ADD COLUMN restart_count BIGINT;
CREATE UNIQUE INDEX hosts_ek_name ON hosts(ek_name);

CREATE TABLE enrollments (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    ek_public    BLOB NOT NULL,
    ek_name      TEXT NOT NULL,
    ek_certified BOOLEAN NOT NULL,
    ak_public    BLOB NOT NULL,
    ak_name      TEXT NOT NULL,
    -- hex HMAC-SHA256(secret, host): the proof expected; the secret itself is not kept
    proof        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    used_at      BIGINT
);
CREATE INDEX enrollments_expiry ON enrollments(expires_at);
