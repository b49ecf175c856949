/*-------------------------------------------------------------------------
 *
 * feeds.c
 *	  What the change feeds (src/sql/feeds.sql) ask of C besides capture
 *	  (capture.c): their limits.
 *
 *-------------------------------------------------------------------------
 */
#include "cd2sync.h"

#include "fmgr.h"
#include "funcapi.h"
#include "access/htup_details.h"

PG_FUNCTION_INFO_V1(cd2_feed_limits);

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
