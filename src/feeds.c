/*-------------------------------------------------------------------------
 *
 * feeds.c
 *	  What the change feeds (src/sql/feeds.sql) ask of C: their limits,
 *	  which columns of a row's image an update changed, and the image itself
 *	  as jsonb.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "fmgr.h"
#include "funcapi.h"
#include "access/htup_details.h"
#include "access/transam.h"
#include "catalog/pg_type.h"
#include "nodes/makefuncs.h"
#include "parser/parse_coerce.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/typcache.h"

PG_FUNCTION_INFO_V1(cd2_feed_limits);
PG_FUNCTION_INFO_V1(cd2_changed_columns);
PG_FUNCTION_INFO_V1(cd2_row_image);

/*
 * cd2sync._feed_limits(): cd2sync.feed_max_pending and feed_max_age (in
 * seconds), for the feeds' SQL. Being C, calling it also loads the library,
 * so the settings are defined in a session that has not loaded it yet.
 */
Datum
cd2_feed_limits(PG_FUNCTION_ARGS)
{
	TupleDesc desc;
	Datum values[2];
	bool nulls[2] = { false, false };

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "cd2sync._feed_limits must return a record");
	values[0] = Int64GetDatum(cd2_feed_max_pending);
	values[1] = Int32GetDatum(cd2_feed_max_age);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

/*
 * cd2sync._changed_columns(old record, new record) returns text[]: the names
 * of the columns whose values differ between two rows of the same columns,
 * in column order; NULL when none does. Values are compared by their stored
 * image (datum_image_eq): a value whose representation changed (1.0 and
 * 1.00, -0 and 0) changed, as the image a feed carries does. One call per
 * row, where SQL would take one expression per column.
 */
Datum
cd2_changed_columns(PG_FUNCTION_ARGS)
{
	HeapTupleHeader oldh = PG_GETARG_HEAPTUPLEHEADER(0);
	HeapTupleHeader newh = PG_GETARG_HEAPTUPLEHEADER(1);
	TupleDesc olddesc =
		lookup_rowtype_tupdesc(HeapTupleHeaderGetTypeId(oldh), HeapTupleHeaderGetTypMod(oldh));
	TupleDesc desc =
		lookup_rowtype_tupdesc(HeapTupleHeaderGetTypeId(newh), HeapTupleHeaderGetTypMod(newh));
	HeapTupleData oldt;
	HeapTupleData newt;
	Datum *oldv;
	bool *oldn;
	Datum *newv;
	bool *newn;
	Datum *names;
	int n = 0;

	/* (two subqueries' rows: two record types, alike column by column) */
	if (olddesc->natts != desc->natts)
		ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
						errmsg("cd2sync._changed_columns compares rows of the same columns")));
	for (int i = 0; i < desc->natts; i++)
		if (TupleDescAttr(olddesc, i)->atttypid != TupleDescAttr(desc, i)->atttypid)
			ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
							errmsg("cd2sync._changed_columns compares rows of the same columns")));
	oldt.t_len = HeapTupleHeaderGetDatumLength(oldh);
	oldt.t_data = oldh;
	ItemPointerSetInvalid(&oldt.t_self);
	oldt.t_tableOid = InvalidOid;
	newt.t_len = HeapTupleHeaderGetDatumLength(newh);
	newt.t_data = newh;
	ItemPointerSetInvalid(&newt.t_self);
	newt.t_tableOid = InvalidOid;

	oldv = palloc(desc->natts * sizeof(Datum));
	oldn = palloc(desc->natts * sizeof(bool));
	newv = palloc(desc->natts * sizeof(Datum));
	newn = palloc(desc->natts * sizeof(bool));
	names = palloc(desc->natts * sizeof(Datum));
	heap_deform_tuple(&oldt, olddesc, oldv, oldn);
	heap_deform_tuple(&newt, desc, newv, newn);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || (oldn[i] && newn[i]))
			continue;
		if (oldn[i] == newn[i] && datum_image_eq(oldv[i], newv[i], att->attbyval, att->attlen))
			continue;
		names[n++] = CStringGetTextDatum(NameStr(att->attname));
	}
	ReleaseTupleDesc(olddesc);
	ReleaseTupleDesc(desc);
	if (n == 0)
		PG_RETURN_NULL();
	PG_RETURN_ARRAYTYPE_P(construct_array(names, n, TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * cd2sync._row_image(r record) returns jsonb: to_jsonb(r), value for value
 * and key for key, made faster for the images every change of a feed
 * carries. to_jsonb looks up each column's type and output function again
 * for every row and turns every integer into text and back into a number;
 * this looks them up once per row type (kept in fn_extra) and converts the
 * types cd2sync's tables hold directly. A column of any other kind (an
 * array, a composite, json, a type with a cast to json) goes through
 * to_jsonb itself, so the two never differ.
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

typedef struct ImageCache
{
	Oid tuptype;
	int32 tuptypmod;
	int ncolumns;
	ImageColumn columns[FLEXIBLE_ARRAY_MEMBER]; /* in jsonb's key order */
} ImageCache;

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

static ImageCache *
image_cache(FunctionCallInfo fcinfo, Oid tuptype, int32 tuptypmod, TupleDesc desc)
{
	ImageCache *cache = (ImageCache *) fcinfo->flinfo->fn_extra;
	MemoryContext mcxt = fcinfo->flinfo->fn_mcxt;
	int n = 0;

	if (cache && cache->tuptype == tuptype && cache->tuptypmod == tuptypmod)
		return cache;
	cache = MemoryContextAllocZero(mcxt, offsetof(ImageCache, columns) +
											 desc->natts * sizeof(ImageColumn));
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ImageColumn *col = &cache->columns[n];

		if (att->attisdropped)
			continue;
		col->attnum = i;
		col->key.type = jbvString;
		col->key.val.string.val = MemoryContextStrdup(mcxt, NameStr(att->attname));
		col->key.val.string.len = strlen(col->key.val.string.val);
		image_column_init(col, att->atttypid, mcxt);
		n++;
	}
	qsort(cache->columns, n, sizeof(ImageColumn), image_key_cmp);
	cache->ncolumns = n;
	cache->tuptype = tuptype;
	cache->tuptypmod = tuptypmod;
	fcinfo->flinfo->fn_extra = cache;
	return cache;
}

