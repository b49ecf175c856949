/*-------------------------------------------------------------------------
 *
 * dap_client.c
 *	  The DAP Query API client: client-credentials login, the table list,
 *	  table schemas, query jobs and object URLs.
 *
 * Every call goes through dap_call, which holds the policy of
 * shared/docs/cd2-api.md: log in before the token's "exp" (read from the JWT
 * without checking its signature), log in again once on a 401, retry 429,
 * 5xx and transport errors with backoff (honouring Retry-After), and turn
 * any other answer into an error carrying the API's error.message. Answers
 * are parsed with PostgreSQL's own jsonb parser.
 *
 * The client secret and the token never reach a message: errors name the
 * method and path of the call, never a header.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include <curl/curl.h>
#include <math.h>

#include "common/base64.h"
#include "dap_client.h"
#include "fmgr.h"
#include "http.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

/* ---- small jsonb helpers ---- */

/*
 * The jsonb of a text, or NULL if it is not JSON. The error is dropped in
 * the caller's memory context: FlushErrorState() resets ErrorContext, so
 * nothing allocated after it may live there.
 */
static Jsonb *
try_parse_json(const char *text)
{
	Jsonb *volatile result = NULL;
	MemoryContext cxt = CurrentMemoryContext;

	PG_TRY();
	{
		result = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(text)));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		result = NULL;
	}
	PG_END_TRY();
	return result;
}

static Jsonb *
parse_json(const char *text, const char *what)
{
	Jsonb *result = try_parse_json(text);

	if (result == NULL)
		ereport(ERROR, (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
						errmsg("CD2 API answered %s with something that is not JSON", what)));
	return result;
}

static JsonbValue *
json_get(JsonbContainer *c, const char *key)
{
	if (c == NULL || !JsonContainerIsObject(c))
		return NULL;
	return getKeyJsonValueFromContainer(c, key, strlen(key), NULL);
}

/* A scalar member as text (strings as they are, numbers printed), or NULL */
static char *
json_get_text(JsonbContainer *c, const char *key)
{
	JsonbValue *v = json_get(c, key);

	if (v == NULL)
		return NULL;
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(
				DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		default:
			return NULL;
	}
}

static JsonbContainer *
json_get_container(JsonbContainer *c, const char *key)
{
	JsonbValue *v = json_get(c, key);

	return (v && v->type == jbvBinary) ? v->val.binary.data : NULL;
}

/* ---- calls ---- */

DapClient *
dap_client_create(const char *api_url, const char *client_id, const char *client_secret)
{
	DapClient *c = palloc0(sizeof(DapClient));
	char *url = pstrdup(api_url);
	int len = strlen(url);

	while (len > 0 && url[len - 1] == '/')
		url[--len] = '\0';
	c->api_url = url;
	c->client_id = pstrdup(client_id);
	c->client_secret = pstrdup(client_secret);
	c->cxt = CurrentMemoryContext;
	return c;
}

/*
 * A number of seconds the API gave (a JWT's exp, expires_in), as a count
 * a C cast is defined for: NULL or not a number gives dflt; anything else
 * is clamped to 0 .. 10^11 (the year 5138).
 */
static int64
seconds_in(const char *text, int64 dflt)
{
	double v;
	char *end;

	if (text == NULL)
		return dflt;
	v = strtod(text, &end);
	if (end == text || isnan(v))
		return dflt;
	return (int64) Max(0.0, Min(v, 1e11));
}

/* The "exp" claim of a JWT, or 0 when it has none we can read */
static int64
jwt_exp(const char *token)
{
	const char *p1 = strchr(token, '.');
	const char *p2 = p1 ? strchr(p1 + 1, '.') : NULL;
	StringInfoData b64;
	char *decoded;
	int n;
	Jsonb *claims;
	char *exp;

	if (p2 == NULL)
		return 0;
	initStringInfo(&b64);
	for (const char *p = p1 + 1; p < p2; p++)
		appendStringInfoChar(&b64, *p == '-' ? '+' : (*p == '_' ? '/' : *p));
	while (b64.len % 4)
		appendStringInfoChar(&b64, '=');
	decoded = palloc(b64.len + 1);
	n = pg_b64_decode(b64.data, b64.len, decoded, b64.len);
	if (n <= 0)
		return 0;
	decoded[n] = '\0';
	claims = try_parse_json(decoded);
	exp = claims ? json_get_text(&claims->root, "exp") : NULL;
	return seconds_in(exp, 0);
}

