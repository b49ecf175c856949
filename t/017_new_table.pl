# A new table's snapshot: loaded apart (schema cd2sync_load) by the sync
# worker and load workers at once, each COPYing whole objects, its key built
# after the rows, and put in place complete, with its watermark: readers see
# no table until then. A load worker that dies fails the table sync, which
# shows nothing of it; the next run converges.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;

my $emu = Cd2Test::start_emulator(generate => 'demo');
# several objects a job, none empty: work for several processes
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false, parts => 4, empty_parts => 0);
my $node = Cd2Test::new_node('new_table');
my $north = 'us-east-1#demo-north';

sub sq { return $node->safe_psql('postgres', $_[0]); }
sub run_done
{
	my ($run) = @_;
	return $node->poll_query_until('postgres', "SELECT status <> 'running' FROM cd2sync.runs WHERE run_id = $run");
}
sub load_workers { return sq("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cd2sync load worker'"); }

sq("SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', shard_id => 1, "
	  . "tables => ARRAY['users', 'enrollments', 'pseudonyms'])");

# 1. while a new table loads, readers see none of it
# (every object of it slow: the processes are caught at work)
$emu->faults({ endpoint => 'download', table => 'users', kind => 'hang', seconds => 2, times => -1 });
my $run = sq("SET cd2sync.load_workers = 2; SELECT cd2_sync_start('north', tables => ARRAY['users'])");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'cd2sync load worker'"),
	'load workers load the snapshot of a new table');
is(sq("SELECT to_regclass('north.users') IS NULL"), 't', 'meanwhile readers see no table');
is(sq("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
	  . "WHERE n.nspname = 'cd2sync_load' AND c.relkind = 'r'"), '1', 'it is loaded apart, in cd2sync_load');
is(sq("SELECT string_agg(a.attname || ' ' || (SELECT count(*) FROM pg_index x WHERE x.indrelid = c.oid "
	  . "AND x.indpred IS NOT NULL AND pg_get_indexdef(x.indexrelid) LIKE '%' || a.attname || '%'), ', ') "
	  . "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid "
	  . "WHERE n.nspname = 'cd2sync_load' AND c.relkind = 'r' AND a.attname LIKE 'cd2\\_%'"), 'cd2_merged_into_user_id 1',
	'with its bookkeeping columns and their partial indexes: a load fills none of them');
ok(run_done($run), 'the run ends');
$emu->clear_faults;
is(sq("SELECT mode || ' ' || status FROM cd2sync.sync_log WHERE run_id = $run"), 'snapshot ok', 'a snapshot');
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'the table holds every row');
like(slurp_file($node->logfile), qr/north\.users: \d+ objects of a new table loaded by the sync worker and [12] load workers/,
	'the sync worker and load workers shared its objects');
is(sq("SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
	  . "AND a.attnum = ANY (i.indkey) WHERE i.indrelid = 'north.users'::regclass AND i.indisprimary"), 'id',
	'its key was built after the rows');
is(sq("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'cd2sync_load'"),
	'0', 'nothing is left apart');
is(sq("SELECT count(*) FROM cd2.users WHERE instance = 'north'"), sq("SELECT count(*) FROM north.users"),
	'the table is in the reconciled view');
is(sq("SELECT watermark IS NOT NULL FROM cd2sync.watermarks WHERE instance = 'north' AND table_name = 'users'"), 't',
	'with its watermark');

# 2. a load worker that dies: the table sync fails and shows nothing; the next run converges
# (tables of no array column: COPY cannot take CD2's JSON arrays, which go through staging)
$emu->faults({ endpoint => 'download', table => 'enrollments', kind => 'hang', seconds => 5, times => -1 });
$run = sq("SET cd2sync.load_workers = 2; SELECT cd2_sync_start('north', tables => ARRAY['enrollments'])");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'cd2sync load worker'"), 'a load worker runs');
sq("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'cd2sync load worker'");
ok(run_done($run), 'the run ends');
like(sq("SELECT mode || ': ' || error FROM cd2sync.sync_log WHERE run_id = $run"),
	qr/^failed: a cd2sync load worker exited before its objects were loaded/, 'the table sync failed, saying why');
is(sq("SELECT to_regclass('north.enrollments') IS NULL"), 't', 'no table appeared');
is(sq("SELECT count(*) FROM cd2sync.table_state WHERE instance = 'north' AND table_name = 'enrollments' "
	  . "AND watermark IS NOT NULL"), '0', 'nor a watermark');
$emu->clear_faults;
my $r = Cd2Test::sync($node, 'north', tables => [ 'enrollments' ], pre => 'SET cd2sync.load_workers = 2;');
is("$r->{enrollments}{mode}$r->{enrollments}{error}", 'snapshot', 'the next run converges');
Cd2Test::table_is($node, $emu, $north, 'north', 'enrollments', 'with every row');
is(sq("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'cd2sync_load'"),
	'0', 'what the failed load left apart is gone');
# the partial indexes were made before the rows, the others after: each
# under the name it has on a table made in place, once
is(sq("SELECT string_agg(c.relname || ' ' || coalesce(x.indpred IS NOT NULL, false), ', ' ORDER BY c.relname) "
	  . "FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid WHERE x.indrelid = 'north.enrollments'::regclass"),
	'enrollments_global_id false, enrollments_merge_duplicates true, enrollments_pkey false, '
	  . 'enrollments_user_id_replaced true, enrollments_user_id_resolved false',
	'its indexes are those of a table made in place');

# 3. load_workers = 0: the sync worker alone, the same way; a change feed
# following the table from before it existed gets its rows
sq("SELECT cd2_create_feed('logins', tables => ARRAY['pseudonyms'])");
$r = Cd2Test::sync($node, 'north', tables => [ 'pseudonyms' ], pre => 'SET cd2sync.load_workers = 0;');
is("$r->{pseudonyms}{mode}$r->{pseudonyms}{error}", 'snapshot', 'a new table without load workers');
Cd2Test::table_is($node, $emu, $north, 'north', 'pseudonyms', 'with every row');
like(slurp_file($node->logfile), qr/north\.pseudonyms: \d+ objects of a new table loaded by the sync worker and 0 load workers/,
	'the sync worker alone loaded it');
is(sq("SELECT count(*) FILTER (WHERE op = 'insert' AND cause = 'sync') || '/' || count(*) FROM cd2_feed_read('logins', 100000)"),
	sq("SELECT count(*) || '/' || count(*) FROM cd2.pseudonyms"), 'a feed following it gets an insert per row');
is(load_workers(), '0', 'no load worker is left running');

$node->stop;
$emu->stop;
done_testing();
