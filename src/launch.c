/*-------------------------------------------------------------------------
 *
 * launch.c
 *	  Starting a sync worker: the session packs its request into a DSM
 *	  segment, registers a dynamic background worker and waits until the
 *	  worker has copied the request; the worker unpacks it, connects and
 *	  takes on the session's settings.
 *
 * The worker connects as the extension's owner: it is the one role that
 * can read the secrets and own the synced schemas, whoever asked for the
 * sync.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "launch.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/latch.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"

/* The request in its DSM segment */
typedef struct SyncRequest
{
	Oid dboid;
	Oid useroid; /* the extension's owner */
	int64 run_id;
	bool full;
	char trigger[16];  /* manual, schedule */
	bool tables_given; /* sync only the listed tables */
	int ntables;
	pg_atomic_uint32 attached; /* the worker has copied the request */
	Size len;                  /* of data */
	/* data: instance \0 settings \0 table \0 table \0 ... */
	char data[FLEXIBLE_ARRAY_MEMBER];
} SyncRequest;

/* The role that owns the extension: sync workers run as it */
static Oid
extension_owner(void)
{
	Oid extoid = get_extension_oid("cd2sync", false);
	Relation rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple tup;
	Oid owner = InvalidOid;

	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return owner;
}

/*
 * Starts a sync worker for an instance and waits until it has taken its
 * request. tables: C strings (NIL: the instance's tables). Returns the
 * worker's handle, allocated in handle_cxt (the rest of what it allocates is
 * in CurrentMemoryContext); *run_id is the run's id. Needs a transaction.
 */
BackgroundWorkerHandle *
cd2_launch_worker(const char *instance, List *tables, bool full, const char *trigger, int64 *run_id,
				  MemoryContext handle_cxt)
{
	MemoryContext old;
	bool registered;
	char *settings;
	Size len;
	dsm_segment *seg;
	SyncRequest *req;
	char *p;
	BackgroundWorker worker = { 0 };
	BackgroundWorkerHandle *handle;
	ListCell *lc;
	char *sql_version = catalog_sql_version();

	/* the worker calls SQL of this library's version: an older one lacks it */
	if (sql_version == NULL || strcmp(sql_version, CD2SYNC_VERSION) != 0)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("cd2sync's SQL objects are at version %s, its library at %s",
							   sql_version ? sql_version : "(none)", CD2SYNC_VERSION),
						errhint("Run ALTER EXTENSION cd2sync UPDATE.")));

	*run_id = catalog_next_run_id();

	/* the request */
	settings = cd2_serialize_settings();
	len = strlen(instance) + 1 + strlen(settings) + 1;
	foreach (lc, tables)
		len += strlen((char *) lfirst(lc)) + 1;
	seg = dsm_create(offsetof(SyncRequest, data) + len, 0);
	req = (SyncRequest *) dsm_segment_address(seg);
	req->dboid = MyDatabaseId;
	req->useroid = extension_owner();
	req->run_id = *run_id;
	req->full = full;
	strlcpy(req->trigger, trigger, sizeof(req->trigger));
	req->tables_given = (tables != NIL);
	req->ntables = list_length(tables);
	req->len = len;
	pg_atomic_init_u32(&req->attached, 0);
	p = req->data;
	strcpy(p, instance);
	p += strlen(instance) + 1;
	strcpy(p, settings);
	p += strlen(settings) + 1;
	foreach (lc, tables)
	{
		strcpy(p, (char *) lfirst(lc));
		p += strlen(p) + 1;
	}

	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "cd2sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cd2_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cd2sync sync of %s", instance);
	snprintf(worker.bgw_type, BGW_MAXLEN, "cd2sync sync worker");
	worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(seg));
	worker.bgw_notify_pid = MyProcPid;

	old = MemoryContextSwitchTo(handle_cxt);
	registered = RegisterDynamicBackgroundWorker(&worker, &handle);
	MemoryContextSwitchTo(old);
	if (!registered)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start a cd2sync sync worker"),
				 errhint("Raise max_worker_processes, or wait for running workers to finish.")));

	PG_TRY();
	{
		pid_t pid;

		if (WaitForBackgroundWorkerStartup(handle, &pid) != BGWH_STARTED)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
					 errmsg("cd2sync sync worker did not start"), errhint("See the server log.")));
		while (pg_atomic_read_u32(&req->attached) == 0)
		{
			if (GetBackgroundWorkerPid(handle, &pid) == BGWH_STOPPED)
				ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_RESOURCES),
								errmsg("cd2sync sync worker exited before it took its request"),
								errhint("See the server log.")));
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10,
							 PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_CATCH();
	{
		TerminateBackgroundWorker(handle);
		PG_RE_THROW();
	}
	PG_END_TRY();
	dsm_detach(seg);
	return handle;
}

/*
 * In the worker: copies the request, connects to the database as the
 * extension's owner, lets the session go on, and takes on its settings.
 * The result lives in TopMemoryContext.
 */
SyncArgs *
cd2_take_request(Datum main_arg)
{
	dsm_segment *seg;
	SyncRequest *req;
	SyncArgs *args = MemoryContextAllocZero(TopMemoryContext, sizeof(SyncArgs));
	char *settings;
	char *p;

	seg = dsm_attach(DatumGetUInt32(main_arg));
	if (seg == NULL)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("cd2sync worker could not map its request")));
	req = (SyncRequest *) dsm_segment_address(seg);

	p = MemoryContextAlloc(TopMemoryContext, req->len);
	memcpy(p, req->data, req->len);
	args->instance = p;
	p += strlen(p) + 1;
	settings = p;
	p += strlen(p) + 1;
	if (req->tables_given)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		for (int i = 0; i < req->ntables; i++)
		{
			args->tables = lappend(args->tables, p);
			p += strlen(p) + 1;
		}
		MemoryContextSwitchTo(old);
	}
	args->run_id = req->run_id;
	args->full = req->full;
	args->trigger = MemoryContextStrdup(TopMemoryContext, req->trigger);

	BackgroundWorkerInitializeConnectionByOid(req->dboid, req->useroid, 0);
	pg_atomic_write_u32(&req->attached, 1);
	dsm_detach(seg);

	pgstat_report_appname(psprintf("cd2sync %s", args->instance));
	cd2_restore_settings(settings);
	SetConfigOption("TimeZone", "UTC", PGC_SUSET, PGC_S_SESSION);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION);
	/* what it writes is written for READ COMMITTED, whatever the database's default */
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_SESSION);
	return args;
}
