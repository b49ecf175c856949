/*-------------------------------------------------------------------------
 *
 * settings.c
 *	  The cd2sync.* settings, and the way a sync worker inherits them from
 *	  the session that started it.
 *
 * The settings are described by one table, so that defining them and
 * handing them to a worker cannot drift apart.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include <limits.h>

#include "lib/stringinfo.h"
#include "utils/guc.h"
#include "utils/memutils.h"

char *cd2_database = NULL;
char *cd2_format = NULL;
int cd2_http_timeout = 120;
int cd2_connect_timeout = 10;
int cd2_http_retries = 6;
int cd2_retry_base_delay = 1000;
int cd2_retry_max_delay = 60000;
int cd2_poll_interval = 5000;
int cd2_job_timeout = 3600;
char *cd2_ca_file = NULL;
char *cd2_proxy = NULL;
int cd2_max_line_length = 64 * 1024 * 1024;
int cd2_max_workers = 4;
int cd2_scheduler_naptime = 10000;
bool cd2_allow_insecure_http = false;
int cd2_job_rate = 5;
bool cd2_direct_load = true;
bool cd2_gunzip_thread = true;
int cd2_max_jobs_in_flight = 100;
int cd2_feed_max_pending = 10000000;
int cd2_feed_max_age = 7 * 86400;
int cd2_load_workers = -1;
bool cd2_prefault_buffers = true;

typedef struct Cd2Setting
{
	const char *name;
	const char *description;
	bool inherited; /* passed from a session to its sync worker */
	GucContext context;
	int *int_var;    /* an integer setting ... */
	int int_default; /* (also a boolean's default) */
	int int_min;
	int int_max;
	int flags;
	char **string_var; /* ... a string one ... */
	const char *string_default;
	bool *bool_var; /* ... or a boolean one */
} Cd2Setting;

#define INT_SETTING(n, d, inh, ctx, var, def, min, max, unit)                                      \
	{                                                                                              \
		.name = (n), .description = (d), .inherited = (inh), .context = (ctx), .int_var = (var),   \
		.int_default = (def), .int_min = (min), .int_max = (max), .flags = (unit)                  \
	}
#define STRING_SETTING(n, d, inh, ctx, var, def)                                                   \
	{                                                                                              \
		.name = (n), .description = (d), .inherited = (inh), .context = (ctx),                     \
		.string_var = (var), .string_default = (def)                                               \
	}
/* ... that only superusers may read (it may hold a password) */
#define SECRET_STRING_SETTING(n, d, inh, ctx, var, def)                                            \
	{                                                                                              \
		.name = (n), .description = (d), .inherited = (inh), .context = (ctx),                     \
		.string_var = (var), .string_default = (def), .flags = GUC_SUPERUSER_ONLY                  \
	}
#define BOOL_SETTING(n, d, inh, ctx, var, def)                                                     \
	{                                                                                              \
		.name = (n), .description = (d), .inherited = (inh), .context = (ctx), .bool_var = (var),  \
		.int_default = (def)                                                                       \
	}

