-- Applying a staged result: snapshot into a new table, incrementals with
-- upserts and deletes, placeholders, unchanged rows, snapshots that replace.
\set VERBOSITY sqlstate
SELECT cd2sync._ensure_table('s2', 'items', $${"version": 1, "schema": {"properties": {
  "key": {"properties": {"id": {"type": "integer"}}},
  "value": {"properties": {
    "name": {"type": "string"},
    "state": {"type": "string", "enum": ["active", "deleted"]},
    "at": {"type": "string", "format": "date-time"},
    "data": {"type": "object"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number"},
    "code": {"type": "string", "maxLength": 5}}}}}}$$::json);

BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  (NULL, '2026-11-01T00:00:00Z', '1', 'one', 'active', '2026-10-01T12:00:00Z', '{"a": 1}', '["x","y"]', '1.5', 'A1'),
  (NULL, '2026-11-01T00:00:00Z', '2', E'two\nlines\ttab \\ back', 'active', '2026-10-01T12:00:00+02:00', NULL, '{p,q}', NULL, NULL),
  (NULL, '2026-11-01T00:00:00Z', '3', '__cd2_oversized_truncated__', 'deleted', NULL, '__cd2_oversized_truncated__', '[]', '-0', NULL);
SELECT * FROM cd2sync._apply('s2.items', 'snapshot_new');
COMMIT;
SELECT * FROM s2.items ORDER BY id;

-- an incremental: update, insert, delete, a placeholder that keeps the stored value
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  ('U', '2026-11-01T04:00:00Z', '1', '__cd2_oversized_truncated__', 'active', '2026-10-01T12:00:00Z', '__cd2_oversized_truncated__', '["x","y"]', '2.5', 'A1'),
  ('U', '2026-11-01T04:00:00Z', '4', 'four', 'active', NULL, '{"b": [1, 2]}', NULL, NULL, NULL),
  ('D', '2026-11-01T04:00:00Z', '2', NULL, NULL, NULL, NULL, NULL, NULL, NULL),
  ('D', '2026-11-01T04:00:00Z', '99', NULL, NULL, NULL, NULL, NULL, NULL, NULL);
SELECT * FROM cd2sync._apply('s2.items', 'incremental');
COMMIT;
SELECT * FROM s2.items ORDER BY id;

-- the same records again (an inclusive bound): harmless, nothing rewritten
SELECT n_tup_upd AS updates_before FROM pg_stat_xact_user_tables WHERE relid = 's2.items'::regclass \gset
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  ('U', '2026-11-01T04:00:00Z', '4', 'four', 'active', NULL, '{"b": [1, 2]}', NULL, NULL, NULL),
  ('D', '2026-11-01T04:00:00Z', '2', NULL, NULL, NULL, NULL, NULL, NULL, NULL);
SELECT * FROM cd2sync._apply('s2.items', 'incremental');
SELECT n_tup_upd - :updates_before AS rows_rewritten FROM pg_stat_xact_user_tables WHERE relid = 's2.items'::regclass;
COMMIT;
SELECT * FROM s2.items ORDER BY id;

-- one key changed twice in one result: the latest change wins
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state) VALUES
  ('U', '2026-11-01T08:00:00Z', '5', 'later', 'active'),
  ('U', '2026-11-01T07:00:00Z', '5', 'earlier', 'active'),
  ('U', '2026-11-01T07:00:00Z', '6', 'gone', 'active'),
  ('D', '2026-11-01T08:00:00Z', '6', NULL, NULL);
SELECT * FROM cd2sync._apply('s2.items', 'incremental');
COMMIT;
SELECT id, name FROM s2.items WHERE id IN (5, 6) ORDER BY id;

-- only the columns a result carries are filled
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name) VALUES ('U', '2026-11-01T09:00:00Z', '5', 'renamed');
SELECT * FROM cd2sync._apply('s2.items', 'incremental', ARRAY['name']);
COMMIT;
SELECT id, name, state FROM s2.items WHERE id = 5;
SELECT cd2sync._fill_columns(ARRAY['name', 'gone'], ARRAY['id', 'name', 'state']),
       cd2sync._fill_columns(NULL, ARRAY['id', 'name']),
       cd2sync._fill_columns(ARRAY['name'], NULL);

-- a snapshot that replaces the contents: rows it lacks are deleted
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state) VALUES
  (NULL, '2026-11-02T00:00:00Z', '1', 'one again', 'active'),
  (NULL, '2026-11-02T00:00:00Z', '7', 'seven', 'deleted');
SELECT * FROM cd2sync._apply('s2.items', 'snapshot');
COMMIT;
SELECT id, name, state FROM s2.items ORDER BY id;

-- a value that does not fit its column fails the whole apply
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, code) VALUES ('U', '2026-11-03T00:00:00Z', '1', 'too long for five');
SELECT * FROM cd2sync._apply('s2.items', 'incremental');
ROLLBACK;
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, score) VALUES ('U', '2026-11-03T00:00:00Z', '1', 'not-a-number');
SELECT * FROM cd2sync._apply('s2.items', 'incremental');
ROLLBACK;
SELECT id, name, state FROM s2.items ORDER BY id;

-- JSON lines: members by name, absent members NULL
BEGIN;
SELECT cd2sync._create_staging('s2.items');
INSERT INTO cd2_stage_json (line) VALUES
  ('{"meta": {"action": "U", "ts": "2026-11-04T00:00:00Z"}, "value": {"name": "j\"son\n", "tags": ["a"], "data": {"k": [true]}, "score": 1e3}, "key": {"id": 8}}'),
  ('{"key": {"id": 1}, "meta": {"action": "D", "ts": "2026-11-04T00:00:00Z"}}'),
  ('');
