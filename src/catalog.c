/*-------------------------------------------------------------------------
 *
 * catalog.c
 *	  The only C file that speaks SQL. Reads and writes cd2sync's own
 *	  tables (the instance's configuration and secret, the state of each
 *	  table with its watermark, runs and the sync log), asks the questions
 *	  the sync has about its target tables, and calls the SQL stages (the
 *	  schema, staging, apply and the hooks around it).
 *
 * Every value goes to SQL as a parameter. Callers own the transactions:
 * the success of a table sync is recorded in the transaction that applies
 * its rows, so watermark and rows commit together.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "access/xact.h"
#include "catalog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/snapmgr.h"

/*
 * Runs one statement with text parameters (NULL for SQL NULL), inside
 * SPI_connect: the caller reads SPI_tuptable before SPI_finish.
 */
static void execute_as(const char *sql, int nargs, const char **args, bool read_only);

static void
execute(const char *sql, int nargs, const char **args)
{
	execute_as(sql, nargs, args, false);
}

/*
 * read_only: with the active snapshot (which the caller pushed), as a
 * read-only statement: not a new transaction snapshot
 */
static void
execute_as(const char *sql, int nargs, const char **args, bool read_only)
{
	Oid *types = palloc(sizeof(Oid) * Max(nargs, 1));
	Datum *values = palloc(sizeof(Datum) * Max(nargs, 1));
	char *nulls = palloc(Max(nargs, 1) + 1);
	int rc;

	for (int i = 0; i < nargs; i++)
	{
		types[i] = TEXTOID;
		values[i] = args[i] ? CStringGetTextDatum(args[i]) : (Datum) 0;
		nulls[i] = args[i] ? ' ' : 'n';
	}
	nulls[nargs] = '\0';
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, read_only, 0);
	if (rc < 0)
		elog(ERROR, "cd2sync catalog query failed: %s", SPI_result_code_string(rc));
}

/*
 * Runs one statement; returns the first row's values as strings in the
 * caller's memory context, or NULL when there is no row.
 */
static char **
run_row(const char *sql, int nargs, const char **args)
{
	MemoryContext cxt = CurrentMemoryContext;
	char **row = NULL;

	SPI_connect();
	execute(sql, nargs, args);
	if (SPI_tuptable && SPI_processed > 0)
	{
		TupleDesc desc = SPI_tuptable->tupdesc;

		row = MemoryContextAllocZero(cxt, sizeof(char *) * (desc->natts + 1));
		for (int i = 0; i < desc->natts; i++)
		{
			char *v = SPI_getvalue(SPI_tuptable->vals[0], desc, i + 1);

			row[i] = v ? MemoryContextStrdup(cxt, v) : NULL;
		}
	}
	SPI_finish();
	return row;
}

/*
 * Runs one statement whose first ncols columns are of types passed by
 * value (bool, bigint, oid); fills values and nulls from its first row.
 * False when there is no row.
 */
static bool
run_values(const char *sql, int nargs, const char **args, int ncols, Datum *values, bool *nulls)
{
	bool found = false;

	SPI_connect();
	execute(sql, nargs, args);
	if (SPI_tuptable && SPI_processed > 0)
	{
		TupleDesc desc = SPI_tuptable->tupdesc;

		if (desc->natts < ncols)
			elog(ERROR, "cd2sync catalog query returned %d columns, not %d", desc->natts, ncols);
		for (int i = 0; i < ncols; i++)
		{
			if (!TupleDescAttr(desc, i)->attbyval)
				elog(ERROR, "cd2sync catalog query column %d is not passed by value", i + 1);
			values[i] = SPI_getbinval(SPI_tuptable->vals[0], desc, i + 1, &nulls[i]);
		}
		found = true;
	}
	SPI_finish();
	return found;
}

/* Runs a statement; returns the first column of the first row, or NULL */
static char *
sql_text(const char *sql, int nargs, const char **args)
{
	char **row = run_row(sql, nargs, args);

	return row ? row[0] : NULL;
}

/* Runs a statement; the first column of every row, as strings (NULLs skipped) */
static List *
sql_list(const char *sql, int nargs, const char **args)
{
	MemoryContext cxt = CurrentMemoryContext;
	List *result = NIL;

	SPI_connect();
	execute(sql, nargs, args);
	for (uint64 i = 0; SPI_tuptable && i < SPI_processed; i++)
	{
		char *v = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);

		if (v)
		{
			MemoryContext old = MemoryContextSwitchTo(cxt);

			result = lappend(result, pstrdup(v));
			MemoryContextSwitchTo(old);
		}
	}
	SPI_finish();
	return result;
}

