-- cd2_sync_now / cd2_sync_start: argument errors before any worker starts.
\set VERBOSITY sqlstate
SELECT * FROM cd2_sync_now('nope');
SELECT cd2_sync_start('nope');
SELECT * FROM cd2_sync_now(NULL);
SELECT * FROM cd2_sync_now('inst1', "full" => NULL);
SELECT * FROM cd2_sync_now('inst1', tables => ARRAY[]::text[]);
SELECT * FROM cd2_sync_now('inst1', tables => ARRAY[NULL]::text[]);
SELECT * FROM cd2_sync_now('inst1', tables => ARRAY['x"; drop']);
-- inst5 syncs only users and courses
SELECT * FROM cd2_sync_now('inst5', tables => ARRAY['enrollments']);
-- no run was started by any of these
SELECT count(*) FROM cd2sync.runs;
-- an API that cannot be reached fails the run with a clear error (08006)
SET cd2sync.http_retries = 1;
SET cd2sync.retry_base_delay = 10;
SELECT * FROM cd2_sync_now('inst1');
SELECT instance, status, error_code FROM cd2sync.runs;
-- a table that cannot be fetched fails alone, with the reason
SELECT table_name, mode, rows_upserted, watermark, error IS NOT NULL AS has_error
  FROM cd2_sync_now('inst5', tables => ARRAY['users']);
SELECT instance, table_name, mode, status, error_code FROM cd2sync.sync_log ORDER BY run_id, table_name;
SELECT instance, table_name, watermark, status, last_error IS NOT NULL AS has_error FROM cd2sync.watermarks;
-- a name the API lists is a table's name in its namespace: one with a dot
-- (its place would be another namespace's, or another instance's, schema)
-- or with what a table name cannot hold fails, the others sync
SELECT * FROM cd2sync._tables_to_sync(NULL, NULL, ARRAY['canvas', 'canvas', 'canvas'],
                                      ARRAY['users', 'new_new_quizzes.t', 'we"ird'], '{}', '{}', '{}');
-- and a namespace that is not one of cd2sync's has no place: its schema
-- would be another instance's (x_new's new_quizzes, here)
CREATE SCHEMA x_new_new_quizzes;
CREATE TABLE x_new_new_quizzes.t (id bigint);
SELECT cd2sync._instance_rel('x', 'new_new_quizzes.t') IS NULL AS no_place,
       cd2sync._instance_rel('x_new', 'new_quizzes.t') AS the_other_instances;
DROP SCHEMA x_new_new_quizzes CASCADE;
