/*-------------------------------------------------------------------------
 *
 * download.c
 *	  The decompressed bytes of one result object, pulled on demand.
 *
 * An object is fetched from its presigned URL and inflated as the reader
 * asks for bytes, so memory stays bounded whatever the object's size.
 *
 * Failures are handled here so that the reader sees one uninterrupted
 * stream:
 *	- a transient failure (5xx, 429, reset, stall, a body cut short) is
 *	  retried after a backoff, resuming at the first byte not yet received
 *	  (with a Range request; when the server ignores Range, the bytes already
 *	  received are skipped);
 *	- an expired or revoked URL (403, 404) is replaced by a fresh one from
 *	  the DAP client, which starts over with a new job when the old one is
 *	  gone;
 *	- a gzip stream that is corrupt, or ends before its last member does,
 *	  fails the object: its data cannot be trusted.
 * Multi-member gzip files are inflated member after member. An object that
 * does not start with the gzip magic is passed through as it is.
 *
 * With cd2sync.gunzip_thread (the default), inflating runs on a thread of
 * its own (inflater.c) while this backend parses and stores what came
 * before; the network and every error stay on the backend's thread.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "codec.h"
#include "download.h"
#include "http.h"
#include "inflater.h"
#include "miscadmin.h"
#include "utils/memutils.h"

#define DOWNLOAD_INBUF (64 * 1024)

struct Download
{
	char *object_id;
	char *url;
	RefreshUrlFn refresh;
	void *refresh_arg;
	MemoryContext cxt; /* where the download's state lives */
	HttpStream *http;
	int64 received;   /* compressed bytes of the object received */
	int64 skip;       /* bytes to drop after a Range was ignored */
	int failures;     /* consecutive failed attempts */
	bool fetched_all; /* the whole object has been received */
	bool eof;

	CodecGunzip gz;   /* inflates, or passes plain bytes through */
	Inflater *inf;    /* or the same on a thread of its own */
	bool input_ended; /* the inflater has had all the object's bytes */
	unsigned char inbuf[DOWNLOAD_INBUF];
	MemoryContextCallback cleanup;
};

static void
download_cleanup(void *arg)
{
	Download *d = (Download *) arg;

	if (d->inf)
		inflater_stop(d->inf);
	d->inf = NULL;
	codec_gunzip_end(&d->gz);
}

/* The object's URL without its query string (the presigned signature) */
static char *
url_for_message(const char *url)
{
	char *copy = pstrdup(url);
	char *q = strchr(copy, '?');

	if (q)
		*q = '\0';
	return copy;
}

Download *
download_open(const char *object_id, const char *url, RefreshUrlFn refresh, void *refresh_arg)
{
	Download *d = palloc0(sizeof(Download));

	d->cxt = CurrentMemoryContext;
	d->object_id = pstrdup(object_id);
	d->url = pstrdup(url);
	d->refresh = refresh;
	d->refresh_arg = refresh_arg;
	codec_gunzip_init(&d->gz);
	if (cd2_gunzip_thread)
		d->inf = inflater_start(); /* NULL: inflate here instead */
	d->cleanup.func = download_cleanup;
	d->cleanup.arg = d;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, &d->cleanup);
	return d;
}

/* Handles a failed attempt: wait, or get a new URL, or give up. */
static void
attempt_failed(Download *d, HttpOutcome outcome, long status, int retry_after_ms, const char *why)
{
	bool url_gone = (status == 403 || status == 404 || status == 410);

	d->failures++;
	if (outcome == HTTP_PERMANENT && !url_gone)
		ereport(ERROR, (errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
						errmsg("could not download object \"%s\": %s", d->object_id, why),
						errdetail("URL: %s", url_for_message(d->url))));
	if (d->failures > cd2_http_retries)
		ereport(ERROR, (errcode(ERRCODE_CONNECTION_FAILURE),
						errmsg("could not download object \"%s\" after %d attempts: %s",
							   d->object_id, d->failures, why)));
	if (url_gone && d->refresh)
	{
		/* a presigned link expired or was revoked: ask for a fresh one */
		MemoryContext old = MemoryContextSwitchTo(d->cxt);

		d->url = d->refresh(d->refresh_arg, d->object_id);
		MemoryContextSwitchTo(old);
		return;
	}
	cd2_sleep_ms(http_backoff_ms(d->failures - 1, retry_after_ms));
}

