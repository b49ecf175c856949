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
    SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = target_schema AND c.relname = table_name AND c.relkind IN ('r', 'p')
       AND cd2sync._trusted_owner(c.relowner) AND cd2sync._trusted_owner(n.nspowner)
$$;

-- Checks a tables argument (of an instance, a feed or a sync): NULL for
-- every table, else CD2 table names. The one owner of what a table name is.
CREATE FUNCTION cd2sync._check_tables(tables text[])
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

-- Checks the arguments shared by cd2_add_instance and cd2_alter_instance.
CREATE FUNCTION cd2sync._check_settings(client_id text, client_secret text, api_url text,
                                        tables text[], shard_id bigint, schedule interval,
                                        target_schema text, full_resync_every interval DEFAULT NULL)
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
    IF target_schema IS NOT NULL AND (target_schema = '' OR octet_length(target_schema) > 63
           OR target_schema ~ '^pg_' OR target_schema IN ('cd2sync', 'cd2', 'information_schema', 'public')) THEN
        RAISE EXCEPTION 'target_schema "%" cannot be used', target_schema
              USING ERRCODE = 'invalid_schema_name',
                    DETAIL = 'It must be 1 to 63 bytes and not a system schema, public, cd2 or cd2sync.';
    END IF;
END $$;

-- Checks that the API lists every configured table. An API that cannot be
-- reached gets a warning: the tables are checked again at each sync.
CREATE FUNCTION cd2sync._check_remote_tables(api_url text, client_id text, client_secret text,
                                             tables text[])
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET cd2sync.http_retries = 2 AS $$
DECLARE
    remote text[];
    missing text[];
BEGIN
    IF tables IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        remote := cd2sync._remote_tables(api_url, client_id, client_secret);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'could not check the tables against the CD2 API: %', SQLERRM
              USING HINT = 'Tables the API does not list will fail at sync time.';
        RETURN;
    END;
    SELECT array_agg(t ORDER BY t) INTO missing FROM unnest(tables) t WHERE NOT t = ANY (remote);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'the CD2 API does not list table(s) %', array_to_string(missing, ', ')
              USING ERRCODE = 'undefined_table',
                    HINT = 'The API lists: ' || array_to_string(remote, ', ');
    END IF;
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

-- Forgets an instance (its configuration, secret and watermarks); its synced
-- data stays unless drop_data. The sync log keeps its history.
CREATE FUNCTION cd2_drop_instance(name text, drop_data boolean DEFAULT false)
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

