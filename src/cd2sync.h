/*-------------------------------------------------------------------------
 *
 * cd2sync.h
 *	  Settings and declarations shared by every stage of cd2sync.
 *
 * Wording used throughout: an "instance" is one Canvas instance (one CD2
 * credential, one target schema); a "run" is one sync of an instance, made
 * of one "table sync" per CD2 table; a "job" is a DAP query job upstream.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_H
#define CD2SYNC_H

#include "postgres.h"

/* Settings (GUCs cd2sync.*), defined in settings.c */
extern char *cd2_database;
extern char *cd2_format;
extern int cd2_http_timeout;
extern int cd2_connect_timeout;
extern int cd2_http_retries;
extern int cd2_retry_base_delay;
extern int cd2_retry_max_delay;
extern int cd2_poll_interval;
extern int cd2_job_timeout;
extern char *cd2_ca_file;
extern char *cd2_proxy;
extern int cd2_max_line_length;
extern int cd2_max_workers;
extern int cd2_scheduler_naptime;
extern bool cd2_allow_insecure_http;
extern int cd2_job_rate;
extern bool cd2_direct_load;
extern bool cd2_gunzip_thread;
extern int cd2_max_jobs_in_flight;
extern int cd2_feed_max_pending;
extern int cd2_feed_max_age;
extern int cd2_load_workers;
extern bool cd2_prefault_buffers;

/*
 * The settings a sync worker inherits from the session that started it, as
 * "name=value\n" lines.
 */
extern void cd2_define_settings(void);
extern char *cd2_serialize_settings(void);
extern void cd2_restore_settings(const char *blob);

/* Entry points of the sync worker (run.c) and the scheduler (scheduler.c) */
extern PGDLLEXPORT void cd2_worker_main(Datum main_arg);
extern PGDLLEXPORT void cd2_scheduler_main(Datum main_arg);
extern PGDLLEXPORT void cd2_load_worker_main(Datum main_arg);
extern void cd2_register_scheduler(void);

#endif /* CD2SYNC_H */
