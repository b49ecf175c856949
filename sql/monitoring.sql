-- cd2sync.monitoring: a row per instance table and per feed, from a sync
-- history written here the way the worker writes it (end to end, with the
-- exporter's queries: t/014_production.pl).
\set VERBOSITY sqlstate
SET client_min_messages = warning;
SET timezone = 'UTC';
SELECT cd2_add_instance('mon', 'id-m', 'x', api_url => 'http://127.0.0.1:9', shard_id => 9);

-- an instance that has synced nothing yet: one row, name NULL
SELECT kind, instance, name, status, watermark, seconds_behind, last_success, consecutive_failures,
       last_rows, last_bytes, last_error
  FROM cd2sync.monitoring WHERE instance = 'mon';

-- users: a success then two failures; courses: a success; enrollments: never
-- a success; terms: a success and a run going on now
INSERT INTO cd2sync.table_state (instance, table_name, watermark, synced_at, status, last_error) VALUES
    ('mon', 'users', now() - interval '2 hours', now() - interval '1 hour', 'failed', 'HTTP 503'),
    ('mon', 'courses', now() - interval '30 minutes', now() - interval '20 minutes', 'ok', NULL),
    ('mon', 'enrollments', NULL, NULL, 'failed', 'bad record'),
    ('mon', 'terms', now() - interval '10 minutes', now() - interval '5 minutes', 'ok', NULL);
INSERT INTO cd2sync.sync_log (run_id, instance, table_name, mode, status, rows_upserted, rows_deleted,
                              bytes_downloaded, started_at, error) VALUES
    (9001, 'mon', 'users', 'snapshot', 'ok', 500, 0, 70000, now() - interval '3 hours', NULL),
    (9002, 'mon', 'users', 'failed', 'failed', 0, 0, 1200, now() - interval '2 hours', 'HTTP 500'),
    (9003, 'mon', 'users', 'failed', 'failed', 0, 0, 300, now() - interval '1 hour', 'HTTP 503'),
    (9001, 'mon', 'courses', 'snapshot', 'failed', 0, 0, 0, now() - interval '3 hours', 'HTTP 500'),
    (9002, 'mon', 'courses', 'incremental', 'ok', 7, 2, 900, now() - interval '2 hours', NULL),
    (9001, 'mon', 'enrollments', 'failed', 'failed', 0, 0, 0, now() - interval '3 hours', 'bad record'),
    (9001, 'mon', 'terms', 'snapshot', 'ok', 4, 0, 100, now() - interval '3 hours', NULL),
    (9004, 'mon', 'terms', NULL, 'running', 0, 0, 0, now(), NULL);
SELECT kind, instance, name, status, seconds_behind BETWEEN 0 AND 8000 AS behind,
       round(seconds_behind::numeric - extract(epoch FROM now() - watermark)) AS behind_is_age,
       last_success IS NOT NULL AS succeeded, consecutive_failures, last_rows, last_bytes, last_error
  FROM cd2sync.monitoring WHERE instance = 'mon' ORDER BY name;

-- feeds: seconds_behind is the age of the oldest pending change; the time of
-- the last acknowledgement that moved it
SELECT cd2_create_feed('mon_feed', tables => ARRAY['courses']);
SELECT kind, instance, name, status, seconds_behind, last_success, consecutive_failures, last_rows,
       last_bytes, last_error
  FROM cd2sync.monitoring WHERE kind = 'feed';
INSERT INTO cd2sync.changes (position, table_name, op, key, instance, "row", cause, committed_at)
VALUES (nextval('cd2sync.change_position_seq'), 'courses', 'insert', '{"id": 1}', 'mon', '{"id": 1}',
        'sync', now() - interval '90 seconds');
SELECT name, status, seconds_behind >= 90 AS behind, last_success, last_rows
  FROM cd2sync.monitoring WHERE kind = 'feed';
SELECT cd2_feed_ack('mon_feed', (SELECT max(position) FROM cd2sync.changes));
SELECT name, status, seconds_behind, last_success IS NOT NULL AS acknowledged, last_rows
  FROM cd2sync.monitoring WHERE kind = 'feed';

-- a monitoring role (pg_monitor) reads every figure but the error text; PUBLIC nothing
CREATE ROLE mon_exporter IN ROLE pg_monitor;
CREATE ROLE mon_nobody;
SET ROLE mon_exporter;
SELECT name, status, consecutive_failures FROM cd2sync.monitoring WHERE instance = 'mon' ORDER BY name;
SELECT kind, name, status, last_rows FROM cd2sync.monitoring WHERE kind = 'feed';
SELECT last_error FROM cd2sync.monitoring;
SET ROLE mon_nobody;
SELECT count(*) FROM cd2sync.monitoring;
RESET ROLE;

-- the history's index serves every figure, however long the history is
CREATE FUNCTION pg_temp.plan_lines(q text) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE l text;
BEGIN
    FOR l IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP RETURN NEXT l; END LOOP;
END $$;
SET enable_seqscan = off;
SELECT count(*) FILTER (WHERE l ~ 'Seq Scan on sync_log') AS history_scans,
       count(*) FILTER (WHERE l ~ 'Index.* on sync_log') AS history_index_reads
  FROM pg_temp.plan_lines('SELECT * FROM cd2sync.monitoring') l;
RESET enable_seqscan;

SELECT cd2_drop_feed('mon_feed');
SELECT cd2_drop_instance('mon');
DELETE FROM cd2sync.sync_log WHERE instance = 'mon';
DROP ROLE mon_exporter, mon_nobody;
