/*-------------------------------------------------------------------------
 *
 * http.c
 *	  libcurl transfers a backend pulls from, and the retry policy.
 *
 * A transfer is driven through the multi interface, a few milliseconds at a
 * time, so that the backend checks for interrupts between steps and pulls
 * body bytes only as fast as it consumes them: the write callback keeps at
 * most about HTTP_BUFFER_SIZE bytes and pauses the transfer beyond that.
 * This is what keeps a download's memory bounded whatever the file's size.
 *
 * libcurl's callbacks never palloc nor ereport (a longjmp out of libcurl
 * would skip its cleanup): they use malloc and report through fields of the
 * stream, and errors are raised after curl_multi_* returns.  A stream's
 * libcurl state is released by a reset callback of the memory context it was
 * allocated in, so an error anywhere cannot leak it.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include <curl/curl.h>

#include "http.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "common/pg_prng.h"

#define HTTP_BUFFER_SIZE    (256 * 1024)
#define HTTP_MAX_SMALL_BODY (64 * 1024 * 1024)
#define HTTP_POLL_MS        50

struct HttpStream
{
	CURL *easy;
	struct curl_slist *headers;
	char *buf; /* malloc'd: [off, len) is unread body */
	size_t off;
	size_t len;
	size_t cap;
	bool paused;
	bool done;
	CURLcode result;
	long status;
	int retry_after_ms;
	bool partial;      /* answered 206 to a Range request */
	char *auth_header; /* palloc'd, wiped on close */
	char errbuf[CURL_ERROR_SIZE];
	MemoryContextCallback cleanup;
};

static CURLM *multi = NULL;

/*
 * One multi handle per process: it owns the connection cache, so that calls
 * to the same host reuse their connection and TLS session.
 */
static CURLM *
get_multi(void)
{
	if (multi == NULL)
	{
		if (curl_global_init(CURL_GLOBAL_ALL) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR), errmsg("could not initialize libcurl")));
		multi = curl_multi_init();
		if (multi == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY),
							errmsg("could not create a libcurl multi handle")));
	}
	return multi;
}

/* libcurl write callback: keep the bytes, or pause when the buffer is full */
static size_t
write_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	HttpStream *s = (HttpStream *) arg;
	size_t n = size * nmemb;

	if (s->off > 0)
	{
		memmove(s->buf, s->buf + s->off, s->len - s->off);
		s->len -= s->off;
		s->off = 0;
	}
	if (s->len + n > s->cap)
	{
		char *grown;

		if (s->len > 0)
		{
			s->paused = true;
			return CURL_WRITEFUNC_PAUSE;
		}
		/* an empty buffer takes any single chunk libcurl hands over */
		grown = realloc(s->buf, n);
		if (grown == NULL)
			return 0; /* CURLE_WRITE_ERROR */
		s->buf = grown;
		s->cap = n;
	}
	memcpy(s->buf + s->len, data, n);
	s->len += n;
	return n;
}

/* libcurl header callback: status line and Retry-After */
static size_t
header_cb(char *data, size_t size, size_t nmemb, void *arg)
{
	HttpStream *s = (HttpStream *) arg;
	size_t n = size * nmemb;
	char line[256];
	size_t l = Min(n, sizeof(line) - 1);

	memcpy(line, data, l);
	line[l] = '\0';
	if (pg_strncasecmp(line, "HTTP/", 5) == 0)
		s->retry_after_ms = -1; /* a new response (after 100 Continue) */
	else if (pg_strncasecmp(line, "Retry-After:", 12) == 0)
	{
		char *p = line + 12;
		char *end;
		long secs;

		while (*p == ' ' || *p == '\t')
			p++;
		secs = strtol(p, &end, 10);
		if (end != p && secs >= 0)
			s->retry_after_ms = (int) Min(secs, 86400L) * 1000;
		else
		{
			time_t when = curl_getdate(p, NULL); /* an HTTP-date */
			time_t now = time(NULL);

			if (when > 0)
				s->retry_after_ms = when > now ? (int) Min(when - now, 86400L) * 1000 : 0;
		}
	}
	return n;
}