static void
fill_error(DapError *err, const char *method, const char *path, HttpResponse *resp, int attempts)
{
	StringInfoData msg;
	char *type = NULL;
	char *message = NULL;

	/* the API's errors are {"error": {"type", "message", ...}} */
	if (resp->body.len > 0 && resp->body.data[0] == '{')
	{
		Jsonb *j = try_parse_json(resp->body.data);
		JsonbContainer *e = j ? json_get_container(&j->root, "error") : NULL;

		type = json_get_text(e, "type");
		message = json_get_text(e, "message");
	}

	initStringInfo(&msg);
	appendStringInfo(&msg, "CD2 API %s %s failed: ", method, path);
	if (resp->error)
		appendStringInfoString(&msg, resp->error);
	else
		appendStringInfo(&msg, "HTTP %ld", resp->status);
	if (type)
		appendStringInfo(&msg, " %s", type);
	if (message)
		appendStringInfo(&msg, ": %s", message);
	if (attempts > 1)
		appendStringInfo(&msg, " (after %d attempts)", attempts);
	err->status = resp->status;
	err->type = type;
	err->message = msg.data;
}

/*
 * Raises an error the API answered with. The one place where failures of
 * the API become SQLSTATEs: 28000 for a credential refused (401, 403),
 * 08006 for a failure that retries did not overcome (transport, 5xx, 429),
 * 38000 for anything else the API refused.
 */
static int
error_code(const DapError *err)
{
	if (err->status == 401 || err->status == 403)
		return ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
	if (err->status == 0 || err->status >= 500 || err->status == 429)
		return ERRCODE_CONNECTION_FAILURE;
	return ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;
}

void
dap_raise(DapError *err)
{
	ereport(ERROR, (errcode(error_code(err)), errmsg_internal("%s", err->message)));
}

/* The SQLSTATE dap_raise would raise err with */
const char *
dap_sqlstate(const DapError *err)
{
	return unpack_sql_state(error_code(err));
}

/*
 * The retry loop: makes the request, and makes it again after a backoff
 * while it fails transiently, at most cd2sync.http_retries more times.
 * Returns the number of attempts.
 */
static int
request_retrying(HttpRequest *req, HttpResponse *resp)
{
	int attempt = 0;

	for (;;)
	{
		http_request(req, resp);
		if (resp->outcome != HTTP_TRANSIENT || attempt >= cd2_http_retries)
			return attempt + 1;
		cd2_sleep_ms(http_backoff_ms(attempt, resp->retry_after_ms));
		attempt++;
	}
}

/* Logs in with the client credentials; keeps the token in c->cxt. */
static void
dap_login(DapClient *c)
{
	HttpRequest req = { 0 };
	HttpResponse resp;
	char *url = psprintf("%s/ids/auth/login", c->api_url);
	DapError err;
	Jsonb *j;
	char *token;
	char *expires_in;
	int64 exp;
	int64 now = (int64) time(NULL);
	int64 lifetime;
	int attempts;

	req.method = "POST";
	req.url = url;
	req.body = "grant_type=client_credentials";
	req.content_type = "application/x-www-form-urlencoded";
	req.basic_user = c->client_id;
	req.basic_password = c->client_secret;

	attempts = request_retrying(&req, &resp);
	if (resp.outcome != HTTP_OK)
	{
		fill_error(&err, "POST", "/ids/auth/login", &resp, attempts);
		dap_raise(&err);
	}

	j = parse_json(resp.body.data, "the login");
	token = json_get_text(&j->root, "access_token");
	if (token == NULL || token[0] == '\0')
		ereport(ERROR, (errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
						errmsg("CD2 API login answered without an access_token")));
	expires_in = json_get_text(&j->root, "expires_in");
	exp = jwt_exp(token);
	if (exp <= now)
		exp = now + seconds_in(expires_in, 3600);
	lifetime = exp - now;

	/* renew 5 minutes before expiry, or after 3/4 of a short lifetime */
	if (c->token)
	{
		explicit_bzero(c->token, strlen(c->token));
		pfree(c->token);
	}
	c->token = MemoryContextStrdup(c->cxt, token);
	explicit_bzero(token, strlen(token));
	c->token_renew_at = GetCurrentTimestamp() +
						(TimestampTz) (lifetime - Min(300, Max(1, lifetime / 4))) * USECS_PER_SEC;
}

