# The scheduler (shared_preload_libraries): instances with a schedule sync
# on their own, in parallel up to cd2sync.max_workers, and converge; the
# schedules are visible in SQL; a reload keeps the scheduler; a restart in
# the middle of a download resumes from the committed watermarks; a fast
# shutdown does not wait for a download; instances without a schedule are
# left alone; instances marked due for the merge map are brought up to it.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $emu = Cd2Test::start_emulator(generate => 'demo');
# jobs take a while upstream, so that runs of the two instances overlap
$emu->config(job_latency => 0.6, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('scheduler', conf => join("\n",
	"shared_preload_libraries = 'cd2sync'",
	"cd2sync.database = 'postgres'",
	"cd2sync.max_workers = 2",
	"cd2sync.scheduler_naptime = 200ms"));
my ($north, $south) = ('us-east-1#demo-north', 'us-east-1#demo-south');
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', tables => ARRAY['users', 'courses'], schedule => '2 seconds');\n"
	  . "SELECT cd2_add_instance('south', '$south', 'south-secret', api_url => '$emu->{url}', tables => ARRAY['users'], schedule => '2 seconds');\n"
	  . "SELECT cd2_add_instance('idle', '$south', 'south-secret', api_url => '$emu->{url}', tables => ARRAY['users']);");

is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cd2sync scheduler'"),
	'1', 'the scheduler runs');
ok($node->poll_query_until('postgres',
	"SELECT count(DISTINCT instance) = 2 AND min(n) >= 2 FROM (SELECT instance, count(*) n FROM cd2sync.runs "
	  . "WHERE trigger = 'schedule' AND status = 'done' GROUP BY instance) r"),
	'both scheduled instances sync, again and again');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.runs WHERE instance = 'idle'"),
	'0', 'an instance without a schedule is not synced');
is($node->safe_psql('postgres', "SELECT string_agg(instance || ':' || (next_run_at IS NOT NULL) || ':' || coalesce(last_status, '-'), ',' ORDER BY instance) FROM cd2sync.schedules"),
	'idle:false:-,north:true:done,south:true:done', 'cd2sync.schedules shows the next run and the last result');

# in parallel: runs of the two instances overlap in time
ok($node->safe_psql('postgres',
	"SELECT count(*) FROM cd2sync.runs a JOIN cd2sync.runs b ON a.instance < b.instance "
	  . "AND a.started_at < b.finished_at AND b.started_at < a.finished_at") > 0,
	'the two instances sync in parallel');

# changes upstream arrive on their own
sub converged
{
	return Cd2Test::table_diff($node, $emu, $north, 'north', 'users') eq ''
	  && Cd2Test::table_diff($node, $emu, $south, 'south', 'users') eq '';
}
sub wait_converged
{
	my $t0 = time;
	while (time - $t0 < 30) { return 1 if converged(); usleep(200_000); }
	return 0;
}
my $nu = $emu->state($north, 'users')->{rows};
my $su = $emu->state($south, 'users')->{rows};
$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => $nu->[0]{key} } ] },
	{ client_id => $south, table => 'users', delete => [ { key => $su->[0]{key} } ] });
ok(wait_converged(), 'an upstream change reaches both instances without a manual sync');

# a reload keeps the scheduler (same process) and applies the new settings
my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync scheduler'");
$node->safe_psql('postgres', "ALTER SYSTEM SET cd2sync.max_workers = 1; SELECT pg_reload_conf()");
usleep(500_000);
is($node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync scheduler'"),
	$pid, 'SIGHUP reloads without restarting the scheduler');
my $since = $node->safe_psql('postgres', "SELECT now()");
# (the check says something only once both instances ran meanwhile, twice)
ok($node->poll_query_until('postgres', "SELECT count(*) >= 2 AND min(n) >= 2 FROM (SELECT count(*) n "
	  . "FROM cd2sync.runs WHERE started_at > '$since' AND status = 'done' GROUP BY instance) r"),
	'with max_workers = 1 both instances still run');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM cd2sync.runs a JOIN cd2sync.runs b ON a.instance < b.instance "
	  . "AND a.started_at > '$since' AND b.started_at > '$since' "
	  . "AND a.started_at < coalesce(b.finished_at, now()) AND b.started_at < coalesce(a.finished_at, now())"),
	'0', 'with max_workers = 1 runs no longer overlap');
$node->safe_psql('postgres', "ALTER SYSTEM RESET cd2sync.max_workers; SELECT pg_reload_conf()");

# a restart in the middle of a download: slow downloads, restart, then converge
$emu->config(job_latency => 0.1);
$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => $nu->[1]{key} } ] });
$emu->faults({ endpoint => 'download', kind => 'hang', seconds => 60, times => 1 });
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker' AND query LIKE '%downloading%'"),
	'a worker is downloading');
my $t0 = time;
$node->stop('fast');
ok(time - $t0 < 15, 'a fast shutdown does not wait for the download (which hangs for 60 s)');
$node->start;
ok(wait_converged(), 'after the restart, syncing resumes and converges');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cd2sync.runs WHERE status = 'running' AND worker_pid NOT IN (SELECT pid FROM pg_stat_activity)"),
	'no run is left marked running once each instance ran again');
ok($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.runs WHERE error = 'the sync worker stopped before the run was done'") > 0,
	'the run cut by the restart is marked failed by the next one');

# the scheduler sweeps the change feeds: what a consumer acknowledged is
# deleted at its next look, with no sync to do it (an acknowledgement
# deletes nothing itself, so that a consumer's open transaction holds
# nothing a sync waits for)
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', schedule => NULL), cd2_alter_instance('south', schedule => NULL)");
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cd2sync.runs WHERE status = 'running'"), 'no sync runs');
my $runs = $node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.runs");
$node->safe_psql('postgres', "SELECT cd2_create_feed('swept', tables => ARRAY['users'])");
$node->safe_psql('postgres', "UPDATE north.users SET name = name || '!'");
my $users = $node->safe_psql('postgres', "SELECT count(*) FROM north.users");
my @out = split /\n/, $node->safe_psql('postgres', "BEGIN; SELECT cd2_feed_ack('swept', (SELECT max(position) FROM cd2_feed_read('swept')));"
	  . " SELECT count(*) FROM cd2sync.changes; COMMIT");
is($out[-1], $users, 'a feed acknowledges every change it has, and deletes none');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cd2sync.changes"), 'the scheduler deletes them');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.runs"), $runs, 'with no sync');

# the scheduler brings an idle instance marked due up to the merge map (a
# refresh in another instance's sync could not take its lock, and its own
# run, which would, may be far away); one a sync holds stays marked
my $holder = $node->background_psql('postgres');
$holder->query_safe("SELECT pg_advisory_lock(52517, hashtext('idle'))");
$node->safe_psql('postgres', "INSERT INTO cd2sync.resolve_due (instance) VALUES ('north'), ('idle')");
ok($node->poll_query_until('postgres', "SELECT string_agg(instance, ',') = 'idle' FROM cd2sync.resolve_due"),
	'the scheduler resolves an idle instance marked due');
usleep(600_000);    # (three looks)
is($node->safe_psql('postgres', "SELECT string_agg(instance, ',') FROM cd2sync.resolve_due"), 'idle',
	'and leaves one a sync holds marked');
$holder->query_safe("SELECT pg_advisory_unlock(52517, hashtext('idle'))");
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cd2sync.resolve_due"), 'until it is free');
$holder->quit;

$node->stop;
$emu->stop;
done_testing();
