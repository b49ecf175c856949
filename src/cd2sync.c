/*-------------------------------------------------------------------------
 *
 * cd2sync.c
 *	  Module entry point: defines the settings and, when preloaded, reserves
 *	  the progress area and registers the scheduler.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "progress.h"

PG_MODULE_MAGIC;

void _PG_init(void);

void
_PG_init(void)
{
	cd2_define_settings();

	if (process_shared_preload_libraries_in_progress)
	{
		/* (else the few kB of cd2sync.progress come out of the server's slack) */
		progress_request_shmem();
		/* the scheduler runs only when preloaded; cd2_sync_now works without it */
		if (!IsBinaryUpgrade)
			cd2_register_scheduler();
	}
}
