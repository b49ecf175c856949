/*-------------------------------------------------------------------------
 *
 * capture.c
 *	  What a change feed writes of an instance table's rows: as a statement
 *	  changes each row, the row as cd2.<table> shows it before and after,
 *	  compared column by column; a change (with the after-image as jsonb)
 *	  written to cd2sync.changes in the same transaction.
 *
 * The capture is an AFTER ROW trigger (cd2sync._feed_capture_row) on each
 * followed instance table. What a row looks like in the view is SQL's to
 * say (cd2sync._view_select, via cd2sync._feed_row_plan): the trigger
 * parses that statement once per statement it serves, and evaluates its
 * select list over each old and new row, as the executor would, without a
 * query per row. Changes are inserted directly into cd2sync.changes (its
 * indexes, constraints and WAL, as an INSERT would), with positions taken
 * under the lock _feed_lock takes: they grow in commit order. Nothing is
 * written when no feed that is not stale follows the table. In a merge
 * pass (feeds.sql, _feed_merge_begin) an update keeps the row's image from
 * before instead, and the pass's end writes one change per row it changed.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/tupconvert.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "optimizer/optimizer.h"
#include "parser/analyze.h"
#include "parser/parse_coerce.h"
#include "parser/parser.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

PG_FUNCTION_INFO_V1(cd2_row_image);
PG_FUNCTION_INFO_V1(cd2_feed_capture_row);
PG_FUNCTION_INFO_V1(cd2_changed_columns);

/* ---------------------------------------------------------------------------
 * A row's image: to_jsonb's, faster
 *
 * to_jsonb looks up each column's type and output function again for every
 * row and turns every integer into text and back into a number; an image
 * looks them up once per row type and converts the types cd2sync's tables
 * hold directly. A column of any other kind (an array, a composite, json, a
 * type with a cast to json) goes through to_jsonb itself, so the two never
 * differ (sql/feeds.sql compares them for every kind of column).
 * ---------------------------------------------------------------------------
 */
typedef enum ImageKind
{
	IMAGE_BOOL,
	IMAGE_INT2,
	IMAGE_INT4,
	IMAGE_INT8,
	IMAGE_NUMBER, /* float, numeric: a number unless its text is not one */
	IMAGE_DATETIME,
	IMAGE_TEXT, /* text, varchar, bpchar: the string as stored */
	IMAGE_JSONB,
	IMAGE_STRING, /* any other scalar: its output, as a string */
	IMAGE_TO_JSONB
} ImageKind;

typedef struct ImageColumn
{
	int attnum; /* 0-based */
	ImageKind kind;
	Oid basetype;
	FmgrInfo func; /* output function, or to_jsonb */
	JsonbValue key;
} ImageColumn;

typedef struct Image
{
	Oid tuptype; /* (for _row_image's cache) */
	int32 tuptypmod;
	char *keys; /* the keys' bytes, as an image holds them */
	int keys_len;
	JEntry *key_entries; /* ... and their JEntries */
	int size_hint;       /* the largest image so far (to 64 kB) */
	int ncolumns;
	ImageColumn columns[FLEXIBLE_ARRAY_MEMBER]; /* in jsonb's key order */
} Image;

/* jsonb's order of keys: shorter first, then by bytes */
static int
image_key_cmp(const void *a, const void *b)
{
	const JsonbValue *ka = &((const ImageColumn *) a)->key;
	const JsonbValue *kb = &((const ImageColumn *) b)->key;

	if (ka->val.string.len != kb->val.string.len)
		return ka->val.string.len < kb->val.string.len ? -1 : 1;
	return memcmp(ka->val.string.val, kb->val.string.val, ka->val.string.len);
}