/* Runs a statement; whether its first row's first (boolean) column is true */
static bool
sql_bool(const char *sql, int nargs, const char **args)
{
	Datum value;
	bool isnull;

	return run_values(sql, nargs, args, 1, &value, &isnull) && !isnull && DatumGetBool(value);
}

/*
 * Runs a statement; n bigint columns of its first row into out (NULL: 0).
 * False when there is no row.
 */
static bool
sql_int64s(const char *sql, int nargs, const char **args, int n, int64 *out)
{
	Datum *values = palloc(sizeof(Datum) * n);
	bool *nulls = palloc(sizeof(bool) * n);

	if (!run_values(sql, nargs, args, n, values, nulls))
		return false;
	for (int i = 0; i < n; i++)
		out[i] = nulls[i] ? 0 : DatumGetInt64(values[i]);
	return true;
}

/* Whether the extension's SQL objects are at this library's version */
bool
catalog_sql_current(void)
{
	const char *args[1] = { CD2SYNC_VERSION };

	return sql_bool("SELECT extversion = $1 FROM pg_catalog.pg_extension "
					" WHERE extname = 'cd2sync'",
					1, args);
}

/*
 * One sweep of the change feeds' changes that no feed waits for any more
 * (cd2sync._feed_sweep, in the caller's transaction); returns how many it
 * deleted.
 */
int64
catalog_feed_sweep(void)
{
	int64 gone = 0;

	if (!sql_int64s("SELECT cd2sync._feed_sweep()", 0, NULL, 1, &gone))
		return 0;
	return gone;
}

/*
 * The instances with a schedule that are not running, soonest due first:
 * a list of ScheduleDue in the caller's memory context.
 */
List *
catalog_schedules_due(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	List *due = NIL;

	SPI_connect();
	execute("SELECT instance, greatest(0, extract(epoch FROM next_run_at - now()) * 1000)::int8 "
			"  FROM cd2sync.schedules "
			" WHERE schedule IS NOT NULL AND NOT running ORDER BY next_run_at",
			0, NULL);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);
		ScheduleDue *d = palloc(sizeof(ScheduleDue));
		bool isnull;

		d->instance = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		d->due_in_ms =
			DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull));
		due = lappend(due, d);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	return due;
}

static char *
int8_text(int64 v)
{
	return psprintf(INT64_FORMAT, v);
}

static char *
float_text(double v)
{
	return psprintf("%.6f", v);
}

/* A text[] literal of a list of strings, or NULL for NIL */
static char *
catalog_text_array(List *l)
{
	StringInfoData buf;
	ListCell *lc;

	if (l == NIL)
		return NULL;
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	foreach (lc, l)
	{
		const char *s = (const char *) lfirst(lc);

		if (foreach_current_index(lc) > 0)
			appendStringInfoChar(&buf, ',');
		appendStringInfoChar(&buf, '"');
		for (; *s; s++)
		{
			if (*s == '"' || *s == '\\')
				appendStringInfoChar(&buf, '\\');
			appendStringInfoChar(&buf, *s);
		}
		appendStringInfoChar(&buf, '"');
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/* s cut to at most limit bytes, at a character boundary */
static const char *
clip_bytes(const char *s, int limit)
{
	int len;

	if (s == NULL)
		return NULL;
	len = strlen(s);
	return len <= limit ? s : pnstrdup(s, pg_mbcliplen(s, len, limit));
}

/*
 * NOTIFY cd2sync with what a table sync did, as JSON, delivered when the
 * transaction that recorded it commits. A payload must stay under 8000
 * bytes whatever the API sends: the table name (from the API when every
 * table is synced) and the error are cut by bytes, and JSON escapes each
 * byte into at most six (200 * 6 + 1000 * 6 + the rest < 8000).
 */
static void
notify(int64 run_id, const char *instance, const char *table, const char *status, const char *mode,
	   const char *watermark, const char *error)
{
	const char *args[7] = {
		int8_text(run_id),      instance, clip_bytes(table, 200), status, mode, watermark,
		clip_bytes(error, 1000)
	};

	run_row("SELECT pg_notify('cd2sync', json_build_object("
			"  'run_id', $1::bigint, 'instance', $2, 'table', $3, 'status', $4, 'mode', $5, "
			"  'watermark', $6::timestamptz, 'error', $7)::text)",
			7, args);
}

InstanceConfig *
catalog_load_instance(const char *name)
{
	const char *args[1] = { name };
	char **row = run_row("SELECT i.client_id, s.client_secret, i.api_url, i.target_schema, "
						 "       array_to_string(i.tables, E'\\n') "
						 "  FROM cd2sync.instances i "
						 "  JOIN cd2sync.instance_secrets s ON s.instance = i.name "
						 " WHERE i.name = $1",
						 1, args);
	InstanceConfig *ic;

	if (row == NULL)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT),
						errmsg("cd2sync instance \"%s\" does not exist", name)));
	ic = palloc0(sizeof(InstanceConfig));
	ic->name = pstrdup(name);
	ic->client_id = row[0];
	ic->client_secret = row[1];
	ic->api_url = row[2];
	ic->target_schema = row[3];
	if (row[4])
	{
		char *tok;
		char *save;

		for (tok = strtok_r(row[4], "\n", &save); tok; tok = strtok_r(NULL, "\n", &save))
			ic->tables = lappend(ic->tables, pstrdup(tok));
	}
	return ic;
}

