/*-------------------------------------------------------------------------
 *
 * progress.c
 *	  Sync workers' progress in shared memory, and cd2sync._progress()
 *	  that reads it (behind the view cd2sync.progress).
 *
 * One slot per possible background worker (max_worker_processes), each
 * under a spinlock: a worker claims a free slot when its run starts,
 * overwrites it whole at each step and every few megabytes, and frees it
 * when it exits. The area is made on first use under AddinShmemInitLock,
 * as pg_prewarm's autoprewarm does: when the library is preloaded its size
 * is requested at startup; otherwise it comes out of the slack PostgreSQL
 * keeps in its shared memory (a few kilobytes are needed). After a crash
 * the postmaster rebuilds shared memory, and the area starts empty.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "progress.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"

typedef struct ProgressSlot
{
	slock_t mutex;
	int pid; /* 0: free */
	int64 run_id;
	char instance[NAMEDATALEN];
	Progress p;
} ProgressSlot;

typedef struct ProgressArea
{
	int nslots;
	ProgressSlot slots[FLEXIBLE_ARRAY_MEMBER];
} ProgressArea;

static ProgressArea *area = NULL;
static ProgressSlot *my_slot = NULL;
static char my_instance[NAMEDATALEN];
static shmem_request_hook_type prev_shmem_request_hook = NULL;

static Size
area_size(void)
{
	return add_size(offsetof(ProgressArea, slots),
					mul_size(sizeof(ProgressSlot), Max(max_worker_processes, 1)));
}

static void
request_shmem(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(area_size());
}

/* While preloading: reserve the area's size at startup */
void
progress_request_shmem(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = request_shmem;
}

/* The shared area, found or made */
static ProgressArea *
progress_area(void)
{
	bool found;

	if (area)
		return area;
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	area = ShmemInitStruct("cd2sync progress", area_size(), &found);
	if (!found)
	{
		area->nslots = Max(max_worker_processes, 1);
		for (int i = 0; i < area->nslots; i++)
		{
			SpinLockInit(&area->slots[i].mutex);
			area->slots[i].pid = 0;
		}
	}
	LWLockRelease(AddinShmemInitLock);
	return area;
}

static void
release_slot(int code, Datum arg)
{
	if (my_slot)
	{
		SpinLockAcquire(&my_slot->mutex);
		my_slot->pid = 0;
		SpinLockRelease(&my_slot->mutex);
		my_slot = NULL;
	}
}

/*
 * Claims a slot for this worker's run, freed when the process exits. With
 * every slot taken (cannot happen: one per worker process) the run is
 * simply not shown.
 */
void
progress_attach(int64 run_id, const char *instance)
{
	ProgressArea *volatile a = NULL;
	MemoryContext cxt = CurrentMemoryContext;

	strlcpy(my_instance, instance, sizeof(my_instance));
	/* (without preloading, the server may have no shared memory left for it) */
	PG_TRY();
	{
		a = progress_area();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		LWLockReleaseAll(); /* (AddinShmemInitLock) */
		FlushErrorState();
		ereport(LOG,
				(errmsg("cd2sync: no shared memory for cd2sync.progress; this run is not shown"),
				 errhint("Preload cd2sync (shared_preload_libraries).")));
	}
	PG_END_TRY();
	if (a == NULL)
		return;

	for (int i = 0; i < a->nslots && my_slot == NULL; i++)
	{
		ProgressSlot *s = &a->slots[i];

		SpinLockAcquire(&s->mutex);
		if (s->pid == 0)
		{
			s->pid = MyProcPid;
			s->run_id = run_id;
			strlcpy(s->instance, instance, sizeof(s->instance));
			memset(&s->p, 0, sizeof(s->p));
			my_slot = s;
		}
		SpinLockRelease(&s->mutex);
	}
	if (my_slot)
		before_shmem_exit(release_slot, (Datum) 0);
}

/*
 * Publishes the worker's progress: whole into its slot, and as a line in
 * pg_stat_activity ("cd2sync <instance>.<table>: <phase> [objects=1/4
 * downloaded=... decoded=... records=...]"). Never a secret.
 */
void
progress_publish(const Progress *p)
{
	char *line;

	if (my_slot)
	{
		SpinLockAcquire(&my_slot->mutex);
		memcpy(&my_slot->p, p, sizeof(Progress));
		SpinLockRelease(&my_slot->mutex);
	}
	if (p->table[0])
		line = psprintf("cd2sync %s.%s: %s [objects=%d/%d downloaded=" INT64_FORMAT
						" decoded=" INT64_FORMAT " records=" INT64_FORMAT "]",
						my_instance, p->table, p->phase, p->objects_done, p->objects_total,
						p->bytes_downloaded, p->bytes_decoded, p->records);
	else
		line = psprintf("cd2sync %s: %s", my_instance, p->phase);
	pgstat_report_activity(STATE_RUNNING, line);
	pfree(line);
}

PG_FUNCTION_INFO_V1(cd2_progress);

/*
 * cd2sync._progress(): one row per running sync worker: pid, run_id,
 * instance, table_name, phase, objects_done, objects_total,
 * bytes_downloaded, bytes_decoded, records (table and counts NULL while
 * the run is not at a table).
 */
Datum
cd2_progress(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ProgressArea *a = progress_area();

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < a->nslots; i++)
	{
		ProgressSlot s;
		Datum v[10];
		bool n[10] = { 0 };

		SpinLockAcquire(&a->slots[i].mutex);
		memcpy(&s, &a->slots[i], sizeof(s));
		SpinLockRelease(&a->slots[i].mutex);
		if (s.pid == 0)
			continue;
		v[0] = Int32GetDatum(s.pid);
		v[1] = Int64GetDatum(s.run_id);
		v[2] = CStringGetTextDatum(s.instance);
		v[3] = CStringGetTextDatum(s.p.table);
		v[4] = CStringGetTextDatum(s.p.phase);
		v[5] = Int32GetDatum(s.p.objects_done);
		v[6] = Int32GetDatum(s.p.objects_total);
		v[7] = Int64GetDatum(s.p.bytes_downloaded);
		v[8] = Int64GetDatum(s.p.bytes_decoded);
		v[9] = Int64GetDatum(s.p.records);
		if (s.p.table[0] == '\0')
			for (int c = 3; c < 10; c++)
				n[c] = (c != 4);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
	}
	return (Datum) 0;
}