/* What to_jsonb makes of a value of type typid, and how this gets it */
static void
image_column_init(ImageColumn *col, Oid typid, MemoryContext mcxt)
{
	Oid base = getBaseType(typid);
	Oid func = InvalidOid;
	bool varlena;

	col->basetype = base;
	switch (base)
	{
		case BOOLOID:
			col->kind = IMAGE_BOOL;
			return;
		case INT2OID:
			col->kind = IMAGE_INT2;
			return;
		case INT4OID:
			col->kind = IMAGE_INT4;
			return;
		case INT8OID:
			col->kind = IMAGE_INT8;
			return;
		case FLOAT4OID:
		case FLOAT8OID:
		case NUMERICOID:
			col->kind = IMAGE_NUMBER;
			break;
		case DATEOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
			col->kind = IMAGE_DATETIME;
			return;
		case JSONBOID:
			col->kind = IMAGE_JSONB;
			return;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			col->kind = IMAGE_TEXT;
			return;
		default:
			col->kind = IMAGE_STRING;
			if (base == JSONOID || OidIsValid(get_element_type(base)) || type_is_rowtype(base))
				col->kind = IMAGE_TO_JSONB;
			else if (base >= FirstNormalObjectId &&
					 find_coercion_pathway(JSONOID, base, COERCION_EXPLICIT, &func) ==
						 COERCION_PATH_FUNC &&
					 OidIsValid(func))
				col->kind = IMAGE_TO_JSONB;
			break;
	}
	if (col->kind == IMAGE_TO_JSONB)
	{
		/* to_jsonb(anyelement) learns its argument's type from its call */
		MemoryContext old = MemoryContextSwitchTo(mcxt);

		fmgr_info_cxt(F_TO_JSONB, &col->func, mcxt);
		col->func.fn_expr = (Node *) makeFuncExpr(F_TO_JSONB, JSONBOID,
												  list_make1(makeNullConst(typid, -1, InvalidOid)),
												  InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
		MemoryContextSwitchTo(old);
		return;
	}
	getTypeOutputInfo(base, &func, &varlena);
	fmgr_info_cxt(func, &col->func, mcxt);
}

/* How to make images of rows of desc, kept in mcxt */
static Image *
image_init(TupleDesc desc, MemoryContext mcxt)
{
	Image *image =
		MemoryContextAllocZero(mcxt, offsetof(Image, columns) + desc->natts * sizeof(ImageColumn));
	int n = 0;

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ImageColumn *col = &image->columns[n];

		if (att->attisdropped)
			continue;
		col->attnum = i;
		col->key.type = jbvString;
		col->key.val.string.val = MemoryContextStrdup(mcxt, NameStr(att->attname));
		col->key.val.string.len = strlen(col->key.val.string.val);
		image_column_init(col, att->atttypid, mcxt);
		n++;
	}
	qsort(image->columns, n, sizeof(ImageColumn), image_key_cmp);
	image->ncolumns = n;

	/* the keys part of every image (image_make) */
	image->key_entries = MemoryContextAlloc(mcxt, Max(n, 1) * sizeof(JEntry));
	for (int i = 0; i < n; i++)
	{
		JsonbValue *key = &image->columns[i].key;

		image->keys_len += key->val.string.len;
		image->key_entries[i] = JENTRY_ISSTRING | key->val.string.len;
		if (i % JB_OFFSET_STRIDE == 0)
			image->key_entries[i] = JENTRY_ISSTRING | JENTRY_HAS_OFF | image->keys_len;
	}
	image->keys = MemoryContextAlloc(mcxt, Max(image->keys_len, 1));
	for (int i = 0, off = 0; i < n; i++)
	{
		memcpy(image->keys + off, image->columns[i].key.val.string.val,
			   image->columns[i].key.val.string.len);
		off += image->columns[i].key.val.string.len;
	}
	image->size_hint = 1024;
	return image;
}

/* Sets v to the string s (a C string) */
static void
image_string(JsonbValue *v, char *s)
{
	v->type = jbvString;
	v->val.string.val = s;
	v->val.string.len = strlen(s);
}

/* Sets v to what to_jsonb makes of value d (isnull: SQL NULL) of col */
static void
image_value(ImageColumn *col, Datum d, bool isnull, JsonbValue *v)
{
	char *s;

	if (isnull)
	{
		v->type = jbvNull;
		return;
	}
	switch (col->kind)
	{
		case IMAGE_BOOL:
			v->type = jbvBool;
			v->val.boolean = DatumGetBool(d);
			break;
		case IMAGE_INT2:
			v->type = jbvNumeric;
			v->val.numeric = int64_to_numeric(DatumGetInt16(d));
			break;
		case IMAGE_INT4:
			v->type = jbvNumeric;
			v->val.numeric = int64_to_numeric(DatumGetInt32(d));
			break;
		case IMAGE_INT8:
			v->type = jbvNumeric;
			v->val.numeric = int64_to_numeric(DatumGetInt64(d));
			break;
		case IMAGE_NUMBER:
			/* as to_jsonb: NaN and the infinities are strings */
			s = OutputFunctionCall(&col->func, d);
			if (strchr(s, 'N') || strchr(s, 'n'))
				image_string(v, s);
			else
			{
				v->type = jbvNumeric;
				v->val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
																	 ObjectIdGetDatum(InvalidOid),
																	 Int32GetDatum(-1)));
			}
			break;
		case IMAGE_DATETIME:
			image_string(v, JsonEncodeDateTime(NULL, d, col->basetype, NULL));
			break;
		case IMAGE_TEXT:
		{
			text *t = DatumGetTextPP(d);

			v->type = jbvString;
			v->val.string.val = VARDATA_ANY(t);
			v->val.string.len = VARSIZE_ANY_EXHDR(t);
			break;
		}
		case IMAGE_STRING:
			image_string(v, OutputFunctionCall(&col->func, d));
			break;
		case IMAGE_JSONB:
		case IMAGE_TO_JSONB:
		{
			/* a container, unpacked by pushJsonbValue (a scalar, as itself) */
			Jsonb *j = DatumGetJsonbP(col->kind == IMAGE_JSONB ? d : FunctionCall1(&col->func, d));

			v->type = jbvBinary;
			v->val.binary.data = &j->root;
			v->val.binary.len = VARSIZE(j) - VARHDRSZ;
			break;
		}
	}
}

/*
 * The image of the row of values and nulls, written in jsonb's binary
 * layout directly (as convertToJsonb lays out an object, which PostgreSQL
 * keeps stable on disk): the object's header and JEntries, its keys (the
 * same for every row: written once, in image_init), then its values, each
 * number and container aligned to 4 bytes, every JB_OFFSET_STRIDE'th
 * JEntry an end offset, the others lengths. Building a JsonbValue tree and
 * converting it took two thirds of the time.
 */
static JEntry image_put(StringInfo buf, JsonbValue *v);