/* Releases libcurl state; called by close, or when the context goes away */
static void
stream_cleanup(void *arg)
{
	HttpStream *s = (HttpStream *) arg;

	if (s->easy)
	{
		if (multi)
			curl_multi_remove_handle(multi, s->easy);
		curl_easy_cleanup(s->easy);
		s->easy = NULL;
	}
	if (s->headers)
	{
		curl_slist_free_all(s->headers);
		s->headers = NULL;
	}
	if (s->auth_header)
	{
		explicit_bzero(s->auth_header, strlen(s->auth_header));
		s->auth_header = NULL;
	}
	free(s->buf);
	s->buf = NULL;
	s->off = s->len = s->cap = 0;
}

#define setopt(h, opt, val)                                                                        \
	do                                                                                             \
	{                                                                                              \
		if (curl_easy_setopt((h), (opt), (val)) != CURLE_OK)                                       \
			ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR),                                       \
							errmsg("could not set libcurl option %s", #opt)));                     \
	} while (0)

/*
 * Interrupts, and the postmaster's death: a transfer waits in libcurl's
 * poll, not on a latch that would notice it, and a worker left behind
 * would go on downloading and writing into the old server's shared memory.
 */
void
http_check_interrupts(void)
{
	CHECK_FOR_INTERRUPTS();
	if (!PostmasterIsAlive())
		proc_exit(1);
}

/*
 * Runs the transfer until body bytes are buffered or it has ended, checking
 * for interrupts between steps.
 */
static void
stream_fill(HttpStream *s)
{
	CURLM *m = get_multi();

	while (s->off == s->len && !s->done)
	{
		int running;
		CURLMsg *msg;
		int left;

		if (s->paused)
		{
			s->paused = false;
			curl_easy_pause(s->easy, CURLPAUSE_CONT);
		}
		if (curl_multi_perform(m, &running) != CURLM_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR), errmsg("libcurl multi interface failed")));
		while ((msg = curl_multi_info_read(m, &left)) != NULL)
		{
			if (msg->msg == CURLMSG_DONE && msg->easy_handle == s->easy)
			{
				s->done = true;
				s->result = msg->data.result;
			}
		}
		if (s->off < s->len || s->done)
			break;
		if (!s->paused)
			curl_multi_poll(m, NULL, 0, HTTP_POLL_MS, NULL);
		http_check_interrupts();
	}
	if (s->status == 0)
		curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &s->status);
}

/* Whether a URL's host is this machine */
static bool
is_loopback(const char *host)
{
	if (pg_strcasecmp(host, "localhost") == 0 || strcmp(host, "[::1]") == 0 ||
		strcmp(host, "::1") == 0)
		return true;
	return strncmp(host, "127.", 4) == 0 && strspn(host, "0123456789.") == strlen(host);
}

/*
 * https always (certificates verified); plain http only to loopback, unless
 * cd2sync.allow_insecure_http. Checked before anything touches the network.
 */
static void
check_url(const char *url)
{
	CURLU *u = curl_url();
	char *scheme = NULL;
	char *host = NULL;
	const char *problem = NULL;

	if (u == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
		curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
		problem = "not a valid URL";
	else if (pg_strcasecmp(scheme, "https") == 0)
		problem = NULL;
	else if (pg_strcasecmp(scheme, "http") != 0)
		problem = "only http and https are supported";
	else if (!is_loopback(host) && !cd2_allow_insecure_http)
		problem = "plain http is allowed only to this machine (loopback)";
	else if (cd2_proxy && cd2_proxy[0] && !cd2_allow_insecure_http)
		problem = "plain http through cd2sync.proxy would show the credentials to the proxy";
	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
	if (problem)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("refusing to connect: %s", problem),
						errhint("Use https, or set cd2sync.allow_insecure_http.")));
}

