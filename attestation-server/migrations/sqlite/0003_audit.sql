-- Audit trail: a hash chain over the events of each server (tamper
-- evidence), signed checkpoints of it, columns the query API filters on,
-- and the last trust state the scanner reported per host.
ALTER TABLE events ADD COLUMN server TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN hash TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN action TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN outcome TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN initiator_id TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN initiator_name TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN target_id TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN target_name TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN chain_index BIGINT NOT NULL DEFAULT 0;
CREATE INDEX events_server ON events(server, seq);
CREATE INDEX events_time ON events(event_time);

-- The newest link of each server's chain; its row lock serializes appends.
CREATE TABLE audit_chain_heads (
    server TEXT PRIMARY KEY,
    seq    BIGINT NOT NULL,
    hash   TEXT NOT NULL,
    count  BIGINT NOT NULL
);

CREATE TABLE audit_checkpoints (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    server     TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    count      BIGINT NOT NULL,
    hash       TEXT NOT NULL,
    signed_at  BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature  TEXT NOT NULL
);
CREATE INDEX audit_checkpoints_server ON audit_checkpoints(server, seq);

CREATE TABLE audit_trust_state (
    host  TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
