/*-------------------------------------------------------------------------
 *
 * table_sync.c
 *	  One table's sync: a state machine (SyncStep) that the run's pipeline
 *	  advances one step at a time, interleaved with the other tables'.
 *
 *	 BEGIN      read the table's state (watermark, schema version), record
 *	            the start; a snapshot when there is no watermark, a full
 *	            resync is asked or due, or the table is missing
 *	 START_JOB  start the job set up, within cd2sync.job_rate (an
 *	            incremental the API refuses, SnapshotRequired or OutOfRange,
 *	            becomes a snapshot; a format it refuses, jsonl)
 *	 POLL       ask how the job does, less and less often
 *	 SCHEMA     the first job's schema version is new: fetch the schema,
 *	            create or alter the table (own transaction: new enum values
 *	            must be committed before use); a type that cannot change in
 *	            place restarts the table as a snapshot (START_JOB)
 *	 URLS       the objects' URLs; a job gone upstream is started again once
 *	 CATCHUP    identical queries are deduplicated upstream for a day, so a
 *	            snapshot can be older than the data held: chain incrementals
 *	            from its "at" (START_JOB, POLL, URLS, CATCHUP ...) until they
 *	            reach the stored watermark
 *	 LOAD       in one transaction: COPY every object (into a staging table,
 *	            or straight into a new table), apply it set-based, the SQL
 *	            hooks around the apply, the watermark and the log row
 *
 * An error in any step aborts that step's transaction, so the table's rows
 * and watermark stay as they were; the failure is recorded in a new
 * transaction and the run goes on with the other tables.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include <sys/mman.h>
#include <unistd.h>

#include "access/xact.h"
#include "download.h"
#include "http.h"
#include "load.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "table_sync.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

/* Most incrementals chained to bring an old (deduplicated) snapshot forward */
#define CATCHUP_MAX_JOBS 48

/* ---- progress ---- */

/*
 * Says what the run does (ts NULL) or a table sync of it does, in
 * pg_stat_activity and cd2sync.progress.
 */
void
report(RunContext *rc, TableSync *ts, const char *fmt, ...)
{
	Progress *p = &rc->progress;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(p->phase, sizeof(p->phase), fmt, ap);
	va_end(ap);
	if (ts)
	{
		strlcpy(p->table, ts->tr->table, sizeof(p->table));
		p->objects_done = ts->tr->objects;
		p->objects_total = ts->objects_total;
		p->bytes_downloaded = ts->tr->bytes;
		p->bytes_decoded = ts->decoded;
		p->records = ts->records;
	}
	else
		p->table[0] = '\0';
	progress_publish(p);
}

static RunContext *decoding_run = NULL; /* for the decoder's progress hook */

/* Called by the decoder every few megabytes of a file */
static void
decode_progress(int64 bytes)
{
	RunContext *rc = decoding_run;

	if (rc && rc->loading)
	{
		rc->loading->decoded += bytes;
		rc->progress.bytes_decoded = rc->loading->decoded;
		progress_publish(&rc->progress);
	}
}

static double
seconds_since(TimestampTz t)
{
	return (double) (GetCurrentTimestamp() - t) / USECS_PER_SEC;
}

/* ---- jobs ---- */

/*
 * How long until another job may start under cd2sync.job_rate (jobs per
 * minute, counted over the last minute); 0: now.
 */
long
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

/* Starts one query job, counted against cd2sync.job_rate */
static DapJob *
start_query(RunContext *rc, TableSync *ts, const char *fmt, const char *since, DapError *err)
{
	MemoryContext old = MemoryContextSwitchTo(rc->cxt);

	rc->job_starts = lappend(rc->job_starts, palloc(sizeof(TimestampTz)));
	*(TimestampTz *) llast(rc->job_starts) = GetCurrentTimestamp();
	MemoryContextSwitchTo(old);
	return dap_start_query(rc->client, ts->st.namespace, ts->st.remote_name, fmt, since, err);
}

