-- sync.sql: starting syncs, and reading watermarks.

CREATE FUNCTION cd2sync._remote_tables(api_url text, client_id text, client_secret text)
RETURNS text[] AS 'MODULE_PATHNAME', 'cd2_remote_tables' LANGUAGE C;

CREATE FUNCTION cd2_sync_now(name text, tables text[] DEFAULT NULL, "full" boolean DEFAULT false)
RETURNS TABLE (table_name text, mode text, rows_upserted bigint, rows_deleted bigint,
               watermark timestamptz, seconds float8, error text)
AS 'MODULE_PATHNAME', 'cd2_sync_now' LANGUAGE C CALLED ON NULL INPUT;

CREATE FUNCTION cd2_sync_start(name text, tables text[] DEFAULT NULL, "full" boolean DEFAULT false)
RETURNS bigint
AS 'MODULE_PATHNAME', 'cd2_sync_start' LANGUAGE C CALLED ON NULL INPUT;

CREATE FUNCTION cd2_watermark(instance text, table_name text)
RETURNS timestamptz LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM cd2sync._check_instance(instance);
    RETURN (SELECT s.watermark FROM cd2sync.table_state s
             WHERE s.instance = cd2_watermark.instance AND s.table_name = cd2_watermark.table_name);
END $$;

-- The point in time up to which every instance's tables (or the given
-- tables) are all synced: the least watermark, NULL while any of them has
-- none yet.
CREATE FUNCTION cd2_consistent_watermark(tables text[] DEFAULT NULL)
RETURNS timestamptz LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH wanted AS (
        -- every (instance, table) that should have a watermark
        SELECT s.instance, s.table_name, s.watermark
          FROM cd2sync.table_state s
         WHERE cd2_consistent_watermark.tables IS NULL
            OR s.table_name = ANY (cd2_consistent_watermark.tables)
        UNION ALL
        SELECT i.name, t.name, NULL
          FROM cd2sync.instances i, unnest(cd2_consistent_watermark.tables) t(name)
         WHERE (i.tables IS NULL OR t.name = ANY (i.tables))
           AND NOT EXISTS (SELECT 1 FROM cd2sync.table_state s
                            WHERE s.instance = i.name AND s.table_name = t.name))
    SELECT CASE WHEN bool_or(watermark IS NULL) THEN NULL ELSE min(watermark) END FROM wanted
$$;