SELECT cd2sync._expand_jsonl('s2.items');
SELECT * FROM cd2sync._apply('s2.items', 'incremental');
COMMIT;
SELECT * FROM s2.items ORDER BY id;

-- the usual path: a staging table with the target's types (COPY parses the
-- values), except JSON arrays (text) and timestamps (timestamptz)
CREATE TABLE s2.items_t (LIKE s2.items INCLUDING ALL);
BEGIN;
SELECT cd2sync._create_staging('s2.items_t', typed => true);
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'pg_temp.cd2_stage'::regclass AND attnum > 0 ORDER BY attnum;
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  ('U', '2026-11-05T00:00:00Z', 1, 'one', 'active', '2026-10-01T12:00:00+02:00', '{"a": 1}', '["x","y"]', 1.5, 'A1'),
  ('U', '2026-11-05T00:00:00Z', 2, '__cd2_oversized_truncated__', 'active', NULL, NULL, NULL, NULL, NULL),
  ('U', '2026-11-05T00:00:00Z', 3, 'three', 'deleted', '2026-10-02T00:00:00Z', NULL, '[]', -0, NULL);
SELECT * FROM cd2sync._apply('s2.items_t', 'incremental', NULL, typed => true);
COMMIT;
SELECT * FROM s2.items_t ORDER BY id;
-- a key twice (the latest wins), a placeholder keeping the stored text, a
-- record that changes nothing
BEGIN;
SELECT cd2sync._create_staging('s2.items_t', typed => true);
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  ('U', '2026-11-05T02:00:00Z', 1, 'one later', 'active', '2026-10-01T10:00:00Z', '{"a": 1}', '["x","y"]', 1.5, 'A1'),
  ('U', '2026-11-05T01:00:00Z', 1, 'one earlier', 'active', NULL, NULL, NULL, NULL, NULL),
  ('U', '2026-11-05T02:00:00Z', 3, '__cd2_oversized_truncated__', 'deleted', '2026-10-02T00:00:00Z', NULL, '[]', 0, NULL),
  ('D', '2026-11-05T02:00:00Z', 2, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
-- (and in a varchar(5) column: it keeps 'A1')
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  ('U', '2026-11-05T03:00:00Z', 1, 'one later', 'active', '2026-10-01T10:00:00Z', '{"a": 1}', '["x","y"]', 1.5, '__cd2_oversized_truncated__');
SELECT * FROM cd2sync._apply('s2.items_t', 'incremental', NULL, typed => true);
COMMIT;
SELECT * FROM s2.items_t ORDER BY id;
-- JSON lines into the typed staging table
BEGIN;
SELECT cd2sync._create_staging('s2.items_t', typed => true);
INSERT INTO cd2_stage_json (line) VALUES
  ('{"meta": {"action": "U", "ts": "2026-11-06T00:00:00Z"}, "key": {"id": 9}, "value": {"name": "nine", "state": "active", "at": "2026-10-03T00:00:00-05:00", "tags": ["a", "b"], "data": {"k": 1}, "score": 2}}');
SELECT cd2sync._expand_jsonl('s2.items_t');
SELECT * FROM cd2sync._apply('s2.items_t', 'incremental', NULL, typed => true);
COMMIT;
SELECT * FROM s2.items_t WHERE id = 9;
-- a placeholder where the type cannot hold it fails the typed load (the
-- worker then loads through text staging)
BEGIN;
SELECT cd2sync._create_staging('s2.items_t', typed => true);
INSERT INTO cd2_stage_json (line) VALUES
  ('{"meta": {"action": "U"}, "key": {"id": 9}, "value": {"data": "__cd2_oversized_truncated__"}}');
SELECT cd2sync._expand_jsonl('s2.items_t');
ROLLBACK;
-- a result that changes most of its rows skips the anti-join (a sample of
-- its records decides); the row it does not change is still not rewritten
SELECT n_tup_upd AS updates_before FROM pg_stat_xact_user_tables WHERE relid = 's2.items_t'::regclass \gset
BEGIN;
SELECT cd2sync._create_staging('s2.items_t', typed => true);
INSERT INTO cd2_stage (cd2_action, cd2_ts, id, name, state, at, data, tags, score, code) VALUES
  ('U', '2026-11-07T00:00:00Z', 1, 'one again', 'active', '2026-10-01T10:00:00Z', '{"a": 1}', '["x","y"]', 1.5, 'A1'),
  ('U', '2026-11-07T00:00:00Z', 3, 'three', 'deleted', '2026-10-02T00:00:00Z', NULL, '[]', 0, NULL),
  ('U', '2026-11-07T00:00:00Z', 9, 'nine again', 'active', NULL, NULL, NULL, NULL, NULL),
  ('U', '2026-11-07T00:00:00Z', 10, 'ten', 'active', NULL, NULL, NULL, NULL, NULL),
  ('U', '2026-11-07T00:00:00Z', 11, 'eleven', 'active', NULL, NULL, NULL, NULL, NULL),
  ('U', '2026-11-07T00:00:00Z', 12, 'twelve', 'active', NULL, NULL, NULL, NULL, NULL);
SELECT * FROM cd2sync._apply('s2.items_t', 'incremental', NULL, typed => true);
SELECT n_tup_upd - :updates_before AS rows_rewritten FROM pg_stat_xact_user_tables WHERE relid = 's2.items_t'::regclass;
COMMIT;
SELECT id, name FROM s2.items_t ORDER BY id;
