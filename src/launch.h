/*-------------------------------------------------------------------------
 *
 * launch.h
 *	  Starting a sync worker: the request a session hands it, and the
 *	  worker's side of taking it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_LAUNCH_H
#define CD2SYNC_LAUNCH_H

#include "nodes/pg_list.h"

/* What a sync worker is asked to do */
typedef struct SyncArgs
{
	int64 run_id;
	char *instance;
	List *tables; /* char *; NIL: the instance's tables */
	bool full;
	char *trigger; /* manual, schedule */
} SyncArgs;

struct BackgroundWorkerHandle;
extern struct BackgroundWorkerHandle *cd2_launch_worker(const char *instance, List *tables,
														bool full, const char *trigger,
														int64 *run_id, MemoryContext handle_cxt);
extern SyncArgs *cd2_take_request(Datum main_arg);

#endif /* CD2SYNC_LAUNCH_H */
