/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The sync worker: one dynamic background worker per run, syncing the
 *	  tables of one instance as a pipeline.
 *
 * The run starts its tables' query jobs as fast as cd2sync.job_rate allows,
 * polls them, and loads whichever has finished, one table at a time, while
 * the others run upstream. A table sync goes through these steps
 * (src/README.md draws them):
 *
 *	 begin      read the table's state; start a snapshot or incremental job
 *	            (an incremental the API refuses, SnapshotRequired or
 *	            OutOfRange, becomes a snapshot)
 *	 poll       ask how the job does, less and less often
 *	 finish     when the job's schema version is new: fetch the schema and
 *	            create or alter the table (own transaction: new enum values
 *	            must be committed before use); then, in one transaction,
 *	            COPY every object (into a staging table, or straight into a
 *	            new table), apply it set-based, record watermark and log row
 *
 * An error in any step aborts that step's transaction, so the table's rows
 * and watermark stay as they were; the failure is recorded in a new
 * transaction and the run goes on with the other tables. A run holds an
 * advisory lock on its instance for its whole length, so two runs of one
 * instance never interleave: the second waits.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

/* always needed for a bgworker */
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/resowner.h"

/* used by this worker */
#include "access/xact.h"
#include "catalog.h"
#include "dap_client.h"
#include "decode.h"
#include "download.h"
#include "http.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "worker.h"

/* Most incrementals chained to bring an old (deduplicated) snapshot forward */
#define CATCHUP_MAX_JOBS 48

typedef struct RunContext
{
	int64 run_id;
	bool full;
	InstanceConfig *instance;
	DapClient *client;
	RecordFormat format;
	MemoryContext cxt;

	/* progress of the current table sync, published in pg_stat_activity */
	List *job_starts; /* TimestampTz * of the jobs started in the last minute */

	TableRun *current;
	char phase[160];
	int objects_total;
	int64 decoded_bytes;
	uint64 records;
} RunContext;

static RunContext *progress_run = NULL; /* for the decoder's progress hook */

/*
 * Transactions leave CurrentMemoryContext where it was: what the worker reads
 * in a transaction lives as long as the table sync or run that asked for it.
 */
static void
begin_tx(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp(); /* now() is this transaction's start */
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cxt);
}

static void
commit_tx(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
}

static void report(RunContext *rc, const char *table, const char *fmt, ...)
	pg_attribute_printf(3, 4);

/*
 * Publishes what the worker does in pg_stat_activity (never a secret):
 * "cd2sync <instance>.<table>: <phase> [objects=1/4 downloaded=... decoded=...
 * records=...]". cd2sync.progress reads it back.
 */
static void
publish(RunContext *rc, const char *table)
{
	char *line;

	if (rc->current && table)
		line = psprintf("cd2sync %s.%s: %s [objects=%d/%d downloaded=" INT64_FORMAT
						" decoded=" INT64_FORMAT " records=" UINT64_FORMAT "]",
						rc->instance->name, table, rc->phase, rc->current->objects,
						rc->objects_total, rc->current->bytes, rc->decoded_bytes, rc->records);
	else
		line = psprintf("cd2sync %s%s%s: %s", rc->instance->name, table ? "." : "",
						table ? table : "", rc->phase);
	pgstat_report_activity(STATE_RUNNING, line);
	pfree(line);
}

static void
report(RunContext *rc, const char *table, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(rc->phase, sizeof(rc->phase), fmt, ap);
	va_end(ap);
	publish(rc, table);
}

/* Called by the decoder every few megabytes of a file */
static void
decode_progress(int64 bytes)
{
	RunContext *rc = progress_run;

	if (rc && rc->current)
	{
		rc->decoded_bytes += bytes;
		publish(rc, rc->current->table);
	}
}

static double
seconds_since(TimestampTz t)
{
	return (double) (GetCurrentTimestamp() - t) / USECS_PER_SEC;
}

/* A fresh URL for an object whose presigned URL stopped working */
static char *
refresh_url(void *arg, const char *object_id)
{
	RunContext *rc = (RunContext *) arg;
	DapError err;
	List *urls = dap_object_urls(rc->client, list_make1(pstrdup(object_id)), &err);

	if (urls == NIL)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("the query job expired while its objects were downloaded: %s",
							   err.message)));
	return (char *) linitial(urls);
}

/*
 * How long until another job may start under cd2sync.job_rate (jobs per
 * minute, counted over the last minute); 0: now.
 */
static long
job_budget_wait_ms(RunContext *rc)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz window = now - 60 * USECS_PER_SEC;

	while (rc->job_starts != NIL && *(TimestampTz *) linitial(rc->job_starts) <= window)
	{
		pfree(linitial(rc->job_starts));
		rc->job_starts = list_delete_first(rc->job_starts);
	}
	if (cd2_job_rate == 0 || list_length(rc->job_starts) < cd2_job_rate)
		return 0;
	return (long) ((*(TimestampTz *) linitial(rc->job_starts) - window) / 1000) + 1;
}

