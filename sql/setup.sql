-- The extension installs cleanly, with its schemas and catalog.
CREATE EXTENSION cd2sync;
SELECT extname, extversion FROM pg_extension WHERE extname = 'cd2sync';
SELECT nspname FROM pg_namespace WHERE nspname IN ('cd2sync', 'cd2') ORDER BY 1;
-- the SQL surface of interface.md, with its argument names
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
       pg_get_function_result(p.oid) AS result
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND p.proname LIKE 'cd2\_%' ORDER BY 1;
\d cd2sync.watermarks
-- the settings, once the library is loaded
LOAD 'cd2sync';
SELECT name, setting, unit, context FROM pg_settings WHERE name LIKE 'cd2sync.%' ORDER BY 1;
-- nothing that changes configuration or starts syncs is executable by PUBLIC
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE (n.nspname = 'public' AND p.proname LIKE 'cd2\_%') OR n.nspname = 'cd2sync'
 GROUP BY 1, 2 ORDER BY 2, 1;
-- the secrets table is readable by nobody but its owner; PUBLIC reads nothing;
-- cd2sync_reader reads the history, cd2sync_admin also the configuration
CREATE ROLE cd2_nobody;
SELECT r AS role,
       has_table_privilege(r, 'cd2sync.instance_secrets', 'SELECT') AS secrets,
       has_table_privilege(r, 'cd2sync.instances', 'SELECT') AS instances,
       has_table_privilege(r, 'cd2sync.watermarks', 'SELECT') AS watermarks,
       has_table_privilege(r, 'cd2sync.sync_log', 'SELECT') AS sync_log,
       has_function_privilege(r, 'cd2_sync_now(text, text[], boolean)', 'EXECUTE') AS sync_now
  FROM unnest(ARRAY['cd2_nobody', 'cd2sync_reader', 'cd2sync_admin']) r;