/* Pads buf with zeros to a multiple of 4 bytes (from the jsonb's start) */
static int
image_pad(StringInfo buf)
{
	static const char zeros[4] = { 0, 0, 0, 0 };
	int pad = INTALIGN(buf->len) - buf->len;

	appendBinaryStringInfo(buf, zeros, pad);
	return pad;
}

/* Appends the bytes of scalar or container v; returns its JEntry (a length) */
static JEntry
image_put(StringInfo buf, JsonbValue *v)
{
	int pad;
	int len;

	switch (v->type)
	{
		case jbvNull:
			return JENTRY_ISNULL;
		case jbvBool:
			return v->val.boolean ? JENTRY_ISBOOL_TRUE : JENTRY_ISBOOL_FALSE;
		case jbvString:
			if (v->val.string.len > JENTRY_OFFLENMASK)
				ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
								errmsg("string too long to represent as jsonb string")));
			appendBinaryStringInfo(buf, v->val.string.val, v->val.string.len);
			return JENTRY_ISSTRING | v->val.string.len;
		case jbvNumeric:
			pad = image_pad(buf);
			len = VARSIZE_ANY(v->val.numeric);
			appendBinaryStringInfo(buf, (char *) v->val.numeric, len);
			return JENTRY_ISNUMERIC | (pad + len);
		case jbvBinary:
		{
			/* a jsonb's root: a scalar as itself, a container as it is */
			JsonbContainer *jc = v->val.binary.data;
			JsonbValue scalar;

			if (JsonbExtractScalar(jc, &scalar))
				return image_put(buf, &scalar);
			pad = image_pad(buf);
			appendBinaryStringInfo(buf, (char *) jc, v->val.binary.len);
			return JENTRY_ISCONTAINER | (pad + v->val.binary.len);
		}
		default:
			elog(ERROR, "cd2sync: unexpected jsonb value type %d in an image", (int) v->type);
	}
	return 0; /* (not reached) */
}

static Jsonb *
image_make(Image *image, Datum *values, bool *nulls)
{
	int n = image->ncolumns;
	uint32 header = n | JB_FOBJECT;
	uint32 total = image->keys_len;
	StringInfoData buf;
	int entries;

	initStringInfo(&buf);
	enlargeStringInfo(&buf, image->size_hint);
	buf.len = VARHDRSZ;
	appendBinaryStringInfo(&buf, (char *) &header, sizeof(uint32));
	appendBinaryStringInfo(&buf, (char *) image->key_entries, n * sizeof(JEntry));
	entries = buf.len;
	enlargeStringInfo(&buf, n * sizeof(JEntry));
	buf.len += n * sizeof(JEntry);
	appendBinaryStringInfo(&buf, image->keys, image->keys_len);
	for (int i = 0; i < n; i++)
	{
		ImageColumn *col = &image->columns[i];
		JsonbValue v;
		JEntry meta;

		image_value(col, values[col->attnum], nulls[col->attnum], &v);
		meta = image_put(&buf, &v);
		total += meta & JENTRY_OFFLENMASK;
		if (total > JENTRY_OFFLENMASK)
			ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
							errmsg("total size of jsonb object elements exceeds the maximum of %u "
								   "bytes",
								   JENTRY_OFFLENMASK)));
		if ((i + n) % JB_OFFSET_STRIDE == 0)
			meta = (meta & JENTRY_TYPEMASK) | total | JENTRY_HAS_OFF;
		memcpy(buf.data + entries + i * sizeof(JEntry), &meta, sizeof(JEntry));
	}
	SET_VARSIZE(buf.data, buf.len);
	if (buf.len > image->size_hint && buf.len <= 64 * 1024)
		image->size_hint = buf.len;
	return (Jsonb *) buf.data;
}

/*
 * cd2sync._row_image(r record) returns jsonb: to_jsonb(r), as a change's
 * image (the loads into a feed that go through SQL: a feed's start, a
 * table rewritten). How to make images of r's type is kept in fn_extra.
 */
Datum
cd2_row_image(PG_FUNCTION_ARGS)
{
	HeapTupleHeader th = PG_GETARG_HEAPTUPLEHEADER(0);
	Oid tuptype = HeapTupleHeaderGetTypeId(th);
	int32 tuptypmod = HeapTupleHeaderGetTypMod(th);
	TupleDesc desc = lookup_rowtype_tupdesc(tuptype, tuptypmod);
	Image *image = (Image *) fcinfo->flinfo->fn_extra;
	HeapTupleData tuple;
	Datum *values = palloc(desc->natts * sizeof(Datum));
	bool *nulls = palloc(desc->natts * sizeof(bool));

	if (image == NULL || image->tuptype != tuptype || image->tuptypmod != tuptypmod)
	{
		image = image_init(desc, fcinfo->flinfo->fn_mcxt);
		image->tuptype = tuptype;
		image->tuptypmod = tuptypmod;
		fcinfo->flinfo->fn_extra = image;
	}
	tuple.t_len = HeapTupleHeaderGetDatumLength(th);
	tuple.t_data = th;
	ItemPointerSetInvalid(&tuple.t_self);
	tuple.t_tableOid = InvalidOid;
	heap_deform_tuple(&tuple, desc, values, nulls);
	ReleaseTupleDesc(desc);
	PG_RETURN_POINTER(image_make(image, values, nulls));
}

/* ---------------------------------------------------------------------------
 * The capture
 * ---------------------------------------------------------------------------
 */

