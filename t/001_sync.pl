# End to end against the emulator: a snapshot, then incremental epochs
# (inserts, updates, deletes, NULLs, unicode, embedded newlines, oversized
# placeholders, multi-part, multi-member and empty files), in each of the
# three formats, with columns in any order and either bound inclusivity.
# Every synced table is compared row by row with the emulator's expected
# state, and every watermark with the emulator's clock.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;

my $emu = Cd2Test::start_emulator(generate => 'demo');
$emu->config(job_latency => 0.2);
my $node = Cd2Test::new_node('sync');
my $north = 'us-east-1#demo-north';
my @tables = qw(accounts courses enrollments pseudonyms submissions users);

# the same credentials as three instances, each synced in another format
my %format = (north_tsv => 'tsv', north_csv => 'csv', north_jsonl => 'jsonl');
# (the test's own statements are not logged: they hold the secret)
for my $inst (sort keys %format)
{
	$node->safe_psql('postgres', "SET log_statement = 'none';\n"
		  . "SELECT cd2_add_instance('$inst', '$north', 'north-secret', api_url => '$emu->{url}')");
}

sub sync_all
{
	my ($label, %expect) = @_;
	my $clock = Cd2Test::iso($emu->clock);
	for my $inst (sort keys %format)
	{
		my $r = Cd2Test::sync($node, $inst, pre => "SET cd2sync.format = '$format{$inst}';");
		is_deeply([ sort keys %$r ], \@tables, "$label $inst: one row per table");
		for my $t (@tables)
		{
			my $want_mode = $expect{modes}{$t} // $expect{mode};
			is($r->{$t}{error}, '', "$label $inst.$t: no error");
			is($r->{$t}{mode}, $want_mode, "$label $inst.$t: mode $want_mode");
			is($r->{$t}{watermark}, $clock, "$label $inst.$t: watermark is the emulator's clock");
			Cd2Test::table_is($node, $emu, $north, $inst, $t, "$label $inst.$t: rows equal the expected state");
		}
		for my $t (keys %{ $expect{counts} // {} })
		{
			is("$r->{$t}{upserted}/$r->{$t}{deleted}", $expect{counts}{$t},
				"$label $inst.$t: upserted/deleted counts");
		}
		is($node->safe_psql('postgres',
			"SELECT count(*) FROM cd2sync.watermarks WHERE instance = '$inst' "
			  . "AND (watermark <> '$clock' OR status <> 'ok' OR schema_version IS NULL)"),
			'0', "$label $inst: cd2sync.watermarks agrees");
	}
}

# 1. snapshot
sync_all('snapshot', mode => 'snapshot');
is($node->safe_psql('postgres', "SELECT cd2_watermark('north_tsv', 'users') = '2026-11-01T00:00:00Z'"),
	't', 'cd2_watermark gives the snapshot\'s at');
is($node->safe_psql('postgres',
	"SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
	  . "WHERE attrelid = 'north_tsv.courses'::regclass AND attname IN ('tags', 'is_public', 'storage_quota') ORDER BY attname"),
	"boolean\nbigint\ntext[]", 'column types follow the schema');
is($node->safe_psql('postgres',
	"SELECT count(*) FROM cd2sync.sync_log WHERE mode = 'snapshot' AND objects >= 2 AND bytes_downloaded > 0"),
	scalar(@tables) * 3, 'snapshots came in several objects, with their bytes logged');

# 2. an epoch of changes to users and courses
my $users = $emu->state($north, 'users')->{rows};
my $courses = $emu->state($north, 'courses')->{rows};
my @upd = map { my %v = %{ $_->{value} }; { key => $_->{key}, value => \%v } } @$users[ 0 .. 4 ];
$upd[0]{value}{name} = "Zoë \"quoted\", comma\ttab\nnewline \\ back \\N not null 😀";
$upd[1]{value}{name} = '';
$upd[2]{value}{short_name} = undef;
$upd[3]{value}{preferences} = { nested => { deep => [ 1, 2.5, JSON::PP::true, undef ] } };
$upd[4]{value}{workflow_state} = 'deleted';
$upd[4]{value}{deleted_at} = '2026-11-01T00:30:00Z';
my @new = map {
	my %v = %{ $users->[10]{value} };
	$v{name} = "New user $_ — ñ";
	{ key => { id => 10000000009000 + $_ }, value => \%v }
} 1 .. 3;
my @del = map { { key => $_->{key} } } @$users[ 20, 21 ];
$emu->epoch(
	{ client_id => $north, table => 'users', upsert => [ @upd, @new ], delete => \@del },
	{ client_id => $north, table => 'courses', oversized => [ { key => $courses->[0]{key}, column => 'syllabus_body' } ] });
sync_all('epoch 1', mode => 'unchanged',
	modes => { users => 'incremental', courses => 'incremental' },
	counts => { users => '8/2', courses => '1/0' });
# (the expected state keeps the good value of an oversized column: checked above)
is($node->safe_psql('postgres',
	"SELECT count(*) FROM north_tsv.courses WHERE id = $courses->[0]{key}{id} "
	  . "AND syllabus_body IS NOT DISTINCT FROM (SELECT syllabus_body FROM north_csv.courses WHERE id = $courses->[0]{key}{id}) "
	  . "AND syllabus_body IS DISTINCT FROM '__cd2_oversized_truncated__'"),
	'1', 'an oversized placeholder keeps the good value stored before');
is($node->safe_psql('postgres',
	"SELECT sum(oversized_kept) FROM cd2sync.sync_log WHERE table_name = 'courses' AND mode = 'incremental'"),
	'3', 'the sync log counts the kept values');

# 3. columns in any order, both bounds inclusive (records seen twice), deletes of unknown keys
$emu->config(shuffle => JSON::PP::true, since_inclusive => JSON::PP::true);
my $enr = $emu->state($north, 'enrollments')->{rows};
my @enr_upd = map { my %v = %{ $_->{value} }; $v{workflow_state} = 'completed'; { key => $_->{key}, value => \%v } } @$enr[ 0 .. 9 ];
$emu->epoch({ client_id => $north, table => 'enrollments', upsert => \@enr_upd,
	delete => [ { key => { id => 424242 } }, { key => $enr->[11]{key} } ] });
sync_all('epoch 2', mode => 'unchanged',
	modes => { enrollments => 'incremental', users => 'incremental', courses => 'incremental' });

# 4. nothing new upstream: every table unchanged, the watermark still advances
$emu->config(shuffle => JSON::PP::false, since_inclusive => JSON::PP::false);
$emu->epoch({ client_id => $north, table => 'accounts', upsert => [], delete => [] });
sync_all('epoch 3', mode => 'unchanged');

# 4b. a result with no objects at all (no empty files either)
$emu->config(empty_parts => 0);
$emu->delete('/_emu/requests');
$emu->epoch({ client_id => $north, table => 'accounts', upsert => [], delete => [] });
sync_all('epoch 3b (no objects)', mode => 'unchanged');
is(scalar(grep { $_->{endpoint} eq 'object_urls' } @{ $emu->get('/_emu/requests') }), 0,
	'no object URLs are asked for when a job has no objects');
$emu->config(empty_parts => 1);

# 5. full => true takes a fresh snapshot over a table that has data, without emptying it
my $r = Cd2Test::sync($node, 'north_tsv', tables => ['users'], full => 1);
is($r->{users}{mode}, 'snapshot', 'full => true takes a snapshot');
# the emulator, like CD2, answers the identical snapshot query with the first
# day-old job: the sync brings it forward instead of going back in time
is($r->{users}{watermark}, Cd2Test::iso($emu->clock), 'a deduplicated old snapshot is brought forward');
Cd2Test::table_is($node, $emu, $north, 'north_tsv', 'users', 'full snapshot over existing rows equals the state');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.sync_log l JOIN cd2sync.runs r USING (run_id) "
	  . "WHERE r.full_sync AND l.instance = 'north_tsv'"), '1', 'the run is logged as full, for the asked table only');

