/*-------------------------------------------------------------------------
 *
 * decode.c
 *	  Result files to rows of the staging table, through PostgreSQL's own
 *	  COPY machinery.
 *
 * A file's bytes are pulled from the download as COPY asks for them
 * (BeginCopyFrom with a data source callback, the way logical replication's
 * table sync feeds COPY), so no file is ever held whole in memory.
 *
 * Formats:
 *	- TSV is PostgreSQL's COPY text format: fed to COPY as it is. This is the
 *	  default: it is the cheapest to decode and the one the official client
 *	  syncs with.
 *	- CSV (RFC 4180) is COPY's csv format.
 *	- JSON lines go whole into a one-column table (COPY csv with delimiter and
 *	  quote set to control characters that JSON text cannot hold raw); SQL
 *	  then picks their members by name with the jsonb operators.
 * TSV and CSV start with a header of dotted names (meta.ts, meta.action,
 * key.<col>, value.<col>); columns are mapped by those names, never by
 * position, and a name the target table does not have goes to a column that
 * is ignored. The format is recognised from the file itself (JSON starts
 * with '{'; a header with tabs is TSV), so a server that answers in another
 * format than the one asked for is still understood.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "access/table.h"
#include "catalog.h"
#include "catalog/namespace.h"
#include "codec.h"
#include "commands/copy.h"
#include "decode.h"
#include "nodes/makefuncs.h"
#include "parser/parse_node.h"
#include "parser/parse_relation.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

/* What the COPY data source callback reads from (COPY gives it no argument) */
typedef struct DecodeSource
{
	Download *download;
	char *ahead; /* bytes read while looking for the header */
	int ahead_len;
	int ahead_off;
	CodecLineCheck lines; /* the record length guard */

	/* direct load: TSV fields to drop (meta.*, unknown columns) */
	CodecFieldFilter filter; /* keep NULL: pass everything */
	char *scratch;           /* raw bytes before dropping fields */
	int scratch_size;
	int64 unreported;  /* bytes decoded since the last progress report */
	MemoryContext cxt; /* lives as long as the decoding of the object */
} DecodeSource;

static DecodeSource *source = NULL;

#define PROGRESS_EVERY (8 * 1024 * 1024)
void (*decode_progress_hook)(int64 bytes) = NULL;
static int ignored_columns = 0;

RecordFormat
decode_parse_format(const char *name)
{
	if (pg_strcasecmp(name, "tsv") == 0)
		return FORMAT_TSV;
	if (pg_strcasecmp(name, "csv") == 0)
		return FORMAT_CSV;
	if (pg_strcasecmp(name, "jsonl") == 0)
		return FORMAT_JSONL;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unsupported cd2sync.format \"%s\"", name), errhint("Use tsv, csv or jsonl.")));
	return FORMAT_TSV; /* keep the compiler quiet */
}

const char *
decode_format_name(RecordFormat f)
{
	return f == FORMAT_TSV ? "tsv" : (f == FORMAT_CSV ? "csv" : "jsonl");
}

/* Guards against records too long to hold: a file must not exhaust memory */
static void
check_line_length(const char *buf, int n)
{
	if (!codec_line_check(&source->lines, buf, n, cd2_max_line_length))
		ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						errmsg("a record is longer than cd2sync.max_line_length (%d bytes)",
							   cd2_max_line_length)));
}

/* The bytes after the header, then the download's */
static int
raw_read(char *out, int minread, int maxread)
{
	int n = 0;

	while (n < minread && n < maxread)
	{
		size_t got;

		if (source->ahead_off < source->ahead_len)
		{
			got = Min(maxread - n, source->ahead_len - source->ahead_off);
			memcpy(out + n, source->ahead + source->ahead_off, got);
			source->ahead_off += got;
		}
		else
		{
			got = download_read(source->download, out + n, maxread - n);
			if (got == 0)
				break;
		}
		n += got;
	}
	return n;
}

/* COPY's data source */
static int
copy_source_cb(void *outbuf, int minread, int maxread)
{
	char *out = (char *) outbuf;
	int n;

	if (source->filter.keep == NULL)
		n = raw_read(out, minread, maxread);
	else
	{
		/* COPY calls this in a context it resets: keep the buffer in ours */
		if (source->scratch_size < maxread)
		{
			source->scratch = MemoryContextAlloc(source->cxt, maxread);
			source->scratch_size = maxread;
		}
		do
		{
			int raw = raw_read(source->scratch, 1, maxread);

			if (raw == 0)
				return 0;
			n = codec_drop_fields(&source->filter, source->scratch, raw, out);
		} while (n == 0);
	}
	if (n > 0)
	{
		check_line_length(out, n);
		source->unreported += n;
		if (source->unreported >= PROGRESS_EVERY && decode_progress_hook)
		{
			decode_progress_hook(source->unreported);
			source->unreported = 0;
		}
	}
	return n;
}