/* The columns of cd2sync.changes a capture writes, in its order */
enum
{
	CH_POSITION,
	CH_FEED,
	CH_TABLE_NAME,
	CH_OP,
	CH_KEY,
	CH_INSTANCE,
	CH_ROW,
	CH_CHANGED,
	CH_CAUSE,
	CH_WATERMARK,
	CH_COMMITTED_AT,
	CH_NCOLUMNS
};

static const char *const change_columns[CH_NCOLUMNS] = {
	"position", "feed",    "table_name", "op",        "key",          "instance",
	"row",      "changed", "cause",      "watermark", "committed_at",
};

/*
 * What one statement's capture of one table's rows (one operation) needs,
 * made at its first row: the plan, the view's select list ready to
 * evaluate, and cd2sync.changes open for inserts. Kept for the rows of the
 * same statement: the same table, operation, command and transaction
 * level; closed when another statement's comes, or the transaction ends.
 */
typedef struct Capture
{
	Oid relid;     /* the table the trigger fires on (a partition, maybe) */
	int event;     /* TRIGGER_EVENT_INSERT, _UPDATE or _DELETE */
	CommandId cid; /* the statement's command */
	int nestlevel;
	bool active; /* something to capture (else rows are passed over) */
	MemoryContext cxt;

	/* from cd2sync._feed_row_plan */
	Datum table_name;
	Datum instance;
	Datum op;
	Datum cause;
	Datum watermark;
	bool watermark_null;
	List *feeds;     /* to notify at its first change */
	bool notified;   /* its first change is written */
	Oid parent;      /* the instance table */
	Relation before; /* a merge pass's: pg_temp.cd2_merge_before (capture_defer) */
	TupleTableSlot *before_slot;

	/* the view's row of a table row */
	TupleConversionMap *map; /* partition to instance table, if they differ */
	TupleTableSlot *mapped;
	ExprContext *econtext;
	ProjectionInfo *old_proj;
	ProjectionInfo *new_proj;
	TupleTableSlot *old_view;
	TupleTableSlot *new_view;
	int nkeys;
	JsonbValue *key_names;
	ImageColumn **key_columns; /* the image's columns of the keys */
	Image *image;

	/* cd2sync.changes, open in the transaction's resource owner (a
	 * statement's would close it after the statement) */
	ResourceOwner owner;
	EState *estate;
	Relation changes;
	ResultRelInfo *rri;
	TupleTableSlot *out;
	int attnum[CH_NCOLUMNS]; /* 0-based, in cd2sync.changes */
	Oid seq;

	struct Capture *next;
} Capture;

static Capture *captures = NULL;
static bool callbacks_registered = false;

static void
capture_close(Capture *c)
{
	if (c->changes)
	{
		ResourceOwner saved = CurrentResourceOwner;

		CurrentResourceOwner = c->owner;
		ExecCloseIndices(c->rri);
		ExecResetTupleTable(c->estate->es_tupleTable, false);
		table_close(c->changes, NoLock);
		if (c->before)
			table_close(c->before, NoLock);
		CurrentResourceOwner = saved;
	}
	if (c->estate)
		FreeExecutorState(c->estate);
	MemoryContextDelete(c->cxt);
}

/* Closes the captures of transaction level nestlevel and deeper (all: 0) */
static void
captures_end(int nestlevel, bool abort)
{
	Capture **p = &captures;

	while (*p)
	{
		Capture *c = *p;

		if (c->nestlevel >= nestlevel)
		{
			*p = c->next;
			if (abort)
				MemoryContextDelete(c->cxt); /* (resource owners release the rest) */
			else
				capture_close(c);
		}
		else
			p = &c->next;
	}
}

static void
capture_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			captures_end(0, false);
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			captures_end(0, true);
			break;
		default:
			break;
	}
}

static void
capture_subxact_callback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid,
						 void *arg)
{
	int level = GetCurrentTransactionNestLevel();

	/* (a subtransaction's resource owner goes with it) */
	if (event == SUBXACT_EVENT_ABORT_SUB)
		captures_end(level, true);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		captures_end(level, false);
}

/* A text Datum of s, in the current memory context */
static Datum
text_datum(char *s)
{
	return PointerGetDatum(cstring_to_text(s));
}

/* Evaluates the view's select list over a row of parent's: a projection */
static ProjectionInfo *
capture_projection(Capture *c, List *tlist, TupleDesc parentdesc, TupleTableSlot **slot)
{
	*slot = MakeTupleTableSlot(ExecTypeFromTL(tlist), &TTSOpsVirtual);
	return ExecBuildProjectionInfo(tlist, c->econtext, *slot, NULL, parentdesc);
}

/*
 * The feeds to notify at the capture's first change, and whether there is
 * any (only stale feeds following the table: nothing to capture): asked once
 * the lock on the changes is held, so that a feed created meanwhile (its
 * creation takes that lock too) is among them.
 */
