/*-------------------------------------------------------------------------
 *
 * table_sync.h
 *	  One table's sync inside a run, as a state machine the run's pipeline
 *	  advances one step at a time; and the run's context it needs.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_TABLE_SYNC_H
#define CD2SYNC_TABLE_SYNC_H

#include "catalog.h"
#include "dap_client.h"
#include "decode.h"
#include "progress.h"

/* The run a table sync belongs to */
typedef struct RunContext
{
	int64 run_id;
	bool full;
	InstanceConfig *instance;
	DapClient *client;
	RecordFormat format; /* asked of the API; jsonl once another was refused */
	MemoryContext cxt;
	List *job_starts; /* TimestampTz * of the jobs started in the last minute */
	Progress progress;
	struct TableSync *loading; /* the table sync whose objects are being decoded */
} RunContext;

/*
 * The steps of a table sync (src/README.md draws them). No step waits for
 * a job: a step that needs one goes to START_JOB and then POLL, which the
 * pipeline takes when the job is due to be asked again.
 */
typedef enum SyncStep
{
	STEP_BEGIN,     /* read the table's state, record the start */
	STEP_START_JOB, /* start the query job set up (when cd2sync.job_rate allows) */
	STEP_POLL,      /* the job runs upstream: ask how it does */
	STEP_SCHEMA,    /* the first job has finished: a new schema version makes or alters the table */
	STEP_URLS,      /* a job has finished: its objects' URLs (a job gone is started again) */
	STEP_CATCHUP,   /* a deduplicated snapshot older than the watermark: the next incremental */
	STEP_LOAD,      /* one transaction: download, apply, hooks, watermark, sync log */
	STEP_DONE
} SyncStep;

/* What the job being started or polled is for */
typedef enum JobRole
{
	JOB_MAIN,   /* the table's snapshot or incremental */
	JOB_CATCHUP /* an incremental chained after an old snapshot */
} JobRole;

typedef struct TableSync
{
	TableRun *tr;      /* what the sync log records */
	MemoryContext cxt; /* everything of this table sync */
	SyncStep step;
	TableState st;
	TimestampTz started;   /* when its first job was started */
	TimestampTz jobs_done; /* when its last job finished */

	/* the job being started or polled */
	JobRole role;
	bool job_snapshot; /* a snapshot, else an incremental from job_since */
	const char *job_since;
	bool job_restarted; /* started again after it was gone (once) */
	DapJob *job;
	TimestampTz job_started;
	TimestampTz next_poll;
	int poll_delay;

	/* what the load applies */
	bool schema_checked;
	char *schema_doc;  /* the schema the SCHEMA step made the table for */
	bool new_table;    /* the table is new: loaded apart, then put in place */
	bool parts_loaded; /* ... and its snapshot's objects went in (load_parts) */
	bool parts_failed; /* ... but not all: it is emptied and loaded the usual way */
	uint64 parts_records;
	bool snapshot; /* the main job is a snapshot */
	DapJob *main;
	List *main_urls;
	List *catchups; /* (DapJob *, urls) pairs applied after main */
	const char *catchup_since;
	int catchup_jobs;

	/* progress of the load */
	int objects_total;
	int64 decoded;
	int64 records;
} TableSync;

extern TableSync *table_sync_new(RunContext *rc, const char *table);
extern bool table_sync_ready(RunContext *rc, TableSync *ts, long *wait_ms);
extern bool table_sync_step(RunContext *rc, TableSync *ts);
extern long job_budget_wait_ms(RunContext *rc);
extern void report(RunContext *rc, TableSync *ts, const char *fmt, ...) pg_attribute_printf(3, 4);

#endif /* CD2SYNC_TABLE_SYNC_H */
