# web_logs (namespace canvas_logs) keeps its history: stored partitioned by
# request time, a partition per day made by cd2sync ahead of the rows; new
# records go in by COPY; a record seen twice is stored once; a full resync
# replaces only the API's 30-day window; keep_logs ages history out by
# dropping whole partitions; rows of merged users show the replacement.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;

my $emu = Cd2Test::start_emulator(generate => 'demo');
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('logs');
my $north = 'us-east-1#demo-north';
my $T = 'north_canvas_logs.web_logs';

sub sq { return $node->safe_psql('postgres', $_[0]); }
sub log_lines { return scalar(() = slurp_file($node->logfile) =~ /$_[0]/g); }

sq("SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', shard_id => 1, "
	  . "tables => ARRAY['users', 'canvas_logs.web_logs'])");

# 1. the first snapshot: partitioned by request time, a partition per day
my $r = Cd2Test::sync($node, 'north');
is("$r->{'canvas_logs.web_logs'}{mode}$r->{'canvas_logs.web_logs'}{error}", 'snapshot', 'first snapshot');
Cd2Test::table_is($node, $emu, $north, 'north_canvas_logs', 'web_logs', 'it holds the API\'s 30 days',
	cd2 => 'canvas_logs.web_logs', window => 1);
is(sq("SELECT relkind::text || ' ' || pg_get_partkeydef(oid) FROM pg_class WHERE oid = '$T'::regclass"),
	'p RANGE ("timestamp")', 'web_logs is partitioned by its request time');
is(sq("SELECT string_agg(a.attname, ',' ORDER BY k.ord) FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(att, ord) "
	  . "JOIN pg_attribute a ON a.attrelid = '$T'::regclass AND a.attnum = k.att "
	  . "WHERE i.indrelid = '$T'::regclass AND i.indisprimary"), 'id,timestamp',
	'its key: id, with the request time it never changes');
is(sq("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '$T'::regclass "
	  . "AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT' AND c.relname !~ '_p[0-9]{8}\$'"), '0',
	'partitions are named by day');
is(sq("SELECT count(*) FROM $T p WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
	  . "WHERE i.inhparent = '$T'::regclass AND c.relname = 'web_logs' || to_char(p.\"timestamp\", '_pYYYYMMDD') "
	  . "AND c.oid = p.tableoid)"), '0', 'every row is in the partition of its day');
is(sq("SELECT count(*) FROM north_canvas_logs.web_logs_default"), '0', 'the default partition is empty');
is(sq("SELECT string_agg(am.amname, ',' ORDER BY am.amname) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
	  . "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = '$T'::regclass AND i.indkey[0] = "
	  . "(SELECT attnum FROM pg_attribute WHERE attrelid = '$T'::regclass AND attname = 'timestamp')"),
	'brin', 'the request time has a BRIN index');
is(sq("SELECT count(*) FROM pg_indexes WHERE schemaname = 'north_canvas_logs' AND tablename = 'web_logs' "
	  . "AND indexname IN ('web_logs_user_id_resolved', 'web_logs_real_user_id_resolved')"), '2',
	'each user column has its lookup index');

# 2. new records go in by COPY; a record seen again is stored once
my @rows = @{ $emu->state($north, 'canvas_logs.web_logs', 0, 1)->{rows} };
my $clock = $emu->clock;
sub new_log
{
	my ($id, $ts, %v) = @_;
	my %value = (%{ $rows[0]{value} }, timestamp => $ts, url => "/new/$id", %v);
	return { key => { id => $id }, value => \%value };
}
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ map { new_log(sprintf('00000000-0000-4000-8000-%012d', $_), $clock) } 1 .. 5 ] } ] });
my $staged_before = log_lines(qr/web_logs: loading through the/);
$r = Cd2Test::sync($node, 'north');
is("$r->{'canvas_logs.web_logs'}{mode}/$r->{'canvas_logs.web_logs'}{upserted}", 'incremental/5', 'five new records');
is(log_lines(qr/web_logs: loading through the/), $staged_before, 'loaded straight by COPY, not through staging');
my $count = sq("SELECT count(*) FROM $T");
# the same record again (a retried job, overlapping windows), and a new one
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000001', $clock),
				new_log('00000000-0000-4000-8000-000000000006', $emu->clock) ] } ] });
