-- apply.sql: from the staging table to the target table, set-based.
--
-- The decoder (src/decode.c) COPYs each result file into pg_temp.cd2_stage,
-- one text column per target column plus cd2_action and cd2_ts. These
-- functions cast, de-duplicate and apply the whole result with a handful of
-- statements, in the caller's transaction: the rows and the watermark
-- commit together.

-- The staging table of a target table: every column as text.
CREATE FUNCTION cd2sync._create_staging(target regclass)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $$
BEGIN
    IF to_regclass('pg_temp.cd2_stage') IS NOT NULL THEN
        DROP TABLE pg_temp.cd2_stage, pg_temp.cd2_stage_json;
    END IF;
    EXECUTE format('CREATE TEMP TABLE cd2_stage (cd2_action text, cd2_ts text%s) ON COMMIT DROP',
        (SELECT string_agg(format(', %I text', attname), '' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = target AND attnum > 0 AND NOT attisdropped));
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
    SELECT string_agg(format('%I', attname), ', ' ORDER BY attnum),
           string_agg(format('j->%L->>%L', CASE WHEN attname = ANY (keys) THEN 'key' ELSE 'value' END,
                             attname), ', ' ORDER BY attnum)
      INTO cols, exprs
      FROM pg_attribute WHERE attrelid = target AND attnum > 0 AND NOT attisdropped;
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

-- The expression that turns staged text s.<col> into the column's type.
CREATE FUNCTION cd2sync._cast_expr(col text, typid oid, typmod int)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN typid = 'timestamp'::regtype
            THEN format('(s.%I::timestamptz AT TIME ZONE ''UTC'')', col)
        WHEN typid IN ('text'::regtype, 'varchar'::regtype)
            THEN format('s.%I', col)   -- assignment enforces varchar(n)
        WHEN t.typcategory = 'A'
            THEN format('cd2sync._pg_array_text(s.%I)::%s', col, format_type(typid, typmod))
        ELSE format('s.%I::%s', col, format_type(typid, typmod)) END
      FROM pg_type t WHERE t.oid = typid
$$;

-- Applies the staged result to the target table.
--   mode 'snapshot_new': the table is empty: insert every row;
--   mode 'snapshot': the result replaces the table's contents (upsert every
--        row, delete rows the result lacks), without ever emptying it;
--   mode 'incremental': upsert records with action U, delete those with D.
-- fill: the columns the result carries (NULL: all); others are left alone.
-- A value "__cd2_oversized_truncated__" never replaces a stored value.
-- Rows whose values did not change are not rewritten.
CREATE FUNCTION cd2sync._apply(target regclass, mode text, fill text[] DEFAULT NULL,
                               OUT upserted bigint, OUT deleted bigint,
                               OUT unchanged bigint, OUT oversized bigint)
LANGUAGE plpgsql
-- the de-duplicating sort of a large result stays in memory (bounded)
SET search_path = pg_catalog, pg_temp SET work_mem = '32MB' AS $$
DECLARE
    ph constant text := '__cd2_oversized_truncated__';
    keys text[] := cd2sync._key_columns(target);
    a record;
    cols text[] := '{}';     -- quoted column names to fill
    exprs text[] := '{}';    -- their values, from staging s (and target t)
    setcols text[] := '{}';  -- non-key columns
    keyjoin text;
    keyjoin_typed text;      -- t.k = d.k for target t and cd2_typed d
    keyorder text;
    has_ph boolean;
    ph_new text;
    written bigint;
