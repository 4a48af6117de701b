-- Rotation of the challenge key (`attestctl challenge-key rotate`): the
-- key before the current one still opens the nonces issued under it until
-- they expire; `generation` tells every server of the pool to reload.
ALTER TABLE challenge_key ADD COLUMN previous BLOB;
ALTER TABLE challenge_key ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;
