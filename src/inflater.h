/*-------------------------------------------------------------------------
 *
 * inflater.h
 *	  The gunzip stepper (codec.h) on a thread of its own, so that inflating
 *	  a result object overlaps with COPY parsing and storing what came before.
 *
 * The backend's thread puts compressed chunks in and takes decompressed
 * bytes out; the inflater thread runs codec_gunzip between two bounded
 * buffers. Free of PostgreSQL like codec.c: the thread never allocates with
 * palloc, never reports with ereport and never sees a signal (all are
 * blocked in it); the backend's side turns statuses into errors.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_INFLATER_H
#define CD2SYNC_INFLATER_H

#include <stdbool.h>
#include <stddef.h>

#define INFLATER_CHUNK (64 * 1024) /* largest chunk inflater_put takes */

typedef struct Inflater Inflater;

typedef enum InflaterStatus
{
	INFLATER_DATA,    /* bytes were taken */
	INFLATER_EMPTY,   /* nothing yet: put more input, or wait */
	INFLATER_END,     /* all input was inflated and taken */
	INFLATER_CORRUPT, /* not a valid gzip stream (see the message) */
	INFLATER_FAILED   /* zlib could not be initialized or reset */
} InflaterStatus;

/* Starts the thread (malloc'd state); NULL if it could not be started. */
extern Inflater *inflater_start(void);

/*
 * Whether inflater_put would take a chunk now without waiting; false once the
 * thread has finished (inflater_take then says how).
 */
extern bool inflater_has_room(Inflater *inf);

/* Copies up to INFLATER_CHUNK compressed bytes in; waits for room. */
extern void inflater_put(Inflater *inf, const unsigned char *in, size_t n);

/* No more input will come */
extern void inflater_end_input(Inflater *inf);

/*
 * Takes up to len decompressed bytes; waits up to wait_ms for some (0: does
 * not wait). At INFLATER_END, *may_end says whether the stream may end
 * there (false: it stopped inside a gzip member); at INFLATER_CORRUPT, *msg
 * says why.
 */
extern InflaterStatus inflater_take(Inflater *inf, char *dst, size_t len, size_t *got, int wait_ms,
									bool *may_end, const char **msg);

/* Stops the thread, waits for it and frees everything. */
extern void inflater_stop(Inflater *inf);

#endif /* CD2SYNC_INFLATER_H */