static const Cd2Setting settings[] = {
	STRING_SETTING("cd2sync.database", "Database the scheduler works in.", false, PGC_SIGHUP,
				   &cd2_database, "postgres"),
	STRING_SETTING("cd2sync.format", "Result format asked of the DAP API: tsv, csv or jsonl.", true,
				   PGC_SUSET, &cd2_format, "tsv"),
	INT_SETTING("cd2sync.http_timeout",
				"Seconds an API call may take, and seconds a download may stall.", true, PGC_SUSET,
				&cd2_http_timeout, 120, 1, 86400, GUC_UNIT_S),
	INT_SETTING("cd2sync.connect_timeout", "Seconds to wait for a connection to the API.", true,
				PGC_SUSET, &cd2_connect_timeout, 10, 1, 3600, GUC_UNIT_S),
	INT_SETTING("cd2sync.http_retries", "How many times a transient HTTP failure is retried.", true,
				PGC_SUSET, &cd2_http_retries, 6, 0, 100, 0),
	INT_SETTING("cd2sync.retry_base_delay",
				"First backoff delay after a transient failure; it doubles, with jitter.", true,
				PGC_SUSET, &cd2_retry_base_delay, 1000, 1, 600000, GUC_UNIT_MS),
	INT_SETTING("cd2sync.retry_max_delay", "Longest backoff delay, Retry-After included.", true,
				PGC_SUSET, &cd2_retry_max_delay, 60000, 1, 3600000, GUC_UNIT_MS),
	INT_SETTING("cd2sync.poll_interval", "Longest wait between two polls of a running query job.",
				true, PGC_SUSET, &cd2_poll_interval, 5000, 10, 600000, GUC_UNIT_MS),
	INT_SETTING("cd2sync.job_timeout",
				"Seconds a query job may take upstream before the table sync fails.", true,
				PGC_SUSET, &cd2_job_timeout, 3600, 1, 7 * 86400, GUC_UNIT_S),
	STRING_SETTING("cd2sync.ca_file",
				   "File of CA certificates to verify the API with (empty: the system's).", false,
				   PGC_SIGHUP, &cd2_ca_file, ""),
	SECRET_STRING_SETTING(
		"cd2sync.proxy",
		"Proxy for every API call and download, as libcurl takes it (empty: none; the "
		"server's *_proxy environment variables are never used).",
		false, PGC_SIGHUP, &cd2_proxy, ""),
	BOOL_SETTING(
		"cd2sync.allow_insecure_http",
		"Allow plain http to hosts other than loopback (credentials would travel in clear).", false,
		PGC_SIGHUP, &cd2_allow_insecure_http, false),
	BOOL_SETTING("cd2sync.direct_load",
				 "Load a snapshot into an empty table straight with COPY (off: through the staging "
				 "table, every write in SQL).",
				 true, PGC_USERSET, &cd2_direct_load, true),
	BOOL_SETTING("cd2sync.gunzip_thread",
				 "Decompress downloads on a thread of their own, while the sync stores what came "
				 "before (off: in the sync's own thread).",
				 true, PGC_USERSET, &cd2_gunzip_thread, true),
	INT_SETTING(
		"cd2sync.job_rate",
		"Most query jobs a sync starts per minute (the API allows 5 per credential); 0: no limit.",
		true, PGC_SUSET, &cd2_job_rate, 5, 0, 100000, 0),
	INT_SETTING("cd2sync.max_jobs_in_flight",
				"Most query jobs a sync keeps running upstream at once.", true, PGC_SUSET,
				&cd2_max_jobs_in_flight, 100, 1, 10000, 0),
	INT_SETTING("cd2sync.load_workers",
				"Load workers that help a sync worker load a new table's snapshot, a part each at "
				"a time (-1: the cores less one, at most 8; 0: none). They come out of "
				"max_worker_processes: a load takes those it can get.",
				true, PGC_SUSET, &cd2_load_workers, -1, -1, 64, 0),
	BOOL_SETTING("cd2sync.prefault_buffers",
				 "Map the whole buffer pool into a sync worker at once before its apply, rather "
				 "than a page fault at each page it first touches (Linux 5.14 or later).",
				 true, PGC_SUSET, &cd2_prefault_buffers, true),
	INT_SETTING("cd2sync.max_workers", "Most instance syncs the scheduler runs at once.", false,
				PGC_SIGHUP, &cd2_max_workers, 4, 1, 1000, 0),
	INT_SETTING("cd2sync.scheduler_naptime",
				"Longest sleep of the scheduler between two looks at the schedules.", false,
				PGC_SIGHUP, &cd2_scheduler_naptime, 10000, 100, 3600000, GUC_UNIT_MS),
	INT_SETTING("cd2sync.feed_max_pending",
				"Most changes a change feed may leave unacknowledged before it is marked stale.",
				false, PGC_SUSET, &cd2_feed_max_pending, 10000000, 1, INT_MAX, 0),
	INT_SETTING("cd2sync.feed_max_age",
				"Longest a change may stay unacknowledged before its feed is marked stale.", false,
				PGC_SUSET, &cd2_feed_max_age, 7 * 86400, 1, INT_MAX, GUC_UNIT_S),
	INT_SETTING("cd2sync.max_line_length", "Longest record accepted in a downloaded file.", true,
				PGC_SUSET, &cd2_max_line_length, 64 * 1024 * 1024, 1024, MaxAllocSize / 2,
				GUC_UNIT_BYTE),
};

/* Defines every cd2sync.* setting; called from _PG_init */
void
cd2_define_settings(void)
{
	for (size_t i = 0; i < lengthof(settings); i++)
	{
		const Cd2Setting *s = &settings[i];

		if (s->bool_var)
			DefineCustomBoolVariable(s->name, s->description, NULL, s->bool_var,
									 s->int_default != 0, s->context, 0, NULL, NULL, NULL);
		else if (s->int_var)
			DefineCustomIntVariable(s->name, s->description, NULL, s->int_var, s->int_default,
									s->int_min, s->int_max, s->context, s->flags, NULL, NULL, NULL);
		else
			DefineCustomStringVariable(s->name, s->description, NULL, s->string_var,
									   s->string_default, s->context, s->flags, NULL, NULL, NULL);
	}
	MarkGUCPrefixReserved("cd2sync");
}

/*
 * The inherited settings as they are in this session, one "name=value" a
 * line. Values never hold a newline: they are numbers, formats and paths.
 */
char *
cd2_serialize_settings(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (size_t i = 0; i < lengthof(settings); i++)
	{
		const char *value;

		if (!settings[i].inherited)
			continue;
		value = GetConfigOption(settings[i].name, false, false);
		if (value && strchr(value, '\n') == NULL)
			appendStringInfo(&buf, "%s=%s\n", settings[i].name, value);
	}
	return buf.data;
}

/* Applies, in a sync worker, what cd2_serialize_settings gave. */
void
cd2_restore_settings(const char *blob)
{
	char *copy = pstrdup(blob);
	char *line = copy;

	while (line && *line)
	{
		char *next = strchr(line, '\n');
		char *eq = strchr(line, '=');

		if (next)
			*next++ = '\0';
		if (eq)
		{
			*eq = '\0';
			SetConfigOption(line, eq + 1, PGC_SUSET, PGC_S_SESSION);
		}
		line = next;
	}
	pfree(copy);
}
