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

-- Whether the views show a column of this name and type as global ids
-- (_global_expr): an id, or a reference to one
CREATE FUNCTION cd2sync._shows_global(col text, typ text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT typ = 'bigint' AND (col = 'id' OR col LIKE '%\_id')
$$;

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
    SELECT i.name, i.shard_id, cd2sync._instance_rel(i.target_schema, table_name)
      FROM cd2sync.instances i
     WHERE cd2sync._instance_rel(i.target_schema, table_name) IS NOT NULL
     ORDER BY i.name
$$;

-- Whether a relation has a column
CREATE FUNCTION cd2sync._has_column(rel regclass, col text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                    WHERE attrelid = rel AND attname = col AND attnum > 0 AND NOT attisdropped)
$$;

-- The user columns of an instance table: bigint references (not cd2_ ones)
CREATE FUNCTION cd2sync._user_columns(rel regclass)
RETURNS SETOF text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.attname::text FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.atttypid = 'bigint'::regtype AND a.attname NOT LIKE 'cd2\_%'
       AND cd2sync._is_user_ref(a.attname)
     ORDER BY a.attnum
$$;

-- The bookkeeping column that keeps a user column's replacement: the final
-- replacement of the stored user when the map has one, else NULL
CREATE FUNCTION cd2sync._resolved_column(col text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT left('cd2_' || col, 63)
$$;

-- The global, resolved value of user column col of an instance table's row
-- (columns qualified by alias, if given): what cd2.<table> shows, and what
-- the column's lookup index holds
CREATE FUNCTION cd2sync._resolved_expr(shard bigint, col text, alias text DEFAULT 't')
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format('coalesce(%s%I, %s)', alias || '.', cd2sync._resolved_column(col),
                  cd2sync._global_expr(shard, format('%s%I', alias || '.', col)))
$$;

-- An index cd2sync keeps on an instance table, made again when its
-- expression changed (a new shard_id): the comment records the expression.
-- One made before the table took its name (loaded apart: _ensure_table)
-- is found by its comment and takes its name. Returns true when it was
-- (re)made.
CREATE FUNCTION cd2sync._ensure_index(rel regclass, suffix text, expr text, pred text DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text := left(format('%s_%s', (SELECT relname FROM pg_class WHERE oid = rel), suffix), 63);
    nsp text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
    idx regclass := to_regclass(format('%I.%I', nsp, name));
    want text := 'cd2sync: ' || expr || coalesce(' WHERE ' || pred, '');
    other regclass;
BEGIN
    IF idx IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_index x WHERE x.indexrelid = idx AND x.indrelid = rel
                                          AND obj_description(idx, 'pg_class') LIKE 'cd2sync: %') THEN
        -- (the name is another's: never dropped, nor taken)
        RAISE WARNING 'cd2sync: % is not an index cd2sync made on %, and keeps its name', idx, rel
              USING DETAIL = format('cd2sync''s index %s is not made.', want),
                    HINT = 'Rename or drop that relation; the next sync makes the index.';
        RETURN false;
    END IF;
    IF idx IS NOT NULL AND obj_description(idx, 'pg_class') IS NOT DISTINCT FROM want THEN
        RETURN false;
    END IF;
    IF idx IS NOT NULL THEN
        EXECUTE format('DROP INDEX %s', idx);   -- (its own, of another expression: a new shard)
    END IF;
    SELECT x.indexrelid::regclass INTO other FROM pg_index x
     WHERE x.indrelid = rel AND obj_description(x.indexrelid, 'pg_class') = want LIMIT 1;
    IF other IS NOT NULL THEN
        EXECUTE format('ALTER INDEX %s RENAME TO %I', other, name);
        RETURN false;
    END IF;
    EXECUTE format('CREATE INDEX %I ON %s ((%s))%s', name, rel, expr, coalesce(' WHERE ' || pred, ''));
    EXECUTE format('COMMENT ON INDEX %I.%I IS %L', nsp, name, want);
    RETURN true;
END $$;

-- Brings an instance table's bookkeeping up to date: for each user column c
-- a column cd2_<c> (its replacement, see _resolve_users) and an index on the
-- resolved global value (lookups by person through cd2.<table>, merges); an
-- index on the global id (lookups by id, when the instance has a shard); a
-- flag cd2_merge_duplicate on tables where a merge can leave duplicates.
-- Called when the views are made again, and after each apply.
CREATE FUNCTION cd2sync._ensure_bookkeeping(rel regclass, shard bigint, table_name text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    c text;
    rc text;
    reset boolean := false;
    has_rows boolean;
    made boolean := false;   -- an index was built here
    dupkey text[] := cd2sync._duplicate_key(table_name);
    -- statistics taken before the lookup indexes existed have none of their
    -- expressions: the planner then takes a lookup by global id for
    -- thousands of rows (and may JIT-compile it: 10 ms instead of 0.5)
    analyzed boolean := (SELECT coalesce(s.last_analyze, s.last_autoanalyze) IS NOT NULL
                           FROM pg_stat_all_tables s WHERE s.relid = rel);
BEGIN
    -- a table still empty gets its indexes after its first load: built
    -- whole then, not row by row during it (readers are not blocked); but
    -- the partial ones at once: a load fills none of their rows (cd2_<c>
    -- and the duplicate flag are set after it), and building them after
    -- would read the whole table to find nothing
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', rel) INTO has_rows;
    FOR c IN SELECT * FROM cd2sync._user_columns(rel) LOOP
        rc := cd2sync._resolved_column(c);
        IF NOT cd2sync._has_column(rel, rc) THEN
            EXECUTE format('ALTER TABLE %s ADD COLUMN %I bigint', rel, rc);
        END IF;
        IF has_rows THEN
            IF cd2sync._ensure_index(rel, c || '_resolved', cd2sync._resolved_expr(shard, c, NULL)) THEN
                reset := true;
                made := true;
            END IF;
        END IF;
        PERFORM cd2sync._ensure_index(rel, c || '_replaced', format('%I', rc), format('%I IS NOT NULL', rc));
    END LOOP;
    IF has_rows AND shard IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = rel AND attname = 'id' AND NOT attisdropped
                      AND atttypid = 'bigint'::regtype) THEN   -- (web_logs' id is a uuid)
        made := cd2sync._ensure_index(rel, 'global_id', cd2sync._global_expr(shard, 'id')) OR made;
    END IF;
    IF dupkey IS NOT NULL AND cd2sync._has_column(rel, 'id') AND cd2sync._has_column(rel, 'user_id')
       AND NOT cd2sync._has_column(rel, 'cd2_merge_duplicate') THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN cd2_merge_duplicate boolean', rel);
    END IF;
    IF cd2sync._has_column(rel, 'cd2_merge_duplicate') THEN
        PERFORM cd2sync._ensure_index(rel, 'merge_duplicates', 'id', 'cd2_merge_duplicate');
    END IF;
    PERFORM cd2sync._ensure_global_indexes(rel, shard);
    IF reset THEN
        -- new (or changed) global ids: every replacement is looked up again
        PERFORM cd2sync._resolve_users(rel, shard, NULL);
    END IF;
    -- (a table never analyzed, as after its first load, is left to
    -- autovacuum, which the load's inserts bring soon, indexes included)
    IF made AND analyzed THEN
        EXECUTE format('ANALYZE %s', rel);
    END IF;
END $$;

-- An index a user makes on an instance table serves the view's filters on
-- its column: where the view shows that column as global ids (an id
-- reference of an instance with a shard, say course_id), cd2sync keeps an
-- index on the global ids beside it (<table>_<column>_global), made by the
-- bookkeeping (the table's next sync, or cd2sync.refresh_view), made again
-- for a new shard, and dropped once no user index on the column is left.
-- (Not by an event trigger at CREATE INDEX: a restore of a dump, which
-- holds both indexes, would then make the second twice.) This is the
-- column of a user's index that wants one, or NULL: a whole (not partial),
-- valid btree index on one column, not the key, not made by cd2sync. (User
-- columns are shown resolved, and the id has its own global index:
-- cd2sync's; cd2_* columns are its bookkeeping.)
CREATE FUNCTION cd2sync._global_index_column(idx regclass)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.attname::text
      FROM pg_index x
      JOIN pg_class ic ON ic.oid = x.indexrelid
      JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
      JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
     WHERE x.indexrelid = idx AND x.indnkeyatts = 1 AND x.indexprs IS NULL AND x.indpred IS NULL
       AND x.indisvalid AND NOT x.indisprimary
       AND a.attname <> 'id' AND a.attname NOT LIKE 'cd2\_%' AND NOT cd2sync._is_user_ref(a.attname)
       AND cd2sync._shows_global(a.attname, format_type(a.atttypid, a.atttypmod))
       AND coalesce(obj_description(idx, 'pg_class'), '') NOT LIKE 'cd2sync:%'
$$;

CREATE FUNCTION cd2sync._ensure_global_indexes(rel regclass, shard bigint)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    wanted text[] := CASE WHEN shard IS NULL THEN '{}'::text[] ELSE ARRAY(
        SELECT DISTINCT s.col FROM (SELECT cd2sync._global_index_column(x.indexrelid) AS col
                                      FROM pg_index x WHERE x.indrelid = rel) s
         WHERE s.col IS NOT NULL ORDER BY 1) END;
    c text;
    r record;
BEGIN
    FOREACH c IN ARRAY wanted LOOP
        PERFORM cd2sync._ensure_index(rel, c || '_global', cd2sync._global_expr(shard, format('%I', c)));
    END LOOP;
    -- the ones beside user indexes no longer there (every one, without a shard)
    FOR r IN SELECT ic.oid::regclass AS idx
               FROM pg_index x
               JOIN pg_class ic ON ic.oid = x.indexrelid
               JOIN pg_class t ON t.oid = x.indrelid
               JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE x.indrelid = rel AND NOT a.attname = ANY (wanted)
                AND ic.relname = left(format('%s_%s_global', t.relname, a.attname), 63)
                AND obj_description(ic.oid, 'pg_class') LIKE 'cd2sync: %' LOOP
        EXECUTE format('DROP INDEX %s', r.idx);
    END LOOP;
END $$;

-- Keeps the cd2_<c> columns of an instance table equal to the map: cd2_<c>
-- holds the final replacement of the stored user (as a global id), or NULL
-- when the map has none. changes NULL: every row (a new or re-keyed
-- table); false: rows whose stored user the map has, and rows with a
-- replacement (a sync wrote rows: cost by the map's size, not the table's);
-- true: rows of the users in pg_temp.cd2_map_changes (the map changed).
-- since: with changes false, only a log's rows of requests from then on
-- (its later partitions: the rows a sync loaded) are looked up in the map
-- (rows with a replacement are few: all of them are checked, through
-- their partial index).
CREATE FUNCTION cd2sync._resolve_users(rel regclass, shard bigint, changes boolean,
                                       since timestamp DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql
-- lookups through the columns' indexes, never a scan of a large table (a
-- table just loaded has no statistics that would tell the planner so)
SET search_path = pg_catalog, pg_temp SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_seqscan = off SET jit = off AS $$
DECLARE
    c text;
    rc text;
    g text;
    n bigint := 0;
    k bigint;
    map_empty boolean := NOT EXISTS (SELECT 1 FROM cd2sync.user_merge_map);
    logcol text := cd2sync._log_column(rel);
    bound text := CASE WHEN since IS NOT NULL AND logcol IS NOT NULL
                       THEN format(' AND t.%I >= %L::timestamp', logcol, since) ELSE '' END;
BEGIN
    FOR c IN SELECT * FROM cd2sync._user_columns(rel) LOOP
        rc := cd2sync._resolved_column(c);
        IF NOT cd2sync._has_column(rel, rc) THEN
            CONTINUE;   -- not a table of cd2sync's making (see _ensure_bookkeeping)
        END IF;
        g := cd2sync._global_expr(shard, format('t.%I', c));
        IF changes THEN
            -- a row is consistent with the old map: its resolved value is the
            -- old replacement, or the user itself
            EXECUTE format('UPDATE %s t SET %I = x.new_replacement FROM pg_temp.cd2_map_changes x
                             WHERE %s = coalesce(x.old_replacement, x.superseded) AND %s = x.superseded',
                           rel, rc, cd2sync._resolved_expr(shard, c), g);
            GET DIAGNOSTICS k = ROW_COUNT;
            n := n + k;
            CONTINUE;
        END IF;
        -- (every row, changes NULL: rows without a replacement look theirs up
        -- first, then those with one are set right; a row is written once,
        -- and only if its replacement changes, or a feed would see it twice)
        IF NOT map_empty THEN
            EXECUTE format('UPDATE %s t SET %I = m.replacement_user_id FROM cd2sync.user_merge_map m
                             WHERE %s = m.superseded_user_id AND t.%I IS NULL%s',
                           rel, rc, cd2sync._resolved_expr(shard, c), rc, bound);
            GET DIAGNOSTICS k = ROW_COUNT;
            n := n + k;
        END IF;
        -- (a row's stored user changed, or its replacement did)
        EXECUTE format('UPDATE %1$s t SET %2$I = (SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                                                   WHERE m.superseded_user_id = %3$s)
                         WHERE t.%2$I IS NOT NULL
                           AND t.%2$I IS DISTINCT FROM (SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                                                         WHERE m.superseded_user_id = %3$s)',
                       rel, rc, g);
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END $$;

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
-- is applied to target: pseudonyms and enrollments only. A move made again
-- is dated again (a move back since undoes it: _refresh_user_merges).
CREATE FUNCTION cd2sync._record_user_moves(target regclass)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances;
    tab text;
    n bigint;
BEGIN
    SELECT t.table_name INTO tab FROM cd2sync._rel_table(target) t;
    IF tab IS NULL OR tab NOT IN ('pseudonyms', 'enrollments') OR NOT cd2sync._has_column(target, 'user_id')
       OR NOT cd2sync._has_column(target, 'id') THEN
        RETURN 0;
    END IF;
    SELECT i.* INTO inst FROM cd2sync.instances i JOIN cd2sync._rel_table(target) t ON t.instance = i.name;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    EXECUTE format(
        'INSERT INTO cd2sync.user_moves (instance, table_name, row_id, from_user_id, to_user_id)
         SELECT DISTINCT %L, %L, t.id, cd2sync._global_id(%s, t.user_id), cd2sync._global_id(%s, d.user_id)
           FROM cd2_typed d JOIN %s t ON t.id = d.id
          WHERE d.cd2_action IS DISTINCT FROM ''D'' AND t.user_id <> d.user_id
         ON CONFLICT (instance, table_name, row_id, from_user_id, to_user_id) DO UPDATE SET moved_at = excluded.moved_at',
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
CREATE FUNCTION cd2sync._refresh_user_merges()
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    r record;
    tb record;
    users_sql text[] := '{}';
    logins_sql text[] := '{}';
    enr_sql text[] := '{}';
    n bigint;
    pass boolean;   -- (the change feeds: one update per row it changes)
BEGIN
    -- locks in one order: a change feed's positions (a sync that wrote
    -- changes holds them), then the map
    IF EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        PERFORM cd2sync._feed_lock();
    END IF;
    LOCK TABLE cd2sync.user_merge_map IN EXCLUSIVE MODE;
    pass := cd2sync._feed_merge_begin();

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
        DROP TABLE pg_temp.cd2_users, pg_temp.cd2_logins, pg_temp.cd2_edges, pg_temp.cd2_new_map,
                   pg_temp.cd2_map_changes;
    END IF;
    CREATE TEMP TABLE cd2_new_map (LIKE cd2sync.user_merge_map) ON COMMIT DROP;
    CREATE TEMP TABLE cd2_map_changes (superseded bigint, old_replacement bigint, new_replacement bigint)
        ON COMMIT DROP;
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
             WHERE (EXISTS (SELECT 1 FROM cd2_users u WHERE u.id = m.from_user_id AND u.deleted)
                    OR NOT EXISTS (SELECT 1 FROM cd2_logins a WHERE a.user_id = m.from_user_id AND a.active))
               -- (a move the row made back since, as a split does, undoes it)
               AND NOT EXISTS (SELECT 1 FROM cd2sync.user_moves b
                                WHERE b.instance = m.instance AND b.table_name = m.table_name
                                  AND b.row_id = m.row_id AND b.from_user_id = m.to_user_id
                                  AND b.to_user_id = m.from_user_id AND b.moved_at > m.moved_at)
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

    WITH RECURSIVE walk (start, cur, depth, path) AS (
        SELECT superseded, replacement, 1, ARRAY[superseded, replacement] FROM cd2_edges
        UNION ALL
        SELECT w.start, e.replacement, w.depth + 1, w.path || e.replacement
          FROM walk w JOIN cd2_edges e ON e.superseded = w.cur
         WHERE e.replacement <> ALL (w.path) AND w.depth < 64
    ), ends AS (
        SELECT DISTINCT ON (start) start, cur, depth FROM walk ORDER BY start, depth DESC
    )
    INSERT INTO cd2_new_map
    SELECT x.start, x.cur, x.depth, e.evidence, e.merged_at, e.instance
      FROM ends x JOIN cd2_edges e ON e.superseded = x.start
     WHERE NOT EXISTS (SELECT 1 FROM cd2_edges c WHERE c.superseded = x.cur)   -- a cycle has no end
       AND NOT EXISTS (SELECT 1 FROM cd2_users u WHERE u.id = x.cur AND u.deleted);
    GET DIAGNOSTICS n = ROW_COUNT;
    CREATE INDEX ON cd2_new_map (superseded_user_id);

    -- the map changes by its difference alone: the users whose replacement
    -- changed are what the instance tables' cd2_<c> columns follow
    INSERT INTO cd2_map_changes
    SELECT coalesce(o.superseded_user_id, w.superseded_user_id), o.replacement_user_id, w.replacement_user_id
      FROM cd2sync.user_merge_map o FULL JOIN cd2_new_map w ON w.superseded_user_id = o.superseded_user_id
     WHERE o.replacement_user_id IS DISTINCT FROM w.replacement_user_id;
    DELETE FROM cd2sync.user_merge_map m
     WHERE NOT EXISTS (SELECT 1 FROM cd2_new_map w WHERE w.superseded_user_id = m.superseded_user_id);
    INSERT INTO cd2sync.user_merge_map AS m SELECT * FROM cd2_new_map
        ON CONFLICT (superseded_user_id) DO UPDATE
       SET replacement_user_id = excluded.replacement_user_id, chain_length = excluded.chain_length,
           evidence = excluded.evidence, merged_at = excluded.merged_at, source_instance = excluded.source_instance
     WHERE (m.*) IS DISTINCT FROM (excluded.*);
    IF EXISTS (SELECT 1 FROM cd2_map_changes) THEN
        PERFORM set_config('cd2sync_tx.cause', 'merge', true);   -- what feeds say of it
        FOR r IN SELECT i.name FROM cd2sync.instances i ORDER BY i.name LOOP
            IF cd2sync._resolve_due(r.name, true) THEN
                CONTINUE;   -- brought up to the new map whole, or left to its sync
            END IF;
            FOR tb IN SELECT * FROM cd2sync._instance_tables(r.name) LOOP
                PERFORM cd2sync._resolve_users(tb.rel, tb.shard_id, true);
            END LOOP;
        END LOOP;
    END IF;
    -- the map changed: so may have the duplicates it reveals
    PERFORM cd2sync._refresh_merge_duplicates('enrollments');
    PERFORM cd2sync._refresh_merge_duplicates('submissions');
    IF pass THEN
        PERFORM cd2sync._feed_merge_end();
    END IF;
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
CREATE FUNCTION cd2sync._refresh_merge_duplicates(table_name text)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    dupkey text[] := cd2sync._duplicate_key(table_name);
    n bigint := 0;
    k bigint;
    pass boolean;
BEGIN
    -- one refresh at a time: two instances' syncs ending together each
    -- deleted the set and inserted it again, and the second's insert
    -- collided with the first's (a key violation). Locks in the order
    -- _refresh_user_merges takes them (which holds both already).
    IF EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        PERFORM cd2sync._feed_lock();
    END IF;
    LOCK TABLE cd2sync.user_merge_map IN EXCLUSIVE MODE;
    DELETE FROM cd2sync.merge_duplicates d WHERE d.table_name = _refresh_merge_duplicates.table_name;
    IF dupkey IS NULL THEN
        RETURN 0;
    END IF;
    pass := cd2sync._feed_merge_begin();
    FOR r IN SELECT * FROM cd2sync._instances_with(table_name) LOOP
        IF cd2sync._has_column(r.rel, 'id') AND cd2sync._has_column(r.rel, 'user_id')
           AND (SELECT bool_and(cd2sync._has_column(r.rel, c)) FROM unnest(dupkey) c) THEN
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
        END IF;
        -- the rows' flags (what cd2.<table> shows) follow the set
        IF NOT cd2sync._resolve_due(r.instance, true) THEN
            PERFORM cd2sync._duplicate_flags(r.instance, table_name, r.rel);
        END IF;
    END LOOP;
    IF pass THEN
        PERFORM cd2sync._feed_merge_end();
    END IF;
    RETURN n;
END $$;

-- Brings the cd2_merge_duplicate flags of an instance table to the set in
-- cd2sync.merge_duplicates.
CREATE FUNCTION cd2sync._duplicate_flags(instance text, table_name text, rel regclass)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT cd2sync._has_column(rel, 'cd2_merge_duplicate') THEN
        RETURN;
    END IF;
    EXECUTE format('UPDATE %s t SET cd2_merge_duplicate = NULL
                     WHERE t.cd2_merge_duplicate
                       AND NOT EXISTS (SELECT 1 FROM cd2sync.merge_duplicates d
                                        WHERE d.instance = %L AND d.table_name = %L AND d.id = t.id)',
                   rel, instance, table_name);
    EXECUTE format('UPDATE %s t SET cd2_merge_duplicate = true FROM cd2sync.merge_duplicates d
                     WHERE d.instance = %L AND d.table_name = %L AND d.id = t.id
                       AND t.cd2_merge_duplicate IS NOT TRUE',
                   rel, instance, table_name);
END $$;

-- Instances whose rows a map or duplicates refresh could not bring up to
-- date: a sync of that instance was running (it holds row locks the refresh
-- would wait for while the sync waits for the map: a deadlock). Its run, or
-- the next refresh that can take its lock, brings them up to date.
CREATE TABLE cd2sync.resolve_due (
    instance text PRIMARY KEY,
    since    timestamptz NOT NULL DEFAULT now()
);

-- The tables of an instance, with its shard
CREATE FUNCTION cd2sync._instance_tables(instance text)
RETURNS TABLE (rel regclass, table_name text, shard_id bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass, cd2sync._qualified(x.namespace, c.relname), i.shard_id
      FROM cd2sync.instances i
     CROSS JOIN LATERAL cd2sync._instance_schemas(i.target_schema) x
      JOIN pg_namespace s ON s.nspname = x.schema_name
      JOIN pg_class c ON c.relnamespace = s.oid AND c.relkind IN ('r', 'p') AND NOT c.relispartition
     WHERE i.name = _instance_tables.instance
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(s.nspowner)
     ORDER BY c.oid
$$;

-- For a refresh about to write an instance's rows (only_lockable): when a
-- sync of it runs elsewhere, marks it due and returns true (skip it). Then,
-- or when called by the instance's own sync: when it is due, brings every
-- row of its tables to the map and the duplicates as they are now, and
-- returns true (done whole); else false. Within a merge pass (its own when
-- none is on): a row its statements write more than once, a user and a
-- grader say, gets one update in the change feeds.
CREATE FUNCTION cd2sync._resolve_due(instance text, only_lockable boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
    pass boolean;
BEGIN
    IF only_lockable AND NOT cd2sync._try_lock_instance(instance) THEN
        INSERT INTO cd2sync.resolve_due (instance) VALUES (instance) ON CONFLICT DO NOTHING;
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cd2sync.resolve_due d WHERE d.instance = _resolve_due.instance) THEN
        RETURN false;
    END IF;
    PERFORM set_config('cd2sync_tx.cause', 'merge', true);
    pass := cd2sync._feed_merge_begin();
    FOR t IN SELECT * FROM cd2sync._instance_tables(instance) LOOP
        PERFORM cd2sync._resolve_users(t.rel, t.shard_id, false);
        IF cd2sync._duplicate_key(t.table_name) IS NOT NULL THEN
            PERFORM cd2sync._duplicate_flags(instance, t.table_name, t.rel);
        END IF;
    END LOOP;
    IF pass THEN
        PERFORM cd2sync._feed_merge_end();
    END IF;
    DELETE FROM cd2sync.resolve_due d WHERE d.instance = _resolve_due.instance;
    RETURN true;
END $$;

-- The map and the duplicates recomputed on demand (what a sync's
-- transaction does by itself); the change feeds see what changes as merges.
CREATE FUNCTION cd2sync.refresh_user_merges()
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('cd2sync_tx.cause', 'merge', true);
    RETURN cd2sync._refresh_user_merges();
END $$;

CREATE FUNCTION cd2sync.refresh_merge_duplicates(table_name text)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('cd2sync_tx.cause', 'merge', true);
    RETURN cd2sync._refresh_merge_duplicates(table_name);
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

-- The columns of cd2.<table> after instance, in order (attnum order of each
-- instance's table, first seen first; cd2_ bookkeeping left out), and each
-- one's type (text for enums). NULL when no instance has the table. Where
-- instances' types differ (one widened a column before another: integer and
-- bigint, varchar(255) and varchar(1024)), the type every one of them
-- widens to (_is_widening), so that no value is cut or rounded; else text.
CREATE FUNCTION cd2sync._view_columns(table_name text, OUT cols text[], OUT types jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(attname ORDER BY first_seen), jsonb_object_agg(attname, typ)
      FROM (SELECT x.attname, x.first_seen,
                   coalesce((SELECT w FROM unnest(x.typs) w
                              WHERE NOT EXISTS (SELECT 1 FROM unnest(x.typs) o
                                                 WHERE o <> w AND NOT cd2sync._is_widening(o, w))
                              ORDER BY w LIMIT 1), 'text') AS typ
              FROM (SELECT a.attname::text AS attname,
                           min(i.ord * 10000 + a.attnum) AS first_seen,
                           array_agg(DISTINCT CASE WHEN t.typtype = 'e' THEN 'text'
                                                   ELSE format_type(a.atttypid, a.atttypmod) END) AS typs
                      FROM (SELECT rel, row_number() OVER () AS ord FROM cd2sync._instances_with(table_name)) i
                      JOIN pg_attribute a ON a.attrelid = i.rel AND a.attnum > 0 AND NOT a.attisdropped
                                         AND a.attname NOT LIKE 'cd2\_%'
                      JOIN pg_type t ON t.oid = a.atttypid
                     GROUP BY a.attname) x) y
$$;

-- The SELECT of one instance's rows as cd2.<table> shows them, reading
-- relation src (rel itself, or rows of rel's type such as a trigger's
-- transition table) as t. The one place that says how a stored row is seen:
-- the views and the change feeds both use it. columns: its columns after
-- instance.
CREATE FUNCTION cd2sync._view_select(table_name text, instance text, shard bigint, rel regclass,
                                     cols text[], types jsonb, src text,
                                     OUT sql text, OUT columns text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sel text[] := ARRAY[format('%L::text AS instance', instance)];
    c text;
    g text;
    dupkey text[] := cd2sync._duplicate_key(table_name);
BEGIN
    columns := '{}';
    FOREACH c IN ARRAY cols LOOP
        columns := columns || c;
        IF cd2sync._is_user_ref(c) AND types->>c = 'bigint' THEN
            columns := columns || ('original_' || c);
        END IF;
        IF NOT cd2sync._has_column(rel, c) THEN
            sel := sel || format('NULL::%s AS %I', types->>c, c);
            IF cd2sync._is_user_ref(c) AND types->>c = 'bigint' THEN
                sel := sel || format('NULL::bigint AS %I', 'original_' || c);
            END IF;
            CONTINUE;
        END IF;
        IF cd2sync._shows_global(c, types->>c) THEN
            g := cd2sync._global_expr(shard, format('t.%I', c));
        ELSIF types->>c = 'double precision'
              AND (SELECT a.atttypid FROM pg_attribute a
                    WHERE a.attrelid = rel AND a.attname = c AND NOT a.attisdropped) = 'real'::regtype THEN
            -- (a real not yet widened here, through its text: 0.1 shows as
            -- 0.1, as it will once widened, see _ensure_table)
            g := format('t.%I::text::double precision', c);
        ELSE
            g := format('t.%I::%s', c, types->>c);
        END IF;
        IF cd2sync._is_user_ref(c) AND types->>c = 'bigint' THEN
            -- resolved through the map (kept in cd2_<c>: _resolve_users)
            sel := sel || format('%s AS %I',
                                 CASE WHEN cd2sync._has_column(rel, cd2sync._resolved_column(c))
                                      THEN cd2sync._resolved_expr(shard, c) ELSE g END, c)
                       || format('%s AS %I', g, 'original_' || c);
        ELSE
            sel := sel || format('%s AS %I', g, c);
        END IF;
    END LOOP;
    IF dupkey IS NOT NULL AND 'user_id' = ANY (cols) AND 'id' = ANY (cols)
       AND (SELECT bool_and(k = ANY (cols)) FROM unnest(dupkey) k) THEN
        -- a row left on a superseded user while the replacement has its own
        -- (cd2sync.merge_duplicates, flagged in the row)
        sel := sel || CASE WHEN cd2sync._has_column(rel, 'cd2_merge_duplicate')
                           THEN 'coalesce(t.cd2_merge_duplicate, false) AS cd2_merge_duplicate'
                           ELSE 'false AS cd2_merge_duplicate' END;
        columns := columns || 'cd2_merge_duplicate'::text;
    END IF;
    sql := format('SELECT %s FROM %s t', array_to_string(sel, ', '), src);
END $$;

-- The reconciled views there are, with their CD2 table names
CREATE FUNCTION cd2sync._views()
RETURNS TABLE (table_name text, view regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT cd2sync._qualified(ns, c.relname), c.oid::regclass
      FROM unnest(cd2sync._namespaces()) ns
      JOIN pg_namespace n ON n.nspname = cd2sync._view_schema(ns)
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'v'
     WHERE NOT (ns = 'canvas' AND c.relname IN ('user_merges', 'reconciliation_health'))
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

-- (Re)creates cd2.<table> (cd2_<ns>.<table> for a table of namespace ns):
-- the union over every instance that syncs it, after bringing each instance
-- table's bookkeeping up to date.
CREATE FUNCTION cd2sync.refresh_view(table_name text)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    v record;
    r record;
    parts text[] := '{}';
    body text;
    vs text := (cd2sync._view_name(table_name)).schema_name;
    vname text := format('%I.%I', vs, (cd2sync._view_name(table_name)).view_name);
BEGIN
    IF to_regnamespace(quote_ident(vs)) IS NULL THEN
        IF NOT EXISTS (SELECT 1 FROM cd2sync._instances_with(table_name)) THEN
            RETURN;
        END IF;
        -- a namespace's views: readable as cd2's are (the views themselves by cd2sync_reader)
        EXECUTE format('CREATE SCHEMA %I', vs);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO PUBLIC', vs);
    END IF;
    PERFORM cd2sync._check_schema_owner(vs);
    FOR r IN SELECT * FROM cd2sync._instances_with(table_name) LOOP
        PERFORM cd2sync._ensure_bookkeeping(r.rel, r.shard_id, table_name);
        PERFORM cd2sync._feed_ensure_capture(r.rel, table_name);   -- (feeds.sql)
    END LOOP;
    v := cd2sync._view_columns(table_name);
    IF v.cols IS NULL THEN
        EXECUTE format('DROP VIEW IF EXISTS %s', vname);
        RETURN;
    END IF;
    FOR r IN SELECT * FROM cd2sync._instances_with(table_name) LOOP
        parts := parts || (cd2sync._view_select(table_name, r.instance, r.shard_id, r.rel, v.cols, v.types,
                                                r.rel::text)).sql;
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
              UNION SELECT v.table_name FROM cd2sync._views() v LOOP
        PERFORM cd2sync.refresh_view(t);
    END LOOP;
END $$;

-- Brings what an earlier version made to this version's layout: the
-- instance tables' bookkeeping (cd2_ columns, indexes, replacements,
-- duplicate flags) and the reconciled views. ALTER EXTENSION UPDATE cannot
-- (the views are not the extension's to replace): each sync run, a new feed
-- and every change to the instances call this first; it costs a catalog
-- look when there is nothing to do.
CREATE FUNCTION cd2sync._ensure_layout()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM cd2sync.table_state s JOIN cd2sync.instances i ON i.name = s.instance
                     CROSS JOIN LATERAL (SELECT cd2sync._instance_rel(i.target_schema, s.table_name) AS rel) t
                     CROSS JOIN LATERAL cd2sync._user_columns(t.rel) u(col)
                    WHERE t.rel IS NOT NULL AND NOT cd2sync._has_column(t.rel, cd2sync._resolved_column(u.col)))
       AND NOT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                        WHERE d.classid = 'pg_rewrite'::regclass
                          AND d.refobjid = 'cd2sync.user_merge_map'::regclass
                          AND r.ev_class <> 'cd2.user_merges'::regclass)
       -- (1.3's capture triggers: refresh_view replaces them)
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'cd2_feed_insert'
                          AND tgfoid = 'cd2sync._feed_capture()'::regprocedure) THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(52518, 1);   -- one at a time
    PERFORM cd2sync.refresh_views();
    PERFORM cd2sync._refresh_merge_duplicates('enrollments');
    PERFORM cd2sync._refresh_merge_duplicates('submissions');
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
    FOR r IN SELECT i.name, i.shard_id, t.rel, t.table_name AS tab
               FROM cd2sync.instances i CROSS JOIN LATERAL cd2sync._instance_tables(i.name) t
              ORDER BY 1, 4 LOOP
        FOR a IN SELECT attname::text AS col FROM pg_attribute
                  WHERE attrelid = r.rel AND attnum > 0 AND NOT attisdropped AND atttypid = 'bigint'::regtype
                    AND (attname = 'id' OR attname LIKE '%\_id') AND attname NOT LIKE 'cd2\_%' ORDER BY attnum LOOP
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
SELECT pg_catalog.pg_extension_config_dump('cd2sync.resolve_due', '');
-- derived from the evidence, but the instance tables' cd2_<column> hold what
-- they said when the dump was taken: a restore keeps them agreeing
SELECT pg_catalog.pg_extension_config_dump('cd2sync.user_merge_map', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.merge_duplicates', '');
