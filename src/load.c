/*-------------------------------------------------------------------------
 *
 * load.c
 *	  A new table's snapshot loaded by several processes at once.
 *
 * A new table is loaded apart (in schema cd2sync_load, without its key:
 * schema_ddl.sql's _ensure_table), so that processes other than the sync
 * worker can write it and readers see none of it. The sync worker starts
 * up to cd2sync.load_workers dynamic background workers ("cd2sync load
 * worker"); each of them, and the sync worker itself, takes the snapshot's
 * objects one at a time from a counter in a DSM segment, downloads and
 * COPYs them straight into that table (decode.c), and commits what it
 * loaded when there is no object left. A failure in any of them stops the
 * others taking objects; the sync worker then says why, and the caller
 * loads the table another way or fails it (the rows committed apart are
 * never seen: the table is emptied, or made again by the next run). Then
 * the caller builds the key and moves the table in place, in the
 * transaction of its watermark (_finish_loading).
 *
 * Workers come out of max_worker_processes, which the sync workers and
 * the scheduler share: a load takes the workers it can get and goes on
 * with fewer, down to the sync worker alone, never waiting for a slot.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include <unistd.h>

#include "catalog.h"
#include "dap_client.h"
#include "download.h"
#include "launch.h"
#include "load.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "port/atomics.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

/* The load, shared by the sync worker and its load workers */
typedef struct LoadShared
{
	Oid dboid;
	Oid useroid;
	Oid relid; /* the table loaded apart */
	int format;
	int nobjects;
	pg_atomic_uint32 next;   /* the next object to take */
	pg_atomic_uint32 failed; /* set: nobody takes another */
	slock_t mutex;           /* guards what follows */
	uint64 records;
	int64 bytes;
	int objects;
	int sqlerrcode;
	char error[1024];
	Size len; /* of data */
	/* data: instance \0 settings \0 (object id \0 url \0) * nobjects */
	char data[FLEXIBLE_ARRAY_MEMBER];
} LoadShared;

/* The object ids and URLs, pointing into a copy of the shared data */
typedef struct LoadWork
{
	LoadShared *shared;
	const char *instance;
	const char **ids;
	const char **urls;
	DapClient *client; /* for fresh URLs */
} LoadWork;

/*
 * How many load workers a load of this many objects asks for, besides the
 * sync worker: cd2sync.load_workers, or -1 for the cores less one, at most
 * 8 and at most a quarter of max_worker_processes (the other syncs, the
 * scheduler, parallel query and replication share them); never more than
 * objects less one.
 */
int
load_workers_wanted(int objects)
{
	int n = cd2_load_workers;

	if (n < 0)
	{
		long cores = sysconf(_SC_NPROCESSORS_ONLN);

		n = (int) Min(Max(cores - 1, 1), Min(8, Max(max_worker_processes / 4, 1)));
	}
	return Max(0, Min(n, objects - 1));
}

/*
 * Takes objects until none is left or another process failed, COPYing
 * each into the table; commits them, in one transaction of its own. On an
 * error, records it (the first one) and stops the others.
 */
