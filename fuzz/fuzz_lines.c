/*
 * libFuzzer harness for the record length guard (src/codec.c).
 *
 * Input: bytes 0-1 give the limit (0..1023), byte 2 seeds the chunking (its
 * lowest bit: CSV quoting, '"'); the rest is the data. The guard fed in
 * chunks (stopping at its first no) must agree with the guard fed everything
 * at once and with the plain answer: is some record, the last unfinished one
 * included, longer than the limit? (A record ends at a newline outside
 * quotes.)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

int
LLVMFuzzerTestOneInput(const uint8_t *input, size_t size)
{
	int64_t limit;
	uint32_t rng;
	const char *in;
	size_t n, run = 0;
	bool one, chunked = true, expected = true, quoted = false;
	char quote;
	CodecLineCheck c;

	if (size < 3)
		return 0;
	limit = (input[0] | (input[1] << 8)) % 1024;
	quote = (input[2] & 1) ? '"' : 0;
	rng = input[2] * 2654435761u + 1;
	in = (const char *) input + 3;
	n = size - 3;

	for (size_t i = 0; i < n; i++)
	{
		if (quote && in[i] == quote)
			quoted = !quoted;
		else if (in[i] == '\n' && !quoted)
		{
			run = 0;
			continue;
		}
		if ((int64_t) ++run > limit)
			expected = false;
	}

	codec_line_check_init(&c, quote);
	one = codec_line_check(&c, in, n, limit);

	codec_line_check_init(&c, quote);
	for (size_t i = 0; i < n && chunked;)
	{
		size_t len;

		rng = rng * 1103515245u + 12345u;
		len = (rng >> 16) % 300; /* chunks of 0..299 bytes */
		if (len > n - i)
			len = n - i;
		chunked = codec_line_check(&c, in + i, len, limit);
		i += len;
	}
	if (n == 0)
		chunked = codec_line_check(&c, in, 0, limit);

	if (one != expected || chunked != expected)
		abort();
	return 0;
}