void
catalog_run_start(int64 run_id, const char *instance, List *tables, bool full, const char *trigger)
{
	const char *args[5] = { int8_text(run_id), instance, catalog_text_array(tables),
							full ? "true" : "false", trigger };

	run_row("INSERT INTO cd2sync.runs (run_id, instance, tables, full_sync, trigger, worker_pid) "
			"VALUES ($1::bigint, $2, $3::text[], $4::boolean, $5, pg_backend_pid())",
			5, args);
}

void
catalog_run_finish(int64 run_id, const char *error, const char *sqlstate)
{
	const char *args[3] = { int8_text(run_id), error, sqlstate };

	run_row("UPDATE cd2sync.runs SET finished_at = clock_timestamp(), "
			"       status = CASE WHEN $2 IS NULL THEN 'done' ELSE 'failed' END, "
			"       error = $2, error_code = $3 "
			" WHERE run_id = $1::bigint",
			3, args);
}

void
catalog_table_state(const char *instance, const char *target_schema, const char *table,
					TableState *st)
{
	const char *args[3] = { instance, table, target_schema };
	Datum v[3];
	bool n[3];
	char **place;

	if (!run_values(
			"SELECT s.schema_version::int8, "
			"       cd2sync._instance_rel($3, $2) IS NOT NULL, "
			"       s.pending_types IS NOT NULL OR "
			"       coalesce(s.snapshot_at + i.full_resync_every <= now(), "
			"                i.full_resync_every IS NOT NULL) "
			"  FROM cd2sync.instances i "
			"  LEFT JOIN cd2sync.table_state s ON s.instance = i.name AND s.table_name = $2 "
			" WHERE i.name = $1",
			3, args, 3, v, n))
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT),
						errmsg("cd2sync instance \"%s\" does not exist", instance)));
	st->schema_version = n[0] ? -1 : (int) DatumGetInt64(v[0]);
	st->table_exists = !n[1] && DatumGetBool(v[1]);
	st->snapshot_due = !n[2] && DatumGetBool(v[2]);
	place =
		run_row("SELECT p.namespace, p.remote_name, format('%I.%I', p.schema_name, p.rel_name), "
				"       (SELECT s.watermark_raw FROM cd2sync.table_state s "
				"         WHERE s.instance = $1 AND s.table_name = $2) "
				"  FROM cd2sync._table_place($3, $2) p",
				3, args);
	st->namespace = place[0];
	st->remote_name = place[1];
	st->target = place[2];
	st->watermark_raw = place[3];
}

void
catalog_log_start(TableRun *tr)
{
	const char *args[4] = { int8_text(tr->run_id), tr->instance, tr->table, tr->watermark_before };

	run_row("INSERT INTO cd2sync.sync_log (run_id, instance, table_name, watermark_before) "
			"VALUES ($1::bigint, $2, $3, $4::timestamptz)",
			4, args);
}

/*
 * Records a table sync that succeeded: its log row and the table's new
 * state, in the transaction that applied its rows.
 */
