/*-------------------------------------------------------------------------
 *
 * download.h
 *	  The bytes of one result object: HTTP, resumption, gunzip.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_DOWNLOAD_H
#define CD2SYNC_DOWNLOAD_H

/* Gives a fresh presigned URL for an object whose URL stopped working */
typedef char *(*RefreshUrlFn)(void *arg, const char *object_id);

typedef struct Download Download;

extern Download *download_open(const char *object_id, const char *url, RefreshUrlFn refresh,
							   void *refresh_arg);
extern size_t download_read(Download *d, char *dst, size_t len);
extern int64 download_compressed_bytes(Download *d);
extern void download_close(Download *d);

#endif /* CD2SYNC_DOWNLOAD_H */
