# The sync worker as a process: cancelling the caller stops it promptly
# (statement_timeout, pg_cancel_backend); two syncs of one instance never
# interleave; cd2_sync_start returns at once; pg_stat_activity shows what the
# worker does and never a secret; roles without grants can neither read a
# secret nor start a sync; the worker maps the buffer pool before its apply,
# and holds one object's buffers at a time, however many a job has.
use strict;
use warnings;
use utf8;

use FindBin;
use MIME::Base64;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $emu = Cd2Test::start_emulator(generate => 'demo');
# no deduplication: jobs left behind by cancelled syncs must not be reused
$emu->config(job_latency => 0.1, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('worker');
my $north = 'us-east-1#demo-north';
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', "
	  . "tables => ARRAY['users', 'courses'])");

sub worker_count
{
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
}

sub wait_no_worker
{
	my $t0 = time;
	while (time - $t0 < 30)
	{
		return time - $t0 if worker_count() eq '0';
		usleep(50_000);
	}
	return undef;
}

# jobs that take long upstream: the worker sits polling
$emu->config(job_latency => 60);

# 1. statement_timeout cancels the caller, which stops the worker
my ($rc, $out, $err) = $node->psql('postgres',
	"SET statement_timeout = '1s'; SELECT * FROM cd2_sync_now('north')");
like($err, qr/canceling statement due to statement timeout/, 'statement_timeout cancels cd2_sync_now');
my $gone = wait_no_worker();
# (promptly: the job it polls takes 60 s; the margin is for a loaded machine)
ok(defined $gone && $gone < 15, 'the worker stops promptly after statement_timeout');

# 2. pg_cancel_backend on the caller, while the worker is polling the job
my $bg = $node->background_psql('postgres', on_error_stop => 0);
$bg->query_until(qr/started/, "\\echo started\nSELECT * FROM cd2_sync_now('north');\n");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker' "
	  . "AND query LIKE 'cd2sync north: waiting for 2 query jobs (courses, users)%'"),
	'pg_stat_activity shows the worker waiting for its job');
my $activity = $node->safe_psql('postgres',
	"SELECT application_name || ' ' || query FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
like($activity, qr/^cd2sync north cd2sync north: waiting for 2 query jobs \(courses, users\), 0 tables to start/,
	'activity names instance, tables and phase: both jobs run upstream at once');
unlike($activity, qr/north-secret|Bearer/, 'activity holds no secret');
is($node->safe_psql('postgres', "SELECT instance, coalesce(table_name, '-'), phase, started_at IS NOT NULL FROM cd2sync.progress"),
	'north|-|waiting for 2 query jobs (courses, users), 0 tables to start|t', 'cd2sync.progress shows the running sync');
is($node->safe_psql('postgres', "SET ROLE cd2sync_reader; SELECT count(*) FROM cd2sync.progress"), '1',
	'cd2sync_reader reads it too');
$node->safe_psql('postgres',
	"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT * FROM cd2_sync_now%' AND pid <> pg_backend_pid()");
$gone = wait_no_worker();
ok(defined $gone && $gone < 15, 'the worker stops promptly after pg_cancel_backend');
$bg->quit;

# nothing half-applied: the tables were never created, no watermark
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.table_state WHERE watermark IS NOT NULL"),
	'0', 'cancelled syncs left no watermark');

# 3. two syncs of one instance never interleave: the second waits for the first
$emu->config(job_latency => 3);
my $run1 = $node->safe_psql('postgres', "SELECT cd2_sync_start('north')");
my $run2 = $node->safe_psql('postgres', "SELECT cd2_sync_start('north')");
# (at once: before the first run, whose jobs take 3 s upstream, is over; the
# worker may not have recorded it yet)
is($node->safe_psql('postgres', "SELECT coalesce((SELECT status FROM cd2sync.runs WHERE run_id = $run1), 'running')"),
	'running', 'cd2_sync_start returns at once');
