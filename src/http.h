/*-------------------------------------------------------------------------
 *
 * http.h
 *	  libcurl transfers that a backend can pull from, and the retry policy
 *	  shared by every HTTP call cd2sync makes.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_HTTP_H
#define CD2SYNC_HTTP_H

#include "lib/stringinfo.h"

/* One request. Strings are borrowed; they must outlive the transfer. */
typedef struct HttpRequest
{
	const char *method; /* "GET" or "POST" */
	const char *url;
	const char *body;         /* POST body or NULL */
	const char *content_type; /* of the body */
	const char *bearer;       /* "Authorization: Bearer" token, or NULL */
	const char *basic_user;   /* HTTP Basic credentials, or NULL */
	const char *basic_password;
	int64 range_start; /* > 0: ask for the body from this byte on */
	bool is_download;  /* no total time limit, only a stall limit */
} HttpRequest;

/* How a finished or failed transfer should be treated. */
typedef enum HttpOutcome
{
	HTTP_OK,           /* 2xx */
	HTTP_TRANSIENT,    /* 429, 5xx, transport errors: retry */
	HTTP_UNAUTHORIZED, /* 401: authenticate again, retry once */
	HTTP_PERMANENT     /* other 4xx, TLS failures: report */
} HttpOutcome;

typedef struct HttpStream HttpStream;

extern HttpStream *http_stream_open(const HttpRequest *req);
extern size_t http_stream_read(HttpStream *s, char *dst, size_t len);
extern void http_stream_close(HttpStream *s);

extern long http_stream_status(HttpStream *s);
extern HttpOutcome http_stream_outcome(HttpStream *s);
extern const char *http_stream_error(HttpStream *s);
extern int http_stream_retry_after_ms(HttpStream *s);
extern bool http_stream_is_partial(HttpStream *s);

/* A whole response body, for the small JSON answers of the API. */
typedef struct HttpResponse
{
	long status;
	HttpOutcome outcome;
	StringInfoData body;
	char *error;        /* transport error text, or NULL */
	int retry_after_ms; /* from Retry-After, or -1 */
} HttpResponse;

extern void http_request(const HttpRequest *req, HttpResponse *resp);

/* Retry policy */
extern int http_backoff_ms(int attempt, int retry_after_ms);
extern void cd2_sleep_ms(int ms);

/* Between the steps of a transfer: interrupts, and the postmaster's death */
extern void http_check_interrupts(void);

#endif /* CD2SYNC_HTTP_H */