void
catalog_log_success(TableRun *tr)
{
	double seconds = (double) (GetCurrentTimestamp() - tr->started) / USECS_PER_SEC;
	const char *args[16] = { int8_text(tr->run_id),
							 tr->instance,
							 tr->table,
							 tr->mode,
							 int8_text(tr->upserted),
							 int8_text(tr->deleted),
							 int8_text(tr->unchanged),
							 int8_text(tr->oversized),
							 psprintf("%d", tr->objects),
							 int8_text(tr->bytes),
							 tr->job_id,
							 psprintf("%d", tr->schema_version),
							 tr->watermark,
							 float_text(tr->job_seconds),
							 float_text(tr->load_seconds),
							 float_text(seconds) };

	run_row(
		"UPDATE cd2sync.sync_log SET mode = $4, status = 'ok', rows_upserted = $5::bigint, "
		"       rows_deleted = $6::bigint, rows_unchanged = $7::bigint, "
		"       oversized_kept = $8::bigint, objects = $9::int, bytes_downloaded = $10::bigint, "
		"       job_id = $11, schema_version = $12::int, watermark = $13::timestamptz, "
		"       job_seconds = $14::float8, load_seconds = $15::float8, "
		"       finished_at = clock_timestamp(), seconds = $16::float8, error = NULL "
		" WHERE run_id = $1::bigint AND table_name = $3",
		16, args);
	run_row(
		"INSERT INTO cd2sync.table_state AS s (instance, table_name, watermark, watermark_raw, "
		"       schema_version, synced_at, status, last_error, snapshot_at) "
		"VALUES ($2, $3, $13::timestamptz, $13, $12::int, clock_timestamp(), 'ok', NULL, "
		"        CASE WHEN $4 = 'snapshot' THEN clock_timestamp() END) "
		"ON CONFLICT (instance, table_name) DO UPDATE "
		"   SET watermark = excluded.watermark, watermark_raw = excluded.watermark_raw, "
		"       schema_version = excluded.schema_version, synced_at = excluded.synced_at, "
		"       status = 'ok', last_error = NULL, "
		"       snapshot_at = CASE WHEN $4 = 'snapshot' THEN clock_timestamp() ELSE s.snapshot_at END",
		16, args);
	notify(tr->run_id, tr->instance, tr->table, "ok", tr->mode, tr->watermark, NULL);
}

/* Records a table sync that failed; its data and watermark stay as they were */
void
catalog_log_failure(TableRun *tr, const char *error, const char *sqlstate)
{
	double seconds = (double) (GetCurrentTimestamp() - tr->started) / USECS_PER_SEC;
	const char *args[9] = { int8_text(tr->run_id),
							tr->instance,
							tr->table,
							error,
							sqlstate,
							float_text(seconds),
							tr->job_id,
							int8_text(tr->bytes),
							psprintf("%d", tr->objects) };

	run_row("INSERT INTO cd2sync.sync_log AS l (run_id, instance, table_name, mode, status, error, "
			"       error_code, finished_at, seconds, job_id, bytes_downloaded, objects) "
			"VALUES ($1::bigint, $2, $3, 'failed', 'failed', $4, $5, clock_timestamp(), "
			"        $6::float8, $7, $8::bigint, $9::int) "
			"ON CONFLICT (run_id, table_name) DO UPDATE "
			"   SET mode = 'failed', status = 'failed', error = $4, error_code = $5, "
			"       finished_at = clock_timestamp(), seconds = $6::float8, job_id = $7, "
			"       bytes_downloaded = $8::bigint, objects = $9::int",
			9, args);
	run_row(
		"INSERT INTO cd2sync.table_state (instance, table_name, status, last_error) "
		"SELECT $2, $3, 'failed', $4 WHERE EXISTS (SELECT 1 FROM cd2sync.instances WHERE name = $2) "
		"   AND NOT cd2sync._is_wildcard($3) "
		"ON CONFLICT (instance, table_name) DO UPDATE SET status = 'failed', last_error = $4",
		9, args);
	notify(tr->run_id, tr->instance, tr->table, "failed", "failed", tr->watermark_before, error);
}

/*
 * Calls cd2sync._before_apply at the start of the transaction that applies
 * a table: the watermark it will commit (tr->watermark) is known by then.
 */
void
catalog_before_apply(TableRun *tr)
{
	const char *args[3] = { tr->instance, tr->table, tr->watermark };

	run_row("SELECT cd2sync._before_apply($1, $2, $3::timestamptz)", 3, args);
}

/*
 * Calls cd2sync._after_apply, which owns everything that follows the apply
 * of a table in its transaction (the merge map, duplicates, change feeds).
 */
void
catalog_after_apply(TableRun *tr)
{
	const char *args[4] = { tr->instance, tr->table, tr->mode,
							int8_text(tr->upserted - tr->unchanged + tr->deleted) };

	run_row("SELECT cd2sync._after_apply($1, $2, $3, $4::bigint)", 4, args);
}