/* Sets up the next job; START_JOB starts it */
static void
next_job(TableSync *ts, JobRole role, bool snapshot, const char *since)
{
	ts->role = role;
	ts->job_snapshot = snapshot;
	ts->job_since = snapshot ? NULL : since;
	ts->job_restarted = false;
	ts->step = STEP_START_JOB;
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

/* ---- loading ---- */

/*
 * Downloads and decodes every object of a job: straight into the target
 * table (direct, a valid relid) or into the staging table. Returns the
 * records decoded; adds the columns the files carry to *columns and tells
 * whether any file was JSON lines.
 */
static uint64
load_objects(RunContext *rc, TableSync *ts, DapJob *job, List *urls, Oid direct, List **columns,
			 bool *any_jsonl)
{
	TableRun *tr = ts->tr;
	ListCell *lo, *lu;
	uint64 records = 0;
	MemoryContext outer = CurrentMemoryContext;
	/* one object's download and decoding at a time (its buffers, its
	 * header): a table of many objects holds no more than one's */
	MemoryContext object_cxt =
		AllocSetContextCreate(outer, "cd2sync object", ALLOCSET_DEFAULT_SIZES);

	ts->objects_total = list_length(job->objects);
	forboth(lo, job->objects, lu, urls)
	{
		Download *d;
		bool jsonl;
		List *seen;
		ListCell *lc;
		int known;

		ts->records = records;
		report(rc, ts, "%s object %d of %d",
			   OidIsValid(direct) ? "loading straight into the table" : "downloading",
			   foreach_current_index(lo) + 1, list_length(job->objects));
		MemoryContextSwitchTo(object_cxt);
		seen = list_copy(*columns);
		d = download_open((char *) lfirst(lo), (char *) lfirst(lu), dap_refresh_url, rc->client);
		records += decode_object(d, rc->format, direct, &seen, &jsonl);
		tr->bytes += download_compressed_bytes(d);
		tr->objects++;
		*any_jsonl |= jsonl;
		download_close(d);
		/* the columns this object's header added, kept */
		MemoryContextSwitchTo(outer);
		known = list_length(*columns);
		foreach (lc, seen)
		{
			if (foreach_current_index(lc) >= known)
				*columns = lappend(*columns, pstrdup((char *) lfirst(lc)));
		}
		MemoryContextReset(object_cxt);
	}
	MemoryContextDelete(object_cxt);
	ts->records = records;
	return records;
}

/*
 * Whether a load that failed with this error can be done another way: the
 * data does not suit that way (a value that does not parse as its column's
 * type, a duplicate key, a format the way does not take). Other errors (the
 * network, a cancel, a record with the wrong number of fields or bytes that
 * are not text) would fail any way.
 */
static bool
another_way(int sqlerrcode)
{
	int category = ERRCODE_TO_CATEGORY(sqlerrcode);

	if (category != ERRCODE_DATA_EXCEPTION && category != ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION &&
		category != ERRCODE_FEATURE_NOT_SUPPORTED)
		return false;
	return sqlerrcode != ERRCODE_BAD_COPY_FILE_FORMAT &&
		   sqlerrcode != ERRCODE_CHARACTER_NOT_IN_REPERTOIRE &&
		   sqlerrcode != ERRCODE_UNTRANSLATABLE_CHARACTER;
}

typedef void (*AttemptFn)(RunContext *rc, TableSync *ts, void *arg);

/*
 * Runs fn in a subtransaction. When the data does not suit what fn does
 * (another_way), rolls it back, logs "<instance>.<table>: <instead>: why"
 * and returns false: the caller does it another way. Other errors go on up.
 */
static bool
attempt(RunContext *rc, TableSync *ts, AttemptFn fn, void *arg, const char *instead)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool done = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		fn(rc, ts, arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		done = true;
	}
	PG_CATCH();
	{
		ErrorData *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		if (!another_way(edata->sqlerrcode))
			ReThrowError(edata);
		ereport(LOG, (errmsg("cd2sync %s.%s: %s: %s", rc->instance->name, ts->tr->table, instead,
							 edata->message)));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return done;
}

/* What one way of loading a job's objects needs */
typedef struct LoadWay
{
	DapJob *job;
	List *urls;
	const char *target;
	Oid direct;     /* load straight into this table, or InvalidOid: staging */
	bool typed;     /* staging with the target's types */
	List *columns;  /* out: the columns the files carry */
	bool any_jsonl; /* out */
	uint64 records; /* out */
} LoadWay;

static void
load_way(RunContext *rc, TableSync *ts, void *arg)
{
	LoadWay *way = (LoadWay *) arg;

	if (!OidIsValid(way->direct))
		catalog_create_staging(way->target, way->typed);
	way->records =
		load_objects(rc, ts, way->job, way->urls, way->direct, &way->columns, &way->any_jsonl);
	if (way->any_jsonl)
		catalog_expand_jsonl(way->target);
}

/*
 * Loads a job's objects one way, in a subtransaction; false (rolled back,
 * counts as they were) when the data does not suit that way, such as an
 * oversized placeholder in a number column: the caller loads another way.
 */
static bool
try_load(RunContext *rc, TableSync *ts, DapJob *job, List *urls, LoadWay *way)
{
	int64 bytes = ts->tr->bytes;
	int objects = ts->tr->objects;

	way->job = job;
	way->urls = urls;
	if (attempt(rc, ts, load_way, way,
				OidIsValid(way->direct) ? "loading through the typed staging table"
										: "loading through the text staging table"))
		return true;
	ts->tr->bytes = bytes;
	ts->tr->objects = objects;
	way->columns = NIL;
	way->any_jsonl = false;
	return false;
}

static void
finish_loading(RunContext *rc, TableSync *ts, void *arg)
{
	report(rc, ts, "building the key of the new table");
	catalog_finish_loading(rc->instance->target_schema, ts->tr->table, ts->schema_doc);
}

/*
 * Puts a new table whose objects load_parts loaded in its place, its key
 * built, in a subtransaction: false (rolled back) when a key comes twice.
 */
static bool
finish_new_table(RunContext *rc, TableSync *ts)
{
	return attempt(rc, ts, finish_loading, NULL, "loading the new table again through staging");
}

/*
 * Maps PostgreSQL's whole buffer pool into this process's page tables in
 * one call (cd2sync.prefault_buffers), once per process, before its first
 * apply. A new process otherwise takes a page fault at its first touch of
 * each 4 kB of shared memory (a buffer it reads a page into takes two: a
 * fault on a write maps no neighbours), and an apply reads and writes its
 * table through shared buffers: on virtual machines, where a fault costs
 * microseconds, that was a tenth to a fifth of a no-op incremental whose
 * table had left shared buffers (docs/performance.md). (COPY straight into
 * a table goes through a small ring of buffers instead: not worth it.) The
 * cost: about 70 ms and 2 MB of page tables per GB of shared_buffers
 * without huge pages, little with them. Nothing in the pool is read or
 * written; before Linux 5.14 the faults come one at a time, as before.
 */
static void
prefault_buffers(void)
{
#ifdef MADV_POPULATE_WRITE
	static bool done = false;
	uintptr_t page;
	uintptr_t start;
	uintptr_t end;

	if (done || !cd2_prefault_buffers)
		return;
	done = true;
	page = (uintptr_t) sysconf(_SC_PAGESIZE);
	start = TYPEALIGN(page, (uintptr_t) BufferBlocks);
	end = TYPEALIGN_DOWN(page, (uintptr_t) BufferBlocks + (Size) NBuffers * BLCKSZ);
	/* (256 MB at a time: a large pool takes seconds, and a cancel is answered between) */
	while (start < end)
	{
		uintptr_t len = Min(end - start, (uintptr_t) 256 * 1024 * 1024);

		CHECK_FOR_INTERRUPTS();
		if (madvise((void *) start, len, MADV_POPULATE_WRITE) != 0)
		{
			elog(DEBUG1, "cd2sync: the buffer pool was not mapped ahead: %m");
			return;
		}
		start += len;
	}
#endif
}

/*
 * Downloads, decodes and applies every object of a job, in the current
 * transaction; adds its counts to the table sync's.
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
apply_job(RunContext *rc, TableSync *ts, DapJob *job, List *urls, bool snapshot)
{
	TableRun *tr = ts->tr;
	const char *instance = rc->instance->name;
	const char *target = ts->st.target;
	const char *mode;
	LoadWay way = { 0 };
	bool retype;
	bool no_direct = false;
	ApplyCounts counts;

	if (ts->new_table && job == ts->main)
	{
		/* a new table: its objects are in already, or it is loaded as below */
		ts->new_table = false;
		if (ts->parts_loaded && !ts->parts_failed && finish_new_table(rc, ts))
		{
			tr->upserted += ts->parts_records;
			return;
		}
		if (ts->parts_loaded)
		{
			char *name;

			if (OidIsValid(catalog_loading_rel(rc->instance->target_schema, tr->table, &name)))
				catalog_truncate(name);
			tr->bytes = 0;
			tr->objects = 0;
		}
		catalog_finish_loading(rc->instance->target_schema, tr->table, ts->schema_doc);
		/* (the data did not suit COPY: straight to staging, not a third download) */
		no_direct = ts->parts_loaded;
	}
	retype = snapshot && catalog_types_pending(instance, tr->table);
	way.target = target;
	if (!snapshot)
		mode = "incremental";
	else if (retype || catalog_has_rows(target))
		mode = "snapshot";
	else
		mode = "snapshot_new";

	/*
	 * Straight in by COPY: a snapshot into an empty table, and the new
	 * records of a log (append-only: an incremental adds rows). A record
	 * the table has already (a duplicate key) or a delete does not suit
	 * this way: the staging table takes them. So do a log's records while
	 * a change feed follows it: the apply writes each with its users'
	 * replacements, and the feed sees it once, as the view shows it (by
	 * COPY they would come after it: an insert, then an update).
	 */
	if (cd2_direct_load && rc->format == FORMAT_TSV && !no_direct &&
		(strcmp(mode, "snapshot_new") == 0 ||
		 (strcmp(mode, "incremental") == 0 && catalog_is_log(target) &&
		  !catalog_feed_captures(target))))
	{
		way.direct = catalog_direct_target(target);
		/* (a snapshot here is into an empty table: the feeds get its rows
		 * with their users' replacements, after the load) */
		if (OidIsValid(way.direct) && snapshot)
			catalog_feed_load_begin(target);
		if (OidIsValid(way.direct) && try_load(rc, ts, job, urls, &way))
		{
			tr->upserted += way.records;
			return;
		}
		way.direct = InvalidOid;
	}

	/* columns about to change type take their values as text */
	way.typed = !retype;
	if (retype || !try_load(rc, ts, job, urls, &way))
	{
		way.typed = false;
		catalog_create_staging(target, false);
		way.records = load_objects(rc, ts, job, urls, InvalidOid, &way.columns, &way.any_jsonl);
		if (way.any_jsonl)
			catalog_expand_jsonl(target);
	}

	if (retype)
	{
		/*
		 * Everything is downloaded: only now delete the rows and change the
		 * types, so that readers wait for the apply alone.
		 */
		int64 emptied;

		report(rc, ts, "changing column types");
		emptied = catalog_apply_pending_types(instance, tr->table, target);
		if (emptied >= 0)
		{
			tr->deleted += emptied;
			mode = "snapshot_new";
		}
		else if (!catalog_has_rows(target))
			mode = "snapshot_new";
	}

	report(rc, ts, "applying (%s)", mode);
	prefault_buffers();
	catalog_apply(instance, tr->table, target, mode, way.any_jsonl ? NIL : way.columns, way.typed,
				  &counts);
	tr->upserted += counts.upserted;
	tr->deleted += counts.deleted;
	tr->unchanged += counts.unchanged;
	tr->oversized += counts.oversized;
}

