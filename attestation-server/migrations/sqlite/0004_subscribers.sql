-- Trust-change push (issue 6): webhook subscribers, and an index for the
-- scanner that notices verdicts passing their expiry.
CREATE TABLE subscribers (
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    -- Sent back as "Authorization: Bearer <secret>" on each delivery.
    secret     TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX verdicts_expiry ON verdicts(expires_at);