$r = Cd2Test::sync($node, 'north');
is($r->{'canvas_logs.web_logs'}{error}, '', 'a record seen again does not fail the sync');
is(sq("SELECT count(*) FROM $T"), $count + 1, 'it is stored once; the new one is added');
is(sq("SELECT count(*) FROM $T WHERE id = '00000000-0000-4000-8000-000000000001'"), '1', 'one row of it');
ok(log_lines(qr/web_logs: loading through the/) > $staged_before, 'that load went through staging');

# 3. request times with no partition yet (days ahead, a year back): a partition
# each after the load, and none for the days between
my $ahead = sq("SELECT to_char(('$clock'::timestamptz + interval '9 days') AT TIME ZONE 'UTC', "
	  . "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
my $back = sq("SELECT to_char(('$clock'::timestamptz - interval '400 days') AT TIME ZONE 'UTC', "
	  . "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
my $parts_before = sq("SELECT count(*) FROM pg_inherits WHERE inhparent = '$T'::regclass");
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000007', $ahead),
				new_log('00000000-0000-4000-8000-000000000009', $back) ] } ] });
Cd2Test::sync($node, 'north');
is(sq("SELECT count(*) FROM north_canvas_logs.web_logs_default"), '0', 'the default partition is settled');
is(sq("SELECT tableoid::regclass FROM $T WHERE id = '00000000-0000-4000-8000-000000000007'"),
	'north_canvas_logs.web_logs' . sq("SELECT to_char('$ahead'::timestamptz AT TIME ZONE 'UTC', '_pYYYYMMDD')"),
	'a row of a new day is in that day\'s partition');
is(sq("SELECT tableoid::regclass FROM $T WHERE id = '00000000-0000-4000-8000-000000000009'"),
	'north_canvas_logs.web_logs' . sq("SELECT to_char('$back'::timestamptz AT TIME ZONE 'UTC', '_pYYYYMMDD')"),
	'a row of a year back too');
ok(sq("SELECT count(*) FROM pg_inherits WHERE inhparent = '$T'::regclass") - $parts_before <= 3,
	'no partition is made for the days between');