/* Sets v to the string s (a C string) */
static void
image_string(JsonbValue *v, char *s)
{
	v->type = jbvString;
	v->val.string.val = s;
	v->val.string.len = strlen(s);
}

Datum
cd2_row_image(PG_FUNCTION_ARGS)
{
	HeapTupleHeader th = PG_GETARG_HEAPTUPLEHEADER(0);
	Oid tuptype = HeapTupleHeaderGetTypeId(th);
	int32 tuptypmod = HeapTupleHeaderGetTypMod(th);
	TupleDesc desc = lookup_rowtype_tupdesc(tuptype, tuptypmod);
	ImageCache *cache = image_cache(fcinfo, tuptype, tuptypmod, desc);
	HeapTupleData tuple;
	Datum *values = palloc(desc->natts * sizeof(Datum));
	bool *nulls = palloc(desc->natts * sizeof(bool));
	JsonbParseState *state = NULL;
	JsonbValue *result;

	tuple.t_len = HeapTupleHeaderGetDatumLength(th);
	tuple.t_data = th;
	ItemPointerSetInvalid(&tuple.t_self);
	tuple.t_tableOid = InvalidOid;
	heap_deform_tuple(&tuple, desc, values, nulls);
	ReleaseTupleDesc(desc);

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < cache->ncolumns; i++)
	{
		ImageColumn *col = &cache->columns[i];
		Datum d = values[col->attnum];
		JsonbValue v;
		char *s;

		pushJsonbValue(&state, WJB_KEY, &col->key);
		if (nulls[col->attnum])
		{
			v.type = jbvNull;
			pushJsonbValue(&state, WJB_VALUE, &v);
			continue;
		}
		switch (col->kind)
		{
			case IMAGE_BOOL:
				v.type = jbvBool;
				v.val.boolean = DatumGetBool(d);
				break;
			case IMAGE_INT2:
				v.type = jbvNumeric;
				v.val.numeric = int64_to_numeric(DatumGetInt16(d));
				break;
			case IMAGE_INT4:
				v.type = jbvNumeric;
				v.val.numeric = int64_to_numeric(DatumGetInt32(d));
				break;
			case IMAGE_INT8:
				v.type = jbvNumeric;
				v.val.numeric = int64_to_numeric(DatumGetInt64(d));
				break;
			case IMAGE_NUMBER:
				/* as to_jsonb: NaN and the infinities are strings */
				s = OutputFunctionCall(&col->func, d);
				if (strchr(s, 'N') || strchr(s, 'n'))
					image_string(&v, s);
				else
				{
					v.type = jbvNumeric;
					v.val.numeric = DatumGetNumeric(
						DirectFunctionCall3(numeric_in, CStringGetDatum(s),
											ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
				}
				break;
			case IMAGE_DATETIME:
				image_string(&v, JsonEncodeDateTime(NULL, d, col->basetype, NULL));
				break;
			case IMAGE_TEXT:
			{
				text *t = DatumGetTextPP(d);

				v.type = jbvString;
				v.val.string.val = VARDATA_ANY(t);
				v.val.string.len = VARSIZE_ANY_EXHDR(t);
				break;
			}
			case IMAGE_STRING:
				image_string(&v, OutputFunctionCall(&col->func, d));
				break;
			case IMAGE_JSONB:
			case IMAGE_TO_JSONB:
			{
				/* a container, unpacked into the image (a scalar, as itself) */
				Jsonb *j =
					DatumGetJsonbP(col->kind == IMAGE_JSONB ? d : FunctionCall1(&col->func, d));

				v.type = jbvBinary;
				v.val.binary.data = &j->root;
				v.val.binary.len = VARSIZE(j) - VARHDRSZ;
				break;
			}
		}
		pushJsonbValue(&state, WJB_VALUE, &v);
	}
	result = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	PG_RETURN_POINTER(JsonbValueToJsonb(result));
}