$emu->config(job_latency => 1);
ok($run2 > $run1, 'runs get increasing ids');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker' "
	  . "AND query LIKE 'cd2sync north: waiting for the running sync%'"),
	'the second run waits for the first');
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM cd2sync.runs WHERE status = 'done'"), 'both runs finish');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM cd2sync.sync_log a JOIN cd2sync.sync_log b "
	  . "ON a.run_id = $run1 AND b.run_id = $run2 AND b.started_at < a.finished_at"),
	'0', 'no table of the second run started before the first run finished');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.runs WHERE run_id < $run1 AND status = 'failed' "
	  . "AND error = 'the sync worker stopped before the run was done'"),
	'2', 'the next run marks the cancelled runs as failed');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.sync_log WHERE status = 'running'"),
	'0', 'no table sync is left marked running');
is($node->safe_psql('postgres', "SELECT string_agg(mode, ',' ORDER BY run_id, table_name) FROM cd2sync.sync_log WHERE run_id IN ($run1, $run2)"),
	'snapshot,snapshot,unchanged,unchanged', 'first run snapshots, second finds nothing new');
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'users synced');

# 3b. runs waiting for the instance's lock: the one that gets it leaves the
# other, alive and waiting, running (it marked it failed, to be overwritten
# at its end)
my $hold = $node->background_psql('postgres');
$hold->query_safe("SELECT pg_advisory_lock(52517, hashtext('north'))");
my $ra = $node->safe_psql('postgres', "SELECT cd2_sync_start('north')");
my $rb = $node->safe_psql('postgres', "SELECT cd2_sync_start('north')");
ok($node->poll_query_until('postgres', "SELECT count(*) = 2 FROM pg_stat_activity "
	  . "WHERE backend_type = 'cd2sync sync worker' AND wait_event = 'advisory'"),
	'two runs wait for the instance\'s lock');
$emu->config(job_latency => 2);
$hold->query_safe("SELECT pg_advisory_unlock(52517, hashtext('north'))");
ok($node->poll_query_until('postgres', "SELECT count(*) > 0 FROM cd2sync.sync_log WHERE run_id IN ($ra, $rb)"),
	'one takes it and syncs');
is($node->safe_psql('postgres', "SELECT string_agg(status, ',') FROM cd2sync.runs WHERE run_id IN ($ra, $rb)"),
	'running,running', 'the other, waiting, is not marked failed');
$emu->config(job_latency => 1);
ok($node->poll_query_until('postgres', "SELECT count(*) = 2 FROM cd2sync.runs WHERE run_id IN ($ra, $rb) AND status = 'done'"),
	'both finish');
$hold->quit;

