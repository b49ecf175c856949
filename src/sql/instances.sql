-- instances.sql: registering, changing and dropping Canvas instances.
--
-- These run as the extension's owner (SECURITY DEFINER with a fixed
-- search_path) so that the secrets table stays the owner's alone; EXECUTE is
-- revoked from PUBLIC.

-- Raises unless an instance of that name exists.
CREATE FUNCTION cd2sync._check_instance(instance text)
RETURNS cd2sync.instances LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r cd2sync.instances;
BEGIN
    SELECT * INTO r FROM cd2sync.instances i WHERE i.name = instance;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cd2sync instance "%" does not exist', instance
              USING ERRCODE = 'undefined_object',
                    HINT = 'See SELECT name FROM cd2sync.instances.';
    END IF;
    RETURN r;
END $$;

-- Whether objects of a role are ones cd2sync may write and read as its
-- owner: the extension's owner's, or a superuser's. Anyone else's table
-- would run its triggers, and a view its code, as that owner.
CREATE FUNCTION cd2sync._trusted_owner(owner oid)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT owner = (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'cd2sync')
        OR coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = owner), false)
$$;

-- Raises unless a target schema is missing (a sync creates it) or trusted
CREATE FUNCTION cd2sync._check_schema_owner(target_schema text)
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

-- The table of an instance that cd2sync may read and write: a plain or
-- partitioned table, it and its schema trusted (_trusted_owner); NULL when
-- there is none. What anyone else planted under that name is never read.
CREATE FUNCTION cd2sync._instance_rel(target_schema text, table_name text)
RETURNS regclass LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass FROM cd2sync._table_place(target_schema, table_name) p
      JOIN pg_namespace n ON n.nspname = p.schema_name
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.rel_name
     WHERE c.relkind IN ('r', 'p')
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

-- The instance and CD2 table name of an instance table, when it is one
CREATE FUNCTION cd2sync._rel_table(rel regclass, OUT instance text, OUT table_name text,
                                   OUT shard_id bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.name, cd2sync._qualified(s.namespace, c.relname), i.shard_id
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN cd2sync.instances i ON n.nspname LIKE i.target_schema || '%'
      CROSS JOIN LATERAL cd2sync._instance_schemas(i.target_schema) s
     WHERE c.oid = rel AND s.schema_name = n.nspname
$$;

-- Checks a tables argument (of an instance, a feed or a sync): NULL for
-- every canvas table, else CD2 table names ("table", "ns.table", "ns.*" for
-- every table the API lists in ns). The one owner of what a table name is.
-- Returns the names as stored: once each, sorted, "canvas." dropped.
CREATE FUNCTION cd2sync._check_tables(tables text[])
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

-- Checks the arguments shared by cd2_add_instance and cd2_alter_instance.
CREATE FUNCTION cd2sync._check_settings(client_id text, client_secret text, api_url text,
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

-- Raises when an instance with this target schema would keep tables in a
-- schema another instance keeps tables in (north_catalog is both north's
-- schema of namespace catalog and the target schema of an instance of
-- that name), or when one of its schemas belongs to an untrusted role.
CREATE FUNCTION cd2sync._check_target_schema(target_schema text, instance text)
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

-- Checks that the API lists every configured table, namespace by
-- namespace ("ns.*" only needs the namespace to be listed). A namespace or an
-- API that cannot be read gets a warning: the tables are checked again at
-- each sync, and a namespace the credential may not read fails its own
-- tables there.
CREATE FUNCTION cd2sync._check_remote_tables(api_url text, client_id text, client_secret text,
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

CREATE FUNCTION cd2_add_instance(
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
    PERFORM cd2sync._tx_clear();
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

-- Arguments not given keep their value. Given as NULL, tables, shard_id,
-- schedule, target_schema and full_resync_every go back to cd2_add_instance's
-- defaults (every table, no shard, on demand only, the instance name, no
-- periodic snapshots). The defaults below are
-- markers for "not given" that no valid value can take.
CREATE FUNCTION cd2_alter_instance(
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
    PERFORM cd2sync._tx_clear();
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
        -- ids change in the views: not under a sync's capture, which has
        -- the old shard in its statement's snapshot
        PERFORM cd2sync._lock_instance(old.name);
        PERFORM cd2sync._feed_capture_instance(old.name, 'old');
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

-- Forgets an instance (its configuration, secret and watermarks); its synced
-- data stays unless drop_data. The sync log keeps its history.
CREATE FUNCTION cd2_drop_instance(name text, drop_data boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    old cd2sync.instances := cd2sync._check_instance(cd2_drop_instance.name);
    s record;
BEGIN
    PERFORM cd2sync._tx_clear();
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

-- The instance's sync lock, one advisory lock key (52517, hashtext(instance))
-- that shows in pg_locks: a sync worker holds it for its run (hold 'run' waits
-- for it, 'try_run' does not; both until the session ends), changes of an
-- instance for their transaction ('try_xact'). Says whether it is held.
CREATE FUNCTION cd2sync._sync_lock(instance text, hold text)
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

-- Takes the instance's sync lock for the rest of the transaction unless a
-- sync of it runs in another session; says whether it did.
CREATE FUNCTION cd2sync._try_lock_instance(instance text)
RETURNS boolean LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT cd2sync._sync_lock(instance, 'try_xact')
$$;

-- Takes the instance's sync lock for the rest of the transaction, or fails
-- at once when a sync of it is running.
CREATE FUNCTION cd2sync._lock_instance(instance text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT cd2sync._try_lock_instance(instance) THEN
        RAISE EXCEPTION 'a sync of cd2sync instance "%" is running', instance
              USING ERRCODE = 'object_in_use',
                    HINT = 'Wait for it to finish, or cancel it with pg_cancel_backend().';
    END IF;
END $$;

-- Instances changed: rebuild the reconciled views and the merge map.
-- (Defined in reconcile.sql's terms; resolved when called.)
CREATE FUNCTION cd2sync._reconcile_changed()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM cd2sync.refresh_views();
    PERFORM cd2sync._refresh_user_merges();
END $$;

