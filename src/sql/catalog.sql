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
-- be too long for a name: _ns_schema says so). NULL for a namespace that is
-- not one of _namespaces(): no place (its name could be another namespace's,
-- or another instance's, schema).
CREATE FUNCTION cd2sync._ns_schema_name(target_schema text, namespace text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN target_schema
                WHEN namespace = ANY (cd2sync._namespaces()) THEN target_schema || '_' || namespace END
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
