/*-------------------------------------------------------------------------
 *
 * feeds.c
 *	  What the change feeds (src/sql/feeds.sql) ask of C: their limits, and
 *	  which columns of a row's image an update changed.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "fmgr.h"
#include "funcapi.h"
#include "access/htup_details.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/typcache.h"

PG_FUNCTION_INFO_V1(cd2_feed_limits);
PG_FUNCTION_INFO_V1(cd2_changed_columns);

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