static void
capture_feeds(Capture *c)
{
	Oid argtypes[1] = { TEXTOID };
	Datum args[1] = { c->table_name };
	MemoryContext old;
	bool isnull;
	int ret;

	if ((ret = SPI_connect()) != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed: %s", SPI_result_code_string(ret));
	/* (the statement's snapshot predates the lock: read the latest) */
	PushActiveSnapshot(GetLatestSnapshot());
	ret = SPI_execute_with_args("SELECT cd2sync._feeds_following($1)", 1, argtypes, args, NULL,
								true, 1);
	PopActiveSnapshot();
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cd2sync._feeds_following failed: %s", SPI_result_code_string(ret));
	old = MemoryContextSwitchTo(c->cxt);
	{
		Datum d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		Datum *elems;
		int n;

		deconstruct_array(DatumGetArrayTypePCopy(d), TEXTOID, -1, false, TYPALIGN_INT, &elems, NULL,
						  &n);
		for (int i = 0; i < n; i++)
			c->feeds = lappend(c->feeds, TextDatumGetCString(elems[i]));
	}
	MemoryContextSwitchTo(old);
	SPI_finish();
}

/*
 * Opens pg_temp.cd2_merge_before for capture_defer's inserts, made the first
 * time a merge pass keeps a row (dropped at commit)
 */
static void
capture_defer_open(Capture *c)
{
	Oid tempns = LookupExplicitNamespace("pg_temp", true);
	Oid relid = OidIsValid(tempns) ? get_relname_relid("cd2_merge_before", tempns) : InvalidOid;
	ResourceOwner saved;

	if (!OidIsValid(relid))
	{
		int ret;

		if ((ret = SPI_connect()) != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed: %s", SPI_result_code_string(ret));
		ret = SPI_execute(
			"CREATE TEMP TABLE cd2_merge_before (rel oid, key jsonb, image jsonb, ord bigint)"
			" ON COMMIT DROP",
			false, 0);
		if (ret != SPI_OK_UTILITY)
			elog(ERROR, "cd2sync: making a merge pass's table failed: %s",
				 SPI_result_code_string(ret));
		SPI_finish();
		relid = get_relname_relid("cd2_merge_before", LookupExplicitNamespace("pg_temp", false));
	}
	saved = CurrentResourceOwner;
	CurrentResourceOwner = c->owner;
	c->before = table_open(relid, RowExclusiveLock);
	/* one this session made before, as above: never a relation of that name
	 * someone else made (another role, other columns, triggers, rules) */
	{
		static const Oid types[4] = { OIDOID, JSONBOID, JSONBOID, INT8OID };
		Relation r = c->before;
		TupleDesc d = RelationGetDescr(r);
		bool ours = r->rd_rel->relkind == RELKIND_RELATION &&
					r->rd_rel->relpersistence == RELPERSISTENCE_TEMP &&
					r->rd_rel->relowner == GetUserId() && !r->rd_rel->relhastriggers &&
					!r->rd_rel->relhasrules && d->natts == 4;

		for (int i = 0; ours && i < 4; i++)
			ours = !TupleDescAttr(d, i)->attisdropped && TupleDescAttr(d, i)->atttypid == types[i];
		if (!ours)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("cd2sync: pg_temp.cd2_merge_before is not a table cd2sync made")));
	}
	c->before_slot = ExecInitExtraTupleSlot(c->estate, RelationGetDescr(c->before), &TTSOpsVirtual);
	CurrentResourceOwner = saved;
}

/*
 * Makes the capture of a statement's rows of rel for event: asks
 * cd2sync._feed_row_plan (parent: the instance table) what to write;
 * inactive when nothing is.
 */
