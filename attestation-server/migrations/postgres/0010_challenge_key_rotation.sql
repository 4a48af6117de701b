-- Rotation of the challenge key (`attestctl challenge-key rotate`): the
-- key before the current one still opens the nonces issued under it until
-- they expire; `generation` tells every server of the pool to reload.
ALTER TABLE challenge_key ADD COLUMN previous BYTEA;
ALTER TABLE challenge_key ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
-- When the current key replaced the previous one (Unix microseconds): the
-- previous key opens only nonces that expire within a challenge TTL of it,
-- so nonces minted with a leaked key for later are refused.
ALTER TABLE challenge_key ADD COLUMN rotated_at BIGINT;
