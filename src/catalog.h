/*-------------------------------------------------------------------------
 *
 * catalog.h
 *	  What cd2sync keeps in its tables: instances, table state (the
 *	  watermarks), runs and the sync log.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_CATALOG_H
#define CD2SYNC_CATALOG_H

#include "nodes/pg_list.h"
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
} TableState;

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

extern char *catalog_text_array(List *strings);
extern char *catalog_run_sql(const char *sql, int nargs, const char **args);
extern bool catalog_bool(const char *sql, int nargs, const char **args);
extern bool catalog_int64s(const char *sql, int nargs, const char **args, int n, int64 *out);
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

#endif /* CD2SYNC_CATALOG_H */
