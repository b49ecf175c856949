-- catalog.sql: what cd2sync knows: the names of CD2 tables across
-- namespaces, instances, their secrets, the state of each synced table (its
-- watermark), runs and the sync log.
--
-- The extension script never creates the per-instance target schemas: the
-- sync worker creates them at run time (so that a distributed layer such as
-- Citus can own them).

\echo Use "CREATE EXTENSION cd2sync" to load this file. \quit

CREATE SCHEMA cd2sync;
CREATE SCHEMA cd2;

-- ---------------------------------------------------------------------------
-- Namespaces. A CD2 table is named as users see it: "table" in namespace
-- canvas, "ns.table" in another (canvas_logs.web_logs). The functions below
-- are the one owner of what that name means: its namespace, its name in the
-- API, the schema an instance keeps it in (canvas: the target schema; ns:
-- <target_schema>_<ns>) and the schema of its reconciled view (cd2, cd2_<ns>).
-- ---------------------------------------------------------------------------

CREATE FUNCTION cd2sync._namespaces()
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['canvas', 'canvas_logs', 'new_quizzes', 'catalog']
$$;

-- The schema an instance keeps the tables of a namespace in (its name; may
-- be too long for a name: _ns_schema says so)
CREATE FUNCTION cd2sync._ns_schema_name(target_schema text, namespace text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN target_schema ELSE target_schema || '_' || namespace END
$$;

CREATE FUNCTION cd2sync._ns_schema(target_schema text, namespace text)
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

-- The namespace of a CD2 table name, and its name in that namespace
-- (plain SQL expressions: the planner inlines them)
CREATE FUNCTION cd2sync._namespace_of(table_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN strpos(table_name, '.') > 0 THEN split_part(table_name, '.', 1) ELSE 'canvas' END
$$;

CREATE FUNCTION cd2sync._remote_name(table_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT substr(table_name, strpos(table_name, '.') + 1)
$$;

-- A CD2 table name taken apart: its namespace, its name in the API, and the
-- schema (and table) an instance with that target schema keeps it in
CREATE FUNCTION cd2sync._table_place(target_schema text, table_name text,
                                     OUT namespace text, OUT remote_name text,
                                     OUT schema_name text, OUT rel_name text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT cd2sync._namespace_of(table_name), cd2sync._remote_name(table_name),
           cd2sync._ns_schema(target_schema, cd2sync._namespace_of(table_name)),
           cd2sync._remote_name(table_name)
$$;

-- The name of a table of a namespace, as users see it
CREATE FUNCTION cd2sync._qualified(namespace text, remote_name text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN remote_name ELSE namespace || '.' || remote_name END
$$;

-- The schema of a namespace's reconciled views: cd2, cd2_<ns>
CREATE FUNCTION cd2sync._view_schema(namespace text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN 'cd2' ELSE 'cd2_' || namespace END
$$;

-- The reconciled view of a CD2 table: cd2.<table>, cd2_<ns>.<table>
CREATE FUNCTION cd2sync._view_name(table_name text, OUT schema_name text, OUT view_name text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT cd2sync._view_schema(cd2sync._namespace_of(table_name)), cd2sync._remote_name(table_name)
$$;

-- The schemas an instance with this target schema may keep tables in, one
-- per namespace (whether they exist or not)
CREATE FUNCTION cd2sync._instance_schemas(target_schema text)
RETURNS TABLE (namespace text, schema_name text)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ns, cd2sync._ns_schema_name(target_schema, ns)
      FROM unnest(cd2sync._namespaces()) ns
     WHERE octet_length(cd2sync._ns_schema_name(target_schema, ns)) <= 63
$$;

-- Whether a CD2 table name stands for the tables of its namespace ("ns.*")
CREATE FUNCTION cd2sync._is_wildcard(table_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT table_name LIKE '%.*'
$$;

-- Whether an instance syncing these tables (NULL: every canvas table) syncs
-- the given one (a name, or "ns.*")
CREATE FUNCTION cd2sync._covers(tables text[], table_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN tables IS NULL THEN cd2sync._namespace_of(table_name) = 'canvas'
                ELSE table_name = ANY (tables) OR cd2sync._namespace_of(table_name) || '.*' = ANY (tables) END
$$;


-- One Canvas instance = one CD2 credential = one target schema.
CREATE TABLE cd2sync.instances (
    name          text PRIMARY KEY
                  CONSTRAINT instance_name_format CHECK (name ~ '^[a-z][a-z0-9_]{0,47}$'),
    client_id     text NOT NULL CHECK (client_id <> ''),
    api_url       text NOT NULL DEFAULT 'https://api-gateway.instructure.com'
                  CHECK (api_url ~* '^https?://[^/?#]+'),
    tables        text[],
    shard_id      bigint CHECK (shard_id >= 0 AND shard_id < 922337),
    schedule      interval CHECK (schedule > interval '0'),
    target_schema name NOT NULL UNIQUE,
    -- a fresh snapshot of each table at least this often (NULL: only when needed)
    full_resync_every interval CHECK (full_resync_every > interval '0'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- local history of namespace canvas_logs (web_logs) kept this long (NULL: forever)
    keep_logs     interval CHECK (keep_logs > interval '0')
);

-- Client secrets live apart, readable by the extension's owner only.
CREATE TABLE cd2sync.instance_secrets (
    instance      text PRIMARY KEY REFERENCES cd2sync.instances ON DELETE CASCADE,
    client_secret text NOT NULL
);

-- The state of each synced table. watermark is the CD2 "at" (snapshot) or
-- "until" (incremental) of the last result applied in full, committed with
-- the rows it describes.
CREATE TABLE cd2sync.table_state (
    instance       text NOT NULL REFERENCES cd2sync.instances ON DELETE CASCADE,
    table_name     text NOT NULL,
    watermark      timestamptz,
    schema_version int,
    synced_at      timestamptz,
    status         text NOT NULL DEFAULT 'new',
    last_error     text,
    watermark_raw  text,     -- the watermark exactly as the API wrote it
    columns        text[],   -- the columns of the upstream schema
    snapshot_at    timestamptz,  -- when the last snapshot was applied
    pending_types  jsonb,    -- column -> upstream type, awaiting a fresh snapshot
    PRIMARY KEY (instance, table_name)
);

CREATE SEQUENCE cd2sync.run_id_seq;

-- One row per run (a sync of one instance).
CREATE TABLE cd2sync.runs (
    run_id        bigint PRIMARY KEY,
    instance      text NOT NULL,
    tables        text[],
    full_sync     boolean NOT NULL DEFAULT false,
    trigger       text NOT NULL DEFAULT 'manual',   -- manual (cd2_sync_now/start) or schedule
    worker_pid    int,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running',
    error         text,
    error_code    text
);

-- One row per (run, table): the history of every table sync.
CREATE TABLE cd2sync.sync_log (
    run_id            bigint NOT NULL,
    instance          text NOT NULL,
    table_name        text NOT NULL,
    mode              text,
    status            text NOT NULL DEFAULT 'running',
    rows_upserted     bigint NOT NULL DEFAULT 0,
    rows_deleted      bigint NOT NULL DEFAULT 0,
    rows_unchanged    bigint NOT NULL DEFAULT 0,
    oversized_kept    bigint NOT NULL DEFAULT 0,
    objects           int NOT NULL DEFAULT 0,
    bytes_downloaded  bigint NOT NULL DEFAULT 0,
    job_id            text,
    schema_version    int,
    watermark_before  timestamptz,
    watermark         timestamptz,
    started_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    job_seconds       float8,
    load_seconds      float8,
    finished_at       timestamptz,
    seconds           float8,
    error             text,
    error_code        text,
    PRIMARY KEY (run_id, table_name)
);
CREATE INDEX ON cd2sync.sync_log (instance, table_name, started_at);

-- When each instance syncs next, whether it runs now, how its last run went.
-- A run of any kind (manual or scheduled) restarts the schedule's clock.
CREATE VIEW cd2sync.schedules AS
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

-- What each running sync worker is doing, as it publishes it in shared
-- memory (src/progress.c): table and counts NULL while the run is not at a table.
CREATE FUNCTION cd2sync._progress(OUT pid int, OUT run_id bigint, OUT instance text,
                                  OUT table_name text, OUT phase text, OUT objects_done int,
                                  OUT objects_total int, OUT bytes_downloaded bigint,
                                  OUT bytes_decoded bigint, OUT records bigint)
RETURNS SETOF record LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'cd2_progress';

CREATE VIEW cd2sync.progress AS
    SELECT p.pid, p.run_id, p.instance, p.table_name, p.phase, p.objects_done, p.objects_total,
           p.bytes_downloaded, p.bytes_decoded, p.records,
           coalesce(l.started_at, r.started_at) AS started_at
      FROM cd2sync._progress() p
      LEFT JOIN cd2sync.runs r ON r.run_id = p.run_id
      LEFT JOIN cd2sync.sync_log l ON l.run_id = p.run_id AND l.table_name = p.table_name;

CREATE VIEW cd2sync.watermarks AS
    SELECT instance, table_name, watermark, schema_version, synced_at, status, last_error
      FROM cd2sync.table_state;

-- pg_dump keeps the configuration (secrets included: dumps are the owner's).
SELECT pg_catalog.pg_extension_config_dump('cd2sync.instances', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.instance_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.table_state', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.runs', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.sync_log', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.run_id_seq', '');

-- (privileges: src/sql/privileges.sql)
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

-- Forgets an instance (its configuration, secret and watermarks); its synced
-- data stays unless drop_data. The sync log keeps its history.
CREATE FUNCTION cd2_drop_instance(name text, drop_data boolean DEFAULT false)
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
-- (the table is about to be reloaded). Raises, changing nothing, when a view
-- cannot be created again (it uses the column in a way the new type does not
-- allow) or is something this cannot rebuild (a materialized view, a view
-- with triggers or rules, a view other objects depend on).
CREATE FUNCTION cd2sync._alter_column_type(rel regclass, col text, new_type text, using_null boolean)
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
-- NULL when no type changed: none was pending, or a view on a column cannot
-- be created again, in which case the table keeps its types, with a
-- warning, and the change is not asked for again. Other errors (a lock
-- timeout, a deadlock) fail the table sync, and the next one tries again.
CREATE FUNCTION cd2sync._apply_pending_types(instance text, table_name text, target regclass)
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    pending jsonb;
    c record;
    n bigint;
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
        EXECUTE format('DELETE FROM %s', target);
        GET DIAGNOSTICS n = ROW_COUNT;
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
-- straight (not through the parent: the change feeds saw them already).
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
-- apply.sql: from the staging table to the target table, set-based.
--
-- The decoder (src/decode.c) COPYs each result file into pg_temp.cd2_stage,
-- one text column per target column plus cd2_action and cd2_ts. These
-- functions cast, de-duplicate and apply the whole result with a handful of
-- statements, in the caller's transaction: the rows and the watermark
-- commit together.

-- The type a target column has in the staging table. Untyped: text, cast
-- by _apply. Typed: the column's own type (COPY parses the values, and a
-- value that does not parse fails the load: the caller then loads through an
-- untyped table), except strings (text: an oversized placeholder must reach
-- _apply, which keeps the stored value, and a varchar(n) is enforced by
-- assignment there), JSON arrays (text, converted by _apply) and timestamps
-- (timestamptz: CD2 writes them with an offset).
CREATE FUNCTION cd2sync._stage_type(typid oid, typmod int, typed boolean)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN NOT typed OR t.typcategory IN ('A', 'S') THEN 'text'
                WHEN typid = 'timestamp'::regtype THEN 'timestamp with time zone'
                ELSE format_type(typid, typmod) END
      FROM pg_type t WHERE t.oid = typid
$$;

-- The staging table of a target table: cd2_action, cd2_ts and the target's
-- columns, typed or all text (see _stage_type); not its cd2_ bookkeeping
-- (reconcile.sql keeps it).
CREATE FUNCTION cd2sync._create_staging(target regclass, typed boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    IF to_regclass('pg_temp.cd2_stage') IS NOT NULL THEN
        DROP TABLE pg_temp.cd2_stage, pg_temp.cd2_stage_json;
    END IF;
    EXECUTE format('CREATE TEMP TABLE cd2_stage (cd2_action text, cd2_ts text%s) ON COMMIT DROP',
        (SELECT string_agg(format(', %I %s', attname, cd2sync._stage_type(atttypid, atttypmod, typed)),
                           '' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = target AND attnum > 0 AND NOT attisdropped
            AND attname NOT LIKE 'cd2\_%'));
    CREATE TEMP TABLE cd2_stage_json (line text) ON COMMIT DROP;
END $$;

-- Moves JSON lines from cd2_stage_json into cd2_stage: "key" and "value"
-- members by name (a member absent from "value" is NULL), "meta" too.
CREATE FUNCTION cd2sync._expand_jsonl(target regclass)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    keys text[] := cd2sync._key_columns(target);
    cols text;
    exprs text;
    n bigint;
BEGIN
    -- (cast to the staging column's type: a no-op when it is text)
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('(j->%L->>%L)::%s', CASE WHEN a.attname = ANY (keys) THEN 'key' ELSE 'value' END,
                             a.attname, format_type(st.atttypid, st.atttypmod)), ', ' ORDER BY a.attnum)
      INTO cols, exprs
      FROM pg_attribute a
      JOIN pg_attribute st ON st.attrelid = 'pg_temp.cd2_stage'::regclass AND st.attname = a.attname
     WHERE a.attrelid = target AND a.attnum > 0 AND NOT a.attisdropped;
    EXECUTE format('INSERT INTO cd2_stage (cd2_action, cd2_ts, %s)
                    SELECT j->''meta''->>''action'', j->''meta''->>''ts'', %s
                      FROM (SELECT line::jsonb AS j FROM cd2_stage_json WHERE line ~ ''\S'') l',
                   cols, exprs);
    GET DIAGNOSTICS n = ROW_COUNT;
    TRUNCATE cd2_stage_json;
    RETURN n;
END $$;

-- The primary key columns of a table, in key order.
CREATE FUNCTION cd2sync._key_columns(target regclass)
RETURNS text[] LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(a.attname::text ORDER BY k.i)
      FROM pg_index x
      CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, i)
      JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
     WHERE x.indrelid = target AND x.indisprimary
$$;

-- A JSON array's text as a PostgreSQL array literal; anything else as is.
CREATE FUNCTION cd2sync._pg_array_text(v text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(ltrim(v), 1) = '['
                THEN (SELECT coalesce(array_agg(x), '{}')::text
                        FROM pg_catalog.jsonb_array_elements_text(v::jsonb) x)
                ELSE v END
$$;

-- The expression that turns staged s.<col> into the column's type; typed:
-- the staging column has the type _stage_type gave it.
CREATE FUNCTION cd2sync._cast_expr(col text, typid oid, typmod int, typed boolean DEFAULT false)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN typid = 'timestamp'::regtype
            THEN format(CASE WHEN typed THEN '(s.%I AT TIME ZONE ''UTC'')'
                             ELSE '(s.%I::timestamptz AT TIME ZONE ''UTC'')' END, col)
        WHEN t.typcategory = 'A'
            THEN format('cd2sync._pg_array_text(s.%I)::%s', col, format_type(typid, typmod))
        WHEN typed OR typid IN ('text'::regtype, 'varchar'::regtype)
            THEN format('s.%I', col)   -- assignment enforces varchar(n)
        ELSE format('s.%I::%s', col, format_type(typid, typmod)) END
      FROM pg_type t WHERE t.oid = typid
$$;

-- Applies the staged result to the target table.
--   mode 'snapshot_new': the table is empty: insert every row;
--   mode 'snapshot': the result replaces the table's contents (upsert every
--        row, delete rows the result lacks), without ever emptying it;
--   mode 'incremental': upsert records with action U, delete those with D.
-- fill: the columns the result carries (NULL: all); others are left alone.
-- typed: the staging table was made with typed => true.
-- A value "__cd2_oversized_truncated__" never replaces a stored value.
-- Rows whose values did not change are not rewritten.
CREATE FUNCTION cd2sync._apply(target regclass, mode text, fill text[] DEFAULT NULL,
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

-- The columns to fill: those the result's files carry (NULL: all) that the
-- upstream schema still has (NULL: not known).
CREATE FUNCTION cd2sync._fill_columns(carried text[], upstream text[])
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN upstream IS NULL THEN carried
                ELSE ARRAY(SELECT c FROM unnest(coalesce(carried, upstream)) c
                            WHERE c = ANY (upstream)) END
$$;
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
-- Returns true when it was (re)made.
CREATE FUNCTION cd2sync._ensure_index(rel regclass, suffix text, expr text, pred text DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text := left(format('%s_%s', (SELECT relname FROM pg_class WHERE oid = rel), suffix), 63);
    nsp text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
    idx regclass := to_regclass(format('%I.%I', nsp, name));
    want text := 'cd2sync: ' || expr || coalesce(' WHERE ' || pred, '');
BEGIN
    IF idx IS NOT NULL AND obj_description(idx, 'pg_class') IS NOT DISTINCT FROM want THEN
        RETURN false;
    END IF;
    IF idx IS NOT NULL THEN
        EXECUTE format('DROP INDEX %s', idx);
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
BEGIN
    -- locks in one order: a change feed's positions (a sync that wrote
    -- changes holds them), then the map
    IF EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        PERFORM cd2sync._feed_lock();
    END IF;
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
BEGIN
    DELETE FROM cd2sync.merge_duplicates d WHERE d.table_name = _refresh_merge_duplicates.table_name;
    IF dupkey IS NULL THEN
        RETURN 0;
    END IF;
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
-- returns true (done whole); else false.
CREATE FUNCTION cd2sync._resolve_due(instance text, only_lockable boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
BEGIN
    IF only_lockable AND NOT cd2sync._try_lock_instance(instance) THEN
        INSERT INTO cd2sync.resolve_due (instance) VALUES (instance) ON CONFLICT DO NOTHING;
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cd2sync.resolve_due d WHERE d.instance = _resolve_due.instance) THEN
        RETURN false;
    END IF;
    PERFORM set_config('cd2sync_tx.cause', 'merge', true);
    FOR t IN SELECT * FROM cd2sync._instance_tables(instance) LOOP
        PERFORM cd2sync._resolve_users(t.rel, t.shard_id, false);
        IF cd2sync._duplicate_key(t.table_name) IS NOT NULL THEN
            PERFORM cd2sync._duplicate_flags(instance, t.table_name, t.rel);
        END IF;
    END LOOP;
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
-- one's type (text for enums). NULL when no instance has the table.
CREATE FUNCTION cd2sync._view_columns(table_name text, OUT cols text[], OUT types jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(attname ORDER BY first_seen), jsonb_object_agg(attname, typ)
      FROM (SELECT a.attname::text AS attname,
                   min(i.ord * 10000 + a.attnum) AS first_seen,
                   max(CASE WHEN t.typtype = 'e' THEN 'text' ELSE format_type(a.atttypid, a.atttypmod) END) AS typ
              FROM (SELECT rel, row_number() OVER () AS ord FROM cd2sync._instances_with(table_name)) i
              JOIN pg_attribute a ON a.attrelid = i.rel AND a.attnum > 0 AND NOT a.attisdropped
                                 AND a.attname NOT LIKE 'cd2\_%'
              JOIN pg_type t ON t.oid = a.atttypid
             GROUP BY a.attname) x
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
        IF types->>c = 'bigint' AND (c = 'id' OR c LIKE '%\_id') THEN
            g := cd2sync._global_expr(shard, format('t.%I', c));
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
                          AND r.ev_class <> 'cd2.user_merges'::regclass) THEN
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
-- feeds.sql: change feeds. A feed follows the reconciled rows (cd2.<table>)
-- of some tables for a downstream system: every insert, update and delete
-- of those rows, in the order they became visible, until the feed
-- acknowledges them.
--
-- How: a statement trigger with transition tables, on each instance table
-- that some feed follows, writes what the statement did to the table's rows,
-- seen as cd2.<table> shows them, to cd2sync.changes at once, in the
-- statement's transaction; positions are taken under a lock held until
-- commit, so that they grow in commit order.
--
-- What a row looks like is said once, by cd2sync._view_select
-- (reconcile.sql); so the images a feed carries are the view's rows.

CREATE TABLE cd2sync.feed (
    name          text PRIMARY KEY,
    tables        text[],                 -- NULL: every table
    acknowledged  bigint NOT NULL,        -- everything up to here is processed
    created_at    timestamptz NOT NULL DEFAULT now(),
    stale_since   timestamptz,            -- fell behind cd2sync.feed_max_pending / feed_max_age
    stale_reason  text,
    acknowledged_at timestamptz           -- when acknowledged last moved (cd2sync.monitoring)
);

-- Positions: taken only under the lock on cd2sync.changes (see _feed_lock)
CREATE SEQUENCE cd2sync.change_position_seq;

-- The changes of every feed, until each feed that follows them has
-- acknowledged them. Publishable with PostgreSQL's logical replication:
--   CREATE PUBLICATION cd2sync_changes FOR TABLE cd2sync.changes WITH (publish = 'insert');
CREATE TABLE cd2sync.changes (
    position      bigint PRIMARY KEY,
    feed          text,                   -- NULL: every feed following table_name; else that feed's start
    table_name    text NOT NULL,
    op            text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    key           jsonb NOT NULL,
    instance      text NOT NULL,
    "row"         jsonb,
    changed       text[],
    cause         text NOT NULL CHECK (cause IN ('start', 'sync', 'merge', 'resync')),
    watermark     timestamptz,
    committed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE VIEW cd2sync.feeds AS
    SELECT f.name, f.tables, f.acknowledged, p.pending, p.oldest_pending,
           CASE WHEN f.stale_since IS NULL THEN 'ok' ELSE 'stale' END AS status
      FROM cd2sync.feed f
      CROSS JOIN LATERAL (SELECT count(*) AS pending, min(c.committed_at) AS oldest_pending
                            FROM cd2sync.changes c
                           WHERE c.position > f.acknowledged AND f.stale_since IS NULL
                             AND (c.feed = f.name OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name)))) p;

CREATE FUNCTION cd2sync._feed_limits(OUT max_pending bigint, OUT max_age_seconds int)
AS 'MODULE_PATHNAME', 'cd2_feed_limits' LANGUAGE C STRICT;

-- The names of the columns whose values differ between two rows of the same
-- columns (NULL: none): what an update changed (src/feeds.c)
CREATE FUNCTION cd2sync._changed_columns(old record, new record)
RETURNS text[] AS 'MODULE_PATHNAME', 'cd2_changed_columns' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Raises unless the feed exists; returns it
CREATE FUNCTION cd2sync._check_feed(name text)
RETURNS cd2sync.feed LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cd2sync.feed;
BEGIN
    SELECT * INTO f FROM cd2sync.feed x WHERE x.name = _check_feed.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cd2sync feed "%" does not exist', name
              USING ERRCODE = 'undefined_object', HINT = 'See SELECT name FROM cd2sync.feeds.';
    END IF;
    RETURN f;
END $$;

-- Whether any feed (not stale) follows the table
CREATE FUNCTION cd2sync._feed_follows(table_name text)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM cd2sync.feed f
                    WHERE f.stale_since IS NULL
                      AND cd2sync._covers(f.tables, _feed_follows.table_name))
$$;

-- ---------------------------------------------------------------------------
-- Capture
-- ---------------------------------------------------------------------------

-- Takes positions: the lock on cd2sync.changes is held until the
-- transaction ends, so a transaction that writes changes later waits for
-- this one to commit and takes higher positions.
CREATE FUNCTION cd2sync._feed_lock()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    LOCK TABLE cd2sync.changes IN EXCLUSIVE MODE;
END $$;

-- The statement that writes, as changes, what a statement did to instance
-- table rel, reading its rows before from relation old_src and after from
-- new_src (a trigger's transition tables, or the table itself): both as
-- cd2.<table> shows them (_view_select). An update pairs the two by key and
-- is a change only when a column of the view changed. NULL when there is
-- nothing to write: rel is not an instance's table (any more), or its
-- instance is changing as a whole (_feed_capture_instance says what).
-- cause: NULL for the transaction's (cd2sync_tx.cause, set by the step that
-- writes: _apply, _after_apply, ...; else 'sync').
CREATE FUNCTION cd2sync._feed_capture_sql(rel regclass, table_name text, old_src text, new_src text,
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

-- The capture trigger of a followed instance table: one per statement, its
-- transition tables visible to this function's statements only (a TRUNCATE,
-- which has none, is captured before it, from the table). Changes are
-- written at once, with positions taken under _feed_lock: in the
-- transaction that writes the rows (a failure or a crash leaves none).
CREATE FUNCTION cd2sync._feed_capture()
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

-- NOTIFY cd2sync_feed, payload the feed, for each feed following the table
-- (delivered at commit; repeats within a transaction are folded)
CREATE FUNCTION cd2sync._feed_notify(table_name text)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('cd2sync_feed', f.name) FROM cd2sync.feed f
     WHERE f.stale_since IS NULL AND cd2sync._covers(f.tables, _feed_notify.table_name)
$$;

-- Gives an instance table its capture triggers when a feed follows the
-- table, and takes them away when none does.
CREATE FUNCTION cd2sync._feed_ensure_capture(rel regclass, table_name text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    wanted boolean := cd2sync._feed_follows(table_name);
    has boolean := EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'cd2_feed_insert');
BEGIN
    IF wanted AND NOT has THEN
        EXECUTE format('CREATE TRIGGER cd2_feed_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS cd2_new
                        FOR EACH STATEMENT EXECUTE FUNCTION cd2sync._feed_capture()', rel);
        EXECUTE format('CREATE TRIGGER cd2_feed_update AFTER UPDATE ON %s
                        REFERENCING OLD TABLE AS cd2_old NEW TABLE AS cd2_new
                        FOR EACH STATEMENT EXECUTE FUNCTION cd2sync._feed_capture()', rel);
        EXECUTE format('CREATE TRIGGER cd2_feed_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS cd2_old
                        FOR EACH STATEMENT EXECUTE FUNCTION cd2sync._feed_capture()', rel);
        EXECUTE format('CREATE TRIGGER cd2_feed_truncate BEFORE TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION cd2sync._feed_capture()', rel);
    ELSIF has AND NOT wanted THEN
        EXECUTE format('DROP TRIGGER cd2_feed_insert ON %s', rel);
        EXECUTE format('DROP TRIGGER cd2_feed_update ON %s', rel);
        EXECUTE format('DROP TRIGGER cd2_feed_delete ON %s', rel);
        EXECUTE format('DROP TRIGGER cd2_feed_truncate ON %s', rel);
    END IF;
END $$;

-- Every instance table's triggers, after the feeds changed
CREATE FUNCTION cd2sync._feed_ensure_captures()
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

-- A change to an instance itself (added, dropped, a new shard_id or target
-- schema) changes its rows in the views wholesale: side 'old', before it,
-- writes a delete for each of its followed rows; side 'new', after it, an
-- insert (cause 'resync'). In between its rows are not captured
-- (cd2sync_tx.quiet_instance) as passes bring them up to date.
CREATE FUNCTION cd2sync._feed_capture_instance(instance text, side text)
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

-- Marks stale, with a WARNING, every feed that fell behind
-- cd2sync.feed_max_pending changes or cd2sync.feed_max_age, and forgets
-- the changes no other feed waits for. (The capture triggers of tables no
-- feed follows any more go with the next change to the feeds or instances.)
CREATE FUNCTION cd2sync._feed_check_limits()
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

-- Deletes the changes with positions in (after, upto] that no feed waits
-- for any more: every feed that follows them (and is not stale) has
-- acknowledged them. Only an acknowledgement, a feed dropped or gone stale
-- can make a change forgettable: each forgets within what it moved.
CREATE FUNCTION cd2sync._feed_forget(after bigint DEFAULT 0, upto bigint DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM cd2sync.changes c
     WHERE c.position > after AND (upto IS NULL OR c.position <= upto)
       AND NOT EXISTS (SELECT 1 FROM cd2sync.feed f
                        WHERE f.stale_since IS NULL AND f.acknowledged < c.position
                          AND (c.feed = f.name
                               OR (c.feed IS NULL AND cd2sync._covers(f.tables, c.table_name))));
END $$;

-- ---------------------------------------------------------------------------
-- The SQL surface
-- ---------------------------------------------------------------------------

CREATE FUNCTION cd2_create_feed(name text, tables text[] DEFAULT NULL, from_start boolean DEFAULT false)
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

CREATE FUNCTION cd2_drop_feed(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cd2sync.feed := cd2sync._check_feed(name);
BEGIN
    DELETE FROM cd2sync.feed x WHERE x.name = f.name;
    PERFORM cd2sync._feed_ensure_captures();
    PERFORM cd2sync._feed_forget(f.acknowledged);
END $$;

-- The changes after the feed's acknowledged position, in position order,
-- without advancing it.
CREATE FUNCTION cd2_feed_read(name text, max_changes int DEFAULT 10000)
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

-- Everything up to position upto is processed. Less than before: a no-op;
-- never past the last change published.
CREATE FUNCTION cd2_feed_ack(name text, upto bigint)
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

SELECT pg_catalog.pg_extension_config_dump('cd2sync.feed', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.changes', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.change_position_seq', '');
-- after_apply.sql: what follows the apply of a table, in the transaction
-- that applies it. The sync worker calls cd2sync._after_apply once per table
-- sync, after the rows are in and before the watermark and the sync log are
-- written; everything that depends on synced rows hangs here, in this order:
--   1 a first load's lookup indexes, and the users' replacements of rows
--     loaded without them (cd2_<c> columns);
--   2 the merge map and the duplicates it reveals, when an input of the
--     resolver changed (and the replacements of every table, by the map's
--     difference: the change feeds see them as merges);
--   3 the change feeds' limits.
-- And _before_apply, before the rows go in: what the change feeds need to
-- know of the transaction.

-- The tables whose rows are evidence of user merges (see refresh_user_merges)
CREATE FUNCTION cd2sync._merge_inputs()
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['users', 'pseudonyms', 'enrollments']
$$;

-- Before the apply of a table, in its transaction: the watermark this
-- transaction will commit for it, which the changes it writes carry. (A
-- log's partitions are made before, in a transaction of their own:
-- _log_upkeep.)
CREATE FUNCTION cd2sync._before_apply(instance text, table_name text, watermark timestamptz)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('cd2sync_tx.applying', instance || '.' || table_name, true),
           set_config('cd2sync_tx.watermark', coalesce(watermark::text, ''), true),
           set_config('cd2sync_tx.cause', 'sync', true);
$$;

-- instance, table_name: the table just applied; mode: the sync log's mode;
-- changes: rows the apply inserted, updated or deleted. The feeds have the
-- sync's changes already (its rows as the views show them, users resolved
-- by the map as it was); what a new map changes follows, cause 'merge'.
CREATE FUNCTION cd2sync._after_apply(instance text, table_name text, mode text, changes bigint)
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
-- monitoring.sql: one view for a monitoring system to poll (postgres_exporter,
-- Nagios; docs/monitoring.md has a ready query file and alert rules).
--
-- A row per synced table of each instance (an instance that has synced
-- nothing yet: one row with name NULL), and a row per change feed:
--   status                'ok', 'failing' (its last sync failed) or 'never'
--                         (no sync has succeeded); a feed: 'ok' or 'stale'
--   seconds_behind        now - watermark (NULL while there is none); a
--                         feed: the age of its oldest unacknowledged change
--                         (0 when it has none); a stale feed: since when
--                         it is stale (its changes are dropped)
--   last_success          the last successful sync; a feed: its last
--                         acknowledgement that moved it
--   consecutive_failures  failed syncs of the table since its last success
--                         (a feed: 0)
--   last_rows, last_bytes rows upserted and deleted, and bytes downloaded,
--                         by the table's last finished sync; a feed: its
--                         pending changes, and NULL
--   last_error            why the last sync failed, why a feed went stale
-- A table's figures are read through the index on cd2sync.sync_log:
-- polling costs the same however long the history is. A feed's count its
-- pending changes (as cd2sync.feeds does).

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

-- (privileges: src/sql/privileges.sql)
-- privileges.sql: who may do what. Nothing is granted to PUBLIC but the use
-- of the schemas: synced data, the sync history and the merge map are
-- personal data, and secrets are the owner's alone.
--
--   cd2sync_reader: read the synced schemas (granted as they are created),
--                   the reconciled views, watermarks, runs, sync log,
--                   schedules, progress; resolve user ids.
--   cd2sync_reader also reads and acknowledges change feeds, and reads
--                   cd2sync.monitoring.
--   pg_monitor (PostgreSQL's role for monitoring systems): cd2sync.monitoring
--                   but its last_error (an error may quote a value).
--   cd2sync_admin:  all of the reader's, plus configure instances, start
--                   syncs, create and drop change feeds. Never the secrets: they are read by the extension's
--                   owner only (SECURITY DEFINER functions with a fixed
--                   search_path, and the sync workers, which run as the owner).
--
-- The roles are cluster-wide: created here when missing, kept by DROP EXTENSION.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'cd2sync_reader') THEN
        CREATE ROLE cd2sync_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'cd2sync_admin') THEN
        CREATE ROLE cd2sync_admin NOLOGIN;
    END IF;
END $$;
GRANT cd2sync_reader TO cd2sync_admin;

REVOKE ALL ON ALL TABLES IN SCHEMA cd2sync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA cd2sync FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA cd2sync FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA cd2 FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2_add_instance(text, text, text, text, text[], bigint, interval, text, interval, interval),
                       cd2_alter_instance(text, text, text, text, text[], bigint, interval, text, interval, interval),
                       cd2_drop_instance(text, boolean),
                       cd2_sync_now(text, text[], boolean),
                       cd2_sync_start(text, text[], boolean),
                       cd2_watermark(text, text),
                       cd2_consistent_watermark(text[]),
                       cd2_global_id(text, bigint),
                       cd2_resolve_user(bigint),
                       cd2_create_feed(text, text[], boolean),
                       cd2_drop_feed(text),
                       cd2_feed_read(text, integer),
                       cd2_feed_ack(text, bigint)
    FROM PUBLIC;
GRANT USAGE ON SCHEMA cd2sync, cd2 TO PUBLIC;

-- reader
GRANT SELECT ON cd2sync.watermarks, cd2sync.sync_log, cd2sync.runs, cd2sync.schedules,
                cd2sync.progress, cd2.user_merges, cd2.reconciliation_health, cd2sync.feeds,
                cd2sync.monitoring
    TO cd2sync_reader;
GRANT EXECUTE ON FUNCTION cd2_watermark(text, text), cd2_consistent_watermark(text[]),
                          cd2_global_id(text, bigint), cd2_resolve_user(bigint),
                          cd2sync.reconciliation_health(),
                          cd2_feed_read(text, integer), cd2_feed_ack(text, bigint)
    TO cd2sync_reader;

-- what the views call is checked for whoever reads them: the pure name
-- rules for all, the workers' progress for the readers of cd2sync.progress
GRANT EXECUTE ON FUNCTION cd2sync._covers(text[], text), cd2sync._namespace_of(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION cd2sync._progress() TO cd2sync_reader;

-- monitoring systems
GRANT SELECT (kind, instance, name, status, watermark, seconds_behind, last_success,
              consecutive_failures, last_rows, last_bytes)
    ON cd2sync.monitoring TO pg_monitor;

-- admin: configuration (no secrets) and syncs
GRANT SELECT ON cd2sync.instances TO cd2sync_admin;     -- secrets live apart
GRANT USAGE ON SEQUENCE cd2sync.run_id_seq TO cd2sync_admin;
GRANT EXECUTE ON FUNCTION cd2_add_instance(text, text, text, text, text[], bigint, interval, text, interval, interval),
                          cd2_alter_instance(text, text, text, text, text[], bigint, interval, text, interval, interval),
                          cd2_drop_instance(text, boolean),
                          cd2_sync_now(text, text[], boolean),
                          cd2_sync_start(text, text[], boolean),
                          cd2sync._check_instance(text),
                          cd2_create_feed(text, text[], boolean),
                          cd2_drop_feed(text)
    TO cd2sync_admin;

-- DROP EXTENSION must not wait behind a running sync (its worker holds
-- locks on the catalog tables): it stops this database's sync workers first.
CREATE FUNCTION cd2sync._on_drop_extension()
RETURNS event_trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_query() ~* 'cd2sync' THEN
        PERFORM pg_terminate_backend(a.pid, 10000)
           FROM pg_stat_activity a
          WHERE a.backend_type IN ('cd2sync sync worker', 'cd2sync load worker')
            AND a.datname = current_database();
    END IF;
END $$;
REVOKE ALL ON FUNCTION cd2sync._on_drop_extension() FROM PUBLIC;
CREATE EVENT TRIGGER cd2sync_drop_extension ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION') EXECUTE FUNCTION cd2sync._on_drop_extension();
