-- Global ids and the resolver's SQL surface (the resolver itself is tested
-- end to end in t/004_consortium.pl).
\set VERBOSITY sqlstate
SELECT cd2_global_id('nope', 42);
SELECT cd2_add_instance('shard7', 'id7', 'x', api_url => 'http://127.0.0.1:9', shard_id => 7);
SELECT cd2_global_id('shard7', 42) AS local_id,
       cd2_global_id('shard7', 30000000000042) AS already_global,
       cd2_global_id('shard7', NULL) AS null_id,
       cd2_global_id('inst3', 42) AS no_shard;
SELECT cd2_resolve_user(12345) AS unknown_user_resolves_to_itself, cd2_resolve_user(NULL);
SELECT * FROM cd2.user_merges;
\d cd2.user_merges
SELECT cd2sync._is_user_ref(c), c
  FROM unnest(ARRAY['user_id', 'associated_user_id', 'grader_id', 'author_id', 'observer_id',
                    'merged_into_user_id', 'course_id', 'id', 'user_idx']) c;
-- a reconciled view appears for a table an instance holds, and follows shard changes
CREATE SCHEMA shard7;
CREATE TABLE shard7.widgets (id bigint PRIMARY KEY, user_id bigint, owner_user_id bigint, state text);
INSERT INTO shard7.widgets VALUES (1, 2, 30000000000003, 'x');
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('shard7', 'widgets', 'ok');
SELECT cd2sync.refresh_views();
SELECT * FROM cd2.widgets;
SELECT cd2_alter_instance('shard7', shard_id => 8);
SELECT instance, id, user_id, original_user_id FROM cd2.widgets;
SELECT cd2_drop_instance('shard7', drop_data => true);
SELECT to_regclass('cd2.widgets') IS NULL AS view_gone_with_the_last_instance;
-- instances whose types differ (one widened a column before the other): the
-- view takes the type both widen to, cutting or rounding nothing; types
-- that do not widen to one another meet as text
SELECT cd2_add_instance('wa', 'idwa', 'x', api_url => 'http://127.0.0.1:9');
SELECT cd2_add_instance('wb', 'idwb', 'x', api_url => 'http://127.0.0.1:9');
CREATE SCHEMA wa;
CREATE SCHEMA wb;
CREATE TABLE wa.gadgets (id bigint PRIMARY KEY, n integer, s varchar(5), f real, code varchar(10));
CREATE TABLE wb.gadgets (id bigint PRIMARY KEY, n bigint, s varchar(20), f double precision, code bigint);
INSERT INTO wa.gadgets VALUES (1, 7, 'abcde', 0.1, 'A-1');
INSERT INTO wb.gadgets VALUES (1, 5000000000, 'abcdefghijklmnop', 0.1, 42);
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('wa', 'gadgets', 'ok'), ('wb', 'gadgets', 'ok');
SELECT cd2sync.refresh_view('gadgets');
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'cd2.gadgets'::regclass AND attnum > 0 ORDER BY attnum;
SELECT instance, n, s, f, code FROM cd2.gadgets ORDER BY instance;
SELECT cd2_drop_instance('wa', drop_data => true);
SELECT cd2_drop_instance('wb', drop_data => true);