/* Starts one query job within the rate limit (waiting for it if need be) */
static DapJob *
start_query(RunContext *rc, TableRun *tr, const char *fmt, const char *since, DapError *err)
{
	long wait;
	MemoryContext old;

	while ((wait = job_budget_wait_ms(rc)) > 0)
	{
		report(rc, tr->table, "waiting %ld ms to stay under cd2sync.job_rate", wait);
		cd2_sleep_ms((int) wait);
	}
	old = MemoryContextSwitchTo(rc->cxt);
	rc->job_starts = lappend(rc->job_starts, palloc(sizeof(TimestampTz)));
	*(TimestampTz *) llast(rc->job_starts) = GetCurrentTimestamp();
	MemoryContextSwitchTo(old);
	return dap_start_query(rc->client, tr->table, fmt, since, err);
}

/*
 * Starts the table's query job: an incremental from since, unless
 * *snapshot. An incremental the API refuses as too old becomes a snapshot
 * (*snapshot is set); a format the API refuses becomes jsonl. The job may
 * still be running.
 */
static DapJob *
start_job(RunContext *rc, TableRun *tr, bool *snapshot, const char *since)
{
	DapError err;
	DapJob *job;
	const char *fmt = decode_format_name(rc->format);

	report(rc, tr->table, "starting a %s query job", *snapshot ? "snapshot" : "incremental");
	job = start_query(rc, tr, fmt, *snapshot ? NULL : since, &err);
	if (job == NULL && rc->format != FORMAT_JSONL &&
		(err.type ? strcmp(err.type, "ValidationError") == 0 : err.status == 400))
	{
		/*
		 * The query was refused as invalid: perhaps the format. JSON lines is
		 * the format every DAP server documents: ask for it once, and keep it
		 * for the run if it is accepted.
		 */
		ereport(LOG, (errmsg("cd2sync %s.%s: query in format %s refused (%s), asking for jsonl",
							 rc->instance->name, tr->table, fmt, err.message)));
		job = start_query(rc, tr, "jsonl", *snapshot ? NULL : since, &err);
		if (job != NULL)
		{
			rc->format = FORMAT_JSONL;
			fmt = decode_format_name(rc->format);
		}
	}
	if (job == NULL && !*snapshot && err.type &&
		(strcmp(err.type, "SnapshotRequired") == 0 || strcmp(err.type, "OutOfRange") == 0))
	{
		ereport(LOG, (errmsg("cd2sync %s.%s: incremental refused (%s), taking a snapshot",
							 rc->instance->name, tr->table, err.type)));
		*snapshot = true;
		job = start_query(rc, tr, fmt, NULL, &err);
	}
	if (job == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION), errmsg_internal("%s", err.message)));
	return job;
}

/* Raises unless a finished job can be loaded */
static void
check_finished_job(DapJob *job, bool snapshot)
{
	if (strcmp(job->status, "failed") == 0)
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("CD2 query job %s failed: %s", job->id, job->error)));
	if ((snapshot ? job->at : job->until) == NULL)
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("CD2 query job %s completed without \"%s\"", job->id,
							   snapshot ? "at" : "until")));
}

/* Starts a job and waits for it to finish */
static DapJob *
run_job(RunContext *rc, TableRun *tr, bool *snapshot, const char *since)
{
	DapError err;
	DapJob *job = start_job(rc, tr, snapshot, since);

	report(rc, tr->table, "waiting for query job %s", job->id);
	job = dap_wait_job(rc->client, job, &err);
	if (job == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION), errmsg_internal("%s", err.message)));
	check_finished_job(job, *snapshot);
	return job;
}

/*
 * Creates or extends the target table for the schema the job used. Returns
 * whether a column's type changed in a way that needs a fresh snapshot.
 */
