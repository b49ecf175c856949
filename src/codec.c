/*-------------------------------------------------------------------------
 *
 * codec.c
 *	  The byte-level decoders of result files, free of PostgreSQL.
 *
 * See codec.h. Kept apart from download.c and decode.c so that they can
 * be built into standalone harnesses and fuzzed (fuzz/, scripts/fuzz.sh).
 *
 *-------------------------------------------------------------------------
 */
#include "codec.h"

#include <string.h>

void
codec_gunzip_init(CodecGunzip *g)
{
	memset(g, 0, sizeof(*g));
}

bool
codec_gunzip_needs_input(const CodecGunzip *g)
{
	return g->zs.avail_in == 0;
}

/*
 * Gives the next input bytes (n > 0); the first call decides whether the
 * stream is gzip.
 */
CodecGunzipStatus
codec_gunzip_feed(CodecGunzip *g, const unsigned char *in, size_t n)
{
	g->zs.next_in = (Bytef *) in;
	g->zs.avail_in = (uInt) n;
	if (!g->detected)
	{
		g->detected = true;
		g->gzip = (n >= 2 && in[0] == 0x1f && in[1] == 0x8b);
		if (g->gzip)
		{
			if (inflateInit2(&g->zs, 16 + MAX_WBITS) != Z_OK)
				return CODEC_GUNZIP_INIT_FAILED;
			g->zinit = true;
		}
	}
	return CODEC_GUNZIP_OK;
}

/*
 * Up to len output bytes into out (*produced of them). Returns NEED_INPUT
 * with nothing produced once the input fed is used up; on CORRUPT, *msg
 * says why.
 */
CodecGunzipStatus
codec_gunzip_step(CodecGunzip *g, char *out, size_t len, size_t *produced, const char **msg)
{
	*produced = 0;
	*msg = NULL;
	if (g->zs.avail_in == 0)
		return CODEC_GUNZIP_NEED_INPUT;

	if (!g->gzip)
	{
		size_t n = len < g->zs.avail_in ? len : g->zs.avail_in;

		memcpy(out, g->zs.next_in, n);
		g->zs.next_in += n;
		g->zs.avail_in -= (uInt) n;
		*produced = n;
		return CODEC_GUNZIP_OK;
	}

	for (;;)
	{
		int rc;

		if (g->zs.avail_in == 0)
			return CODEC_GUNZIP_NEED_INPUT;
		if (g->member_ended)
		{
			/* more input after a member's end: the next member starts */
			if (inflateReset(&g->zs) != Z_OK)
				return CODEC_GUNZIP_RESET_FAILED;
			g->member_ended = false;
		}

		g->zs.next_out = (Bytef *) out;
		g->zs.avail_out = (uInt) len;
		rc = inflate(&g->zs, Z_NO_FLUSH);
		*produced = len - g->zs.avail_out;
		if (rc == Z_STREAM_END)
			g->member_ended = true;
		else if (rc != Z_OK && rc != Z_BUF_ERROR)
		{
			*msg = g->zs.msg ? g->zs.msg : "inflate failed";
			return CODEC_GUNZIP_CORRUPT;
		}
		if (*produced > 0)
			return CODEC_GUNZIP_OK;
	}
}

/* Whether the input may end here: not inside a gzip member (truncated) */
bool
codec_gunzip_may_end(const CodecGunzip *g)
{
	return !g->gzip || g->member_ended;
}

/* Frees zlib's state; may be called more than once */
void
codec_gunzip_end(CodecGunzip *g)
{
	if (g->zinit)
	{
		inflateEnd(&g->zs);
		g->zinit = false;
	}
}

void
codec_field_filter_init(CodecFieldFilter *f, const bool *keep, int nfields)
{
	f->keep = keep;
	f->nfields = nfields;
	f->field = 0;
	f->emitted_any = keep[0];
}

/*
 * Copies TSV bytes from in to out without the dropped fields; out must hold
 * n bytes. In COPY text format a raw tab always separates fields and a raw
 * newline always ends a record (data tabs and newlines are escaped), so this
 * needs no parsing: it finds them with memchr and copies whole spans.
 */
int
codec_drop_fields(CodecFieldFilter *f, const char *in, int n, char *out)
{
	int o = 0;
	int i = 0;

	while (i < n)
	{
		const char *line = in + i;
		const char *nl = memchr(line, '\n', n - i);
		int len = nl ? (int) (nl - line) : n - i; /* bytes of this record in the chunk */
		int k = 0;

		while (k < len)
		{
			const char *tab = memchr(line + k, '\t', len - k);
			int end = tab ? (int) (tab - line) : len;

			if (f->field >= f->nfields || f->keep[f->field])
			{
				memcpy(out + o, line + k, end - k);
				o += end - k;
			}
			if (tab == NULL)
				break;
			f->field++;
			if (f->field < f->nfields && f->keep[f->field])
			{
				if (f->emitted_any)
					out[o++] = '\t';
				f->emitted_any = true;
			}
			else if (f->field >= f->nfields)
				out[o++] = '\t'; /* more fields than the header: let COPY complain */
			k = end + 1;
		}
		i += len;
		if (nl)
		{
			out[o++] = '\n';
			f->field = 0;
			f->emitted_any = f->keep[0];
			i++;
		}
	}
	return o;
}

void
codec_line_check_init(CodecLineCheck *c, char quote)
{
	c->line_bytes = 0;
	c->records = 0;
	c->quote = quote;
	c->quoted = false;
}

/*
 * Takes the next bytes of the stream; false when a record (so far) is
 * longer than limit bytes. Guards against records too long to hold. With a
 * quote character, a newline inside quotes is part of the record (a doubled
 * quote inside a quoted field toggles twice: it changes nothing).
 */
bool
codec_line_check(CodecLineCheck *c, const char *buf, size_t n, int64_t limit)
{
	const char *p = buf;
	const char *end = buf + n;
	const char *nl = NULL;

	if (c->quote != 0)
	{
		for (; p < end; p++)
		{
			if (*p == c->quote)
				c->quoted = !c->quoted;
			else if (*p == '\n' && !c->quoted)
			{
				c->line_bytes = 0;
				c->records++;
				continue;
			}
			if (++c->line_bytes > limit)
				return false;
		}
		return true;
	}
	while (p < end && (nl = memchr(p, '\n', end - p)) != NULL)
	{
		if (c->line_bytes + (nl - p) > limit)
			return false;
		c->line_bytes = 0;
		c->records++;
		p = nl + 1;
	}
	c->line_bytes += end - p;
	return c->line_bytes <= limit;
}