static void
take_objects(LoadWork *w)
{
	LoadShared *s = w->shared;
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		uint64 records = 0;
		int64 bytes = 0;
		int objects = 0;
		uint32 i;
		MemoryContext object_cxt;

		catalog_begin();
		/* one object's download and decoding at a time (see load_objects) */
		object_cxt =
			AllocSetContextCreate(CurrentMemoryContext, "cd2sync object", ALLOCSET_DEFAULT_SIZES);
		while (pg_atomic_read_u32(&s->failed) == 0 &&
			   (i = pg_atomic_fetch_add_u32(&s->next, 1)) < (uint32) s->nobjects)
		{
			MemoryContext outer = MemoryContextSwitchTo(object_cxt);
			Download *d;
			List *columns = NIL; /* (not needed: the table's own) */
			bool jsonl;

			CHECK_FOR_INTERRUPTS();
			d = download_open(w->ids[i], w->urls[i], dap_refresh_url, w->client);
			records += decode_object(d, (RecordFormat) s->format, s->relid, &columns, &jsonl);
			bytes += download_compressed_bytes(d);
			objects++;
			download_close(d);
			MemoryContextSwitchTo(outer);
			MemoryContextReset(object_cxt);
		}
		MemoryContextDelete(object_cxt);
		catalog_commit();
		SpinLockAcquire(&s->mutex);
		s->records += records;
		s->bytes += bytes;
		s->objects += objects;
		SpinLockRelease(&s->mutex);
	}
	PG_CATCH();
	{
		ErrorData *edata = catalog_abort_keeping_error(cxt);

		pg_atomic_write_u32(&s->failed, 1);
		SpinLockAcquire(&s->mutex);
		if (s->error[0] == '\0')
		{
			strlcpy(s->error, edata->message, sizeof(s->error));
			s->sqlerrcode = edata->sqlerrcode;
		}
		SpinLockRelease(&s->mutex);
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

/* When the sync worker lets the load go (done, or exiting): nobody takes another object */
static void
stop_taking(dsm_segment *seg, Datum arg)
{
	LoadShared *s = (LoadShared *) DatumGetPointer(arg);

	pg_atomic_write_u32(&s->failed, 1);
}

/* Points w at the shared data (or a copy of it) */
static void
unpack(LoadWork *w, LoadShared *s, char *data)
{
	char *p = data;

	w->shared = s;
	w->instance = p;
	p += strlen(p) + 1;
	p += strlen(p) + 1; /* (the settings: cd2_load_worker_main reads them) */
	w->ids = palloc(sizeof(char *) * Max(s->nobjects, 1));
	w->urls = palloc(sizeof(char *) * Max(s->nobjects, 1));
	for (int i = 0; i < s->nobjects; i++)
	{
		w->ids[i] = p;
		p += strlen(p) + 1;
		w->urls[i] = p;
		p += strlen(p) + 1;
	}
}

/*
 * Loads the objects into relid with load workers, the calling sync worker
 * taking its share. Must be called outside a transaction. True when every
 * object is loaded (and committed); else false with the first error in
 * result (the rows some processes committed stay in relid).
 */
bool
load_parts(const char *instance, List *object_ids, List *urls, RecordFormat format, Oid relid,
		   DapClient *client, LoadResult *result)
{
	const int n = list_length(object_ids);
	int wanted = load_workers_wanted(n);
	char *settings = cd2_serialize_settings();
	Size len = strlen(instance) + 1 + strlen(settings) + 1;
	dsm_segment *seg;
	LoadShared *s;
	List *handles = NIL;
	LoadWork w = { 0 };
	ListCell *lc, *lu;
	char *p;

	foreach (lc, object_ids)
		len += strlen((char *) lfirst(lc)) + 1;
	foreach (lc, urls)
		len += strlen((char *) lfirst(lc)) + 1;
	seg = dsm_create(offsetof(LoadShared, data) + len, 0);
	s = (LoadShared *) dsm_segment_address(seg);
	memset(s, 0, offsetof(LoadShared, data));
	/* (a sync worker that exits, cancelled, stops its load workers after their object) */
	on_dsm_detach(seg, stop_taking, PointerGetDatum(s));
	s->dboid = MyDatabaseId;
	s->useroid = GetUserId();
	s->relid = relid;
	s->format = (int) format;
	s->nobjects = n;
	pg_atomic_init_u32(&s->next, 0);
	pg_atomic_init_u32(&s->failed, 0);
	SpinLockInit(&s->mutex);
	s->len = len;
	p = s->data;
	strcpy(p, instance);
	p += strlen(p) + 1;
	strcpy(p, settings);
	p += strlen(p) + 1;
	forboth(lc, object_ids, lu, urls)
	{
		strcpy(p, (char *) lfirst(lc));
		p += strlen(p) + 1;
		strcpy(p, (char *) lfirst(lu));
		p += strlen(p) + 1;
	}

	for (int i = 0; i < wanted; i++)
	{
		BackgroundWorker worker = { 0 };
		BackgroundWorkerHandle *h;

		worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
		worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
		worker.bgw_restart_time = BGW_NEVER_RESTART;
		snprintf(worker.bgw_library_name, BGW_MAXLEN, "cd2sync");
		snprintf(worker.bgw_function_name, BGW_MAXLEN, "cd2_load_worker_main");
		snprintf(worker.bgw_name, BGW_MAXLEN, "cd2sync load worker for %s", instance);
		snprintf(worker.bgw_type, BGW_MAXLEN, "cd2sync load worker");
		worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(seg));
		worker.bgw_notify_pid = MyProcPid;
		if (!RegisterDynamicBackgroundWorker(&worker, &h))
			break; /* no slot free: fewer workers */
		handles = lappend(handles, h);
	}

	PG_TRY();
	{
		/* the sync worker takes its share */
		unpack(&w, s, s->data);
		w.client = client;
		take_objects(&w);

		foreach (lc, handles)
		{
			pgstat_report_wait_start(PG_WAIT_EXTENSION);
			(void) WaitForBackgroundWorkerShutdown((BackgroundWorkerHandle *) lfirst(lc));
			pgstat_report_wait_end();
		}
	}
	PG_CATCH();
	{
		/* (cancelled, or the server stops: the workers go, and the segment) */
		pgstat_report_wait_end();
		foreach (lc, handles)
			TerminateBackgroundWorker((BackgroundWorkerHandle *) lfirst(lc));
		dsm_detach(seg);
		PG_RE_THROW();
	}
	PG_END_TRY();

	/* a worker that died without a word (killed) loaded some objects, or none */
	if (pg_atomic_read_u32(&s->failed) == 0 && s->objects < s->nobjects)
	{
		s->sqlerrcode = ERRCODE_INTERNAL_ERROR;
		strlcpy(s->error, "a cd2sync load worker exited before its objects were loaded",
				sizeof(s->error));
		pg_atomic_write_u32(&s->failed, 1);
	}
	result->records = s->records;
	result->bytes = s->bytes;
	result->objects = s->objects;
	result->workers = list_length(handles);
	result->sqlerrcode = s->sqlerrcode;
	result->error = pg_atomic_read_u32(&s->failed) ? pstrdup(s->error) : NULL;
	dsm_detach(seg);
	return result->error == NULL;
}

