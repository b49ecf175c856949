-- Change feeds and reconciled lookups, on instance tables written here the
-- way a sync writes them (the worker end to end: t/004_consortium.pl, t/011_feeds.pl).
\set VERBOSITY sqlstate
SET client_min_messages = warning;
SELECT cd2_add_instance('east', 'id-e', 'x', api_url => 'http://127.0.0.1:9', shard_id => 7);
SELECT cd2_add_instance('west', 'id-w', 'x', api_url => 'http://127.0.0.1:9', shard_id => 8);
CREATE SCHEMA east;
CREATE SCHEMA west;
CREATE TABLE east.enrollments (id bigint PRIMARY KEY, user_id bigint, course_id bigint, state text);
CREATE TABLE west.enrollments (id bigint PRIMARY KEY, user_id bigint, course_id bigint, state text);
CREATE TABLE east.users (id bigint PRIMARY KEY, name text, workflow_state text, merged_into_user_id bigint);
CREATE TABLE west.users (id bigint PRIMARY KEY, name text, workflow_state text, merged_into_user_id bigint);
INSERT INTO east.users VALUES (1, 'Ann', 'registered', NULL), (2, 'Bob', 'registered', NULL);
INSERT INTO west.users VALUES (5, 'Cy', 'registered', NULL);
INSERT INTO east.enrollments VALUES (10, 1, 100, 'active'), (11, 2, 100, 'active');
INSERT INTO west.enrollments VALUES (20, 70000000000001, 200, 'active'), (21, 5, 200, 'active');
INSERT INTO cd2sync.table_state (instance, table_name, status)
VALUES ('east', 'enrollments', 'ok'), ('west', 'enrollments', 'ok'), ('east', 'users', 'ok'), ('west', 'users', 'ok');
SELECT cd2sync.refresh_views();

-- bookkeeping of the instance tables: a column per user reference, indexes
SELECT attrelid::regclass, attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid IN ('east.enrollments'::regclass, 'east.users'::regclass) AND attname LIKE 'cd2\_%' ORDER BY 1, 2;
SELECT indexrelid::regclass, pg_get_indexdef(indexrelid) FROM pg_index
 WHERE indrelid = 'east.enrollments'::regclass ORDER BY 1;

-- the SQL surface: bad arguments are errors with SQLSTATEs, nothing is created
SELECT cd2_create_feed('Bad-Name');
SELECT cd2_create_feed(NULL);
SELECT cd2_create_feed('f', tables => '{}');
SELECT cd2_create_feed('f', tables => ARRAY['enrollments', 'no such']);
SELECT cd2_create_feed('f', from_start => NULL);
BEGIN ISOLATION LEVEL REPEATABLE READ;   -- its start must see what commits while it waits
SELECT cd2_create_feed('f');
ROLLBACK;
BEGIN ISOLATION LEVEL SERIALIZABLE;      -- so must a drop, deciding which triggers go
SELECT cd2_drop_feed('f');
ROLLBACK;
SELECT * FROM cd2_feed_read('nope');
SELECT cd2_feed_ack('nope', 1);
SELECT cd2_drop_feed('nope');
SELECT count(*) FROM cd2sync.feeds;

-- a feed from the start: one insert per current row, cause start
SELECT cd2_create_feed('sis', tables => ARRAY['enrollments'], from_start => true);
SELECT cd2_create_feed('sis');
SELECT * FROM cd2_feed_read('sis', max_changes => 0);
SELECT position, table_name, op, key, instance, "row"->>'user_id' AS user_id, changed, cause, watermark
  FROM cd2_feed_read('sis');
SELECT name, tables, acknowledged, pending, oldest_pending IS NOT NULL AS has_oldest, status FROM cd2sync.feeds;
-- a feed without from_start starts empty, at the current state
SELECT cd2_create_feed('all_tables');
SELECT count(*) FROM cd2_feed_read('all_tables');

-- a table a feed follows that has no capture triggers (a feed made while
-- the table was: neither saw the other) gets them before a sync writes it
DO $$
DECLARE t text;
BEGIN
    FOR t IN SELECT tgname FROM pg_trigger WHERE tgrelid = 'east.enrollments'::regclass AND tgname LIKE 'cd2\_feed\_%' LOOP
        EXECUTE format('DROP TRIGGER %I ON east.enrollments', t);
    END LOOP;
