-- after_apply.sql: what follows the apply of a table, in the transaction
-- that applies it. The sync worker calls cd2sync._after_apply once per table
-- sync, after the rows are in and before the watermark and the sync log are
-- written; everything that depends on synced rows hangs here, in this order:
--   1 the users' replacements of the rows the sync wrote (cd2_<c> columns);
--   2 the change feeds: what the sync did to the reconciled rows;
--   3 the merge map and the duplicates it reveals, when an input of the
--     resolver changed (and the replacements of every table, by the map's
--     difference), and what that did to the reconciled rows.

-- The tables whose rows are evidence of user merges (see refresh_user_merges)
CREATE FUNCTION cd2sync._merge_inputs()
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['users', 'pseudonyms', 'enrollments']
$$;

-- instance, table_name: the table just applied; mode: the sync log's mode;
-- changes: rows the apply inserted, updated or deleted; watermark: the one
-- this transaction commits for the table. The feeds get the sync's changes
-- first (its rows as the views show them, users resolved by the map as it
-- was), then what a new map changed (cause 'merge').
CREATE FUNCTION cd2sync._after_apply(instance text, table_name text, mode text, changes bigint,
                                     watermark timestamptz)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances := cd2sync._check_instance(instance);
    rel regclass := to_regclass(format('%I.%I', inst.target_schema, table_name));
BEGIN
    IF changes > 0 AND rel IS NOT NULL THEN
        PERFORM cd2sync._resolve_users(rel, inst.shard_id, false);
    END IF;
    PERFORM cd2sync._feed_publish(instance, table_name, watermark);
    IF changes > 0 AND rel IS NOT NULL THEN
        PERFORM set_config('cd2sync_tx.cause', 'merge', true);
        IF table_name = ANY (cd2sync._merge_inputs()) THEN
            PERFORM cd2sync._refresh_user_merges();
        ELSIF cd2sync._duplicate_key(table_name) IS NOT NULL THEN
            PERFORM cd2sync._refresh_merge_duplicates(table_name);
        END IF;
        PERFORM cd2sync._feed_publish();
    END IF;
END $$;
