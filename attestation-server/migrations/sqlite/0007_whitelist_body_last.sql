-- Every attestation lists its host's whitelist heads. SQLite stores a row's
-- columns in order, and a body of megabytes (a runtime policy of 100,000
-- paths) spills into a chain of overflow pages that must be walked to reach
-- any column stored after it. With the body last, listing the heads and
-- octet_length(body) read no overflow page; large bodies are read only when
-- the server has not parsed that version yet. (PostgreSQL keeps large
-- values out of line already: nothing to do there.)
CREATE TABLE whitelist_heads_new (
    name       TEXT PRIMARY KEY,
    version    BIGINT NOT NULL,
    deleted    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    body       TEXT NOT NULL
);
INSERT INTO whitelist_heads_new (name, version, deleted, created_at, created_by, body)
    SELECT name, version, deleted, created_at, created_by, body FROM whitelist_heads;
DROP TABLE whitelist_heads;
ALTER TABLE whitelist_heads_new RENAME TO whitelist_heads;