BEGIN
    IF keys IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key', target USING ERRCODE = 'invalid_table_definition';
    END IF;

    -- values kept because of placeholders (a table just created keeps none)
    IF mode = 'snapshot_new' THEN
        oversized := 0;
    ELSE
        EXECUTE format('SELECT count(*) FROM cd2_stage s WHERE %L IN (%s)', ph,
            (SELECT string_agg(format('s.%I', attname), ', ')
               FROM pg_attribute WHERE attrelid = target AND attnum > 0 AND NOT attisdropped))
          INTO oversized;
    END IF;
    has_ph := oversized > 0;

    FOR a IN SELECT attname::text AS name, atttypid, atttypmod,
                    (SELECT typcategory FROM pg_type WHERE oid = atttypid) AS cat
               FROM pg_attribute
              WHERE attrelid = target AND attnum > 0 AND NOT attisdropped
                AND (fill IS NULL OR attname = ANY (fill) OR attname = ANY (keys))
              ORDER BY attnum LOOP
        cols := cols || format('%I', a.name);
        IF a.name = ANY (keys) THEN
            exprs := exprs || cd2sync._cast_expr(a.name, a.atttypid, a.atttypmod);
        ELSE
            setcols := setcols || format('%I', a.name);
            -- what a placeholder becomes in a new row: itself where text can hold it
            ph_new := CASE WHEN a.cat = 'S' AND (a.atttypmod < 0 OR a.atttypmod - 4 >= length(ph))
                           THEN quote_literal(ph) ELSE 'NULL' END;
            IF mode = 'snapshot_new' THEN
                exprs := exprs || format('CASE WHEN s.%I = %L THEN %s ELSE %s END',
                    a.name, ph, ph_new, cd2sync._cast_expr(a.name, a.atttypid, a.atttypmod));
            ELSIF has_ph THEN
                -- keep the stored value
                exprs := exprs || format(
                    'CASE WHEN s.%I = %L THEN CASE WHEN t.%I IS NULL THEN %s ELSE t.%I END ELSE %s END',
                    a.name, ph, keys[1], ph_new,
                    a.name, cd2sync._cast_expr(a.name, a.atttypid, a.atttypmod));
            ELSE
                exprs := exprs || cd2sync._cast_expr(a.name, a.atttypid, a.atttypmod);
            END IF;
        END IF;
    END LOOP;

    SELECT string_agg(format('t.%I = %s', k, cd2sync._cast_expr(k, atttypid, atttypmod)), ' AND '),
           string_agg(format('%I', k), ', ')
      INTO keyjoin, keyorder
      FROM unnest(keys) k JOIN pg_attribute ON attrelid = target AND attname = k;
    SELECT string_agg(format('t.%1$I = d.%1$I', k), ' AND ') INTO keyjoin_typed FROM unnest(keys) k;

    IF mode = 'snapshot_new' THEN
        -- keys are unique within one result: no sort needed
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM cd2_stage s
                         WHERE s.cd2_action IS DISTINCT FROM ''D'' ON CONFLICT DO NOTHING',
                       target, array_to_string(cols, ', '), array_to_string(exprs, ', '));
        GET DIAGNOSTICS upserted = ROW_COUNT;
        deleted := 0;
        unchanged := 0;
        RETURN;
    END IF;

    -- one typed row per key: the latest change wins
    EXECUTE format('CREATE TEMP TABLE cd2_typed ON COMMIT DROP AS
                    SELECT DISTINCT ON (%s) s.cd2_action AS cd2_action, %s
                      FROM cd2_stage s %s
                     ORDER BY %s, s.cd2_ts DESC NULLS LAST, s.ctid DESC',
                   keyorder,
                   (SELECT string_agg(format('%s AS %s', e, c), ', ')
                      FROM unnest(exprs, cols) u(e, c)),
                   CASE WHEN has_ph THEN format('LEFT JOIN %s t ON %s', target, keyjoin) ELSE '' END,
                   keyorder);
    -- evidence of user merges that CD2 does not keep (logins, enrolments moving)
    PERFORM cd2sync._record_user_moves(target);

    SELECT count(*) FILTER (WHERE cd2_action = 'D'), count(*) FILTER (WHERE cd2_action IS DISTINCT FROM 'D')
      INTO deleted, upserted FROM cd2_typed;
    EXECUTE format('DELETE FROM %s t USING cd2_typed d WHERE d.cd2_action = ''D'' AND %s',
                   target, keyjoin_typed);
    IF mode = 'snapshot' THEN
        -- rows the new snapshot does not have are gone upstream
        EXECUTE format('DELETE FROM %s t WHERE NOT EXISTS (SELECT 1 FROM cd2_typed d WHERE %s)',
                       target, keyjoin_typed);
        GET DIAGNOSTICS deleted = ROW_COUNT;
    END IF;

    -- records that change nothing are dropped here: their rows are neither
    -- rewritten nor even locked (no new row version, no WAL)
    EXECUTE format('DELETE FROM cd2_typed d USING %s t WHERE d.cd2_action IS DISTINCT FROM ''D'' AND %s%s',
                   target, keyjoin_typed,
                   CASE WHEN cardinality(setcols) = 0 THEN ''
                        ELSE format(' AND (%s) IS NOT DISTINCT FROM (%s)',
                                    (SELECT string_agg('t.' || c, ', ') FROM unnest(setcols) c),
                                    (SELECT string_agg('d.' || c, ', ') FROM unnest(setcols) c)) END);

    IF cardinality(setcols) = 0 THEN
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM cd2_typed WHERE cd2_action IS DISTINCT FROM ''D''
                         ON CONFLICT DO NOTHING', target, array_to_string(cols, ', '), array_to_string(cols, ', '));
    ELSE
        EXECUTE format('INSERT INTO %1$s AS t (%2$s) SELECT %2$s FROM cd2_typed
                         WHERE cd2_action IS DISTINCT FROM ''D''
                        ON CONFLICT (%3$s) DO UPDATE SET (%4$s) = ROW(%5$s)
                         WHERE (%6$s) IS DISTINCT FROM (%5$s)',
                       target, array_to_string(cols, ', '), keyorder,
                       array_to_string(setcols, ', '),
                       (SELECT string_agg('excluded.' || c, ', ') FROM unnest(setcols) c),
                       (SELECT string_agg('t.' || c, ', ') FROM unnest(setcols) c));
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    unchanged := upserted - written;
    DROP TABLE cd2_typed;
END $$;

-- The columns to fill: those the result's files carry (NULL: all) that the
-- upstream schema still has (NULL: not known).
CREATE FUNCTION cd2sync._fill_columns(carried text[], upstream text[])
RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN upstream IS NULL THEN carried
                ELSE ARRAY(SELECT c FROM unnest(coalesce(carried, upstream)) c
                            WHERE c = ANY (upstream)) END
$$;
