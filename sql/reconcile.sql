-- reconcile.sql: the consortium layer. Global ids, the user merge resolver
-- and the reconciled views cd2.<table> over every instance.
--
-- Wording: a "reference" is a column that names a user (user_id,
-- associated_user_id, grader_id, author_id, observer_id, any *_user_id); an
-- "edge" is one piece of evidence that user A was superseded by user B; the
-- "map" is the closure of the edges (A -> final replacement), kept in an
-- indexed table so that views join it instead of walking chains per row.

-- ---------------------------------------------------------------------------
-- Global ids
-- ---------------------------------------------------------------------------

-- shard * 10^13 + id for a local id; an id >= 10^13 (already global), a
-- negative id or an instance without a shard: the id as it is.
CREATE FUNCTION cd2sync._global_id(shard bigint, id bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN shard IS NULL OR id IS NULL OR id < 0 OR id >= 10000000000000 THEN id
                ELSE shard * 10000000000000 + id END
$$;

-- The SQL expression of _global_id for a column, inlined in generated SQL.
CREATE FUNCTION cd2sync._global_expr(shard bigint, col text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN shard IS NULL THEN col
                ELSE format('CASE WHEN %1$s < 10000000000000 AND %1$s >= 0 THEN %1$s + %2$s ELSE %1$s END',
                            col, shard * 10000000000000) END
$$;

CREATE FUNCTION cd2_global_id(instance text, id bigint)
RETURNS bigint LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN cd2sync._global_id((cd2sync._check_instance(instance)).shard_id, id);
END $$;

-- Whether a column references a user
CREATE FUNCTION cd2sync._is_user_ref(col text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT col IN ('user_id', 'associated_user_id', 'grader_id', 'author_id', 'observer_id')
        OR col LIKE '%\_user\_id'
$$;

-- The instances whose target schema holds the given table, with their shards
CREATE FUNCTION cd2sync._instances_with(table_name text)
RETURNS TABLE (instance text, shard_id bigint, rel regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.name, i.shard_id, to_regclass(format('%I.%I', i.target_schema, table_name))
      FROM cd2sync.instances i
     WHERE to_regclass(format('%I.%I', i.target_schema, table_name)) IS NOT NULL
     ORDER BY i.name
$$;

-- Whether a relation has a column
CREATE FUNCTION cd2sync._has_column(rel regclass, col text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                    WHERE attrelid = rel AND attname = col AND attnum > 0 AND NOT attisdropped)
$$;

-- ---------------------------------------------------------------------------
-- The resolver
-- ---------------------------------------------------------------------------

-- Evidence CD2 does not keep: a login or enrolment whose user_id a sync
-- moved from one user to another, recorded when the sync applies it.
CREATE TABLE cd2sync.user_moves (
    instance      text NOT NULL,
    table_name    text NOT NULL,
    row_id        bigint NOT NULL,
    from_user_id  bigint NOT NULL,
    to_user_id    bigint NOT NULL,
    moved_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance, table_name, row_id, from_user_id, to_user_id)
);

-- The map: every superseded user with its final replacement.
CREATE TABLE cd2sync.user_merge_map (
    superseded_user_id  bigint PRIMARY KEY,
    replacement_user_id bigint NOT NULL,
    chain_length        int NOT NULL,
    evidence            text NOT NULL,
    merged_at           timestamptz,
    source_instance     text
);
CREATE INDEX ON cd2sync.user_merge_map (replacement_user_id);

CREATE VIEW cd2.user_merges AS
    SELECT superseded_user_id, replacement_user_id, chain_length, evidence, merged_at, source_instance
      FROM cd2sync.user_merge_map;

CREATE FUNCTION cd2_resolve_user(user_id bigint)
RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                      WHERE m.superseded_user_id = cd2_resolve_user.user_id), user_id)
$$;

-- Records the user_id moves of a staged result (pg_temp.cd2_typed) before it
-- is applied to target: pseudonyms and enrollments only.
CREATE FUNCTION cd2sync._record_user_moves(target regclass)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances;
    tab text;
    n bigint;
BEGIN
    SELECT c.relname INTO tab FROM pg_class c WHERE c.oid = target;
    IF tab NOT IN ('pseudonyms', 'enrollments') OR NOT cd2sync._has_column(target, 'user_id')
       OR NOT cd2sync._has_column(target, 'id') THEN
        RETURN 0;
    END IF;
    SELECT i.* INTO inst FROM cd2sync.instances i JOIN pg_class c ON c.oid = target
      JOIN pg_namespace s ON s.oid = c.relnamespace WHERE i.target_schema = s.nspname;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    EXECUTE format(
        'INSERT INTO cd2sync.user_moves (instance, table_name, row_id, from_user_id, to_user_id)
         SELECT %L, %L, t.id, cd2sync._global_id(%s, t.user_id), cd2sync._global_id(%s, d.user_id)
           FROM cd2_typed d JOIN %s t ON t.id = d.id
          WHERE d.cd2_action IS DISTINCT FROM ''D'' AND t.user_id <> d.user_id
         ON CONFLICT DO NOTHING',
        inst.name, tab, coalesce(inst.shard_id::text, 'NULL'), coalesce(inst.shard_id::text, 'NULL'), target);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- Recomputes the map from every instance's users, pseudonyms, enrollments
-- and the recorded moves. Runs in the transaction of the sync that changed
-- an input; writers are serialized, readers see the old map until commit.
--
-- Evidence, strongest first:
--   1 users.merged_into_user_id: a user that is deleted now, with a pointer
--     (interpreted on the old user's shard);
--   2 a recorded move of a login or enrolment from X to Y, X now deleted or
--     without an active login;
--   3 enrollments.sis_pseudonym_id: the enrolment's login now belongs to
--     another user, while the enrolled user is deleted or has no active login.
-- A user active again (a split) or a failed merge (old user active, no
-- pointer) has no edge. Chains are followed to their end; a cycle, or an
-- end that is a deleted user, gives no mapping.
CREATE FUNCTION cd2sync.refresh_user_merges()
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    r record;
    users_sql text[] := '{}';
    logins_sql text[] := '{}';
    enr_sql text[] := '{}';
    n bigint;
BEGIN
    LOCK TABLE cd2sync.user_merge_map IN EXCLUSIVE MODE;

    FOR r IN SELECT * FROM cd2sync._instances_with('users') LOOP
        IF cd2sync._has_column(r.rel, 'workflow_state') AND cd2sync._has_column(r.rel, 'merged_into_user_id') THEN
            users_sql := users_sql || format(
                'SELECT %L::text AS instance, %s AS id, u.workflow_state::text = ''deleted'' AS deleted,
                        %s AS merged_into, %s AS deleted_at FROM %s u',
                r.instance, cd2sync._global_expr(r.shard_id, 'u.id'),
                cd2sync._global_expr(r.shard_id, 'u.merged_into_user_id'),
                CASE WHEN cd2sync._has_column(r.rel, 'deleted_at') THEN 'u.deleted_at::timestamptz' ELSE 'NULL::timestamptz' END,
                r.rel);
        END IF;
    END LOOP;
    FOR r IN SELECT * FROM cd2sync._instances_with('pseudonyms') LOOP
        IF cd2sync._has_column(r.rel, 'user_id') AND cd2sync._has_column(r.rel, 'workflow_state') THEN
            logins_sql := logins_sql || format(
                'SELECT %s AS id, %s AS user_id, p.workflow_state::text = ''active'' AS active FROM %s p',
                cd2sync._global_expr(r.shard_id, 'p.id'), cd2sync._global_expr(r.shard_id, 'p.user_id'), r.rel);
        END IF;
    END LOOP;
    FOR r IN SELECT * FROM cd2sync._instances_with('enrollments') LOOP
        IF cd2sync._has_column(r.rel, 'user_id') AND cd2sync._has_column(r.rel, 'sis_pseudonym_id') THEN
            enr_sql := enr_sql || format(
                'SELECT %L::text AS instance, %s AS user_id, %s AS sis_pseudonym_id, %s AS changed_at
                   FROM %s e WHERE e.sis_pseudonym_id IS NOT NULL',
                r.instance, cd2sync._global_expr(r.shard_id, 'e.user_id'),
                cd2sync._global_expr(r.shard_id, 'e.sis_pseudonym_id'),
                CASE WHEN cd2sync._has_column(r.rel, 'updated_at') THEN 'e.updated_at::timestamptz' ELSE 'NULL::timestamptz' END,
                r.rel);
        END IF;
    END LOOP;

    IF to_regclass('pg_temp.cd2_users') IS NOT NULL THEN
        DROP TABLE pg_temp.cd2_users, pg_temp.cd2_logins, pg_temp.cd2_edges;
    END IF;
    EXECUTE 'CREATE TEMP TABLE cd2_users ON COMMIT DROP AS '
         || coalesce(nullif(array_to_string(users_sql, ' UNION ALL '), ''),
                     'SELECT NULL::text AS instance, NULL::bigint AS id, NULL::boolean AS deleted, NULL::bigint AS merged_into, NULL::timestamptz AS deleted_at WHERE false');
    EXECUTE 'CREATE TEMP TABLE cd2_logins ON COMMIT DROP AS '
         || coalesce(nullif(array_to_string(logins_sql, ' UNION ALL '), ''),
                     'SELECT NULL::bigint AS id, NULL::bigint AS user_id, NULL::boolean AS active WHERE false');
    CREATE INDEX ON cd2_users (id);
    CREATE INDEX ON cd2_logins (id);
    ANALYZE cd2_users;
    ANALYZE cd2_logins;

    -- one edge per superseded user, the strongest evidence first; a user is
    -- "gone" when deleted, or when no active login of it is known
    CREATE TEMP TABLE cd2_edges ON COMMIT DROP AS
    SELECT DISTINCT ON (superseded) superseded, replacement, evidence, merged_at, instance
      FROM (SELECT u.id AS superseded, u.merged_into AS replacement, 1 AS priority,
                   'users.merged_into_user_id' AS evidence, u.deleted_at AS merged_at, u.instance
              FROM cd2_users u
             WHERE u.deleted AND u.merged_into IS NOT NULL
            UNION ALL
            SELECT m.from_user_id, m.to_user_id, 2, m.table_name || '.user_id moved', m.moved_at, m.instance
              FROM cd2sync.user_moves m
             WHERE EXISTS (SELECT 1 FROM cd2_users u WHERE u.id = m.from_user_id AND u.deleted)
                OR NOT EXISTS (SELECT 1 FROM cd2_logins a WHERE a.user_id = m.from_user_id AND a.active)
           ) candidates
     WHERE superseded <> replacement
     ORDER BY superseded, priority, merged_at DESC NULLS LAST;

    IF cardinality(enr_sql) > 0 THEN
        EXECUTE format(
            'INSERT INTO cd2_edges
             SELECT DISTINCT ON (e.user_id) e.user_id, l.user_id, ''enrollments.sis_pseudonym_id'', e.changed_at, e.instance
               FROM (%s) e JOIN cd2_logins l ON l.id = e.sis_pseudonym_id
              WHERE l.user_id <> e.user_id
                AND NOT EXISTS (SELECT 1 FROM cd2_edges x WHERE x.superseded = e.user_id)
                AND (EXISTS (SELECT 1 FROM cd2_users u WHERE u.id = e.user_id AND u.deleted)
                     OR NOT EXISTS (SELECT 1 FROM cd2_logins a WHERE a.user_id = e.user_id AND a.active))
              ORDER BY e.user_id, e.changed_at DESC NULLS LAST',
            array_to_string(enr_sql, ' UNION ALL '));
    END IF;
    CREATE INDEX ON cd2_edges (superseded);
    ANALYZE cd2_edges;

    DELETE FROM cd2sync.user_merge_map;
    WITH RECURSIVE walk (start, cur, depth, path) AS (
        SELECT superseded, replacement, 1, ARRAY[superseded, replacement] FROM cd2_edges
        UNION ALL
        SELECT w.start, e.replacement, w.depth + 1, w.path || e.replacement
          FROM walk w JOIN cd2_edges e ON e.superseded = w.cur
         WHERE e.replacement <> ALL (w.path) AND w.depth < 64
    ), ends AS (
        SELECT DISTINCT ON (start) start, cur, depth FROM walk ORDER BY start, depth DESC
    )
    INSERT INTO cd2sync.user_merge_map
    SELECT x.start, x.cur, x.depth, e.evidence, e.merged_at, e.instance
      FROM ends x JOIN cd2_edges e ON e.superseded = x.start
     WHERE NOT EXISTS (SELECT 1 FROM cd2_edges c WHERE c.superseded = x.cur)   -- a cycle has no end
       AND NOT EXISTS (SELECT 1 FROM cd2_users u WHERE u.id = x.cur AND u.deleted);
    GET DIAGNOSTICS n = ROW_COUNT;
    -- the map changed: so may have the duplicates it reveals
    PERFORM cd2sync.refresh_merge_duplicates('enrollments');
    PERFORM cd2sync.refresh_merge_duplicates('submissions');
    RETURN n;
END $$;

-- Rows a merge left on the old user while the replacement has its own row
-- with the same natural key (see _duplicate_key): the "losing" duplicates.
CREATE TABLE cd2sync.merge_duplicates (
    instance   text NOT NULL,
    table_name text NOT NULL,
    id         bigint NOT NULL,
    PRIMARY KEY (instance, table_name, id)
);

-- Recomputes the losing duplicates of one table over every instance: a
-- semi-join of the rows on superseded users with the table's rows by
-- natural key, one pass over the table.
CREATE FUNCTION cd2sync.refresh_merge_duplicates(table_name text)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    dupkey text[] := cd2sync._duplicate_key(table_name);
    n bigint := 0;
    k bigint;
BEGIN
    DELETE FROM cd2sync.merge_duplicates d WHERE d.table_name = refresh_merge_duplicates.table_name;
    IF dupkey IS NULL THEN
        RETURN 0;
    END IF;
    FOR r IN SELECT * FROM cd2sync._instances_with(table_name) LOOP
        IF NOT (cd2sync._has_column(r.rel, 'id') AND cd2sync._has_column(r.rel, 'user_id')
                AND (SELECT bool_and(cd2sync._has_column(r.rel, c)) FROM unnest(dupkey) c)) THEN
            CONTINUE;
        END IF;
        EXECUTE format(
            'INSERT INTO cd2sync.merge_duplicates (instance, table_name, id)
             SELECT %L, %L, t.id
               FROM (SELECT t.*, m.replacement_user_id FROM %s t
                       JOIN cd2sync.user_merge_map m ON m.superseded_user_id = %s) t
              WHERE EXISTS (SELECT 1 FROM %s o
                             WHERE %s = t.replacement_user_id AND o.id <> t.id AND %s)',
            r.instance, table_name, r.rel, cd2sync._global_expr(r.shard_id, 't.user_id'), r.rel,
            cd2sync._global_expr(r.shard_id, 'o.user_id'),
            (SELECT string_agg(format('o.%1$I IS NOT DISTINCT FROM t.%1$I', c), ' AND ') FROM unnest(dupkey) c));
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END $$;

-- ---------------------------------------------------------------------------
-- Reconciled views
-- ---------------------------------------------------------------------------

-- Natural keys of rows a merge can leave doubled on the old user
CREATE FUNCTION cd2sync._duplicate_key(table_name text)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE table_name
        WHEN 'enrollments' THEN ARRAY['course_section_id', 'type', 'role_id']
        WHEN 'submissions' THEN ARRAY['assignment_id']
        END
$$;

-- (Re)creates cd2.<table>: the union over every instance that syncs it.
CREATE FUNCTION cd2sync.refresh_view(table_name text)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    cols text[];          -- the view's columns, in order (without instance)
    types jsonb := '{}';  -- column -> type (text for enums)
    r record;
    c text;
    parts text[] := '{}';
    sel text[];
    joins text[];
    j int;
    g text;
    dupkey text[] := cd2sync._duplicate_key(table_name);
    has_dup boolean;
    body text;
    vname text := format('cd2.%I', table_name);
BEGIN
    -- columns: in attnum order of each instance's table, first seen first
    SELECT array_agg(attname ORDER BY first_seen), jsonb_object_agg(attname, typ)
      INTO cols, types
      FROM (SELECT a.attname::text AS attname,
                   min(i.ord * 10000 + a.attnum) AS first_seen,
                   max(CASE WHEN t.typtype = 'e' THEN 'text' ELSE format_type(a.atttypid, a.atttypmod) END) AS typ
              FROM (SELECT rel, row_number() OVER () AS ord FROM cd2sync._instances_with(table_name)) i
              JOIN pg_attribute a ON a.attrelid = i.rel AND a.attnum > 0 AND NOT a.attisdropped
              JOIN pg_type t ON t.oid = a.atttypid
             GROUP BY a.attname) x;
    IF cols IS NULL THEN
        EXECUTE format('DROP VIEW IF EXISTS %s', vname);
        RETURN;
    END IF;
    has_dup := dupkey IS NOT NULL AND 'user_id' = ANY (cols) AND 'id' = ANY (cols)
               AND (SELECT bool_and(k = ANY (cols)) FROM unnest(dupkey) k);

    FOR r IN SELECT * FROM cd2sync._instances_with(table_name) LOOP
        sel := ARRAY[format('%L::text AS instance', r.instance)];
        joins := '{}';
        j := 0;
        FOREACH c IN ARRAY cols LOOP
            IF NOT cd2sync._has_column(r.rel, c) THEN
                sel := sel || format('NULL::%s AS %I', types->>c, c);
                IF cd2sync._is_user_ref(c) AND types->>c = 'bigint' THEN
                    sel := sel || format('NULL::bigint AS %I', 'original_' || c);
                END IF;
                CONTINUE;
            END IF;
            IF types->>c = 'bigint' AND (c = 'id' OR c LIKE '%\_id') THEN
                g := cd2sync._global_expr(r.shard_id, format('t.%I', c));
            ELSE
                g := format('t.%I::%s', c, types->>c);
            END IF;
            IF cd2sync._is_user_ref(c) AND types->>c = 'bigint' THEN
                j := j + 1;
                joins := joins || format('LEFT JOIN cd2sync.user_merge_map m%s ON m%s.superseded_user_id = %s', j, j, g);
                sel := sel || format('coalesce(m%s.replacement_user_id, %s) AS %I', j, g, c)
                           || format('%s AS %I', g, 'original_' || c);
            ELSE
                sel := sel || format('%s AS %I', g, c);
            END IF;
        END LOOP;
        IF has_dup THEN
            -- a row left on a superseded user while the replacement has its own
            -- (computed with the map: cd2sync.merge_duplicates)
            sel := sel || 'd.id IS NOT NULL AS cd2_merge_duplicate'::text;
            joins := joins || format('LEFT JOIN cd2sync.merge_duplicates d ON d.instance = %L AND d.table_name = %L AND d.id = t.id',
                                     r.instance, table_name);
        END IF;
        parts := parts || format('SELECT %s FROM %s t %s', array_to_string(sel, ', '), r.rel,
                                 array_to_string(joins, ' '));
    END LOOP;

    body := array_to_string(parts, E'\nUNION ALL\n');
    BEGIN
        EXECUTE format('CREATE OR REPLACE VIEW %s AS %s', vname, body);
    EXCEPTION WHEN invalid_table_definition OR feature_not_supported OR datatype_mismatch THEN
        -- columns changed in a way CREATE OR REPLACE cannot follow
        BEGIN
            EXECUTE format('DROP VIEW IF EXISTS %s', vname);
            EXECUTE format('CREATE VIEW %s AS %s', vname, body);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE WARNING 'cd2sync: view % kept as it was: other views depend on it', vname
                  USING HINT = 'Drop the dependent views, then SELECT cd2sync.refresh_views().';
        END;
    END;
    -- synced data: readable by cd2sync_reader, never by PUBLIC
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', vname);
    EXECUTE format('GRANT SELECT ON %s TO cd2sync_reader', vname);
    EXECUTE format('COMMENT ON VIEW %s IS %L', vname,
                   format('CD2 table %s over every cd2sync instance, global ids, users resolved through cd2.user_merges', table_name));
END $$;

-- (Re)creates every reconciled view, and drops those no instance feeds.
CREATE FUNCTION cd2sync.refresh_views()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT DISTINCT s.table_name FROM cd2sync.table_state s
              UNION SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'cd2' AND c.relkind = 'v' AND c.relname <> 'user_merges'
                       AND c.relname <> 'reconciliation_health' LOOP
        PERFORM cd2sync.refresh_view(t);
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------
-- Health: what reconciliation cannot settle yet (it drops nothing; it tells)
-- ---------------------------------------------------------------------------

CREATE FUNCTION cd2sync.reconciliation_health()
RETURNS TABLE (instance text, table_name text, column_name text, unknown_users bigint,
               unknown_shards bigint, waiting_merges bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    a record;
    g text;
    users_sql text;
BEGIN
    SELECT string_agg(format('SELECT %s AS id FROM %s u', cd2sync._global_expr(x.shard_id, 'u.id'), x.rel), ' UNION ALL ')
      INTO users_sql FROM cd2sync._instances_with('users') x;
    FOR r IN SELECT i.name, i.shard_id, c.oid::regclass AS rel, c.relname::text AS tab
               FROM cd2sync.instances i JOIN pg_namespace n ON n.nspname = i.target_schema
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'r' ORDER BY 1, 4 LOOP
        FOR a IN SELECT attname::text AS col FROM pg_attribute
                  WHERE attrelid = r.rel AND attnum > 0 AND NOT attisdropped AND atttypid = 'bigint'::regtype
                    AND (attname = 'id' OR attname LIKE '%\_id') ORDER BY attnum LOOP
            g := cd2sync._global_expr(r.shard_id, format('t.%I', a.col));
            instance := r.name;
            table_name := r.tab;
            column_name := a.col;
            EXECUTE format(
                'SELECT count(*) FILTER (WHERE %2$L::boolean AND v IS NOT NULL AND %3$s),
                        count(*) FILTER (WHERE v >= 10000000000000
                                           AND v / 10000000000000 NOT IN (SELECT shard_id FROM cd2sync.instances WHERE shard_id IS NOT NULL)),
                        count(*) FILTER (WHERE %2$L::boolean AND v IN (SELECT superseded_user_id FROM cd2sync.user_merge_map))
                   FROM (SELECT %1$s AS v FROM %4$s t) s',
                g, cd2sync._is_user_ref(a.col),
                CASE WHEN users_sql IS NULL THEN 'true'
                     ELSE format('coalesce((SELECT m.replacement_user_id FROM cd2sync.user_merge_map m WHERE m.superseded_user_id = v), v) NOT IN (%s)', users_sql) END,
                r.rel)
              INTO unknown_users, unknown_shards, waiting_merges;
            IF unknown_users + unknown_shards + waiting_merges > 0 OR a.col = 'id' THEN
                RETURN NEXT;
            END IF;
        END LOOP;
    END LOOP;
END $$;

CREATE VIEW cd2.reconciliation_health AS SELECT * FROM cd2sync.reconciliation_health();

SELECT pg_catalog.pg_extension_config_dump('cd2sync.user_moves', '');
