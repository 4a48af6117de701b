-- Times are Unix microseconds (UTC) in both backends.
CREATE TABLE hosts (
    name          TEXT PRIMARY KEY,
    registered_at INTEGER NOT NULL,
    ak_public     BLOB,
    ak_name       TEXT,
    whitelist     TEXT,
    last_pcrs     TEXT
);

CREATE TABLE verdicts (
    host        TEXT PRIMARY KEY REFERENCES hosts(name),
    trust       TEXT NOT NULL,
    verified_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    reasons     TEXT NOT NULL
);

CREATE TABLE challenges (
    nonce      TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    selection  TEXT NOT NULL,
    issued_at  INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER
);
CREATE INDEX challenges_expiry ON challenges(expires_at);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    event_time INTEGER NOT NULL,
    host       TEXT,
    body       TEXT NOT NULL
);
CREATE INDEX events_host ON events(host, seq);

CREATE TABLE sink_cursors (
    sink          TEXT PRIMARY KEY,
    delivered_seq INTEGER NOT NULL
);
