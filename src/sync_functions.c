/*-------------------------------------------------------------------------
 *
 * sync_functions.c
 *	  The SQL functions that start syncs: cd2_sync_now (start a sync worker
 *	  and wait for it), cd2_sync_start (start one and return its run id), and
 *	  cd2sync._remote_tables (the API's table list, to check configuration).
 *
 * Results come back through cd2sync.sync_log, read with a fresh snapshot
 * so that they are seen from any isolation level.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "access/xlog.h"
#include "catalog.h"
#include "catalog/pg_type.h"
#include "dap_client.h"
#include "fmgr.h"
#include "funcapi.h"
#include "launch.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "utils/array.h"
#include "utils/builtins.h"

PG_FUNCTION_INFO_V1(cd2_sync_now);
PG_FUNCTION_INFO_V1(cd2_sync_start);
PG_FUNCTION_INFO_V1(cd2_remote_tables);

/*
 * The requested tables as C strings, as _check_tables has them (once each;
 * "ns.*" for every table of a namespace), each configured for the instance.
 */
static List *
requested_tables(const char *instance, ArrayType *arr)
{
	Datum *elems;
	bool *nulls;
	int n;
	List *given = NIL;
	List *tables;
	ListCell *lc;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		if (nulls[i])
			ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
							errmsg("tables must not contain NULL")));
		given = lappend(given, TextDatumGetCString(elems[i]));
	}
	if (given == NIL)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("tables must name at least one table, or be NULL for every table")));
	tables = catalog_check_tables(given);
	foreach (lc, tables)
	{
		char *t = (char *) lfirst(lc);

		if (!catalog_table_configured(instance, t))
			ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
							errmsg("table \"%s\" is not configured for cd2sync instance \"%s\"", t,
								   instance),
							errhint("Add it with cd2_alter_instance(%s, tables => ...).",
									quote_literal_cstr(instance))));
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
	catalog_check_instance(instance);
	if (!PG_ARGISNULL(1))
		tables = requested_tables(instance, PG_GETARG_ARRAYTYPE_P(1));
	return cd2_launch_worker(instance, tables, PG_GETARG_BOOL(2), "manual", run_id,
							 CurrentMemoryContext);
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

	catalog_run_results(run_id, rsinfo->setResult, rsinfo->setDesc);
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

/* cd2sync._remote_tables(api_url, client_id, client_secret, namespace): the API's tables */
Datum
cd2_remote_tables(PG_FUNCTION_ARGS)
{
	DapClient *c;
	List *tables;
	Datum *elems;
	ListCell *lc;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		PG_RETURN_NULL();
	c = dap_client_create(text_to_cstring(PG_GETARG_TEXT_PP(0)),
						  text_to_cstring(PG_GETARG_TEXT_PP(1)),
						  text_to_cstring(PG_GETARG_TEXT_PP(2)));
	tables = dap_list_tables(c, text_to_cstring(PG_GETARG_TEXT_PP(3)), NULL);
	elems = palloc(sizeof(Datum) * Max(list_length(tables), 1));
	foreach (lc, tables)
		elems[foreach_current_index(lc)] = CStringGetTextDatum((char *) lfirst(lc));
	PG_RETURN_ARRAYTYPE_P(
		construct_array(elems, list_length(tables), TEXTOID, -1, false, TYPALIGN_INT));
}