/*
 * Splits a header line into names. CSV names may be double-quoted.
 */
static List *
split_header(char *line, char delim)
{
	List *names = NIL;
	char *p = line;

	for (;;)
	{
		StringInfoData name;

		initStringInfo(&name);
		if (delim == ',' && *p == '"')
		{
			p++;
			while (*p)
			{
				if (*p == '"' && p[1] == '"')
				{
					appendStringInfoChar(&name, '"');
					p += 2;
				}
				else if (*p == '"')
				{
					p++;
					break;
				}
				else
					appendStringInfoChar(&name, *p++);
			}
			while (*p && *p != delim)
				p++;
		}
		else
		{
			while (*p && *p != delim)
				appendStringInfoChar(&name, *p++);
		}
		names = lappend(names, name.data);
		if (*p != delim)
			break;
		p++;
	}
	return names;
}

/* Adds a text column to the staging table for a header name we ignore */
static char *
add_ignored_column(void)
{
	char *col = psprintf("cd2_ignored_%d", ++ignored_columns);

	catalog_add_staging_column(col);
	return col;
}

/*
 * The column of rel a header name goes to ("key." and "value." dropped), or
 * NULL when rel has none (meta.* names, unknown names, cd2_* names).
 */
static char *
header_column(const char *name, Oid rel)
{
	const char *col = name;

	if (strncmp(name, "key.", 4) == 0)
		col = name + 4;
	else if (strncmp(name, "value.", 6) == 0)
		col = name + 6;
	else if (strncmp(name, "meta.", 5) == 0)
		return NULL;
	if (strncmp(col, "cd2_", 4) == 0 || get_attnum(rel, col) == InvalidAttrNumber)
		return NULL;
	return pstrdup(col);
}

/* Adds a column to a COPY column list; a header may name a column once */
static List *
append_attname(List *attnames, const char *col)
{
	ListCell *lc;

	foreach (lc, attnames)
	{
		if (strcmp(strVal(lfirst(lc)), col) == 0)
			ereport(ERROR, (errcode(ERRCODE_DUPLICATE_COLUMN),
							errmsg("the header of a result file names column \"%s\" twice", col)));
	}
	return lappend(attnames, makeString(pstrdup(col)));
}

/*
 * The staging columns, in header order, for the names of a TSV/CSV header;
 * adds the target columns it carries to *columns.
 */
static List *
map_header(List *names, Oid stage, List **columns)
{
	List *attnames = NIL;
	ListCell *lc;

	foreach (lc, names)
	{
		char *name = (char *) lfirst(lc);
		char *col;

		if (strcmp(name, "meta.action") == 0)
			col = "cd2_action";
		else if (strcmp(name, "meta.ts") == 0)
			col = "cd2_ts";
		else if ((col = header_column(name, stage)) != NULL)
		{
			ListCell *lc2;
			bool known = false;

			foreach (lc2, *columns)
				known |= (strcmp((char *) lfirst(lc2), col) == 0);
			if (!known)
				*columns = lappend(*columns, col);
		}
		else
			col = add_ignored_column();
		attnames = append_attname(attnames, col);
	}
	return attnames;
}

/*
 * For a load straight into the target table: the target columns a TSV
 * header's fields go to, and which fields to drop (meta.*, unknown names).
 */
static List *
map_header_direct(List *names, Oid target, bool **keep)
{
	List *attnames = NIL;
	ListCell *lc;

	*keep = palloc0(sizeof(bool) * Max(list_length(names), 1));
	foreach (lc, names)
	{
		char *col = header_column((char *) lfirst(lc), target);

		if (col == NULL)
			continue;
		(*keep)[foreach_current_index(lc)] = true;
		attnames = append_attname(attnames, col);
	}
	return attnames;
}

static uint64
copy_into(Oid relid, List *attnames, List *options)
{
	Relation rel = table_open(relid, RowExclusiveLock);
	ParseState *pstate = make_parsestate(NULL);
	CopyFromState cstate;
	uint64 rows;

	(void) addRangeTableEntryForRelation(pstate, rel, RowExclusiveLock, NULL, false, false);
	cstate = BeginCopyFrom(pstate, rel, NULL, NULL, false, copy_source_cb, attnames, options);
	rows = CopyFrom(cstate);
	EndCopyFrom(cstate);
	free_parsestate(pstate);
	table_close(rel, NoLock);
	return rows;
}