static Capture *
capture_open(Relation rel, Oid parent, int event)
{
	MemoryContext cxt =
		AllocSetContextCreate(TopTransactionContext, "cd2sync capture", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	Capture *c = palloc0(sizeof(Capture));
	Oid argtypes[1] = { REGCLASSOID };
	Datum args[1] = { ObjectIdGetDatum(parent) };
	bool isnull;
	char *projection = NULL;
	int ret;

	c->relid = RelationGetRelid(rel);
	c->parent = parent;
	c->event = event;
	c->nestlevel = GetCurrentTransactionNestLevel();
	c->cxt = cxt;

	/* the plan (a read-only query: it takes no command id of its own) */
	if ((ret = SPI_connect()) != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed: %s", SPI_result_code_string(ret));
	ret = SPI_execute_with_args("SELECT table_name, instance, cause, watermark, projection, keys"
								"  FROM cd2sync._feed_row_plan($1)",
								1, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "cd2sync._feed_row_plan failed: %s", SPI_result_code_string(ret));
	else
	{
		HeapTuple t = SPI_tuptable->vals[0];
		TupleDesc d = SPI_tuptable->tupdesc;

		SPI_getbinval(t, d, 1, &isnull);
		if (!isnull)
		{
			ArrayType *keys;
			Datum *elems;
			int n;

			MemoryContextSwitchTo(cxt);
			c->active = true;
			c->table_name = text_datum(SPI_getvalue(t, d, 1));
			c->instance = text_datum(SPI_getvalue(t, d, 2));
			c->cause = text_datum(SPI_getvalue(t, d, 3));
			c->watermark = datumCopy(SPI_getbinval(t, d, 4, &c->watermark_null), true, 8);
			projection = SPI_getvalue(t, d, 5);
			keys = DatumGetArrayTypePCopy(SPI_getbinval(t, d, 6, &isnull));
			deconstruct_array(keys, TEXTOID, -1, false, TYPALIGN_INT, &elems, NULL, &n);
			c->nkeys = n;
			c->key_names = palloc0(n * sizeof(JsonbValue));
			c->key_columns = palloc0(n * sizeof(ImageColumn *));
			for (int i = 0; i < n; i++)
				image_string(&c->key_names[i], TextDatumGetCString(elems[i]));
		}
	}
	MemoryContextSwitchTo(cxt);
	SPI_finish();

	if (c->active)
	{
		Relation prel = parent == c->relid ? rel : table_open(parent, AccessShareLock);
		TupleDesc pdesc = RelationGetDescr(prel);
		int guc_level = NewGUCNestLevel();
		RawStmt *raw;
		Query *q;
		List *tlist = NIL;
		ListCell *lc;
		RangeTblEntry *rte;
		Oid changes_id;
		TupleDesc cdesc;
		ResourceOwner saved_owner;

		/* (its names resolved as _feed_row_plan wrote them: in pg_catalog) */
		(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		raw = linitial_node(RawStmt, raw_parser(projection, RAW_PARSE_DEFAULT));
		q = parse_analyze_fixedparams(raw, projection, NULL, 0, NULL);

		/* the view's select list: over one table, parent, and nothing else */
		if (q->commandType != CMD_SELECT || list_length(q->rtable) != 1 || q->hasSubLinks ||
			q->hasAggs || q->hasWindowFuncs || q->hasTargetSRFs ||
			linitial_node(RangeTblEntry, q->rtable)->relid != parent)
			elog(ERROR, "cd2sync: the view's row of a table row is not a select list over it");
		foreach (lc, q->targetList)
		{
			TargetEntry *tle = flatCopyTargetEntry(lfirst_node(TargetEntry, lc));

			tle->expr = expression_planner(tle->expr);
			tlist = lappend(tlist, tle);
		}
		AtEOXact_GUC(true, guc_level);

		/* a partition's rows, as the instance table's */
		if (prel != rel)
		{
			/* (copies: the relations' own go with the statement) */
			TupleDesc pcopy = CreateTupleDescCopy(pdesc);

			c->map = convert_tuples_by_name(CreateTupleDescCopy(RelationGetDescr(rel)), pcopy);
			if (c->map)
				c->mapped = MakeTupleTableSlot(pcopy, &TTSOpsVirtual);
		}

		c->estate = CreateExecutorState();
		c->econtext = CreateExprContext(c->estate);
		if (event != TRIGGER_EVENT_INSERT)
			c->old_proj = capture_projection(c, tlist, pdesc, &c->old_view);
		if (event != TRIGGER_EVENT_DELETE)
			c->new_proj = capture_projection(c, tlist, pdesc, &c->new_view);
		c->image = image_init((c->new_view ? c->new_view : c->old_view)->tts_tupleDescriptor, cxt);
		for (int i = 0; i < c->nkeys; i++)
		{
			for (int x = 0; x < c->image->ncolumns; x++)
				if (strcmp(c->image->columns[x].key.val.string.val,
						   c->key_names[i].val.string.val) == 0)
					c->key_columns[i] = &c->image->columns[x];
			if (c->key_columns[i] == NULL)
				elog(ERROR, "cd2sync: key column \"%s\" is not in the view",
					 c->key_names[i].val.string.val);
		}
		if (prel != rel)
			table_close(prel, AccessShareLock);

		/* cd2sync.changes, for inserts as an INSERT would make them */
		changes_id = get_relname_relid("changes", get_namespace_oid("cd2sync", false));
		c->seq = get_relname_relid("change_position_seq", get_namespace_oid("cd2sync", false));
		if (!OidIsValid(changes_id) || !OidIsValid(c->seq))
			elog(ERROR, "cd2sync.changes or cd2sync.change_position_seq is missing");
		ret = pg_class_aclcheck(changes_id, GetUserId(), ACL_INSERT);
		if (ret != ACLCHECK_OK)
			aclcheck_error(ret, OBJECT_TABLE, "changes");
		/* positions: under the lock _feed_lock takes, held until commit (and
		 * taken first, as there: a weaker one first could deadlock) */
		LockRelationOid(changes_id, ExclusiveLock);
		c->owner = CurTransactionResourceOwner;
		saved_owner = CurrentResourceOwner;
		CurrentResourceOwner = c->owner;
		c->changes = table_open(changes_id, RowExclusiveLock);
		cdesc = RelationGetDescr(c->changes);
		for (int i = 0; i < CH_NCOLUMNS; i++)
		{
			c->attnum[i] = -1;
			for (int a = 0; a < cdesc->natts; a++)
				if (!TupleDescAttr(cdesc, a)->attisdropped &&
					strcmp(NameStr(TupleDescAttr(cdesc, a)->attname), change_columns[i]) == 0)
					c->attnum[i] = a;
			if (c->attnum[i] < 0)
				elog(ERROR, "cd2sync.changes has no column \"%s\"", change_columns[i]);
		}
		rte = makeNode(RangeTblEntry);
		rte->rtekind = RTE_RELATION;
		rte->relid = changes_id;
		rte->relkind = RELKIND_RELATION;
		rte->rellockmode = RowExclusiveLock;
		ExecInitRangeTable(c->estate, list_make1(rte));
		c->rri = makeNode(ResultRelInfo);
		InitResultRelInfo(c->rri, c->changes, 1, NULL, 0);
		ExecOpenIndices(c->rri, false);
		c->out = ExecInitExtraTupleSlot(c->estate, cdesc, &TTSOpsVirtual);
		CurrentResourceOwner = saved_owner;
		capture_feeds(c);
		/* no feed that is not stale follows the table: nothing to keep */
		if (c->feeds == NIL)
			c->active = false;
		/* a merge pass's updates: kept for its end, which writes one per row */
		if (c->active && event == TRIGGER_EVENT_UPDATE &&
			strcmp(TextDatumGetCString(c->cause), "merge") == 0)
		{
			const char *pass = GetConfigOption("cd2sync_tx.merge_pass", true, false);

			if (pass && strcmp(pass, "on") == 0)
				capture_defer_open(c);
		}
		c->op = text_datum(event == TRIGGER_EVENT_INSERT   ? "insert"
						   : event == TRIGGER_EVENT_UPDATE ? "update"
														   : "delete");
	}
	MemoryContextSwitchTo(old);
	/* (after the plan's query, which may have advanced the command) */
	c->cid = GetCurrentCommandId(false);
	return c;
}

/* The capture serving this statement's rows of rel for event */
static Capture *
capture_for(Relation rel, int event)
{
	Oid relid = RelationGetRelid(rel);
	Oid parent;
	CommandId cid = GetCurrentCommandId(false);
	int nestlevel = GetCurrentTransactionNestLevel();
	Capture **p;
	Capture *c;

	for (c = captures; c; c = c->next)
		if (c->relid == relid && c->event == event && c->cid == cid && c->nestlevel == nestlevel)
			return c;
	/* an earlier statement's: done */
	p = &captures;
	while (*p)
	{
		c = *p;
		if (c->relid == relid && c->event == event && c->nestlevel == nestlevel)
		{
			*p = c->next;
			capture_close(c);
		}
		else
			p = &c->next;
	}
	if (!callbacks_registered)
	{
		RegisterXactCallback(capture_xact_callback, NULL);
		RegisterSubXactCallback(capture_subxact_callback, NULL);
		callbacks_registered = true;
	}
	/* the instance table: the table, or the partitioned table of a partition
	 * (looked up once per statement, not per row) */
	parent = relid;
	if (rel->rd_rel->relispartition)
		parent = llast_oid(get_partition_ancestors(relid));
	c = capture_open(rel, parent, event);
	c->next = captures;
	captures = c;
	return c;
}

/* The view's row of a table row: the projection's slot, all attributes filled */
static TupleTableSlot *
capture_view(Capture *c, ProjectionInfo *proj, TupleTableSlot *row)
{
	TupleTableSlot *view;

	if (c->map)
		row = execute_attr_map_slot(c->map->attrMap, row, c->mapped);
	c->econtext->ecxt_scantuple = row;
	view = ExecProject(proj);
	slot_getallattrs(view);
	return view;
}

/*
 * The names of the columns whose values differ between two rows of desc's
 * columns, in column order, as text[]; *isnull when none does. Values are
 * compared by their stored image (datum_image_eq): a value whose
 * representation changed (1.0 and 1.00) changed, as the image a feed
 * carries does.
 */
static Datum
changed_columns(TupleDesc desc, Datum *ov, bool *on, Datum *nv, bool *nn, bool *isnull)
{
	Datum *names = palloc(desc->natts * sizeof(Datum));
	int count = 0;

	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || (on[i] && nn[i]))
			continue;
		if (on[i] == nn[i] && datum_image_eq(ov[i], nv[i], att->attbyval, att->attlen))
			continue;
		names[count++] = CStringGetTextDatum(NameStr(att->attname));
	}
	*isnull = count == 0;
	if (count == 0)
		return (Datum) 0;
	return PointerGetDatum(construct_array(names, count, TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * cd2sync._changed_columns(old record, new record) returns text[]: the
 * changed columns of two rows of the same columns, NULL when none. The
 * capture of 1.2 and 1.3 (their install scripts, kept for updates, name
 * it); an update to 1.4 drops the SQL function.
 */
Datum
cd2_changed_columns(PG_FUNCTION_ARGS)
{
	HeapTupleHeader h[2] = { PG_GETARG_HEAPTUPLEHEADER(0), PG_GETARG_HEAPTUPLEHEADER(1) };
	TupleDesc desc[2];
	Datum *values[2];
	bool *nulls[2];
	bool isnull;
	Datum result;

	for (int r = 0; r < 2; r++)
	{
		HeapTupleData t;

		desc[r] =
			lookup_rowtype_tupdesc(HeapTupleHeaderGetTypeId(h[r]), HeapTupleHeaderGetTypMod(h[r]));
		t.t_len = HeapTupleHeaderGetDatumLength(h[r]);
		t.t_data = h[r];
		ItemPointerSetInvalid(&t.t_self);
		t.t_tableOid = InvalidOid;
		values[r] = palloc(desc[r]->natts * sizeof(Datum));
		nulls[r] = palloc(desc[r]->natts * sizeof(bool));
		heap_deform_tuple(&t, desc[r], values[r], nulls[r]);
	}
	/* (two subqueries' rows: two record types, alike column by column) */
	if (desc[0]->natts != desc[1]->natts)
		ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
						errmsg("cd2sync._changed_columns compares rows of the same columns")));
	for (int i = 0; i < desc[1]->natts; i++)
		if (TupleDescAttr(desc[0], i)->atttypid != TupleDescAttr(desc[1], i)->atttypid)
			ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
							errmsg("cd2sync._changed_columns compares rows of the same columns")));
	result = changed_columns(desc[1], values[0], nulls[0], values[1], nulls[1], &isnull);
	ReleaseTupleDesc(desc[0]);
	ReleaseTupleDesc(desc[1]);
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(result);
}

