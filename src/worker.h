/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  The request a session hands to a sync worker, in a DSM segment.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_WORKER_H
#define CD2SYNC_WORKER_H

#include "port/atomics.h"

typedef struct SyncRequest
{
	Oid dboid;
	Oid useroid; /* the extension's owner */
	int64 run_id;
	bool full;
	bool tables_given; /* sync only the listed tables */
	int ntables;
	pg_atomic_uint32 attached; /* the worker has copied the request */
	Size len;                  /* of data */
	/* data: instance \0 settings \0 table \0 table \0 ... */
	char data[FLEXIBLE_ARRAY_MEMBER];
} SyncRequest;

#define CD2_LOCK_CLASS 52517 /* advisory lock class of instance syncs */

#endif /* CD2SYNC_WORKER_H */
