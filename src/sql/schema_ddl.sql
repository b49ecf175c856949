-- schema_ddl.sql: from a CD2 table schema (JSON Schema) to PostgreSQL DDL.
--
-- The mapping is the one of shared/docs/cd2-api.md section 4. Every remote
-- name reaches SQL through format('%I') or quote_literal: never spliced.

-- The schema object of a property, with a local "$ref" resolved.
CREATE FUNCTION cd2sync._resolve_ref(root jsonb, prop jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ref text := prop->>'$ref';
    depth int := 0;
BEGIN
    WHILE ref IS NOT NULL AND ref LIKE '#/%' AND depth < 16 LOOP
        prop := root #> string_to_array(substr(ref, 3), '/');
        ref := prop->>'$ref';
        depth := depth + 1;
    END LOOP;
    RETURN coalesce(prop, '{}');
END $$;

-- The enum type name for a column: <table>__<column>, kept unique within
-- PostgreSQL's 63-byte limit.
CREATE FUNCTION cd2sync._enum_type_name(table_name text, column_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN octet_length(table_name || '__' || column_name) <= 63
                THEN table_name || '__' || column_name
                ELSE left(table_name || '__' || column_name, 50) || '_'
                     || left(md5(table_name || '__' || column_name), 12) END
$$;

-- The PostgreSQL type of one property. enum_type is the (qualified, quoted)
-- enum type to use when the property is an enum of strings.
CREATE FUNCTION cd2sync._pg_type(root jsonb, prop jsonb, enum_type text)
RETURNS text LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p jsonb := cd2sync._resolve_ref(root, prop);
    t text;
    fmt text := p->>'format';
    item jsonb;
BEGIN
    -- "type" may be a list such as ["string", "null"]
    IF jsonb_typeof(p->'type') = 'array' THEN
        SELECT x INTO t FROM jsonb_array_elements_text(p->'type') x WHERE x <> 'null' LIMIT 1;
    ELSE
        t := p->>'type';
    END IF;

    IF t IS NULL AND coalesce(p->'oneOf', p->'anyOf') IS NOT NULL THEN
        -- a oneOf of strings is text; of anything else, jsonb
        IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(p->'oneOf', p->'anyOf')) o
                        WHERE cd2sync._resolve_ref(root, o)->>'type' IS DISTINCT FROM 'string') THEN
            RETURN 'text';
        END IF;
        RETURN 'jsonb';
    END IF;

    IF t = 'string' AND jsonb_typeof(p->'enum') = 'array' AND enum_type IS NOT NULL THEN
        RETURN enum_type;
    END IF;

    RETURN CASE t
        WHEN 'integer' THEN CASE fmt WHEN 'int16' THEN 'smallint' WHEN 'int32' THEN 'integer'
                                     ELSE 'bigint' END
        WHEN 'number' THEN CASE fmt WHEN 'float32' THEN 'real' ELSE 'double precision' END
        WHEN 'string' THEN CASE
            WHEN fmt = 'date-time' THEN 'timestamp without time zone'
            WHEN fmt = 'date' THEN 'date'
            WHEN fmt = 'time' THEN 'time without time zone'
            WHEN fmt = 'uuid' THEN 'uuid'
            WHEN (p->>'maxLength') ~ '^[0-9]+$' AND (p->>'maxLength')::bigint BETWEEN 1 AND 10485760
                THEN format('character varying(%s)', p->>'maxLength')
            ELSE 'text' END
        WHEN 'boolean' THEN 'boolean'
        WHEN 'object' THEN 'jsonb'
        WHEN 'array' THEN (
            SELECT CASE WHEN it IN ('jsonb') OR it LIKE '%[]' OR it = enum_type THEN 'jsonb'
                        ELSE it || '[]' END
              FROM cd2sync._pg_type(root, coalesce(p->'items', '{}'), NULL) it)
        ELSE 'jsonb' END;
END $$;

