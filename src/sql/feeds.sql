-- feeds.sql: change feeds. A feed follows the reconciled rows (cd2.<table>)
-- of some tables for a downstream system: every insert, update and delete
-- of those rows, in the order they became visible, until the feed
-- acknowledges them.
--
-- How: a row trigger (in C, src/capture.c) on each instance table that
-- some feed follows writes what a statement does to the table's rows, seen
-- as cd2.<table> shows them, to cd2sync.changes at once, in the statement's
-- transaction; positions are taken under a lock held until commit, so that
-- they grow in commit order.
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
-- An image of more than 2 kB is compressed inline: with lz4 where the
-- server has it (pglz took 7% of 1.3's capture of 90,000 updates)
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

CREATE FUNCTION cd2sync._feed_limits(OUT max_pending bigint, OUT max_age_seconds int)
AS 'MODULE_PATHNAME', 'cd2_feed_limits' LANGUAGE C STRICT;

-- Why a feed with pending changes waiting, the oldest committed at oldest,
-- is over cd2sync.feed_max_age or cd2sync.feed_max_pending; NULL when it
-- is not. The one owner of the limits: a feed over them is stale at once
-- (cd2sync.feeds, cd2_feed_read), and is marked so by _feed_check_limits.
CREATE FUNCTION cd2sync._feed_over_limits(pending bigint, oldest timestamptz)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN oldest < now() - make_interval(secs => l.max_age_seconds)
                THEN format('a change waits since %s, longer than cd2sync.feed_max_age', oldest)
                WHEN pending > l.max_pending
                THEN format('more than %s changes wait, over cd2sync.feed_max_pending', l.max_pending) END
      FROM cd2sync._feed_limits() l
$$;

-- Whether a change is feed f's: one of its own (feed, its start's), or one
-- of every feed (feed NULL) of a table f follows (table_name). The one
-- owner of that rule. Inlined where it is called (SQL, one expression, no
-- SET, not strict): a filter beside the bounds on the positions, never a
-- call per change.
CREATE FUNCTION cd2sync._feed_has(f cd2sync.feed, feed text, table_name text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT _feed_has.feed = f.name OR (_feed_has.feed IS NULL AND cd2sync._covers(f.tables, _feed_has.table_name))
$$;

-- The feed's hints (cd2sync.feed_hint); NULL when none
CREATE FUNCTION cd2sync._feed_hint(f cd2sync.feed)
RETURNS cd2sync.feed_hint LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT h FROM cd2sync.feed_hint h WHERE h.name = f.name AND h.created_at = f.created_at
$$;

-- The position after which feed f's changes lie, given its hints h
-- (_feed_hint): its acknowledged one, or where a check found none before
CREATE FUNCTION cd2sync._feed_since(f cd2sync.feed, h cd2sync.feed_hint)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(f.acknowledged, h.scanned_to)
$$;

-- The position after which changes may still be kept for feed f, given its
-- hints h: where sweeps left what it acknowledged (forgotten_to), else
-- where its changes lie (_feed_since). What a drop or a stale mark forgets
-- from.
CREATE FUNCTION cd2sync._feed_kept_after(f cd2sync.feed, h cd2sync.feed_hint)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT least(h.forgotten_to, cd2sync._feed_since(f, h))
$$;

-- What a check counted of feed f's pending changes that still holds, given
-- its hints h: the count, and the position after which to count the rest.
-- A count holds while the feed's acknowledged position is the one it
-- counted from: the changes it counted (up to a position already visible,
-- and positions become visible in order) are deleted only once the feed
-- has acknowledged them (a sweep), by its stale mark, or by a sweep below
-- every live feed.
CREATE FUNCTION cd2sync._feed_counted(f cd2sync.feed, h cd2sync.feed_hint, OUT counted bigint, OUT after bigint)
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN h.counted_from = f.acknowledged THEN h.counted_pending ELSE 0 END,
           CASE WHEN h.counted_from = f.acknowledged THEN greatest(h.counted_to, cd2sync._feed_since(f, h))
                ELSE cd2sync._feed_since(f, h) END
$$;

-- Whether this transaction may write what only keeps things tidy (a
-- hint, changes left to forget) without failing: not read-only, and READ
-- COMMITTED (in REPEATABLE READ, a row another transaction updated or
-- deleted since the snapshot is a serialization failure)
CREATE FUNCTION cd2sync._feed_may_tidy()
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT current_setting('transaction_isolation') = 'read committed'
           AND NOT current_setting('transaction_read_only')::boolean
$$;

-- Takes feed f's hints to write them (held until commit), unless another
-- transaction holds them or this one may not (_feed_may_tidy): a hint is
-- never waited for, and never fails a transaction. False when not taken.
CREATE FUNCTION cd2sync._feed_hint_take(f cd2sync.feed)
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
CREATE FUNCTION cd2sync._feed_hints_tidy()
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM cd2sync.feed_hint h
     WHERE (h.name, h.created_at) IN
           (SELECT y.name, y.created_at FROM cd2sync.feed_hint y
             WHERE NOT EXISTS (SELECT 1 FROM cd2sync.feed f WHERE f.name = y.name AND f.created_at = y.created_at)
               FOR UPDATE OF y SKIP LOCKED)
$$;

-- The pending changes of the feed named (none when stale), and when the
-- oldest of them committed: what a check counted, while its count holds
-- (_feed_counted), and those after it; the oldest is the first by position
-- (they commit in that order), as _feed_check_limits takes it, by the key.
-- For cd2sync.feeds, as the reader of the view (cd2sync_reader,
-- pg_monitor), of a feed there is: no JIT, which a view cannot turn off
-- (the planner takes a third of the changes to match a position it does
-- not know, and compiling took 100 times longer than the count, at each
-- read of cd2sync.monitoring), and no plan that reads every change to find
-- the first (the view joined it, and took a scan of them all when the
-- statistics said the table was small).
CREATE FUNCTION cd2sync._feed_pending(name text, OUT pending bigint, OUT oldest timestamptz)
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

-- A feed over its limits is stale before a sync marks it (a read that
-- finds it so fails).
CREATE VIEW cd2sync.feeds AS
    SELECT f.name, f.tables, f.acknowledged, p.pending, p.oldest AS oldest_pending,
           CASE WHEN f.stale_since IS NULL AND cd2sync._feed_over_limits(p.pending, p.oldest) IS NULL
                THEN 'ok' ELSE 'stale' END AS status
      FROM cd2sync.feed f
      CROSS JOIN LATERAL cd2sync._feed_pending(f.name) p;

-- The image of a row: to_jsonb(r), made for every change faster (src/capture.c)
CREATE FUNCTION cd2sync._row_image(r record)
RETURNS jsonb AS 'MODULE_PATHNAME', 'cd2_row_image' LANGUAGE C STABLE STRICT PARALLEL SAFE;

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

-- The feeds (not stale) following the table, by name
CREATE FUNCTION cd2sync._feeds_following(table_name text)
RETURNS text[] LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ARRAY(SELECT f.name FROM cd2sync.feed f
                  WHERE f.stale_since IS NULL
                    AND cd2sync._covers(f.tables, _feeds_following.table_name)
                  ORDER BY f.name)
$$;

-- Whether any feed (not stale) follows the table
CREATE FUNCTION cd2sync._feed_follows(table_name text)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT cardinality(cd2sync._feeds_following(table_name)) > 0
$$;

-- The last position published and visible (NULL: none), from the key's
-- end (see cd2_feed_read on the sort this avoids: with the table's
-- statistics misleading the planner, max() read every change)
CREATE FUNCTION cd2sync._last_position()
RETURNS bigint LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET enable_sort = off SET jit = off AS $$
    SELECT c.position FROM cd2sync.changes c ORDER BY c.position DESC LIMIT 1
$$;

-- ---------------------------------------------------------------------------
-- Capture
-- ---------------------------------------------------------------------------

-- Takes positions: the lock on cd2sync.changes is held until the
-- transaction ends, so a transaction that writes changes later waits for
-- this one to commit and takes higher positions. (The row capture takes
-- the same lock in C: src/capture.c.)
CREATE FUNCTION cd2sync._feed_lock()
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    LOCK TABLE cd2sync.changes IN EXCLUSIVE MODE;
END $$;

-- What a capture of instance table rel writes besides its rows: its
-- instance (and shard), the cause, the table's watermark as this
-- transaction commits it, and its key columns. All NULL when there is
-- nothing to write: rel is not an instance's table (any more), its
-- instance is changing as a whole (_feed_capture_instance says what), or it
-- is being loaded new (_feed_load_begin).
-- cause: NULL for the transaction's (cd2sync_tx.cause, set by the step that
-- writes: _apply, _after_apply, ...; else 'sync').
CREATE FUNCTION cd2sync._feed_capture_context(rel regclass, table_name text, cause text DEFAULT NULL,
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

-- The statement that writes, as changes, the rows of instance table rel
-- before (old_src) or after (new_src) a change no trigger sees, reading
-- them from that relation (the table itself) as cd2.<table> shows them
-- (_view_select): a delete or an insert of each. NULL when there is
-- nothing to write (_feed_capture_context). An ordinary statement's rows
-- are captured one by one (_feed_capture_row).
CREATE FUNCTION cd2sync._feed_capture_sql(rel regclass, table_name text, old_src text, new_src text,
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

-- What _feed_capture_row captures of instance table rel's rows: the CD2
-- table, the context (_feed_capture_context) and the statement giving a
-- row's view image from its table row t (_view_select). All NULL when
-- nothing is to be captured. (Which feeds follow the table it asks once it
-- holds the lock on the changes, with the latest snapshot: none that is not
-- stale, nothing is captured either.)
CREATE FUNCTION cd2sync._feed_row_plan(rel regclass, OUT table_name text, OUT instance text, OUT cause text,
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

-- A merge pass (the replacements and duplicate flags a new merge map
-- changes, over several statements) gives each row it changes one update,
-- cause 'merge', however many of its statements write the row: from
-- _feed_merge_begin to _feed_merge_end the capture keeps the view image of
-- each row a statement updates, as it was before (src/capture.c,
-- capture_defer), in pg_temp.cd2_merge_before (made by the first it keeps);
-- the end writes an update for each row whose view row now differs from the
-- first image kept of it.
-- begin returns whether it began the pass (a pass within one is the outer
-- one's), and the caller ends the pass it began.
CREATE FUNCTION cd2sync._feed_merge_begin()
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('cd2sync_tx.merge_pass', true) = 'on' OR NOT EXISTS (SELECT 1 FROM cd2sync.feed) THEN
        RETURN false;   -- (no feed, no capture: no pass)
    END IF;
    PERFORM set_config('cd2sync_tx.merge_pass', 'on', true);
    RETURN true;
END $$;

CREATE FUNCTION cd2sync._feed_merge_end()
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

-- Captures an instance table's rows, one by one, as each statement changes
-- them (src/capture.c): an AFTER ROW trigger (on a partitioned instance
-- table, its partitions' too)
CREATE FUNCTION cd2sync._feed_capture_row()
RETURNS trigger AS 'MODULE_PATHNAME', 'cd2_feed_capture_row' LANGUAGE C;

-- A TRUNCATE of a followed instance table deletes its rows from the feeds:
-- they are captured before it, from the table
CREATE FUNCTION cd2sync._feed_capture()
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

-- NOTIFY cd2sync_feed, payload the feed, for each feed following the table
-- (delivered at commit; repeats within a transaction are folded)
CREATE FUNCTION cd2sync._feed_notify(table_name text)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('cd2sync_feed', f) FROM unnest(cd2sync._feeds_following(table_name)) f
$$;

-- Whether the rows written to instance table rel reach the change feeds:
-- it has the capture triggers (_feed_ensure_capture). A writer that asks
-- with rel locked for writing (src/catalog.c, catalog_feed_captures) gets
-- an answer that holds until it commits: a feed's creation or drop changes
-- the triggers under a lock that waits for it.
CREATE FUNCTION cd2sync._feed_captures(rel regclass)
RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_trigger t
                    WHERE t.tgrelid = rel AND t.tgname = 'cd2_feed_insert'
                      AND t.tgfoid = 'cd2sync._feed_capture_row()'::regprocedure)
$$;

-- Gives an instance table its capture triggers when a feed follows the
-- table, and takes them away when none does, but only while the feeds
-- change (_feed_changing): a sync (refresh_view) only adds them, and
-- takes away those of 1.3 (statement triggers over transition tables,
-- which fail writes), replaced when a feed follows the table.
-- Changes to the feeds take one at a time, each seeing what the last
-- committed: a feed dropped while another is created on the same table
-- cannot leave it without triggers. (Triggers no feed needs any more are
-- harmless: the capture writes nothing when no feed that is not stale
-- follows the table.)
CREATE FUNCTION cd2sync._feed_ensure_capture(rel regclass, table_name text)
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

-- A change that rewrites an instance table's rows where no trigger sees it
-- (an ALTER of a column's type) changes them in the views wholesale: side
-- 'old', before it, writes a delete for each of its rows, when a feed
-- follows the table; side 'new', after it, an insert (cause 'resync', or
-- the one given). Which feeds follow it is asked under the changes' lock,
-- as the row capture does: a feed created meanwhile is among them.
CREATE FUNCTION cd2sync._feed_capture_table(rel regclass, side text, cause text DEFAULT 'resync')
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

-- A change to an instance itself (added, dropped, a new shard_id or target
-- schema) changes its rows in the views wholesale: each of its tables as
-- _feed_capture_table says. In between its rows are not captured
-- (cd2sync_tx.quiet_instance) as passes bring them up to date.
CREATE FUNCTION cd2sync._feed_capture_instance(instance text, side text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.rel FROM cd2sync._instance_tables(instance) t LOOP
        PERFORM cd2sync._feed_capture_table(r.rel, side);
    END LOOP;
    PERFORM set_config('cd2sync_tx.quiet_instance', CASE WHEN side = 'old' THEN instance ELSE '' END, true);
END $$;

-- A table loaded new in this transaction (its first snapshot straight by
-- COPY, or loaded apart: _finish_loading) gets its users' replacements
-- after its rows are in (_after_apply). A feed is to see each of its rows
-- once, as an insert showing the replacement, not an insert of the stored
-- user and then an update: from _feed_load_begin the capture passes over
-- the table's rows, and _feed_load_end (_after_apply, once the replacements
-- are in) writes an insert of each row it holds then.
CREATE FUNCTION cd2sync._feed_load_begin(rel regclass)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('cd2sync_tx.loading_new', rel::oid::text, true)
$$;

-- Then, under the lock that took, the table gets its capture triggers if a
-- feed follows it now: one created while the table was new here could not
-- see it (cd2_create_feed looks again once it has the lock, for a feed
-- that took it first), and the table's later writes, another instance's
-- merge say, are to reach that feed.
CREATE FUNCTION cd2sync._feed_load_end(rel regclass)
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

-- Marks stale, with a WARNING, every feed over its limits
-- (_feed_over_limits), and forgets its changes no other feed waits for.
-- Returns the feeds over their limits it did not mark, with why (as
-- {"name": "why"}): a transaction that may not write them (read-only, a
-- standby's, or REPEATABLE READ), or a feed whose row another holds.
-- reader: the feed a read checks, alone, and marks not: a mark forgets
-- changes, and the lock on the changes that takes would be held as long
-- as the consumer keeps its transaction open, with syncs waiting. (The end
-- of a sync marks it.)
-- (The capture triggers of tables no feed follows any more go with the
-- next creation or drop of a feed: _feed_ensure_capture.)
CREATE FUNCTION cd2sync._feed_check_limits(reader text DEFAULT NULL)
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

-- The feeds (not stale) that wait for the change at position, of feed (its
-- start's) or of every feed following table_name: those that have not
-- acknowledged it. A set, not a boolean, so that it is inlined where it is
-- called (NOT EXISTS (SELECT FROM ...)): no SET, and a function that
-- returns one value is not inlined when it holds a subquery; it would
-- then run once per change.
CREATE FUNCTION cd2sync._feeds_awaiting("position" bigint, feed text, table_name text)
RETURNS SETOF text LANGUAGE sql STABLE AS $$
    SELECT x.name FROM cd2sync.feed x
     WHERE x.stale_since IS NULL AND x.acknowledged < _feeds_awaiting."position"
       AND cd2sync._feed_has(x, _feeds_awaiting.feed, _feeds_awaiting.table_name)
$$;

-- Deletes feed f's changes (its own, and those of the tables it follows)
-- with positions in (after, upto] that no feed waits for any more
-- (_feeds_awaiting), where f dropped or gone stale no longer waits for them;
-- the other changes it passes are not its to forget. Only a drop and a
-- stale mark call it, in READ COMMITTED (a change another transaction
-- deletes first is passed over); what acknowledgements leave is
-- _feed_sweep's.
CREATE FUNCTION cd2sync._feed_forget(f cd2sync.feed, after bigint, upto bigint DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM cd2sync.changes c
     WHERE c.position > after AND c.position <= coalesce(upto, 9223372036854775807)   -- (both bound the scan)
       AND cd2sync._feed_has(f, c.feed, c.table_name)
       AND NOT EXISTS (SELECT FROM cd2sync._feeds_awaiting(c.position, c.feed, c.table_name));
END $$;

-- The position up to which no feed (not stale) waits for a change: the
-- least after which a feed's changes lie (_feed_since), or the last
-- position when there is no feed (a feed made after this snapshot starts
-- after every change it shows)
CREATE FUNCTION cd2sync._feed_settled_to()
RETURNS bigint LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(min(cd2sync._feed_since(f, cd2sync._feed_hint(f))), cd2sync._last_position())
      FROM cd2sync.feed f
     WHERE f.stale_since IS NULL
$$;

-- Deletes the changes no feed waits for any more, at most batch of each
-- kind, where the lock on the changes is held anyway or briefly: at the end
-- of every table's sync, of a drop, and at each look of the scheduler
-- (src/scheduler.c), never in a consumer's transaction. Two kinds:
--   the changes each feed acknowledged since the last sweep
--   (feed_hint.forgotten_to) that no other feed waits for
--   (_feeds_awaiting): an acknowledgement only moves the feed's position, so
--   that nothing a consumer's transaction holds is waited for by a sync's,
--   nor the other way round;
--   every change up to _feed_settled_to (every feed's _feed_since, in the
--   sweep's own snapshot), which also takes what the first left: a change
--   another transaction held, of a feed without hints.
-- Never waits nor fails: a lock on the changes another transaction holds
-- (a sync writing them, a feed being made), a feed's hints another holds,
-- or a change another deletes, is left to a later sweep; a transaction
-- that is not READ COMMITTED, or is read-only, deletes none
-- (_feed_may_tidy). Returns how many changes it deleted.
-- (Each statement takes the changes to delete, and its bound, once: an
-- InitPlan, never a subquery a plan could scan again for each change, with
-- the bound taken again each time. No JIT: with sequential scans disabled
-- here, the bound's small query looks costly enough to compile, at each
-- call.)
CREATE FUNCTION cd2sync._feed_sweep(batch int DEFAULT 10000)
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

-- ---------------------------------------------------------------------------
-- The SQL surface
-- ---------------------------------------------------------------------------

-- Changes to the feeds (a creation, a drop) take their turn: one at a time,
-- in READ COMMITTED, each reading what the last committed (the start of a
-- new feed, which tables' triggers to add or take away). Held until commit.
CREATE FUNCTION cd2sync._feed_changing(what text)
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

CREATE FUNCTION cd2_create_feed(name text, tables text[] DEFAULT NULL, from_start boolean DEFAULT false)
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

CREATE FUNCTION cd2_drop_feed(name text)
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

-- The changes after the feed's acknowledged position, in position order,
-- without advancing it.
-- (Here and in _feed_check_limits the first changes after a position are
-- read in the key's order, never sorted: cd2sync.changes is emptied and
-- filled again between its ANALYZEs, a VACUUM of it emptied records no
-- rows in its pages, and the planner then expects one change pending and
-- would read all of them, and sort them, to return the first few.)
CREATE FUNCTION cd2_feed_read(name text, max_changes int DEFAULT 10000)
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

-- Everything up to position upto is processed. Less than before: a no-op;
-- never past the last change published.
CREATE FUNCTION cd2_feed_ack(name text, upto bigint)
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

SELECT pg_catalog.pg_extension_config_dump('cd2sync.feed', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.feed_hint', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.changes', '');
SELECT pg_catalog.pg_extension_config_dump('cd2sync.change_position_seq', '');