/*
 * One API call with the retry policy. Returns the answer's text; on a
 * permanent error fills err and returns NULL when err is given, else raises.
 */
static char *
dap_call_text(DapClient *c, const char *method, const char *path, const char *body, DapError *err)
{
	HttpRequest req = { 0 };
	HttpResponse resp;
	int attempts;
	DapError local;

	req.method = method;
	req.url = psprintf("%s%s", c->api_url, path);
	req.body = body;
	req.content_type = "application/json";

	for (bool relogged = false;; relogged = true)
	{
		if (c->token == NULL || GetCurrentTimestamp() >= c->token_renew_at)
			dap_login(c);
		req.bearer = c->token;
		attempts = request_retrying(&req, &resp);
		if (resp.outcome == HTTP_OK)
			return resp.body.data;
		if (resp.outcome != HTTP_UNAUTHORIZED || relogged)
			break;
		/* token revoked or expired early: log in again, once */
		c->token_renew_at = 0;
	}

	fill_error(err ? err : &local, method, path, &resp, attempts);
	if (err == NULL || resp.outcome == HTTP_TRANSIENT)
		dap_raise(err ? err : &local);
	return NULL;
}

/* dap_call_text, parsed */
static Jsonb *
dap_call(DapClient *c, const char *method, const char *path, const char *body, DapError *err)
{
	char *text = dap_call_text(c, method, path, body, err);

	return text ? parse_json(text, path) : NULL;
}

static char *
escape_path(const char *s)
{
	char *e = curl_easy_escape(NULL, s, 0);
	char *r = pstrdup(e);

	curl_free(e);
	return r;
}

/*
 * The tables the API lists in a namespace, as it names them. With err, an
 * answer refusing the call (a namespace the credential may not read: 403,
 * 404) fills err and gives NIL; other failures raise.
 */
List *
dap_list_tables(DapClient *c, const char *ns, DapError *err)
{
	char *path = psprintf("/dap/query/%s/table", escape_path(ns));
	Jsonb *j = dap_call(c, "GET", path, NULL, err);
	JsonbContainer *arr;
	List *tables = NIL;

	if (j == NULL)
		return NIL;
	arr = json_get_container(&j->root, "tables");

	if (arr == NULL || !JsonContainerIsArray(arr))
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("CD2 API table list has no \"tables\" array")));
	for (uint32 i = 0; i < JsonContainerSize(arr); i++)
	{
		JsonbValue *v = getIthJsonbValueFromContainer(arr, i);

		if (v && v->type == jbvString)
			tables = lappend(tables, pnstrdup(v->val.string.val, v->val.string.len));
	}
	return tables;
}

/*
 * The table's schema answer ({"version", "schema"}) as the API wrote it:
 * its order of properties is the order of the table's columns.
 */
char *
dap_get_schema(DapClient *c, const char *ns, const char *table)
{
	char *path = psprintf("/dap/query/%s/table/%s/schema", escape_path(ns), escape_path(table));
	char *text = dap_call_text(c, "GET", path, NULL, NULL);

	(void) parse_json(text, path); /* it must be JSON */
	return text;
}

static DapJob *
parse_job(Jsonb *j)
{
	DapJob *job = palloc0(sizeof(DapJob));
	JsonbContainer *objs = json_get_container(&j->root, "objects");
	char *version;

	job->id = json_get_text(&j->root, "id");
	job->status = json_get_text(&j->root, "status");
	if (job->id == NULL || job->status == NULL)
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("CD2 API job object lacks \"id\" or \"status\"")));
	version = json_get_text(&j->root, "schema_version");
	job->schema_version = version ? atoi(version) : 0;
	job->at = json_get_text(&j->root, "at");
	job->until = json_get_text(&j->root, "until");
	if (objs && JsonContainerIsArray(objs))
	{
		for (uint32 i = 0; i < JsonContainerSize(objs); i++)
		{
			JsonbValue *v = getIthJsonbValueFromContainer(objs, i);
			char *id = NULL;

			if (v && v->type == jbvBinary)
				id = json_get_text(v->val.binary.data, "id");
			else if (v && v->type == jbvString)
				id = pnstrdup(v->val.string.val, v->val.string.len);
			if (id)
				job->objects = lappend(job->objects, id);
		}
	}
	if (strcmp(job->status, "failed") == 0)
	{
		JsonbContainer *e = json_get_container(&j->root, "error");
		char *type = json_get_text(e, "type");
		char *message = json_get_text(e, "message");

		job->error = psprintf("%s%s%s", type ? type : "job failed", message ? ": " : "",
							  message ? message : "");
	}
	return job;
}