-- The columns a CD2 schema describes, key columns first, in the order the
-- document lists them (json, not jsonb, keeps that order).
CREATE FUNCTION cd2sync._schema_columns(target_schema text, table_name text, doc json)
RETURNS TABLE (ord int, column_name text, type_sql text, is_key boolean,
               not_null boolean, enum_values text[], description text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root_json json := coalesce(doc->'schema', doc);
    root jsonb := root_json::jsonb;
    part text;
    obj json;
    prop record;
    p jsonb;
    n int := 0;
    place record := cd2sync._table_place(target_schema, table_name);
BEGIN
    FOREACH part IN ARRAY ARRAY['key', 'value'] LOOP
        obj := root_json->'properties'->part;
        IF obj IS NOT NULL AND obj::jsonb ? '$ref' THEN
            obj := cd2sync._resolve_ref(root, obj::jsonb)::json;
        END IF;
        FOR prop IN SELECT e.key, e.value FROM json_each(coalesce(obj->'properties', '{}')) WITH ORDINALITY e(key, value, i)
                     ORDER BY e.i LOOP
            p := cd2sync._resolve_ref(root, prop.value::jsonb);
            n := n + 1;
            ord := n;
            column_name := prop.key;
            is_key := part = 'key';
            not_null := is_key OR coalesce(obj::jsonb->'required' ? prop.key, false);
            enum_values := NULL;
            IF p->>'type' = 'string' AND jsonb_typeof(p->'enum') = 'array' THEN
                SELECT array_agg(x ORDER BY i) INTO enum_values
                  FROM jsonb_array_elements_text(p->'enum') WITH ORDINALITY v(x, i);
            END IF;
            type_sql := cd2sync._pg_type(root, p,
                format('%I.%I', place.schema_name, cd2sync._enum_type_name(place.rel_name, prop.key)));
            description := p->>'description';
            RETURN NEXT;
        END LOOP;
    END LOOP;
END $$;

-- Whether changing a column from old_type to new_type loses no value:
-- integers to wider integers, real to double precision, varchar to a longer
-- varchar or text.
CREATE FUNCTION cd2sync._is_widening(old_type text, new_type text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN old_type = 'smallint' THEN new_type IN ('integer', 'bigint')
        WHEN old_type = 'integer' THEN new_type = 'bigint'
        WHEN old_type = 'real' THEN new_type = 'double precision'
        WHEN old_type LIKE 'character varying(%)' THEN
            new_type = 'text' OR (new_type LIKE 'character varying(%)' AND
                substring(new_type FROM '\((\d+)\)')::int >= substring(old_type FROM '\((\d+)\)')::int)
        ELSE false END
$$;

-- The views that use column col of rel, and every view built on those, with
-- their depth: a view comes deeper than every view it uses.
CREATE FUNCTION cd2sync._dependent_views(rel regclass, col text)
RETURNS TABLE (view_oid oid, depth int)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    WITH RECURSIVE d(oid, depth) AS (
        SELECT r.ev_class, 1
          FROM pg_attribute a
          JOIN pg_depend dep ON dep.refclassid = 'pg_class'::regclass AND dep.refobjid = a.attrelid
                            AND dep.refobjsubid = a.attnum AND dep.classid = 'pg_rewrite'::regclass
          JOIN pg_rewrite r ON r.oid = dep.objid
         WHERE a.attrelid = rel AND a.attname = col AND r.ev_class <> rel
        UNION ALL
        SELECT r.ev_class, d.depth + 1
          FROM d
          JOIN pg_depend dep ON dep.refclassid = 'pg_class'::regclass AND dep.refobjid = d.oid
                            AND dep.classid = 'pg_rewrite'::regclass
          JOIN pg_rewrite r ON r.oid = dep.objid
         WHERE r.ev_class <> d.oid AND d.depth < 32
    )
    SELECT oid, max(depth)::int FROM d GROUP BY oid
$$;

-- Changes the type of a column that views may use: those views (and the
-- views on them) are dropped and created again from their definitions, with
-- their options, owner, grants and comments; the reconciled view cd2.<table>
-- is rebuilt for the new type. using_null: the column's values are dropped
-- (the table is about to be reloaded); via_text: converted through their
-- text (a value that does not convert raises); else by the assignment cast
-- (a widening: no rewrite where the types are binary compatible). Raises,
-- changing nothing, when a view
-- cannot be created again (it uses the column in a way the new type does not
-- allow) or is something this cannot rebuild (a materialized view, a view
-- with triggers or rules, a view other objects depend on).
CREATE FUNCTION cd2sync._alter_column_type(rel regclass, col text, new_type text, using_null boolean,
                                            via_text boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v record;
    saved jsonb[] := '{}';
    s jsonb;
    g jsonb;
    -- the table's reconciled view (cd2.<table>, cd2_<ns>.<table>)
    recon regclass := (SELECT w.view FROM cd2sync._rel_table(rel) t
                         JOIN cd2sync._views() w ON w.table_name = t.table_name);
BEGIN
    FOR v IN SELECT c.oid, c.relkind, format('%I.%I', n.nspname, c.relname) AS name,
                    c.oid IS NOT DISTINCT FROM recon AS reconciled
               FROM cd2sync._dependent_views(rel, col) d
               JOIN pg_class c ON c.oid = d.view_oid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY d.depth DESC, c.oid LOOP
        IF v.relkind <> 'v' OR EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = v.oid)
           OR EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = v.oid AND rulename <> '_RETURN')
           OR EXISTS (SELECT 1 FROM pg_attrdef WHERE adrelid = v.oid)
           OR EXISTS (SELECT 1 FROM pg_depend WHERE objid = v.oid AND deptype = 'e') THEN
            RAISE EXCEPTION '% uses column % of %, and cd2sync cannot create it again', v.name, col, rel
                  USING ERRCODE = 'feature_not_supported';
        END IF;
        saved := saved || jsonb_strip_nulls(jsonb_build_object(
            'name', v.name,
            'reconciled', v.reconciled,
            'def', pg_get_viewdef(v.oid),
            'options', (SELECT string_agg(format('%s=%L', split_part(o, '=', 1), substr(o, strpos(o, '=') + 1)), ', ')
                          FROM pg_class c, unnest(c.reloptions) o WHERE c.oid = v.oid),
            'owner', (SELECT quote_ident(pg_get_userbyid(relowner)) FROM pg_class WHERE oid = v.oid),
            'grants', (SELECT jsonb_agg(jsonb_build_object(
                                  'grantee', CASE WHEN x.grantee = 0 THEN 'PUBLIC'
                                                  ELSE quote_ident(pg_get_userbyid(x.grantee)) END,
                                  'privilege', x.privilege_type, 'grantable', x.is_grantable))
                         FROM pg_class c, aclexplode(c.relacl) x WHERE c.oid = v.oid),
            'column_grants', (SELECT jsonb_agg(jsonb_build_object(
                                  'column', a.attname,
                                  'grantee', CASE WHEN x.grantee = 0 THEN 'PUBLIC'
                                                  ELSE quote_ident(pg_get_userbyid(x.grantee)) END,
                                  'privilege', x.privilege_type, 'grantable', x.is_grantable))
                                FROM pg_attribute a, aclexplode(a.attacl) x
                               WHERE a.attrelid = v.oid AND a.attnum > 0 AND a.attacl IS NOT NULL),
            'comment', obj_description(v.oid, 'pg_class'),
            'column_comments', (SELECT jsonb_object_agg(attname, col_description(v.oid, attnum))
                                  FROM pg_attribute
                                 WHERE attrelid = v.oid AND attnum > 0
                                   AND col_description(v.oid, attnum) IS NOT NULL)));
        EXECUTE format('DROP VIEW %s', v.name);
    END LOOP;

    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I TYPE %s%s', rel, col, new_type,
                   CASE WHEN using_null THEN format(' USING NULL::%s', new_type)
                        WHEN via_text THEN format(' USING %I::text::%s', col, new_type) ELSE '' END);

    -- shallowest first: each view finds the views it uses
    FOR i IN REVERSE cardinality(saved) .. 1 LOOP
        s := saved[i];
        IF (s->>'reconciled')::boolean THEN
            -- built anew for the new type; the grants of users are given back
            PERFORM cd2sync.refresh_view((cd2sync._rel_table(rel)).table_name);
        ELSE
            EXECUTE format('CREATE VIEW %s%s AS %s', s->>'name',
                           CASE WHEN s ? 'options' THEN format(' WITH (%s)', s->>'options') ELSE '' END,
                           s->>'def');
            EXECUTE format('ALTER VIEW %s OWNER TO %s', s->>'name', s->>'owner');
        END IF;
        FOR g IN SELECT * FROM jsonb_array_elements(coalesce(s->'grants', '[]')) LOOP
            EXECUTE format('GRANT %s ON %s TO %s%s', g->>'privilege', s->>'name', g->>'grantee',
                           CASE WHEN (g->>'grantable')::boolean THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        FOR g IN SELECT * FROM jsonb_array_elements(coalesce(s->'column_grants', '[]')) LOOP
            EXECUTE format('GRANT %s (%I) ON %s TO %s%s', g->>'privilege', g->>'column', s->>'name',
                           g->>'grantee',
                           CASE WHEN (g->>'grantable')::boolean THEN ' WITH GRANT OPTION' ELSE '' END);
        END LOOP;
        IF s->>'comment' IS NOT NULL THEN
            EXECUTE format('COMMENT ON VIEW %s IS %L', s->>'name', s->>'comment');
        END IF;
        FOR g IN SELECT jsonb_build_object('c', key, 'v', value) FROM jsonb_each_text(coalesce(s->'column_comments', '{}')) LOOP
            EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', s->>'name', g->>'c', g->>'v');
        END LOOP;
    END LOOP;
END $$;

-- The columns whose type changed upstream in a way that cannot be applied
-- in place (not a widening): column -> new type, or NULL if none.
CREATE FUNCTION cd2sync._pending_types(target_schema text, table_name text, doc json)
RETURNS jsonb LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_object_agg(s.column_name, s.type_sql)
      FROM cd2sync._schema_columns(target_schema, table_name, doc) s
      JOIN pg_attribute a ON a.attrelid = cd2sync._instance_rel(target_schema, table_name)
                         AND a.attname = s.column_name AND NOT a.attisdropped
     WHERE format_type(a.atttypid, a.atttypmod) <> s.type_sql
       AND NOT cd2sync._is_widening(format_type(a.atttypid, a.atttypmod), s.type_sql)
$$;

-- Before a fresh snapshot is applied (it is in the staging table already):
-- gives the columns waiting for a type change their new types. The table's
-- rows are deleted first, in the snapshot's transaction, so no value needs
-- converting; readers wait for that transaction (ALTER TABLE locks the
-- table) and then see the new rows. Returns how many rows were deleted, or
-- NULL when the table was not emptied: no type was pending; or a view on a
-- column cannot be created again, in which case the table keeps its types,
-- with a warning, and the change is not asked for again; or the table is a
-- log, which keeps its history (the API holds only its last days): each
-- column's stored values are converted through their text, and a column
-- whose values do not all convert is kept beside the new one, renamed
-- cd2_<column>_before_<day> (bookkeeping: no sync writes it, the views do
-- not show it), with a warning; the new one is empty until rows fill it.
-- Other errors (a lock timeout, a deadlock) fail the table sync, and the
-- next one tries again.
CREATE FUNCTION cd2sync._apply_pending_types(instance text, table_name text, target regclass)
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    pending jsonb;
    c record;
    n bigint;
    kept text;   -- (a log's column whose values do not convert)
BEGIN
    SELECT s.pending_types INTO pending FROM cd2sync.table_state s
     WHERE s.instance = _apply_pending_types.instance AND s.table_name = _apply_pending_types.table_name
       FOR UPDATE;
    IF pending IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE cd2sync.table_state s SET pending_types = NULL
     WHERE s.instance = _apply_pending_types.instance AND s.table_name = _apply_pending_types.table_name;
    PERFORM set_config('cd2sync_tx.cause', 'resync', true);   -- what feeds say of it
    BEGIN
        IF cd2sync._log_column(target) IS NOT NULL THEN
            -- (an ALTER fires no trigger: the change feeds following it get
            -- a delete of each row before and an insert after, as a reload
            -- gives them)
            PERFORM cd2sync._feed_capture_table(target, 'old');
            FOR c IN SELECT key, value FROM jsonb_each_text(pending) ORDER BY key LOOP
                BEGIN
                    PERFORM cd2sync._alter_column_type(target, c.key, c.value, false, true);
                EXCEPTION WHEN data_exception THEN
                    IF c.key = ANY (cd2sync._key_columns(target)) THEN
                        RAISE EXCEPTION 'key column % of % cannot change type: %', c.key, target, SQLERRM
                              USING ERRCODE = 'feature_not_supported';
                    END IF;
                    kept := left(format('cd2_%s_before_%s', c.key, to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')), 60);
                    IF cd2sync._has_column(target, kept) THEN   -- (changed twice the same day)
                        kept := kept || '_' || (SELECT min(x) FROM generate_series(2, 99) x
                                                 WHERE NOT cd2sync._has_column(target, kept || '_' || x));
                    END IF;
                    EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', target, c.key, kept);
                    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL', target, kept);
                    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', target, c.key, c.value);
                    PERFORM cd2sync.refresh_view((cd2sync._rel_table(target)).table_name);
                    RAISE WARNING 'cd2sync: column %.% becomes % upstream, and stored values do not convert (%): they are kept in column %',
                          target, c.key, c.value, SQLERRM, kept;
                END;
            END LOOP;
            PERFORM cd2sync._feed_capture_table(target, 'new');
            RETURN NULL;
        END IF;
        EXECUTE format('DELETE FROM %s', target);
        GET DIAGNOSTICS n = ROW_COUNT;
        -- (the load into the emptied table is a reload too: _apply)
        PERFORM set_config('cd2sync_tx.reloading', target::text, true);
        FOR c IN SELECT key, value FROM jsonb_each_text(pending) ORDER BY key LOOP
            PERFORM cd2sync._alter_column_type(target, c.key, c.value, true);
        END LOOP;
        RETURN n;
    EXCEPTION WHEN feature_not_supported OR dependent_objects_still_exist
                   OR syntax_error_or_access_rule_violation THEN
        RAISE WARNING 'cd2sync: table % keeps its column types (upstream: %): %', target, pending, SQLERRM
              USING HINT = 'Values that do not fit a stored type fail their table.';
        RETURN NULL;
    END;
END $$;

-- ---------------------------------------------------------------------------
-- Logs: the tables of namespace canvas_logs (web_logs). The API keeps only
-- the last 30 days of them; cd2sync keeps their history, partitioned by
-- request time, a partition per day (made ahead of the rows; a default
-- partition takes any other, settled into its own after the load), aged out
-- by whole partitions (an instance's keep_logs), never by DELETE.
-- ---------------------------------------------------------------------------

-- The column a CD2 table is partitioned by: for a table of namespace
-- canvas_logs whose schema has a request time ("timestamp", a date-time),
-- that column; else NULL. Decided when the table is made: then
-- _log_column says it from the table.
CREATE FUNCTION cd2sync._log_column_of(table_name text, doc json)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.column_name FROM cd2sync._schema_columns('', table_name, doc) s
     WHERE cd2sync._namespace_of(table_name) = 'canvas_logs' AND s.column_name = 'timestamp'
       AND NOT s.is_key AND s.type_sql = 'timestamp without time zone'
$$;

-- The column a table of cd2sync's is partitioned by (its request time), or
-- NULL for a table that is not a log
CREATE FUNCTION cd2sync._log_column(rel regclass)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.attname::text FROM pg_partitioned_table p
      JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = rel AND p.partstrat = 'r' AND p.partnatts = 1
$$;

-- The partitions of a log, with the day each holds (NULL: the default one)
CREATE FUNCTION cd2sync._log_partitions(rel regclass)
RETURNS TABLE (part regclass, day timestamp)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass,
           CASE WHEN pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
                THEN (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamp END
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = rel
$$;

-- Makes the partition of a log for one day, unless it has one; rows of
-- that day in the default partition (a load put them there) move into it,
-- straight, and unseen by the change feeds (which saw them go in already:
-- the view's rows do not change).
CREATE FUNCTION cd2sync._make_partition(rel regclass, of_day timestamp)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    col text := cd2sync._log_column(rel);
    sch text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
    tab text := (SELECT relname FROM pg_class WHERE oid = rel);
    def regclass := (SELECT x.part FROM cd2sync._log_partitions(rel) x WHERE x.day IS NULL);
    d timestamp := date_trunc('day', of_day);
    cols text := (SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) FROM pg_attribute
                   WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped);
    quiet text := current_setting('cd2sync_tx.quiet_instance', true);
BEGIN
    IF EXISTS (SELECT 1 FROM cd2sync._log_partitions(rel) p WHERE p.day = d) THEN
        RETURN false;
    END IF;
    IF def IS NOT NULL THEN
        -- (the partitions' capture triggers pass the move over)
        PERFORM set_config('cd2sync_tx.quiet_instance', (cd2sync._rel_table(rel)).instance, true);
        -- (a partition cannot be made while the default one holds its rows)
        EXECUTE format('CREATE TEMP TABLE cd2_strays ON COMMIT DROP AS
                        WITH m AS (DELETE FROM %1$s WHERE %2$I >= %3$L AND %2$I < %4$L RETURNING *)
                        SELECT * FROM m', def, col, d, d + interval '1 day');
    END IF;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)', sch,
                   left(tab, 53) || to_char(d, '_pYYYYMMDD'), rel, d, d + interval '1 day');
    IF def IS NOT NULL THEN
        EXECUTE format('INSERT INTO %I.%I (%s) SELECT %s FROM cd2_strays', sch,
                       left(tab, 53) || to_char(d, '_pYYYYMMDD'), cols, cols);
        DROP TABLE cd2_strays;
        PERFORM set_config('cd2sync_tx.quiet_instance', coalesce(quiet, ''), true);
    END IF;
    RETURN true;
END $$;

-- Makes the partitions of a log for the days from lo to hi that have none
CREATE FUNCTION cd2sync._ensure_partitions(rel regclass, lo timestamp, hi timestamp)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d timestamp;
    made int := 0;
BEGIN
    IF cd2sync._log_column(rel) IS NULL OR lo IS NULL OR hi IS NULL OR hi < lo THEN
        RETURN 0;
    END IF;
    FOR d IN SELECT g FROM generate_series(date_trunc('day', lo), date_trunc('day', hi), interval '1 day') g LOOP
        made := made + cd2sync._make_partition(rel, d)::int;
    END LOOP;
    RETURN made;
END $$;

-- Moves the rows a load put in a log's default partition into partitions
-- of their own days: a partition for each day that has rows there (never
-- the days between), at most 31 a sync, the days with most rows first (a
-- source sending request times scattered over years does not make a
-- partition of each: the rest stay in the default partition, with a
-- warning, still in the table). Returns how many days.
CREATE FUNCTION cd2sync._settle_partitions(rel regclass)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    col text := cd2sync._log_column(rel);
    def regclass := (SELECT part FROM cd2sync._log_partitions(rel) WHERE day IS NULL);
    d timestamp;
    made int := 0;
    left_over bigint;
BEGIN
    IF def IS NULL THEN
        RETURN 0;
    END IF;
    FOR d IN EXECUTE format('SELECT date_trunc(''day'', %1$I) FROM %2$s GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 31',
                            col, def) LOOP
        made := made + cd2sync._make_partition(rel, d)::int;
    END LOOP;
    EXECUTE format('SELECT count(*) FROM %s', def) INTO left_over;
    IF left_over > 0 THEN
        RAISE WARNING 'cd2sync: % rows of % stay in %: their request times are spread over too many days',
              left_over, rel, def;
    END IF;
    RETURN made;
END $$;

-- The upkeep of a log around a sync, each in a short transaction of its
-- own (making or dropping a partition locks the table: never for the whole
-- load). before: the partitions of the days the new rows will have, from a
-- day before what the table held (at most the API's 30 days back) to a day
-- after the new watermark; rows of other days go to the default partition.
-- after: those moved to partitions of their days, and history older than
-- the instance's keep_logs dropped, by partition. A lock not had within a
-- few seconds leaves it to the next sync (rows stay in the default
-- partition meanwhile: still in the table).
CREATE FUNCTION cd2sync._log_upkeep(instance text, table_name text, watermark timestamptz, phase text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET lock_timeout = '5s' AS $$
DECLARE
    inst cd2sync.instances := cd2sync._check_instance(instance);
    rel regclass := cd2sync._instance_rel(inst.target_schema, table_name);
    held timestamptz := (SELECT s.watermark FROM cd2sync.table_state s
                          WHERE s.instance = _log_upkeep.instance AND s.table_name = _log_upkeep.table_name);
BEGIN
    IF rel IS NULL OR cd2sync._log_column(rel) IS NULL OR watermark IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        IF phase = 'before' THEN
            PERFORM cd2sync._ensure_partitions(rel,
                (greatest(coalesce(held, watermark - interval '31 days'), watermark - interval '31 days')
                 - interval '1 day') AT TIME ZONE 'UTC',
                (watermark + interval '1 day') AT TIME ZONE 'UTC');
        ELSE
            PERFORM cd2sync._settle_partitions(rel);
            PERFORM cd2sync._age_out(rel, inst.keep_logs, watermark AT TIME ZONE 'UTC');
        END IF;
    EXCEPTION WHEN lock_not_available THEN
        RAISE LOG 'cd2sync %.%: partitions left to the next sync: %', instance, table_name, SQLERRM;
    END;
END $$;

-- Drops the partitions of a log whose every row is older than keep before
-- upto, whole (never a DELETE). Returns how many.
CREATE FUNCTION cd2sync._age_out(rel regclass, keep interval, upto timestamp)
RETURNS int LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p record;
    n int := 0;
BEGIN
    IF keep IS NULL OR upto IS NULL THEN
        RETURN 0;
    END IF;
    FOR p IN SELECT * FROM cd2sync._log_partitions(rel) x
              WHERE x.day IS NOT NULL AND x.day + interval '1 day' <= upto - keep ORDER BY x.day LOOP
        EXECUTE format('DROP TABLE %s', p.part);
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        RAISE LOG 'cd2sync: % partitions of % older than % aged out', n, rel, keep;
    END IF;
    RETURN n;
END $$;

-- The name a new table is loaded under, in schema cd2sync_load (one per
-- instance table: its target schema and name, hashed to fit)
CREATE FUNCTION cd2sync._loading_name(target_schema text, table_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT 'load_' || md5(target_schema || '.' || table_name)
$$;

-- Drops the tables being loaded apart for an instance's tables (when its
-- data goes, or moves to another target schema)
CREATE FUNCTION cd2sync._drop_loading(target_schema text, instance text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT cd2sync._loading_rel(target_schema, s.table_name) AS rel
               FROM cd2sync.table_state s WHERE s.instance = _drop_loading.instance LOOP
        IF r.rel IS NOT NULL THEN
            EXECUTE format('DROP TABLE %s', r.rel);
        END IF;
    END LOOP;
END $$;

-- The table a new table is being loaded in, or NULL
CREATE FUNCTION cd2sync._loading_rel(target_schema text, table_name text)
RETURNS regclass LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'cd2sync_load' AND c.relname = cd2sync._loading_name(target_schema, table_name)
       AND c.relkind = 'r' AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

-- Puts a new table loaded apart in its place, in the transaction that
-- commits its watermark: its key is built (from the rows, sorted), then it
-- moves to its schema under its name, joins the reconciled view, and the
-- change feeds following it get its rows.
-- Readers saw no table until then. A key that comes twice raises 23505
-- (the caller loads it again another way). False when there is none.
CREATE FUNCTION cd2sync._finish_loading(target_schema text, table_name text, doc json)
RETURNS boolean LANGUAGE plpgsql
-- (an index's sort spills to disk beyond this: the worker's memory stays
-- bounded. 64MB lets PostgreSQL build each index with a parallel worker,
-- half of it each, where max_parallel_maintenance_workers allows one)
SET search_path = pg_catalog, pg_temp SET maintenance_work_mem = '64MB' AS $$
DECLARE
    lrel regclass := cd2sync._loading_rel(target_schema, table_name);
    place record := cd2sync._table_place(target_schema, table_name);
BEGIN
    IF lrel IS NULL THEN
        RETURN false;
    END IF;
    IF cd2sync._instance_rel(target_schema, table_name) IS NOT NULL THEN
        EXECUTE format('DROP TABLE %s', lrel);   -- (the table is there after all: that one stays)
        RETURN false;
    END IF;
    EXECUTE format('ALTER TABLE %s ADD PRIMARY KEY (%s)', lrel,
                   (SELECT string_agg(format('%I', s.column_name), ', ' ORDER BY s.ord)
                      FROM cd2sync._schema_columns(target_schema, table_name, doc) s WHERE s.is_key));
    EXECUTE format('ALTER TABLE %s SET SCHEMA %I', lrel, place.schema_name);
    EXECUTE format('ALTER TABLE %I.%I RENAME TO %I', place.schema_name,
                   cd2sync._loading_name(target_schema, table_name), place.rel_name);
    EXECUTE format('ALTER INDEX %I.%I RENAME TO %I', place.schema_name,
                   cd2sync._loading_name(target_schema, table_name) || '_pkey', left(place.rel_name, 58) || '_pkey');
    PERFORM cd2sync.refresh_view(table_name);
    -- the change feeds following it get its rows once their users'
    -- replacements are in (feeds.sql, _feed_load_begin)
    PERFORM cd2sync._feed_load_begin(lrel);
    RETURN true;
END $$;

-- Creates the target table of a CD2 table, or brings it up to a newer
-- schema: new enum types and values, new columns, widened types. A column
-- removed upstream is kept (and no longer filled) so that users' views on it
-- stay valid. Other type changes are left to _apply_pending_types.
-- Returns true when the table was created. for_load: a sync's; a new table
-- (not a log) is then made apart, in schema cd2sync_load, to be loaded there
-- and take its place complete (_finish_loading).
CREATE FUNCTION cd2sync._ensure_table(target_schema text, table_name text, doc json,
                                      for_load boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    c record;
    cols text[] := '{}';
    keys text[] := '{}';
    rel regclass;
    v text;
    created boolean := false;
    place record := cd2sync._table_place(target_schema, table_name);
    sch text := place.schema_name;   -- where the table goes (its namespace's schema)
    tab text := place.rel_name;
    logcol text := cd2sync._log_column_of(table_name, doc);   -- (a log: partitioned by it)
BEGIN
    IF octet_length(tab) > 63 OR tab = '' THEN
        RAISE EXCEPTION 'CD2 table name "%" is not a valid PostgreSQL identifier', table_name
              USING ERRCODE = 'invalid_name';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cd2sync._schema_columns(target_schema, table_name, doc) s WHERE s.is_key) THEN
        RAISE EXCEPTION 'CD2 schema of table "%" has no key columns', table_name
              USING ERRCODE = 'invalid_table_definition';
    END IF;

    -- a namespace's schema that is another instance's target schema (two
    -- instances of 1.2, when nothing kept such names apart): refused, not
    -- shared
    IF sch <> target_schema AND EXISTS (SELECT 1 FROM cd2sync.instances i WHERE i.target_schema = sch) THEN
        RAISE EXCEPTION 'schema "%" for the tables of namespace % is the target schema of instance "%"',
              sch, place.namespace, (SELECT i.name FROM cd2sync.instances i WHERE i.target_schema = sch)
              USING ERRCODE = 'duplicate_schema',
                    HINT = 'Give one of the two instances another target_schema (cd2_alter_instance).';
    END IF;
    IF to_regnamespace(quote_ident(sch)) IS NULL THEN
        EXECUTE format('CREATE SCHEMA %I', sch);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO cd2sync_reader', sch);
    END IF;
    -- only into what cd2sync owns: anyone else's table runs its triggers as us
    PERFORM cd2sync._check_schema_owner(sch);
    IF to_regclass(format('%I.%I', sch, tab)) IS DISTINCT FROM
       cd2sync._instance_rel(target_schema, table_name) THEN
        RAISE EXCEPTION 'relation %.% is not a table of cd2sync''s', quote_ident(sch), quote_ident(tab)
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Another role owns it, or it is not a table: cd2sync neither writes nor reads it.';
    END IF;

    FOR c IN SELECT * FROM cd2sync._schema_columns(target_schema, table_name, doc) ORDER BY ord LOOP
        IF octet_length(c.column_name) > 63 OR c.column_name = '' OR c.column_name LIKE 'cd2\_%' THEN
            RAISE EXCEPTION 'CD2 column name "%" of table "%" is not usable as a PostgreSQL column',
                  c.column_name, table_name USING ERRCODE = 'invalid_name';
        END IF;
        IF c.enum_values IS NOT NULL THEN
            IF to_regtype(c.type_sql) IS NULL THEN
                EXECUTE format('CREATE TYPE %s AS ENUM (%s)', c.type_sql,
                               (SELECT string_agg(quote_literal(x), ', ') FROM unnest(c.enum_values) x));
            ELSE
                FOREACH v IN ARRAY c.enum_values LOOP
                    EXECUTE format('ALTER TYPE %s ADD VALUE IF NOT EXISTS %L', c.type_sql, v);
                END LOOP;
            END IF;
        END IF;
        cols := cols || format('%I %s%s', c.column_name, c.type_sql,
                               CASE WHEN c.not_null OR c.column_name = logcol THEN ' NOT NULL' ELSE '' END);
        IF c.is_key THEN
            keys := keys || format('%I', c.column_name);
        END IF;
    END LOOP;

    rel := to_regclass(format('%I.%I', sch, tab));
    IF rel IS NOT NULL AND for_load AND cd2sync._loading_rel(target_schema, table_name) IS NOT NULL THEN
        -- (what a load of it left apart, before the table was there)
        EXECUTE format('DROP TABLE %s', cd2sync._loading_rel(target_schema, table_name));
    END IF;
    IF rel IS NULL AND for_load AND logcol IS NULL THEN
        -- a new table is loaded apart, without its key (built after the rows,
        -- as pg_restore does), where readers do not see it; what a run that
        -- stopped midway left there goes first
        IF to_regnamespace('cd2sync_load') IS NULL THEN
            CREATE SCHEMA cd2sync_load;
        END IF;
        PERFORM cd2sync._check_schema_owner('cd2sync_load');
        EXECUTE format('DROP TABLE IF EXISTS cd2sync_load.%I', cd2sync._loading_name(target_schema, table_name));
        EXECUTE format('CREATE TABLE cd2sync_load.%I (%s)', cd2sync._loading_name(target_schema, table_name),
                       array_to_string(cols, ', '));
        rel := format('cd2sync_load.%I', cd2sync._loading_name(target_schema, table_name))::regclass;
        created := true;
        EXECUTE format('GRANT SELECT ON %s TO cd2sync_reader', rel);
        EXECUTE format('COMMENT ON TABLE %s IS %L', rel,
                       coalesce(coalesce(doc->'schema', doc)->>'description',
                                format('CD2 table %s, synced by cd2sync', table_name)));
        -- its bookkeeping columns, and the indexes a load costs nothing to
        -- keep (they take their names with the table: _ensure_index)
        PERFORM cd2sync._ensure_bookkeeping(rel, NULL, table_name);
    ELSIF rel IS NULL THEN
        IF logcol IS NULL THEN
            EXECUTE format('CREATE TABLE %I.%I (%s, PRIMARY KEY (%s))', sch, tab,
                           array_to_string(cols, ', '), array_to_string(keys, ', '));
        ELSE
            -- a log (web_logs): its history is kept, in a partition per day of
            -- the request time. The key takes the request time too (a key of
            -- a partitioned table must hold its partition key): a request's
            -- id comes with one time, which never changes, so it is as unique.
            EXECUTE format('CREATE TABLE %I.%I (%s, PRIMARY KEY (%s, %I)) PARTITION BY RANGE (%I)', sch, tab,
                           array_to_string(cols, ', '), array_to_string(keys, ', '), logcol, logcol);
            EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.%I DEFAULT', sch, left(tab, 55) || '_default',
                           sch, tab);
            EXECUTE format('CREATE INDEX %I ON %I.%I USING brin (%I)', left(tab, 52) || '_time_brin', sch, tab,
                           logcol);
        END IF;
        rel := format('%I.%I', sch, tab)::regclass;
        created := true;
        EXECUTE format('GRANT SELECT ON %s TO cd2sync_reader', rel);
        EXECUTE format('COMMENT ON TABLE %s IS %L', rel,
                       coalesce(coalesce(doc->'schema', doc)->>'description',
                                format('CD2 table %s, synced by cd2sync', table_name)));
    ELSE
        -- new columns arrive nullable: rows already stored have no value
        FOR c IN SELECT s.* FROM cd2sync._schema_columns(target_schema, table_name, doc) s
                  WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                                     WHERE a.attrelid = rel AND a.attname = s.column_name
                                       AND NOT a.attisdropped) ORDER BY s.ord LOOP
            EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', rel, c.column_name, c.type_sql);
        END LOOP;

        -- a column whose type grew upstream is widened where no value can be
        -- lost; other type changes wait for a fresh snapshot (_pending_types)
        FOR c IN SELECT s.column_name, s.type_sql, format_type(a.atttypid, a.atttypmod) AS old_type
                   FROM cd2sync._schema_columns(target_schema, table_name, doc) s
                   JOIN pg_attribute a ON a.attrelid = rel AND a.attname = s.column_name AND NOT a.attisdropped
                  WHERE format_type(a.atttypid, a.atttypmod) <> s.type_sql LOOP
            IF cd2sync._is_widening(c.old_type, c.type_sql) THEN
                BEGIN
                    -- (a real through its text: 0.1 stays 0.1, as the view
                    -- showed it and the change feeds' images say, and as
                    -- upstream's 0.1 now arrives, not 0.10000000149011612)
                    PERFORM cd2sync._alter_column_type(rel, c.column_name, c.type_sql, false,
                                                       c.old_type = 'real');
                EXCEPTION WHEN feature_not_supported OR dependent_objects_still_exist
                               OR syntax_error_or_access_rule_violation THEN
                    -- a view that cannot be created again uses the column (other
                    -- errors, such as a lock timeout, fail the table sync: retried)
                    RAISE WARNING 'cd2sync: column %.% stays % (upstream: %): %', rel, c.column_name,
                          c.old_type, c.type_sql, SQLERRM;
                END;
            ELSE
                RAISE LOG 'cd2sync: column %.% changes type from % to %: the table will be reloaded from a fresh snapshot',
                      rel, c.column_name, c.old_type, c.type_sql;
            END IF;
        END LOOP;
    END IF;

    FOR c IN SELECT * FROM cd2sync._schema_columns(target_schema, table_name, doc)
              WHERE description IS NOT NULL LOOP
        EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', rel, c.column_name, c.description);
    END LOOP;
    RETURN created;
END $$;
