# The fault matrix: each fault the emulator can inject, with the outcome it
# must have. A transient fault recovers within the run; a permanent one fails
# only its table, which keeps its previous rows and watermark, and the next
# run converges. Prints the matrix at the end.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $emu = Cd2Test::start_emulator(generate => 'demo');
# Identical queries are not deduplicated here: a poll that brings nothing
# would otherwise get the same empty job back on the next poll (CD2 keeps
# jobs a day), and "the next run converges" could not be checked at once.
# 001_sync.pl runs with deduplication.
$emu->config(job_latency => 0.1, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('faults');
my $north = 'us-east-1#demo-north';
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', "
	  . "tables => ARRAY['users', 'courses'])");
my $pre = "SET cd2sync.http_timeout = 2; SET cd2sync.http_retries = 4;";

my $r = Cd2Test::sync($node, 'north', pre => $pre);
is($r->{users}{mode}, 'snapshot', 'first sync: snapshot');

# A change to users and courses, so that each sync has something to apply
my $n = 0;
sub change_upstream
{
	$n++;
	my @changes;
	for my $t (qw(users courses))
	{
		my $rows = $emu->state($north, $t)->{rows};
		my @upd = map { my %v = %{ $_->{value} }; $v{name} = "$t change $n/$_->{key}{id} ✓"; { key => $_->{key}, value => \%v } } @$rows[ 0 .. 2 ];
		# users lose a row each time; courses (25 rows) only change
		my @del = $t eq 'users' ? ({ key => $rows->[-1]{key} }) : ();
		push @changes, { client_id => $north, table => $t, upsert => \@upd, delete => \@del };
	}
	$emu->epoch(@changes);
}

