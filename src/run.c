/*-------------------------------------------------------------------------
 *
 * run.c
 *	  The sync worker: one dynamic background worker per run, syncing the
 *	  tables of one instance as a pipeline of table syncs (table_sync.c).
 *
 * A run holds an advisory lock on its instance for its whole length, so two
 * runs of one instance never interleave: the second waits. It starts its
 * tables' query jobs as fast as cd2sync.job_rate and
 * cd2sync.max_jobs_in_flight allow, asks the running ones how they do, and
 * loads whichever has finished, one table at a time, while the others run
 * upstream. A table that fails is recorded and the run goes on.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "http.h"
#include "launch.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "table_sync.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

/* Says which jobs the pipeline waits for */
static void
report_waiting(RunContext *rc, List *active, List *pending)
{
	StringInfoData names;
	ListCell *lc;

	if (list_length(active) == 1)
	{
		TableSync *ts = (TableSync *) linitial(active);

		if (ts->step == STEP_POLL)
			report(rc, ts, "waiting for query job %s", ts->job->id);
		else
			report(rc, ts, "waiting to start a query job under cd2sync.job_rate");
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
 * Syncs the tables as a pipeline. Each turn: admit tables while the limits
 * allow (their first steps start their jobs), then run the next step of
 * every table sync that is ready, up to the first that ends (so that more
 * jobs start before the next load); sleep when nothing was ready.
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
			/* BEGIN, then START_JOB */
			if (table_sync_step(rc, ts) && table_sync_step(rc, ts))
				active = lappend(active, ts);
			else
				MemoryContextDelete(ts->cxt);
			progressed = true;
		}

		foreach (lc, active)
		{
			TableSync *ts = (TableSync *) lfirst(lc);

			if (!table_sync_ready(rc, ts, &wait_ms))
				continue;
			progressed = true;
			if (!table_sync_step(rc, ts))
			{
				active = foreach_delete_current(active, lc);
				MemoryContextDelete(ts->cxt);
				break;
			}
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
	bool got;

	catalog_begin();
	got = catalog_lock_instance(rc->instance->name, false);
	catalog_commit();
	if (got)
		return;
	report(rc, NULL, "waiting for the running sync of this instance to finish");
	catalog_begin();
	(void) catalog_lock_instance(rc->instance->name, true);
	catalog_commit();
}

/*
 * Brings the instance's rows up to the merge map when a refresh in another
 * instance's sync had to leave them (this run held the instance's lock). A
 * failure is logged: the next run, or the next refresh, does it again.
 */
static void
resolve_due(RunContext *rc)
{
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		catalog_begin();
		catalog_resolve_due(rc->instance->name);
		catalog_commit();
	}
	PG_CATCH();
	{
		ErrorData *edata = catalog_abort_keeping_error(cxt);

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
	catalog_begin();
	catalog_close_stale_runs(rc->instance->name, rc->run_id);
	catalog_commit();
	resolve_due(rc);
}

/*
 * The tables this run syncs: asked for, else configured, else every canvas
 * table; "ns.*" stands for every table the API lists in ns. A namespace
 * the API refuses to list (a credential without access to it: 403, 404)
 * fails its own entries, recorded as such, and the run goes on with the
 * others; any other failure to list fails the run.
 */
static List *
tables_to_sync(RunContext *rc, List *asked)
{
	List *configured = rc->instance->tables;
	List *listed_ns = NIL, *listed = NIL, *failed_ns = NIL, *failed_error = NIL, *failed_code = NIL;
	List *tables = NIL;
	List *needed;
	ListCell *lc;

	catalog_begin();
	needed = catalog_listings_needed(configured, asked);
	catalog_commit();
	/* (the API's listings, which retries may make long, outside a transaction) */
	foreach (lc, needed)
	{
		char *ns = (char *) lfirst(lc);
		DapError err = { 0 };
		List *names;

		report(rc, NULL, "listing the tables of namespace %s", ns);
		names = dap_list_tables(rc->client, ns, &err);
		if (err.message == NULL)
		{
			ListCell *lc2;

			foreach (lc2, names)
			{
				listed_ns = lappend(listed_ns, ns);
				listed = lappend(listed, lfirst(lc2));
			}
		}
		else if (err.status == 403 || err.status == 404)
		{
			ereport(LOG, (errmsg("cd2sync %s: %s", rc->instance->name, err.message)));
			failed_ns = lappend(failed_ns, ns);
			failed_error = lappend(failed_error, err.message);
			failed_code = lappend(failed_code, pstrdup(dap_sqlstate(&err)));
		}
		else
			dap_raise(&err);
	}
	catalog_begin();
	foreach (lc, catalog_tables_to_sync(configured, asked, listed_ns, listed, failed_ns,
										failed_error, failed_code))
	{
		TableToSync *t = (TableToSync *) lfirst(lc);

		if (t->error)
		{
			TableRun tr = { .run_id = rc->run_id,
							.instance = rc->instance->name,
							.table = t->table,
							.started = GetCurrentTimestamp() };

			catalog_log_start(&tr);
			catalog_log_failure(&tr, t->error, t->error_code);
		}
		else
			tables = lappend(tables, t->table);
	}
	catalog_commit();
	return tables;
}

static void
run_sync(SyncArgs *args)
{
	RunContext rc = { 0 };
	List *tables;

	rc.cxt = AllocSetContextCreate(TopMemoryContext, "cd2sync run", ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(rc.cxt);
	rc.run_id = args->run_id;
	rc.full = args->full;
	rc.format = decode_parse_format(cd2_format);
	progress_attach(args->run_id, args->instance);

	catalog_begin();
	catalog_run_start(args->run_id, args->instance, args->tables, args->full, args->trigger);
	rc.instance = catalog_load_instance(args->instance);
	catalog_commit();

	PG_TRY();
	{
		InstanceConfig *waited;

		lock_instance(&rc);
		/*
		 * The configuration may have changed while we waited: the client is
		 * made from it as it is now. (An api_url changed with its
		 * client_secret is sent neither the old secret nor a token the old
		 * one got: the stored secret goes only where it was given for.)
		 */
		waited = rc.instance;
		catalog_begin();
		rc.instance = catalog_load_instance(args->instance);
		catalog_commit();
		if (waited->client_secret)
			explicit_bzero(waited->client_secret, strlen(waited->client_secret));
		rc.client = dap_client_create(rc.instance->api_url, rc.instance->client_id,
									  rc.instance->client_secret);
		close_stale_runs(&rc);
		tables = tables_to_sync(&rc, args->tables);
	}
	PG_CATCH();
	{
		ErrorData *edata = catalog_abort_keeping_error(rc.cxt);

		ereport(LOG, (errmsg("cd2sync %s: run failed: %s", args->instance, edata->message)));
		catalog_begin();
		catalog_run_finish(args->run_id, edata->message, unpack_sql_state(edata->sqlerrcode));
		catalog_commit();
		return;
	}
	PG_END_TRY();

	run_pipeline(&rc, tables);
	resolve_due(&rc);

	catalog_begin();
	catalog_run_finish(args->run_id, NULL, NULL);
	catalog_commit();
	pgstat_report_activity(STATE_IDLE, NULL);
}

void
cd2_worker_main(Datum main_arg)
{
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	CurrentResourceOwner = ResourceOwnerCreate(NULL, "cd2sync worker");

	run_sync(cd2_take_request(main_arg));
	proc_exit(0);
}