END $$;
SELECT count(*) FROM pg_trigger WHERE tgrelid = 'east.enrollments'::regclass;
-- a sync's transaction: the hooks around rows written as an apply writes
-- them; each statement's changes, in order; an update that changes nothing
-- the view shows is quiet. (What a database or role gives cd2sync_tx.* by
-- default is not the sync's: here the instance's rows are not passed over.)
SET cd2sync_tx.quiet_instance = 'east';
BEGIN;
SELECT cd2sync._before_apply('east', 'enrollments', '2026-11-02 00:00:00+00');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'east.enrollments'::regclass ORDER BY 1;
UPDATE east.enrollments SET state = 'completed' WHERE id = 10;
UPDATE east.enrollments SET state = 'active' WHERE id = 11;          -- the same as before: quiet
INSERT INTO east.enrollments VALUES (12, 2, 101, 'active');
DELETE FROM east.enrollments WHERE id = 12;                           -- in and out: both
INSERT INTO east.enrollments VALUES (13, 1, 102, 'invited');
UPDATE east.enrollments SET state = 'active' WHERE id = 13;            -- an insert, an update
DELETE FROM west.enrollments WHERE id = 21;
SELECT cd2sync._after_apply('east', 'enrollments', 'incremental', 4);
COMMIT;
RESET cd2sync_tx.quiet_instance;
SELECT position, table_name, op, key, instance, "row"->>'state' AS state, changed, cause, watermark
  FROM cd2_feed_read('sis') WHERE cause <> 'start';

-- a merge: Ann (east 1) merged into Cy (west 5); her rows on both instances
-- get one update each, cause merge, user_id changed
BEGIN;
SELECT cd2sync._before_apply('east', 'users', '2026-11-02 00:00:00+00');
UPDATE east.users SET workflow_state = 'deleted', merged_into_user_id = 80000000000005 WHERE id = 1;
SELECT cd2sync._after_apply('east', 'users', 'incremental', 1);
COMMIT;
SELECT * FROM cd2.user_merges;
SELECT position, table_name, op, key, instance, "row"->>'user_id' AS user_id,
       "row"->>'original_user_id' AS original_user_id, changed, cause
  FROM cd2_feed_read('sis') WHERE cause = 'merge';
-- every row's replacement looked up again (its resolved-user index made
-- again, as for a table loaded apart): rows whose resolved user stays the
-- same give no change
SELECT max(position) AS before_reset FROM cd2sync.changes \gset
DROP INDEX east.enrollments_user_id_resolved;
SELECT cd2sync._ensure_bookkeeping('east.enrollments', 7, 'enrollments');
SELECT count(*) AS changes FROM cd2sync.changes WHERE position > :before_reset;
SELECT id, user_id, cd2_user_id FROM east.enrollments ORDER BY id;
-- the users table is followed by all_tables only
SELECT table_name, op, key, changed, cause FROM cd2_feed_read('all_tables') ORDER BY position;