/*
 * Starts a request and runs it until the status is known (the first body
 * bytes are in, or the transfer has ended).
 */
HttpStream *
http_stream_open(const HttpRequest *req)
{
	HttpStream *s;
	CURL *h;

	check_url(req->url);
	s = palloc0(sizeof(HttpStream));
	get_multi();
	s->retry_after_ms = -1;
	s->cleanup.func = stream_cleanup;
	s->cleanup.arg = s;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, &s->cleanup);

	s->buf = malloc(HTTP_BUFFER_SIZE);
	if (s->buf == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	s->cap = HTTP_BUFFER_SIZE;

	h = s->easy = curl_easy_init();
	if (h == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY), errmsg("could not create a libcurl handle")));
	setopt(h, CURLOPT_URL, req->url);
	setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	setopt(h, CURLOPT_NOSIGNAL, 1L);
	setopt(h, CURLOPT_ERRORBUFFER, s->errbuf);
	setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
	setopt(h, CURLOPT_WRITEDATA, s);
	setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
	setopt(h, CURLOPT_HEADERDATA, s);
	setopt(h, CURLOPT_PRIVATE, s);
	setopt(h, CURLOPT_USERAGENT, "cd2sync/" CD2SYNC_VERSION);
	setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
	setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
	if (cd2_ca_file && cd2_ca_file[0])
		setopt(h, CURLOPT_CAINFO, cd2_ca_file);
	/* "" also keeps libcurl from the environment's http_proxy and the like */
	setopt(h, CURLOPT_PROXY, cd2_proxy ? cd2_proxy : "");
	setopt(h, CURLOPT_NOPROXY, ""); /* ... and from its no_proxy */
	setopt(h, CURLOPT_CONNECTTIMEOUT, (long) cd2_connect_timeout);
	/* a transfer that moves no byte for http_timeout seconds has stalled */
	setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
	setopt(h, CURLOPT_LOW_SPEED_TIME, (long) cd2_http_timeout);
	if (!req->is_download)
		setopt(h, CURLOPT_TIMEOUT, (long) cd2_http_timeout);

	if (req->basic_user)
	{
		setopt(h, CURLOPT_HTTPAUTH, (long) CURLAUTH_BASIC);
		setopt(h, CURLOPT_USERNAME, req->basic_user);
		setopt(h, CURLOPT_PASSWORD, req->basic_password);
	}
	if (req->bearer)
	{
		s->auth_header = psprintf("Authorization: Bearer %s", req->bearer);
		s->headers = curl_slist_append(s->headers, s->auth_header);
	}
	if (req->body)
	{
		char *ct = psprintf("Content-Type: %s", req->content_type);

		s->headers = curl_slist_append(s->headers, ct);
		setopt(h, CURLOPT_POSTFIELDS, req->body);
		setopt(h, CURLOPT_POSTFIELDSIZE, (long) strlen(req->body));
	}
	else if (strcmp(req->method, "POST") == 0)
		setopt(h, CURLOPT_POSTFIELDS, "");
	s->headers = curl_slist_append(s->headers, "Accept: application/json");
	/* no "Expect: 100-continue" round trip for small bodies */
	s->headers = curl_slist_append(s->headers, "Expect:");
	setopt(h, CURLOPT_HTTPHEADER, s->headers);
	if (req->range_start > 0)
	{
		char range[64];

		snprintf(range, sizeof(range), INT64_FORMAT "-", req->range_start);
		setopt(h, CURLOPT_RANGE, range);
	}

	if (curl_multi_add_handle(get_multi(), h) != CURLM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR), errmsg("could not start an HTTP transfer")));
	stream_fill(s);
	s->partial = (s->status == 206);
	return s;
}