/* ---- the steps ---- */

static void
step_begin(RunContext *rc, TableSync *ts)
{
	TableRun *tr = ts->tr;
	TableState *st = &ts->st;

	catalog_begin();
	catalog_table_state(rc->instance->name, rc->instance->target_schema, tr->table, st);
	tr->watermark_before = st->watermark_raw;
	catalog_log_start(tr);
	catalog_commit();

	ts->snapshot = (st->watermark_raw == NULL || rc->full || !st->table_exists || st->snapshot_due);
	ts->started = GetCurrentTimestamp();
	next_job(ts, JOB_MAIN, ts->snapshot, st->watermark_raw);
}

/*
 * Starts the job set up. An incremental the API refuses as too old becomes
 * a snapshot; a format the API refuses becomes jsonl. The job may already
 * be complete (identical queries are deduplicated).
 */
static void
step_start_job(RunContext *rc, TableSync *ts)
{
	DapError err;
	DapJob *job;
	const char *fmt = decode_format_name(rc->format);
	bool snapshot = ts->job_snapshot;
	const char *since = ts->job_since;

	report(rc, ts, "starting a %s query job", snapshot ? "snapshot" : "incremental");
	job = start_query(rc, ts, fmt, since, &err);
	if (job == NULL && rc->format != FORMAT_JSONL &&
		(err.type ? strcmp(err.type, "ValidationError") == 0 : err.status == 400))
	{
		/*
		 * The query was refused as invalid: perhaps the format. JSON lines is
		 * the format every DAP server documents: ask for it once, and keep it
		 * for the run if it is accepted.
		 */
		ereport(LOG, (errmsg("cd2sync %s.%s: query in format %s refused (%s), asking for jsonl",
							 rc->instance->name, ts->tr->table, fmt, err.message)));
		job = start_query(rc, ts, "jsonl", since, &err);
		if (job != NULL)
		{
			rc->format = FORMAT_JSONL;
			fmt = decode_format_name(rc->format);
		}
	}
	if (job == NULL && !snapshot && err.type &&
		(strcmp(err.type, "SnapshotRequired") == 0 || strcmp(err.type, "OutOfRange") == 0))
	{
		ereport(LOG, (errmsg("cd2sync %s.%s: incremental refused (%s), taking a snapshot",
							 rc->instance->name, ts->tr->table, err.type)));
		snapshot = true;
		job = start_query(rc, ts, fmt, NULL, &err);
	}
	if (job == NULL)
		dap_raise(&err);

	ts->job = job;
	ts->job_snapshot = snapshot;
	if (ts->role == JOB_MAIN)
	{
		ts->snapshot = snapshot;
		ts->tr->job_id = job->id;
	}
	ts->job_started = GetCurrentTimestamp();
	ts->poll_delay = Min(100, cd2_poll_interval);
	ts->next_poll = ts->job_started + (TimestampTz) ts->poll_delay * 1000;
	report(rc, ts, "waiting for query job %s", job->id);
	ts->step = STEP_POLL;
}

