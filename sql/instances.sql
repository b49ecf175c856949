-- cd2_add_instance / cd2_alter_instance / cd2_drop_instance: arguments,
-- errors with their SQLSTATE, nothing half-created.
\set VERBOSITY sqlstate
-- an API that is never reached: only syncs and table checks contact it
SELECT cd2_add_instance('inst1', 'us-east-1#abc', 's3cret', api_url => 'http://127.0.0.1:9');
SELECT name, client_id, api_url, tables, shard_id, schedule, target_schema FROM cd2sync.instances;
SELECT cd2_add_instance(name => 'inst2', client_id => 'id2', client_secret => 'x',
                        api_url => 'http://127.0.0.1:9/', shard_id => 7,
                        schedule => interval '1 hour', target_schema => 'canvas_two');
-- default api_url
SELECT cd2_add_instance('inst3', 'id3', 'x');
SELECT name, api_url, shard_id, schedule, target_schema FROM cd2sync.instances ORDER BY name;

-- bad names: 22023
SELECT cd2_add_instance('Inst', 'id', 'x');
SELECT cd2_add_instance('1abc', 'id', 'x');
SELECT cd2_add_instance('a-b', 'id', 'x');
SELECT cd2_add_instance(repeat('a', 49), 'id', 'x');
SELECT cd2_add_instance(NULL, 'id', 'x');
-- a name of 48 characters is fine
SELECT cd2_add_instance(repeat('a', 48), 'id', 'x', api_url => 'http://127.0.0.1:9');
-- duplicate: 42710
SELECT cd2_add_instance('inst1', 'id', 'x');
-- empty or NULL credentials: 22023
SELECT cd2_add_instance('inst4', '', 'x');
SELECT cd2_add_instance('inst4', 'id', NULL);
-- bad URL
SELECT cd2_add_instance('inst4', 'id', 'x', api_url => 'ftp://example.com');
SELECT cd2_add_instance('inst4', 'id', 'x', api_url => 'not a url');
-- negative or zero schedule
SELECT cd2_add_instance('inst4', 'id', 'x', schedule => interval '-1 hour');
SELECT cd2_add_instance('inst4', 'id', 'x', schedule => interval '0');
SELECT cd2_add_instance('inst4', 'id', 'x', full_resync_every => interval '-1 day');
-- negative shard
SELECT cd2_add_instance('inst4', 'id', 'x', shard_id => -1);
-- bad or empty table lists
SELECT cd2_add_instance('inst4', 'id', 'x', tables => ARRAY[]::text[]);
SELECT cd2_add_instance('inst4', 'id', 'x', tables => ARRAY['users; drop table x']);
SELECT cd2_add_instance('inst4', 'id', 'x', tables => ARRAY[NULL]::text[]);
-- bad target schemas: 3F000
SELECT cd2_add_instance('inst4', 'id', 'x', target_schema => 'cd2sync');
SELECT cd2_add_instance('inst4', 'id', 'x', target_schema => 'pg_catalog');
SELECT cd2_add_instance('inst4', 'id', 'x', target_schema => 'public');
-- a target schema already taken: 42P06
SELECT cd2_add_instance('inst4', 'id', 'x', target_schema => 'canvas_two');
SELECT cd2_add_instance('canvas_two', 'id', 'x');
-- a schema another role owns: 42501 (its tables' triggers would run as
-- cd2sync's owner); one a superuser made is cd2sync's to use
CREATE ROLE someone;
CREATE SCHEMA theirs AUTHORIZATION someone;
SELECT cd2_add_instance('inst4', 'id', 'x', target_schema => 'theirs');
SELECT cd2_add_instance('theirs', 'id', 'x');
-- nothing was half-created
SELECT count(*) AS instances, (SELECT count(*) FROM cd2sync.instance_secrets) AS secrets
  FROM cd2sync.instances;

-- tables the API cannot be asked about: a warning (01000), the tables are kept
SELECT cd2_add_instance('inst5', 'id', 'x', api_url => 'http://127.0.0.1:9',
                        tables => ARRAY['users', 'courses', 'users']);
SELECT tables FROM cd2sync.instances WHERE name = 'inst5';

-- alter: arguments not given keep their value
SELECT cd2_alter_instance('inst2', schedule => interval '4 hours');
SELECT name, client_id, api_url, shard_id, schedule, target_schema FROM cd2sync.instances WHERE name = 'inst2';
-- given as NULL, they go back to the defaults
SELECT cd2_alter_instance('inst2', schedule => NULL, shard_id => NULL);
SELECT shard_id, schedule FROM cd2sync.instances WHERE name = 'inst2';
SELECT cd2_alter_instance('inst2', shard_id => 12, client_secret => 'new secret');
SELECT shard_id FROM cd2sync.instances WHERE name = 'inst2';
SELECT client_secret FROM cd2sync.instance_secrets WHERE instance = 'inst2';
-- changing the target schema renames the synced data's schema
CREATE SCHEMA canvas_two;
CREATE TABLE canvas_two.users (id bigint PRIMARY KEY);
SELECT cd2_alter_instance('inst2', target_schema => 'canvas_2');
SELECT target_schema FROM cd2sync.instances WHERE name = 'inst2';
SELECT to_regclass('canvas_2.users') IS NOT NULL AS moved;
-- alter errors
SELECT cd2_alter_instance('nope', schedule => interval '1 hour');
SELECT cd2_alter_instance('inst2', schedule => interval '-5 minutes');
SELECT cd2_alter_instance('inst2', full_resync_every => interval '0');
-- periodic full resyncs: set, kept when not given, reset by NULL
SELECT cd2_alter_instance('inst2', full_resync_every => interval '7 days');
SELECT cd2_alter_instance('inst2', schedule => interval '2 hours');
SELECT full_resync_every FROM cd2sync.instances WHERE name = 'inst2';
SELECT cd2_alter_instance('inst2', full_resync_every => NULL);
SELECT full_resync_every FROM cd2sync.instances WHERE name = 'inst2';
SELECT cd2_alter_instance('inst2', api_url => 'gopher://x');
SELECT cd2_alter_instance('inst2', client_id => '');
SELECT cd2_alter_instance('inst2', target_schema => 'inst1');
SELECT cd2_alter_instance('inst2', tables => ARRAY['bad name']);
SELECT schedule, target_schema FROM cd2sync.instances WHERE name = 'inst2';

-- drop
SELECT cd2_drop_instance('nope');
SELECT cd2_drop_instance('inst2', drop_data => NULL);
SELECT cd2_drop_instance('inst2');
SELECT to_regclass('canvas_2.users') IS NOT NULL AS data_kept;
SELECT cd2_add_instance('inst2', 'id2', 'x', target_schema => 'canvas_2');
SELECT cd2_drop_instance('inst2', drop_data => true);
SELECT to_regnamespace('canvas_2') IS NULL AS schema_dropped;
SELECT count(*) FROM cd2sync.instance_secrets WHERE instance = 'inst2';
-- a schema that changed hands is neither renamed nor dropped
SELECT cd2_add_instance('inst2', 'id2', 'x', target_schema => 'canvas_2');
CREATE SCHEMA canvas_2;
ALTER SCHEMA canvas_2 OWNER TO someone;
SELECT cd2_alter_instance('inst2', target_schema => 'canvas_3');
SELECT cd2_drop_instance('inst2', drop_data => true);
SELECT cd2_drop_instance('inst2');
SELECT nspname, nspowner::regrole FROM pg_namespace WHERE nspname = 'canvas_2';
DROP SCHEMA theirs, canvas_2;
DROP ROLE someone;
