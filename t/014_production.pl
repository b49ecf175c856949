# Production life (issue 15): the generated DDL keeps Citus's rules; a
# pg_dump / pg_restore into a new cluster
# keeps what exists nowhere else (configuration, secrets, watermarks, merge
# evidence, feeds) and the next sync is incremental; a streaming standby
# reads everything (a feed over its limits refused), refuses to sync and to
# acknowledge (25006), runs no scheduler; once
# promoted it syncs on schedule from the committed watermarks.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $emu = Cd2Test::start_emulator(generate => 'demo');
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
# the scheduler runs on the primary and (with the same configuration, from
# the backup) on the standby, where it must wait for a promotion
my $node = Cd2Test::new_node('primary', init => { allows_streaming => 1 },
	conf => "shared_preload_libraries = 'cd2sync'\ncd2sync.database = 'postgres'\n"
	  . "cd2sync.scheduler_naptime = 200ms\n");
my $north = 'us-east-1#demo-north';
my @tables = ('users', 'pseudonyms', 'enrollments', 'courses');
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', shard_id => 1, "
	  . "tables => ARRAY['" . join("','", @tables) . "'])");
$node->safe_psql('postgres', "SELECT cd2_create_feed('dl', tables => ARRAY['users', 'enrollments'], from_start => true)");
my $r = Cd2Test::sync($node, 'north');
is(join(',', map { $r->{$_}{mode} } @tables), 'snapshot,snapshot,snapshot,snapshot', 'the first sync');

# a merge: a user deleted with merged_into_user_id (evidence cd2sync keeps)
my $users = $emu->state($north, 'users')->{rows};
# (a merge into a deleted user maps nowhere: the kept user is not deleted)
my $gone = $users->[0];
my ($kept) = grep { $_->{value}{workflow_state} ne 'deleted' && !defined $_->{value}{merged_into_user_id} }
  @$users[ 1 .. $#$users ];
$gone->{value}{workflow_state} = 'deleted';
$gone->{value}{merged_into_user_id} = $kept->{key}{id};
$emu->epoch({ client_id => $north, table => 'users', upsert => [$gone] });
$r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'incremental', 'the merge arrives incrementally');
my $resolves = "SELECT cd2_resolve_user(cd2_global_id('north', $gone->{key}{id})) = "
  . "cd2_global_id('north', $kept->{key}{id})";
is($node->safe_psql('postgres', $resolves), 't', 'the merged user resolves to its replacement');
# Citus's rules (test/citus_rules.sql) hold for the DDL cd2sync generated,
# and the check sees a table that breaks one
my $citus_rules = slurp_file("$FindBin::RealBin/../test/citus_rules.sql");
is($node->safe_psql('postgres', $citus_rules), '', 'Citus: the generated DDL breaks no rule');
$node->safe_psql('postgres', "CREATE TABLE public.planted (id bigint PRIMARY KEY);\n"
	  . "ALTER TABLE north.courses ADD CONSTRAINT planted FOREIGN KEY (id) REFERENCES public.planted NOT VALID");
is($node->safe_psql('postgres', $citus_rules), 'north.courses|foreign key planted', 'Citus: ... and sees a broken one');
$node->safe_psql('postgres', "ALTER TABLE north.courses DROP CONSTRAINT planted; DROP TABLE public.planted");

# part of the feed acknowledged: the restore must keep where it stands
$node->safe_psql('postgres',
	"SELECT cd2_feed_ack('dl', (SELECT min(position) + 3 FROM cd2_feed_read('dl', 10)))");

# What a restore must keep, as one text per item (secrets: superuser only)
my %what = (
	instances => 'SELECT name, client_id, api_url, tables, shard_id, schedule, target_schema FROM cd2sync.instances',
	secrets => 'SELECT * FROM cd2sync.instance_secrets',
	watermarks => 'SELECT instance, table_name, watermark FROM cd2sync.watermarks',
	runs => 'SELECT run_id, instance, status FROM cd2sync.runs',
	sync_log => 'SELECT run_id, table_name, status, mode, rows_upserted FROM cd2sync.sync_log',
	user_moves => 'SELECT * FROM cd2sync.user_moves',
	user_merges => 'SELECT * FROM cd2.user_merges',
	enrollments => 'SELECT * FROM cd2.enrollments',
	users => 'SELECT * FROM cd2.users',
	feeds => 'SELECT name, tables, acknowledged, pending, status FROM cd2sync.feeds',
	feed_read => "SELECT position, table_name, op, key, instance, \"row\", changed, cause FROM cd2_feed_read('dl', 100000)",
	indexes => "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), obj_description(indexrelid, 'pg_class') "
	  . "FROM pg_index WHERE indrelid = 'north.enrollments'::regclass");

sub snapshot_of
{
	my ($n) = @_;
	my %s;
	for my $k (sort keys %what)
	{
		$s{$k} = $n->safe_psql('postgres',
			"SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
			  . "FROM ($what{$k}) t");
	}
	return \%s;
}
# a user's index on an instance table, and cd2sync's on the global ids beside
# it (which the restore makes once, from the dump)
$node->safe_psql('postgres', "CREATE INDEX enr_course ON north.enrollments (course_id);\n"
	  . "SELECT cd2sync.refresh_view('enrollments')");
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_indexes WHERE schemaname = 'north' "
	  . "AND indexname IN ('enr_course', 'enrollments_course_id_global')"), '2',
	'a user index on an id column, and cd2sync\'s on its global ids');
