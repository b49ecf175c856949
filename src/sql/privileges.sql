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
-- and limit rules for all (the limits are settings anyone can SHOW), the
-- workers' progress for the readers of cd2sync.progress
GRANT EXECUTE ON FUNCTION cd2sync._covers(text[], text), cd2sync._namespace_of(text),
                          cd2sync._feed_limits(), cd2sync._feed_over_limits(bigint, timestamptz),
                          cd2sync._feed_since(cd2sync.feed, cd2sync.feed_hint),
                          cd2sync._feed_counted(cd2sync.feed, cd2sync.feed_hint) TO PUBLIC;
GRANT EXECUTE ON FUNCTION cd2sync._progress() TO cd2sync_reader;
GRANT EXECUTE ON FUNCTION cd2sync._feed_pending(text) TO cd2sync_reader, pg_monitor;

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