/* ---- the sync worker's questions about its target table ---- */

/*
 * Creates or extends the target table for a CD2 schema document (the
 * API's answer as text), records the table's columns and schema version
 * and refreshes its reconciled view. Returns whether a column's type
 * changed in a way that needs a fresh snapshot; *version is the
 * document's schema version.
 */
bool
catalog_ensure_table(const char *instance, const char *target_schema, const char *table,
					 const char *schema_doc, int *version)
{
	const char *args[4] = { target_schema, table, schema_doc, instance };
	Datum v[1];
	bool n[1];

	if (!run_values(
			"WITH t AS (SELECT cd2sync._ensure_table($1, $2, $3::json, true) AS created), "
			"     s AS (SELECT coalesce(($3::json->>'version')::int, 0) AS version, "
			"                  array_agg(c.column_name ORDER BY c.ord) AS columns "
			"             FROM t, cd2sync._schema_columns($1, $2, $3::json) c) "
			"INSERT INTO cd2sync.table_state AS ts (instance, table_name, schema_version, columns) "
			"SELECT $4, $2, s.version, s.columns FROM s "
			"ON CONFLICT (instance, table_name) DO UPDATE "
			"   SET schema_version = excluded.schema_version, columns = excluded.columns "
			"RETURNING ts.schema_version::int8",
			4, args, 1, v, n))
		elog(ERROR, "cd2sync could not record the schema of table %s", table);
	*version = n[0] ? 0 : (int) DatumGetInt64(v[0]);
	/* the reconciled view follows the table's columns */
	run_row("SELECT cd2sync.refresh_view($1)", 1, &args[1]);
	return sql_bool("UPDATE cd2sync.table_state "
					"   SET pending_types = cd2sync._pending_types($1, $2, $3::json) "
					" WHERE instance = $4 AND table_name = $2 "
					"RETURNING pending_types IS NOT NULL",
					4, args);
}

/*
 * The table a new table is being loaded in apart (schema cd2sync_load), or
 * InvalidOid; *name: its quoted, qualified name.
 */
Oid
catalog_loading_rel(const char *target_schema, const char *table, char **name)
{
	const char *args[2] = { target_schema, table };

	*name = sql_text("SELECT cd2sync._loading_rel($1, $2)::text", 2, args);
	if (*name == NULL)
		return InvalidOid;
	return DatumGetObjectId(DirectFunctionCall1(regclassin, CStringGetDatum(*name)));
}

/*
 * Puts a new table loaded apart in its place (its key built, then moved
 * to its schema and name): cd2sync._finish_loading.
 */
void
catalog_finish_loading(const char *target_schema, const char *table, const char *schema_doc)
{
	const char *args[3] = { target_schema, table, schema_doc };

	run_row("SELECT cd2sync._finish_loading($1, $2, $3::json)", 3, args);
}

/*
 * A table about to be loaded new straight by COPY: the change feeds get its
 * rows once their users' replacements are in (cd2sync._feed_load_begin)
 */
void
catalog_feed_load_begin(const char *target)
{
	const char *args[1] = { target };

	run_row("SELECT cd2sync._feed_load_begin($1::regclass)", 1, args);
}

/*
 * Whether the rows this transaction writes to target (a quoted, qualified
 * name) reach change feeds (cd2sync._feed_captures). Takes the lock a write
 * takes first, held until commit, so no feed's capture comes or goes
 * meanwhile (on the table itself: a log's partitions, one a day, are
 * locked as the rows reach them); and reads what the last change to the
 * feeds committed, whatever this transaction's isolation.
 */
bool
catalog_feed_captures(const char *target)
{
	const char *args[1] = { target };
	bool result;

	run_row(psprintf("LOCK TABLE ONLY %s IN ROW EXCLUSIVE MODE", target), 0, NULL);
	PushActiveSnapshot(GetLatestSnapshot());
	SPI_connect();
	execute_as("SELECT cd2sync._feed_captures($1::regclass)", 1, args, true);
	result = SPI_processed == 1 &&
			 strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), "t") == 0;
	SPI_finish();
	PopActiveSnapshot();
	return result;
}

/* Empties a table (one cd2sync loads apart, when its load starts over) */
void
catalog_truncate(const char *target)
{
	run_row(psprintf("TRUNCATE %s", target), 0, NULL);
}