my @matrix;
my @cases = (
	# name, fault rules, outcome, error pattern (for failures), expected mode
	[ 'login 503 twice', [ { endpoint => 'login', kind => 'status', status => 503, times => 2 } ], 'recovers' ],
	[ 'create job 500', [ { endpoint => 'create_job', kind => 'status', status => 500, table => 'users' } ], 'recovers' ],
	[ 'poll job 502', [ { endpoint => 'get_job', kind => 'status', status => 502 } ], 'recovers' ],
	[ 'object URLs 503', [ { endpoint => 'object_urls', kind => 'status', status => 503 } ], 'recovers' ],
	[ 'object URLs 504', [ { endpoint => 'object_urls', kind => 'status', status => 504 } ], 'recovers' ],
	[ '429 with Retry-After: 1', [ { endpoint => 'create_job', kind => 'status', status => 429, retry_after => '1', table => 'users' } ], 'recovers' ],
	[ '429 without Retry-After', [ { endpoint => 'create_job', kind => 'status', status => 429, table => 'users' } ], 'recovers' ],
	[ 'connection reset (API)', [ { endpoint => 'get_job', kind => 'reset', times => 2 } ], 'recovers' ],
	[ 'connection reset (download)', [ { endpoint => 'download', kind => 'reset', table => 'users' } ], 'recovers' ],
	[ 'body cut short mid-download', [ { endpoint => 'download', kind => 'reset_mid_body', table => 'users', times => 2 } ], 'recovers' ],
	[ 'download 500', [ { endpoint => 'download', kind => 'status', status => 500, table => 'users' } ], 'recovers' ],
	[ 'presigned URL expired (403)', [ { endpoint => 'download', kind => 'expire_url', table => 'users' } ], 'recovers' ],
	[ 'job expired (404 on object URLs)', [ { endpoint => 'object_urls', kind => 'expire_job' } ], 'recovers' ],
	[ 'token revoked mid-run (401)', [ { endpoint => 'get_job', kind => 'revoke_tokens' } ], 'recovers' ],
	[ 'server stops answering (timeout)', [ { endpoint => 'get_job', kind => 'hang', seconds => 4 } ], 'recovers' ],
	[ 'SnapshotRequired', [ { endpoint => 'create_job', kind => 'snapshot_required', table => 'users' } ], 'recovers', undef, 'snapshot' ],
	[ 'OutOfRange', [ { endpoint => 'create_job', kind => 'out_of_range', table => 'users' } ], 'recovers', undef, 'snapshot' ],
	[ 'corrupt gzip', [ { endpoint => 'download', kind => 'corrupt_gzip', table => 'users', times => -1 } ], 'fails', qr/gzip stream .* is corrupt/ ],
	[ 'truncated gzip', [ { endpoint => 'download', kind => 'truncated_gzip', table => 'users', times => -1 } ], 'fails', qr/gzip stream .* is truncated/ ],
	# the same two, inflated on the sync's own thread (cd2sync.gunzip_thread = off)
	[ 'corrupt gzip, gunzip_thread off', [ { endpoint => 'download', kind => 'corrupt_gzip', table => 'users', times => -1 } ], 'fails', qr/gzip stream .* is corrupt/, undef, 'SET cd2sync.gunzip_thread = off;' ],
	[ 'truncated gzip, gunzip_thread off', [ { endpoint => 'download', kind => 'truncated_gzip', table => 'users', times => -1 } ], 'fails', qr/gzip stream .* is truncated/, undef, 'SET cd2sync.gunzip_thread = off;' ],
	[ 'body cut short, gunzip_thread off', [ { endpoint => 'download', kind => 'reset_mid_body', table => 'users', times => 2 } ], 'recovers', undef, undef, 'SET cd2sync.gunzip_thread = off;' ],
	[ 'malformed record', [ { endpoint => 'create_job', kind => 'malformed_record', table => 'users' } ], 'fails', qr/missing data for column "updated_at"/ ],
	[ 'record with a field too many', [ { endpoint => 'create_job', kind => 'malformed_record', shape => 'extra_field', table => 'users' } ], 'fails', qr/extra data after last expected column/ ],
	[ 'a line of COPY\'s end marker', [ { endpoint => 'create_job', kind => 'malformed_record', shape => 'end_marker', table => 'users' } ], 'fails', qr/an object was cut short: COPY took 0 of its \d+ records/ ],
	[ 'value that does not fit its column', [ { endpoint => 'create_job', kind => 'bad_value', table => 'users', column => 'merged_into_user_id' } ], 'fails', qr/invalid input syntax for type bigint/ ],
	[ 'job ends failed', [ { endpoint => 'create_job', kind => 'job_failed', table => 'users', message => 'upstream exploded' } ], 'fails', qr/upstream exploded/ ],
	[ '400 ValidationError', [ { endpoint => 'create_job', kind => 'status', status => 400, error_type => 'ValidationError', message => 'bad query here', table => 'users', times => 2 } ], 'fails', qr/bad query here/ ],
	[ '403 AccountDisabled', [ { endpoint => 'create_job', kind => 'status', status => 403, error_type => 'AccountDisabled', message => 'account is disabled', table => 'users' } ], 'fails', qr/AccountDisabled: account is disabled/ ],
	[ '503 forever (retries run out)', [ { endpoint => 'create_job', kind => 'status', status => 503, table => 'users', times => -1 } ], 'fails', qr/HTTP 503.*after 5 attempts/ ],
);

# the SQLSTATE a failure is recorded with (dap_raise maps the API's answers)
my %sqlstate = (
	'403 AccountDisabled' => '28000',             # a credential refused
	'503 forever (retries run out)' => '08006',   # retries did not overcome it
	'400 ValidationError' => '38000',             # anything else the API refused
	'job ends failed' => '38000',
	'malformed record' => '22P04',                # COPY's own
	'a line of COPY\'s end marker' => '22P04',
);

# what a monitoring system sees of north.users
my $monitoring = "SELECT status, consecutive_failures, last_error IS NOT NULL FROM cd2sync.monitoring "
  . "WHERE instance = 'north' AND name = 'users'";
