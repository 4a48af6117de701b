-- Versioned whitelists, host groups, and the policy each verdict was judged
-- against (issue 4). A whitelist's versions are immutable rows; its head
-- holds the newest body so the evidence path reads one row per whitelist.
CREATE TABLE whitelist_versions (
    name       TEXT NOT NULL,
    version    BIGINT NOT NULL,
    -- JSON {"description": …, "parts": {part: {"pcrs": …}}}
    body       TEXT NOT NULL,
    deleted    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE whitelist_heads (
    name       TEXT PRIMARY KEY,
    version    BIGINT NOT NULL,
    body       TEXT NOT NULL,
    deleted    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);

CREATE TABLE host_groups (
    name       TEXT PRIMARY KEY,
    version    BIGINT NOT NULL,
    -- JSON {"description": …, "whitelists": [...], "match_policy": {...}}
    body       TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Which whitelists each group uses (also in the group's body), indexed
-- both ways: "which hosts does this whitelist judge" and "may it be deleted".
CREATE TABLE group_whitelists (
    group_name TEXT NOT NULL REFERENCES host_groups(name) ON DELETE CASCADE,
    whitelist  TEXT NOT NULL,
    PRIMARY KEY (group_name, whitelist)
);
CREATE INDEX group_whitelists_by_whitelist ON group_whitelists(whitelist);

ALTER TABLE hosts ADD COLUMN group_name TEXT REFERENCES host_groups(name);
-- Bumped by every policy change that affects the host; an attestation judged
-- against an older policy is judged again before it is stored.
ALTER TABLE hosts ADD COLUMN policy_epoch BIGINT NOT NULL DEFAULT 0;
CREATE INDEX hosts_group ON hosts(group_name);

ALTER TABLE verdicts ADD COLUMN policy TEXT;

-- Each host's own whitelist becomes version 1 of the whitelist "host:NAME"
-- with one part, host_unique.
INSERT INTO whitelist_versions (name, version, body, deleted, created_at, created_by)
    SELECT 'host:' || name, 1, '{"parts":{"host_unique":' || whitelist || '}}', FALSE, registered_at, 'migration'
    FROM hosts WHERE whitelist IS NOT NULL;
INSERT INTO whitelist_heads (name, version, body, deleted, created_at, created_by)
    SELECT name, version, body, deleted, created_at, created_by FROM whitelist_versions;
UPDATE hosts SET whitelist = NULL;