# 4. a merged user's rows show the replacement, rows loaded later by COPY included
my @users = @{ $emu->state($north, 'users')->{rows} };
my ($old) = grep { my $id = $_->{key}{id}; grep { ($_->{value}{user_id} // 0) == $id } @rows } @users;
my ($new) = grep { $_->{key}{id} != $old->{key}{id} && ($_->{value}{workflow_state} // '') eq 'registered' } @users;
# (north is shard 1: an id below 10^13 is a local one)
sub gid { my ($id) = @_; return $id >= 10**13 ? $id : 10**13 + $id; }
my %merged = (%{ $old->{value} }, workflow_state => 'deleted', merged_into_user_id => gid($new->{key}{id}));
$emu->post('/_emu/epoch', { changes => [
	{ client_id => $north, table => 'users', upsert => [ { key => $old->{key}, value => \%merged } ] } ] });
$r = Cd2Test::sync($node, 'north');
my $old_g = gid($old->{key}{id});
my $new_g = gid($new->{key}{id});
is(sq("SELECT replacement_user_id FROM cd2.user_merges WHERE superseded_user_id = $old_g"), $new_g, 'the merge is known');
is(sq("SELECT count(*) FILTER (WHERE user_id = $new_g) || '|' || count(*) FROM cd2_canvas_logs.web_logs "
	  . "WHERE original_user_id = $old_g"),
	sq("SELECT count(*) || '|' || count(*) FROM $T WHERE user_id = $old->{key}{id}"),
	'every stored row of the merged user shows the replacement');
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000008', $emu->clock, user_id => $old->{key}{id}) ] } ] });
$staged_before = log_lines(qr/web_logs: loading through the/);
$r = Cd2Test::sync($node, 'north');
is(log_lines(qr/web_logs: loading through the/), $staged_before, 'a new row of that user, loaded by COPY');
is(sq("SELECT user_id || ' ' || original_user_id FROM cd2_canvas_logs.web_logs "
	  . "WHERE id = '00000000-0000-4000-8000-000000000008'"), "$new_g $old_g", 'shows the replacement too');
# a late record of that user (twelve days after its request, into its day's
# partition), loaded by COPY: it shows the replacement too
my $late = sq("SELECT to_char(('$clock'::timestamptz - interval '12 days') AT TIME ZONE 'UTC', "
	  . "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000010', $late, user_id => $old->{key}{id}) ] } ] });
$r = Cd2Test::sync($node, 'north');
is(sq("SELECT tableoid::regclass FROM $T WHERE id = '00000000-0000-4000-8000-000000000010'"),
	'north_canvas_logs.web_logs' . sq("SELECT to_char('$late'::timestamptz AT TIME ZONE 'UTC', '_pYYYYMMDD')"),
	'a late record goes into the partition of its day');
is(sq("SELECT user_id || ' ' || original_user_id FROM cd2_canvas_logs.web_logs "
	  . "WHERE id = '00000000-0000-4000-8000-000000000010'"), "$new_g $old_g",
	'a late record of a merged user shows the replacement');
# ... and one a minute older than a day before what the table held: in the
# partition of a day that also holds newer rows
my $edge = sq("SELECT to_char(watermark AT TIME ZONE 'UTC' - interval '1 day 1 minute', "
	  . "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM cd2sync.table_state "
	  . "WHERE instance = 'north' AND table_name = 'canvas_logs.web_logs'");
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000013', $edge, user_id => $old->{key}{id}) ] } ] });
$staged_before = log_lines(qr/web_logs: loading through the/);
$r = Cd2Test::sync($node, 'north');
is(log_lines(qr/web_logs: loading through the/), $staged_before, 'loaded by COPY');
is(sq("SELECT user_id || ' ' || original_user_id FROM cd2_canvas_logs.web_logs "
	  . "WHERE id = '00000000-0000-4000-8000-000000000013'"), "$new_g $old_g",
	'so is a record a day and a minute late');

# 5. a full resync replaces the API's window only: older rows are history
my $at = $emu->post('/_emu/epoch', { at => sq("SELECT to_char(('$clock'::timestamptz + interval '20 days') "
	  . "AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"), changes => [] })->{at};
my $window = $emu->state($north, 'canvas_logs.web_logs', 0, 1)->{window_start};
my $older = sq("SELECT count(*) FROM $T WHERE \"timestamp\" < '$window'::timestamptz AT TIME ZONE 'UTC'");
ok($older > 0, "rows older than the API's window ($older)");
my $older_digest = sq("SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM $T "
	  . "WHERE \"timestamp\" < '$window'::timestamptz AT TIME ZONE 'UTC'");
$r = Cd2Test::sync($node, 'north', full => 1);
is("$r->{'canvas_logs.web_logs'}{mode}$r->{'canvas_logs.web_logs'}{error}", 'snapshot', 'a full resync');
is(sq("SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM $T "
	  . "WHERE \"timestamp\" < '$window'::timestamptz AT TIME ZONE 'UTC'"), $older_digest,
	'it kept every row older than the window');
is(sq("SELECT count(*) FROM $T WHERE \"timestamp\" >= '$window'::timestamptz AT TIME ZONE 'UTC'"),
	scalar(@{ $emu->state($north, 'canvas_logs.web_logs', 0, 1)->{rows} }),
	'and the window holds what the API serves');

# 6. a column type that cannot change in place: a log keeps its history.
# interaction_micros (int64 -> int32) converts; http_status (a string ->
# int32) does not for a stored value, which stays in a column beside it
my $st = $emu->state($north, 'canvas_logs.web_logs');
my $props = $st->{schema}{properties}{value}{properties};
$props->{interaction_micros} = { type => 'integer', format => 'int32' };
$props->{http_status} = { type => 'integer', format => 'int32' };
$window = $emu->state($north, 'canvas_logs.web_logs', 0, 1)->{window_start};
my $hist = "\"timestamp\" < '$window'::timestamptz AT TIME ZONE 'UTC'";
sq("SELECT cd2_create_feed('logs', tables => ARRAY['canvas_logs.web_logs'], from_start => true)");
my $odd = sq("SELECT id FROM $T WHERE $hist ORDER BY id LIMIT 1");
sq("UPDATE $T SET http_status = 'x' WHERE id = '$odd'");
my $before = sq("SELECT md5(string_agg(id || ':' || interaction_micros || ':' || http_status, ',' ORDER BY id)) FROM $T");
my $n_hist = sq("SELECT count(*) FROM $T WHERE $hist");
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	schema => { version => $st->{version} + 1, schema => $st->{schema} } } ] });
$r = Cd2Test::sync($node, 'north');
is("$r->{'canvas_logs.web_logs'}{mode}$r->{'canvas_logs.web_logs'}{error}", 'snapshot',
	'a type change the table cannot take in place: a fresh snapshot');
my $kept = 'cd2_http_status_before_' . sq("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD')");
is(sq("SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attname) FROM pg_attribute "
	  . "WHERE attrelid = '$T'::regclass AND attname IN ('interaction_micros', 'http_status', '$kept')"),
	"$kept character varying(3), http_status integer, interaction_micros integer", 'the columns have their new types');
is(sq("SELECT count(*) FROM $T WHERE $hist"), $n_hist, 'every row of its history is kept');
is(sq("SELECT md5(string_agg(id || ':' || interaction_micros || ':' || $kept, ',' ORDER BY id)) FROM $T"), $before,
	'with its values: converted, or kept beside the column whose values do not convert');
is(sq("SELECT count(*) FILTER (WHERE http_status IS NULL) || '/' || count(*) FROM $T WHERE $hist"), "$n_hist/$n_hist",
	'that column is empty in history');
is(sq("SELECT count(*) FROM $T WHERE NOT $hist AND http_status::text IS DISTINCT FROM $kept"), '0',
	'and holds what the snapshot brought');
like(slurp_file($node->logfile), qr/WARNING:  cd2sync: column .*http_status becomes integer upstream, and stored values do not convert.*kept in column $kept/,
	'a warning says where the old values are');
is(sq("SELECT count(*) FROM cd2_canvas_logs.web_logs WHERE http_status IS NOT NULL"),
	sq("SELECT count(*) FROM $T WHERE NOT $hist"), 'the view shows the new column');
is(sq(q{
	WITH c AS (SELECT * FROM cd2_feed_read('logs', 100000000)),
	     last AS (SELECT DISTINCT ON (key) * FROM c ORDER BY key, position DESC),
	     replayed AS (SELECT "row" AS r FROM last WHERE op <> 'delete'),
	     actual AS (SELECT to_jsonb(v) FROM cd2_canvas_logs.web_logs v)
	SELECT (SELECT count(*) FROM (SELECT * FROM actual EXCEPT ALL SELECT * FROM replayed) x) || ' missing, '
	    || (SELECT count(*) FROM (SELECT * FROM replayed EXCEPT ALL SELECT * FROM actual) y) || ' extra'}),
	'0 missing, 0 extra', 'a feed following the log replays to its view, the converted values included');
# a record of a day with no partition (long ago) goes in through the
# default partition, then moves to its day's: one insert to the feed, no
# delete
sq("SELECT cd2_feed_ack('logs', (SELECT max(position) FROM cd2sync.changes))");
my $later = sq("SELECT to_char(('$clock'::timestamptz - interval '450 days') AT TIME ZONE 'UTC', "
	  . "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')");
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000011', $later) ] } ] });
Cd2Test::sync($node, 'north');
is(sq("SELECT tableoid::regclass FROM $T WHERE id = '00000000-0000-4000-8000-000000000011'"),
	'north_canvas_logs.web_logs' . sq("SELECT to_char('$later'::timestamptz AT TIME ZONE 'UTC', '_pYYYYMMDD')"),
	'a record of a day long ago is moved to its partition');
is(sq("SELECT string_agg(op || ' ' || (key->>'id'), ', ' ORDER BY position) FROM cd2_feed_read('logs')"),
	'insert 00000000-0000-4000-8000-000000000011', 'the feed has it once, as an insert: the move is not a change');
# a new record of the merged user (section 4) while the feed follows the
# log: one insert, showing the replacement, not an insert of the stored user
# then an update
sq("SELECT cd2_feed_ack('logs', (SELECT max(position) FROM cd2sync.changes))");
$emu->post('/_emu/epoch', { changes => [ { client_id => $north, table => 'canvas_logs.web_logs',
	upsert => [ new_log('00000000-0000-4000-8000-000000000012', $emu->clock, user_id => $old->{key}{id}) ] } ] });
$r = Cd2Test::sync($node, 'north');
is("$r->{'canvas_logs.web_logs'}{mode}/$r->{'canvas_logs.web_logs'}{upserted}", 'incremental/1', 'one new record');
is(sq("SELECT string_agg(concat_ws(' ', op, key->>'id', \"row\"->>'user_id', \"row\"->>'original_user_id', changed, cause), "
	  . "', ' ORDER BY position) FROM cd2_feed_read('logs')"),
	"insert 00000000-0000-4000-8000-000000000012 $new_g $old_g sync",
	'a record of a merged user reaches the feed once, as an insert showing the replacement');
is(sq("SELECT user_id FROM cd2_canvas_logs.web_logs WHERE id = '00000000-0000-4000-8000-000000000012'"), $new_g,
	'as the view shows it');
sq("SELECT cd2_drop_feed('logs')");
# the same column changing again that day, its values again not converting:
# kept in a column of its own (tried and rolled back)
is(sq(qq{BEGIN;
	UPDATE $T SET http_status = 500 WHERE id = '$odd';
	UPDATE cd2sync.table_state SET pending_types = '{"http_status": "boolean"}'
	 WHERE instance = 'north' AND table_name = 'canvas_logs.web_logs';
	SELECT cd2sync._apply_pending_types('north', 'canvas_logs.web_logs', '$T') IS NULL;
	SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attname) FROM pg_attribute
	 WHERE attrelid = '$T'::regclass AND (attname LIKE 'cd2_http_status%' OR attname = 'http_status');
	SELECT ${kept}_2 FROM $T WHERE id = '$odd';
	ROLLBACK}),
	"t\n$kept character varying(3), ${kept}_2 integer, http_status boolean\n500",
	'a second change of the column that day keeps its values in a second column');

# 7. keep_logs: history older than that goes, by whole partitions
my $parts = sq("SELECT count(*) FROM pg_inherits WHERE inhparent = '$T'::regclass");
sq("SELECT cd2_alter_instance('north', keep_logs => interval '25 days')");
$r = Cd2Test::sync($node, 'north');
is($r->{'canvas_logs.web_logs'}{error}, '', 'a sync after keep_logs is set');
my $cutoff = sq("SELECT date_trunc('day', ('$at'::timestamptz - interval '25 days') AT TIME ZONE 'UTC')");
is(sq("SELECT count(*) FROM $T WHERE \"timestamp\" < '$cutoff'"), '0', 'no row of a day older than keep_logs is left');
ok(sq("SELECT count(*) FROM pg_inherits WHERE inhparent = '$T'::regclass") < $parts, 'their partitions are gone');
is(sq("SELECT min(day) FROM cd2sync._log_partitions('$T')"), $cutoff,
	'whole days go: the oldest partition left is the day keep_logs reaches into');
ok(sq("SELECT count(*) FROM $T WHERE \"timestamp\" >= '$cutoff'") > 0, 'newer history stays');

$node->stop;
$emu->stop;
done_testing();
