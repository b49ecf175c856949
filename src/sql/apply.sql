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

-- The columns to fill: those the result's files carry (NULL: all) that the
-- upstream schema still has (NULL: not known).
CREATE FUNCTION cd2sync._fill_columns(carried text[], upstream text[])
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN upstream IS NULL THEN carried
                ELSE ARRAY(SELECT c FROM unnest(coalesce(carried, upstream)) c
                            WHERE c = ANY (upstream)) END
$$;