my $before = snapshot_of($node);
ok($before->{feed_read} !~ /^0 /, 'the feed has unacknowledged changes');

# 1. pg_dump / pg_restore into a new cluster
my $dump = "$PostgreSQL::Test::Utils::tmp_check/cd2.dump";
$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('postgres') ], 'pg_dump');
my $restored = Cd2Test::new_node('restored', no_extension => 1);
$restored->command_ok([ 'pg_restore', '--exit-on-error', '-d', $restored->connstr('postgres'), $dump ],
	'pg_restore into a new cluster');
my $after = snapshot_of($restored);
for my $k (sort keys %what)
{
	is($after->{$k}, $before->{$k}, "restore: $k as dumped");
}
my ($users_row) = grep { $_ != $gone && $_ != $kept } @$users;
$users_row->{value}{name} = 'After the restore';
$emu->epoch({ client_id => $north, table => 'users', upsert => [$users_row] });
my $last = $node->safe_psql('postgres', 'SELECT max(position) FROM cd2sync.changes');
$r = Cd2Test::sync($restored, 'north');
is($r->{users}{mode}, 'incremental', 'restore: the next sync is incremental (the secret and watermarks came back)');
is(join(',', map { $r->{$_}{mode} } grep { $_ ne 'users' } @tables), 'unchanged,unchanged,unchanged',
	'restore: ... for every table');
is($restored->safe_psql('postgres',
	"SELECT string_agg(op || ' ' || (\"row\"->>'name'), ',') FROM cd2_feed_read('dl', 100000) WHERE position > $last"),
	'update After the restore', 'restore: the feed goes on after its restored positions');
is($restored->safe_psql('postgres', $resolves), 't', 'restore: the merged user still resolves to its replacement');
$restored->stop;

# 2. a streaming standby
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
$node->wait_for_catchup($standby);
my $on_standby = snapshot_of($standby);
for my $k (grep { $_ ne 'secrets' } sort keys %what)
{
	is($on_standby->{$k}, $before->{$k}, "standby: reads $k");
}
is($standby->safe_psql('postgres', "SELECT cd2_watermark('north', 'users') = "
	  . "(SELECT watermark FROM cd2sync.watermarks WHERE table_name = 'users')"), 't', 'standby: cd2_watermark');
is($standby->safe_psql('postgres', "SELECT count(*) FROM cd2sync.progress"), '0', 'standby: progress');
my ($rc, $out, $err) = $standby->psql('postgres', "\\set VERBOSITY verbose\nSELECT * FROM cd2_sync_now('north')");
like($err, qr/25006.*standby/s, 'standby: cd2_sync_now fails with 25006, saying why');
($rc, $out, $err) = $standby->psql('postgres', "\\set VERBOSITY verbose\nSELECT cd2_sync_start('north')");
like($err, qr/25006/, 'standby: so does cd2_sync_start');
# a feed: read (above); over a limit, refused without writing a mark there;
# acknowledged only on the primary
($rc, $out, $err) = $standby->psql('postgres',
	"\\set VERBOSITY verbose\nSET cd2sync.feed_max_pending = 1;\nSELECT count(*) FROM cd2_feed_read('dl')");
like($err, qr/55000: cd2sync feed "dl" is stale: more than 1 changes wait/, 'standby: a feed over its limits is refused (55000)');
($rc, $out, $err) = $standby->psql('postgres', "\\set VERBOSITY verbose\nSELECT cd2_feed_ack('dl', "
	  . "(SELECT max(position) FROM cd2_feed_read('dl', 10)))");
like($err, qr/25006/, 'standby: an acknowledgement fails with 25006');

# the scheduler: nothing on the standby, syncs once it is promoted
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', schedule => interval '1 second')");
$node->wait_for_catchup($standby);
$node->stop;
my $last_run = $standby->safe_psql('postgres', 'SELECT coalesce(max(run_id), 0) FROM cd2sync.runs');
my $log_at = -s $standby->logfile;
sleep 3;
is($standby->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type ~ '^cd2sync'"), '0',
	'standby: no cd2sync process runs');
# (the log holds this test's own statements too)
unlike(join("\n", grep { !/statement:/ } split /\n/, substr(slurp_file($standby->logfile), $log_at)),
	qr/cd2sync/, 'standby: the scheduler logs nothing');
$standby->promote;
my $first_run = "(SELECT min(run_id) FROM cd2sync.runs WHERE run_id > $last_run AND trigger = 'schedule' "
  . "AND status = 'done')";
ok($standby->poll_query_until('postgres', "SELECT $first_run IS NOT NULL"), 'promoted: the scheduler syncs');
# (the primary may have synced the change the restore test made, or not)
like($standby->safe_psql('postgres',
	"SELECT string_agg(DISTINCT l.mode, ',' ORDER BY l.mode) FROM cd2sync.sync_log l WHERE l.run_id = $first_run"),
	qr/^(incremental,)?unchanged$/, 'promoted: from the committed watermarks (no snapshot)');
is($standby->safe_psql('postgres', "SELECT name FROM north.users WHERE id = $users_row->{key}{id}"),
	'After the restore', 'promoted: up to date with the API');

done_testing();
