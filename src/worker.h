/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The request a session hands to a sync worker, in a DSM segment.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_WORKER_H
#define CD2SYNC_WORKER_H

#include "nodes/pg_list.h"
#include "port/atomics.h"

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

/*
 * In a PG_CATCH of a long-lived worker: the error, copied into cxt, after
 * the transaction is aborted and the error state flushed (worker.c).
 */
struct ErrorData;
extern struct ErrorData *cd2_abort_keeping_error(MemoryContext cxt);

struct BackgroundWorkerHandle;
extern struct BackgroundWorkerHandle *cd2_launch_worker(const char *instance, List *tables,
														bool full, const char *trigger,
														int64 *run_id);

#endif /* CD2SYNC_WORKER_H */
