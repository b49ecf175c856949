-- sync.sql: starting syncs, and reading watermarks.

-- The tables the API lists in a namespace (as the API names them)
CREATE FUNCTION cd2sync._remote_tables(api_url text, client_id text, client_secret text,
                                       namespace text DEFAULT 'canvas')
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
         WHERE cd2sync._covers(i.tables, t.name)
           AND NOT EXISTS (SELECT 1 FROM cd2sync.table_state s
                            WHERE s.instance = i.name AND s.table_name = t.name))
    SELECT CASE WHEN bool_or(watermark IS NULL) THEN NULL ELSE min(watermark) END FROM wanted
$$;


-- The namespaces a run must list to know its tables: those whose tables an
-- entry stands for ("ns.*"; no entry: every canvas table), and those of
-- tables asked for that the configuration names only through such an entry.
CREATE FUNCTION cd2sync._listings_needed(configured text[], asked text[])
RETURNS text[] LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT cd2sync._namespace_of(t) ORDER BY cd2sync._namespace_of(t)), '{}')
      FROM unnest(coalesce(asked, configured, '{canvas.*}')) t
     WHERE cd2sync._is_wildcard(t) OR (asked IS NOT NULL AND NOT t = ANY (coalesce(configured, '{}')))
$$;

-- The tables a run syncs: asked, else configured, else every canvas table,
-- "ns.*" replaced by what the API lists in ns (listed_ns[i] lists listed[i]).
-- An entry of a namespace that could not be listed (failed_ns[i]) comes
-- back with its error; a table asked for that the API does not list fails
-- the run.
CREATE FUNCTION cd2sync._tables_to_sync(configured text[], asked text[], listed_ns text[],
                                        listed text[], failed_ns text[], failed_error text[],
                                        failed_code text[])
RETURNS TABLE (table_name text, error text, error_code text)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    ns text;
    l text;
    k int;
    checked boolean;
    seen text[] := '{}';
    missing text[] := '{}';
BEGIN
    FOREACH t IN ARRAY coalesce(asked, configured, '{canvas.*}') LOOP
        ns := cd2sync._namespace_of(t);
        -- (what the configuration names only through "ns.*" must be listed)
        checked := cd2sync._is_wildcard(t) OR (asked IS NOT NULL AND NOT t = ANY (coalesce(configured, '{}')));
        k := array_position(failed_ns, ns);
        IF checked AND k IS NOT NULL THEN
            table_name := t;
            error := failed_error[k];
            error_code := failed_code[k];
            RETURN NEXT;
        ELSIF cd2sync._is_wildcard(t) THEN
            FOR l IN SELECT x.l FROM unnest(listed_ns, listed) x(n, l)
                      WHERE x.n = ns AND NOT cd2sync._qualified(ns, x.l) = ANY (seen) LOOP
                table_name := cd2sync._qualified(ns, l);
                seen := seen || table_name;
                -- (a name the API lists is a table's name in its namespace: a
                -- dot in it would make another namespace's, or another
                -- instance's, schema its place)
                IF l ~ '^[A-Za-z0-9_]{1,63}$' THEN
                    error := NULL;
                    error_code := NULL;
                ELSE
                    error := format('the API lists a table name cd2sync does not take: %s', table_name);
                    error_code := '22023';
                END IF;
                RETURN NEXT;
            END LOOP;
        ELSIF checked AND NOT EXISTS (SELECT 1 FROM unnest(listed_ns, listed) x(n, l)
                                       WHERE x.n = ns AND x.l = cd2sync._remote_name(t)) THEN
            missing := missing || t;
        ELSIF NOT t = ANY (seen) THEN
            seen := seen || t;
            table_name := t;
            error := NULL;
            error_code := NULL;
            RETURN NEXT;
        END IF;
    END LOOP;
    IF cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'the CD2 API does not list table(s) %', array_to_string(missing, ', ')
              USING ERRCODE = 'undefined_table';
    END IF;
END $$;