static bool
ensure_schema(RunContext *rc, TableRun *tr, DapJob *job)
{
	char *doc;
	const char *args[4];
	char *version;
	bool pending;

	report(rc, tr->table, "fetching schema");
	doc = dap_get_schema(rc->client, tr->table);

	report(rc, tr->table, "creating or altering the table");
	begin_tx();
	args[0] = rc->instance->target_schema;
	args[1] = tr->table;
	args[2] = doc;
	args[3] = rc->instance->name;
	version = catalog_run_sql(
		"WITH t AS (SELECT cd2sync._ensure_table($1, $2, $3::json) AS created), "
		"     s AS (SELECT coalesce(($3::json->>'version')::int, 0) AS version, "
		"                  array_agg(c.column_name ORDER BY c.ord) AS columns "
		"             FROM t, cd2sync._schema_columns($1, $2, $3::json) c) "
		"INSERT INTO cd2sync.table_state AS ts (instance, table_name, schema_version, columns) "
		"SELECT $4, $2, s.version, s.columns FROM s "
		"ON CONFLICT (instance, table_name) DO UPDATE "
		"   SET schema_version = excluded.schema_version, columns = excluded.columns "
		"RETURNING ts.schema_version",
		4, args);
	pending = catalog_bool("UPDATE cd2sync.table_state "
						   "   SET pending_types = cd2sync._pending_types($1, $2, $3::json) "
						   " WHERE instance = $4 AND table_name = $2 "
						   "RETURNING pending_types IS NOT NULL",
						   4, args);
	/* the reconciled view follows the table's columns */
	catalog_run_sql("SELECT cd2sync.refresh_view($1)", 1, &args[1]);
	commit_tx();
	if (job->schema_version <= 0 && version)
		job->schema_version = atoi(version);
	return pending;
}

/*
 * decode_object, closing the download if it fails: its connection and
 * inflater thread go at once, not with the table's memory.
 */
static uint64
decode_closing(Download *d, RecordFormat format, Oid direct, List **columns, bool *jsonl)
{
	volatile uint64 records = 0;

	PG_TRY();
	{
		records = decode_object(d, format, direct, columns, jsonl);
	}
	PG_CATCH();
	{
		download_close(d);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return records;
}

/*
 * Downloads and decodes every object of a job: straight into the target
 * table (direct, a valid relid) or into the staging table. Returns the
 * records decoded; adds the columns the files carry to *columns and tells
 * whether any file was JSON lines.
 */
static uint64
load_objects(RunContext *rc, TableRun *tr, DapJob *job, List *urls, Oid direct, List **columns,
			 bool *any_jsonl)
{
	ListCell *lo, *lu;
	uint64 records = 0;

	rc->objects_total = list_length(job->objects);
	forboth(lo, job->objects, lu, urls)
	{
		Download *d;
		bool jsonl;

		rc->records = records;
		report(rc, tr->table, "%s object %d of %d",
			   OidIsValid(direct) ? "loading straight into the table" : "downloading",
			   foreach_current_index(lo) + 1, list_length(job->objects));
		d = download_open((char *) lfirst(lo), (char *) lfirst(lu), refresh_url, rc);
		records += decode_closing(d, rc->format, direct, columns, &jsonl);
		tr->bytes += download_compressed_bytes(d);
		tr->objects++;
		*any_jsonl |= jsonl;
		download_close(d);
	}
	rc->records = records;
	return records;
}

/* What one way of loading a job's objects needs */
typedef struct LoadWay
{
	const char *target;
	Oid direct;     /* load straight into this table, or InvalidOid: staging */
	bool typed;     /* staging with the target's types */
	List *columns;  /* out: the columns the files carry */
	bool any_jsonl; /* out */
	uint64 records; /* out */
} LoadWay;

/*
 * Loads a job's objects one way, in a subtransaction. When the data does not
 * suit that way (a value that does not parse as its column's type, such as
 * an oversized placeholder in a number column; a duplicate key; a format the
 * way does not take), rolls it back and returns false, and the caller loads
 * another way. Other errors (the network, a cancel, a record with the wrong
 * number of fields or bytes that are not text) go on up.
 */
static bool
try_load(RunContext *rc, TableRun *tr, DapJob *job, List *urls, LoadWay *way)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	int64 bytes = tr->bytes;
	int objects = tr->objects;
	volatile bool done = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		if (!OidIsValid(way->direct))
		{
			const char *args[2] = { way->target, way->typed ? "true" : "false" };

			catalog_run_sql("SELECT cd2sync._create_staging($1::regclass, $2::boolean)", 2, args);
		}
		way->records = load_objects(rc, tr, job, urls, way->direct, &way->columns, &way->any_jsonl);
		if (way->any_jsonl)
			catalog_run_sql("SELECT cd2sync._expand_jsonl($1::regclass)", 1, &way->target);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		done = true;
	}
	PG_CATCH();
	{
		ErrorData *edata;
		int category;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		category = ERRCODE_TO_CATEGORY(edata->sqlerrcode);
		if ((category != ERRCODE_DATA_EXCEPTION &&
			 category != ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION &&
			 category != ERRCODE_FEATURE_NOT_SUPPORTED) ||
			/* what no staging table takes either: the wrong number of fields, bad text */
			edata->sqlerrcode == ERRCODE_BAD_COPY_FILE_FORMAT ||
			edata->sqlerrcode == ERRCODE_CHARACTER_NOT_IN_REPERTOIRE ||
			edata->sqlerrcode == ERRCODE_UNTRANSLATABLE_CHARACTER)
			ReThrowError(edata);
		ereport(LOG, (errmsg("cd2sync %s.%s: loading through the %s staging table: %s",
							 rc->instance->name, tr->table,
							 OidIsValid(way->direct) ? "typed" : "text", edata->message)));
		FreeErrorData(edata);
		tr->bytes = bytes;
		tr->objects = objects;
		way->columns = NIL;
		way->any_jsonl = false;
	}
	PG_END_TRY();
	return done;
}

