/*
 * libFuzzer harness for the TSV field dropper (src/codec.c).
 *
 * Input: byte 0 gives the number of header fields (1..16), bytes 1-2 which
 * of them are kept, byte 3 seeds the chunking; the rest is TSV. Checks:
 * output never longer than input, as many newlines out as in, the same
 * output in chunks as in one go, and the same as a plain line-by-line
 * reference (kept fields joined by tabs; fields past the header each with
 * their tab, for COPY to complain about).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

static size_t
count_nl(const char *p, size_t n)
{
	size_t c = 0;

	for (size_t i = 0; i < n; i++)
		c += (p[i] == '\n');
	return c;
}

/* The expected output, built line by line and field by field */
static size_t
reference(const bool *keep, int nfields, const char *in, size_t n, char *out)
{
	size_t o = 0;
	size_t i = 0;

	while (i < n)
	{
		int field = 0;
		bool any = false;

		for (;;)
		{
			size_t start = i;
			bool k = field >= nfields || keep[field];

			while (i < n && in[i] != '\t' && in[i] != '\n')
				i++;
			if (field >= nfields)
				out[o++] = '\t';
			else if (k && any)
				out[o++] = '\t';
			if (k)
			{
				memcpy(out + o, in + start, i - start);
				o += i - start;
				if (field < nfields)
					any = true;
			}
			if (i < n && in[i] == '\t')
			{
				i++;
				field++;
				continue;
			}
			break;
		}
		if (i < n && in[i] == '\n')
		{
			out[o++] = '\n';
			i++;
		}
	}
	return o;
}

int
LLVMFuzzerTestOneInput(const uint8_t *input, size_t size)
{
	bool keep[16];
	int nfields;
	unsigned mask;
	uint32_t rng;
	const char *in;
	int n;
	char *one, *chunked, *ref;
	int o1, oc = 0;
	size_t oref;
	CodecFieldFilter f;

	if (size < 4 || size > (1 << 20))
		return 0;
	nfields = 1 + input[0] % 16;
	mask = input[1] | (input[2] << 8);
	for (int i = 0; i < 16; i++)
		keep[i] = (mask >> i) & 1;
	rng = input[3] * 2654435761u + 1;
	in = (const char *) input + 4;
	n = (int) (size - 4);

	one = malloc(n + 1);
	chunked = malloc(n + 1);
	ref = malloc(2 * (size_t) n + 2);

	codec_field_filter_init(&f, keep, nfields);
	o1 = codec_drop_fields(&f, in, n, one);
	if (o1 < 0 || o1 > n || count_nl(one, o1) != count_nl(in, n))
		abort();

	codec_field_filter_init(&f, keep, nfields);
	for (int i = 0; i < n;)
	{
		int len;

		rng = rng * 1103515245u + 12345u;
		len = (int) ((rng >> 16) % 9); /* chunks of 0..8 bytes */
		if (len > n - i)
			len = n - i;
		oc += codec_drop_fields(&f, in + i, len, chunked + oc);
		if (oc > i + len)
			abort();
		i += len;
	}
	if (oc != o1 || memcmp(one, chunked, o1) != 0)
		abort();

	oref = reference(keep, nfields, in, n, ref);
	if (oref != (size_t) o1 || memcmp(ref, one, o1) != 0)
		abort();

	free(one);
	free(chunked);
	free(ref);
	return 0;
}
