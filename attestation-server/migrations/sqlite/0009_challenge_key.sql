-- The key every server of the pool checks challenge nonces with (see
-- src/challenge.rs): made by the first server to start. Nonces are no
-- longer stored when issued; `challenges` now holds the nonces evidence
-- used, until they expire, which is what makes each single-use.
CREATE TABLE challenge_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL
);