/*
 * Downloads, decodes and applies every object of a job, in the current
 * transaction; adds its counts to tr.
 *
 * A snapshot into an empty table, in TSV, with no column that needs a
 * conversion COPY cannot do (JSON arrays), is COPYed straight into the
 * table, the meta.* fields dropped on the way, as PostgreSQL's own COPY FROM
 * would. Otherwise the objects are COPYed into a staging table with the
 * target's types, and _apply moves them set-based. Each way falls back to
 * the next when the data does not suit it; the last, a staging table of
 * text columns, takes anything (and _apply says what does not fit).
 */
static void
apply_job(RunContext *rc, TableRun *tr, DapJob *job, List *urls, bool snapshot)
{
	const char *args[6];
	int64 counts[4]; /* upserted, deleted, unchanged, oversized */
	char *target = quote_qualified_identifier(rc->instance->target_schema, tr->table);
	const char *mode;
	LoadWay way = { 0 };
	bool retype = false;

	way.target = target;
	args[0] = target;
	args[1] = rc->instance->name;
	args[2] = tr->table;
	if (snapshot)
		retype = catalog_bool("SELECT EXISTS (SELECT 1 FROM cd2sync.table_state "
							  " WHERE instance = $2 AND table_name = $3 "
							  "   AND pending_types IS NOT NULL)",
							  3, args);
	if (!snapshot)
		mode = "incremental";
	else if (retype || catalog_bool(psprintf("SELECT EXISTS (SELECT 1 FROM %s)", target), 0, NULL))
		mode = "snapshot";
	else
	{
		mode = "snapshot_new";
		if (cd2_direct_load && rc->format == FORMAT_TSV &&
			catalog_bool("SELECT NOT EXISTS (SELECT 1 FROM pg_attribute a "
						 "  JOIN pg_type t ON t.oid = a.atttypid "
						 " WHERE a.attrelid = $1::regclass AND a.attnum > 0 "
						 "   AND NOT a.attisdropped AND t.typcategory = 'A')",
						 1, args))
		{
			way.direct = atooid(catalog_run_sql("SELECT $1::regclass::oid", 1, args));
			if (try_load(rc, tr, job, urls, &way))
			{
				tr->upserted += way.records;
				return;
			}
			way.direct = InvalidOid;
		}
	}

	/* columns about to change type take their values as text */
	way.typed = !retype;
	if (retype || !try_load(rc, tr, job, urls, &way))
	{
		way.typed = false;
		catalog_run_sql("SELECT cd2sync._create_staging($1::regclass, false)", 1, args);
		way.records = load_objects(rc, tr, job, urls, InvalidOid, &way.columns, &way.any_jsonl);
		if (way.any_jsonl)
			catalog_run_sql("SELECT cd2sync._expand_jsonl($1::regclass)", 1, args);
	}

	if (retype)
	{
		/*
		 * Everything is downloaded: only now delete the rows and change the
		 * types, so that readers wait for the apply alone.
		 */
		char *emptied;

		report(rc, tr->table, "changing column types");
		emptied =
			catalog_run_sql("SELECT cd2sync._apply_pending_types($2, $3, $1::regclass)", 3, args);
		if (emptied != NULL)
		{
			tr->deleted += strtoi64(emptied, NULL, 10);
			mode = "snapshot_new";
		}
		else if (!catalog_bool(psprintf("SELECT EXISTS (SELECT 1 FROM %s)", target), 0, NULL))
			mode = "snapshot_new";
	}

	report(rc, tr->table, "applying (%s)", mode);
	args[1] = mode;
	args[2] = way.any_jsonl ? NULL : catalog_text_array(way.columns);
	args[3] = rc->instance->name;
	args[4] = tr->table;
	args[5] = way.typed ? "true" : "false";
	if (!catalog_int64s("SELECT a.upserted, a.deleted, a.unchanged, a.oversized "
						"  FROM cd2sync._apply($1::regclass, $2, cd2sync._fill_columns($3::text[], "
						"         (SELECT columns FROM cd2sync.table_state "
						"           WHERE instance = $4 AND table_name = $5)), $6::boolean) a",
						6, args, 4, counts))
		elog(ERROR, "cd2sync could not apply table %s", target);
	tr->upserted += counts[0];
	tr->deleted += counts[1];
	tr->unchanged += counts[2];
	tr->oversized += counts[3];
}