/* Copies up to len body bytes into dst; 0 means the transfer has ended */
size_t
http_stream_read(HttpStream *s, char *dst, size_t len)
{
	size_t n;

	stream_fill(s);
	n = Min(len, s->len - s->off);
	memcpy(dst, s->buf + s->off, n);
	s->off += n;
	return n;
}

void
http_stream_close(HttpStream *s)
{
	stream_cleanup(s);
}

long
http_stream_status(HttpStream *s)
{
	return s->status;
}

bool
http_stream_is_partial(HttpStream *s)
{
	return s->partial;
}

int
http_stream_retry_after_ms(HttpStream *s)
{
	return s->retry_after_ms;
}

/*
 * How the transfer went so far: a transport error once it has ended, else by
 * status.
 */
HttpOutcome
http_stream_outcome(HttpStream *s)
{
	if (s->done && s->result != CURLE_OK)
	{
		switch (s->result)
		{
			case CURLE_UNSUPPORTED_PROTOCOL:
			case CURLE_URL_MALFORMAT:
			case CURLE_PEER_FAILED_VERIFICATION:
			case CURLE_SSL_CACERT_BADFILE:
			case CURLE_SSL_CERTPROBLEM:
			case CURLE_SSL_ISSUER_ERROR:
			case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
			case CURLE_LOGIN_DENIED:
			case CURLE_WRITE_ERROR:
			case CURLE_OUT_OF_MEMORY:
				return HTTP_PERMANENT;
			default:
				return HTTP_TRANSIENT;
		}
	}
	if (s->status == 401)
		return HTTP_UNAUTHORIZED;
	if (s->status == 429 || s->status >= 500 || s->status == 0)
		return HTTP_TRANSIENT;
	if (s->status >= 400)
		return HTTP_PERMANENT;
	return HTTP_OK;
}

/* The transport error, or NULL. Never holds a credential. */
const char *
http_stream_error(HttpStream *s)
{
	if (!s->done || s->result == CURLE_OK)
		return NULL;
	return s->errbuf[0] ? s->errbuf : curl_easy_strerror(s->result);
}

/* One request, whole body in memory (answers of the API are small). */
void
http_request(const HttpRequest *req, HttpResponse *resp)
{
	HttpStream *s = http_stream_open(req);
	char chunk[16384];
	size_t n;
	const char *err;

	initStringInfo(&resp->body);
	while ((n = http_stream_read(s, chunk, sizeof(chunk))) > 0)
	{
		if (resp->body.len + n > HTTP_MAX_SMALL_BODY)
			ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
							errmsg("response from the CD2 API is larger than %d bytes",
								   HTTP_MAX_SMALL_BODY)));
		appendBinaryStringInfo(&resp->body, chunk, n);
	}
	resp->status = s->status;
	resp->outcome = http_stream_outcome(s);
	resp->retry_after_ms = s->retry_after_ms;
	err = http_stream_error(s);
	resp->error = err ? pstrdup(err) : NULL;
	http_stream_close(s);
}

/*
 * Delay before retry number attempt (0-based): Retry-After when the server
 * gave one, else exponential backoff with full jitter on its upper half;
 * both capped by cd2sync.retry_max_delay.
 */
int
http_backoff_ms(int attempt, int retry_after_ms)
{
	double delay;

	if (retry_after_ms >= 0)
		return Min(retry_after_ms, cd2_retry_max_delay);
	delay = (double) cd2_retry_base_delay * (1 << Min(attempt, 20));
	delay = Min(delay, (double) cd2_retry_max_delay);
	return (int) (delay / 2 + pg_prng_double(&pg_global_prng_state) * delay / 2);
}

/* Sleeps, waking for interrupts and postmaster death. */
void
cd2_sleep_ms(int ms)
{
	TimestampTz end = GetCurrentTimestamp() + (TimestampTz) ms * 1000;

	for (;;)
	{
		long left = (long) ((end - GetCurrentTimestamp()) / 1000);

		CHECK_FOR_INTERRUPTS();
		if (left <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, left,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
