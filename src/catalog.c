/*-------------------------------------------------------------------------
 *
 * catalog.c
 *	  Reads and writes cd2sync's own tables for the sync worker: the
 *	  instance's configuration and secret, the state of each table (its
 *	  watermark), runs and the sync log.
 *
 * Every value goes to SQL as a parameter. Callers own the transactions:
 * the success of a table sync is recorded in the transaction that applies
 * its rows, so watermark and rows commit together.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "catalog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

/*
 * Runs one statement with text parameters (NULL for SQL NULL), inside
 * SPI_connect: the caller reads SPI_tuptable before SPI_finish.
 */
static void
execute(const char *sql, int nargs, const char **args)
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
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);
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
char *
catalog_run_sql(const char *sql, int nargs, const char **args)
{
	char **row = run_row(sql, nargs, args);

	return row ? row[0] : NULL;
}

/* Runs a statement; whether its first row's first (boolean) column is true */
bool
catalog_bool(const char *sql, int nargs, const char **args)
{
	Datum value;
	bool isnull;

	return run_values(sql, nargs, args, 1, &value, &isnull) && !isnull && DatumGetBool(value);
}

/*
 * Runs a statement; n bigint columns of its first row into out (NULL: 0).
 * False when there is no row.
 */
bool
catalog_int64s(const char *sql, int nargs, const char **args, int n, int64 *out)
{
	Datum *values = palloc(sizeof(Datum) * n);
	bool *nulls = palloc(sizeof(bool) * n);

	if (!run_values(sql, nargs, args, n, values, nulls))
		return false;
	for (int i = 0; i < n; i++)
		out[i] = nulls[i] ? 0 : DatumGetInt64(values[i]);
	return true;
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
char *
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
	char **row = run_row(
		"SELECT s.watermark_raw, s.schema_version, "
		"       cd2sync._instance_rel($3, $2) IS NOT NULL, "
		"       s.pending_types IS NOT NULL OR "
		"       coalesce(s.snapshot_at + i.full_resync_every <= now(), i.full_resync_every IS NOT NULL) "
		"  FROM cd2sync.instances i "
		"  LEFT JOIN cd2sync.table_state s ON s.instance = i.name AND s.table_name = $2 "
		" WHERE i.name = $1",
		3, args);

	if (row == NULL)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT),
						errmsg("cd2sync instance \"%s\" does not exist", instance)));
	st->watermark_raw = row[0];
	st->schema_version = row[1] ? atoi(row[1]) : -1;
	st->snapshot_due = (row[3] != NULL && strcmp(row[3], "t") == 0);
	st->table_exists = (strcmp(row[2], "t") == 0);
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