-- reconciled lookups use indexes on every instance's table
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT * FROM cd2.enrollments WHERE id = 70000000000010;
EXPLAIN (COSTS OFF) SELECT * FROM cd2.enrollments WHERE user_id = 80000000000005;
SELECT instance, id, user_id, original_user_id FROM cd2.enrollments WHERE user_id = 80000000000005 ORDER BY id;
SELECT instance, id FROM cd2.enrollments WHERE id = 70000000000010;
-- an index a user makes on an instance table serves the view too: on a
-- column the view shows as global ids, cd2sync keeps one on them beside it
-- (made by the table's next sync, or refresh_view); a relation that has
-- its name already is left alone, with a WARNING
CREATE INDEX enr_course ON east.enrollments (course_id);
CREATE TABLE east.enrollments_course_id_global (x int);
SELECT cd2sync.refresh_view('enrollments');
DROP TABLE east.enrollments_course_id_global;
SELECT cd2sync.refresh_view('enrollments');
SELECT indexrelid::regclass, pg_get_indexdef(indexrelid) FROM pg_index
 WHERE indrelid = 'east.enrollments'::regclass AND indexrelid::regclass::text LIKE '%course%' ORDER BY 1;
EXPLAIN (COSTS OFF) SELECT * FROM cd2.enrollments WHERE course_id = 70000000000100;
SELECT instance, id, course_id FROM cd2.enrollments WHERE course_id = 70000000000100 ORDER BY id;
RESET enable_seqscan;
-- the user's index gone, the next sync's bookkeeping drops the one beside it
DROP INDEX east.enr_course;
SELECT cd2sync._ensure_bookkeeping('east.enrollments', 7, 'enrollments');
SELECT count(*) FROM pg_index WHERE indrelid = 'east.enrollments'::regclass
   AND indexrelid::regclass::text LIKE '%course%';

-- acknowledging
SELECT max(position) AS last FROM cd2_feed_read('sis') \gset
SELECT cd2_feed_ack('sis', :last);
SELECT cd2_feed_ack('sis', 1);                 -- less than before: a no-op
SELECT cd2_feed_ack('sis', :last + 1000);      -- never past the last change
SELECT cd2_feed_ack('sis', NULL);
SELECT name, acknowledged = :last AS at_last, pending, status FROM cd2sync.feeds ORDER BY name;
SELECT count(*) FROM cd2_feed_read('sis');

-- roles: the admin creates and drops, the reader reads and acknowledges,
-- PUBLIC nothing
CREATE ROLE feed_admin IN ROLE cd2sync_admin;
CREATE ROLE feed_reader IN ROLE cd2sync_reader;
CREATE ROLE nobody;
SET ROLE feed_reader;
SELECT count(*) FROM cd2_feed_read('all_tables');
SELECT cd2_feed_ack('all_tables', 0);
SELECT name, status FROM cd2sync.feeds ORDER BY name;
SELECT cd2_create_feed('mine');
SELECT cd2_drop_feed('sis');
SELECT count(*) FROM cd2sync.changes;
SET ROLE nobody;
SELECT count(*) FROM cd2_feed_read('all_tables');
SELECT count(*) FROM cd2sync.feeds;
SET ROLE feed_admin;
SELECT cd2_create_feed('mine', tables => ARRAY['users']);
SELECT cd2_drop_feed('mine');
RESET ROLE;

-- a feed over a limit is stale at once, before a sync marks it: reading it
-- is an error, and the failed read takes nothing back
SET cd2sync.feed_max_pending = 2;
SELECT name, pending > 2 AS over, status FROM cd2sync.feeds ORDER BY name;
-- (a transaction that may not mark it, a standby's or REPEATABLE READ, finds
-- it stale all the same, and marks nothing: no WARNING)
BEGIN READ ONLY;
SELECT count(*) FROM cd2_feed_read('all_tables');
ROLLBACK;
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) FROM cd2_feed_read('all_tables');
ROLLBACK;
SELECT count(*) FROM cd2_feed_read('all_tables');
SELECT name, status FROM cd2sync.feeds ORDER BY name;
SELECT name, status, last_error FROM cd2sync.monitoring WHERE kind = 'feed' ORDER BY name;
RESET cd2sync.feed_max_pending;

-- a feed that falls behind is stale: a WARNING, reading it is an error, the
-- others go on; its triggers go when no other feed follows its tables
SET cd2sync.feed_max_pending = 2;
SET client_min_messages = warning;
BEGIN;
UPDATE west.users SET name = 'Cyrus' WHERE id = 5;
UPDATE east.users SET name = 'Bobby' WHERE id = 2;
SELECT cd2sync._after_apply('west', 'users', 'incremental', 2);
COMMIT;
SELECT name, pending, status FROM cd2sync.feeds ORDER BY name;
SELECT * FROM cd2_feed_read('all_tables');
SELECT count(*) FROM cd2_feed_read('sis');
RESET cd2sync.feed_max_pending;
-- a table that only a stale feed follows keeps no changes
SELECT coalesce(max(position), 0) AS before_stale FROM cd2sync.changes \gset
UPDATE east.users SET name = 'Bob' WHERE id = 2;
SELECT count(*) AS kept FROM cd2sync.changes WHERE position > :before_stale;
SELECT cd2_drop_feed('all_tables');
SELECT tgrelid::regclass, tgname FROM pg_trigger WHERE tgname LIKE 'cd2_feed%' ORDER BY 1, 2;

-- a TRUNCATE of a followed table deletes its rows from the feeds
BEGIN;
TRUNCATE east.enrollments;
SELECT table_name, op, key, instance, cause FROM cd2_feed_read('sis') ORDER BY position;
ROLLBACK;

-- a statement's many changes are all there when it ends, in the order of
-- its rows; a subtransaction rolled back takes its own changes with it
BEGIN;
INSERT INTO east.enrollments SELECT 1000 + g, 2, 100, 'bulk' FROM generate_series(1, 2500) g;
SELECT count(*), count(DISTINCT key),
       bool_and(next_id > (key->>'id')::bigint) AS in_row_order
  FROM (SELECT key, lead((key->>'id')::bigint, 1, 1e15::bigint) OVER (ORDER BY position) AS next_id
          FROM cd2_feed_read('sis', 100000) WHERE "row"->>'state' = 'bulk') c;