/* Whether ISO timestamp a is before b */
static bool
timestamp_before(const char *a, const char *b)
{
	Datum ta = DirectFunctionCall3(timestamptz_in, CStringGetDatum(a), ObjectIdGetDatum(InvalidOid),
								   Int32GetDatum(-1));
	Datum tb = DirectFunctionCall3(timestamptz_in, CStringGetDatum(b), ObjectIdGetDatum(InvalidOid),
								   Int32GetDatum(-1));

	return DatumGetTimestampTz(ta) < DatumGetTimestampTz(tb);
}

/*
 * The presigned URLs of a job's objects. A job that is gone (expired) is
 * started again, once.
 */
static List *
job_urls(RunContext *rc, TableRun *tr, DapJob **job, bool *snapshot, const char *since)
{
	DapError err;
	List *urls;

	if ((*job)->objects == NIL)
		return NIL; /* nothing to ask for (a result may have no objects at all) */
	urls = dap_object_urls(rc->client, (*job)->objects, &err);
	if (urls == NIL)
	{
		ereport(LOG, (errmsg("cd2sync %s.%s: %s; starting a new query job", rc->instance->name,
							 tr->table, err.message)));
		*job = run_job(rc, tr, snapshot, since);
		urls = (*job)->objects ? dap_object_urls(rc->client, (*job)->objects, NULL) : NIL;
	}
	return urls;
}

/* One table sync as it moves through the run's pipeline */
typedef struct TableSync
{
	TableRun *tr;
	MemoryContext cxt; /* everything of this table sync */
	TableState st;
	bool snapshot;
	DapJob *job;
	TimestampTz started_job;
	TimestampTz next_poll;
	int poll_delay;
} TableSync;

/* First step: read the table's state, record the start, start its job */
static void
table_begin(RunContext *rc, TableSync *ts)
{
	TableRun *tr = ts->tr;

	begin_tx();
	catalog_table_state(rc->instance->name, rc->instance->target_schema, tr->table, &ts->st);
	tr->watermark_before = ts->st.watermark_raw;
	catalog_log_start(tr);
	commit_tx();

	ts->snapshot =
		(ts->st.watermark_raw == NULL || rc->full || !ts->st.table_exists || ts->st.snapshot_due);
	ts->started_job = GetCurrentTimestamp();
	ts->job = start_job(rc, tr, &ts->snapshot, ts->st.watermark_raw);
	tr->job_id = ts->job->id;
	ts->poll_delay = Min(100, cd2_poll_interval);
	ts->next_poll = GetCurrentTimestamp() + (TimestampTz) ts->poll_delay * 1000;
	report(rc, tr->table, "waiting for query job %s", ts->job->id);
}

/* Middle step: ask once how the job is doing */
static void
table_poll(RunContext *rc, TableSync *ts)
{
	DapError err;

	if (GetCurrentTimestamp() - ts->started_job > (TimestampTz) cd2_job_timeout * USECS_PER_SEC)
		ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
						errmsg("CD2 query job %s did not finish within cd2sync.job_timeout (%d s)",
							   ts->job->id, cd2_job_timeout)));
	ts->job = dap_poll_job(rc->client, ts->job, &err);
	if (ts->job == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION), errmsg_internal("%s", err.message)));
	ts->poll_delay = Min(ts->poll_delay * 2, cd2_poll_interval);
	ts->next_poll = GetCurrentTimestamp() + (TimestampTz) ts->poll_delay * 1000;
}

