-- cd2sync 1.2 -> 1.3. Every object 1.3 adds or changes, as the install
-- script (src/sql/*.sql) makes it; t/012_upgrade.pl checks that an updated
-- database and a fresh install of 1.3 have the same objects. Nothing a user
-- calls changes:
-- * cd2sync.progress reads what sync workers publish in shared memory
--   (cd2sync._progress()) instead of parsing their pg_stat_activity text.
-- * The instance's sync lock has one owner, cd2sync._sync_lock, which the
--   sync worker calls too; the table-name rule one, cd2sync._check_tables,
--   which cd2_sync_now calls too.
\echo Use "ALTER EXTENSION cd2sync UPDATE TO '1.3'" to load this file. \quit

CREATE OR REPLACE FUNCTION cd2sync._progress(OUT pid int, OUT run_id bigint, OUT instance text,
                                  OUT table_name text, OUT phase text, OUT objects_done int,
                                  OUT objects_total int, OUT bytes_downloaded bigint,
                                  OUT bytes_decoded bigint, OUT records bigint)
RETURNS SETOF record LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'cd2_progress';

CREATE OR REPLACE FUNCTION cd2sync._check_tables(tables text[])
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad text;
BEGIN
    IF tables IS NOT NULL THEN
        IF cardinality(tables) = 0 THEN
            RAISE EXCEPTION 'tables must name at least one table, or be NULL for every table'
                  USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT coalesce(quote_literal(t), 'NULL') INTO bad
          FROM unnest(tables) t WHERE t IS NULL OR t !~ '^[A-Za-z0-9_]{1,63}$' LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'invalid table name % in tables', bad
                  USING ERRCODE = 'invalid_parameter_value',
                        DETAIL = 'CD2 table names are made of letters, digits and underscores.';
        END IF;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._sync_lock(instance text, hold text)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k int := hashtext(instance);
BEGIN
    CASE hold
    WHEN 'try_xact' THEN RETURN pg_try_advisory_xact_lock(52517, k);
    WHEN 'try_run' THEN RETURN pg_try_advisory_lock(52517, k);
    WHEN 'run' THEN PERFORM pg_advisory_lock(52517, k); RETURN true;
    END CASE;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._try_lock_instance(instance text)
RETURNS boolean LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT cd2sync._sync_lock(instance, 'try_xact')
$$;

CREATE OR REPLACE VIEW cd2sync.progress AS
    SELECT p.pid, p.run_id, p.instance, p.table_name, p.phase, p.objects_done, p.objects_total,
           p.bytes_downloaded, p.bytes_decoded, p.records,
           coalesce(l.started_at, r.started_at) AS started_at
      FROM cd2sync._progress() p
      LEFT JOIN cd2sync.runs r ON r.run_id = p.run_id
      LEFT JOIN cd2sync.sync_log l ON l.run_id = p.run_id AND l.table_name = p.table_name;

REVOKE ALL ON FUNCTION cd2sync._sync_lock(text, text), cd2sync._progress() FROM PUBLIC;