SAVEPOINT s;
UPDATE east.enrollments SET state = 'gone' WHERE id > 1000;
ROLLBACK TO s;
UPDATE east.enrollments SET state = 'bulk2' WHERE id BETWEEN 1001 AND 1010;
SELECT op, "row"->>'state' AS state, count(*), min(changed::text) AS changed
  FROM cd2_feed_read('sis', 100000) WHERE "row"->>'state' LIKE 'bulk%' OR "row"->>'state' = 'gone'
 GROUP BY 1, 2 ORDER BY 1, 2;
ROLLBACK;

-- a partitioned instance table: each partition's rows, read as the table's
-- (p2, made after a column was dropped, lays its columns out differently)
CREATE TABLE east.scores (id bigint PRIMARY KEY, x int, v text) PARTITION BY RANGE (id);
CREATE TABLE east.scores_p1 PARTITION OF east.scores FOR VALUES FROM (0) TO (100);
ALTER TABLE east.scores DROP COLUMN x;
CREATE TABLE east.scores_p2 PARTITION OF east.scores FOR VALUES FROM (100) TO (200);
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('east', 'scores', 'ok');
SELECT cd2sync.refresh_view('scores');
SELECT cd2_create_feed('marks', tables => ARRAY['scores']);
INSERT INTO east.scores VALUES (1, 'one'), (101, 'hundred and one');
UPDATE east.scores SET v = v || '!';
DELETE FROM east.scores WHERE id = 1;
SELECT op, key, "row", changed FROM cd2_feed_read('marks') ORDER BY position;
SELECT cd2_drop_feed('marks');
DELETE FROM cd2sync.table_state WHERE table_name = 'scores';
DROP TABLE east.scores CASCADE;

-- a merge gives a row one update, however many of its statements write the
-- row: Bob's submission that Bob graded, when Bob is merged into Cy
BEGIN;
CREATE TABLE east.submissions (id bigint PRIMARY KEY, user_id bigint, grader_id bigint, score numeric);
INSERT INTO east.submissions VALUES (30, 2, 2, 1.0), (31, 2, NULL, 2.0), (32, 5, NULL, 3.0);
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('east', 'submissions', 'ok');
SELECT cd2sync.refresh_view('submissions');
SELECT cd2_create_feed('subs', tables => ARRAY['submissions']);
UPDATE east.users SET workflow_state = 'deleted', merged_into_user_id = 80000000000005 WHERE id = 2;
SELECT cd2sync._after_apply('east', 'users', 'incremental', 1);
SELECT op, key, "row"->>'user_id' AS user_id, "row"->>'grader_id' AS grader_id, changed, cause
  FROM cd2_feed_read('subs') ORDER BY position;
ROLLBACK;

-- a merge pass keeps its images only in a table it made itself, never in a
-- relation of that name made before it (here a view)
BEGIN;
CREATE TEMP VIEW cd2_merge_before AS SELECT 1 AS rel;
UPDATE east.users SET workflow_state = 'deleted', merged_into_user_id = 80000000000005 WHERE id = 2;
SELECT cd2sync._after_apply('east', 'users', 'incremental', 1);
ROLLBACK;

-- a table loaded new (its first snapshot straight by COPY) gives a feed one
-- insert per row, showing the users' replacements set after the load
BEGIN;
CREATE TABLE east.submissions (id bigint PRIMARY KEY, user_id bigint, grader_id bigint, score numeric);
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('east', 'submissions', 'ok');
SELECT cd2sync.refresh_view('submissions');
SELECT cd2_create_feed('subs', tables => ARRAY['submissions']);
SELECT cd2sync._before_apply('east', 'submissions', '2026-11-03 00:00:00+00');
SELECT cd2sync._feed_load_begin('east.submissions');
INSERT INTO east.submissions VALUES (40, 1, NULL, 1.0), (41, 2, NULL, 2.0);   -- (as COPY: no replacements)
SELECT cd2sync._after_apply('east', 'submissions', 'snapshot', 2);
SELECT op, key, "row"->>'user_id' AS user_id, "row"->>'original_user_id' AS original_user_id, changed, cause
  FROM cd2_feed_read('subs') ORDER BY position;
ROLLBACK;