/* Last step, once the job has finished: schema, download, apply, record */
static void
table_finish(RunContext *rc, TableSync *ts)
{
	TableRun *tr = ts->tr;
	TableState *st = &ts->st;
	bool snapshot = ts->snapshot;
	DapJob *job = ts->job;
	List *catchups = NIL; /* (job, urls) pairs applied after job */
	List *urls;
	ListCell *lc;
	TimestampTz t0 = GetCurrentTimestamp();

	check_finished_job(job, snapshot);
	tr->job_seconds = (double) (t0 - ts->started_job) / USECS_PER_SEC;

	if ((!st->table_exists || job->schema_version <= 0 ||
		 job->schema_version != st->schema_version) &&
		ensure_schema(rc, tr, job) && !snapshot)
	{
		/* a type that cannot change in place: the table is reloaded */
		ereport(LOG, (errmsg("cd2sync %s.%s: a column type changed upstream, taking a snapshot",
							 rc->instance->name, tr->table)));
		snapshot = true;
		job = run_job(rc, tr, &snapshot, NULL);
		tr->job_id = job->id;
	}
	urls = job_urls(rc, tr, &job, &snapshot, st->watermark_raw);
	tr->job_id = job->id;

	/*
	 * Identical queries are deduplicated upstream for a day: a full resync
	 * can get a snapshot older than the data already held, and incrementals
	 * from its "at" can get old jobs too. Chain incrementals from the
	 * snapshot's "at" until they reach the stored watermark, and apply them
	 * all in the same transaction, so that the table never goes back in
	 * time.
	 */
	if (snapshot && st->watermark_raw && timestamp_before(job->at, st->watermark_raw))
	{
		const char *since = job->at;

		for (int steps = 0; steps < CATCHUP_MAX_JOBS; steps++)
		{
			bool catchup_snapshot = false;
			DapJob *next = run_job(rc, tr, &catchup_snapshot, since);
			List *next_urls = job_urls(rc, tr, &next, &catchup_snapshot, since);

			if (catchup_snapshot)
			{
				/* refused as too old: this newer snapshot replaces it all */
				job = next;
				urls = next_urls;
				catchups = NIL;
				since = job->at;
				if (!timestamp_before(since, st->watermark_raw))
					break;
				continue;
			}
			if (!timestamp_before(since, next->until))
				break; /* no progress: what upstream has is all there is */
			catchups = lappend(catchups, list_make2(next, next_urls));
			if (!timestamp_before(since, st->watermark_raw))
				break; /* a window from what we held: it is current */
			since = next->until;
		}
		tr->job_seconds = seconds_since(ts->started_job);
	}

	if (catchups != NIL)
		tr->watermark = ((DapJob *) linitial((List *) llast(catchups)))->until;
	else
		tr->watermark = snapshot ? job->at : job->until;

	t0 = GetCurrentTimestamp();
	begin_tx();
	catalog_before_apply(tr);
	apply_job(rc, tr, job, urls, snapshot);
	foreach (lc, catchups)
	{
		List *pair = (List *) lfirst(lc);

		apply_job(rc, tr, (DapJob *) linitial(pair), (List *) lsecond(pair), false);
	}
	if (snapshot)
		tr->mode = "snapshot";
	else
		tr->mode = (tr->upserted == 0 && tr->deleted == 0) ? "unchanged" : "incremental";
	tr->schema_version = job->schema_version;
	/* what follows an apply (merge map, change feeds) is SQL's: one hook */
	report(rc, tr->table, "after apply");
	catalog_after_apply(tr);
	tr->load_seconds = seconds_since(t0);
	catalog_log_success(tr);
	commit_tx();
}

typedef void (*TableStep)(RunContext *rc, TableSync *ts);

/*
 * Runs one step of a table sync. A failure aborts the step's transaction
 * (the table keeps its rows and watermark), is recorded in a new one, and
 * ends that table sync: returns false. The run goes on with other tables.
 */