/* Whether column types of the table wait for a snapshot to change */
bool
catalog_types_pending(const char *instance, const char *table)
{
	const char *args[2] = { instance, table };

	return sql_bool("SELECT EXISTS (SELECT 1 FROM cd2sync.table_state "
					" WHERE instance = $1 AND table_name = $2 "
					"   AND pending_types IS NOT NULL)",
					2, args);
}

/* Whether the table (a quoted, qualified name) holds any row */
bool
catalog_has_rows(const char *target)
{
	return sql_bool(psprintf("SELECT EXISTS (SELECT 1 FROM %s)", target), 0, NULL);
}

/*
 * The table's oid if COPY can load the files straight into it (no array
 * column, which CD2 sends as JSON), else InvalidOid.
 */
Oid
catalog_direct_target(const char *target)
{
	const char *args[1] = { target };
	Datum v[1];
	bool n[1];

	if (!run_values("SELECT $1::regclass::oid WHERE NOT EXISTS ("
					"  SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
					"   WHERE a.attrelid = $1::regclass AND a.attnum > 0 "
					"     AND NOT a.attisdropped AND t.typcategory = 'A')",
					1, args, 1, v, n) ||
		n[0])
		return InvalidOid;
	return DatumGetObjectId(v[0]);
}

/*
 * A log's upkeep around a sync (cd2sync._log_upkeep): "before" its load,
 * "after" its commit. Nothing for a table that is not a log.
 */
void
catalog_log_upkeep(const char *instance, const char *table, const char *watermark,
				   const char *phase)
{
	const char *args[4] = { instance, table, watermark, phase };

	run_row("SELECT cd2sync._log_upkeep($1, $2, $3::timestamptz, $4)", 4, args);
}

/* Whether the table is a log (web_logs): partitioned by request time, appended to */
bool
catalog_is_log(const char *target)
{
	const char *args[1] = { target };

	return sql_bool("SELECT cd2sync._log_column($1::regclass) IS NOT NULL", 1, args);
}

/* pg_temp.cd2_stage for the target: of its types (typed), or all text */
void
catalog_create_staging(const char *target, bool typed)
{
	const char *args[2] = { target, typed ? "true" : "false" };

	run_row("SELECT cd2sync._create_staging($1::regclass, $2::boolean)", 2, args);
}

/* Adds a text column to the staging table, for a field the target lacks */
void
catalog_add_staging_column(const char *column)
{
	run_row(psprintf("ALTER TABLE pg_temp.cd2_stage ADD COLUMN %s text", quote_identifier(column)),
			0, NULL);
}

/* Spreads the JSON lines staged for the target over its columns */
void
catalog_expand_jsonl(const char *target)
{
	const char *args[1] = { target };

	run_row("SELECT cd2sync._expand_jsonl($1::regclass)", 1, args);
}

/*
 * Changes the column types a snapshot waited for. Returns the rows the
 * table held if it had to be emptied for that, else -1.
 */
int64
catalog_apply_pending_types(const char *instance, const char *table, const char *target)
{
	const char *args[3] = { target, instance, table };
	Datum v[1];
	bool n[1];

	if (!run_values("SELECT cd2sync._apply_pending_types($2, $3, $1::regclass)", 3, args, 1, v,
					n) ||
		n[0])
		return -1;
	return DatumGetInt64(v[0]);
}

/*
 * Moves the staged rows into the target, set-based (_apply). columns: the
 * columns the files carried (NIL: every recorded column); typed: whether
 * the staging table has the target's types.
 */
void
catalog_apply(const char *instance, const char *table, const char *target, const char *mode,
			  List *columns, bool typed, ApplyCounts *counts)
{
	const char *args[6] = { target,   mode,  catalog_text_array(columns),
							instance, table, typed ? "true" : "false" };
	Datum v[4];
	bool n[4];

	if (!run_values("SELECT a.upserted, a.deleted, a.unchanged, a.oversized "
					"  FROM cd2sync._apply($1::regclass, $2, cd2sync._fill_columns($3::text[], "
					"         (SELECT columns FROM cd2sync.table_state "
					"           WHERE instance = $4 AND table_name = $5)), $6::boolean) a",
					6, args, 4, v, n))
		elog(ERROR, "cd2sync could not apply table %s", target);
	counts->upserted = n[0] ? 0 : DatumGetInt64(v[0]);
	counts->deleted = n[1] ? 0 : DatumGetInt64(v[1]);
	counts->unchanged = n[2] ? 0 : DatumGetInt64(v[2]);
	counts->oversized = n[3] ? 0 : DatumGetInt64(v[3]);
}