static void
step_poll(RunContext *rc, TableSync *ts)
{
	if (!dap_job_done(ts->job))
	{
		DapError err;

		if (GetCurrentTimestamp() - ts->job_started > (TimestampTz) cd2_job_timeout * USECS_PER_SEC)
			ereport(ERROR,
					(errcode(ERRCODE_QUERY_CANCELED),
					 errmsg("CD2 query job %s did not finish within cd2sync.job_timeout (%d s)",
							ts->job->id, cd2_job_timeout)));
		ts->job = dap_poll_job(rc->client, ts->job, &err);
		if (ts->job == NULL)
			dap_raise(&err);
		ts->poll_delay = Min(ts->poll_delay * 2, cd2_poll_interval);
		ts->next_poll = GetCurrentTimestamp() + (TimestampTz) ts->poll_delay * 1000;
		if (!dap_job_done(ts->job))
			return;
	}
	dap_check_finished(ts->job, ts->job_snapshot);
	ts->jobs_done = GetCurrentTimestamp();
	ts->step = (ts->role == JOB_MAIN && !ts->schema_checked) ? STEP_SCHEMA : STEP_URLS;
}

static void
step_schema(RunContext *rc, TableSync *ts)
{
	TableRun *tr = ts->tr;
	TableState *st = &ts->st;
	DapJob *job = ts->job;
	char *doc;
	int version;
	bool retype;

	ts->schema_checked = true;
	ts->step = STEP_URLS;
	if (st->table_exists && job->schema_version > 0 && job->schema_version == st->schema_version)
		return;

	report(rc, ts, "fetching schema");
	doc = dap_get_schema(rc->client, st->namespace, st->remote_name);
	report(rc, ts, "creating or altering the table");
	catalog_begin();
	retype = catalog_ensure_table(rc->instance->name, rc->instance->target_schema, tr->table, doc,
								  &version);
	ts->schema_doc = doc;
	catalog_commit();
	if (job->schema_version <= 0)
		job->schema_version = version;

	if (retype && !ts->job_snapshot)
	{
		/* a type that cannot change in place: the table is reloaded */
		ereport(LOG, (errmsg("cd2sync %s.%s: a column type changed upstream, taking a snapshot",
							 rc->instance->name, tr->table)));
		next_job(ts, JOB_MAIN, true, NULL);
	}
}

