-- cd2sync 1.1 -> 1.2. Every object 1.2 adds or changes, as the install
-- script (src/sql/*.sql) makes it; t/012_upgrade.pl checks that an updated
-- database and a fresh install of 1.2 have the same objects. 1.2 replaces
-- functions, adds cd2sync.monitoring and the column it reads in
-- cd2sync.feed (acknowledged_at), and has pg_dump keep the merge map.
\echo Use "ALTER EXTENSION cd2sync UPDATE TO '1.2'" to load this file. \quit

CREATE OR REPLACE FUNCTION cd2sync._trusted_owner(owner oid)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT owner = (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'cd2sync')
        OR coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = owner), false)
$$;

CREATE OR REPLACE FUNCTION cd2sync._check_schema_owner(target_schema text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owner oid;
BEGIN
    SELECT n.nspowner INTO owner FROM pg_namespace n WHERE n.nspname = target_schema;
    IF FOUND AND NOT cd2sync._trusted_owner(owner) THEN
        RAISE EXCEPTION 'schema "%" belongs to role %, not to cd2sync', target_schema, owner::regrole
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'cd2sync writes only into schemas it creates: give a target_schema that does not exist.';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._instance_rel(target_schema text, table_name text)
RETURNS regclass LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = target_schema AND c.relname = table_name AND c.relkind IN ('r', 'p')
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

CREATE OR REPLACE FUNCTION cd2_add_instance(
    name          text,
    client_id     text,
    client_secret text,
    api_url       text     DEFAULT 'https://api-gateway.instructure.com',
    tables        text[]   DEFAULT NULL,
    shard_id      bigint   DEFAULT NULL,
    schedule      interval DEFAULT NULL,
    target_schema text     DEFAULT NULL,
    full_resync_every interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n text := cd2_add_instance.name;
    tables_clean text[];
BEGIN
    IF n IS NULL OR n !~ '^[a-z][a-z0-9_]{0,47}$' THEN
        RAISE EXCEPTION 'invalid instance name "%"', n
              USING ERRCODE = 'invalid_parameter_value',
                    DETAIL = 'An instance name is a lower-case letter followed by up to 47 lower-case letters, digits or underscores.';
    END IF;
    PERFORM cd2sync._check_settings(client_id, client_secret, api_url, tables, shard_id, schedule,
                                    target_schema, full_resync_every);
    IF EXISTS (SELECT 1 FROM cd2sync.instances i WHERE i.name = n) THEN
        RAISE EXCEPTION 'cd2sync instance "%" already exists', n USING ERRCODE = 'duplicate_object';
    END IF;
    IF EXISTS (SELECT 1 FROM cd2sync.instances i WHERE i.target_schema = coalesce(cd2_add_instance.target_schema, n)) THEN
        RAISE EXCEPTION 'schema "%" is already the target of another instance',
              coalesce(cd2_add_instance.target_schema, n) USING ERRCODE = 'duplicate_schema';
    END IF;
    PERFORM cd2sync._check_schema_owner(coalesce(cd2_add_instance.target_schema, n));
    SELECT array_agg(DISTINCT t ORDER BY t) INTO tables_clean FROM unnest(tables) t;
    PERFORM cd2sync._check_remote_tables(api_url, client_id, client_secret, tables_clean);

    -- (no rows in the views yet: captures none, and keeps its rows' passes quiet)
    PERFORM cd2sync._feed_capture_instance(n, 'old');
    INSERT INTO cd2sync.instances (name, client_id, api_url, tables, shard_id, schedule, target_schema,
                                   full_resync_every)
    VALUES (n, client_id, api_url, tables_clean, shard_id, schedule,
            coalesce(cd2_add_instance.target_schema, n), full_resync_every);
    INSERT INTO cd2sync.instance_secrets (instance, client_secret) VALUES (n, client_secret);
    -- an instance whose target schema already holds synced tables joins the
    -- views (and the feeds that follow them)
    PERFORM cd2sync._reconcile_changed();
    PERFORM cd2sync._feed_capture_instance(n, 'new');
END $$;

CREATE OR REPLACE FUNCTION cd2_alter_instance(
    name          text,
    client_id     text     DEFAULT NULL,
    client_secret text     DEFAULT NULL,
    api_url       text     DEFAULT NULL,
    tables        text[]   DEFAULT '{}',
    shard_id      bigint   DEFAULT -1,
    schedule      interval DEFAULT '-00:00:00.000001',
    target_schema text     DEFAULT '',
    full_resync_every interval DEFAULT '-00:00:00.000001')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old cd2sync.instances := cd2sync._check_instance(cd2_alter_instance.name);
    new cd2sync.instances := old;
    secret text;
BEGIN
    SELECT s.client_secret INTO secret FROM cd2sync.instance_secrets s WHERE s.instance = old.name;
    new.client_id := coalesce(cd2_alter_instance.client_id, old.client_id);
    secret := coalesce(cd2_alter_instance.client_secret, secret);
    new.api_url := coalesce(cd2_alter_instance.api_url, old.api_url);
    IF tables IS NULL OR cardinality(tables) > 0 THEN
        SELECT array_agg(DISTINCT t ORDER BY t) INTO new.tables FROM unnest(tables) t;
    END IF;
    IF shard_id IS DISTINCT FROM -1 THEN
        new.shard_id := shard_id;
    END IF;
    IF schedule IS DISTINCT FROM interval '-00:00:00.000001' THEN
        new.schedule := schedule;
    END IF;
    IF target_schema IS DISTINCT FROM '' THEN
        new.target_schema := coalesce(target_schema, old.name);
    END IF;
    IF full_resync_every IS DISTINCT FROM interval '-00:00:00.000001' THEN
        new.full_resync_every := full_resync_every;
    END IF;
    PERFORM cd2sync._check_settings(new.client_id, secret, new.api_url,
                                    CASE WHEN tables IS NULL OR cardinality(tables) > 0 THEN tables END,
                                    new.shard_id, new.schedule,
                                    CASE WHEN target_schema IS NOT NULL AND target_schema <> ''
                                         THEN target_schema END,
                                    new.full_resync_every);
    -- the stored secret is only ever sent where it was given for
    IF (new.api_url <> old.api_url OR new.client_id <> old.client_id)
       AND cd2_alter_instance.client_secret IS NULL THEN
        RAISE EXCEPTION 'changing api_url or client_id of cd2sync instance "%" needs its client_secret',
                        old.name
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Give client_secret too: the stored one is not sent to another URL or client.';
    END IF;
    IF new.target_schema <> old.target_schema THEN
        IF EXISTS (SELECT 1 FROM cd2sync.instances i WHERE i.target_schema = new.target_schema) THEN
            RAISE EXCEPTION 'schema "%" is already the target of another instance', new.target_schema
                  USING ERRCODE = 'duplicate_schema';
        END IF;
        PERFORM cd2sync._check_schema_owner(new.target_schema);
        IF to_regnamespace(quote_ident(old.target_schema)) IS NOT NULL THEN
            IF to_regnamespace(quote_ident(new.target_schema)) IS NOT NULL THEN
                RAISE EXCEPTION 'schema "%" already exists', new.target_schema
                      USING ERRCODE = 'duplicate_schema';
            END IF;
            -- the synced data moves with the instance
            PERFORM cd2sync._check_schema_owner(old.target_schema);
            PERFORM cd2sync._lock_instance(old.name);
            PERFORM cd2sync._feed_capture_instance(old.name, 'old');
            EXECUTE format('ALTER SCHEMA %I RENAME TO %I', old.target_schema, new.target_schema);
        END IF;
    END IF;
    IF new.tables IS DISTINCT FROM old.tables OR new.api_url <> old.api_url
       OR new.client_id <> old.client_id THEN
        PERFORM cd2sync._check_remote_tables(new.api_url, new.client_id, secret, new.tables);
    END IF;
    IF new.shard_id IS DISTINCT FROM old.shard_id AND new.target_schema = old.target_schema THEN
        PERFORM cd2sync._feed_capture_instance(old.name, 'old');   -- ids change in the views
    END IF;

    UPDATE cd2sync.instances i
       SET client_id = new.client_id, api_url = new.api_url, tables = new.tables,
           shard_id = new.shard_id, schedule = new.schedule, target_schema = new.target_schema,
           full_resync_every = new.full_resync_every, updated_at = now()
     WHERE i.name = old.name;
    UPDATE cd2sync.instance_secrets s SET client_secret = secret WHERE s.instance = old.name;
    IF new.shard_id IS DISTINCT FROM old.shard_id OR new.target_schema <> old.target_schema THEN
        PERFORM cd2sync._reconcile_changed();
        PERFORM cd2sync._feed_capture_instance(old.name, 'new');
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2_drop_instance(name text, drop_data boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old cd2sync.instances := cd2sync._check_instance(cd2_drop_instance.name);
BEGIN
    IF drop_data IS NULL THEN
        RAISE EXCEPTION 'drop_data must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF drop_data THEN
        PERFORM cd2sync._check_schema_owner(old.target_schema);   -- (nobody else's goes)
    END IF;
    PERFORM cd2sync._lock_instance(old.name);
    PERFORM cd2sync._feed_capture_instance(old.name, 'old');
    DELETE FROM cd2sync.instances i WHERE i.name = old.name;
    -- the reconciled views stop reading the schema before it may go
    PERFORM cd2sync._reconcile_changed();
    PERFORM cd2sync._feed_capture_instance(old.name, 'new');   -- (no rows: gone from the views)
    IF drop_data THEN
        EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', old.target_schema);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._ensure_table(target_schema text, table_name text, doc json)
RETURNS boolean LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    c record;
    cols text[] := '{}';
    keys text[] := '{}';
    rel regclass;
    v text;
    created boolean := false;
BEGIN
    IF octet_length(table_name) > 63 OR table_name = '' THEN
        RAISE EXCEPTION 'CD2 table name "%" is not a valid PostgreSQL identifier', table_name
              USING ERRCODE = 'invalid_name';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cd2sync._schema_columns(target_schema, table_name, doc) s WHERE s.is_key) THEN
        RAISE EXCEPTION 'CD2 schema of table "%" has no key columns', table_name
              USING ERRCODE = 'invalid_table_definition';
    END IF;

    IF to_regnamespace(quote_ident(target_schema)) IS NULL THEN
        EXECUTE format('CREATE SCHEMA %I', target_schema);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO cd2sync_reader', target_schema);
    END IF;
    -- only into what cd2sync owns: anyone else's table runs its triggers as us
    PERFORM cd2sync._check_schema_owner(target_schema);
    IF to_regclass(format('%I.%I', target_schema, table_name)) IS DISTINCT FROM
       cd2sync._instance_rel(target_schema, table_name) THEN
        RAISE EXCEPTION 'relation %.% is not a table of cd2sync''s', quote_ident(target_schema),
                        quote_ident(table_name)
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
                               CASE WHEN c.not_null THEN ' NOT NULL' ELSE '' END);
        IF c.is_key THEN
            keys := keys || format('%I', c.column_name);
        END IF;
    END LOOP;

    rel := to_regclass(format('%I.%I', target_schema, table_name));
    IF rel IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I (%s, PRIMARY KEY (%s))', target_schema, table_name,
                       array_to_string(cols, ', '), array_to_string(keys, ', '));
        rel := format('%I.%I', target_schema, table_name)::regclass;
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
                    PERFORM cd2sync._alter_column_type(rel, c.column_name, c.type_sql, false);
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

CREATE OR REPLACE FUNCTION cd2sync._apply(target regclass, mode text, fill text[] DEFAULT NULL,
                               typed boolean DEFAULT false,
                               OUT upserted bigint, OUT deleted bigint,
                               OUT unchanged bigint, OUT oversized bigint)
LANGUAGE plpgsql
-- the de-duplicating sort of a large result stays in memory (bounded)
SET search_path = pg_catalog, pg_temp SET work_mem = '32MB' AS $$
DECLARE
    ph constant text := '__cd2_oversized_truncated__';
    keys text[] := cd2sync._key_columns(target);
    a record;
    cols text[] := '{}';     -- quoted column names to fill
    exprs text[] := '{}';    -- their values, from staging s (and target t)
    setcols text[] := '{}';  -- non-key columns
    cmpcols text[];          -- the same, fixed-width first: comparisons stop sooner
    phcols text;             -- staging columns that can hold a placeholder
    keyjoin text;            -- t.k = <k from staging s>
    keyjoin_typed text;      -- t.k = d.k for target t and cd2_typed d
    keyorder text;           -- the key columns
    keyexprs text;           -- the key values from staging s
    has_ph boolean;
    has_dups boolean;
    ph_new text;
    e text;
    written bigint;
    target_rows float8;
    few boolean;             -- the result is small beside the table
    joins text[] := ARRAY[current_setting('enable_mergejoin'), current_setting('enable_hashjoin'),
                          current_setting('enable_material')];
    sample_same bigint;      -- of a sample of the records, how many change nothing
    sample_size bigint;
    shard bigint;            -- of the target's instance
    map_empty boolean;
    mapjoins text := '';     -- the user columns' lookups in the merge map
BEGIN
    IF keys IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key', target USING ERRCODE = 'invalid_table_definition';
    END IF;
    -- what change feeds say of the rows written (feeds.sql)
    PERFORM set_config('cd2sync_tx.cause', CASE WHEN mode = 'snapshot' THEN 'resync' ELSE 'sync' END, true);

    SELECT string_agg(format('t.%I = %s', k, cd2sync._cast_expr(k, atttypid, atttypmod, typed)), ' AND '),
           string_agg(format('%I', k), ', '),
           string_agg(cd2sync._cast_expr(k, atttypid, atttypmod, typed), ', ')
      INTO keyjoin, keyorder, keyexprs
      FROM unnest(keys) k JOIN pg_attribute ON attrelid = target AND attname = k;
    SELECT string_agg(format('t.%1$I = d.%1$I', k), ' AND ') INTO keyjoin_typed FROM unnest(keys) k;

    -- values kept because of placeholders (a table just created keeps none);
    -- only a text staging column can hold one
    SELECT string_agg(format('s.%I', attname), ', ') INTO phcols
      FROM pg_attribute
     WHERE attrelid = target AND attnum > 0 AND NOT attisdropped AND attname NOT LIKE 'cd2\_%'
       AND cd2sync._stage_type(atttypid, atttypmod, typed) = 'text';
    IF mode = 'snapshot_new' THEN
        oversized := 0;
    ELSE
        -- one pass over the records: placeholders, actions, and whether a
        -- key comes twice (then the counts are taken again, of the latest)
        EXECUTE format('SELECT %s, count(*) FILTER (WHERE s.cd2_action = ''D''),
                               count(*) FILTER (WHERE s.cd2_action IS DISTINCT FROM ''D''),
                               count(*) > count(DISTINCT %s)
                          FROM cd2_stage s',
                       CASE WHEN phcols IS NULL THEN '0'
                            ELSE format('count(*) FILTER (WHERE %L IN (%s))', ph, phcols) END,
                       CASE WHEN cardinality(keys) = 1 THEN keyexprs ELSE format('ROW(%s)', keyexprs) END)
           INTO oversized, deleted, upserted, has_dups;
    END IF;
    has_ph := oversized > 0;

    FOR a IN SELECT attname::text AS name, atttypid, atttypmod,
                    (SELECT typcategory FROM pg_type WHERE oid = atttypid) AS cat,
                    cd2sync._stage_type(atttypid, atttypmod, typed) = 'text' AS staged_text
               FROM pg_attribute
              WHERE attrelid = target AND attnum > 0 AND NOT attisdropped AND attname NOT LIKE 'cd2\_%'
                AND (fill IS NULL OR attname = ANY (fill) OR attname = ANY (keys))
              ORDER BY attnum LOOP
        cols := cols || format('%I', a.name);
        e := cd2sync._cast_expr(a.name, a.atttypid, a.atttypmod, typed);
        IF a.name = ANY (keys) THEN
            exprs := exprs || e;
        ELSIF NOT a.staged_text THEN
            setcols := setcols || format('%I', a.name);
            exprs := exprs || e;
        ELSE
            setcols := setcols || format('%I', a.name);
            -- what a placeholder becomes in a new row: itself where text can hold it
            ph_new := CASE WHEN a.cat = 'S' AND (a.atttypmod < 0 OR a.atttypmod - 4 >= length(ph))
                           THEN quote_literal(ph) ELSE 'NULL' END;
            IF mode = 'snapshot_new' THEN
                exprs := exprs || format('CASE WHEN s.%I = %L THEN %s ELSE %s END', a.name, ph, ph_new, e);
            ELSIF has_ph THEN
                -- keep the stored value
                exprs := exprs || format(
                    'CASE WHEN s.%I = %L THEN CASE WHEN t.%I IS NULL THEN %s ELSE t.%I END ELSE %s END',
                    a.name, ph, keys[1], ph_new, a.name, e);
            ELSE
                exprs := exprs || e;
            END IF;
        END IF;
    END LOOP;

    -- each user column's replacement (reconcile.sql's cd2_<c>), looked up in
    -- the map as the row is written
    SELECT i.shard_id INTO shard FROM cd2sync.instances i JOIN pg_class c ON c.oid = target
      JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.target_schema = n.nspname;
    -- (a join, not a subquery per row; nothing to look up in an empty map)
    map_empty := NOT EXISTS (SELECT 1 FROM cd2sync.user_merge_map);
    FOR a IN SELECT u.col, cd2sync._resolved_column(u.col) AS rc, u.i,
                    (SELECT x FROM unnest(exprs, cols) z(x, q) WHERE q = format('%I', u.col)) AS e
               FROM cd2sync._user_columns(target) WITH ORDINALITY u(col, i)
              WHERE format('%I', u.col) = ANY (cols) AND cd2sync._has_column(target, cd2sync._resolved_column(u.col)) LOOP
        cols := cols || format('%I', a.rc);
        setcols := setcols || format('%I', a.rc);
        IF map_empty THEN
            exprs := exprs || 'NULL::bigint'::text;
        ELSE
            exprs := exprs || format('cd2_m%s.replacement_user_id', a.i);
            mapjoins := mapjoins || format(' LEFT JOIN cd2sync.user_merge_map cd2_m%1$s ON cd2_m%1$s.superseded_user_id = %2$s',
                                           a.i, cd2sync._global_expr(shard, format('(%s)', a.e)));
        END IF;
    END LOOP;

    IF mode = 'snapshot_new' THEN
        -- keys are unique within one result: no sort needed
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM cd2_stage s %s
                         WHERE s.cd2_action IS DISTINCT FROM ''D'' ON CONFLICT DO NOTHING',
                       target, array_to_string(cols, ', '), array_to_string(exprs, ', '), mapjoins);
        GET DIAGNOSTICS upserted = ROW_COUNT;
        deleted := 0;
        unchanged := 0;
        RETURN;
    END IF;

    -- one typed row per key, the latest change winning. A typed result with
    -- no key twice and no placeholder to keep (the usual case) is read
    -- through a view on the staging table: no sort, no copy
    EXECUTE format('CREATE TEMP %s cd2_typed %s AS
                    SELECT %s s.cd2_action AS cd2_action, %s FROM cd2_stage s %s %s %s',
                   CASE WHEN typed AND NOT has_dups AND NOT has_ph THEN 'VIEW' ELSE 'TABLE' END,
                   CASE WHEN typed AND NOT has_dups AND NOT has_ph THEN '' ELSE 'ON COMMIT DROP' END,
                   CASE WHEN has_dups THEN format('DISTINCT ON (%s)', keyorder) ELSE '' END,
                   (SELECT string_agg(format('%s AS %s', x, c), ', ') FROM unnest(exprs, cols) u(x, c)),
                   CASE WHEN has_ph THEN format('LEFT JOIN %s t ON %s', target, keyjoin) ELSE '' END,
                   mapjoins,
                   CASE WHEN has_dups THEN format('ORDER BY %s, s.cd2_ts DESC NULLS LAST, s.ctid DESC', keyorder)
                        ELSE '' END);
    -- evidence of user merges that CD2 does not keep (logins, enrolments moving)
    PERFORM cd2sync._record_user_moves(target);

    IF has_dups THEN
        SELECT count(*) FILTER (WHERE cd2_action = 'D'), count(*) FILTER (WHERE cd2_action IS DISTINCT FROM 'D')
          INTO deleted, upserted FROM cd2_typed;
    END IF;

    -- an incremental touches few of a large table's rows: look each up by its
    -- key rather than scan the table for a merge or hash join (the planner,
    -- without statistics on cd2_typed, tends to scan), nor materialize the
    -- table for a nested loop (a comparison with a constant, such as a
    -- bookkeeping column against NULL while the merge map is empty, is
    -- pushed down to the table and estimated at one row: every record then
    -- rescanned the whole table)
    SELECT CASE WHEN reltuples >= 0 THEN reltuples ELSE pg_relation_size(target) / 200.0 END
      INTO target_rows FROM pg_class WHERE oid = target;
    few := mode = 'incremental' AND (upserted + deleted) * 4 < target_rows;
    IF few THEN
        PERFORM set_config('enable_mergejoin', 'off', true), set_config('enable_hashjoin', 'off', true),
                set_config('enable_material', 'off', true);
    END IF;

    SELECT array_agg(format('%I', attname) ORDER BY attlen < 0, attnum) INTO cmpcols
      FROM pg_attribute
     WHERE attrelid = target AND attnum > 0 AND NOT attisdropped AND format('%I', attname) = ANY (setcols);

    -- Records that change nothing are left out by an anti-join: their rows
    -- are neither rewritten nor even locked (no new row version, no WAL),
    -- where ON CONFLICT DO UPDATE ... WHERE alone would lock each one. The
    -- anti-join costs a lookup per record, which a result that changes
    -- most of its rows does not need: a sample of the records decides.
    IF cardinality(setcols) > 0 THEN
        EXECUTE format('SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM %1$s t WHERE %2$s
                                                   AND (%3$s) IS NOT DISTINCT FROM (%4$s))), count(*)
                          FROM (SELECT * FROM cd2_typed d WHERE d.cd2_action IS DISTINCT FROM ''D''
                                 LIMIT 1000) d',
                       target, keyjoin_typed,
                       (SELECT string_agg('t.' || c, ', ') FROM unnest(cmpcols) c),
                       (SELECT string_agg('d.' || c, ', ') FROM unnest(cmpcols) c))
           INTO sample_same, sample_size;
    END IF;
    IF cardinality(setcols) = 0 THEN
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM cd2_typed WHERE cd2_action IS DISTINCT FROM ''D''
                         ON CONFLICT DO NOTHING', target, array_to_string(cols, ', '), array_to_string(cols, ', '));
    ELSE
        EXECUTE format('INSERT INTO %1$s AS t (%2$s) SELECT %7$s FROM cd2_typed d
                         WHERE d.cd2_action IS DISTINCT FROM ''D'' %8$s
                        ON CONFLICT (%3$s) DO UPDATE SET (%4$s) = ROW(%5$s)
                         WHERE (%6$s) IS DISTINCT FROM (%9$s)',
                       target, array_to_string(cols, ', '), keyorder,
                       array_to_string(setcols, ', '),
                       (SELECT string_agg('excluded.' || c, ', ') FROM unnest(setcols) c),
                       (SELECT string_agg('t.' || c, ', ') FROM unnest(cmpcols) c),
                       (SELECT string_agg('d.' || c, ', ') FROM unnest(cols) c),
                       CASE WHEN sample_same * 5 >= sample_size   -- 20% or more unchanged
                            THEN format('AND NOT EXISTS (SELECT 1 FROM %s t WHERE %s AND (%s) IS NOT DISTINCT FROM (%s))',
                                        target, keyjoin_typed,
                                        (SELECT string_agg('t.' || c, ', ') FROM unnest(cmpcols) c),
                                        (SELECT string_agg('d.' || c, ', ') FROM unnest(cmpcols) c))
                            ELSE '' END,
                       (SELECT string_agg('excluded.' || c, ', ') FROM unnest(cmpcols) c));
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    -- deletes after the upsert (their keys are apart): the upsert, the
    -- statement that writes most, is over before a change feed's capture
    -- takes its lock (feeds.sql)
    IF deleted > 0 THEN
        EXECUTE format('DELETE FROM %s t USING cd2_typed d WHERE d.cd2_action = ''D'' AND %s',
                       target, keyjoin_typed);
    END IF;
    IF mode = 'snapshot' THEN
        -- rows the new snapshot does not have are gone upstream
        EXECUTE format('DELETE FROM %s t WHERE NOT EXISTS (SELECT 1 FROM cd2_typed d WHERE %s)',
                       target, keyjoin_typed);
        GET DIAGNOSTICS deleted = ROW_COUNT;
    END IF;

    IF few THEN
        PERFORM set_config('enable_mergejoin', joins[1], true), set_config('enable_hashjoin', joins[2], true),
                set_config('enable_material', joins[3], true);
    END IF;
    unchanged := upserted - written;
    IF to_regclass('pg_temp.cd2_typed') IS NOT NULL AND
       (SELECT relkind FROM pg_class WHERE oid = 'pg_temp.cd2_typed'::regclass) = 'v' THEN
        DROP VIEW cd2_typed;
    ELSE
        DROP TABLE cd2_typed;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._instances_with(table_name text)
RETURNS TABLE (instance text, shard_id bigint, rel regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.name, i.shard_id, cd2sync._instance_rel(i.target_schema, table_name)
      FROM cd2sync.instances i
     WHERE cd2sync._instance_rel(i.target_schema, table_name) IS NOT NULL
     ORDER BY i.name
$$;

CREATE OR REPLACE FUNCTION cd2sync._ensure_bookkeeping(rel regclass, shard bigint, table_name text)
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
    -- whole then, not row by row during it (readers are not blocked)
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
            PERFORM cd2sync._ensure_index(rel, c || '_replaced', format('%I', rc), format('%I IS NOT NULL', rc));
        END IF;
    END LOOP;
    IF has_rows AND shard IS NOT NULL AND cd2sync._has_column(rel, 'id') THEN
        made := cd2sync._ensure_index(rel, 'global_id', cd2sync._global_expr(shard, 'id')) OR made;
    END IF;
    IF dupkey IS NOT NULL AND cd2sync._has_column(rel, 'id') AND cd2sync._has_column(rel, 'user_id')
       AND NOT cd2sync._has_column(rel, 'cd2_merge_duplicate') THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN cd2_merge_duplicate boolean', rel);
    END IF;
    IF has_rows AND cd2sync._has_column(rel, 'cd2_merge_duplicate') THEN
        PERFORM cd2sync._ensure_index(rel, 'merge_duplicates', 'id', 'cd2_merge_duplicate');
    END IF;
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

CREATE OR REPLACE FUNCTION cd2sync._resolve_users(rel regclass, shard bigint, changes boolean)
RETURNS bigint LANGUAGE plpgsql
-- lookups through the columns' indexes, never a scan of a large table (a
-- table just loaded has no statistics that would tell the planner so)
SET search_path = pg_catalog, pg_temp SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_seqscan = off AS $$
DECLARE
    c text;
    rc text;
    g text;
    n bigint := 0;
    k bigint;
    map_empty boolean := NOT EXISTS (SELECT 1 FROM cd2sync.user_merge_map);
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
        IF changes IS NULL THEN
            EXECUTE format('UPDATE %s t SET %I = NULL WHERE %I IS NOT NULL', rel, rc, rc);
        END IF;
        IF NOT map_empty THEN
            EXECUTE format('UPDATE %s t SET %I = m.replacement_user_id FROM cd2sync.user_merge_map m
                             WHERE %s = m.superseded_user_id AND t.%I IS NULL',
                           rel, rc, cd2sync._resolved_expr(shard, c), rc);
            GET DIAGNOSTICS k = ROW_COUNT;
            n := n + k;
        END IF;
        IF changes IS NOT NULL THEN
            -- (a row's stored user changed, or its replacement did)
            EXECUTE format('UPDATE %1$s t SET %2$I = (SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                                                       WHERE m.superseded_user_id = %3$s)
                             WHERE t.%2$I IS NOT NULL
                               AND t.%2$I IS DISTINCT FROM (SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                                                             WHERE m.superseded_user_id = %3$s)',
                           rel, rc, g);
            GET DIAGNOSTICS k = ROW_COUNT;
            n := n + k;
        END IF;
    END LOOP;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._instance_tables(instance text)
RETURNS TABLE (rel regclass, table_name text, shard_id bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass, c.relname::text, i.shard_id
      FROM cd2sync.instances i JOIN pg_namespace s ON s.nspname = i.target_schema
      JOIN pg_class c ON c.relnamespace = s.oid AND c.relkind IN ('r', 'p')
     WHERE i.name = _instance_tables.instance
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(s.nspowner)
     ORDER BY c.oid
$$;

CREATE OR REPLACE FUNCTION cd2sync._ensure_layout()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM cd2sync.table_state s JOIN cd2sync.instances i ON i.name = s.instance
                     CROSS JOIN LATERAL (SELECT cd2sync._instance_rel(i.target_schema, s.table_name) AS rel) t
                     CROSS JOIN LATERAL cd2sync._user_columns(t.rel) u(col)
                    WHERE t.rel IS NOT NULL AND NOT cd2sync._has_column(t.rel, cd2sync._resolved_column(u.col)))
       AND NOT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                        WHERE d.classid = 'pg_rewrite'::regclass
                          AND d.refobjid = 'cd2sync.user_merge_map'::regclass
                          AND r.ev_class <> 'cd2.user_merges'::regclass) THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(52518, 1);   -- one at a time
    PERFORM cd2sync.refresh_views();
    PERFORM cd2sync._refresh_merge_duplicates('enrollments');
    PERFORM cd2sync._refresh_merge_duplicates('submissions');
END $$;

CREATE OR REPLACE FUNCTION cd2sync.reconciliation_health()
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

CREATE OR REPLACE FUNCTION cd2sync._changed_columns(old record, new record)
RETURNS text[] AS 'MODULE_PATHNAME', 'cd2_changed_columns' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE OR REPLACE FUNCTION cd2sync._feed_capture_sql(rel regclass, table_name text, old_src text, new_src text,
                                          cause text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances;
    v record;
    vo record;            -- the view's rows of old_src
    vn record;            -- ... and of new_src
    keys text[] := cd2sync._key_columns(rel);
    wm timestamptz;
BEGIN
    SELECT i.* INTO inst FROM cd2sync.instances i JOIN pg_class c ON c.oid = rel
      JOIN pg_namespace s ON s.oid = c.relnamespace WHERE i.target_schema = s.nspname;
    IF NOT FOUND OR keys IS NULL THEN
        RETURN NULL;
    END IF;
    IF cause IS NULL AND inst.name = current_setting('cd2sync_tx.quiet_instance', true) THEN
        RETURN NULL;
    END IF;
    cause := coalesce(cause, nullif(current_setting('cd2sync_tx.cause', true), ''), 'sync');
    -- the table's watermark as this transaction commits it: the sync that
    -- applies it says so beforehand (cd2sync_tx.watermark); else the stored one
    IF current_setting('cd2sync_tx.applying', true) = inst.name || '.' || table_name THEN
        wm := nullif(current_setting('cd2sync_tx.watermark', true), '')::timestamptz;
    ELSE
        SELECT s.watermark INTO wm FROM cd2sync.table_state s
         WHERE s.instance = inst.name AND s.table_name = _feed_capture_sql.table_name;
    END IF;
    v := cd2sync._view_columns(table_name);
    vo := cd2sync._view_select(table_name, inst.name, inst.shard_id, rel, v.cols, v.types, old_src);
    vn := cd2sync._view_select(table_name, inst.name, inst.shard_id, rel, v.cols, v.types, new_src);
    -- each change's image r (the new row; the old for a delete); an update
    -- pairs old and new by key, and is a change when a column changed (the
    -- fence keeps the pair's row and comparison from being computed twice)
    RETURN format(
        'INSERT INTO cd2sync.changes (position, table_name, op, key, instance, "row", changed, cause, watermark)
         SELECT nextval(''cd2sync.change_position_seq''), %L, %s, %s, %L, %s, %s, %L, %L::timestamptz FROM %s',
        table_name,
        CASE WHEN old_src IS NULL THEN '''insert''' WHEN new_src IS NULL THEN '''delete''' ELSE '''update''' END,
        (SELECT 'jsonb_build_object(' || string_agg(format('%L, (p.r).%I', k, k), ', ') || ')' FROM unnest(keys) k),
        inst.name,
        CASE WHEN new_src IS NULL THEN 'NULL' ELSE 'to_jsonb(p.r)' END,
        CASE WHEN old_src IS NULL OR new_src IS NULL THEN 'NULL' ELSE 'p.changed' END,
        cause, wm,
        CASE WHEN old_src IS NULL THEN format('(SELECT n AS r FROM (%s) n) p', vn.sql)
             WHEN new_src IS NULL THEN format('(SELECT o AS r FROM (%s) o) p', vo.sql)
             ELSE format('(SELECT n AS r, cd2sync._changed_columns(o, n) AS changed
                             FROM (%s) o JOIN (%s) n ON %s OFFSET 0) p
                          WHERE p.changed IS NOT NULL',
                         vo.sql, vn.sql,
                         (SELECT string_agg(format('n.%1$I = o.%1$I', k), ' AND ') FROM unnest(keys) k)) END);
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_capture()
RETURNS trigger LANGUAGE plpgsql
-- an update's old and new rows pair by a hash join in memory (bounded); the
-- planner cannot know that they pair one to one, and its estimate would
-- have JIT compile the statement, which costs more than it saves. The
-- statement that fires it may have turned joins off for itself (_apply
-- does, for a small incremental): a nested loop over transition tables
-- rescans one for every row of the other
SET search_path = pg_catalog, pg_temp SET work_mem = '64MB' SET jit = off
SET enable_hashjoin = on SET enable_mergejoin = on SET enable_material = on AS $$
DECLARE
    -- (TRUNCATE: before it, every row of the table is deleted)
    q text := cd2sync._feed_capture_sql(TG_RELID, TG_TABLE_NAME,
                                        CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN 'cd2_old'
                                             WHEN TG_OP = 'TRUNCATE' THEN TG_RELID::regclass::text END,
                                        CASE WHEN TG_OP IN ('UPDATE', 'INSERT') THEN 'cd2_new' END);
    n bigint;
BEGIN
    IF q IS NOT NULL THEN
        PERFORM cd2sync._feed_lock();
        EXECUTE q;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            PERFORM cd2sync._feed_notify(TG_TABLE_NAME);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_ensure_captures()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.rel, t.table_name AS tab
               FROM cd2sync.instances i CROSS JOIN LATERAL cd2sync._instance_tables(i.name) t
              ORDER BY t.rel::oid LOOP
        PERFORM cd2sync._feed_ensure_capture(r.rel, r.tab);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_capture_instance(instance text, side text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    q text;
BEGIN
    FOR r IN SELECT t.rel, t.table_name AS tab FROM cd2sync._instance_tables(instance) t
              WHERE cd2sync._feed_follows(t.table_name) LOOP
        q := cd2sync._feed_capture_sql(r.rel, r.tab, CASE WHEN side = 'old' THEN r.rel::text END,
                                       CASE WHEN side = 'new' THEN r.rel::text END, 'resync');
        IF q IS NOT NULL THEN
            PERFORM cd2sync._feed_lock();
            EXECUTE q;
            PERFORM cd2sync._feed_notify(r.tab);
        END IF;
    END LOOP;
    PERFORM set_config('cd2sync_tx.quiet_instance', CASE WHEN side = 'old' THEN instance ELSE '' END, true);
END $$;

CREATE OR REPLACE FUNCTION cd2_feed_read(name text, max_changes int DEFAULT 10000)
RETURNS TABLE ("position" bigint, table_name text, op text, key jsonb, instance text, "row" jsonb,
               changed text[], cause text, watermark timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cd2sync.feed := cd2sync._check_feed(name);
BEGIN
    IF max_changes IS NULL OR max_changes < 1 THEN
        RAISE EXCEPTION 'max_changes must be a positive number' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF f.stale_since IS NULL AND NOT pg_is_in_recovery() THEN   -- (a standby reads only)
        PERFORM cd2sync._feed_check_limits();
        f := cd2sync._check_feed(name);
    END IF;
    IF f.stale_since IS NOT NULL THEN
        RAISE EXCEPTION 'cd2sync feed "%" is stale: %', f.name, f.stale_reason
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    HINT = 'Drop it and create it again (from_start => true gives the current rows).';
    END IF;
    RETURN QUERY
    SELECT c.position, c.table_name, c.op, c.key, c.instance, c."row", c.changed, c.cause, c.watermark
      FROM cd2sync.changes c
     WHERE c.position > f.acknowledged
       AND (c.feed = f.name OR (c.feed IS NULL AND (f.tables IS NULL OR c.table_name = ANY (f.tables))))
     ORDER BY c.position
     LIMIT max_changes;
END $$;

CREATE OR REPLACE FUNCTION cd2_feed_ack(name text, upto bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cd2sync.feed := cd2sync._check_feed(name);
    last bigint;
BEGIN
    IF upto IS NULL THEN
        RAISE EXCEPTION 'upto must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF upto <= f.acknowledged THEN
        RETURN;
    END IF;
    -- every position up to the last visible one is committed (see _feed_lock)
    last := greatest(f.acknowledged, (SELECT max(c.position) FROM cd2sync.changes c));
    UPDATE cd2sync.feed x SET acknowledged = least(upto, last), acknowledged_at = now()
     WHERE x.name = f.name AND x.acknowledged < least(upto, last);
    PERFORM cd2sync._feed_forget(f.acknowledged, least(upto, last));
END $$;

CREATE OR REPLACE FUNCTION cd2sync._after_apply(instance text, table_name text, mode text, changes bigint)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances := cd2sync._check_instance(instance);
    rel regclass := cd2sync._instance_rel(inst.target_schema, table_name);
BEGIN
    IF changes > 0 AND rel IS NOT NULL THEN
        -- a first load gets its indexes now; rows a snapshot loaded
        -- straight by COPY get their replacements (_apply gives every row
        -- it writes its own)
        PERFORM cd2sync._ensure_bookkeeping(rel, inst.shard_id, table_name);
        IF mode = 'snapshot' THEN
            PERFORM cd2sync._resolve_users(rel, inst.shard_id, false);
        END IF;
        PERFORM set_config('cd2sync_tx.cause', 'merge', true);
        IF table_name = ANY (cd2sync._merge_inputs()) THEN
            PERFORM cd2sync._refresh_user_merges();
        ELSIF cd2sync._duplicate_key(table_name) IS NOT NULL THEN
            PERFORM cd2sync._refresh_merge_duplicates(table_name);
        END IF;
        PERFORM cd2sync._feed_check_limits();
    END IF;
END $$;

REVOKE ALL ON FUNCTION cd2sync._changed_columns(record, record), cd2sync._trusted_owner(oid),
                       cd2sync._check_schema_owner(text), cd2sync._instance_rel(text, text) FROM PUBLIC;

-- derived from the evidence, but the instance tables' cd2_<column> hold what
-- they said when the dump was taken: a restore keeps them agreeing
SELECT pg_catalog.pg_extension_config_dump('cd2sync.user_merge_map', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.merge_duplicates', '');

-- monitoring.sql (new): one view for a monitoring system, and the time a
-- feed last acknowledged
ALTER TABLE cd2sync.feed ADD COLUMN acknowledged_at timestamptz;
CREATE VIEW cd2sync.monitoring AS
    SELECT 'table'::text AS kind, i.name AS instance, s.table_name AS name,
           CASE WHEN s.synced_at IS NULL THEN 'never'
                WHEN s.status = 'failed' THEN 'failing'
                ELSE 'ok' END AS status,
           s.watermark,
           extract(epoch FROM now() - s.watermark)::float8 AS seconds_behind,
           s.synced_at AS last_success,
           coalesce(f.n, 0)::int AS consecutive_failures,
           l.rows_upserted + l.rows_deleted AS last_rows, l.bytes_downloaded AS last_bytes,
           s.last_error
      FROM cd2sync.instances i
      LEFT JOIN cd2sync.table_state s ON s.instance = i.name
      LEFT JOIN LATERAL (SELECT x.* FROM cd2sync.sync_log x
                          WHERE x.instance = s.instance AND x.table_name = s.table_name
                            AND x.status <> 'running'
                          ORDER BY x.started_at DESC LIMIT 1) l ON true
      LEFT JOIN LATERAL (SELECT count(*) AS n FROM cd2sync.sync_log x
                          WHERE x.instance = s.instance AND x.table_name = s.table_name
                            AND x.status = 'failed'
                            AND x.started_at > coalesce((SELECT max(y.started_at) FROM cd2sync.sync_log y
                                                          WHERE y.instance = s.instance
                                                            AND y.table_name = s.table_name
                                                            AND y.status = 'ok'), '-infinity')) f ON true
    UNION ALL
    SELECT 'feed', NULL, f.name, f.status, NULL,
           coalesce(extract(epoch FROM now() - coalesce(x.stale_since, f.oldest_pending))::float8, 0),
           x.acknowledged_at, 0, f.pending, NULL, x.stale_reason
      FROM cd2sync.feeds f JOIN cd2sync.feed x ON x.name = f.name;
GRANT SELECT ON cd2sync.monitoring TO cd2sync_reader;
GRANT SELECT (kind, instance, name, status, watermark, seconds_behind, last_success,
              consecutive_failures, last_rows, last_bytes)
    ON cd2sync.monitoring TO pg_monitor;
