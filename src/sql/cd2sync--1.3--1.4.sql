-- cd2sync 1.3 -> 1.4. Every function 1.4 changes, as the install script
-- (src/sql/*.sql) makes it; t/012_upgrade.pl checks that an updated
-- database and a fresh install of 1.4 have the same objects.
-- * A new table loaded apart gets its bookkeeping columns and partial
--   indexes before its rows (a load fills none of them), and builds the
--   others after with 64MB of maintenance_work_mem: a parallel worker each.
--   _ensure_index finds such an index by what it is and gives it its name.
-- * A log (web_logs) whose column type changes upstream keeps its history:
--   stored values are converted through their text, or kept in a column
--   cd2_<column>_before_<day> when they do not convert
--   (_apply_pending_types, _alter_column_type's via_text).
-- * A namespace's schema that is another instance's target schema (two
--   instances of 1.2) fails that namespace's tables instead of sharing it
--   (_ensure_table).
-- * A change feed captures each row as a statement changes it: an AFTER
--   ROW trigger in C (_feed_capture_row, src/capture.c) evaluates the
--   view's select list (_feed_row_plan) over the old and new rows and
--   inserts the changes itself, where 1.3's statement triggers paired
--   transition tables by a join; the instance tables' triggers are
--   replaced (below, and by _ensure_layout). Images are made by _row_image
--   (C: to_jsonb's, each column's conversion looked up once per row type);
--   an image over 2 kB is compressed with lz4 where the server has it.
--   _changed_columns is gone (the trigger compares), _feed_capture handles
--   TRUNCATE only.
-- * A log's type change gives the feeds following it a delete and an insert
--   of each row it converts (_feed_capture_table, also what
--   _feed_capture_instance now does for each of an instance's tables).
-- * Change feeds, after review: a merge pass gives a row one update
--   (_feed_merge_begin/_end, pg_temp.cd2_merge_before); a table loaded new
--   gives one insert per row once its replacements are in (_feed_load_begin/
--   _end); creations and drops take turns (_feed_changing) and only they
--   take triggers away; the capture writes nothing when no live feed
--   follows (_feeds_following, asked under the lock); a feed over its limits
--   is stale at once (_feed_over_limits, cd2sync.feeds, cd2sync.monitoring);
--   a log's rows moving partitions and a reload for a type change say no
--   more than they should; _resolve_users writes a row only if it changes.
-- * cd2sync.changes keeps its pages through a VACUUM (vacuum_truncate off).
-- * The functions that run as the owner clear cd2sync_tx.* first
--   (_tx_clear); a log followed by a feed takes its records through the
--   staging table (_feed_captures, asked by the sync worker).
-- * A user's index on an instance table's id column (say course_id) gets an
--   index on the column's global ids beside it, which serves the view
--   (_ensure_global_indexes, from the bookkeeping); _ensure_index never
--   drops nor takes the name of an index it did not make.
-- * _before_apply clears cd2sync_tx.* and gives a followed table without
--   capture triggers its triggers before the sync writes it.
-- * A log's late records loaded by COPY (into a day's partition older than
--   a day before the held watermark) get their users' replacements
--   (_after_apply).
-- * cd2_feed_read, _feed_check_limits and cd2_feed_ack read the first (or
--   last) changes in the key's order, never by a sort or an aggregate over
--   every change (the planner, misled by the table's statistics, chose
--   that): _last_position; cd2_create_feed counts what it inserts; an
--   acknowledgement deletes the changes it covers without reading the
--   later ones (_feed_forget). A feed's hints (cd2sync.feed_hint, a
--   table apart, which a consumer's transaction never waits for nor
--   fails by) say how far it is known to have no change (scanned_to, kept
--   by _feed_check_limits: nothing pending, or the first pending change
--   after many of other feeds): its checks, reads, pending count and
--   acknowledgements no longer go through the changes other feeds have
--   not acknowledged, each time. A check that counts a feed's pending
--   changes (positions over cd2sync.feed_max_pending since its
--   acknowledged one) remembers the count (counted_*), which
--   acknowledgements keep, and the next counts only after it. The limits'
--   mark never waits for a feed's row (a deadlock with a drop or an
--   acknowledgement of the feed), and is not made when the feed was
--   acknowledged since the check read it (the count may hold changes
--   gone); an acknowledgement holds the feed's row from its start.
-- * An acknowledgement, a drop or a stale mark forgets only the feed's own
--   changes (_feed_forget(f, ...)): two transactions no longer delete the
--   same change (a REPEATABLE READ acknowledgement failed when another
--   feed's acknowledgement deleted a change in its range first). Two feeds
--   acknowledging a change at once each left it, for good; a sync's end,
--   an acknowledgement and a drop now sweep what no feed waits for
--   (_feed_sweep, up to _feed_settled_to: every feed's _feed_since, in the
--   sweep's own snapshot), never waiting for a lock or a row, and never in
--   a read (a consumer's open transaction would hold up syncs).
-- * A limits check marks a feed stale only at a sync's end and where that
--   cannot fail (READ COMMITTED, not read-only), and returns the feeds over
--   their limits it did not mark; a read checks its own feed alone
--   (_feed_check_limits(reader)) and marks nothing (a mark's delete would
--   hold the changes' lock while the consumer's transaction stays open):
--   cd2_feed_read refuses a feed over its limits in a read-only (standby)
--   or REPEATABLE READ transaction too, and fails when the feed was marked
--   or dropped while it read. An acknowledgement of a stale feed forgets
--   nothing (its changes went as it went stale). The end of every table's
--   sync checks the limits and sweeps (_after_apply), whether it changed
--   rows or not (a feed over its age while nothing changes); a mark then
--   never waits for the lock on the changes its forgetting takes (left to
--   a later check); the sync and load workers run in READ COMMITTED
--   whatever the database's default.
-- * cd2sync.feeds (and cd2sync.monitoring, which reads it) counts a feed's
--   pending changes after what a check counted, while the count holds
--   (_feed_counted, the rule _feed_check_limits follows), and finds the
--   oldest by the key, instead of counting every pending change at each
--   read; without JIT (_feed_pending), which compiled the counts at each
--   read. A sync's check counts a feed that many positions (100,000) lie
--   after what was counted, under its limit too, so that the view's
--   reads count only after it. No function that turns a plan type off is compiled by JIT
--   either (_last_position, _feed_check_limits, cd2_feed_read, _feed_sweep).
-- * _feed_sweep takes the changes to delete, and its bound, once per
--   statement (an InitPlan), by the key (no bitmap scan), without JIT: with
--   the statistics of an
--   emptied and vacuumed cd2sync.changes the planner read them again for
--   each change it deleted, the bound compiled again each time.
-- * An acknowledgement deletes nothing: it only moves the feed's position
--   (its delete held the lock on the changes, which every sync's capture
--   takes, until the consumer's transaction ended, and waited for a sync's
--   transaction). _feed_sweep (the end of every table's sync, a drop, and
--   the scheduler's every look, a batch a transaction) deletes what each
--   feed acknowledged since the last sweep (feed_hint.forgotten_to) that no
--   other feed waits for (_feeds_awaiting), never waiting, and returns how
--   many it deleted; a drop or a stale mark forgets from where sweeps left
--   the feed (_feed_kept_after). cd2sync.feeds takes the oldest pending
--   change's time from _feed_pending (the view's join to the changes became
--   a scan of them all when the statistics said the table was small).
-- * Which changes are a feed's is said once, by _feed_has (inlined where
--   it is called), instead of in each of the nine queries that asked.
-- * An instance's run that brings its rows up to a map another's sync
--   changed (_resolve_due) does it in a merge pass: a row whose user and
--   grader both moved gets one update, not one per column.
-- * A feed created while a sync loads a table new, which it cannot see yet,
--   no longer leaves that table without capture triggers: the load's end
--   gives them under the lock on the changes (_feed_load_end), and the
--   creation looks again once it has that lock (cd2_create_feed).
-- * A real column widened to double precision is converted through its
--   text (_ensure_table): 0.1 stays 0.1, as the views showed it and the
--   change feeds' images say, instead of 0.10000000149011612.
-- * A shard change takes the instance's lock, as a schema move does
--   (cd2_alter_instance): a sync's capture had the old shard in its
--   statement's snapshot.
-- * Refreshes of the merge duplicates take the map's lock (after the
--   changes', as _refresh_user_merges does): two instances' syncs ending
--   together collided on the set they each inserted again (23505), and
--   the second table's sync failed (_refresh_merge_duplicates).
-- * A reconciled view's column whose type differs between instances (one
--   widened it first) takes the type they all widen to, else text
--   (_view_columns): the text max() of the types took integer over bigint
--   (out of range), varchar(255) over varchar(1024) (cut) and real over
--   double precision (rounded). A real not yet widened shows through its
--   text (_view_select), as it will once widened.
-- * A login's or enrolment's move that the row made back since (a split)
--   is no evidence of a merge (_refresh_user_merges); a move made again is
--   dated again (_record_user_moves).
-- * A table name the API lists that is not a plain name (a dot in it would
--   place it in another namespace's, or another instance's, schema) fails
--   that table (_tables_to_sync), and a namespace that is not one of
--   cd2sync's has no schema (_ns_schema_name: NULL).
-- * A feed's drop waits for no sync: it takes a table's triggers and
--   forgets its changes only if the table and the changes' lock are free at
--   once (a sync holding that lock and writing the table next deadlocked
--   with it); what it leaves, the sweeps and the next creation or drop take
--   (cd2_drop_feed, _feed_ensure_capture).
\echo Use "ALTER EXTENSION cd2sync UPDATE TO '1.4'" to load this file. \quit

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE cd2sync.changes ALTER COLUMN "row" SET COMPRESSION lz4;
    END IF;
END $$;
-- A VACUUM leaves the table its pages, emptied of acknowledged changes,
-- for the changes to come: no VACUUM takes the exclusive lock that giving
-- pages back needs, which readers and syncs would queue behind (and a
-- standby's readers be cancelled by), and the changes go into pages the
-- table has instead of extending the file a page at a time (PostgreSQL
-- 15), which was faster or the same in docs/performance.md's measures.
-- (After a burst, VACUUM FULL cd2sync.changes gives the space back.)
ALTER TABLE cd2sync.changes SET (vacuum_truncate = false, toast.vacuum_truncate = false);
-- What checks of the limits learned of a feed, so that its checks, reads,
-- pending count and acknowledgements touch fewer changes the next time
-- (_feed_check_limits writes them). Hints, apart from cd2sync.feed: any
-- session's check writes them, and a consumer's transaction never waits
-- for that nor fails by it (a REPEATABLE READ acknowledgement could not
-- update a row that a check updated after its snapshot); a hint that
-- cannot be kept true at once is left to be no longer valid. A row is the
-- feed's of that name made at created_at (_feed_hint): a feed made again
-- starts with none known.
CREATE TABLE cd2sync.feed_hint (
    name          text NOT NULL,
    created_at    timestamptz NOT NULL,
    -- no change of the feed has a position in (acknowledged, scanned_to]
    -- (a check found none before the feed's first pending change, or the
    -- last position; a later change takes a higher position): a feed with
    -- nothing pending, or whose next change lies after many of other
    -- feeds, does not look again through the changes other feeds have not
    -- acknowledged. NULL: not known.
    scanned_to    bigint,
    -- what a check counted, so that the next counts only after it: the feed
    -- has counted_pending changes in (counted_from, counted_to]. A change
    -- waiting is deleted only when the feed acknowledges it, and later
    -- changes take higher positions: it holds while the feed's acknowledged
    -- position is counted_from, which an acknowledgement keeps true by
    -- taking off the changes it covers (cd2_feed_ack), or leaves false.
    -- NULL: none.
    counted_from    bigint,
    counted_to      bigint,
    counted_pending bigint,
    -- the feed's acknowledged changes up to here were forgotten
    -- (_feed_sweep): those after it, up to its acknowledged position, are
    -- left to the next sweep. An acknowledgement deletes nothing (see
    -- cd2_feed_ack). Set when the feed is made.
    forgotten_to    bigint,
    PRIMARY KEY (name, created_at),
    CHECK (num_nulls(counted_from, counted_to, counted_pending) IN (0, 3))
);

-- (1.3's acknowledgements forgot what they acknowledged)
INSERT INTO cd2sync.feed_hint (name, created_at, forgotten_to) SELECT name, created_at, acknowledged FROM cd2sync.feed;
SELECT pg_catalog.pg_extension_config_dump('cd2sync.feed_hint', '');
REVOKE ALL ON cd2sync.feed_hint FROM PUBLIC;   -- (as privileges.sql for every table)

-- The one owner of which changes are a feed's (see feeds.sql)
CREATE OR REPLACE FUNCTION cd2sync._feed_has(f cd2sync.feed, feed text, table_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT _feed_has.feed = f.name OR (_feed_has.feed IS NULL AND cd2sync._covers(f.tables, _feed_has.table_name))
$$;

-- The feed's hints (cd2sync.feed_hint); NULL when none
CREATE OR REPLACE FUNCTION cd2sync._feed_hint(f cd2sync.feed)
RETURNS cd2sync.feed_hint LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT h FROM cd2sync.feed_hint h WHERE h.name = f.name AND h.created_at = f.created_at
$$;

-- The position after which feed f's changes lie, given its hints h
-- (_feed_hint): its acknowledged one, or where a check found none before
CREATE OR REPLACE FUNCTION cd2sync._feed_since(f cd2sync.feed, h cd2sync.feed_hint)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(f.acknowledged, h.scanned_to)
$$;

-- What a check counted of feed f's pending changes that still holds, given
-- its hints h: the count, and the position after which to count the rest.
-- A count holds while the feed's acknowledged position is the one it
-- counted from: the changes it counted (up to a position already visible,
-- and positions become visible in order) are deleted only by the feed's
-- own acknowledgement or stale mark, or by a sweep below every live feed.
CREATE OR REPLACE FUNCTION cd2sync._feed_kept_after(f cd2sync.feed, h cd2sync.feed_hint)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT least(h.forgotten_to, cd2sync._feed_since(f, h))
$$;


CREATE OR REPLACE FUNCTION cd2sync._feed_counted(f cd2sync.feed, h cd2sync.feed_hint, OUT counted bigint, OUT after bigint)
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN h.counted_from = f.acknowledged THEN h.counted_pending ELSE 0 END,
           CASE WHEN h.counted_from = f.acknowledged THEN greatest(h.counted_to, cd2sync._feed_since(f, h))
                ELSE cd2sync._feed_since(f, h) END
$$;

-- The pending changes of the feed named (none when stale) and the first of
-- them: what a check counted, while its count holds (_feed_counted), and
-- those after it; the first by the key. For cd2sync.feeds, as the reader
-- of the view (cd2sync_reader, pg_monitor), of a feed there is: no JIT,
-- which a view cannot turn off (the planner takes a third of the changes
-- to match a position it does not know, and compiling took 100 times
-- longer than the count, at each read of cd2sync.monitoring).
CREATE OR REPLACE FUNCTION cd2sync._feed_pending(name text, OUT pending bigint, OUT oldest timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_sort = off SET jit = off AS $$
    SELECT (SELECT CASE WHEN f.stale_since IS NULL THEN k.counted ELSE 0 END + count(*)
              FROM cd2sync.changes c
             WHERE c.position > k.after AND f.stale_since IS NULL
               AND cd2sync._feed_has(f, c.feed, c.table_name)),
           (SELECT c.committed_at
              FROM cd2sync.changes c
             WHERE c.position > cd2sync._feed_since(f, h) AND f.stale_since IS NULL
               AND cd2sync._feed_has(f, c.feed, c.table_name)
             ORDER BY c.position LIMIT 1)
      FROM cd2sync.feed f
      LEFT JOIN cd2sync.feed_hint h ON h.name = f.name AND h.created_at = f.created_at   -- (as _feed_hint)
     CROSS JOIN LATERAL cd2sync._feed_counted(f, h) k
     WHERE f.name = _feed_pending.name
$$;

-- Takes feed f's hints to write them (held until commit), unless another
-- transaction holds them or this one may not (_feed_may_tidy): a hint is
-- never waited for, and never fails a transaction. False when not taken.
CREATE OR REPLACE FUNCTION cd2sync._feed_hint_take(f cd2sync.feed)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT cd2sync._feed_may_tidy() THEN
        RETURN false;
    END IF;
    PERFORM FROM cd2sync.feed_hint h WHERE h.name = f.name AND h.created_at = f.created_at FOR UPDATE SKIP LOCKED;
    RETURN FOUND;
END $$;

-- Deletes the hints of feeds no longer there. Never waits: a hint a check
-- holds is left to the next creation or drop (it is no other feed's).
CREATE OR REPLACE FUNCTION cd2sync._feed_hints_tidy()
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM cd2sync.feed_hint h
     WHERE (h.name, h.created_at) IN
           (SELECT y.name, y.created_at FROM cd2sync.feed_hint y
             WHERE NOT EXISTS (SELECT 1 FROM cd2sync.feed f WHERE f.name = y.name AND f.created_at = y.created_at)
               FOR UPDATE OF y SKIP LOCKED)
$$;


-- signatures that change, functions gone
DROP FUNCTION cd2sync._changed_columns(record, record);
DROP FUNCTION cd2sync._feed_forget(bigint, bigint);
DROP FUNCTION cd2sync._feed_check_limits();
DROP FUNCTION cd2sync._alter_column_type(regclass, text, text, boolean);

CREATE OR REPLACE FUNCTION cd2sync._alter_column_type(rel regclass, col text, new_type text, using_null boolean,
                                            via_text boolean DEFAULT false)
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
                   CASE WHEN using_null THEN format(' USING NULL::%s', new_type)
                        WHEN via_text THEN format(' USING %I::text::%s', col, new_type) ELSE '' END);

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


CREATE OR REPLACE FUNCTION cd2sync._apply_pending_types(instance text, table_name text, target regclass)
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    pending jsonb;
    c record;
    n bigint;
    kept text;   -- (a log's column whose values do not convert)
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
        IF cd2sync._log_column(target) IS NOT NULL THEN
            -- (an ALTER fires no trigger: the change feeds following it get
            -- a delete of each row before and an insert after, as a reload
            -- gives them)
            PERFORM cd2sync._feed_capture_table(target, 'old');
            FOR c IN SELECT key, value FROM jsonb_each_text(pending) ORDER BY key LOOP
                BEGIN
                    PERFORM cd2sync._alter_column_type(target, c.key, c.value, false, true);
                EXCEPTION WHEN data_exception THEN
                    IF c.key = ANY (cd2sync._key_columns(target)) THEN
                        RAISE EXCEPTION 'key column % of % cannot change type: %', c.key, target, SQLERRM
                              USING ERRCODE = 'feature_not_supported';
                    END IF;
                    kept := left(format('cd2_%s_before_%s', c.key, to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')), 60);
                    IF cd2sync._has_column(target, kept) THEN   -- (changed twice the same day)
                        kept := kept || '_' || (SELECT min(x) FROM generate_series(2, 99) x
                                                 WHERE NOT cd2sync._has_column(target, kept || '_' || x));
                    END IF;
                    EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', target, c.key, kept);
                    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL', target, kept);
                    EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', target, c.key, c.value);
                    PERFORM cd2sync.refresh_view((cd2sync._rel_table(target)).table_name);
                    RAISE WARNING 'cd2sync: column %.% becomes % upstream, and stored values do not convert (%): they are kept in column %',
                          target, c.key, c.value, SQLERRM, kept;
                END;
            END LOOP;
            PERFORM cd2sync._feed_capture_table(target, 'new');
            RETURN NULL;
        END IF;
        EXECUTE format('DELETE FROM %s', target);
        GET DIAGNOSTICS n = ROW_COUNT;
        -- (the load into the emptied table is a reload too: _apply)
        PERFORM set_config('cd2sync_tx.reloading', target::text, true);
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


CREATE OR REPLACE FUNCTION cd2sync._finish_loading(target_schema text, table_name text, doc json)
RETURNS boolean LANGUAGE plpgsql
-- (an index's sort spills to disk beyond this: the worker's memory stays
-- bounded. 64MB lets PostgreSQL build each index with a parallel worker,
-- half of it each, where max_parallel_maintenance_workers allows one)
SET search_path = pg_catalog, pg_temp SET maintenance_work_mem = '64MB' AS $$
DECLARE
    lrel regclass := cd2sync._loading_rel(target_schema, table_name);
    place record := cd2sync._table_place(target_schema, table_name);
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
    -- the change feeds following it get its rows once their users'
    -- replacements are in (feeds.sql, _feed_load_begin)
    PERFORM cd2sync._feed_load_begin(lrel);
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

    -- a namespace's schema that is another instance's target schema (two
    -- instances of 1.2, when nothing kept such names apart): refused, not
    -- shared
    IF sch <> target_schema AND EXISTS (SELECT 1 FROM cd2sync.instances i WHERE i.target_schema = sch) THEN
        RAISE EXCEPTION 'schema "%" for the tables of namespace % is the target schema of instance "%"',
              sch, place.namespace, (SELECT i.name FROM cd2sync.instances i WHERE i.target_schema = sch)
              USING ERRCODE = 'duplicate_schema',
                    HINT = 'Give one of the two instances another target_schema (cd2_alter_instance).';
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
        -- its bookkeeping columns, and the indexes a load costs nothing to
        -- keep (they take their names with the table: _ensure_index)
        PERFORM cd2sync._ensure_bookkeeping(rel, NULL, table_name);
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
                    -- (a real through its text: 0.1 stays 0.1, as the view
                    -- showed it and the change feeds' images say, and as
                    -- upstream's 0.1 now arrives, not 0.10000000149011612)
                    PERFORM cd2sync._alter_column_type(rel, c.column_name, c.type_sql, false,
                                                       c.old_type = 'real');
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

CREATE OR REPLACE FUNCTION cd2sync._ensure_index(rel regclass, suffix text, expr text, pred text DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text := left(format('%s_%s', (SELECT relname FROM pg_class WHERE oid = rel), suffix), 63);
    nsp text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
    idx regclass := to_regclass(format('%I.%I', nsp, name));
    want text := 'cd2sync: ' || expr || coalesce(' WHERE ' || pred, '');
    other regclass;
BEGIN
    IF idx IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_index x WHERE x.indexrelid = idx AND x.indrelid = rel
                                          AND obj_description(idx, 'pg_class') LIKE 'cd2sync: %') THEN
        -- (the name is another's: never dropped, nor taken)
        RAISE WARNING 'cd2sync: % is not an index cd2sync made on %, and keeps its name', idx, rel
              USING DETAIL = format('cd2sync''s index %s is not made.', want),
                    HINT = 'Rename or drop that relation; the next sync makes the index.';
        RETURN false;
    END IF;
    IF idx IS NOT NULL AND obj_description(idx, 'pg_class') IS NOT DISTINCT FROM want THEN
        RETURN false;
    END IF;
    IF idx IS NOT NULL THEN
        EXECUTE format('DROP INDEX %s', idx);   -- (its own, of another expression: a new shard)
    END IF;
    SELECT x.indexrelid::regclass INTO other FROM pg_index x
     WHERE x.indrelid = rel AND obj_description(x.indexrelid, 'pg_class') = want LIMIT 1;
    IF other IS NOT NULL THEN
        EXECUTE format('ALTER INDEX %s RENAME TO %I', other, name);
        RETURN false;
    END IF;
    EXECUTE format('CREATE INDEX %I ON %s ((%s))%s', name, rel, expr, coalesce(' WHERE ' || pred, ''));
    EXECUTE format('COMMENT ON INDEX %I.%I IS %L', nsp, name, want);
    RETURN true;
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
    -- whole then, not row by row during it (readers are not blocked); but
    -- the partial ones at once: a load fills none of their rows (cd2_<c>
    -- and the duplicate flag are set after it), and building them after
    -- would read the whole table to find nothing
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
        END IF;
        PERFORM cd2sync._ensure_index(rel, c || '_replaced', format('%I', rc), format('%I IS NOT NULL', rc));
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
    IF cd2sync._has_column(rel, 'cd2_merge_duplicate') THEN
        PERFORM cd2sync._ensure_index(rel, 'merge_duplicates', 'id', 'cd2_merge_duplicate');
    END IF;
    PERFORM cd2sync._ensure_global_indexes(rel, shard);
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


CREATE OR REPLACE FUNCTION cd2sync._feed_capture_sql(rel regclass, table_name text, old_src text, new_src text,
                                          cause text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c record := cd2sync._feed_capture_context(rel, table_name, cause);
    v record := cd2sync._view_columns(table_name);
    s record;             -- the view's rows of the source
BEGIN
    IF c.instance IS NULL OR (old_src IS NULL) = (new_src IS NULL) THEN
        RETURN NULL;
    END IF;
    s := cd2sync._view_select(table_name, c.instance, c.shard_id, rel, v.cols, v.types, coalesce(new_src, old_src));
    RETURN format(
        'INSERT INTO cd2sync.changes (position, table_name, op, key, instance, "row", cause, watermark)
         SELECT nextval(''cd2sync.change_position_seq''), %L, %L, jsonb_build_object(%s), %L, %s, %L,
                %L::timestamptz FROM (%s) r',
        table_name, CASE WHEN new_src IS NULL THEN 'delete' ELSE 'insert' END,
        (SELECT string_agg(format('%L, r.%I', k, k), ', ') FROM unnest(c.keys) k),
        c.instance, CASE WHEN new_src IS NULL THEN 'NULL' ELSE 'cd2sync._row_image(r)' END,
        c.change_cause, c.watermark, s.sql);
END $$;


CREATE OR REPLACE FUNCTION cd2sync._feed_capture_table(rel regclass, side text, cause text DEFAULT 'resync')
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tab text := (cd2sync._rel_table(rel)).table_name;
    q text;
BEGIN
    IF tab IS NULL THEN
        RETURN;
    END IF;
    PERFORM cd2sync._feed_lock();
    IF NOT cd2sync._feed_follows(tab) THEN
        RETURN;
    END IF;
    q := cd2sync._feed_capture_sql(rel, tab, CASE WHEN side = 'old' THEN rel::text END,
                                   CASE WHEN side = 'new' THEN rel::text END, cause);
    IF q IS NOT NULL THEN
        EXECUTE q;
        PERFORM cd2sync._feed_notify(tab);
    END IF;
END $$;


CREATE OR REPLACE FUNCTION cd2sync._feed_capture_instance(instance text, side text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.rel FROM cd2sync._instance_tables(instance) t LOOP
        PERFORM cd2sync._feed_capture_table(r.rel, side);
    END LOOP;
    PERFORM set_config('cd2sync_tx.quiet_instance', CASE WHEN side = 'old' THEN instance ELSE '' END, true);
END $$;



-- privileges as src/sql/privileges.sql gives them
CREATE OR REPLACE FUNCTION cd2sync._row_image(r record)
RETURNS jsonb AS 'MODULE_PATHNAME', 'cd2_row_image' LANGUAGE C STABLE STRICT PARALLEL SAFE;

CREATE OR REPLACE FUNCTION cd2_create_feed(name text, tables text[] DEFAULT NULL, from_start boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n text := cd2_create_feed.name;
    t text;
    vw regclass;
    keys text[];
    start bigint;
    started bigint := 0;
    k bigint;
BEGIN
    PERFORM cd2sync._tx_clear();
    IF n IS NULL OR n !~ '^[a-z][a-z0-9_]{0,47}$' THEN
        RAISE EXCEPTION 'invalid feed name "%"', n
              USING ERRCODE = 'invalid_parameter_value',
                    DETAIL = 'A feed name is a lower-case letter followed by up to 47 lower-case letters, digits or underscores.';
    END IF;
    IF from_start IS NULL THEN
        RAISE EXCEPTION 'from_start must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- (the start is read after waiting for the syncs writing the tables: a
    -- snapshot older than what they commit would begin the feed with a gap)
    PERFORM cd2sync._feed_changing('cd2_create_feed');
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
    PERFORM cd2sync._feed_hints_tidy();
    INSERT INTO cd2sync.feed_hint (name, created_at) SELECT f.name, f.created_at FROM cd2sync.feed f WHERE f.name = n;
    PERFORM cd2sync._feed_ensure_captures();
    PERFORM cd2sync._feed_lock();
    -- and again once the lock is ours: a sync loading a table new that took
    -- it first (_feed_load_end) saw no feed, and the first look could not
    -- see its table
    PERFORM cd2sync._feed_ensure_captures();
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO start FROM cd2sync.change_position_seq;
    UPDATE cd2sync.feed f SET acknowledged = start WHERE f.name = n;
    UPDATE cd2sync.feed_hint h SET forgotten_to = start
      FROM cd2sync.feed f WHERE f.name = n AND h.name = f.name AND h.created_at = f.created_at;
    IF from_start THEN
        FOR t, vw IN SELECT v.table_name, v.view FROM cd2sync._views() v
                      WHERE cd2sync._covers(tables, v.table_name) ORDER BY 1 LOOP
            SELECT cd2sync._key_columns(x.rel) INTO keys FROM cd2sync._instances_with(t) x LIMIT 1;
            EXECUTE format(
                'INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
                 SELECT nextval(''cd2sync.change_position_seq''), %L, %L, ''insert'', %s, r->>''instance'', r, ''start''
                   FROM (SELECT cd2sync._row_image(v) AS r FROM %s v) x',
                n, t, (SELECT 'jsonb_build_object(' || string_agg(format('%L, r->%L', c, c), ', ') || ')'
                         FROM unnest(keys) c), vw);
            GET DIAGNOSTICS k = ROW_COUNT;
            started := started + k;
        END LOOP;
        IF started > 0 THEN
            PERFORM pg_notify('cd2sync_feed', n);
        END IF;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_capture()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    tab text := (cd2sync._rel_table(TG_RELID)).table_name;   -- (its CD2 name: ns.table)
    q text := cd2sync._feed_capture_sql(TG_RELID, tab, TG_RELID::regclass::text, NULL);
BEGIN
    IF TG_OP <> 'TRUNCATE' THEN   -- (a trigger of 1.3's, not yet replaced)
        RAISE EXCEPTION 'cd2sync: % has the capture triggers of an earlier version', TG_RELID::regclass
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    HINT = 'SELECT cd2sync.refresh_views() replaces them.';
    END IF;
    IF q IS NOT NULL THEN
        PERFORM cd2sync._feed_lock();
        EXECUTE q;
        PERFORM cd2sync._feed_notify(tab);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_capture_context(rel regclass, table_name text, cause text DEFAULT NULL,
                                              OUT instance text, OUT shard_id bigint, OUT change_cause text,
                                              OUT watermark timestamptz, OUT keys text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    inst cd2sync.instances;
BEGIN
    SELECT i.* INTO inst FROM cd2sync.instances i JOIN cd2sync._rel_table(rel) t ON t.instance = i.name;
    keys := cd2sync._key_columns(rel);
    IF inst.name IS NULL OR keys IS NULL
       OR (cause IS NULL AND (inst.name = current_setting('cd2sync_tx.quiet_instance', true)
                              OR rel::oid::text = current_setting('cd2sync_tx.loading_new', true))) THEN
        keys := NULL;
        RETURN;
    END IF;
    instance := inst.name;
    shard_id := inst.shard_id;
    change_cause := coalesce(cause, nullif(current_setting('cd2sync_tx.cause', true), ''), 'sync');
    -- the sync that applies the table says its watermark beforehand
    -- (cd2sync_tx.watermark); else the stored one
    IF current_setting('cd2sync_tx.applying', true) = inst.name || '.' || table_name THEN
        watermark := nullif(current_setting('cd2sync_tx.watermark', true), '')::timestamptz;
    ELSE
        SELECT s.watermark INTO watermark FROM cd2sync.table_state s
         WHERE s.instance = inst.name AND s.table_name = _feed_capture_context.table_name;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_row_plan(rel regclass, OUT table_name text, OUT instance text, OUT cause text,
                                       OUT watermark timestamptz, OUT projection text, OUT keys text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c record;
    v record;
BEGIN
    table_name := (cd2sync._rel_table(rel)).table_name;
    c := cd2sync._feed_capture_context(rel, table_name);
    IF table_name IS NULL OR c.instance IS NULL THEN
        table_name := NULL;
        RETURN;
    END IF;
    v := cd2sync._view_columns(table_name);
    projection := (cd2sync._view_select(table_name, c.instance, c.shard_id, rel, v.cols, v.types, rel::text)).sql;
    instance := c.instance;
    cause := c.change_cause;
    watermark := c.watermark;
    keys := c.keys;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_capture_row()
RETURNS trigger AS 'MODULE_PATHNAME', 'cd2_feed_capture_row' LANGUAGE C;

CREATE OR REPLACE FUNCTION cd2sync._feed_ensure_capture(rel regclass, table_name text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    wanted boolean := cd2sync._feed_follows(table_name);
    changing boolean := current_setting('cd2sync_tx.feeds_changing', true) = 'on';
    has boolean := EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'cd2_feed_insert');
    current boolean := cd2sync._feed_captures(rel);
    t text;
BEGIN
    IF has AND (NOT current OR (NOT wanted AND changing)) THEN
        IF current AND NOT wanted THEN
            -- (triggers no feed needs go only if the table is free now: a
            -- sync writing it may hold the changes' lock a drop waits for;
            -- left, they capture nothing)
            BEGIN
                EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE NOWAIT', rel);
            EXCEPTION WHEN lock_not_available THEN
                RETURN;
            END;
        END IF;
        FOREACH t IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'cd2_feed_' || t, rel);
        END LOOP;
    END IF;
    IF wanted AND NOT current THEN
        FOREACH t IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
            -- (OR REPLACE: another sync may add them meanwhile)
            EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION cd2sync._feed_capture_row()',
                           'cd2_feed_' || t, upper(t), rel);
        END LOOP;
        EXECUTE format('CREATE OR REPLACE TRIGGER cd2_feed_truncate BEFORE TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION cd2sync._feed_capture()', rel);
    END IF;
END $$;

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
                          AND r.ev_class <> 'cd2.user_merges'::regclass)
       -- (1.3's capture triggers: refresh_view replaces them)
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'cd2_feed_insert'
                          AND tgfoid = 'cd2sync._feed_capture()'::regprocedure) THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(52518, 1);   -- one at a time
    PERFORM cd2sync.refresh_views();
    PERFORM cd2sync._refresh_merge_duplicates('enrollments');
    PERFORM cd2sync._refresh_merge_duplicates('submissions');
END $$;

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
    quiet text := current_setting('cd2sync_tx.quiet_instance', true);
BEGIN
    IF EXISTS (SELECT 1 FROM cd2sync._log_partitions(rel) p WHERE p.day = d) THEN
        RETURN false;
    END IF;
    IF def IS NOT NULL THEN
        -- (the partitions' capture triggers pass the move over)
        PERFORM set_config('cd2sync_tx.quiet_instance', (cd2sync._rel_table(rel)).instance, true);
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
        PERFORM set_config('cd2sync_tx.quiet_instance', coalesce(quiet, ''), true);
    END IF;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_over_limits(pending bigint, oldest timestamptz)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN oldest < now() - make_interval(secs => l.max_age_seconds)
                THEN format('a change waits since %s, longer than cd2sync.feed_max_age', oldest)
                WHEN pending > l.max_pending
                THEN format('more than %s changes wait, over cd2sync.feed_max_pending', l.max_pending) END
      FROM cd2sync._feed_limits() l
$$;

CREATE OR REPLACE FUNCTION cd2sync._feed_check_limits(reader text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_sort = off SET jit = off AS $$
DECLARE
    lim record := cd2sync._feed_limits();
    over jsonb := '{}';
    r record;
    f cd2sync.feed;
    h cd2sync.feed_hint;
    since bigint;
    after bigint;
    counted bigint;
    first bigint;
    oldest timestamptz;
    last bigint;
    clear bigint;
    pending bigint;
    why text;
    marked boolean;
BEGIN
    -- (a feed and its hints as one snapshot shows them; the changes are
    -- read by later ones, which may see an acknowledgement this one did
    -- not: the feed is marked stale only if its row is still as read)
    FOR r IN SELECT x AS f, cd2sync._feed_hint(x) AS h
               FROM cd2sync.feed x WHERE x.stale_since IS NULL AND (reader IS NULL OR x.name = reader)
              ORDER BY x.name LOOP
        f := r.f;
        h := r.h;
        since := cd2sync._feed_since(f, h);
        -- (one statement: the last position is of the snapshot that found
        -- the oldest pending change, or none)
        SELECT p.position, p.committed_at, cd2sync._last_position() INTO first, oldest, last
          FROM (SELECT) one
          LEFT JOIN LATERAL (SELECT c.position, c.committed_at FROM cd2sync.changes c
                              WHERE c.position > since
                                AND cd2sync._feed_has(f, c.feed, c.table_name)
                              ORDER BY c.position LIMIT 1) p ON true;
        clear := coalesce(first - 1, last);   -- (no change of the feed in (since, clear])
        -- written only when it went through many positions (not at each
        -- poll of a feed: a reader then writes rarely)
        IF clear - since > 1000 AND cd2sync._feed_hint_take(f) THEN
            UPDATE cd2sync.feed_hint x SET scanned_to = clear
             WHERE x.name = f.name AND x.created_at = f.created_at AND (x.scanned_to IS NULL OR x.scanned_to < clear);
        END IF;
        pending := 0;
        SELECT k.counted, k.after INTO counted, after FROM cd2sync._feed_counted(f, h) k;
        -- positions bound the count; count (to one over), only after what
        -- an earlier check counted, when the bound is over; and at a
        -- sync's end (not in a read, whose transaction may not keep what
        -- it counts) when many positions lie after what was counted, so
        -- that cd2sync.feeds, which monitoring reads at each scrape, counts
        -- only after it (it counted a backlog under the limit whole, each
        -- time)
        IF last - since > lim.max_pending OR (reader IS NULL AND last - after > 100000) THEN
            SELECT counted + count(*) INTO pending
              FROM (SELECT 1 FROM cd2sync.changes c
                     WHERE c.position > after AND c.position <= last
                       AND cd2sync._feed_has(f, c.feed, c.table_name)
                     LIMIT greatest(lim.max_pending + 1 - counted, 0)) x;
            -- (as the hint above; and only a count of them all, under the
            -- limit, of the acknowledged position the feed still has)
            IF pending <= lim.max_pending AND last - after > 1000 AND cd2sync._feed_hint_take(f) THEN
                UPDATE cd2sync.feed_hint x
                   SET counted_from = f.acknowledged, counted_to = last, counted_pending = pending
                 WHERE x.name = f.name AND x.created_at = f.created_at
                   AND EXISTS (SELECT 1 FROM cd2sync.feed z WHERE z.name = f.name AND z.acknowledged = f.acknowledged);
            END IF;
        END IF;
        why := cd2sync._feed_over_limits(pending, oldest);
        CONTINUE WHEN why IS NULL;
        -- Marked only where that cannot fail (_feed_may_tidy), and never
        -- waited for either: a sync holding the changes' lock would
        -- deadlock with a drop of this feed that holds its row and waits
        -- for that lock, or for the sync's table;
        -- the next check marks it. Nor when the feed was acknowledged,
        -- made again or marked since the loop read it: the changes counted
        -- may be gone.
        -- (Its changes are forgotten with it: the lock on them that takes is
        -- not waited for either, say while a feed made from its start holds it.)
        IF reader IS NULL AND cd2sync._feed_may_tidy() THEN
            BEGIN
                LOCK TABLE cd2sync.changes IN ROW EXCLUSIVE MODE NOWAIT;
                UPDATE cd2sync.feed x SET stale_since = now(), stale_reason = why
                 WHERE x.name IN (SELECT y.name FROM cd2sync.feed y WHERE y.name = f.name FOR UPDATE SKIP LOCKED)
                   AND x.created_at = f.created_at AND x.acknowledged = f.acknowledged AND x.stale_since IS NULL;
                marked := FOUND;
            EXCEPTION WHEN lock_not_available THEN
                marked := false;
            END;
            IF marked THEN
                RAISE WARNING 'cd2sync feed "%" is stale: %', f.name, why
                      USING HINT = 'Drop it and create it again; its changes are no longer kept.';
                PERFORM cd2sync._feed_forget(f, cd2sync._feed_kept_after(f, h));
                CONTINUE;
            END IF;
        END IF;
        -- not marked here: over its limits all the same if its row is as read
        IF EXISTS (SELECT 1 FROM cd2sync.feed x
                    WHERE x.name = f.name AND x.created_at = f.created_at
                      AND x.acknowledged = f.acknowledged AND x.stale_since IS NULL) THEN
            over := over || jsonb_build_object(f.name, why);
        END IF;
    END LOOP;
    RETURN over;
END $$;

-- a feed over its limits is stale at once (_feed_over_limits, the one owner
-- of the limits): cd2sync.feeds and cd2sync.monitoring say so before a
-- sync marks it
CREATE OR REPLACE VIEW cd2sync.feeds AS
    SELECT f.name, f.tables, f.acknowledged, p.pending, p.oldest AS oldest_pending,
           CASE WHEN f.stale_since IS NULL AND cd2sync._feed_over_limits(p.pending, p.oldest) IS NULL
                THEN 'ok' ELSE 'stale' END AS status
      FROM cd2sync.feed f
      CROSS JOIN LATERAL cd2sync._feed_pending(f.name) p;

CREATE OR REPLACE VIEW cd2sync.monitoring AS
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
    -- what change feeds say of the rows written (feeds.sql): a snapshot into
    -- a table with rows, or one emptied to change its types, is a resync
    PERFORM set_config('cd2sync_tx.cause',
                       CASE WHEN mode = 'snapshot' OR current_setting('cd2sync_tx.reloading', true) = target::text
                            THEN 'resync' ELSE 'sync' END, true);

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

CREATE OR REPLACE FUNCTION cd2sync._feeds_following(table_name text)
RETURNS text[] LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY(SELECT f.name FROM cd2sync.feed f
                  WHERE f.stale_since IS NULL
                    AND cd2sync._covers(f.tables, _feeds_following.table_name)
                  ORDER BY f.name)
$$;

CREATE OR REPLACE FUNCTION cd2sync._feed_follows(table_name text)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT cardinality(cd2sync._feeds_following(table_name)) > 0
$$;

CREATE OR REPLACE FUNCTION cd2sync._feed_notify(table_name text)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('cd2sync_feed', f) FROM unnest(cd2sync._feeds_following(table_name)) f
$$;


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
        -- (every row, changes NULL: rows without a replacement look theirs up
        -- first, then those with one are set right; a row is written once,
        -- and only if its replacement changes, or a feed would see it twice)
        IF NOT map_empty THEN
            EXECUTE format('UPDATE %s t SET %I = m.replacement_user_id FROM cd2sync.user_merge_map m
                             WHERE %s = m.superseded_user_id AND t.%I IS NULL%s',
                           rel, rc, cd2sync._resolved_expr(shard, c), rc, bound);
            GET DIAGNOSTICS k = ROW_COUNT;
            n := n + k;
        END IF;
        -- (a row's stored user changed, or its replacement did)
        EXECUTE format('UPDATE %1$s t SET %2$I = (SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                                                   WHERE m.superseded_user_id = %3$s)
                         WHERE t.%2$I IS NOT NULL
                           AND t.%2$I IS DISTINCT FROM (SELECT m.replacement_user_id FROM cd2sync.user_merge_map m
                                                         WHERE m.superseded_user_id = %3$s)',
                       rel, rc, g);
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_merge_begin()
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('cd2sync_tx.merge_pass', true) = 'on' OR NOT EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        RETURN false;   -- (no feed, no capture: no pass)
    END IF;
    PERFORM set_config('cd2sync_tx.merge_pass', 'on', true);
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_merge_end()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    tab text;
    c record;
    v record;
    s record;
    vw regclass;
    cols text[];
    n bigint;
BEGIN
    PERFORM set_config('cd2sync_tx.merge_pass', '', true);
    IF to_regclass('pg_temp.cd2_merge_before') IS NULL THEN
        RETURN;
    END IF;
    -- (the capture made it, and checks one it finds: a table of that name
    -- that another role made, or with triggers or rules, is not read here)
    IF NOT EXISTS (SELECT 1 FROM pg_class pc
                    WHERE pc.oid = to_regclass('pg_temp.cd2_merge_before') AND pc.relkind = 'r'
                      AND pc.relowner = (SELECT ro.oid FROM pg_roles ro WHERE ro.rolname = current_user)
                      AND NOT pc.relhastriggers AND NOT pc.relhasrules) THEN
        RAISE EXCEPTION 'cd2sync: pg_temp.cd2_merge_before is not a table cd2sync made'
              USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    FOR r IN SELECT DISTINCT b.rel FROM pg_temp.cd2_merge_before b ORDER BY 1 LOOP
        tab := (cd2sync._rel_table(r.rel)).table_name;
        c := cd2sync._feed_capture_context(r.rel, tab, 'merge');
        vw := (SELECT x.view FROM cd2sync._views() x WHERE x.table_name = tab);
        IF c.instance IS NULL THEN
            CONTINUE;   -- (not an instance's table any more)
        END IF;
        v := cd2sync._view_columns(tab);
        s := cd2sync._view_select(tab, c.instance, c.shard_id, r.rel, v.cols, v.types, r.rel::regclass::text);
        -- the columns of an image, in the view's order (as the capture
        -- names them in changed)
        cols := ARRAY(SELECT k FROM jsonb_object_keys((SELECT b.image FROM pg_temp.cd2_merge_before b
                                                        WHERE b.rel = r.rel LIMIT 1)) k
                        LEFT JOIN pg_attribute a ON a.attrelid = coalesce(vw::oid, 0) AND a.attname = k
                       ORDER BY a.attnum, k);
        -- (OFFSET 0: each row's image made once, and compared once)
        EXECUTE format(
            'INSERT INTO cd2sync.changes (position, table_name, op, key, instance, "row", changed, cause, watermark)
             SELECT nextval(''cd2sync.change_position_seq''), %L, ''update'', b.key, %L, n.image, x.changed,
                    ''merge'', %L::timestamptz
               FROM (SELECT DISTINCT ON (key) key, image FROM pg_temp.cd2_merge_before
                      WHERE rel = %s ORDER BY key, ord) b
              CROSS JOIN LATERAL (SELECT cd2sync._row_image(r) AS image FROM (%s) r WHERE %s OFFSET 0) n
              CROSS JOIN LATERAL (SELECT ARRAY(SELECT u.k FROM unnest(%L::text[]) WITH ORDINALITY u(k, o)
                                                WHERE (b.image -> u.k) IS DISTINCT FROM (n.image -> u.k)
                                                ORDER BY u.o) AS changed OFFSET 0) x
              WHERE cardinality(x.changed) > 0
              ORDER BY b.key',
            tab, c.instance, c.watermark, r.rel, s.sql,
            (SELECT string_agg(format('r.%I = (b.key ->> %L)::%s', k, k, v.types ->> k), ' AND ')
               FROM unnest(c.keys) k),
            cols);
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            PERFORM cd2sync._feed_notify(tab);
        END IF;
    END LOOP;
    DELETE FROM pg_temp.cd2_merge_before;   -- (a capture may hold it open)
END $$;

CREATE OR REPLACE FUNCTION cd2sync._refresh_user_merges()
RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    r record;
    tb record;
    users_sql text[] := '{}';
    logins_sql text[] := '{}';
    enr_sql text[] := '{}';
    n bigint;
    pass boolean;   -- (the change feeds: one update per row it changes)
BEGIN
    -- locks in one order: a change feed's positions (a sync that wrote
    -- changes holds them), then the map
    IF EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        PERFORM cd2sync._feed_lock();
    END IF;
    LOCK TABLE cd2sync.user_merge_map IN EXCLUSIVE MODE;
    pass := cd2sync._feed_merge_begin();

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
             WHERE (EXISTS (SELECT 1 FROM cd2_users u WHERE u.id = m.from_user_id AND u.deleted)
                    OR NOT EXISTS (SELECT 1 FROM cd2_logins a WHERE a.user_id = m.from_user_id AND a.active))
               -- (a move the row made back since, as a split does, undoes it)
               AND NOT EXISTS (SELECT 1 FROM cd2sync.user_moves b
                                WHERE b.instance = m.instance AND b.table_name = m.table_name
                                  AND b.row_id = m.row_id AND b.from_user_id = m.to_user_id
                                  AND b.to_user_id = m.from_user_id AND b.moved_at > m.moved_at)
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
    IF pass THEN
        PERFORM cd2sync._feed_merge_end();
    END IF;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._refresh_merge_duplicates(table_name text)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    dupkey text[] := cd2sync._duplicate_key(table_name);
    n bigint := 0;
    k bigint;
    pass boolean;
BEGIN
    -- one refresh at a time: two instances' syncs ending together each
    -- deleted the set and inserted it again, and the second's insert
    -- collided with the first's (a key violation). Locks in the order
    -- _refresh_user_merges takes them (which holds both already).
    IF EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        PERFORM cd2sync._feed_lock();
    END IF;
    LOCK TABLE cd2sync.user_merge_map IN EXCLUSIVE MODE;
    DELETE FROM cd2sync.merge_duplicates d WHERE d.table_name = _refresh_merge_duplicates.table_name;
    IF dupkey IS NULL THEN
        RETURN 0;
    END IF;
    pass := cd2sync._feed_merge_begin();
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
    IF pass THEN
        PERFORM cd2sync._feed_merge_end();
    END IF;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._resolve_due(instance text, only_lockable boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
    pass boolean;
BEGIN
    IF only_lockable AND NOT cd2sync._try_lock_instance(instance) THEN
        INSERT INTO cd2sync.resolve_due (instance) VALUES (instance) ON CONFLICT DO NOTHING;
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cd2sync.resolve_due d WHERE d.instance = _resolve_due.instance) THEN
        RETURN false;
    END IF;
    PERFORM set_config('cd2sync_tx.cause', 'merge', true);
    pass := cd2sync._feed_merge_begin();
    FOR t IN SELECT * FROM cd2sync._instance_tables(instance) LOOP
        PERFORM cd2sync._resolve_users(t.rel, t.shard_id, false);
        IF cd2sync._duplicate_key(t.table_name) IS NOT NULL THEN
            PERFORM cd2sync._duplicate_flags(instance, t.table_name, t.rel);
        END IF;
    END LOOP;
    IF pass THEN
        PERFORM cd2sync._feed_merge_end();
    END IF;
    DELETE FROM cd2sync.resolve_due d WHERE d.instance = _resolve_due.instance;
    RETURN true;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._view_columns(table_name text, OUT cols text[], OUT types jsonb)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(attname ORDER BY first_seen), jsonb_object_agg(attname, typ)
      FROM (SELECT x.attname, x.first_seen,
                   coalesce((SELECT w FROM unnest(x.typs) w
                              WHERE NOT EXISTS (SELECT 1 FROM unnest(x.typs) o
                                                 WHERE o <> w AND NOT cd2sync._is_widening(o, w))
                              ORDER BY w LIMIT 1), 'text') AS typ
              FROM (SELECT a.attname::text AS attname,
                           min(i.ord * 10000 + a.attnum) AS first_seen,
                           array_agg(DISTINCT CASE WHEN t.typtype = 'e' THEN 'text'
                                                   ELSE format_type(a.atttypid, a.atttypmod) END) AS typs
                      FROM (SELECT rel, row_number() OVER () AS ord FROM cd2sync._instances_with(table_name)) i
                      JOIN pg_attribute a ON a.attrelid = i.rel AND a.attnum > 0 AND NOT a.attisdropped
                                         AND a.attname NOT LIKE 'cd2\_%'
                      JOIN pg_type t ON t.oid = a.atttypid
                     GROUP BY a.attname) x) y
$$;

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
         SELECT DISTINCT %L, %L, t.id, cd2sync._global_id(%s, t.user_id), cd2sync._global_id(%s, d.user_id)
           FROM cd2_typed d JOIN %s t ON t.id = d.id
          WHERE d.cd2_action IS DISTINCT FROM ''D'' AND t.user_id <> d.user_id
         ON CONFLICT (instance, table_name, row_id, from_user_id, to_user_id) DO UPDATE SET moved_at = excluded.moved_at',
        inst.name, tab, coalesce(inst.shard_id::text, 'NULL'), coalesce(inst.shard_id::text, 'NULL'), target);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._ns_schema_name(target_schema text, namespace text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN namespace = 'canvas' THEN target_schema
                WHEN namespace = ANY (cd2sync._namespaces()) THEN target_schema || '_' || namespace END
$$;

CREATE OR REPLACE FUNCTION cd2sync._tables_to_sync(configured text[], asked text[], listed_ns text[],
                                        listed text[], failed_ns text[], failed_error text[],
                                        failed_code text[])
RETURNS TABLE (table_name text, error text, error_code text)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    ns text;
    l text;
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
            FOR l IN SELECT x.l FROM unnest(listed_ns, listed) x(n, l)
                      WHERE x.n = ns AND NOT cd2sync._qualified(ns, x.l) = ANY (seen) LOOP
                table_name := cd2sync._qualified(ns, l);
                seen := seen || table_name;
                -- (a name the API lists is a table's name in its namespace: a
                -- dot in it would make another namespace's, or another
                -- instance's, schema its place)
                IF l ~ '^[A-Za-z0-9_]{1,63}$' THEN
                    error := NULL;
                    error_code := NULL;
                ELSE
                    error := format('the API lists a table name cd2sync does not take: %s', table_name);
                    error_code := '22023';
                END IF;
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

CREATE OR REPLACE FUNCTION cd2sync._feed_changing(what text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION '% runs in a READ COMMITTED transaction', what
              USING ERRCODE = 'invalid_transaction_state',
                    DETAIL = format('This transaction is %s.', upper(current_setting('transaction_isolation')));
    END IF;
    PERFORM pg_advisory_xact_lock(52519, 1);
    PERFORM set_config('cd2sync_tx.feeds_changing', 'on', true);
END $$;

CREATE OR REPLACE FUNCTION cd2_drop_feed(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cd2sync.feed;
    after bigint;
BEGIN
    PERFORM cd2sync._tx_clear();
    PERFORM cd2sync._feed_changing('cd2_drop_feed');
    f := cd2sync._check_feed(name);
    after := cd2sync._feed_kept_after(f, cd2sync._feed_hint(f));
    DELETE FROM cd2sync.feed x WHERE x.name = f.name;
    PERFORM cd2sync._feed_hints_tidy();
    PERFORM cd2sync._feed_ensure_captures();
    -- (only if the changes' lock is free now: a sync holding it may want a
    -- table whose triggers this drop has taken, and neither would give way;
    -- what is left, the sweeps forget, as no feed waits for it)
    BEGIN
        LOCK TABLE cd2sync.changes IN ROW EXCLUSIVE MODE NOWAIT;
        PERFORM cd2sync._feed_forget(f, after);
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    PERFORM cd2sync._feed_sweep();   -- (the last feed gone: every change)
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_load_begin(rel regclass)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('cd2sync_tx.loading_new', rel::oid::text, true)
$$;

CREATE OR REPLACE FUNCTION cd2sync._feed_load_end(rel regclass)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tab text := (cd2sync._rel_table(rel)).table_name;
BEGIN
    IF current_setting('cd2sync_tx.loading_new', true) IS DISTINCT FROM rel::oid::text THEN
        RETURN;
    END IF;
    PERFORM set_config('cd2sync_tx.loading_new', '', true);
    PERFORM cd2sync._feed_capture_table(rel, 'new', 'sync');
    IF tab IS NOT NULL THEN
        PERFORM cd2sync._feed_ensure_capture(rel, tab);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._after_apply(instance text, table_name text, mode text, changes bigint)
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

CREATE OR REPLACE FUNCTION cd2sync._feed_captures(rel regclass)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger t
                    WHERE t.tgrelid = rel AND t.tgname = 'cd2_feed_insert'
                      AND t.tgfoid = 'cd2sync._feed_capture_row()'::regprocedure)
$$;

CREATE OR REPLACE FUNCTION cd2sync._tx_clear()
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('cd2sync_tx.' || s, '', true)
      FROM unnest(ARRAY['applying', 'watermark', 'cause', 'merge_pass', 'quiet_instance',
                        'loading_new', 'reloading', 'feeds_changing']) s
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

CREATE OR REPLACE FUNCTION cd2_drop_instance(name text, drop_data boolean DEFAULT false)
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

CREATE OR REPLACE FUNCTION cd2sync._shows_global(col text, typ text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT typ = 'bigint' AND (col = 'id' OR col LIKE '%\_id')
$$;

CREATE OR REPLACE FUNCTION cd2sync._view_select(table_name text, instance text, shard bigint, rel regclass,
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
        IF cd2sync._shows_global(c, types->>c) THEN
            g := cd2sync._global_expr(shard, format('t.%I', c));
        ELSIF types->>c = 'double precision'
              AND (SELECT a.atttypid FROM pg_attribute a
                    WHERE a.attrelid = rel AND a.attname = c AND NOT a.attisdropped) = 'real'::regtype THEN
            -- (a real not yet widened here, through its text: 0.1 shows as
            -- 0.1, as it will once widened, see _ensure_table)
            g := format('t.%I::text::double precision', c);
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

CREATE OR REPLACE FUNCTION cd2sync._global_index_column(idx regclass)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.attname::text
      FROM pg_index x
      JOIN pg_class ic ON ic.oid = x.indexrelid
      JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
      JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
     WHERE x.indexrelid = idx AND x.indnkeyatts = 1 AND x.indexprs IS NULL AND x.indpred IS NULL
       AND x.indisvalid AND NOT x.indisprimary
       AND a.attname <> 'id' AND a.attname NOT LIKE 'cd2\_%' AND NOT cd2sync._is_user_ref(a.attname)
       AND cd2sync._shows_global(a.attname, format_type(a.atttypid, a.atttypmod))
       AND coalesce(obj_description(idx, 'pg_class'), '') NOT LIKE 'cd2sync:%'
$$;

CREATE OR REPLACE FUNCTION cd2sync._ensure_global_indexes(rel regclass, shard bigint)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
DECLARE
    wanted text[] := CASE WHEN shard IS NULL THEN '{}'::text[] ELSE ARRAY(
        SELECT DISTINCT s.col FROM (SELECT cd2sync._global_index_column(x.indexrelid) AS col
                                      FROM pg_index x WHERE x.indrelid = rel) s
         WHERE s.col IS NOT NULL ORDER BY 1) END;
    c text;
    r record;
BEGIN
    FOREACH c IN ARRAY wanted LOOP
        PERFORM cd2sync._ensure_index(rel, c || '_global', cd2sync._global_expr(shard, format('%I', c)));
    END LOOP;
    -- the ones beside user indexes no longer there (every one, without a shard)
    FOR r IN SELECT ic.oid::regclass AS idx
               FROM pg_index x
               JOIN pg_class ic ON ic.oid = x.indexrelid
               JOIN pg_class t ON t.oid = x.indrelid
               JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum > 0 AND NOT a.attisdropped
              WHERE x.indrelid = rel AND NOT a.attname = ANY (wanted)
                AND ic.relname = left(format('%s_%s_global', t.relname, a.attname), 63)
                AND obj_description(ic.oid, 'pg_class') LIKE 'cd2sync: %' LOOP
        EXECUTE format('DROP INDEX %s', r.idx);
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._before_apply(instance text, table_name text, watermark timestamptz)
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

CREATE OR REPLACE FUNCTION cd2_feed_read(name text, max_changes int DEFAULT 10000)
RETURNS TABLE ("position" bigint, table_name text, op text, key jsonb, instance text, "row" jsonb,
               changed text[], cause text, watermark timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET enable_sort = off SET jit = off AS $$
DECLARE
    f cd2sync.feed := cd2sync._check_feed(name);
    why text;
BEGIN
    IF max_changes IS NULL OR max_changes < 1 THEN
        RAISE EXCEPTION 'max_changes must be a positive number' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- (over its limits, it is stale before a sync marks it)
    IF f.stale_since IS NULL THEN
        why := cd2sync._feed_check_limits(f.name) ->> f.name;
    END IF;
    IF f.stale_since IS NOT NULL OR why IS NOT NULL THEN
        RAISE EXCEPTION 'cd2sync feed "%" is stale: %', f.name, coalesce(f.stale_reason, why)
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    HINT = 'Drop it and create it again (from_start => true gives the current rows).';
    END IF;
    RETURN QUERY
    SELECT c.position, c.table_name, c.op, c.key, c.instance, c."row", c.changed, c.cause, c.watermark
      FROM cd2sync.changes c
     WHERE c.position > cd2sync._feed_since(f, cd2sync._feed_hint(f))
       AND cd2sync._feed_has(f, c.feed, c.table_name)
     ORDER BY c.position
     LIMIT max_changes;
    -- (a sync that marked the feed stale, or a drop, since it was read
    -- above forgot its changes: what was read may lack some)
    SELECT * INTO f FROM cd2sync.feed x WHERE x.name = f.name AND x.created_at = f.created_at;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cd2sync feed "%" was dropped', name USING ERRCODE = 'undefined_object';
    ELSIF f.stale_since IS NOT NULL THEN
        RAISE EXCEPTION 'cd2sync feed "%" is stale: %', f.name, f.stale_reason
              USING ERRCODE = 'object_not_in_prerequisite_state',
                    HINT = 'Drop it and create it again (from_start => true gives the current rows).';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._last_position()
RETURNS bigint LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET enable_sort = off SET jit = off AS $$
    SELECT c.position FROM cd2sync.changes c ORDER BY c.position DESC LIMIT 1
$$;

CREATE OR REPLACE FUNCTION cd2_feed_ack(name text, upto bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cd2sync.feed := cd2sync._check_feed(name);
    h cd2sync.feed_hint;
    start bigint;
    last bigint;
    taken bigint;
BEGIN
    IF upto IS NULL THEN
        RAISE EXCEPTION 'upto must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF upto <= f.acknowledged THEN
        RETURN;
    END IF;
    -- the feed as the last acknowledgement left it, held until commit
    SELECT * INTO f FROM cd2sync.feed x WHERE x.name = f.name AND x.created_at = f.created_at FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cd2sync feed "%" was dropped', name USING ERRCODE = 'undefined_object';
    END IF;
    IF upto <= f.acknowledged THEN
        RETURN;
    END IF;
    h := cd2sync._feed_hint(f);
    start := cd2sync._feed_since(f, h);   -- (no change of the feed before)
    -- every position up to the last visible one is committed (see _feed_lock)
    last := least(upto, greatest(f.acknowledged, cd2sync._last_position()));
    IF last <= f.acknowledged THEN
        RETURN;
    END IF;
    -- what a check counted stays true less the changes acknowledged (see
    -- cd2sync.feed_hint), counted before a sweep deletes them; where the
    -- hint cannot be taken, it is left as it was: no longer valid
    IF h.counted_from = f.acknowledged AND last <= h.counted_to AND cd2sync._feed_hint_take(f) THEN
        SELECT count(*) INTO taken FROM cd2sync.changes c
         WHERE c.position > start AND c.position <= last
           AND cd2sync._feed_has(f, c.feed, c.table_name);
        UPDATE cd2sync.feed_hint x
           SET (counted_from, counted_to, counted_pending) =
               (SELECT CASE WHEN ok THEN last END, CASE WHEN ok THEN x.counted_to END,
                       CASE WHEN ok THEN x.counted_pending - taken END
                  FROM (SELECT x.counted_from = f.acknowledged AND last <= x.counted_to AS ok) k)
         WHERE x.name = f.name AND x.created_at = f.created_at;
    END IF;
    -- (what it covers is deleted by the next sweep: a delete here would
    -- hold the lock on the changes, which syncs' captures wait for, until
    -- the consumer's transaction ends, and wait for a sync's transaction)
    UPDATE cd2sync.feed x SET acknowledged = last, acknowledged_at = now() WHERE x.name = f.name;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feeds_awaiting("position" bigint, feed text, table_name text)
RETURNS SETOF text LANGUAGE sql STABLE AS $$
    SELECT x.name FROM cd2sync.feed x
     WHERE x.stale_since IS NULL AND x.acknowledged < _feeds_awaiting."position"
       AND cd2sync._feed_has(x, _feeds_awaiting.feed, _feeds_awaiting.table_name)
$$;


CREATE OR REPLACE FUNCTION cd2sync._feed_forget(f cd2sync.feed, after bigint, upto bigint DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM cd2sync.changes c
     WHERE c.position > after AND c.position <= coalesce(upto, 9223372036854775807)   -- (both bound the scan)
       AND cd2sync._feed_has(f, c.feed, c.table_name)
       AND NOT EXISTS (SELECT FROM cd2sync._feeds_awaiting(c.position, c.feed, c.table_name));
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_may_tidy()
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT current_setting('transaction_isolation') = 'read committed'
           AND NOT current_setting('transaction_read_only')::boolean
$$;

CREATE OR REPLACE FUNCTION cd2sync._feed_sweep(batch int DEFAULT 10000)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
SET enable_sort = off SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
AS $$   -- (the key's order: see cd2_feed_read; a bitmap would read every change below the bound)
DECLARE
    r record;
    left_ bigint := batch;
    seen bigint;
    upto bigint;
    k bigint;
    gone bigint := 0;
BEGIN
    IF NOT cd2sync._feed_may_tidy()
       OR NOT (EXISTS (SELECT 1 FROM cd2sync.feed x
                         JOIN cd2sync.feed_hint h ON h.name = x.name AND h.created_at = x.created_at
                        WHERE x.stale_since IS NULL AND h.forgotten_to < x.acknowledged)
               OR coalesce((SELECT c.position FROM cd2sync.changes c ORDER BY c.position LIMIT 1)
                           <= cd2sync._feed_settled_to(), false)) THEN
        RETURN 0;   -- (nothing to delete, none at all too: no lock taken)
    END IF;
    BEGIN
        LOCK TABLE cd2sync.changes IN ROW EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    FOR r IN SELECT x AS f, h.forgotten_to AS since FROM cd2sync.feed x
               JOIN cd2sync.feed_hint h ON h.name = x.name AND h.created_at = x.created_at
              WHERE x.stale_since IS NULL AND h.forgotten_to < x.acknowledged
              ORDER BY x.name LOOP
        EXIT WHEN left_ <= 0;
        CONTINUE WHEN NOT cd2sync._feed_hint_take(r.f);
        -- up to the feed's left_-th change after it, else its acknowledged position
        SELECT count(*), max(c.position) INTO seen, upto
          FROM (SELECT c.position FROM cd2sync.changes c
                 WHERE c.position > r.since AND c.position <= (r.f).acknowledged
                   AND cd2sync._feed_has(r.f, c.feed, c.table_name)
                 ORDER BY c.position LIMIT left_) c;
        IF seen < left_ THEN
            upto := (r.f).acknowledged;
        END IF;
        DELETE FROM cd2sync.changes c
         WHERE c.position = ANY (ARRAY(SELECT x.position FROM cd2sync.changes x
                                        WHERE x.position > r.since AND x.position <= upto
                                          AND cd2sync._feed_has(r.f, x.feed, x.table_name)
                                          AND NOT EXISTS (SELECT FROM cd2sync._feeds_awaiting(x.position, x.feed, x.table_name))
                                          FOR UPDATE SKIP LOCKED));
        GET DIAGNOSTICS k = ROW_COUNT;
        gone := gone + k;
        UPDATE cd2sync.feed_hint x SET forgotten_to = greatest(x.forgotten_to, upto)
         WHERE x.name = (r.f).name AND x.created_at = (r.f).created_at;
        left_ := left_ - seen;
    END LOOP;
    IF (SELECT c.position FROM cd2sync.changes c ORDER BY c.position LIMIT 1) <= cd2sync._feed_settled_to() THEN
        DELETE FROM cd2sync.changes c
         WHERE c.position = ANY (ARRAY(SELECT x.position FROM cd2sync.changes x
                                        WHERE x.position <= cd2sync._feed_settled_to()
                                        LIMIT batch FOR UPDATE SKIP LOCKED));   -- (the rest at the next)
        GET DIAGNOSTICS k = ROW_COUNT;
        gone := gone + k;
    END IF;
    RETURN gone;
END $$;

CREATE OR REPLACE FUNCTION cd2sync._feed_settled_to()
RETURNS bigint LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(min(cd2sync._feed_since(f, cd2sync._feed_hint(f))), cd2sync._last_position())
      FROM cd2sync.feed f
     WHERE f.stale_since IS NULL
$$;

REVOKE ALL ON FUNCTION cd2sync._feed_over_limits(bigint, timestamptz), cd2sync._last_position() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cd2sync._feed_limits(), cd2sync._feed_over_limits(bigint, timestamptz) TO PUBLIC;

REVOKE ALL ON FUNCTION cd2sync._alter_column_type(regclass, text, text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_capture_table(regclass, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._row_image(record) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_capture_context(regclass, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_row_plan(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feeds_following(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_merge_begin(), cd2sync._feed_merge_end(), cd2sync._feed_changing(text),
                       cd2sync._feed_load_begin(regclass), cd2sync._feed_load_end(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_capture_row() FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_captures(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._tx_clear() FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_forget(cd2sync.feed, bigint, bigint), cd2sync._feed_sweep(integer),
                       cd2sync._feed_may_tidy(), cd2sync._feed_settled_to(), cd2sync._feed_check_limits(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_hint(cd2sync.feed), cd2sync._feed_hint_take(cd2sync.feed),
                       cd2sync._feed_hints_tidy(), cd2sync._feed_since(cd2sync.feed, cd2sync.feed_hint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_counted(cd2sync.feed, cd2sync.feed_hint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_pending(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feeds_awaiting(bigint, text, text),
                       cd2sync._feed_kept_after(cd2sync.feed, cd2sync.feed_hint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._feed_has(cd2sync.feed, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cd2sync._feed_pending(text) TO cd2sync_reader, pg_monitor;
GRANT EXECUTE ON FUNCTION cd2sync._feed_since(cd2sync.feed, cd2sync.feed_hint),
                          cd2sync._feed_counted(cd2sync.feed, cd2sync.feed_hint) TO PUBLIC;
REVOKE ALL ON FUNCTION cd2sync._shows_global(text, text), cd2sync._global_index_column(regclass),
                       cd2sync._ensure_global_indexes(regclass, bigint) FROM PUBLIC;

-- the followed instance tables' capture triggers, now (where the tables'
-- owners allow; else the next sync's _ensure_layout)
DO $$
BEGIN
    PERFORM cd2sync._feed_ensure_captures();
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'cd2sync: capture triggers left to the next sync: %', SQLERRM;
END $$;
