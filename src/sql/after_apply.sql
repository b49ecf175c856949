-- after_apply.sql: what follows the apply of a table, in the transaction
-- that applies it. The sync worker calls cd2sync._after_apply once per table
-- sync, after the rows are in and before the watermark and the sync log are
-- written; everything that depends on synced rows hangs here, in this order:
--   1 a first load's lookup indexes, and the users' replacements of rows
--     loaded without them (cd2_<c> columns);
--   2 the merge map and the duplicates it reveals, when an input of the
--     resolver changed (and the replacements of every table, by the map's
--     difference: the change feeds see them as merges);
--   3 a table loaded new gives the change feeds its rows, as they are now;
--   4 the change feeds' limits.
-- And _before_apply, before the rows go in: what the change feeds need to
-- know of the transaction.

-- The tables whose rows are evidence of user merges (see refresh_user_merges)
CREATE FUNCTION cd2sync._merge_inputs()
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['users', 'pseudonyms', 'enrollments']
$$;

-- Before the apply of a table, in its transaction: the watermark this
-- transaction will commit for it, which the changes it writes carry (and
-- nothing else of cd2sync_tx.*: a default a database or role gives them is
-- not the sync's). And the table's capture triggers, when a feed follows
-- it and it has none: a feed made while the table was (neither saw the
-- other) takes its rows from this sync on. (A log's partitions are made
-- before, in a transaction of their own: _log_upkeep.)
CREATE FUNCTION cd2sync._before_apply(instance text, table_name text, watermark timestamptz)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel regclass := cd2sync._instance_rel((cd2sync._check_instance(instance)).target_schema, table_name);
BEGIN
    PERFORM cd2sync._tx_clear();
    PERFORM set_config('cd2sync_tx.applying', instance || '.' || table_name, true),
            set_config('cd2sync_tx.watermark', coalesce(watermark::text, ''), true),
            set_config('cd2sync_tx.cause', 'sync', true);
    IF rel IS NOT NULL THEN
        PERFORM cd2sync._feed_ensure_capture(rel, table_name);
    END IF;
END $$;

-- cd2sync_tx.*: what the steps of one transaction tell each other (the
-- table being applied and its watermark, the cause its changes carry, a
-- pass in progress, an instance or table whose rows the capture passes
-- over), until it commits. Anyone can set such a setting: the functions
-- that run as the owner (SECURITY DEFINER) begin by clearing them, so
-- that a caller's cannot change what they write to the change feeds.
CREATE FUNCTION cd2sync._tx_clear()
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('cd2sync_tx.' || s, '', true)
      FROM unnest(ARRAY['applying', 'watermark', 'cause', 'merge_pass', 'quiet_instance',
                        'loading_new', 'reloading', 'feeds_changing']) s
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
    since timestamp;
    p regclass;
BEGIN
    IF changes > 0 AND rel IS NOT NULL THEN
        -- a first load gets its indexes now; rows a snapshot loaded
        -- straight by COPY get their replacements (_apply gives every row
        -- it writes its own)
        PERFORM cd2sync._ensure_bookkeeping(rel, inst.shard_id, table_name);
        IF cd2sync._log_column(rel) IS NOT NULL THEN
            -- a log's rows went in by COPY: those of users the map has get
            -- their replacements: from a day before what the table held,
            -- and in each partition of an older day this transaction wrote
            -- into (late records: the statistics' count of its inserts,
            -- with track_counts on, as autovacuum needs); the other
            -- partitions are history, left alone
            since := (held - interval '1 day') AT TIME ZONE 'UTC';
            PERFORM cd2sync._resolve_users(rel, inst.shard_id, false, since);
            FOR p IN SELECT lp.part FROM cd2sync._log_partitions(rel) lp
                      WHERE (lp.day IS NULL OR lp.day < since)
                        AND pg_stat_get_xact_tuples_inserted(lp.part) > 0
                      ORDER BY lp.part::oid LOOP
                PERFORM cd2sync._resolve_users(p, inst.shard_id, false);
            END LOOP;
        ELSIF mode = 'snapshot' THEN
            PERFORM cd2sync._resolve_users(rel, inst.shard_id, false);
        END IF;
        PERFORM set_config('cd2sync_tx.cause', 'merge', true);
        IF table_name = ANY (cd2sync._merge_inputs()) THEN
            PERFORM cd2sync._refresh_user_merges();
        ELSIF cd2sync._duplicate_key(table_name) IS NOT NULL THEN
            PERFORM cd2sync._refresh_merge_duplicates(table_name);
        END IF;
    END IF;
    IF rel IS NOT NULL THEN
        -- a table loaded new: the feeds get its rows now, replacements and
        -- duplicate flags in (feeds.sql)
        PERFORM cd2sync._feed_load_end(rel);
    END IF;
    -- every sync's end: a feed over its age stale while nothing changes
    PERFORM cd2sync._feed_check_limits();
    PERFORM cd2sync._feed_sweep();
END $$;
