/*-------------------------------------------------------------------------
 *
 * load.h
 *	  A new table's snapshot loaded by several processes at once: the sync
 *	  worker and load workers take its objects in turn and COPY them into
 *	  the table it is loaded in apart.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_LOAD_H
#define CD2SYNC_LOAD_H

#include "dap_client.h"
#include "decode.h"
#include "nodes/pg_list.h"

/* What a parallel load did */
typedef struct LoadResult
{
	uint64 records;
	int64 bytes; /* compressed, downloaded */
	int objects;
	int workers; /* load workers that took part (besides the sync worker) */
	/* when it failed: */
	int sqlerrcode;
	char *error;
} LoadResult;

extern int load_workers_wanted(int objects);
extern bool load_parts(const char *instance, List *object_ids, List *urls, RecordFormat format,
					   Oid relid, DapClient *client, LoadResult *result);

#endif /* CD2SYNC_LOAD_H */
