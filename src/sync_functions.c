/*-------------------------------------------------------------------------
 *
 * sync_functions.c
 *	  The SQL functions that start syncs: cd2_sync_now (start a sync worker
 *	  and wait for it), cd2_sync_start (start one and return its run id), and
 *	  cd2sync._remote_tables (the API's table list, to check configuration).
 *
 * The session hands its request to the worker in a DSM segment and waits
 * until the worker has copied it. The worker connects as the extension's
 * owner: it is the one role that can read the secrets and own the synced
 * schemas, whoever asked for the sync. Results come back through
 * cd2sync.sync_log, read with a fresh snapshot so that they are seen from
 * any isolation level.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"
#include "catalog.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "dap_client.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "worker.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "utils/fmgroids.h"

PG_FUNCTION_INFO_V1(cd2_sync_now);
PG_FUNCTION_INFO_V1(cd2_sync_start);
PG_FUNCTION_INFO_V1(cd2_remote_tables);

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

/* The requested tables as C strings; checks them against the configuration */
static List *
requested_tables(const char *instance, ArrayType *arr)
{
	Datum *elems;
	bool *nulls;
	int n;
	List *tables = NIL;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n == 0)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("tables must name at least one table, or be NULL for all")));
	for (int i = 0; i < n; i++)
	{
		char *t;
		const char *args[2];

		if (nulls[i])
			ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
							errmsg("tables must not contain NULL")));
		t = TextDatumGetCString(elems[i]);
		if (strspn(t, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") !=
				strlen(t) ||
			strlen(t) == 0 || strlen(t) > 63)
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("invalid table name \"%s\"", t)));
		args[0] = instance;
		args[1] = t;
		/* _check_instance: a row, or its error if the instance was just dropped */
		if (!catalog_bool("SELECT tables IS NULL OR $2 = ANY (tables) "
						  "  FROM cd2sync._check_instance($1)",
						  2, args))
			ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
							errmsg("table \"%s\" is not configured for cd2sync instance \"%s\"", t,
								   instance),
							errhint("Add it with cd2_alter_instance(%s, tables => ...).",
									quote_literal_cstr(instance))));
		if (!list_member(tables, makeString(t)))
			tables = lappend(tables, makeString(t));
	}
	return tables;
}

/*
 * The arguments of cd2_sync_now/cd2_sync_start, checked; then a worker.
 */
static BackgroundWorkerHandle *
launch_sync(FunctionCallInfo fcinfo, int64 *run_id)
{
	char *instance;
	List *tables = NIL;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						errmsg("instance name must not be NULL")));
	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("full must be true or false")));
	/* a standby replays the primary's syncs; once promoted, its scheduler syncs */
	if (RecoveryInProgress())
		ereport(ERROR, (errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
						errmsg("cd2sync cannot sync on a standby"),
						errhint("Sync on the primary; this server replays its data.")));
	instance = text_to_cstring(PG_GETARG_TEXT_PP(0));
	(void) catalog_run_sql("SELECT cd2sync._check_instance($1)", 1, (const char **) &instance);
	if (!PG_ARGISNULL(1))
		tables = requested_tables(instance, PG_GETARG_ARRAYTYPE_P(1));
	return cd2_launch_worker(instance, tables, PG_GETARG_BOOL(2), "manual", run_id);
}

/*
 * Starts a sync worker for an instance and waits until it has taken its
 * request. tables: String nodes (NIL: the instance's tables). Returns the
 * worker's handle, allocated in CurrentMemoryContext; *run_id is the run's
 * id. Needs a transaction.
 */