# 4. a token that expires within a run is renewed before its JWT exp, without a 401
# (jobs of 3 s: the run outlasts a 2 s token whatever the machine's speed)
$emu->config(job_latency => 3, token_lifetime => 2);
$emu->delete('/_emu/requests');
$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => { id => 10000000001010 } } ] });
my $r = Cd2Test::sync($node, 'north');
is($r->{users}{error} . $r->{courses}{error}, '', 'a run longer than the token lifetime succeeds');
my @reqs = @{ $emu->get('/_emu/requests') };
ok((grep { $_->{endpoint} eq 'login' } @reqs) >= 2, 'the run logged in again as the token neared its exp');
is(scalar(grep { $_->{status} == 401 } @reqs), 0, 'no request met an expired token');
# (Basic auth sends the secret in base64: look for both forms)
my $basic = MIME::Base64::encode_base64("$north:north-secret", '');
my @api = grep { $_->{endpoint} !~ /^(login|download)$/ } @reqs;
ok(@api > 0 && !(grep { ($_->{headers}{Authorization} // '') !~ /^Bearer \S+$/ } @api),
	'API calls carry a bearer token');
ok(!(grep { ($_->{headers}{Authorization} // '') =~ /north-secret|\Q$basic\E/ } @api),
	'API calls carry the token, not the secret');
ok((grep { $_->{endpoint} eq 'login' && ($_->{headers}{Authorization} // '') eq "Basic $basic" } @reqs),
	'(the login request does carry the secret, in base64: the check above can fail)');
# objects come from the storage host the presigned URLs name, which gets no
# credential of any kind
my @downloads = grep { $_->{endpoint} eq 'download' } @reqs;
ok(@downloads > 0 && !(grep { $_->{server} ne 'objects' } @downloads), 'objects are downloaded from their own host');
is(scalar(grep { exists $_->{headers}{Authorization} || exists $_->{headers}{'x-instauth'} } @downloads), 0,
	'no token and no secret reaches the objects host');
$emu->config(job_latency => 0.1, token_lifetime => 3600);

# NOTIFY cd2sync: one JSON payload per table sync, when it commits
$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => { id => 10000000001011 } } ] });
my ($rcn, $notes) = $node->psql('postgres', "LISTEN cd2sync; SELECT count(*) FROM cd2_sync_now('north'); SELECT 1;");
my @payloads = $notes =~ /Asynchronous notification "cd2sync" with payload "(.*?)" received/g;
is(scalar(@payloads), 2, 'one notification per table sync');
like(join("\n", sort @payloads), qr/"instance" : "north", "table" : "users", "status" : "ok", "mode" : "incremental"/,
	'the payload says instance, table, status and mode');

# 5. privileges: an ordinary role can neither read secrets nor synced data nor sync nor configure
$node->safe_psql('postgres', "CREATE ROLE mallory LOGIN; CREATE ROLE ruth LOGIN IN ROLE cd2sync_reader; "
	  . "CREATE ROLE adam LOGIN IN ROLE cd2sync_admin");
my @secret_sql = ("SELECT * FROM cd2sync.instance_secrets",
	"SELECT cd2sync._remote_tables('$emu->{url}', '$north', 'a guess')");
my @config_sql = ("SELECT * FROM cd2_sync_now('north')", "SELECT cd2_sync_start('north')",
	"SELECT cd2_alter_instance('north', schedule => interval '1 minute')",
	"SELECT cd2_drop_instance('north')", "SELECT cd2_add_instance('evil', 'x', 'y')",
	"SELECT * FROM cd2sync.instances");
my @read_sql = ("SELECT count(*) FROM cd2sync.watermarks", "SELECT count(*) FROM cd2sync.sync_log",
	"SELECT count(*) FROM north.users", "SELECT count(*) FROM cd2.users",
	"SELECT count(*) FROM cd2.user_merges", "SELECT cd2_watermark('north', 'users') IS NOT NULL",
	"SELECT cd2_resolve_user(1)");
# 'ok' when the statement succeeds, 'denied' when it fails with 42501, and
# the error otherwise (which fails either check)
sub outcome
{
	my ($role, $sql) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql", extra_params => [ '-U', $role ]);
	return 'ok' if $rc == 0;
	return 'denied' if $err =~ /ERROR:  42501: permission denied/;
	return $err;
}
for my $sql (@secret_sql, @config_sql, @read_sql)
{
	is(outcome('mallory', $sql), 'denied', "mallory: $sql is denied");
}
for my $sql (@secret_sql, @config_sql)
{
	is(outcome('ruth', $sql), 'denied', "cd2sync_reader: $sql is denied");
}
for my $sql (@read_sql)
{
	is(outcome('ruth', $sql), 'ok', "cd2sync_reader: $sql is allowed");
}
is(outcome('adam', $_), 'denied', "cd2sync_admin: $_ is denied") for @secret_sql;
like($node->safe_psql('postgres', "SELECT cd2_sync_start('north')", extra_params => [ '-U', 'adam' ]),
	qr/^\d+$/, 'cd2sync_admin can start a sync');
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', schedule => interval '1 day')", extra_params => [ '-U', 'adam' ]);
is($node->safe_psql('postgres', "SELECT schedule FROM cd2sync.instances WHERE name = 'north'"), '1 day',
	'cd2sync_admin can configure');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cd2sync.runs WHERE status = 'running'"), 'the admin\'s run ends');

# the secret is in no log line the worker or the functions wrote (the
# registration above was not logged: t/013_security.pl checks giving secrets
# with every statement logged and failing calls), and no view an ordinary
# role can read
unlike(slurp_file($node->logfile), qr/north-secret|\Q$basic\E/, 'the secret is not in the server log');
my ($rc3, $logrows) = $node->psql('postgres',
	"SELECT count(*) FROM cd2sync.sync_log l, cd2sync.runs r WHERE (l::text || r::text) LIKE '%north' || '-secret%'",
	extra_params => [ '-U', 'ruth' ]);
is($logrows, '0', 'the secret is in no row of the sync log or runs');

# 6. before its apply, the worker maps the whole buffer pool at once
# (cd2sync.prefault_buffers: MADV_POPULATE_WRITE, Linux 5.14 or later); with
# the setting off, only the pages it touches. Caught in its apply by a lock
# on the table; RssShmem: the shared memory it has mapped.
SKIP:
{
	my ($kmaj, $kmin) = (`uname -r` =~ /^(\d+)\.(\d+)/);
	skip 'MADV_POPULATE_WRITE needs Linux 5.14 or later', 8
	  unless $^O eq 'linux' && defined $kmin && ($kmaj > 5 || ($kmaj == 5 && $kmin >= 14));
	my $pool_kb = $node->safe_psql('postgres', "SELECT pg_size_bytes(current_setting('shared_buffers')) / 1024");
	my $deleted = 10000000001012;
	for my $setting ('on', 'off')
	{
		$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => { id => $deleted } } ] });
		my $locker = $node->background_psql('postgres');
		$locker->query_safe("BEGIN; LOCK TABLE north.users IN SHARE MODE");
		my $run = $node->safe_psql('postgres',
			"SET cd2sync.prefault_buffers = $setting; SELECT cd2_sync_start('north', tables => ARRAY['users'])");
		ok($node->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker' "
			  . "AND wait_event_type = 'Lock' AND query LIKE '%applying%'"),
			"prefault_buffers $setting: the worker waits in its apply");
		my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
		my $kb = (slurp_file("/proc/$pid/status") =~ /^RssShmem:\s+(\d+) kB/m) ? $1 : -1;
		if ($setting eq 'on')
		{
			cmp_ok($kb, '>=', 0.9 * $pool_kb, "it has mapped the whole buffer pool ($pool_kb kB)");
		}
		else
		{
			ok($kb >= 0 && $kb < 0.5 * $pool_kb, "with the setting off, only what it touched ($kb kB of $pool_kb)");
		}
		$locker->query_safe("COMMIT");
		$locker->quit;
		ok($node->poll_query_until('postgres', "SELECT status = 'done' FROM cd2sync.runs WHERE run_id = $run"),
			'the run ends');
		is($node->safe_psql('postgres', "SELECT mode || ' ' || status || ' ' || rows_deleted || ' ' "
			  . "|| (SELECT count(*) FROM north.users WHERE id = $deleted) FROM cd2sync.sync_log WHERE run_id = $run"),
			'incremental ok 1 0', 'its incremental applied');
		$deleted++;
	}
}

