/*
 * libFuzzer harness for the gunzip stepper (src/codec.c).
 *
 * Input: byte 0 picks where the rest is split into two chunks, byte 1 the
 * size of the output buffer (1..64 bytes), the rest is the data.
 *	- the data, as it is, goes through the stepper in two chunks: whatever it
 *	  is, nothing may crash or leak, and bytes that do not start with the
 *	  gzip magic must come out unchanged;
 *	- the data, gzipped as two members (split at the same point), must come
 *	  back exactly, and may end there; cut short inside its last member, it
 *	  must not be allowed to end (truncated).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "codec.h"
#include "gzip_member.h"

#define OUT_CAP (1 << 20) /* stop after this much output (zip bombs) */

typedef enum
{
	RUN_OK,
	RUN_CORRUPT,
	RUN_CAPPED
} RunResult;

/* Feeds chunks through a fresh stepper; the output goes to out (OUT_CAP) */
static RunResult
run(const uint8_t *const *chunk, const size_t *clen, int nchunks, size_t outsz, uint8_t *out,
	size_t *outlen, bool *may_end)
{
	CodecGunzip g;
	RunResult res = RUN_OK;
	char buf[64];

	*outlen = 0;
	codec_gunzip_init(&g);
	for (int c = 0; c < nchunks && res == RUN_OK; c++)
	{
		if (clen[c] == 0)
			continue; /* the download never feeds nothing */
		if (!codec_gunzip_needs_input(&g))
			abort();
		if (codec_gunzip_feed(&g, chunk[c], clen[c]) != CODEC_GUNZIP_OK)
			abort(); /* only when zlib cannot allocate */
		for (;;)
		{
			size_t produced;
			const char *msg;
			CodecGunzipStatus st = codec_gunzip_step(&g, buf, outsz, &produced, &msg);

			if (produced > outsz)
				abort();
			if (st == CODEC_GUNZIP_NEED_INPUT)
			{
				if (produced != 0 || !codec_gunzip_needs_input(&g))
					abort();
				break;
			}
			if (st == CODEC_GUNZIP_CORRUPT)
			{
				if (msg == NULL || strlen(msg) == 0)
					abort();
				res = RUN_CORRUPT;
				break;
			}
			if (st != CODEC_GUNZIP_OK || produced == 0)
				abort();
			if (*outlen + produced > OUT_CAP)
			{
				res = RUN_CAPPED;
				break;
			}
			memcpy(out + *outlen, buf, produced);
			*outlen += produced;
		}
	}
	*may_end = codec_gunzip_may_end(&g);
	codec_gunzip_end(&g);
	codec_gunzip_end(&g); /* must be harmless twice */
	return res;
}

int
LLVMFuzzerTestOneInput(const uint8_t *input, size_t size)
{
	static uint8_t out[OUT_CAP];
	const uint8_t *data;
	size_t n, split, outsz, outlen, cap, m1, glen, cut;
	const uint8_t *chunk[2];
	size_t clen[2];
	uint8_t *gz;
	bool may_end;
	RunResult r;

	if (size < 2)
		return 0;
	data = input + 2;
	n = size - 2;
	split = n ? input[0] % (n + 1) : 0;
	outsz = 1 + input[1] % 64;

	/* arbitrary bytes */
	chunk[0] = data;
	clen[0] = split;
	chunk[1] = data + split;
	clen[1] = n - split;
	r = run(chunk, clen, 2, outsz, out, &outlen, &may_end);
	if (n > 0 && !(split >= 2 && data[0] == 0x1f && data[1] == 0x8b) &&
		!(split == 0 && n >= 2 && data[0] == 0x1f && data[1] == 0x8b))
	{
		/* not gzip: passed through */
		if (r != RUN_OK || outlen != n || memcmp(out, data, n) != 0 || !may_end)
			abort();
	}

	/* the data gzipped as two members round-trips, split anywhere */
	cap = 2 * compressBound(n) + 64;
	gz = malloc(cap);
	if (gz == NULL)
		return 0;
	m1 = gzip_member(data, split, gz, cap, 6);
	glen = m1 + gzip_member(data + split, n - split, gz + m1, cap - m1, 6);
	chunk[0] = gz;
	clen[0] = 2 + input[0] % (glen - 1); /* the magic comes whole, as from a download */
	chunk[1] = gz + clen[0];
	clen[1] = glen - clen[0];
	r = run(chunk, clen, 2, outsz, out, &outlen, &may_end);
	if (r != RUN_OK || outlen != n || (n > 0 && memcmp(out, data, n) != 0) || !may_end)
		abort();

	/* cut short inside the last member: truncated, never corrupt */
	cut = m1 + 1 + (input[1] % (glen - m1));
	if (cut < glen)
	{
		clen[0] = cut < clen[0] ? cut : clen[0];
		clen[1] = cut - clen[0];
		r = run(chunk, clen, 2, outsz, out, &outlen, &may_end);
		if (r != RUN_OK || may_end || outlen > n || (outlen > 0 && memcmp(out, data, outlen) != 0))
			abort();
	}
	free(gz);
	return 0;
}