BackgroundWorkerHandle *
cd2_launch_worker(const char *instance, List *tables, bool full, const char *trigger, int64 *run_id)
{
	char *settings;
	Size len;
	dsm_segment *seg;
	SyncRequest *req;
	char *p;
	BackgroundWorker worker = { 0 };
	BackgroundWorkerHandle *handle;
	ListCell *lc;
	char *sql_version = catalog_run_sql("SELECT extversion FROM pg_catalog.pg_extension "
										" WHERE extname = 'cd2sync'",
										0, NULL);

	/* the worker calls SQL of this library's version: an older one lacks it */
	if (sql_version == NULL || strcmp(sql_version, CD2SYNC_VERSION) != 0)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("cd2sync's SQL objects are at version %s, its library at %s",
							   sql_version ? sql_version : "(none)", CD2SYNC_VERSION),
						errhint("Run ALTER EXTENSION cd2sync UPDATE.")));

	if (!catalog_int64s("SELECT nextval('cd2sync.run_id_seq')", 0, NULL, 1, run_id))
		elog(ERROR, "cd2sync could not take a run id");

	/* the request */
	settings = cd2_serialize_settings();
	len = strlen(instance) + 1 + strlen(settings) + 1;
	foreach (lc, tables)
		len += strlen(strVal(lfirst(lc))) + 1;
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
		strcpy(p, strVal(lfirst(lc)));
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

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
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
 * cd2_sync_now(name, tables, full): syncs in a worker and waits for it;
 * one row per table. Cancelling the caller stops the worker.
 */
Datum
cd2_sync_now(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int64 run_id;
	BackgroundWorkerHandle *handle;
	Oid types[1] = { INT8OID };
	Datum values[1];
	int rc;
	char *run_error;
	char *run_code;

	InitMaterializedSRF(fcinfo, 0);
	handle = launch_sync(fcinfo, &run_id);

	PG_TRY();
	{
		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		(void) WaitForBackgroundWorkerShutdown(handle);
		pgstat_report_wait_end();
	}
	PG_CATCH();
	{
		TerminateBackgroundWorker(handle);
		PG_RE_THROW();
	}
	PG_END_TRY();

	/* read what the worker committed, whatever this transaction's snapshot */
	values[0] = Int64GetDatum(run_id);
	PushActiveSnapshot(GetLatestSnapshot());
	SPI_connect();
	rc = SPI_execute_with_args("SELECT error, error_code FROM cd2sync.runs WHERE run_id = $1", 1,
							   types, values, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed == 0)
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

	rc = SPI_execute_with_args(
		"SELECT table_name, "
		"       CASE WHEN status = 'running' THEN 'failed' ELSE mode END, "
		"       rows_upserted, rows_deleted, coalesce(watermark, watermark_before), "
		"       coalesce(seconds, extract(epoch FROM clock_timestamp() - started_at)::float8), "
		"       CASE WHEN status = 'running' "
		"            THEN 'the sync worker exited before this table was done' ELSE error END "
		"  FROM cd2sync.sync_log WHERE run_id = $1 ORDER BY started_at, table_name",
		1, types, values, NULL, true, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read cd2sync.sync_log");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		Datum v[7];
		bool n[7];

		for (int c = 0; c < 7; c++)
			v[c] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, c + 1, &n[c]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
	}
	SPI_finish();
	PopActiveSnapshot();
	return (Datum) 0;
}

/* cd2_sync_start(name, tables, full): starts a sync; returns its run id */
Datum
cd2_sync_start(PG_FUNCTION_ARGS)
{
	int64 run_id;

	(void) launch_sync(fcinfo, &run_id);
	PG_RETURN_INT64(run_id);
}

/* cd2sync._remote_tables(api_url, client_id, client_secret): the API's tables */
Datum
cd2_remote_tables(PG_FUNCTION_ARGS)
{
	DapClient *c;
	List *tables;
	Datum *elems;
	ListCell *lc;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_NULL();
	c = dap_client_create(text_to_cstring(PG_GETARG_TEXT_PP(0)),
						  text_to_cstring(PG_GETARG_TEXT_PP(1)),
						  text_to_cstring(PG_GETARG_TEXT_PP(2)));
	tables = dap_list_tables(c);
	elems = palloc(sizeof(Datum) * Max(list_length(tables), 1));
	foreach (lc, tables)
		elems[foreach_current_index(lc)] = CStringGetTextDatum((char *) lfirst(lc));
	PG_RETURN_ARRAYTYPE_P(
		construct_array(elems, list_length(tables), TEXTOID, -1, false, TYPALIGN_INT));
}