static void
step_urls(RunContext *rc, TableSync *ts)
{
	DapJob *job = ts->job;
	const char *watermark = ts->st.watermark_raw;
	List *urls = NIL;

	if (job->objects != NIL) /* (a result may have no objects at all) */
	{
		DapError err;

		urls = dap_object_urls(rc->client, job->objects, &err);
		if (urls == NIL)
		{
			/* the job is gone upstream (expired): start it again, once */
			if (ts->job_restarted)
				dap_raise(&err);
			ereport(LOG, (errmsg("cd2sync %s.%s: %s; starting a new query job", rc->instance->name,
								 ts->tr->table, err.message)));
			ts->job_restarted = true;
			ts->step = STEP_START_JOB;
			return;
		}
	}
	ts->step = STEP_LOAD;

	if (ts->role == JOB_MAIN)
	{
		ts->main = job;
		ts->main_urls = urls;
		if (ts->snapshot && watermark && timestamp_before(job->at, watermark))
		{
			ts->catchup_since = job->at;
			ts->step = STEP_CATCHUP;
		}
	}
	else if (ts->job_snapshot)
	{
		/* the incremental was refused as too old: this newer snapshot replaces it all */
		ts->main = job;
		ts->main_urls = urls;
		ts->catchups = NIL;
		ts->catchup_since = job->at;
		if (timestamp_before(ts->catchup_since, watermark))
			ts->step = STEP_CATCHUP;
	}
	else if (timestamp_before(ts->catchup_since, job->until))
	{
		/* (no progress: what upstream has is all there is) */
		ts->catchups = lappend(ts->catchups, list_make2(job, urls));
		/* a window from what we held is current; else go on from its end */
		if (timestamp_before(ts->catchup_since, watermark))
		{
			ts->catchup_since = job->until;
			ts->step = STEP_CATCHUP;
		}
	}
}