static uint64
decode_open_object(Download *d, RecordFormat asked, Oid direct, List **columns, bool *was_jsonl)
{
	DecodeSource src = { 0 };
	StringInfoData head;
	char *nl = NULL;
	char chunk[8192];
	const char *first;
	uint64 rows;
	List *options = NIL;

	src.download = d;
	src.cxt = CurrentMemoryContext;
	codec_line_check_init(&src.lines, 0); /* (JSON lines and CSV: their quote, below) */
	source = &src;
	*was_jsonl = false;

	/* read until the end of the first line */
	initStringInfo(&head);
	while (nl == NULL)
	{
		size_t n = download_read(d, chunk, sizeof(chunk));

		if (n == 0)
			break;
		appendBinaryStringInfo(&head, chunk, n);
		nl = memchr(head.data, '\n', head.len);
		if (nl == NULL && head.len > cd2_max_line_length)
			check_line_length(head.data, head.len);
	}
	first = head.data;
	while (first < head.data + head.len && isspace((unsigned char) *first))
		first++;
	if (first == head.data + head.len)
		return 0; /* an empty file */

	if (*first == '{' ||
		(asked == FORMAT_JSONL && *first != '"' && memchr(head.data, '\t', head.len) == NULL))
	{
		/* JSON lines: every byte is data, one record a line */
		src.ahead = head.data;
		src.ahead_len = head.len;
		*was_jsonl = true;
		/* a record is measured as COPY reads it: a raw 0x02 (not JSON, and
		 * COPY's quote here) holds the newlines after it in the record */
		codec_line_check_init(&src.lines, '\x02');
		options = list_make3(makeDefElem("format", (Node *) makeString("csv"), -1),
							 makeDefElem("delimiter", (Node *) makeString("\x01"), -1),
							 makeDefElem("quote", (Node *) makeString("\x02"), -1));
		if (OidIsValid(direct))
			ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
							errmsg("a direct load takes TSV files only")));
		rows = copy_into(RangeVarGetRelid(makeRangeVar("pg_temp", "cd2_stage_json", -1),
										  RowExclusiveLock, false),
						 list_make1(makeString("line")), options);
	}
	else
	{
		int linelen = nl ? nl - head.data : head.len;
		char *line = pnstrdup(head.data, linelen);
		bool tsv;
		List *attnames;
		List *names;
		Oid into;
		bool *keep;

		if (linelen > 0 && line[linelen - 1] == '\r')
			line[linelen - 1] = '\0';
		tsv = strchr(line, '\t') != NULL || (strchr(line, ',') == NULL && asked != FORMAT_CSV);
		names = split_header(line, tsv ? '\t' : ',');
		if (OidIsValid(direct))
		{
			if (!tsv)
				ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
								errmsg("a direct load takes TSV files only")));
			into = direct;
			attnames = map_header_direct(names, direct, &keep);
			codec_field_filter_init(&src.filter, keep, list_length(names));
		}
		else
		{
			into =
				RangeVarGetRelid(makeRangeVar("pg_temp", "cd2_stage", -1), RowExclusiveLock, false);
			attnames = map_header(names, into, columns);
		}

		src.ahead = head.data;
		src.ahead_off = nl ? linelen + 1 : head.len;
		src.ahead_len = head.len;
		if (!tsv)
		{
			options = list_make1(makeDefElem("format", (Node *) makeString("csv"), -1));
			/* a quoted field may hold newlines: count records, not lines */
			codec_line_check_init(&src.lines, '"');
		}
		rows = copy_into(into, attnames, options);
	}
	/*
	 * COPY ends its data at a line of "\." alone, and takes nothing after
	 * it: fewer rows than the records it was given is an object cut short,
	 * which must fail, not be applied as whole.
	 */
	if (rows < (uint64) src.lines.records)
		ereport(ERROR, (errcode(ERRCODE_BAD_COPY_FILE_FORMAT),
						errmsg("an object was cut short: COPY took %llu of its %lld records",
							   (unsigned long long) rows, (long long) src.lines.records),
						errdetail("A line holds \"\\.\" alone, which COPY reads as the end of its "
								  "data.")));
	if (src.unreported > 0 && decode_progress_hook)
		decode_progress_hook(src.unreported);
	source = NULL;
	return rows;
}

/*
 * decode_open_object, closing the download if it fails: its connection and
 * inflater thread go at once, not with the caller's memory.
 */
uint64
decode_object(Download *d, RecordFormat asked, Oid direct, List **columns, bool *was_jsonl)
{
	volatile uint64 records = 0;

	PG_TRY();
	{
		records = decode_open_object(d, asked, direct, columns, was_jsonl);
	}
	PG_CATCH();
	{
		download_close(d);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return records;
}