# 7. a table's objects are downloaded and decoded one at a time: what the
# worker holds does not grow with their number (each object's buffers and
# header stayed until the table was done: about 90 kB an object). Measured
# as the worker waits in its apply (a lock on the table), by
# pg_log_backend_memory_contexts.
my $held = sub {
	my ($extra, $deleted) = @_;
	$emu->config(empty_parts => $extra);
	$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => { id => $deleted } } ] });
	my $locker = $node->background_psql('postgres');
	$locker->query_safe("BEGIN; LOCK TABLE north.users IN SHARE MODE");
	my $run = $node->safe_psql('postgres', "SELECT cd2_sync_start('north', tables => ARRAY['users'])");
	ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker' "
		  . "AND wait_event_type = 'Lock' AND query LIKE '%applying%'"),
		"$extra empty objects more: the worker waits in its apply");
	my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
	my $pos = -s $node->logfile;
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	$node->wait_for_log(qr/Grand total: \d+ bytes/, $pos);
	my ($total) = substr(slurp_file($node->logfile), $pos) =~ /Grand total: (\d+) bytes/;
	$locker->query_safe("COMMIT");
	$locker->quit;
	ok($node->poll_query_until('postgres', "SELECT status = 'done' FROM cd2sync.runs WHERE run_id = $run"),
		'the run ends');
	is($node->safe_psql('postgres', "SELECT objects || ' ' || rows_deleted FROM cd2sync.sync_log WHERE run_id = $run"),
		(1 + $extra) . ' 1', 'having taken every object');
	return $total;
};
my $few = $held->(1, 10000000001014);
my $many = $held->(300, 10000000001015);
$emu->config(empty_parts => 1);
cmp_ok($many - $few, '<', 5_000_000, "300 objects more, no more memory held ($few and $many bytes)");

$node->stop;
$emu->stop;

done_testing();
