/*-------------------------------------------------------------------------
 *
 * dap_client.h
 *	  The DAP Query API client: authentication, tables, schemas, query
 *	  jobs and object URLs.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_DAP_CLIENT_H
#define CD2SYNC_DAP_CLIENT_H

#include "nodes/pg_list.h"
#include "utils/timestamp.h"

typedef struct DapClient
{
	char *api_url; /* without a trailing slash */
	char *client_id;
	char *client_secret;
	char *token;                /* current access token, or NULL */
	TimestampTz token_renew_at; /* log in again from then on */
	MemoryContext cxt;          /* where the token lives */
} DapClient;

/* An error the API answered with, for callers that act on its type */
typedef struct DapError
{
	long status;
	char *type;    /* error.type, e.g. "SnapshotRequired" */
	char *message; /* a complete message for the sync log */
} DapError;

typedef struct DapJob
{
	char *id;
	char *status; /* waiting, running, complete, failed */
	int schema_version;
	List *objects; /* object ids (char *) */
	char *at;      /* snapshot: the data's point in time */
	char *until;   /* incremental: the end of its window */
	char *error;   /* failed: the job's error message */
} DapJob;

extern DapClient *dap_client_create(const char *api_url, const char *client_id,
									const char *client_secret);
/* ns: the CD2 namespace (canvas, canvas_logs, ...); table: its name there */
extern List *dap_list_tables(DapClient *c, const char *ns, DapError *err);
extern char *dap_get_schema(DapClient *c, const char *ns, const char *table);
extern DapJob *dap_start_query(DapClient *c, const char *ns, const char *table, const char *format,
							   const char *since, DapError *err);
extern bool dap_job_done(DapJob *job);
extern void dap_check_finished(DapJob *job, bool snapshot);
extern DapJob *dap_poll_job(DapClient *c, DapJob *job, DapError *err);
extern List *dap_object_urls(DapClient *c, List *object_ids, DapError *err);
extern char *dap_refresh_url(void *client, const char *object_id);
extern void dap_raise(DapError *err) pg_attribute_noreturn();
extern const char *dap_sqlstate(const DapError *err);

#endif /* CD2SYNC_DAP_CLIENT_H */