void
cd2_load_worker_main(Datum main_arg)
{
	dsm_segment *seg;
	LoadShared *s;
	LoadWork w = { 0 };
	char *data;
	char *settings;
	InstanceConfig *ic;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	CurrentResourceOwner = ResourceOwnerCreate(NULL, "cd2sync load worker");
	seg = dsm_attach(DatumGetUInt32(main_arg));
	if (seg == NULL)
		proc_exit(0); /* the sync worker is gone, and its load with it */
	s = (LoadShared *) dsm_segment_address(seg);
	BackgroundWorkerInitializeConnectionByOid(s->dboid, s->useroid, 0);

	data = MemoryContextAlloc(TopMemoryContext, s->len);
	memcpy(data, s->data, s->len);
	unpack(&w, s, data);
	settings = data + strlen(data) + 1;
	cd2_restore_settings(settings);
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION);
	/* what it writes is written for READ COMMITTED, whatever the database's default */
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_SESSION);
	pgstat_report_appname(psprintf("cd2sync %s", w.instance));
	pgstat_report_activity(STATE_RUNNING, psprintf("cd2sync %s: loading objects", w.instance));

	/* (its own client, for fresh URLs: the secret is read as the sync worker does) */
	catalog_begin();
	ic = catalog_load_instance(w.instance);
	catalog_commit();
	w.client = dap_client_create(ic->api_url, ic->client_id, ic->client_secret);

	take_objects(&w);
	dsm_detach(seg);
	proc_exit(0);
}
