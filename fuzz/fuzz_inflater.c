/*
 * libFuzzer harness for the inflater thread (src/inflater.c): the gunzip
 * stepper on a thread of its own, between two bounded buffers.
 *
 * Input: byte 0 picks the size of the chunks put in (1..256 bytes, or 64 kB),
 * byte 1 the size of the buffer taken into (1..64 bytes, or 64 kB), byte 2
 * what the rest becomes and when to stop reading:
 *	- bits 0-1: 0 the bytes as they are, 1 a gzip member of them, 2 the same
 *	  cut short by one byte, 3 a gzip member of them repeated until the output
 *	  is over 2 MB (the 1 MB output ring fills and wraps);
 *	- bits 2-7: if not zero, stop taking after that many 32 kB steps and
 *	  stop the thread while it may be blocked (no hang, no leak).
 * Whatever comes out must equal what the stepper gives when driven directly
 * (fuzz_gunzip.c checks that one), with the same ending: END and whether the
 * stream may end there, or CORRUPT.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "codec.h"
#include "gzip_member.h"
#include "inflater.h"

#define OUT_CAP (4 << 20)

typedef enum
{
	END_OK,
	END_TRUNCATED,
	END_CORRUPT,
	END_STOPPED
} Ending;

/* The stepper driven directly, in one go */
static Ending
reference(const uint8_t *in, size_t n, uint8_t *out, size_t *outlen)
{
	CodecGunzip g;
	Ending e = END_OK;
	static char buf[65536];

	*outlen = 0;
	codec_gunzip_init(&g);
	if (n > 0)
	{
		if (codec_gunzip_feed(&g, in, n) != CODEC_GUNZIP_OK)
			abort();
		while (!codec_gunzip_needs_input(&g))
		{
			size_t produced;
			const char *msg;
			CodecGunzipStatus st = codec_gunzip_step(&g, buf, sizeof(buf), &produced, &msg);

			if (st == CODEC_GUNZIP_CORRUPT)
			{
				e = END_CORRUPT;
				break;
			}
			if (*outlen + produced > OUT_CAP)
				abort();
			memcpy(out + *outlen, buf, produced);
			*outlen += produced;
		}
	}
	if (e == END_OK && !codec_gunzip_may_end(&g))
		e = END_TRUNCATED;
	codec_gunzip_end(&g);
	return e;
}

/* The same through the inflater thread */
static Ending
threaded(const uint8_t *in, size_t n, size_t chunk, size_t take, int stop_after, uint8_t *out,
		 size_t *outlen)
{
	Inflater *inf = inflater_start();
	size_t off = 0;
	bool ended = false;
	int steps = 0;
	Ending e = END_STOPPED;
	static char buf[65536];

	if (inf == NULL)
		abort();
	*outlen = 0;
	for (;;)
	{
		size_t got;
		bool may_end = false;
		const char *msg = NULL;
		InflaterStatus st;

		if (stop_after > 0 && steps >= stop_after)
			break; /* stop while the thread may be blocked on a full ring */
		if (!ended && inflater_has_room(inf))
		{
			if (off < n)
			{
				/* the first chunk holds the gzip magic whole (download.c sees to it) */
				size_t want = off == 0 && chunk < 2 ? 2 : chunk;
				size_t k = n - off < want ? n - off : want;

				inflater_put(inf, in + off, k);
				off += k;
			}
			else
			{
				inflater_end_input(inf);
				ended = true;
			}
		}
		st = inflater_take(inf, buf, take, &got, ended ? 50 : 0, &may_end, &msg);
		if (st == INFLATER_DATA)
		{
			if (got == 0 || got > take || *outlen + got > OUT_CAP)
				abort();
			memcpy(out + *outlen, buf, got);
			*outlen += got;
			if ((*outlen / 32768) > (size_t) steps)
				steps = (int) (*outlen / 32768);
			continue;
		}
		if (st == INFLATER_END)
		{
			e = may_end ? END_OK : END_TRUNCATED;
			break;
		}
		if (st == INFLATER_CORRUPT)
		{
			if (msg == NULL || msg[0] == '\0')
				abort();
			e = END_CORRUPT;
			break;
		}
		if (st == INFLATER_FAILED)
			abort();
	}
	inflater_stop(inf);
	return e;
}

int
LLVMFuzzerTestOneInput(const uint8_t *input, size_t size)
{
	static uint8_t ref[OUT_CAP], got[OUT_CAP], src[OUT_CAP / 2], gz[OUT_CAP];
	const uint8_t *data, *in;
	size_t n, len, chunk, take, reflen, gotlen;
	int mode, stop_after;
	Ending re, te;

	if (size < 3)
		return 0;
	chunk = input[0] == 255 ? 65536 : 1 + input[0];
	take = input[1] == 255 ? 65536 : 1 + input[1] % 64;
	mode = input[2] & 3;
	stop_after = input[2] >> 2;
	data = input + 3;
	n = size - 3;

	in = data;
	len = n;
	if (mode == 1 || mode == 2)
	{
		len = gzip_member(data, n, gz, sizeof(gz), 1);
		if (mode == 2 && len > 0)
			len--;
		in = gz;
	}
	else if (mode == 3)
	{
		size_t m = 0;

		if (n == 0)
			return 0;
		while (m + n <= sizeof(src) && m < (2u << 20) + 1)
		{
			memcpy(src + m, data, n);
			m += n;
		}
		len = gzip_member(src, m, gz, sizeof(gz), 1);
		in = gz;
	}

	re = reference(in, len, ref, &reflen);
	te = threaded(in, len, chunk, take, stop_after, got, &gotlen);
	if (te == END_STOPPED)
	{
		/* stopped early: what came out is a prefix of the whole */
		if (gotlen > reflen || memcmp(got, ref, gotlen) != 0)
			abort();
		return 0;
	}
	if (te != re)
		abort();
	if (re == END_CORRUPT)
	{
		/* bytes before the corruption may be cut at a different point */
		size_t k = gotlen < reflen ? gotlen : reflen;

		if (memcmp(got, ref, k) != 0)
			abort();
		return 0;
	}
	if (gotlen != reflen || memcmp(got, ref, reflen) != 0)
		abort();
	return 0;
}
