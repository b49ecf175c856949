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
--   last_error            why the last sync failed, why a feed is stale
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
           x.acknowledged_at, 0, f.pending, NULL,
           coalesce(x.stale_reason, cd2sync._feed_over_limits(f.pending, f.oldest_pending))
      FROM cd2sync.feeds f JOIN cd2sync.feed x ON x.name = f.name;

-- (privileges: src/sql/privileges.sql)
