/*
 * gzip_member: the fuzz harnesses' way of making gzip input. Standalone
 * (each harness is its own program), hence static.
 */
#ifndef CD2SYNC_FUZZ_GZIP_MEMBER_H
#define CD2SYNC_FUZZ_GZIP_MEMBER_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* data as one gzip member (at compression level), written at dst; returns its length */
static size_t
gzip_member(const uint8_t *data, size_t n, uint8_t *dst, size_t cap, int level)
{
	z_stream zs;
	size_t len;

	memset(&zs, 0, sizeof(zs));
	if (deflateInit2(&zs, level, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
		abort();
	zs.next_in = (Bytef *) data;
	zs.avail_in = (uInt) n;
	zs.next_out = dst;
	zs.avail_out = (uInt) cap;
	if (deflate(&zs, Z_FINISH) != Z_STREAM_END)
		abort();
	len = cap - zs.avail_out;
	deflateEnd(&zs);
	return len;
}

#endif /* CD2SYNC_FUZZ_GZIP_MEMBER_H */