static bool
table_step(RunContext *rc, TableSync *ts, TableStep step)
{
	volatile bool ok = true;

	MemoryContextSwitchTo(ts->cxt);
	rc->current = ts->tr;
	PG_TRY();
	{
		step(rc, ts);
	}
	PG_CATCH();
	{
		ErrorData *edata = cd2_abort_keeping_error(rc->cxt);

		ereport(LOG, (errmsg("cd2sync %s.%s failed: %s", rc->instance->name, ts->tr->table,
							 edata->message)));
		MemoryContextSwitchTo(ts->cxt);
		begin_tx();
		catalog_log_failure(ts->tr, edata->message, unpack_sql_state(edata->sqlerrcode));
		commit_tx();
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	rc->current = NULL;
	MemoryContextSwitchTo(rc->cxt);
	return ok;
}

static TableSync *
table_sync_new(RunContext *rc, const char *table)
{
	MemoryContext cxt = AllocSetContextCreate(rc->cxt, "cd2sync table", ALLOCSET_DEFAULT_SIZES);
	TableSync *ts = MemoryContextAllocZero(cxt, sizeof(TableSync));

	ts->cxt = cxt;
	ts->tr = MemoryContextAllocZero(cxt, sizeof(TableRun));
	ts->tr->run_id = rc->run_id;
	ts->tr->instance = rc->instance->name;
	ts->tr->table = table;
	ts->tr->started = GetCurrentTimestamp();
	return ts;
}

/* Says which jobs the pipeline waits for */
static void
report_waiting(RunContext *rc, List *active, List *pending)
{
	StringInfoData names;
	ListCell *lc;

	if (list_length(active) == 1)
	{
		TableSync *ts = (TableSync *) linitial(active);

		rc->current = ts->tr;
		report(rc, ts->tr->table, "waiting for query job %s", ts->job->id);
		rc->current = NULL;
		return;
	}
	initStringInfo(&names);
	foreach (lc, active)
		appendStringInfo(&names, "%s%s", foreach_current_index(lc) ? ", " : "",
						 ((TableSync *) lfirst(lc))->tr->table);
	report(rc, NULL, "waiting for %d query jobs (%s), %d tables to start", list_length(active),
		   names.data, list_length(pending));
	pfree(names.data);
}

/*
 * Syncs the tables as a pipeline: jobs are started as cd2sync.job_rate and
 * cd2sync.max_jobs_in_flight allow, and run upstream while the worker polls
 * them and loads whichever has finished, one table at a time.
 */
static void
run_pipeline(RunContext *rc, List *tables)
{
	List *pending = list_copy(tables);
	List *active = NIL;

	while (pending != NIL || active != NIL)
	{
		long wait_ms = cd2_poll_interval;
		bool progressed = false;
		ListCell *lc;

		CHECK_FOR_INTERRUPTS();

		/* start jobs while the limits allow */
		while (pending != NIL && list_length(active) < cd2_max_jobs_in_flight)
		{
			long budget = job_budget_wait_ms(rc);
			TableSync *ts;

			if (budget > 0)
			{
				wait_ms = Min(wait_ms, budget);
				break;
			}
			ts = table_sync_new(rc, (const char *) linitial(pending));
			pending = list_delete_first(pending);
			if (table_step(rc, ts, table_begin))
				active = lappend(active, ts);
			else
				MemoryContextDelete(ts->cxt);
			progressed = true;
		}

		/* load the first finished job; poll the others when it is time */
		foreach (lc, active)
		{
			TableSync *ts = (TableSync *) lfirst(lc);
			TimestampTz now = GetCurrentTimestamp();
			bool ended = false;

			if (dap_job_done(ts->job))
			{
				rc->objects_total = 0;
				rc->decoded_bytes = 0;
				rc->records = 0;
				(void) table_step(rc, ts, table_finish);
				ended = true;
			}
			else if (now >= ts->next_poll)
			{
				ended = !table_step(rc, ts, table_poll);
				progressed = true;
			}
			if (ended)
			{
				active = foreach_delete_current(active, lc);
				MemoryContextDelete(ts->cxt);
				progressed = true;
				break; /* start more jobs before loading the next one */
			}
			if (dap_job_done(ts->job))
				wait_ms = 0;
			else
				wait_ms = Min(wait_ms, (long) ((ts->next_poll - GetCurrentTimestamp()) / 1000));
		}
		if (!progressed && wait_ms > 0)
		{
			report_waiting(rc, active, pending);
			cd2_sleep_ms((int) Max(wait_ms, 10));
		}
	}
}

/* Waits for, then takes, the instance's sync lock for the rest of the run */
static void
lock_instance(RunContext *rc)
{
	const char *args[1] = { rc->instance->name };
	bool got;

	begin_tx();
	got = catalog_bool("SELECT pg_try_advisory_lock(52517, hashtext($1))", 1, args);
	commit_tx();
	if (got)
		return;
	report(rc, NULL, "waiting for the running sync of this instance to finish");
	begin_tx();
	catalog_run_sql("SELECT pg_advisory_lock(52517, hashtext($1))", 1, args);
	commit_tx();
}

/*
 * In a PG_CATCH: aborts the transaction (interrupts held meanwhile) and
 * returns the error, copied into cxt, which is current on return. The
 * caller then records the failure in a new transaction and carries on.
 */
ErrorData *
cd2_abort_keeping_error(MemoryContext cxt)
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

/*
 * Brings the instance's rows up to the merge map when a refresh in another
 * instance's sync had to leave them (this run held the instance's lock). A
 * failure is logged: the next run, or the next refresh, does it again.
 */
static void
resolve_due(RunContext *rc)
{
	const char *args[1] = { rc->instance->name };
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		begin_tx();
		catalog_run_sql("SELECT cd2sync._resolve_due($1)", 1, args);
		commit_tx();
	}
	PG_CATCH();
	{
		ErrorData *edata = cd2_abort_keeping_error(cxt);
		ereport(LOG, (errmsg("cd2sync %s: could not bring its rows up to the merge map: %s",
							 rc->instance->name, edata->message)));
	}
	PG_END_TRY();
}

/*
 * Runs of this instance still marked running hold no lock, so their worker
 * is gone (cancelled, killed, or the server restarted): say so in the log.
 */
static void
close_stale_runs(RunContext *rc)
{
	const char *args[2] = { rc->instance->name, psprintf(INT64_FORMAT, rc->run_id) };

	begin_tx();
	catalog_run_sql("WITH stale AS ("
					"  UPDATE cd2sync.runs SET status = 'failed', finished_at = clock_timestamp(), "
					"         error = 'the sync worker stopped before the run was done' "
					"   WHERE instance = $1 AND status = 'running' AND run_id <> $2::bigint "
					"  RETURNING run_id) "
					"UPDATE cd2sync.sync_log SET status = 'failed', mode = 'failed', "
					"       finished_at = clock_timestamp(), "
					"       error = 'the sync worker stopped before this table was done' "
					" WHERE run_id IN (SELECT run_id FROM stale) AND status = 'running'",
					2, args);
	/* tables and views an earlier version made take this one's layout */
	catalog_run_sql("SELECT cd2sync._ensure_layout()", 0, NULL);
	commit_tx();
	resolve_due(rc);
}

