-- cd2_watermark and cd2_consistent_watermark.
\set VERBOSITY sqlstate
SET timezone = 'UTC';
SELECT cd2_watermark('nope', 'users');
SELECT cd2_watermark('inst1', 'users');
INSERT INTO cd2sync.table_state (instance, table_name, watermark, status) VALUES
    ('inst1', 'users', '2026-11-01 04:00+00', 'ok'),
    ('inst1', 'courses', '2026-11-01 02:00+00', 'ok'),
    ('inst3', 'users', '2026-11-01 03:00+00', 'ok');
SELECT cd2_watermark('inst1', 'users'), cd2_watermark('inst1', 'courses'), cd2_watermark('inst1', 'enrollments');
-- inst5 (users, courses) has no state: a consistent watermark over users must wait for it
SELECT cd2_consistent_watermark(ARRAY['users']);
DELETE FROM cd2sync.table_state WHERE instance = 'inst5';
SELECT cd2_drop_instance('inst5');
SELECT cd2_drop_instance(repeat('a', 48));
SELECT cd2_consistent_watermark(ARRAY['users']);
SELECT cd2_consistent_watermark(ARRAY['courses']);
SELECT cd2_consistent_watermark();
-- inst3 syncs every table, so courses is missing there
SELECT cd2_consistent_watermark(ARRAY['users', 'courses']);
INSERT INTO cd2sync.table_state (instance, table_name, watermark, status) VALUES
    ('inst3', 'courses', '2026-11-01 01:00+00', 'ok');
SELECT cd2_consistent_watermark(ARRAY['users', 'courses']);
SELECT * FROM cd2sync.watermarks ORDER BY instance, table_name;