/* ---- the run ---- */

/*
 * Takes the instance's sync lock (a session-level advisory lock held for
 * the run): at once when it is free, else, if wait, once the running sync
 * has released it. Returns whether it is held.
 */
bool
catalog_lock_instance(const char *instance, bool wait)
{
	const char *args[1] = { instance };

	return sql_bool(wait ? "SELECT cd2sync._sync_lock($1, 'run')"
						 : "SELECT cd2sync._sync_lock($1, 'try_run')",
					1, args);
}

/*
 * Marks the instance's runs that are still "running" but hold no lock, and
 * whose worker is gone, as failed (a live one waits for the lock), then brings tables and views an earlier
 * version made to this one's layout.
 */
void
catalog_close_stale_runs(const char *instance, int64 run_id)
{
	const char *args[2] = { instance, int8_text(run_id) };

	run_row("WITH stale AS ("
			"  UPDATE cd2sync.runs r SET status = 'failed', finished_at = clock_timestamp(), "
			"         error = 'the sync worker stopped before the run was done' "
			"   WHERE r.instance = $1 AND r.status = 'running' AND r.run_id <> $2::bigint "
			/* (not a run whose worker is alive, waiting for the lock) */
			"     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a "
			"                      WHERE a.pid = r.worker_pid AND a.backend_start <= r.started_at) "
			"  RETURNING r.run_id) "
			"UPDATE cd2sync.sync_log SET status = 'failed', mode = 'failed', "
			"       finished_at = clock_timestamp(), "
			"       error = 'the sync worker stopped before this table was done' "
			" WHERE run_id IN (SELECT run_id FROM stale) AND status = 'running'",
			2, args);
	run_row("SELECT cd2sync._ensure_layout()", 0, NULL);
}

/*
 * The namespaces a run must list to know its tables: asked (NIL: the
 * configured ones; NIL too: every canvas table).
 */
List *
catalog_listings_needed(List *configured, List *asked)
{
	const char *args[2] = { catalog_text_array(configured), catalog_text_array(asked) };

	return sql_list("SELECT unnest(cd2sync._listings_needed($1::text[], $2::text[]))", 2, args);
}

/*
 * The tables a run syncs, given what the API listed (listed_ns[i] lists
 * listed[i]) and the namespaces it could not list (failed_ns[i], with
 * failed_error[i] and SQLSTATE failed_code[i]): a list of TableToSync, an error set for an entry that
 * stands for the tables of a namespace that could not be listed. Raises
 * when a table asked for is not listed.
 */
List *
catalog_tables_to_sync(List *configured, List *asked, List *listed_ns, List *listed,
					   List *failed_ns, List *failed_error, List *failed_code)
{
	const char *args[7] = { catalog_text_array(configured), catalog_text_array(asked),
							catalog_text_array(listed_ns),  catalog_text_array(listed),
							catalog_text_array(failed_ns),  catalog_text_array(failed_error),
							catalog_text_array(failed_code) };
	MemoryContext cxt = CurrentMemoryContext;
	List *result = NIL;

	SPI_connect();
	execute(
		"SELECT table_name, error, error_code "
		"  FROM cd2sync._tables_to_sync($1::text[], $2::text[], "
		"       coalesce($3::text[], '{}'), coalesce($4::text[], '{}'), "
		"       coalesce($5::text[], '{}'), coalesce($6::text[], '{}'), coalesce($7::text[], '{}'))",
		7, args);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(cxt);
		TableToSync *t = palloc(sizeof(TableToSync));
		char *error = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);

		t->table = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		t->error = error ? pstrdup(error) : NULL;
		t->error_code = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3);
		result = lappend(result, t);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
	return result;
}

/*
 * For the scheduler: brings the rows of each instance marked due that no
 * sync holds up to the merge map (cd2sync._resolve_due, lockable only): a
 * refresh that marked one while its sync ended may have committed after
 * that sync looked. Returns how many were due.
 */
int64
catalog_resolve_idle_due(void)
{
	int64 due = 0;

	if (!sql_int64s("SELECT count(cd2sync._resolve_due(d.instance, true)) "
					"  FROM (SELECT instance FROM cd2sync.resolve_due ORDER BY instance) d",
					0, NULL, 1, &due))
		return 0;
	return due;
}

/* Brings the instance's rows up to the merge map where a refresh left them */
void
catalog_resolve_due(const char *instance)
{
	const char *args[1] = { instance };

	run_row("SELECT cd2sync._resolve_due($1)", 1, args);
}