# 6. an API that refuses the format asked for (ValidationError): fall back to jsonl
$emu->config(formats => ['jsonl']);
$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => $users->[30]{key} } ] });
$r = Cd2Test::sync($node, 'north_csv', tables => ['users'], pre => "SET cd2sync.format = 'csv';");
is($r->{users}{mode}, 'incremental', 'csv refused, jsonl taken instead');
is($r->{users}{error}, '', 'the fallback is no error');
Cd2Test::table_is($node, $emu, $north, 'north_csv', 'users', 'jsonl after csv converges');
$emu->config(formats => [ 'jsonl', 'csv', 'tsv' ]);

# 7. a fresh snapshot carrying an oversized placeholder in a jsonb column:
# the direct COPY into the new table cannot take it, the staging path does
# (no deduplication here: the identical snapshot query would get the first day-old job)
$emu->config(dedupe_jobs => JSON::PP::false);
$emu->epoch({ client_id => $north, table => 'users', oversized => [ { key => $users->[40]{key}, column => 'preferences' } ] });
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north_late', '$north', 'north-secret', api_url => '$emu->{url}', tables => ARRAY['users', 'courses'])");
$r = Cd2Test::sync($node, 'north_late');
is($r->{users}{mode} . $r->{users}{error}, 'snapshot', 'late instance: snapshot');
Cd2Test::table_is($node, $emu, $north, 'north_late', 'users', 'a placeholder in jsonb on a fresh snapshot becomes NULL', fresh => 1);
Cd2Test::table_is($node, $emu, $north, 'north_late', 'courses', 'courses loaded straight into the new table', fresh => 1);
like(slurp_file($node->logfile), qr/north_late\.users: loading the new table again through staging/,
	'users fell back from COPY into the new table loaded apart to the staging table');
like(slurp_file($node->logfile), qr/north_late\.users: loading through the text staging table/, 'then to the text staging table (a jsonb column cannot hold the placeholder)');
unlike(slurp_file($node->logfile), qr/north_late\.courses: loading through/, 'courses did not');

# a table the API does not list, asked of an instance that syncs every table: an ERROR
my ($rc_nt, $out_nt, $err_nt) = $node->psql('postgres',
	"\\set VERBOSITY verbose\nSELECT * FROM cd2_sync_now('north_tsv', tables => ARRAY['users', 'no_such_table'])");
like($err_nt, qr/42P01: .*the CD2 API does not list table\(s\) no_such_table/, 'an unknown table is an ERROR 42P01');

# the secret never reached the server log
my $log = slurp_file($node->logfile);
unlike($log, qr/north-secret/, 'the client secret is not in the server log');

$node->stop;
$emu->stop;
done_testing();