/* Next compressed bytes of the object; 0 at its end. */
static size_t
fetch(Download *d, char *dst, size_t len)
{
	while (!d->fetched_all)
	{
		size_t n;
		HttpOutcome outcome;

		if (d->http == NULL)
		{
			HttpRequest req = { 0 };
			long status;
			MemoryContext old;

			req.method = "GET";
			req.url = d->url;
			req.range_start = d->received;
			req.is_download = true;

			/*
			 * Reading may happen inside COPY, in a context reset every row:
			 * the stream lives as long as the download.
			 */
			old = MemoryContextSwitchTo(d->cxt);
			d->http = http_stream_open(&req);
			MemoryContextSwitchTo(old);
			status = http_stream_status(d->http);
			if (status == 416 && d->received > 0)
			{
				/* asked for bytes past the end: there were no more */
				http_stream_close(d->http);
				d->http = NULL;
				d->fetched_all = true;
				break;
			}
			if (status >= 200 && status < 300)
				d->skip = http_stream_is_partial(d->http) ? 0 : d->received;
			else if (status >= 300 || http_stream_outcome(d->http) != HTTP_OK)
			{
				char why[128];
				HttpOutcome o = http_stream_outcome(d->http);
				const char *err = http_stream_error(d->http);
				int ra = http_stream_retry_after_ms(d->http);

				if (err)
					snprintf(why, sizeof(why), "%s", err);
				else
					snprintf(why, sizeof(why), "HTTP status %ld", status);
				http_stream_close(d->http);
				d->http = NULL;
				attempt_failed(d, o, status, ra, why);
				continue;
			}
		}

		n = http_stream_read(d->http, dst, len);
		if (n > 0)
		{
			d->failures = 0;
			if (d->skip > 0)
			{
				size_t drop = (size_t) Min((int64) n, d->skip);

				d->skip -= drop;
				if (drop == n)
					continue;
				memmove(dst, dst + drop, n - drop);
				n -= drop;
			}
			d->received += n;
			return n;
		}

		outcome = http_stream_outcome(d->http);
		if (outcome == HTTP_OK)
		{
			http_stream_close(d->http);
			d->http = NULL;
			d->fetched_all = true;
			break;
		}
		else
		{
			char why[256];
			const char *err = http_stream_error(d->http);

			snprintf(why, sizeof(why), "%s", err ? err : "transfer failed");
			http_stream_close(d->http);
			d->http = NULL;
			attempt_failed(d, outcome, 0, -1, why);
		}
	}
	return 0;
}

/*
 * The object's next compressed bytes into inbuf. The first call returns at
 * least two unless the object is shorter: the gunzip stepper decides from
 * the first bytes it is fed whether they start with the gzip magic.
 */
static size_t
fetch_input(Download *d, size_t len)
{
	size_t n = fetch(d, (char *) d->inbuf, len);

	while (n == 1 && d->received == 1)
	{
		size_t more = fetch(d, (char *) d->inbuf + 1, len - 1);

		if (more == 0)
			break;
		n += more;
	}
	return n;
}

/* Raises the error of a gzip stream that is truncated */
static void
report_truncated(Download *d)
{
	ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED),
					errmsg("gzip stream of object \"%s\" is truncated", d->object_id),
					errdetail("The object ended after %lld compressed bytes, inside a gzip member.",
							  (long long) d->received)));
}

/* Raises the error of a gzip stream that is corrupt */
static void
report_corrupt(Download *d, const char *msg)
{
	ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED),
					errmsg("gzip stream of object \"%s\" is corrupt: %s", d->object_id, msg)));
}

/* Gives the inflater thread the object's next compressed bytes */
static void
feed_inflater(Download *d)
{
	size_t n = fetch_input(d, Min(DOWNLOAD_INBUF, INFLATER_CHUNK));

	if (n == 0)
	{
		inflater_end_input(d->inf);
		d->input_ended = true;
	}
	else
		inflater_put(d->inf, d->inbuf, n);
}

/* download_read with the inflater thread */
static size_t
read_threaded(Download *d, char *dst, size_t len)
{
	int wait_ms = 0;

	for (;;)
	{
		size_t got;
		bool may_end = false;
		const char *msg = NULL;

		switch (inflater_take(d->inf, dst, len, &got, wait_ms, &may_end, &msg))
		{
			case INFLATER_DATA:
				/* one more chunk for the thread to inflate while the caller works */
				if (!d->input_ended && inflater_has_room(d->inf))
					feed_inflater(d);
				return got;
			case INFLATER_END:
				if (!may_end)
					report_truncated(d);
				d->eof = true;
				return 0;
			case INFLATER_CORRUPT:
				report_corrupt(d, msg);
				break;
			case INFLATER_FAILED:
				ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("%s", msg)));
				break;
			case INFLATER_EMPTY:
				break;
		}
		http_check_interrupts();
		if (!d->input_ended && inflater_has_room(d->inf))
		{
			feed_inflater(d);
			wait_ms = 0;
		}
		else
			wait_ms = 100; /* the thread is busy: wait for its output */
	}
}

/*
 * Up to len decompressed bytes of the object into dst; 0 at its end.
 */
size_t
download_read(Download *d, char *dst, size_t len)
{
	if (d->eof || len == 0)
		return 0;
	if (d->inf)
		return read_threaded(d, dst, len);

	for (;;)
	{
		CodecGunzipStatus st;
		size_t produced;
		const char *msg;

		if (codec_gunzip_needs_input(&d->gz))
		{
			size_t n = fetch_input(d, DOWNLOAD_INBUF);

			if (n == 0)
			{
				/* an empty object has no records; a gzip one must not stop mid-member */
				if (!codec_gunzip_may_end(&d->gz))
					report_truncated(d);
				d->eof = true;
				return 0;
			}
			if (codec_gunzip_feed(&d->gz, d->inbuf, n) != CODEC_GUNZIP_OK)
				ereport(ERROR,
						(errcode(ERRCODE_OUT_OF_MEMORY), errmsg("could not initialize zlib")));
		}

		st = codec_gunzip_step(&d->gz, dst, len, &produced, &msg);
		if (st == CODEC_GUNZIP_RESET_FAILED)
			ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("could not reset zlib")));
		if (st == CODEC_GUNZIP_CORRUPT)
			report_corrupt(d, msg);
		if (produced > 0)
			return produced;
	}
}

int64
download_compressed_bytes(Download *d)
{
	return d->received;
}

void
download_close(Download *d)
{
	if (d->http)
		http_stream_close(d->http);
	d->http = NULL;
	download_cleanup(d);
}