/* ---- the session that starts a sync ---- */

/* Raises unless the instance exists (and the caller may sync it) */
void
catalog_check_instance(const char *instance)
{
	const char *args[1] = { instance };

	run_row("SELECT cd2sync._check_instance($1)", 1, args);
}

/* Whether the instance syncs the table (it syncs all when none is configured) */
bool
catalog_table_configured(const char *instance, const char *table)
{
	const char *args[2] = { instance, table };

	/* _check_instance: a row, or its error if the instance was just dropped */
	return sql_bool("SELECT cd2sync._covers(tables, $2) FROM cd2sync._check_instance($1)", 2, args);
}

/*
 * Raises unless the strings name CD2 tables (cd2sync._check_tables);
 * returns them as stored: once each, "canvas." dropped.
 */
List *
catalog_check_tables(List *tables)
{
	const char *args[1] = { catalog_text_array(tables) };

	return sql_list("SELECT unnest(cd2sync._check_tables($1::text[]))", 1, args);
}

/* The version of the extension's SQL objects, or NULL */
char *
catalog_sql_version(void)
{
	return sql_text("SELECT extversion FROM pg_catalog.pg_extension "
					" WHERE extname = 'cd2sync'",
					0, NULL);
}

int64
catalog_next_run_id(void)
{
	int64 id;

	if (!sql_int64s("SELECT nextval('cd2sync.run_id_seq')", 0, NULL, 1, &id))
		elog(ERROR, "cd2sync could not take a run id");
	return id;
}

/*
 * The result of a run that has ended, one row per table into tupstore:
 * table_name, mode, rows_upserted, rows_deleted, watermark, seconds,
 * error. A run that failed as a whole raises its error with its SQLSTATE.
 * Read with the latest snapshot: the worker committed after this
 * transaction's snapshot was taken.
 */
void
catalog_run_results(int64 run_id, Tuplestorestate *tupstore, TupleDesc desc)
{
	const char *args[1] = { int8_text(run_id) };
	char *run_error;
	char *run_code;

	/* (what the worker committed, whatever this transaction's isolation) */
	PushActiveSnapshot(GetLatestSnapshot());
	SPI_connect();
	execute_as("SELECT error, error_code FROM cd2sync.runs WHERE run_id = $1::bigint", 1, args,
			   true);
	if (SPI_processed == 0)
		ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR),
						errmsg("cd2sync sync worker exited before it recorded its run"),
						errhint("See the server log.")));
	run_error = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	run_code = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	if (run_error)
		ereport(ERROR, (errcode(run_code && strlen(run_code) == 5
									? MAKE_SQLSTATE(run_code[0], run_code[1], run_code[2],
													run_code[3], run_code[4])
									: ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("cd2sync run %lld failed: %s", (long long) run_id, run_error)));

	execute_as(
		"SELECT table_name, "
		"       CASE WHEN status = 'running' THEN 'failed' ELSE mode END, "
		"       rows_upserted, rows_deleted, coalesce(watermark, watermark_before), "
		"       coalesce(seconds, extract(epoch FROM clock_timestamp() - started_at)::float8), "
		"       CASE WHEN status = 'running' "
		"            THEN 'the sync worker exited before this table was done' ELSE error END "
		"  FROM cd2sync.sync_log WHERE run_id = $1::bigint ORDER BY started_at, table_name",
		1, args, true);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		Datum v[7];
		bool n[7];

		for (int c = 0; c < 7; c++)
			v[c] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, c + 1, &n[c]);
		tuplestore_putvalues(tupstore, desc, v, n);
	}
	SPI_finish();
	PopActiveSnapshot();
}

/* ---- transactions of the background workers ---- */

/*
 * Transactions leave CurrentMemoryContext where it was: what a worker reads
 * in a transaction lives as long as the table sync or run that asked for
 * it. now() is each transaction's start.
 */
void
catalog_begin(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cxt);
}

void
catalog_commit(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
}

/*
 * In a PG_CATCH: aborts the transaction (interrupts held meanwhile) and
 * returns the error, copied into cxt, which is current on return. The
 * caller then records the failure in a new transaction and carries on.
 */
ErrorData *
catalog_abort_keeping_error(MemoryContext cxt)
{
	ErrorData *edata;

	HOLD_INTERRUPTS();
	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	RESUME_INTERRUPTS();
	MemoryContextSwitchTo(cxt);
	return edata;
}