-- dropping an instance deletes its rows from the feeds. (The functions that
-- run as the owner begin with cd2sync's own transaction settings cleared: a
-- caller's cannot change what they write, here the changes' watermark.)
SET cd2sync_tx.applying = 'west.enrollments';
SET cd2sync_tx.watermark = '2000-01-01 00:00:00+00';
SET cd2sync_tx.merge_pass = 'on';
SELECT cd2_drop_instance('west');
RESET cd2sync_tx.applying;
RESET cd2sync_tx.watermark;
RESET cd2sync_tx.merge_pass;
SELECT table_name, op, key, instance, cause, watermark FROM cd2_feed_read('sis') ORDER BY position;
SELECT cd2_drop_feed('sis');
SELECT count(*) AS changes_left FROM cd2sync.changes;
-- (a VACUUM leaves the table its pages, for the changes to come)
VACUUM cd2sync.changes;
SELECT pg_relation_size('cd2sync.changes') > 0 AS pages_kept;
-- the pages say no row now: a reader of 2 of 3000 changes, the limits it
-- checks, and an acknowledgement touch a few of them, not all 3000 (to sort
-- them, or to find the last); and a feed with none of them pending, or
-- whose first pending change comes after them, looks through them once,
-- not at each check, read, count or acknowledgement.
-- (Counted: the changes' rows and index entries this session's
-- transaction read; none is reported to the views until it ends.)
\set touched 'pg_stat_get_xact_tuples_returned(''cd2sync.changes''::regclass) + pg_stat_get_xact_tuples_fetched(''cd2sync.changes''::regclass) + pg_stat_get_xact_tuples_returned(''cd2sync.changes_pkey''::regclass)'
SELECT cd2_create_feed('probe', tables => ARRAY['enrollments']);
SELECT cd2_create_feed('quiet', tables => ARRAY['users']);
SELECT cd2_create_feed('sparse', tables => ARRAY['courses']);
SELECT acknowledged AS quiet_ack FROM cd2sync.feed WHERE name = 'quiet' \gset
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), 'probe', 'enrollments', 'insert', jsonb_build_object('id', i),
       'east', jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 3000) i;
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
VALUES (nextval('cd2sync.change_position_seq'), 'sparse', 'courses', 'insert', '{"id": 7}', 'east', '{"id": 7}', 'sync');
BEGIN READ ONLY;   -- (reads, and writes nothing: not an error)
SELECT count(*) FROM cd2_feed_read('quiet');
SELECT scanned_to IS NULL AS not_yet FROM cd2sync.feed_hint WHERE name = 'quiet';
COMMIT;
SELECT count(*) FROM cd2_feed_read('quiet');
SELECT count(*) FROM cd2_feed_read('sparse');
BEGIN;
SELECT :touched AS before \gset
SELECT key FROM cd2_feed_read('probe', 2) ORDER BY position;
SELECT cd2_feed_ack('probe', (SELECT max(position) FROM cd2_feed_read('probe', 2)));
SELECT count(*) FROM cd2_feed_read('quiet');
SELECT key FROM cd2_feed_read('sparse');
SELECT name, pending FROM cd2sync.feeds WHERE name IN ('quiet', 'sparse') ORDER BY name;
SELECT :touched - :before < 100 AS touched_few;
COMMIT;
-- (what it knows is no acknowledgement; a change after reaches it)
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
VALUES (nextval('cd2sync.change_position_seq'), 'quiet', 'users', 'insert', '{"id": 1}', 'east', '{"id": 1}', 'sync');
SELECT name, acknowledged = :quiet_ack AS ack_kept, pending FROM cd2sync.feeds ORDER BY name;
BEGIN;
SELECT :touched AS before \gset
SELECT key FROM cd2_feed_read('quiet');
SELECT cd2_feed_ack('quiet', (SELECT max(position) FROM cd2_feed_read('quiet')));
SELECT :touched - :before < 100 AS touched_few;
COMMIT;
SELECT cd2_drop_feed('probe'), cd2_drop_feed('quiet'), cd2_drop_feed('sparse');
-- a feed with 10 changes pending 3000 positions behind, over a limit of
-- 1000: a check counts its changes once, later checks only after what it
-- counted; an acknowledgement keeps the count true, and the limit holds
SELECT cd2_create_feed('lag', tables => ARRAY['terms']);
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), CASE WHEN i <= 10 THEN 'lag' ELSE 'nobody' END,
       CASE WHEN i <= 10 THEN 'terms' ELSE 'enrollments' END, 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 3010) i;