/* The tables this run syncs: asked for, else configured, else all listed */
static List *
tables_to_sync(RunContext *rc, List *asked)
{
	List *listed;
	ListCell *lc;
	StringInfoData missing;

	/* configured tables were checked against the API then; asked ones against them */
	if (rc->instance->tables != NIL)
		return asked != NIL ? asked : rc->instance->tables;
	report(rc, NULL, "listing tables");
	listed = dap_list_tables(rc->client);
	if (asked == NIL)
		return listed;

	/* tables asked of an instance that syncs every table: the API must list them */
	initStringInfo(&missing);
	foreach (lc, asked)
	{
		ListCell *lc2;
		bool found = false;

		foreach (lc2, listed)
			found |= strcmp((char *) lfirst(lc), (char *) lfirst(lc2)) == 0;
		if (!found)
			appendStringInfo(&missing, "%s%s", missing.len ? ", " : "", (char *) lfirst(lc));
	}
	if (missing.len > 0)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
						errmsg("the CD2 API does not list table(s) %s", missing.data)));
	return asked;
}

static void
run_sync(int64 run_id, const char *instance, List *asked, bool full, const char *trigger)
{
	RunContext rc = { 0 };
	List *tables;

	rc.cxt = AllocSetContextCreate(TopMemoryContext, "cd2sync run", ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(rc.cxt);
	rc.run_id = run_id;
	rc.full = full;
	rc.format = decode_parse_format(cd2_format);
	progress_run = &rc;
	decode_progress_hook = decode_progress;

	begin_tx();
	catalog_run_start(run_id, instance, asked, full, trigger);
	rc.instance = catalog_load_instance(instance);
	commit_tx();

	PG_TRY();
	{
		rc.client = dap_client_create(rc.instance->api_url, rc.instance->client_id,
									  rc.instance->client_secret);
		lock_instance(&rc);
		close_stale_runs(&rc);
		tables = tables_to_sync(&rc, asked);
		/* the configuration may have changed while we waited */
		begin_tx();
		rc.instance = catalog_load_instance(instance);
		commit_tx();
		rc.client->api_url = rc.instance->api_url;
	}
	PG_CATCH();
	{
		ErrorData *edata = cd2_abort_keeping_error(rc.cxt);
		ereport(LOG, (errmsg("cd2sync %s: run failed: %s", instance, edata->message)));
		begin_tx();
		catalog_run_finish(run_id, edata->message, unpack_sql_state(edata->sqlerrcode));
		commit_tx();
		return;
	}
	PG_END_TRY();

	run_pipeline(&rc, tables);
	resolve_due(&rc);

	begin_tx();
	catalog_run_finish(run_id, NULL, NULL);
	commit_tx();
	pgstat_report_activity(STATE_IDLE, NULL);
}

void
cd2_worker_main(Datum main_arg)
{
	dsm_segment *seg;
	SyncRequest *req;
	char *instance;
	char *settings;
	char *p;
	List *tables = NIL;
	int64 run_id;
	bool full;
	char *trigger;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	CurrentResourceOwner = ResourceOwnerCreate(NULL, "cd2sync worker");
	seg = dsm_attach(DatumGetUInt32(main_arg));
	if (seg == NULL)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("cd2sync worker could not map its request")));
	req = (SyncRequest *) dsm_segment_address(seg);

	/* copy the request, then let the session go on */
	p = MemoryContextAlloc(TopMemoryContext, req->len);
	memcpy(p, req->data, req->len);
	instance = p;
	p += strlen(p) + 1;
	settings = p;
	p += strlen(p) + 1;
	if (req->tables_given)
	{
		for (int i = 0; i < req->ntables; i++)
		{
			tables = lappend(tables, p);
			p += strlen(p) + 1;
		}
	}
	run_id = req->run_id;
	full = req->full;
	trigger = MemoryContextStrdup(TopMemoryContext, req->trigger);

	BackgroundWorkerInitializeConnectionByOid(req->dboid, req->useroid, 0);
	pg_atomic_write_u32(&req->attached, 1);
	dsm_detach(seg);

	pgstat_report_appname(psprintf("cd2sync %s", instance));
	cd2_restore_settings(settings);
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION);

	run_sync(run_id, instance, tables, full, trigger);
	proc_exit(0);
}