static void
step_catchup(RunContext *rc, TableSync *ts)
{
	if (ts->catchup_jobs >= CATCHUP_MAX_JOBS)
	{
		ts->step = STEP_LOAD;
		return;
	}
	ts->catchup_jobs++;
	next_job(ts, JOB_CATCHUP, false, ts->catchup_since);
}

/*
 * A snapshot of a new table (made apart by the SCHEMA step): its objects
 * are COPYed into it by the sync worker and load workers at once
 * (load_parts), each committing apart, before the transaction that puts
 * the table in place with its watermark. Only straight COPY suits (TSV,
 * no column COPY cannot fill); else, or when the data does not suit it,
 * apply_job loads it the usual way.
 */
static void
load_new_table(RunContext *rc, TableSync *ts)
{
	char *name = NULL;
	Oid relid;
	bool direct;
	LoadResult res;

	if (!ts->snapshot || ts->schema_doc == NULL || ts->st.table_exists)
		return;
	catalog_begin();
	relid = catalog_loading_rel(rc->instance->target_schema, ts->tr->table, &name);
	direct = OidIsValid(relid) && cd2_direct_load && rc->format == FORMAT_TSV &&
			 OidIsValid(catalog_direct_target(name));
	catalog_commit();
	if (!OidIsValid(relid))
		return;
	ts->new_table = true;
	if (!direct || ts->main->objects == NIL)
		return;

	report(rc, ts, "loading %d objects, with up to %d load workers", list_length(ts->main->objects),
		   load_workers_wanted(list_length(ts->main->objects)));
	rc->loading = ts;
	ts->parts_loaded = true; /* (some rows may be in, whatever happens) */
	if (load_parts(rc->instance->name, ts->main->objects, ts->main_urls, rc->format, relid,
				   rc->client, &res))
	{
		ts->parts_records = res.records;
		ts->tr->bytes += res.bytes;
		ts->tr->objects += res.objects;
		ereport(LOG,
				(errmsg("cd2sync %s.%s: %d objects of a new table loaded by the sync worker and "
						"%d load workers",
						rc->instance->name, ts->tr->table, res.objects, res.workers)));
	}
	else
	{
		if (!another_way(res.sqlerrcode))
			ereport(ERROR, (errcode(res.sqlerrcode), errmsg_internal("%s", res.error)));
		ereport(LOG, (errmsg("cd2sync %s.%s: loading the new table again through staging: %s",
							 rc->instance->name, ts->tr->table, res.error)));
		ts->parts_failed = true;
	}
	rc->loading = NULL;
}