SET cd2sync.feed_max_pending = 1000;
SELECT count(*) FROM cd2_feed_read('lag', 1);
BEGIN;
SELECT :touched AS before \gset
SELECT count(*) FROM cd2_feed_read('lag', 1);
SELECT :touched - :before < 100 AS touched_few;
COMMIT;
SELECT cd2_feed_ack('lag', (SELECT max(position) FROM cd2_feed_read('lag', 3)));
BEGIN;
SELECT :touched AS before \gset
SELECT count(*) FROM cd2_feed_read('lag', 1);
SELECT :touched - :before < 100 AS touched_few;
COMMIT;
SELECT count(*) FROM cd2_feed_read('lag');
SELECT f.pending, x.counted_pending FROM cd2sync.feeds f JOIN cd2sync.feed_hint x USING (name) WHERE name = 'lag';
-- (cd2sync.feeds, which monitoring reads at each scrape, counts only after
-- the count too, and finds the oldest pending change by the key)
BEGIN;
SELECT :touched AS before \gset
SELECT pending, oldest_pending IS NOT NULL AS has_oldest, status FROM cd2sync.feeds WHERE name = 'lag';
SELECT :touched - :before < 100 AS touched_few;
COMMIT;
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), 'lag', 'terms', 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(11, 12) i;
SET cd2sync.feed_max_pending = 8;   -- (7 counted, and 2 after)
SELECT count(*) FROM cd2_feed_read('lag');
-- (marked stale, as a sync's end does: none pending, whatever was counted)
SELECT cd2sync._feed_check_limits();
RESET cd2sync.feed_max_pending;
SELECT f.pending, f.status, x.counted_from = y.acknowledged AS count_held
  FROM cd2sync.feeds f JOIN cd2sync.feed_hint x USING (name) JOIN cd2sync.feed y USING (name) WHERE name = 'lag';
SELECT cd2_drop_feed('lag');
-- acknowledged up to the last position a check counted: the count (none
-- left) still holds
SELECT cd2_create_feed('lag', tables => ARRAY['terms']);
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), CASE WHEN i <= 5 THEN 'lag' ELSE 'nobody' END,
       CASE WHEN i <= 5 THEN 'terms' ELSE 'enrollments' END, 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 3005) i;
SET cd2sync.feed_max_pending = 1000;
SELECT count(*) FROM cd2_feed_read('lag');
RESET cd2sync.feed_max_pending;
SELECT counted_pending FROM cd2sync.feed_hint WHERE name = 'lag';
SELECT cd2_feed_ack('lag', counted_to) FROM cd2sync.feed_hint WHERE name = 'lag';
SELECT x.counted_from = f.acknowledged AS valid, x.counted_pending
  FROM cd2sync.feed_hint x JOIN cd2sync.feed f USING (name, created_at);
