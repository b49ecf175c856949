-- cd2sync 1.2 -> 1.3. Every object 1.3 adds or changes, as the install
-- script (src/sql/*.sql) makes it; t/012_upgrade.pl checks that an updated
-- database and a fresh install of 1.3 have the same objects.
-- * Namespaces: tables of canvas_logs, new_quizzes and catalog ("ns.table",
--   "ns.*"), kept in <target_schema>_<ns>, their views in cd2_<ns>;
--   cd2_add_instance and cd2_alter_instance take keep_logs. Logs (web_logs)
--   are partitioned by request time and keep their history. A new table is
--   loaded apart (schema cd2sync_load), by load workers too, its key built
--   after the rows, and takes its place complete.
-- * cd2sync.progress reads what sync workers publish in shared memory
--   (cd2sync._progress()) instead of parsing their pg_stat_activity text.
-- * The instance's sync lock has one owner, cd2sync._sync_lock, which the
--   sync worker calls too; the table-name rule one, cd2sync._check_tables,
--   which cd2_sync_now calls too.
\echo Use "ALTER EXTENSION cd2sync UPDATE TO '1.3'" to load this file. \quit

-- Namespaces keep an instance's tables in <target_schema>_<ns>: an instance
-- whose target schema is that of another's namespace (allowed until 1.2)
-- would share a schema with it once that one syncs the namespace.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT a.name AS one, b.name AS other, b.target_schema
               FROM cd2sync.instances a JOIN cd2sync.instances b ON a.name <> b.name
              WHERE b.target_schema IN (SELECT a.target_schema || '_' || ns
                                          FROM unnest(ARRAY['canvas_logs', 'new_quizzes', 'catalog']) ns) LOOP
        RAISE WARNING 'cd2sync 1.3: the target schema "%" of instance "%" is where instance "%" would keep a namespace''s tables',
              r.target_schema, r.other, r.one
              USING HINT = 'Give one of them another target_schema (cd2_alter_instance) before it syncs namespaces other than canvas.';
    END LOOP;
END $$;

-- signatures or result types that change
DROP FUNCTION cd2_add_instance(text, text, text, text, text[], bigint, interval, text, interval);
DROP FUNCTION cd2_alter_instance(text, text, text, text, text[], bigint, interval, text, interval);
DROP FUNCTION cd2sync._check_settings(text, text, text, text[], bigint, interval, text, interval);
DROP FUNCTION cd2sync._check_tables(text[]);
DROP FUNCTION cd2sync._remote_tables(text, text, text);
DROP FUNCTION cd2sync._resolve_users(regclass, bigint, boolean);
DROP FUNCTION cd2sync._ensure_table(text, text, json);

-- local history of namespace canvas_logs (web_logs) kept this long (NULL: forever)
ALTER TABLE cd2sync.instances ADD COLUMN keep_logs interval CHECK (keep_logs > interval '0');

CREATE OR REPLACE FUNCTION cd2sync._namespaces()
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['canvas', 'canvas_logs', 'new_quizzes', 'catalog']
$$;

CREATE OR REPLACE FUNCTION cd2sync._ns_schema_name(target_schema text, namespace text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN target_schema ELSE target_schema || '_' || namespace END
$$;

CREATE OR REPLACE FUNCTION cd2sync._ns_schema(target_schema text, namespace text)
RETURNS text LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s text := cd2sync._ns_schema_name(target_schema, namespace);
BEGIN
    IF octet_length(s) > 63 THEN
        RAISE EXCEPTION 'schema name "%" for namespace % is too long', s, namespace
              USING ERRCODE = 'name_too_long',
                    HINT = 'Give the instance a shorter target_schema.';
    END IF;
    RETURN s;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._namespace_of(table_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN strpos(table_name, '.') > 0 THEN split_part(table_name, '.', 1) ELSE 'canvas' END
$$;

CREATE OR REPLACE FUNCTION cd2sync._remote_name(table_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT substr(table_name, strpos(table_name, '.') + 1)
$$;

CREATE OR REPLACE FUNCTION cd2sync._table_place(target_schema text, table_name text,
                                     OUT namespace text, OUT remote_name text,
                                     OUT schema_name text, OUT rel_name text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT cd2sync._namespace_of(table_name), cd2sync._remote_name(table_name),
           cd2sync._ns_schema(target_schema, cd2sync._namespace_of(table_name)),
           cd2sync._remote_name(table_name)
$$;

CREATE OR REPLACE FUNCTION cd2sync._qualified(namespace text, remote_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN remote_name ELSE namespace || '.' || remote_name END
$$;

CREATE OR REPLACE FUNCTION cd2sync._view_schema(namespace text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN 'cd2' ELSE 'cd2_' || namespace END
$$;

CREATE OR REPLACE FUNCTION cd2sync._view_name(table_name text, OUT schema_name text, OUT view_name text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT cd2sync._view_schema(cd2sync._namespace_of(table_name)), cd2sync._remote_name(table_name)
$$;

CREATE OR REPLACE FUNCTION cd2sync._instance_schemas(target_schema text)
RETURNS TABLE (namespace text, schema_name text)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ns, cd2sync._ns_schema_name(target_schema, ns)
      FROM unnest(cd2sync._namespaces()) ns
     WHERE octet_length(cd2sync._ns_schema_name(target_schema, ns)) <= 63
$$;

CREATE OR REPLACE FUNCTION cd2sync._is_wildcard(table_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT table_name LIKE '%.*'
$$;

CREATE OR REPLACE FUNCTION cd2sync._covers(tables text[], table_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN tables IS NULL THEN cd2sync._namespace_of(table_name) = 'canvas'
                ELSE table_name = ANY (tables) OR cd2sync._namespace_of(table_name) || '.*' = ANY (tables) END
$$;

CREATE OR REPLACE FUNCTION cd2sync._progress(OUT pid int, OUT run_id bigint, OUT instance text,
                                  OUT table_name text, OUT phase text, OUT objects_done int,
                                  OUT objects_total int, OUT bytes_downloaded bigint,
                                  OUT bytes_decoded bigint, OUT records bigint)
RETURNS SETOF record LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'cd2_progress';

CREATE OR REPLACE FUNCTION cd2sync._instance_rel(target_schema text, table_name text)
RETURNS regclass LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass FROM cd2sync._table_place(target_schema, table_name) p
      JOIN pg_namespace n ON n.nspname = p.schema_name
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.rel_name
     WHERE c.relkind IN ('r', 'p')
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

CREATE OR REPLACE FUNCTION cd2sync._rel_table(rel regclass, OUT instance text, OUT table_name text,
                                   OUT shard_id bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.name, cd2sync._qualified(s.namespace, c.relname), i.shard_id
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN cd2sync.instances i ON n.nspname LIKE i.target_schema || '%'
      CROSS JOIN LATERAL cd2sync._instance_schemas(i.target_schema) s
     WHERE c.oid = rel AND s.schema_name = n.nspname
$$;

CREATE OR REPLACE FUNCTION cd2sync._check_tables(tables text[])
RETURNS text[] LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad text;
    clean text[];
BEGIN
    IF tables IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(tables) = 0 THEN
        RAISE EXCEPTION 'tables must name at least one table, or be NULL for every table'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(quote_literal(t), 'NULL') INTO bad
      FROM unnest(tables) t
     WHERE t IS NULL OR t !~ '^([a-z_]+\.)?([A-Za-z0-9_]{1,63}|\*)$'
        OR (strpos(t, '.') > 0 AND NOT split_part(t, '.', 1) = ANY (cd2sync._namespaces()))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid table name % in tables', bad
              USING ERRCODE = 'invalid_parameter_value',
                    DETAIL = 'A CD2 table is "table" (namespace canvas), "namespace.table" or "namespace.*", '
                             || 'a table name made of letters, digits and underscores; the namespaces are '
                             || array_to_string(cd2sync._namespaces(), ', ') || '.';
    END IF;
    SELECT array_agg(DISTINCT n ORDER BY n) INTO clean
      FROM unnest(tables) t, regexp_replace(t, '^canvas\.(?!\*$)', '') n;
    RETURN clean;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._check_settings(client_id text, client_secret text, api_url text,
                                        tables text[], shard_id bigint, schedule interval,
                                        target_schema text, full_resync_every interval DEFAULT NULL,
                                        keep_logs interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF client_id IS NULL OR client_id = '' THEN
        RAISE EXCEPTION 'client_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF client_secret IS NULL OR client_secret = '' THEN
        RAISE EXCEPTION 'client_secret must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF api_url IS NULL OR api_url !~* '^https?://[^/?#\s]+[^\s]*$' THEN
        RAISE EXCEPTION 'api_url must be an http or https URL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM cd2sync._check_tables(tables);
    IF shard_id < 0 OR shard_id >= 922337 THEN
        RAISE EXCEPTION 'shard_id must be between 0 and 922336' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF schedule <= interval '0' THEN
        RAISE EXCEPTION 'schedule must be a positive interval, or NULL for syncs on demand only'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF full_resync_every <= interval '0' THEN
        RAISE EXCEPTION 'full_resync_every must be a positive interval, or NULL for snapshots only when needed'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep_logs <= interval '0' THEN
        RAISE EXCEPTION 'keep_logs must be a positive interval, or NULL to keep canvas_logs history forever'
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF target_schema IS NOT NULL AND (target_schema = '' OR octet_length(target_schema) > 63
           OR EXISTS (SELECT 1 FROM cd2sync._instance_schemas(target_schema) x
                       WHERE x.schema_name ~ '^pg_'
                          OR x.schema_name IN ('cd2sync', 'cd2', 'cd2sync_load', 'information_schema', 'public')
                          OR x.schema_name IN (SELECT cd2sync._view_schema(ns) FROM unnest(cd2sync._namespaces()) ns))) THEN
        RAISE EXCEPTION 'target_schema "%" cannot be used', target_schema
              USING ERRCODE = 'invalid_schema_name',
                    DETAIL = 'It must be 1 to 63 bytes, and neither it nor <target_schema>_<namespace> a system schema, public, cd2, cd2_<namespace>, cd2sync or cd2sync_load.';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._check_target_schema(target_schema text, instance text)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    other text;
    s record;
BEGIN
    SELECT i.name INTO other
      FROM cd2sync.instances i
      JOIN cd2sync._instance_schemas(i.target_schema) a ON true
      JOIN cd2sync._instance_schemas(_check_target_schema.target_schema) b
        ON a.schema_name = b.schema_name
     WHERE i.name IS DISTINCT FROM _check_target_schema.instance
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'schema "%" is already the target of another instance', target_schema
              USING ERRCODE = 'duplicate_schema',
                    DETAIL = format('Instance %s keeps tables in a schema this one would use '
                                    '(a namespace''s tables go to <target_schema>_<namespace>).', other);
    END IF;
    FOR s IN SELECT * FROM cd2sync._instance_schemas(_check_target_schema.target_schema) LOOP
        PERFORM cd2sync._check_schema_owner(s.schema_name);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._check_remote_tables(api_url text, client_id text, client_secret text,
                                             tables text[])
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET cd2sync.http_retries = 2 AS $$
DECLARE
    ns text;
    remote text[];
    missing text[];
BEGIN
    IF tables IS NULL THEN
        RETURN;
    END IF;
    FOR ns IN SELECT DISTINCT cd2sync._namespace_of(t) FROM unnest(tables) t ORDER BY 1 LOOP
        BEGIN
            remote := cd2sync._remote_tables(api_url, client_id, client_secret, ns);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'could not check the tables of namespace % against the CD2 API: %', ns, SQLERRM
                  USING HINT = 'Tables the API does not list will fail at sync time.';
            CONTINUE;
        END;
        SELECT array_agg(t ORDER BY t) INTO missing FROM unnest(tables) t
         WHERE cd2sync._namespace_of(t) = ns AND NOT cd2sync._is_wildcard(t)
           AND NOT cd2sync._remote_name(t) = ANY (remote);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'the CD2 API does not list table(s) %', array_to_string(missing, ', ')
                  USING ERRCODE = 'undefined_table',
                        HINT = format('The API lists in namespace %s: %s', ns, array_to_string(remote, ', '));
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cd2_add_instance(
    name          text,
    client_id     text,
    client_secret text,
    api_url       text     DEFAULT 'https://api-gateway.instructure.com',
    tables        text[]   DEFAULT NULL,
    shard_id      bigint   DEFAULT NULL,
    schedule      interval DEFAULT NULL,
    target_schema text     DEFAULT NULL,
    full_resync_every interval DEFAULT NULL,
    keep_logs     interval DEFAULT NULL)
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
                                    target_schema, full_resync_every, keep_logs);
    IF EXISTS (SELECT 1 FROM cd2sync.instances i WHERE i.name = n) THEN
        RAISE EXCEPTION 'cd2sync instance "%" already exists', n USING ERRCODE = 'duplicate_object';
    END IF;
    PERFORM cd2sync._check_target_schema(coalesce(cd2_add_instance.target_schema, n), n);
    tables_clean := cd2sync._check_tables(tables);
    PERFORM cd2sync._check_remote_tables(api_url, client_id, client_secret, tables_clean);

    -- (no rows in the views yet: captures none, and keeps its rows' passes quiet)
    PERFORM cd2sync._feed_capture_instance(n, 'old');
    INSERT INTO cd2sync.instances (name, client_id, api_url, tables, shard_id, schedule, target_schema,
                                   full_resync_every, keep_logs)
    VALUES (n, client_id, api_url, tables_clean, shard_id, schedule,
            coalesce(cd2_add_instance.target_schema, n), full_resync_every, keep_logs);
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
    full_resync_every interval DEFAULT '-00:00:00.000001',
    keep_logs     interval DEFAULT '-00:00:00.000001')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old cd2sync.instances := cd2sync._check_instance(cd2_alter_instance.name);
    new cd2sync.instances := old;
    secret text;
    r record;
    moved boolean := false;
BEGIN
    SELECT s.client_secret INTO secret FROM cd2sync.instance_secrets s WHERE s.instance = old.name;
    new.client_id := coalesce(cd2_alter_instance.client_id, old.client_id);
    secret := coalesce(cd2_alter_instance.client_secret, secret);
    new.api_url := coalesce(cd2_alter_instance.api_url, old.api_url);
    IF tables IS NULL OR cardinality(tables) > 0 THEN
        new.tables := cd2sync._check_tables(tables);
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
    IF keep_logs IS DISTINCT FROM interval '-00:00:00.000001' THEN
        new.keep_logs := keep_logs;
    END IF;
    PERFORM cd2sync._check_settings(new.client_id, secret, new.api_url,
                                    CASE WHEN tables IS NULL OR cardinality(tables) > 0 THEN tables END,
                                    new.shard_id, new.schedule,
                                    CASE WHEN target_schema IS NOT NULL AND target_schema <> ''
                                         THEN target_schema END,
                                    new.full_resync_every, new.keep_logs);
    -- the stored secret is only ever sent where it was given for
    IF (new.api_url <> old.api_url OR new.client_id <> old.client_id)
       AND cd2_alter_instance.client_secret IS NULL THEN
        RAISE EXCEPTION 'changing api_url or client_id of cd2sync instance "%" needs its client_secret',
                        old.name
              USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Give client_secret too: the stored one is not sent to another URL or client.';
    END IF;
    IF new.target_schema <> old.target_schema THEN
        PERFORM cd2sync._check_target_schema(new.target_schema, old.name);
        -- the synced data moves with the instance, a schema per namespace
        FOR r IN SELECT o.schema_name AS old_schema, n.schema_name AS new_schema
                   FROM cd2sync._instance_schemas(old.target_schema) o
                   JOIN cd2sync._instance_schemas(new.target_schema) n USING (namespace)
                  WHERE to_regnamespace(quote_ident(o.schema_name)) IS NOT NULL LOOP
            IF to_regnamespace(quote_ident(r.new_schema)) IS NOT NULL THEN
                RAISE EXCEPTION 'schema "%" already exists', r.new_schema
                      USING ERRCODE = 'duplicate_schema';
            END IF;
            PERFORM cd2sync._check_schema_owner(r.old_schema);
            IF NOT moved THEN
                PERFORM cd2sync._drop_loading(old.target_schema, old.name);
                PERFORM cd2sync._lock_instance(old.name);
                PERFORM cd2sync._feed_capture_instance(old.name, 'old');
                moved := true;
            END IF;
            EXECUTE format('ALTER SCHEMA %I RENAME TO %I', r.old_schema, r.new_schema);
        END LOOP;
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
           full_resync_every = new.full_resync_every, keep_logs = new.keep_logs, updated_at = now()
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
    s record;
BEGIN
    IF drop_data IS NULL THEN
        RAISE EXCEPTION 'drop_data must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF drop_data THEN
        -- (nobody else's goes)
        PERFORM cd2sync._check_schema_owner(x.schema_name) FROM cd2sync._instance_schemas(old.target_schema) x;
    END IF;
    PERFORM cd2sync._lock_instance(old.name);
    PERFORM cd2sync._feed_capture_instance(old.name, 'old');
    PERFORM cd2sync._drop_loading(old.target_schema, old.name);   -- (a load apart is no data yet)
    DELETE FROM cd2sync.instances i WHERE i.name = old.name;
    -- the reconciled views stop reading the schema before it may go
    PERFORM cd2sync._reconcile_changed();
    PERFORM cd2sync._feed_capture_instance(old.name, 'new');   -- (no rows: gone from the views)
    IF drop_data THEN
        FOR s IN SELECT * FROM cd2sync._instance_schemas(old.target_schema) x
                  WHERE to_regnamespace(quote_ident(x.schema_name)) IS NOT NULL LOOP
            EXECUTE format('DROP SCHEMA %I CASCADE', s.schema_name);
        END LOOP;
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

CREATE OR REPLACE FUNCTION cd2sync._schema_columns(target_schema text, table_name text, doc json)
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

CREATE OR REPLACE FUNCTION cd2sync._alter_column_type(rel regclass, col text, new_type text, using_null boolean)
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
                   CASE WHEN using_null THEN format(' USING NULL::%s', new_type) ELSE '' END);

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

CREATE OR REPLACE FUNCTION cd2sync._pending_types(target_schema text, table_name text, doc json)
RETURNS jsonb LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_object_agg(s.column_name, s.type_sql)
      FROM cd2sync._schema_columns(target_schema, table_name, doc) s
      JOIN pg_attribute a ON a.attrelid = cd2sync._instance_rel(target_schema, table_name)
                         AND a.attname = s.column_name AND NOT a.attisdropped
     WHERE format_type(a.atttypid, a.atttypmod) <> s.type_sql
       AND NOT cd2sync._is_widening(format_type(a.atttypid, a.atttypmod), s.type_sql)
$$;

CREATE OR REPLACE FUNCTION cd2sync._log_column_of(table_name text, doc json)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.column_name FROM cd2sync._schema_columns('', table_name, doc) s
     WHERE cd2sync._namespace_of(table_name) = 'canvas_logs' AND s.column_name = 'timestamp'
       AND NOT s.is_key AND s.type_sql = 'timestamp without time zone'
$$;

CREATE OR REPLACE FUNCTION cd2sync._log_column(rel regclass)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.attname::text FROM pg_partitioned_table p
      JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = rel AND p.partstrat = 'r' AND p.partnatts = 1
$$;

CREATE OR REPLACE FUNCTION cd2sync._log_partitions(rel regclass)
RETURNS TABLE (part regclass, day timestamp)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass,
           CASE WHEN pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
                THEN (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamp END
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = rel
$$;

CREATE OR REPLACE FUNCTION cd2sync._make_partition(rel regclass, of_day timestamp)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    col text := cd2sync._log_column(rel);
    sch text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
    tab text := (SELECT relname FROM pg_class WHERE oid = rel);
    def regclass := (SELECT x.part FROM cd2sync._log_partitions(rel) x WHERE x.day IS NULL);
    d timestamp := date_trunc('day', of_day);
    cols text := (SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum) FROM pg_attribute
                   WHERE attrelid = rel AND attnum > 0 AND NOT attisdropped);
BEGIN
    IF EXISTS (SELECT 1 FROM cd2sync._log_partitions(rel) p WHERE p.day = d) THEN
        RETURN false;
    END IF;
    IF def IS NOT NULL THEN
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
    END IF;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._ensure_partitions(rel regclass, lo timestamp, hi timestamp)
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

CREATE OR REPLACE FUNCTION cd2sync._settle_partitions(rel regclass)
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

CREATE OR REPLACE FUNCTION cd2sync._log_upkeep(instance text, table_name text, watermark timestamptz, phase text)
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

CREATE OR REPLACE FUNCTION cd2sync._age_out(rel regclass, keep interval, upto timestamp)
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

CREATE OR REPLACE FUNCTION cd2sync._loading_name(target_schema text, table_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT 'load_' || md5(target_schema || '.' || table_name)
$$;

CREATE OR REPLACE FUNCTION cd2sync._drop_loading(target_schema text, instance text)
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

CREATE OR REPLACE FUNCTION cd2sync._loading_rel(target_schema text, table_name text)
RETURNS regclass LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'cd2sync_load' AND c.relname = cd2sync._loading_name(target_schema, table_name)
       AND c.relkind = 'r' AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

CREATE OR REPLACE FUNCTION cd2sync._finish_loading(target_schema text, table_name text, doc json)
RETURNS boolean LANGUAGE plpgsql
-- (the key's sort spills to disk beyond this: the worker's memory stays bounded)
SET search_path = pg_catalog, pg_temp SET maintenance_work_mem = '32MB' AS $$
DECLARE
    lrel regclass := cd2sync._loading_rel(target_schema, table_name);
    place record := cd2sync._table_place(target_schema, table_name);
    q text;
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
    -- the change feeds following it get its rows, as a load into the table
    -- in place would have given them (feeds.sql; cause as the transaction's)
    IF cd2sync._feed_follows(table_name) THEN
        q := cd2sync._feed_capture_sql(lrel, table_name, NULL, lrel::text);
        IF q IS NOT NULL THEN
            PERFORM cd2sync._feed_lock();
            EXECUTE q;
            PERFORM cd2sync._feed_notify(table_name);
        END IF;
    END IF;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._ensure_table(target_schema text, table_name text, doc json,
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
    logcol text := cd2sync._log_column(target);   -- a log's request time (part of its key)
    keyjoin_logical text;    -- keyjoin_typed without a log's request time: CD2's key
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
    SELECT string_agg(format('t.%1$I = d.%1$I', k), ' AND ') INTO keyjoin_logical
      FROM unnest(keys) k WHERE k IS DISTINCT FROM logcol;

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
    SELECT t.shard_id INTO shard FROM cd2sync._rel_table(target) t;
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
    -- (a partitioned table's rows are its partitions')
    SELECT sum(CASE WHEN c.reltuples >= 0 THEN c.reltuples ELSE pg_relation_size(c.oid) / 200.0 END)
      INTO target_rows FROM pg_class c
     WHERE c.oid = target OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = target);
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
        -- (a delete names CD2's key: a log's request time is not in it)
        EXECUTE format('DELETE FROM %s t USING cd2_typed d WHERE d.cd2_action = ''D'' AND %s',
                       target, keyjoin_logical);
    END IF;
    IF mode = 'snapshot' THEN
        -- rows the new snapshot does not have are gone upstream; a log's
        -- snapshot holds the API's window only: older rows are history
        EXECUTE format('DELETE FROM %s t WHERE NOT EXISTS (SELECT 1 FROM cd2_typed d WHERE %s)%s',
                       target, keyjoin_typed,
                       CASE WHEN logcol IS NOT NULL
                            THEN format(' AND t.%1$I >= (SELECT min(d.%1$I) FROM cd2_typed d
                                                          WHERE d.cd2_action IS DISTINCT FROM ''D'')', logcol)
                            ELSE '' END);
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
    IF has_rows AND shard IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = rel AND attname = 'id' AND NOT attisdropped
                      AND atttypid = 'bigint'::regtype) THEN   -- (web_logs' id is a uuid)
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

CREATE OR REPLACE FUNCTION cd2sync._resolve_users(rel regclass, shard bigint, changes boolean,
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
        IF changes IS NULL THEN
            EXECUTE format('UPDATE %s t SET %I = NULL WHERE %I IS NOT NULL', rel, rc, rc);
        END IF;
        IF NOT map_empty THEN
            EXECUTE format('UPDATE %s t SET %I = m.replacement_user_id FROM cd2sync.user_merge_map m
                             WHERE %s = m.superseded_user_id AND t.%I IS NULL%s',
                           rel, rc, cd2sync._resolved_expr(shard, c), rc, bound);
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

CREATE OR REPLACE FUNCTION cd2sync._record_user_moves(target regclass)
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
         SELECT %L, %L, t.id, cd2sync._global_id(%s, t.user_id), cd2sync._global_id(%s, d.user_id)
           FROM cd2_typed d JOIN %s t ON t.id = d.id
          WHERE d.cd2_action IS DISTINCT FROM ''D'' AND t.user_id <> d.user_id
         ON CONFLICT DO NOTHING',
        inst.name, tab, coalesce(inst.shard_id::text, 'NULL'), coalesce(inst.shard_id::text, 'NULL'), target);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._instance_tables(instance text)
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

CREATE OR REPLACE FUNCTION cd2sync._views()
RETURNS TABLE (table_name text, view regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT cd2sync._qualified(ns, c.relname), c.oid::regclass
      FROM unnest(cd2sync._namespaces()) ns
      JOIN pg_namespace n ON n.nspname = cd2sync._view_schema(ns)
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'v'
     WHERE NOT (ns = 'canvas' AND c.relname IN ('user_merges', 'reconciliation_health'))
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

CREATE OR REPLACE FUNCTION cd2sync.refresh_view(table_name text)
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

CREATE OR REPLACE FUNCTION cd2sync.refresh_views()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT DISTINCT s.table_name FROM cd2sync.table_state s
              UNION SELECT v.table_name FROM cd2sync._views() v LOOP
        PERFORM cd2sync.refresh_view(t);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_follows(table_name text)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM cd2sync.feed f
                    WHERE f.stale_since IS NULL
                      AND cd2sync._covers(f.tables, _feed_follows.table_name))
$$;

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
    SELECT i.* INTO inst FROM cd2sync.instances i JOIN cd2sync._rel_table(rel) t ON t.instance = i.name;
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
    tab text := (cd2sync._rel_table(TG_RELID)).table_name;   -- (its CD2 name: ns.table)
    -- (TRUNCATE: before it, every row of the table is deleted)
    q text := cd2sync._feed_capture_sql(TG_RELID, tab,
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
            PERFORM cd2sync._feed_notify(tab);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_notify(table_name text)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('cd2sync_feed', f.name) FROM cd2sync.feed f
     WHERE f.stale_since IS NULL AND cd2sync._covers(f.tables, _feed_notify.table_name)
$$;

CREATE OR REPLACE FUNCTION cd2sync._feed_check_limits()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lim record := cd2sync._feed_limits();
    f record;
    oldest timestamptz;
    pending bigint;
    why text;
BEGIN
    FOR f IN SELECT * FROM cd2sync.feed WHERE stale_since IS NULL ORDER BY name LOOP
        why := NULL;
        SELECT c.committed_at INTO oldest FROM cd2sync.changes c
         WHERE c.position > f.acknowledged
           AND (c.feed = f.name OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name)))
         ORDER BY c.position LIMIT 1;
        IF oldest < now() - make_interval(secs => lim.max_age_seconds) THEN
            why := format('a change waits since %s, longer than cd2sync.feed_max_age', oldest);
        ELSIF (SELECT max(position) FROM cd2sync.changes) - f.acknowledged > lim.max_pending THEN
            -- positions bound the count; count only when the bound is over
            SELECT count(*) INTO pending
              FROM (SELECT 1 FROM cd2sync.changes c
                     WHERE c.position > f.acknowledged
                       AND (c.feed = f.name OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name)))
                     LIMIT lim.max_pending + 1) x;
            IF pending > lim.max_pending THEN
                why := format('more than %s changes wait, over cd2sync.feed_max_pending', lim.max_pending);
            END IF;
        END IF;
        IF why IS NOT NULL THEN
            UPDATE cd2sync.feed x SET stale_since = now(), stale_reason = why WHERE x.name = f.name;
            RAISE WARNING 'cd2sync feed "%" is stale: %', f.name, why
                  USING HINT = 'Drop it and create it again; its changes are no longer kept.';
            PERFORM cd2sync._feed_forget(f.acknowledged);
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_forget(after bigint DEFAULT 0, upto bigint DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM cd2sync.changes c
     WHERE c.position > after AND (upto IS NULL OR c.position <= upto)
       AND NOT EXISTS (SELECT 1 FROM cd2sync.feed f
                        WHERE f.stale_since IS NULL AND f.acknowledged < c.position
                          AND (c.feed = f.name
                               OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name))));
END $$;

CREATE OR REPLACE FUNCTION cd2_create_feed(name text, tables text[] DEFAULT NULL, from_start boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n text := cd2_create_feed.name;
    t text;
    vw regclass;
    keys text[];
    start bigint;
BEGIN
    IF n IS NULL OR n !~ '^[a-z][a-z0-9_]{0,47}$' THEN
        RAISE EXCEPTION 'invalid feed name "%"', n
              USING ERRCODE = 'invalid_parameter_value',
                    DETAIL = 'A feed name is a lower-case letter followed by up to 47 lower-case letters, digits or underscores.';
    END IF;
    IF from_start IS NULL THEN
        RAISE EXCEPTION 'from_start must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    tables := cd2sync._check_tables(tables);
    IF EXISTS (SELECT 1 FROM cd2sync.feed f WHERE f.name = n) THEN
        RAISE EXCEPTION 'cd2sync feed "%" already exists', n USING ERRCODE = 'duplicate_object';
    END IF;

    -- the feed's row first: the capture triggers follow it. Making them
    -- waits for the syncs applying to those tables, and keeps new ones out
    -- until commit; then the lock on the changes orders the feed's start
    -- after every change already published.
    PERFORM cd2sync._ensure_layout();   -- (tables an earlier version made)
    INSERT INTO cd2sync.feed (name, tables, acknowledged)
    VALUES (n, tables, 0);
    PERFORM cd2sync._feed_ensure_captures();
    PERFORM cd2sync._feed_lock();
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO start FROM cd2sync.change_position_seq;
    UPDATE cd2sync.feed f SET acknowledged = start WHERE f.name = n;
    IF from_start THEN
        FOR t, vw IN SELECT v.table_name, v.view FROM cd2sync._views() v
                      WHERE cd2sync._covers(tables, v.table_name) ORDER BY 1 LOOP
            SELECT cd2sync._key_columns(x.rel) INTO keys FROM cd2sync._instances_with(t) x LIMIT 1;
            EXECUTE format(
                'INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
                 SELECT nextval(''cd2sync.change_position_seq''), %L, %L, ''insert'', %s, r->>''instance'', r, ''start''
                   FROM (SELECT to_jsonb(v) AS r FROM %s v) x',
                n, t, (SELECT 'jsonb_build_object(' || string_agg(format('%L, r->%L', k, k), ', ') || ')'
                         FROM unnest(keys) k), vw);
        END LOOP;
        IF EXISTS (SELECT 1 FROM cd2sync.changes c WHERE c.feed = n) THEN
            PERFORM pg_notify('cd2sync_feed', n);
        END IF;
    END IF;
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
       AND (c.feed = f.name OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name)))
     ORDER BY c.position
     LIMIT max_changes;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._after_apply(instance text, table_name text, mode text, changes bigint)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances := cd2sync._check_instance(instance);
    rel regclass := cd2sync._instance_rel(inst.target_schema, table_name);
    -- (the watermark the table held before: committed after this hook)
    held timestamptz := (SELECT s.watermark FROM cd2sync.table_state s
                          WHERE s.instance = _after_apply.instance AND s.table_name = _after_apply.table_name);
BEGIN
    IF changes > 0 AND rel IS NOT NULL THEN
        -- a first load gets its indexes now; rows a snapshot loaded
        -- straight by COPY get their replacements (_apply gives every row
        -- it writes its own)
        PERFORM cd2sync._ensure_bookkeeping(rel, inst.shard_id, table_name);
        IF cd2sync._log_column(rel) IS NOT NULL THEN
            -- a log's rows went in by COPY: those of users the map has get
            -- their replacements (from a day before what the table held:
            -- older partitions are history, left alone)
            PERFORM cd2sync._resolve_users(rel, inst.shard_id, false,
                (held - interval '1 day') AT TIME ZONE 'UTC');
        ELSIF mode = 'snapshot' THEN
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

CREATE OR REPLACE FUNCTION cd2sync._remote_tables(api_url text, client_id text, client_secret text,
                                       namespace text DEFAULT 'canvas')
RETURNS text[] AS 'MODULE_PATHNAME', 'cd2_remote_tables' LANGUAGE C;

CREATE OR REPLACE FUNCTION cd2_consistent_watermark(tables text[] DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION cd2sync._listings_needed(configured text[], asked text[])
RETURNS text[] LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT cd2sync._namespace_of(t) ORDER BY cd2sync._namespace_of(t)), '{}')
      FROM unnest(coalesce(asked, configured, '{canvas.*}')) t
     WHERE cd2sync._is_wildcard(t) OR (asked IS NOT NULL AND NOT t = ANY (coalesce(configured, '{}')))
$$;

CREATE OR REPLACE FUNCTION cd2sync._tables_to_sync(configured text[], asked text[], listed_ns text[],
                                        listed text[], failed_ns text[], failed_error text[],
                                        failed_code text[])
RETURNS TABLE (table_name text, error text, error_code text)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    ns text;
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
            FOR table_name IN SELECT cd2sync._qualified(ns, x.l) FROM unnest(listed_ns, listed) x(n, l)
                               WHERE x.n = ns AND NOT cd2sync._qualified(ns, x.l) = ANY (seen) LOOP
                seen := seen || table_name;
                error := NULL;
                error_code := NULL;
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

CREATE OR REPLACE FUNCTION cd2sync._on_drop_extension()
RETURNS event_trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_query() ~* 'cd2sync' THEN
        PERFORM pg_terminate_backend(a.pid, 10000)
           FROM pg_stat_activity a
          WHERE a.backend_type IN ('cd2sync sync worker', 'cd2sync load worker')
            AND a.datname = current_database();
    END IF;
END $$;

CREATE OR REPLACE VIEW cd2sync.progress AS
    SELECT p.pid, p.run_id, p.instance, p.table_name, p.phase, p.objects_done, p.objects_total,
           p.bytes_downloaded, p.bytes_decoded, p.records,
           coalesce(l.started_at, r.started_at) AS started_at
      FROM cd2sync._progress() p
      LEFT JOIN cd2sync.runs r ON r.run_id = p.run_id
      LEFT JOIN cd2sync.sync_log l ON l.run_id = p.run_id AND l.table_name = p.table_name;

CREATE OR REPLACE VIEW cd2sync.schedules AS
    SELECT i.name AS instance, i.schedule,
           CASE WHEN i.schedule IS NOT NULL
                THEN greatest(coalesce(l.started_at + i.schedule, now()), coalesce(l.started_at, now()))
           END AS next_run_at,
           EXISTS (SELECT 1 FROM cd2sync.runs r JOIN pg_catalog.pg_stat_activity a ON a.pid = r.worker_pid
                    WHERE r.instance = i.name AND r.status = 'running'
                      AND a.backend_type = 'cd2sync sync worker') AS running,
           l.run_id AS last_run_id, l.trigger AS last_trigger, l.started_at AS last_started_at,
           l.finished_at AS last_finished_at, l.status AS last_status, l.error AS last_error,
           i.full_resync_every,
           -- the next run from then on takes a snapshot of the tables then due
           CASE WHEN i.full_resync_every IS NOT NULL
                THEN (SELECT CASE WHEN count(*) = 0 OR bool_or(s.snapshot_at IS NULL) THEN now()
                                  ELSE min(s.snapshot_at) + i.full_resync_every END
                        FROM cd2sync.table_state s
                       WHERE s.instance = i.name AND cd2sync._covers(i.tables, s.table_name))
           END AS next_full_resync_at
      FROM cd2sync.instances i
      LEFT JOIN LATERAL (SELECT * FROM cd2sync.runs r WHERE r.instance = i.name
                          ORDER BY r.started_at DESC LIMIT 1) l ON true;

CREATE OR REPLACE VIEW cd2sync.feeds AS
    SELECT f.name, f.tables, f.acknowledged, p.pending, p.oldest_pending,
           CASE WHEN f.stale_since IS NULL THEN 'ok' ELSE 'stale' END AS status
      FROM cd2sync.feed f
      CROSS JOIN LATERAL (SELECT count(*) AS pending, min(c.committed_at) AS oldest_pending
                            FROM cd2sync.changes c
                           WHERE c.position > f.acknowledged AND f.stale_since IS NULL
                             AND (c.feed = f.name OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name)))) p;

-- privileges as src/sql/privileges.sql gives them
REVOKE ALL ON FUNCTION cd2_add_instance(text, text, text, text, text[], bigint, interval, text, interval, interval),
                       cd2_alter_instance(text, text, text, text, text[], bigint, interval, text, interval, interval)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cd2_add_instance(text, text, text, text, text[], bigint, interval, text, interval, interval),
                          cd2_alter_instance(text, text, text, text, text[], bigint, interval, text, interval, interval)
    TO cd2sync_admin;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA cd2sync FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cd2sync._covers(text[], text), cd2sync._namespace_of(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION cd2sync._progress() TO cd2sync_reader;