/*
 * A log's partitions around its load, in short transactions of their own
 * (catalog_log_upkeep). After the load has committed, a failure here is
 * logged and left to the next sync: the table sync succeeded.
 */
static void
log_upkeep(RunContext *rc, TableSync *ts, const char *phase)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		catalog_begin();
		catalog_log_upkeep(rc->instance->name, ts->tr->table, ts->tr->watermark, phase);
		catalog_commit();
	}
	PG_CATCH();
	{
		ErrorData *edata;

		if (strcmp(phase, "after") != 0)
			PG_RE_THROW();
		edata = catalog_abort_keeping_error(cxt);
		ereport(LOG, (errmsg("cd2sync %s.%s: partitions left to the next sync: %s",
							 rc->instance->name, ts->tr->table, edata->message)));
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

static void
step_load(RunContext *rc, TableSync *ts)
{
	TableRun *tr = ts->tr;
	TimestampTz t0 = GetCurrentTimestamp();
	ListCell *lc;

	tr->job_seconds = (double) (ts->jobs_done - ts->started) / USECS_PER_SEC;
	load_new_table(rc, ts);
	if (ts->catchups != NIL)
		tr->watermark = ((DapJob *) linitial((List *) llast(ts->catchups)))->until;
	else
		tr->watermark = ts->snapshot ? ts->main->at : ts->main->until;

	log_upkeep(rc, ts, "before");
	catalog_begin();
	rc->loading = ts;
	catalog_before_apply(tr);
	apply_job(rc, ts, ts->main, ts->main_urls, ts->snapshot);
	foreach (lc, ts->catchups)
	{
		List *pair = (List *) lfirst(lc);

		apply_job(rc, ts, (DapJob *) linitial(pair), (List *) lsecond(pair), false);
	}
	rc->loading = NULL;
	if (ts->snapshot)
		tr->mode = "snapshot";
	else
		tr->mode = (tr->upserted == 0 && tr->deleted == 0) ? "unchanged" : "incremental";
	tr->schema_version = ts->main->schema_version;
	/* what follows an apply (merge map, change feeds) is SQL's: one hook */
	report(rc, ts, "after apply");
	catalog_after_apply(tr);
	tr->load_seconds = seconds_since(t0);
	catalog_log_success(tr);
	catalog_commit();
	ts->step = STEP_DONE;
	log_upkeep(rc, ts, "after");
}

typedef void (*StepFunction)(RunContext *rc, TableSync *ts);

static const StepFunction steps[] = {
	[STEP_BEGIN] = step_begin,   [STEP_START_JOB] = step_start_job, [STEP_POLL] = step_poll,
	[STEP_SCHEMA] = step_schema, [STEP_URLS] = step_urls,           [STEP_CATCHUP] = step_catchup,
	[STEP_LOAD] = step_load,
};

/* ---- the interface to the run ---- */

TableSync *
table_sync_new(RunContext *rc, const char *table)
{
	MemoryContext cxt = AllocSetContextCreate(rc->cxt, "cd2sync table", ALLOCSET_DEFAULT_SIZES);
	TableSync *ts = MemoryContextAllocZero(cxt, sizeof(TableSync));

	ts->cxt = cxt;
	ts->step = STEP_BEGIN;
	ts->tr = MemoryContextAllocZero(cxt, sizeof(TableRun));
	ts->tr->run_id = rc->run_id;
	ts->tr->instance = rc->instance->name;
	ts->tr->table = table;
	ts->tr->started = GetCurrentTimestamp();
	decoding_run = rc;
	decode_progress_hook = decode_progress;
	return ts;
}

/*
 * Whether the table sync's next step can run now; if not, lowers *wait_ms
 * to when it can (a job that is not due to be asked again, a job that
 * cd2sync.job_rate does not allow yet).
 */
bool
table_sync_ready(RunContext *rc, TableSync *ts, long *wait_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	long budget;

	switch (ts->step)
	{
		case STEP_START_JOB:
			budget = job_budget_wait_ms(rc);
			*wait_ms = Min(*wait_ms, budget);
			return budget == 0;
		case STEP_POLL:
			if (dap_job_done(ts->job) || now >= ts->next_poll)
				return true;
			*wait_ms = Min(*wait_ms, (long) ((ts->next_poll - now) / 1000));
			return false;
		default:
			return true;
	}
}

/*
 * Runs the table sync's next step. A failure aborts the step's transaction
 * (the table keeps its rows and watermark), is recorded in a new one, and
 * ends the table sync. Returns whether the table sync goes on (false: done
 * or failed).
 */
bool
table_sync_step(RunContext *rc, TableSync *ts)
{
	volatile bool ok = true;

	Assert(ts->step < STEP_DONE);
	MemoryContextSwitchTo(ts->cxt);
	PG_TRY();
	{
		steps[ts->step](rc, ts);
	}
	PG_CATCH();
	{
		ErrorData *edata = catalog_abort_keeping_error(rc->cxt);

		rc->loading = NULL;
		ereport(LOG, (errmsg("cd2sync %s.%s failed: %s", rc->instance->name, ts->tr->table,
							 edata->message)));
		MemoryContextSwitchTo(ts->cxt);
		catalog_begin();
		catalog_log_failure(ts->tr, edata->message, unpack_sql_state(edata->sqlerrcode));
		catalog_commit();
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(rc->cxt);
	return ok && ts->step != STEP_DONE;
}
