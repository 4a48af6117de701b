-- One counter that every policy change (whitelist, group, membership)
-- increments in its own transaction. A server keeps the policies it loaded
-- under the generation it read before loading them, so a cached policy is
-- used only while no policy change has been committed since, by any server.
CREATE TABLE policy_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO policy_generation (id, generation) VALUES (1, 0);