/* The key of view row v, as a change carries it */
static Jsonb *
capture_key(Capture *c, TupleTableSlot *v)
{
	JsonbParseState *state = NULL;

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < c->nkeys; i++)
	{
		ImageColumn *col = c->key_columns[i];
		JsonbValue k;

		pushJsonbValue(&state, WJB_KEY, &c->key_names[i]);
		image_value(col, v->tts_values[col->attnum], v->tts_isnull[col->attnum], &k);
		pushJsonbValue(&state, WJB_VALUE, &k);
	}
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

/*
 * In a merge pass (cd2sync._feed_merge_begin): keeps the image of view row
 * o, as it was before the statement, in pg_temp.cd2_merge_before, where the
 * pass's end (_feed_merge_end) takes each row's first and writes one change
 * if the row's view row differs from it.
 */
static void
capture_defer(Capture *c, TupleTableSlot *o)
{
	static int64 order = 0;
	TupleTableSlot *slot = c->before_slot;

	ExecClearTuple(slot);
	slot->tts_values[0] = ObjectIdGetDatum(c->parent);
	slot->tts_values[1] = JsonbPGetDatum(capture_key(c, o));
	slot->tts_values[2] = JsonbPGetDatum(image_make(c->image, o->tts_values, o->tts_isnull));
	slot->tts_values[3] = Int64GetDatum(++order);
	memset(slot->tts_isnull, false, 4 * sizeof(bool));
	ExecStoreVirtualTuple(slot);
	simple_table_tuple_insert(c->before, slot);
}

