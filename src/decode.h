/*-------------------------------------------------------------------------
 *
 * decode.h
 *	  Result files to rows of the staging table, through COPY.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CD2SYNC_DECODE_H
#define CD2SYNC_DECODE_H

#include "download.h"
#include "nodes/pg_list.h"

typedef enum RecordFormat
{
	FORMAT_TSV,
	FORMAT_CSV,
	FORMAT_JSONL
} RecordFormat;

extern RecordFormat decode_parse_format(const char *name);
extern const char *decode_format_name(RecordFormat f);

/*
 * Decodes one object into pg_temp.cd2_stage (pg_temp.cd2_stage_json for
 * JSON lines), or, when direct is a relation, straight into it (TSV only). Adds to *columns (char *) the target columns its header names, and
 * sets *was_jsonl when the file held JSON lines. Returns the records read.
 * On an error, closes d before raising it.
 */
extern uint64 decode_object(Download *d, RecordFormat asked, Oid direct, List **columns,
							bool *was_jsonl);

/* Called every few megabytes decoded, with their number, when set */
extern void (*decode_progress_hook)(int64 bytes);

#endif /* CD2SYNC_DECODE_H */