/*
 * Starts a snapshot (since NULL) or incremental query. The answer may be a
 * job that is already complete (identical queries are deduplicated).
 */
DapJob *
dap_start_query(DapClient *c, const char *ns, const char *table, const char *format,
				const char *since, DapError *err)
{
	char *path = psprintf("/dap/query/%s/table/%s/data", escape_path(ns), escape_path(table));
	StringInfoData body;
	Jsonb *j;

	initStringInfo(&body);
	appendStringInfo(&body, "{\"format\": \"%s\", \"mode\": \"condensed\"", format);
	if (since)
	{
		appendStringInfoString(&body, ", \"since\": ");
		escape_json(&body, since);
	}
	appendStringInfoChar(&body, '}');
	j = dap_call(c, "POST", path, body.data, err);
	return j ? parse_job(j) : NULL;
}

/* Whether a job has ended (complete or failed) */
bool
dap_job_done(DapJob *job)
{
	return strcmp(job->status, "complete") == 0 || strcmp(job->status, "failed") == 0;
}

/* Raises unless a finished job can be loaded (38000: the API failed it) */
void
dap_check_finished(DapJob *job, bool snapshot)
{
	if (strcmp(job->status, "failed") == 0)
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("CD2 query job %s failed: %s", job->id, job->error)));
	if ((snapshot ? job->at : job->until) == NULL)
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("CD2 query job %s completed without \"%s\"", job->id,
							   snapshot ? "at" : "until")));
}

/* Asks for a job's state once. NULL (with err) when the job is gone. */
DapJob *
dap_poll_job(DapClient *c, DapJob *job, DapError *err)
{
	char *path = psprintf("/dap/job/%s", escape_path(job->id));
	Jsonb *j = dap_call(c, "GET", path, NULL, err);

	return j ? parse_job(j) : NULL;
}

/*
 * A fresh presigned URL for an object whose URL stopped working (a
 * download's RefreshUrlFn; arg: the DapClient). Raises when the job is gone.
 */
char *
dap_refresh_url(void *arg, const char *object_id)
{
	DapError err;
	List *urls = dap_object_urls((DapClient *) arg, list_make1(pstrdup(object_id)), &err);

	if (urls == NIL)
		ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						errmsg("the query job expired while its objects were downloaded: %s",
							   err.message)));
	return (char *) linitial(urls);
}

/* Presigned URLs for the given object ids, in the same order */
List *
dap_object_urls(DapClient *c, List *object_ids, DapError *err)
{
	StringInfoData body;
	ListCell *lc;
	Jsonb *j;
	JsonbContainer *urls;
	List *result = NIL;

	initStringInfo(&body);
	appendStringInfoChar(&body, '[');
	foreach (lc, object_ids)
	{
		if (foreach_current_index(lc) > 0)
			appendStringInfoString(&body, ", ");
		appendStringInfoString(&body, "{\"id\": ");
		escape_json(&body, (char *) lfirst(lc));
		appendStringInfoChar(&body, '}');
	}
	appendStringInfoChar(&body, ']');

	j = dap_call(c, "POST", "/dap/object/url", body.data, err);
	if (j == NULL)
		return NIL;
	urls = json_get_container(&j->root, "urls");
	foreach (lc, object_ids)
	{
		const char *id = (const char *) lfirst(lc);
		JsonbValue *v = json_get(urls, id);
		char *url = NULL;

		if (v && v->type == jbvBinary)
			url = json_get_text(v->val.binary.data, "url");
		else if (v && v->type == jbvString)
			url = pnstrdup(v->val.string.val, v->val.string.len);
		if (url == NULL)
			ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
							errmsg("CD2 API gave no URL for object \"%s\"", id)));

		/*
		 * An https API may not send this server to plain http, which
		 * http.c allows to loopback: a request to a service on this
		 * machine that the API would choose.
		 */
		if (pg_strncasecmp(c->api_url, "https:", 6) == 0 && pg_strncasecmp(url, "https:", 6) != 0)
			ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
							errmsg("CD2 API gave a URL for object \"%s\" that is not https", id)));
		result = lappend(result, url);
	}
	return result;
}
