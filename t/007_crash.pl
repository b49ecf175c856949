# Crash safety: kill -9 of the sync worker in the middle of a table's load,
# an immediate restart of the server there, and kill -9 of the postmaster
# (the worker exits, the server starts again): afterwards every table holds
# exactly the state of its committed watermark, and the next sync converges.
# cd2_drop_instance, DROP DATABASE of another database and DROP EXTENSION
# while a sync runs neither hang nor crash.
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
$emu->config(job_latency => 0.1, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('crash', conf => 'restart_after_crash = on');
my $north = 'us-east-1#demo-north';
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', tables => ARRAY['courses', 'users'])");
my $r = Cd2Test::sync($node, 'north');
is($r->{users}{mode} . $r->{courses}{mode}, 'snapshotsnapshot', 'first sync');

# an epoch for both tables; the users download then hangs, so the worker
# sits inside the transaction that loads users (courses is done by then)
sub start_hanging_sync
{
	my $users = $emu->state($north, 'users')->{rows};
	my $courses = $emu->state($north, 'courses')->{rows};
	$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => $users->[0]{key} } ] },
		{ client_id => $north, table => 'courses', delete => [ { key => $courses->[0]{key} } ] });
	$node->safe_psql('postgres', "DROP TABLE IF EXISTS before_users; CREATE TABLE before_users AS SELECT * FROM north.users");
	my $wm = $node->safe_psql('postgres', "SELECT watermark_raw FROM cd2sync.table_state WHERE table_name = 'users'");
	$emu->faults({ endpoint => 'download', kind => 'hang', seconds => 60, table => 'users', times => 1 });
	$node->safe_psql('postgres', "SELECT cd2_sync_start('north')");
	ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM cd2sync.progress WHERE table_name = 'users' AND phase ~ '^(downloading|loading)'"),
		'the worker is inside the users load');
	return $wm;
}

sub check_committed_state
{
	my ($label, $wm_users) = @_;
	is($node->safe_psql('postgres',
		"SELECT count(*) FROM ((SELECT * FROM north.users EXCEPT ALL SELECT * FROM before_users) "
		  . "UNION ALL (SELECT * FROM before_users EXCEPT ALL SELECT * FROM north.users)) d"),
		'0', "$label: users holds the state of its committed watermark");
	is($node->safe_psql('postgres', "SELECT watermark_raw FROM cd2sync.table_state WHERE table_name = 'users'"),
		$wm_users, "$label: users' watermark did not move");
	Cd2Test::table_is($node, $emu, $north, 'north', 'courses', "$label: courses, committed before, is complete");
	is($node->safe_psql('postgres', "SELECT watermark_raw = '" . Cd2Test::iso($emu->clock) . "' FROM cd2sync.table_state WHERE table_name = 'courses'"),
		't', "$label: courses' watermark is the new one");
	$emu->clear_faults;
	my $r = Cd2Test::sync($node, 'north');
	is($r->{users}{error} . $r->{courses}{error}, '', "$label: the next sync succeeds");
	Cd2Test::table_is($node, $emu, $north, 'north', 'users', "$label: and converges");
}

# 1. kill -9 of the sync worker mid-load
my $wm = start_hanging_sync();
my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
kill 'KILL', $pid;
ok($node->poll_query_until('postgres', "SELECT true"), 'the server recovered from the killed worker');
like(slurp_file($node->logfile), qr/terminated by signal 9/, 'the worker was killed');
check_committed_state('kill -9', $wm);

# 2. immediate restart of the whole server mid-load
$wm = start_hanging_sync();
$node->stop('immediate');
$node->start;
check_committed_state('immediate restart', $wm);

# 2b. the postmaster killed (kill -9) while the worker waits in a download:
# the worker notices and exits (it waits in libcurl's poll, not on a latch
# that would tell it), so the server starts again (a process left attached
# to the old shared memory keeps a new postmaster from starting)
$wm = start_hanging_sync();
$pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
my ($postmaster) = slurp_file($node->data_dir . '/postmaster.pid') =~ /^(\d+)/;
$node->kill9;
# (gone, or a zombie no one has reaped yet)
my $exited = sub {
	my ($p) = @_;
	for (1 .. 100)
	{
		return 1 if !-e "/proc/$p" || slurp_file("/proc/$p/status") =~ /^State:\s+Z/m;
		usleep(100_000);
	}
	return 0;
};
ok($exited->($pid), 'the worker exits when the postmaster dies');
# (once the dead postmaster is gone; a zombie nobody reaps would still
# answer to its pid, which its pid file names)
ok($exited->($postmaster), 'the postmaster is gone');
unlink($node->data_dir . '/postmaster.pid', $node->host . '/.s.PGSQL.' . $node->port . '.lock')
  if -e "/proc/$postmaster";
$node->start;
check_committed_state('postmaster killed', $wm);

# 3. while a sync hangs in a download: cd2_drop_instance fails at once,
# DROP DATABASE of another database and DROP EXTENSION finish promptly
$node->safe_psql('postgres', 'CREATE DATABASE other');
start_hanging_sync();
my $t0 = time;
my ($rc, $out, $err) = $node->psql('postgres', "SELECT cd2_drop_instance('north')");
like($err, qr/a sync of cd2sync instance "north" is running/, 'cd2_drop_instance refuses while a sync runs');
# (the download hangs for 60 s: the bounds leave a loaded machine its margin)
ok(time - $t0 < 15, 'cd2_drop_instance does not wait');
$t0 = time;
$node->safe_psql('postgres', 'DROP DATABASE other');
ok(time - $t0 < 15, 'DROP DATABASE of another database is not held up');
$t0 = time;
$node->safe_psql('postgres', 'DROP EXTENSION cd2sync CASCADE');
ok(time - $t0 < 20, 'DROP EXTENSION does not wait for the hanging sync');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_extension WHERE extname = 'cd2sync'"), '0', 'the extension is gone');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'"),
	'no sync worker is left');
unlike(slurp_file($node->logfile), qr/terminated by signal 11|PANIC/, 'nothing crashed');

$node->stop;
$emu->stop;
done_testing();