/* Writes the change of view row v (the new row; the old for a delete) */
static void
capture_write(Capture *c, TupleTableSlot *v, Datum changed, bool changed_null)
{
	TupleTableSlot *out = c->out;
	ListCell *lc;

	if (!c->notified)
	{
		foreach (lc, c->feeds)
			Async_Notify("cd2sync_feed", (char *) lfirst(lc));
		c->notified = true;
	}

	ExecClearTuple(out);
	memset(out->tts_isnull, true, out->tts_tupleDescriptor->natts * sizeof(bool));
#define SET(col, value)                                                                            \
	do                                                                                             \
	{                                                                                              \
		out->tts_values[c->attnum[col]] = (value);                                                 \
		out->tts_isnull[c->attnum[col]] = false;                                                   \
	} while (0)
	SET(CH_POSITION, Int64GetDatum(nextval_internal(c->seq, true)));
	SET(CH_TABLE_NAME, c->table_name);
	SET(CH_OP, c->op);
	SET(CH_KEY, JsonbPGetDatum(capture_key(c, v)));
	SET(CH_INSTANCE, c->instance);
	if (c->event != TRIGGER_EVENT_DELETE)
		SET(CH_ROW, JsonbPGetDatum(image_make(c->image, v->tts_values, v->tts_isnull)));
	if (!changed_null)
		SET(CH_CHANGED, changed);
	SET(CH_CAUSE, c->cause);
	if (!c->watermark_null)
		SET(CH_WATERMARK, c->watermark);
	SET(CH_COMMITTED_AT, TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()));
#undef SET
	ExecStoreVirtualTuple(out);

	if (c->changes->rd_att->constr)
		ExecConstraints(c->rri, out, c->estate);
	simple_table_tuple_insert(c->changes, out);
	if (c->rri->ri_NumIndices > 0)
		ExecInsertIndexTuples(c->rri, out, c->estate, false, false, NULL, NIL);
}

/*
 * cd2sync._feed_capture_row(): the AFTER ROW trigger of a followed instance
 * table (INSERT, UPDATE, DELETE). An
 * update writes a change only when a column of the view's row changed. On a
 * partitioned instance table it fires on each partition.
 */
Datum
cd2_feed_capture_row(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	int event;
	Capture *c;
	MemoryContext old;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_AFTER(td->tg_event))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
						errmsg("cd2sync._feed_capture_row must fire after each row")));
	event = td->tg_event & TRIGGER_EVENT_OPMASK;
	c = capture_for(td->tg_relation, event);
	if (!c->active)
		return PointerGetDatum(NULL);

	old = MemoryContextSwitchTo(GetPerTupleMemoryContext(c->estate));
	if (event == TRIGGER_EVENT_UPDATE)
	{
		TupleTableSlot *o = capture_view(c, c->old_proj, td->tg_trigslot);
		TupleTableSlot *n = capture_view(c, c->new_proj, td->tg_newslot);
		bool none;
		Datum changed = changed_columns(n->tts_tupleDescriptor, o->tts_values, o->tts_isnull,
										n->tts_values, n->tts_isnull, &none);

		if (!none && c->before)
			capture_defer(c, o);
		else if (!none)
			capture_write(c, n, changed, false);
	}
	else if (event == TRIGGER_EVENT_INSERT)
		capture_write(c, capture_view(c, c->new_proj, td->tg_trigslot), (Datum) 0, true);
	else
		capture_write(c, capture_view(c, c->old_proj, td->tg_trigslot), (Datum) 0, true);
	MemoryContextSwitchTo(old);
	ResetPerTupleExprContext(c->estate);
	ResetExprContext(c->econtext);
	return PointerGetDatum(NULL);
}