SELECT cd2_drop_feed('lag');
SELECT count(*) AS changes_left FROM cd2sync.changes;
-- (a feed's hints go with it)
SELECT count(*) AS hints_left FROM cd2sync.feed_hint;
-- a sweep reads the changes it deletes once, and takes its bound once:
-- with the table's statistics saying no row (emptied and vacuumed, then
-- filled, as after a consumer caught up), the planner joined each change
-- to the ones to delete, read again for each, the bound taken again (and
-- compiled by JIT) each time: a drop of a feed ran for minutes
-- (autovacuum, kept off meanwhile, would correct the statistics)
ALTER TABLE cd2sync.changes SET (autovacuum_enabled = false);
VACUUM cd2sync.changes;
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), 'nobody', 'terms', 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 3000) i;
SELECT cd2_create_feed('sweeper', tables => ARRAY['terms']);
BEGIN;
SELECT :touched AS before \gset
SELECT cd2_drop_feed('sweeper');   -- (the last feed: every change goes)
SELECT :touched - :before < 20000 AS touched_once;
COMMIT;
ALTER TABLE cd2sync.changes RESET (autovacuum_enabled);
SELECT count(*) AS changes_left FROM cd2sync.changes;
-- a feed far behind, under its limit: a sync's check counts it once, and
-- cd2sync.feeds counts only after that at each read (it counted the whole
-- backlog each time)
SELECT cd2_create_feed('backlog', tables => ARRAY['terms']);
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), NULL, 'terms', 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 2000) i;
SELECT setval('cd2sync.change_position_seq', nextval('cd2sync.change_position_seq') + 200000) > 0 AS far;
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
VALUES (nextval('cd2sync.change_position_seq'), NULL, 'terms', 'insert', '{"id": 0}', 'east', '{"id": 0}', 'sync');
SELECT cd2sync._feed_check_limits();   -- (as at a sync's end)
BEGIN;
SELECT :touched AS before \gset
SELECT pending, status FROM cd2sync.feeds WHERE name = 'backlog';
SELECT :touched - :before < 100 AS touched_few;
COMMIT;
SELECT cd2_drop_feed('backlog');
-- an acknowledgement deletes nothing; a sweep deletes what it covered that
-- no other feed waits for, asking which feeds wait inline, not by a call
-- for each change
SELECT cd2_create_feed('aw', tables => ARRAY['terms']);
SELECT cd2_create_feed('aw_behind', tables => ARRAY['terms']);
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), NULL, 'terms', 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 500) i;
-- (a read and the view ask which changes are the feed's inline too: _feed_has)
BEGIN;
SET LOCAL track_functions = 'all';
SELECT count(*) AS read FROM cd2_feed_read('aw_behind', 1000);
SELECT pending FROM cd2sync.feeds WHERE name = 'aw_behind';
SELECT coalesce(max(calls), 0) < 100 AS no_call_per_change FROM pg_stat_xact_user_functions;
COMMIT;
SELECT cd2_feed_ack('aw', (SELECT max(position) FROM cd2sync.changes));
SELECT cd2_feed_ack('aw_behind', (SELECT max(position) - 100 FROM cd2sync.changes));
SELECT count(*) AS kept FROM cd2sync.changes;
BEGIN;
SET LOCAL track_functions = 'all';
SELECT cd2sync._feed_sweep(1000) AS swept;   -- (aw_behind waits for the last 100)
SELECT coalesce(max(calls), 0) < 100 AS no_call_per_change FROM pg_stat_xact_user_functions;
COMMIT;
SELECT count(*) AS kept FROM cd2sync.changes;
SELECT cd2_drop_feed('aw'), cd2_drop_feed('aw_behind');
-- a feed marked stale before a sweep took what it acknowledged: the mark
-- forgets from where sweeps left it (another feed behind, on another table,
-- keeps the sweep from deleting below it; the other feed on the table
-- acknowledged everything)
SELECT cd2_create_feed('h1', tables => ARRAY['courses']);
SELECT cd2_create_feed('f1', tables => ARRAY['terms']);
SELECT cd2_create_feed('g1', tables => ARRAY['terms']);
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
VALUES (nextval('cd2sync.change_position_seq'), NULL, 'courses', 'insert', '{"id": 1}', 'east', '{"id": 1}', 'sync');
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), NULL, 'terms', 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(1, 10) i;
SELECT cd2_feed_ack('g1', (SELECT max(position) FROM cd2sync.changes));
SELECT cd2sync._feed_sweep() AS swept;   -- (f1 waits for them)
SELECT cd2_feed_ack('f1', (SELECT max(position) FROM cd2sync.changes));
INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
SELECT nextval('cd2sync.change_position_seq'), NULL, 'terms', 'insert', jsonb_build_object('id', i), 'east',
       jsonb_build_object('id', i), 'sync'
  FROM generate_series(11, 13) i;
SELECT cd2_feed_ack('g1', (SELECT max(position) FROM cd2sync.changes));
SET cd2sync.feed_max_pending = 2;
SELECT cd2sync._feed_check_limits();
RESET cd2sync.feed_max_pending;
SELECT name, status, pending FROM cd2sync.feeds ORDER BY name;
SELECT table_name, count(*) AS kept FROM cd2sync.changes GROUP BY 1;
SELECT cd2_drop_feed('h1'), cd2_drop_feed('f1'), cd2_drop_feed('g1');
SELECT count(*) AS changes_left FROM cd2sync.changes;
-- a sweep with nothing to delete (no change at all) takes no lock on the
-- changes that a sync's capture would wait for until this transaction ends
BEGIN;
SELECT cd2sync._feed_sweep() AS swept;
SELECT count(*) AS locks_held FROM pg_locks
 WHERE relation = 'cd2sync.changes'::regclass AND pid = pg_backend_pid() AND mode = 'RowExclusiveLock';
COMMIT;
-- no JIT where a plan type is turned off (the costs it adds made a small
-- query look worth compiling, at each call) nor in what cd2sync.feeds
-- counts at each read (a third of the changes, the planner guesses)
SELECT p.proname AS compiles FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE (n.nspname = 'cd2sync' OR (n.nspname = 'public' AND p.proname LIKE 'cd2\_%'))
   AND (p.proname = '_feed_pending' OR EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c ~ '^enable_.*=off$'))
   AND NOT 'jit=off' = ANY (coalesce(p.proconfig, '{}'))
 ORDER BY 1;
