/*-------------------------------------------------------------------------
 *
 * codec.h
 *	  The byte-level decoders of result files, free of PostgreSQL: gunzip
 *	  (multi-member, pass-through for plain data), the TSV field dropper and
 *	  the record length guard.
 *
 * download.c and decode.c wrap these with PostgreSQL's memory management
 * and error reporting; fuzz/ drives them directly (scripts/fuzz.sh).
 * Nothing here allocates except zlib's own state, or reports errors other
 * than by return value.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_CODEC_H
#define CD2SYNC_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

/*
 * Gunzip stepper. Input is given with codec_gunzip_feed when
 * codec_gunzip_needs_input says so, and must stay valid until it has been
 * consumed; codec_gunzip_step then yields output. The first bytes fed decide
 * the mode: with the gzip magic they are inflated member after member,
 * without it they pass through as they are.
 */
typedef enum CodecGunzipStatus
{
	CODEC_GUNZIP_OK,          /* output was produced (or input taken) */
	CODEC_GUNZIP_NEED_INPUT,  /* all input consumed: feed more */
	CODEC_GUNZIP_CORRUPT,     /* not a valid gzip stream; see the message */
	CODEC_GUNZIP_INIT_FAILED, /* zlib could not be initialized */
	CODEC_GUNZIP_RESET_FAILED /* zlib could not start the next member */
} CodecGunzipStatus;

typedef struct CodecGunzip
{
	bool detected;     /* know whether it is gzip */
	bool gzip;         /* the stream starts with the gzip magic */
	bool zinit;        /* zs holds zlib state to free */
	bool member_ended; /* the last inflate hit Z_STREAM_END */
	z_stream zs;
} CodecGunzip;

extern void codec_gunzip_init(CodecGunzip *g);
extern bool codec_gunzip_needs_input(const CodecGunzip *g);
extern CodecGunzipStatus codec_gunzip_feed(CodecGunzip *g, const unsigned char *in, size_t n);
extern CodecGunzipStatus codec_gunzip_step(CodecGunzip *g, char *out, size_t len, size_t *produced,
										   const char **msg);
extern bool codec_gunzip_may_end(const CodecGunzip *g);
extern void codec_gunzip_end(CodecGunzip *g);

/*
 * TSV field dropper: copies COPY text format bytes without the fields whose
 * keep[] is false. State carries over calls, so input may come in any
 * chunks. keep must have at least max(nfields, 1) entries.
 */
typedef struct CodecFieldFilter
{
	const bool *keep; /* per header field */
	int nfields;
	int field;        /* field of the current line being read */
	bool emitted_any; /* the current output line has a field already */
} CodecFieldFilter;

extern void codec_field_filter_init(CodecFieldFilter *f, const bool *keep, int nfields);
extern int codec_drop_fields(CodecFieldFilter *f, const char *in, int n, char *out);

/*
 * Record length guard: whether a record (without its newline) exceeds a
 * limit. A record ends at a newline, except inside a quoted field when the
 * format has a quote character (CSV: a field may hold newlines).
 */
typedef struct CodecLineCheck
{
	int64_t line_bytes; /* bytes since the record began */
	int64_t records;    /* records ended (their newline seen) */
	char quote;         /* CSV's quote character, or 0: no quoting */
	bool quoted;        /* inside a quoted field */
} CodecLineCheck;

extern void codec_line_check_init(CodecLineCheck *c, char quote);
extern bool codec_line_check(CodecLineCheck *c, const char *buf, size_t n, int64_t limit);

#endif /* CD2SYNC_CODEC_H */
