/*-------------------------------------------------------------------------
 *
 * progress.h
 *	  What a sync worker is doing, published in shared memory for
 *	  cd2sync.progress (and as a line in pg_stat_activity for people).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_PROGRESS_H
#define CD2SYNC_PROGRESS_H

#define PROGRESS_TABLE_LEN 128
#define PROGRESS_PHASE_LEN 160

/* A worker's progress: its own copy, published whole */
typedef struct Progress
{
	char table[PROGRESS_TABLE_LEN]; /* "": the run as a whole */
	char phase[PROGRESS_PHASE_LEN];
	int objects_done; /* of the table being loaded */
	int objects_total;
	int64 bytes_downloaded;
	int64 bytes_decoded;
	int64 records;
} Progress;

extern void progress_request_shmem(void);
extern void progress_attach(int64 run_id, const char *instance);
extern void progress_publish(const Progress *p);

#endif /* CD2SYNC_PROGRESS_H */