-- the index on global ids beside a user's index follows a new shard, and
-- goes with the shard
CREATE INDEX enr_course ON east.enrollments (course_id);
SELECT cd2sync.refresh_view('enrollments');
SELECT cd2_alter_instance('east', shard_id => 9);
SELECT pg_get_indexdef('east.enrollments_course_id_global'::regclass) LIKE '%90000000000000%' AS follows_shard;
SELECT cd2_alter_instance('east', shard_id => NULL);
SELECT to_regclass('east.enrollments_course_id_global') IS NULL AS gone;
SELECT cd2_drop_instance('east', drop_data => true);
DROP SCHEMA west CASCADE;
DROP ROLE feed_admin, feed_reader, nobody;

-- a feed's image of a row is to_jsonb's, key for key and value for value,
-- for every kind of column (cd2sync._row_image, in C)
CREATE TYPE pg_temp.mood AS ENUM ('sad', 'ok');
CREATE TYPE pg_temp.pair AS (x int, y text);
CREATE DOMAIN pg_temp.score AS numeric(6, 2);
CREATE TEMP TABLE images (
    id bigint, i2 smallint, i4 integer, f4 real, f8 double precision, n numeric, d pg_temp.score,
    b boolean, t text, vc varchar(5), c char(3), ts timestamp, tz timestamptz, dt date, tm time,
    u uuid, j jsonb, js json, e pg_temp.mood, a bigint[], ta text[], p pg_temp.pair, "a key" oid,
    "Ü" text, x text);
ALTER TABLE images DROP COLUMN x;
INSERT INTO images VALUES
    (1, -32768, 2147483647, 1.5, 1e300, 12345678901234567890.123, 12.5, true, 'a "q" \ é 🎓', 'abc',
     'ab', '2026-11-01 04:05:06.789', '2026-11-01 04:05:06+02', '2026-11-01', '12:34:56', gen_random_uuid(),
     '{"b": [1, {"c": null}], "a": 1.50}', '{"z": 1, "z": 2}', 'ok', '{1,NULL,3}', '{{a,b},{c,d}}', ROW(1, 'y'),
     42, 'ü'),
    (2, 0, -1, 'NaN', '-Infinity', 'NaN', -0.5, false, '', '', '', 'infinity', '-infinity', '-infinity',
     '00:00', NULL, '"scalar"', '[]', 'sad', '{}', '{}', ROW(NULL, NULL), 0, NULL),
    (3, NULL, NULL, '-0', 1.0e-7, 0.000, NULL, NULL, NULL, NULL, NULL, '0044-03-15 BC', NULL, NULL, NULL, NULL,
     'null', 'null', NULL, NULL, NULL, NULL, NULL, NULL),
    (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '7', '3.0',
     NULL, NULL, NULL, NULL, NULL, NULL);
SELECT id, cd2sync._row_image(m) = to_jsonb(m) AS same, cd2sync._row_image(m)::text = to_jsonb(m)::text AS same_text
  FROM images m ORDER BY id;
SELECT cd2sync._row_image(m) FROM images m WHERE id = 3;
-- each key found as in to_jsonb's (its offsets right), past 32 columns too
SELECT count(*) AS keys, bool_and(cd2sync._row_image(m) -> k IS NOT DISTINCT FROM to_jsonb(m) -> k) AS same
  FROM images m, jsonb_object_keys(to_jsonb(m)) k;
DO $$
BEGIN
    EXECUTE 'CREATE TEMP TABLE wide AS SELECT '
            || (SELECT string_agg(format('%s::%s AS c%s', CASE WHEN i % 3 = 0 THEN i::text
                                                               WHEN i % 3 = 1 THEN quote_literal(repeat('x', i))
                                                               ELSE 'NULL' END,
                                         CASE i % 3 WHEN 0 THEN 'bigint' WHEN 1 THEN 'text' ELSE 'float8' END, i), ', ')
                  FROM generate_series(1, 70) i);
END $$;
SELECT count(*) AS keys, bool_and(cd2sync._row_image(w) -> k IS NOT DISTINCT FROM to_jsonb(w) -> k) AS same,
       bool_and(cd2sync._row_image(w)::text = to_jsonb(w)::text) AS same_text
  FROM wide w, jsonb_object_keys(to_jsonb(w)) k;