for my $case (@cases)
{
	my ($name, $faults, $outcome, $pattern, $mode, $settings) = @$case;
	my $pre = $pre . ($settings // "");
	change_upstream();
	my $wm_before = $node->safe_psql('postgres', "SELECT watermark_raw FROM cd2sync.table_state WHERE instance = 'north' AND table_name = 'users'");
	$node->safe_psql('postgres', "DROP TABLE IF EXISTS before_users; CREATE TABLE before_users AS SELECT * FROM north.users");
	$emu->delete('/_emu/requests');
	my $fired_before = $emu->get('/_emu/faults')->{fired};
	$emu->faults(@$faults);
	my $t0 = time;
	my $r = Cd2Test::sync($node, 'north', pre => $pre);
	my $took = time - $t0;
	my $fired = $emu->get('/_emu/faults')->{fired} - $fired_before;
	$emu->clear_faults;
	my @downloads = grep { $_->{endpoint} eq 'download' && ($_->{table} // '') eq 'users' } @{ $emu->get('/_emu/requests') };
	my %objects = map { ($_->{path} =~ s/\?.*//r) => 1 } @downloads;
	my $clock = Cd2Test::iso($emu->clock);

	# courses never fails for a fault aimed at users
	is($r->{courses}{error}, '', "$name: courses unaffected");
	Cd2Test::table_is($node, $emu, $north, 'north', 'courses', "$name: courses converged");

	if ($outcome eq 'recovers')
	{
		is($r->{users}{error}, '', "$name: recovered within the run");
		is($r->{users}{mode}, $mode // 'incremental', "$name: mode");
		is($r->{users}{watermark}, $clock, "$name: watermark advanced");
		Cd2Test::table_is($node, $emu, $north, 'north', 'users', "$name: users converged");
		push @matrix, sprintf("%-36s %-9s %s", $name, 'recovered', $r->{users}{error} || "in the run, $r->{users}{mode}, " . sprintf('%.1f s', $took));
	}
	else
	{
		is($r->{users}{mode}, 'failed', "$name: users failed");
		like($r->{users}{error}, $pattern, "$name: the error says why");
		is($node->safe_psql('postgres', "SELECT error_code FROM cd2sync.sync_log WHERE instance = 'north' "
			  . "AND table_name = 'users' ORDER BY run_id DESC LIMIT 1"), $sqlstate{$name}, "$name: SQLSTATE")
		  if $sqlstate{$name};
		is($node->safe_psql('postgres', "SELECT watermark_raw FROM cd2sync.table_state WHERE instance = 'north' AND table_name = 'users'"),
			$wm_before, "$name: watermark unchanged");
		is($node->safe_psql('postgres',
			"SELECT count(*) FROM ((SELECT * FROM north.users EXCEPT ALL SELECT * FROM before_users) "
			  . "UNION ALL (SELECT * FROM before_users EXCEPT ALL SELECT * FROM north.users)) d"),
			'0', "$name: users rows unchanged");
		is($node->safe_psql('postgres', "SELECT status || ': ' || (last_error IS NOT NULL) FROM cd2sync.watermarks WHERE instance = 'north' AND table_name = 'users'"),
			'failed: true', "$name: cd2sync.watermarks shows the failure");
		is($node->safe_psql('postgres', $monitoring), 'failing|1|t', "$name: cd2sync.monitoring shows the failure");
		my $again = Cd2Test::sync($node, 'north', pre => $pre);
		is($node->safe_psql('postgres', $monitoring), 'ok|0|f', "$name: and then the success");
		is($again->{users}{error}, '', "$name: the next run succeeds");
		is($again->{users}{watermark}, $clock, "$name: the next run advances the watermark");
		Cd2Test::table_is($node, $emu, $north, 'north', 'users', "$name: the next run converges");
		(my $err = $r->{users}{error}) =~ s/\s+/ /g;
		push @matrix, sprintf("%-36s %-9s %s", $name, 'failed', substr($err, 0, 110) . '; next run converged');
	}
	ok($fired > 0, "$name: the fault was injected");

	# a record with a field too many suits no staging table: it fails at the
	# first download of its object. A value that does not parse as its
	# column's type (the malformed record's first field is "malformed") is
	# loaded again as text, where the real fault shows.
	if ($name eq 'record with a field too many')
	{
		is(scalar @downloads, scalar keys %objects, "$name: no object downloaded twice");
	}
	elsif ($name eq 'malformed record' || $name eq 'value that does not fit its column')
	{
		ok(@downloads > keys %objects, "$name: loaded again through the text staging table");
	}

	if ($name =~ /Retry-After: 1/)
	{
		my @creates = grep { $_->{endpoint} eq 'create_job' && ($_->{table} // '') eq 'users' } @{ $emu->get('/_emu/requests') };
		ok(@creates >= 2 && $creates[1]{t} - $creates[0]{t} >= 0.95, 'Retry-After is honoured');
	}
}

# connection refused: an API that is not there fails the run, keeps everything
change_upstream();
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', api_url => 'http://127.0.0.1:1', client_secret => 'north-secret')");
$r = Cd2Test::sync($node, 'north', pre => $pre);
like($r->{users}{error}, qr/Couldn't connect|Failed to connect/, 'connection refused: the reason is given');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.sync_log l WHERE l.run_id = (SELECT max(run_id) FROM cd2sync.runs) AND l.status = 'failed'"),
	'2', 'connection refused: both tables failed');
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', api_url => '$emu->{url}', client_secret => 'north-secret')");
$r = Cd2Test::sync($node, 'north', pre => $pre);
is($r->{users}{error} . $r->{courses}{error}, '', 'connection refused: the next run succeeds');
push @matrix, sprintf("%-36s %-9s %s", 'connection refused', 'failed', 'tables failed with the curl error; next run converged');

# a record longer than cd2sync.max_line_length fails its table, not the server
my $rows = $emu->state($north, 'users')->{rows};
my %long = %{ $rows->[0]{value} };
$long{name} = 'x' x 5000;
$emu->epoch({ client_id => $north, table => 'users', upsert => [ { key => $rows->[0]{key}, value => \%long } ] });
$r = Cd2Test::sync($node, 'north', pre => "$pre SET cd2sync.max_line_length = '2kB';");
like($r->{users}{error}, qr/a record is longer than cd2sync.max_line_length \(2048 bytes\)/, 'a huge record fails its table');
is($r->{courses}{error}, '', 'the other table syncs');
$r = Cd2Test::sync($node, 'north', pre => $pre);
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'with the default limit the next run converges');
push @matrix, sprintf("%-36s %-9s %s", 'record over max_line_length', 'failed', 'table failed cleanly; next run converged');

diag("fault matrix:\n" . join("\n", @matrix));

# The exporter's queries (docs/monitoring/postgres_exporter.yml) run as a
# role in pg_monitor, and give the columns the file names as metrics
$node->safe_psql('postgres', "CREATE ROLE exporter LOGIN IN ROLE pg_monitor;\n"
	  . "SELECT cd2_create_feed('monitored', tables => ARRAY['courses'])");
my $yml = slurp_file("$FindBin::RealBin/../docs/monitoring/postgres_exporter.yml");
my %queries;
while ($yml =~ /^(\w+):\n  query: \|\n((?:    .*\n)+)  metrics:\n((?:    .*\n)+)/mg)
{
	$queries{$1} = [ $2, $3 ];
}
is(join(',', sort keys %queries), 'cd2sync_feed,cd2sync_table', 'the exporter file: two queries');
my %rows = (cd2sync_table => "canvas_instance = 'north' AND cd2_table = 'users'", cd2sync_feed => "feed = 'monitored'");
my %want = (cd2sync_table => qr/^north\|users\|-?\d+(\.\d+)?\|0\|0\|0\|\d+(\.\d+)?\|\d+\|\d+$/,
	cd2sync_feed => qr/^monitored\|0\|0\|\|0$/);
for my $q (sort keys %queries)
{
	my ($sql, $metrics) = @{ $queries{$q} };
	my @names = $metrics =~ /^    - (\w+):/mg;
	is($node->safe_psql('postgres', "SELECT string_agg(k, ',') FROM (SELECT * FROM ($sql) q LIMIT 1) q, "
		  . "json_object_keys(row_to_json(q)) k", extra_params => [ '-U', 'exporter' ]),
		join(',', @names), "$q: the query's columns are the metrics the file names");
	like($node->safe_psql('postgres', "SELECT * FROM ($sql) q WHERE $rows{$q}", extra_params => [ '-U', 'exporter' ]),
		$want{$q}, "$q: what the exporter reads");
}

$node->stop;
$emu->stop;
done_testing();
