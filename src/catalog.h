/*-------------------------------------------------------------------------
 *
 * catalog.h
 *	  The one C interface to SQL: what cd2sync keeps in its tables
 *	  (instances, table state with the watermarks, runs, the sync log), the
 *	  questions the sync asks of its target tables and the SQL stages it
 *	  calls (schema, staging, apply, hooks), and the workers' transactions.
 *	  Every result is typed.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_CATALOG_H
#define CD2SYNC_CATALOG_H

#include "access/tupdesc.h"
#include "nodes/pg_list.h"
#include "utils/tuplestore.h"
#include "utils/timestamp.h"

typedef struct InstanceConfig
{
	char *name;
	char *client_id;
	char *client_secret;
	char *api_url;
	char *target_schema;
	List *tables; /* configured tables; NIL: every table */
} InstanceConfig;

typedef struct TableState
{
	char *watermark_raw; /* NULL: never synced */
	int schema_version;  /* -1: none yet */
	bool table_exists;   /* the target table is there */
	bool snapshot_due;   /* a periodic full resync or a type change asks for one */
	char *namespace;     /* the CD2 namespace of the table ... */
	char *remote_name;   /* ... and its name there */
	char *target;        /* the instance's table, quoted and qualified */
} TableState;

/* A table a run syncs, or (error set) the tables of a namespace it could not list */
typedef struct TableToSync
{
	char *table;
	char *error;
	char *error_code;
} TableToSync;

/* One table sync, as the sync log records it */
typedef struct TableRun
{
	int64 run_id;
	const char *instance;
	const char *table;
	const char *mode; /* snapshot, incremental, unchanged, failed */
	int64 upserted;
	int64 deleted;
	int64 unchanged;
	int64 oversized;
	int objects;
	int64 bytes;
	char *job_id;
	int schema_version;
	char *watermark_before;
	char *watermark; /* raw, as the API gave it */
	TimestampTz started;
	double job_seconds;
	double load_seconds;
} TableRun;

/* An instance the scheduler may start: not running, with a schedule */
typedef struct ScheduleDue
{
	char *instance;
	int64 due_in_ms; /* 0: due now */
} ScheduleDue;

/* What an apply did (cd2sync._apply) */
typedef struct ApplyCounts
{
	int64 upserted;
	int64 deleted;
	int64 unchanged;
	int64 oversized;
} ApplyCounts;

/* the workers' transactions */
extern void catalog_begin(void);
extern void catalog_commit(void);
struct ErrorData;
extern struct ErrorData *catalog_abort_keeping_error(MemoryContext cxt);

/* the session that starts a sync, and the scheduler */
extern void catalog_check_instance(const char *instance);
extern List *catalog_check_tables(List *tables);
extern bool catalog_table_configured(const char *instance, const char *table);
extern char *catalog_sql_version(void);
extern bool catalog_sql_current(void);
extern int64 catalog_next_run_id(void);
extern void catalog_run_results(int64 run_id, Tuplestorestate *tupstore, TupleDesc desc);
extern List *catalog_schedules_due(void);
extern int64 catalog_feed_sweep(void);
extern int64 catalog_resolve_idle_due(void);

/* the run */
extern InstanceConfig *catalog_load_instance(const char *name);
extern void catalog_run_start(int64 run_id, const char *instance, List *tables, bool full,
							  const char *trigger);
extern void catalog_run_finish(int64 run_id, const char *error, const char *sqlstate);
extern void catalog_table_state(const char *instance, const char *target_schema, const char *table,
								TableState *st);
extern void catalog_log_start(TableRun *tr);
extern void catalog_log_success(TableRun *tr);
extern void catalog_log_failure(TableRun *tr, const char *error, const char *sqlstate);
extern void catalog_before_apply(TableRun *tr);
extern void catalog_after_apply(TableRun *tr);
extern bool catalog_lock_instance(const char *instance, bool wait);
extern void catalog_close_stale_runs(const char *instance, int64 run_id);
extern void catalog_resolve_due(const char *instance);
extern List *catalog_listings_needed(List *configured, List *asked);
extern List *catalog_tables_to_sync(List *configured, List *asked, List *listed_ns, List *listed,
									List *failed_ns, List *failed_error, List *failed_code);

/* the table sync's target table */
extern bool catalog_ensure_table(const char *instance, const char *target_schema, const char *table,
								 const char *schema_doc, int *version);
extern bool catalog_types_pending(const char *instance, const char *table);
extern Oid catalog_loading_rel(const char *target_schema, const char *table, char **name);
extern void catalog_finish_loading(const char *target_schema, const char *table,
								   const char *schema_doc);
extern void catalog_truncate(const char *target);
extern bool catalog_has_rows(const char *target);
extern Oid catalog_direct_target(const char *target);
extern void catalog_feed_load_begin(const char *target);
extern bool catalog_feed_captures(const char *target);
extern bool catalog_is_log(const char *target);
extern void catalog_log_upkeep(const char *instance, const char *table, const char *watermark,
							   const char *phase);
extern void catalog_create_staging(const char *target, bool typed);
extern void catalog_add_staging_column(const char *column);
extern void catalog_expand_jsonl(const char *target);
extern int64 catalog_apply_pending_types(const char *instance, const char *table,
										 const char *target);
extern void catalog_apply(const char *instance, const char *table, const char *target,
						  const char *mode, List *columns, bool typed, ApplyCounts *counts);

#endif /* CD2SYNC_CATALOG_H */
