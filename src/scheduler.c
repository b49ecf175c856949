/*-------------------------------------------------------------------------
 *
 * scheduler.c
 *	  The scheduler: a static background worker (shared_preload_libraries)
 *	  that starts a sync worker for each instance when its schedule is due.
 *
 * It works in the database cd2sync.database, keeps at most
 * cd2sync.max_workers syncs running at once, reloads its settings on
 * SIGHUP and stops on SIGTERM. It holds no state that matters across
 * restarts: when an instance is due comes from cd2sync.schedules (the last
 * run's start plus the schedule), and every sync resumes from the committed
 * watermarks. The instances it started are remembered only to not start
 * one twice.
 *
 * At each look it also sweeps the change feeds: deletes the changes every
 * feed has acknowledged (an acknowledgement deletes nothing itself, so that
 * a consumer's open transaction holds nothing a sync waits for), a batch a
 * transaction, for at most a second.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

/* always needed for a bgworker */
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"

/* used by this worker */
#include "access/xact.h"
#include "commands/extension.h"
#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "catalog.h"
#include "launch.h"

typedef struct ScheduledSync
{
	char instance[NAMEDATALEN];
	BackgroundWorkerHandle *handle;
} ScheduledSync;

static List *started = NIL; /* ScheduledSync *, in TopMemoryContext */

/* Forgets the syncs that have ended */
static void
reap_workers(void)
{
	ListCell *lc;

	foreach (lc, started)
	{
		ScheduledSync *s = (ScheduledSync *) lfirst(lc);
		pid_t pid;

		if (GetBackgroundWorkerPid(s->handle, &pid) == BGWH_STOPPED)
		{
			started = foreach_delete_current(started, lc);
			pfree(s->handle);
			pfree(s);
		}
	}
}

static bool
is_started(const char *instance)
{
	ListCell *lc;

	foreach (lc, started)
	{
		if (strcmp(((ScheduledSync *) lfirst(lc))->instance, instance) == 0)
			return true;
	}
	return false;
}

/*
 * Whether the extension is there, its SQL objects at this library's
 * version (else they wait for ALTER EXTENSION UPDATE: nothing is done until
 * then).
 */
static bool
extension_ready(void)
{
	static bool version_warned = false;

	if (!OidIsValid(get_extension_oid("cd2sync", true)))
		return false; /* not created (yet) in this database */

	if (!catalog_sql_current())
	{
		if (!version_warned)
			ereport(LOG, (errmsg("cd2sync scheduler: the extension's SQL objects are not at "
								 "version %s; no sync is started until ALTER EXTENSION "
								 "cd2sync UPDATE",
								 CD2SYNC_VERSION)));
		version_warned = true;
		return false;
	}
	version_warned = false;
	return true;
}

/*
 * Starts the syncs that are due, as worker slots allow; returns how long to
 * sleep before the next one is due.
 */
static long
start_due_syncs(void)
{
	long sleep_ms = cd2_scheduler_naptime;
	ListCell *lc;

	foreach (lc, catalog_schedules_due())
	{
		ScheduleDue *d = lfirst(lc);
		char *instance = d->instance;
		int64 due_in = d->due_in_ms;

		if (is_started(instance))
			continue;
		if (due_in > 0)
		{
			sleep_ms = Min(sleep_ms, (long) due_in);
			continue;
		}
		if (list_length(started) >= cd2_max_workers)
			break; /* woken again when a sync ends */
		{
			/* (what the launch reads and writes is the loop's; only what
			 * stays with the scheduler goes to TopMemoryContext) */
			int64 run_id;
			BackgroundWorkerHandle *handle =
				cd2_launch_worker(instance, NIL, false, "schedule", &run_id, TopMemoryContext);
			ScheduledSync *s = MemoryContextAllocZero(TopMemoryContext, sizeof(ScheduledSync));
			MemoryContext old;

			strlcpy(s->instance, instance, NAMEDATALEN);
			s->handle = handle;
			old = MemoryContextSwitchTo(TopMemoryContext);
			started = lappend(started, s);
			MemoryContextSwitchTo(old);
			ereport(LOG, (errmsg("cd2sync scheduler: started run %lld of instance \"%s\"",
								 (long long) run_id, instance)));
		}
	}
	return sleep_ms;
}

/*
 * Sweeps the change feeds (cd2sync._feed_sweep), a transaction a batch,
 * while a batch deletes changes, for at most a second.
 */
static void
sweep_feeds(void)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
	int64 gone;

	pgstat_report_activity(STATE_RUNNING, "cd2sync scheduler: sweeping change feeds");
	do
	{
		CHECK_FOR_INTERRUPTS();
		catalog_begin();
		gone = catalog_feed_sweep();
		catalog_commit();
	} while (gone > 0 && !ShutdownRequestPending && GetCurrentTimestamp() < until);
}

/*
 * Brings idle instances marked due up to the merge map (a refresh that
 * could not take one's lock marked it; its own next run would do it, but
 * that may be a day away). One transaction: an instance a sync holds is
 * passed over, marked still.
 */
static void
resolve_idle_due(void)
{
	pgstat_report_activity(STATE_RUNNING,
						   "cd2sync scheduler: bringing instances up to the merge map");
	catalog_begin();
	(void) catalog_resolve_idle_due();
	catalog_commit();
}

void
cd2_scheduler_main(Datum main_arg)
{
	char *database;
	MemoryContext loop_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	database = pstrdup(cd2_database);
	BackgroundWorkerInitializeConnection(database, NULL, 0);
	pgstat_report_appname("cd2sync scheduler");
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION);
	/* a sweep deletes only in READ COMMITTED, whatever the database's default */
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_SESSION);
	ereport(LOG, (errmsg("cd2sync scheduler started in database \"%s\"", database)));

	/* what one look at the schedules reads lives until the next look */
	loop_cxt =
		AllocSetContextCreate(TopMemoryContext, "cd2sync scheduler loop", ALLOCSET_DEFAULT_SIZES);
	while (!ShutdownRequestPending)
	{
		volatile long sleep_ms = cd2_scheduler_naptime;
		MemoryContext cxt;

		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		cxt = loop_cxt;

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (strcmp(database, cd2_database) != 0)
			{
				ereport(LOG, (errmsg("cd2sync scheduler: cd2sync.database changed, restarting")));
				proc_exit(1); /* the postmaster starts it again, in the new database */
			}
		}

		reap_workers();
		PG_TRY();
		{
			bool ready;

			pgstat_report_activity(STATE_RUNNING, "cd2sync scheduler: starting due syncs");
			catalog_begin();
			ready = extension_ready();
			if (ready)
				sleep_ms = start_due_syncs();
			catalog_commit();
			if (ready)
			{
				sweep_feeds();
				resolve_idle_due();
			}
		}
		PG_CATCH();
		{
			ErrorData *edata = catalog_abort_keeping_error(cxt);

			ereport(LOG, (errmsg("cd2sync scheduler: %s", edata->message)));
			FreeErrorData(edata);
		}
		PG_END_TRY();
		MemoryContextSwitchTo(cxt);
		pgstat_report_activity(STATE_IDLE, NULL);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(sleep_ms, 10), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	ereport(LOG, (errmsg("cd2sync scheduler stopping")));
	proc_exit(0);
}

/* Registers the scheduler; called from _PG_init while preloading */
void
cd2_register_scheduler(void)
{
	BackgroundWorker worker = { 0 };

	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "cd2sync");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "cd2_scheduler_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "cd2sync scheduler");
	snprintf(worker.bgw_type, BGW_MAXLEN, "cd2sync scheduler");
	RegisterBackgroundWorker(&worker);
}
