# A full resync never empties a table: while it loads (here held open by a
# slow download inside its transaction), another session reading the table in
# a loop always sees a complete table (the old one until the new one
# commits); indexes, grants and a dependent view of the user survive.
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
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('resync');
my $north = 'us-east-1#demo-north';
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', tables => ARRAY['users'])");
Cd2Test::sync($node, 'north');
$node->safe_psql('postgres', "CREATE INDEX users_name_idx ON north.users (name); "
	  . "CREATE ROLE analyst; GRANT USAGE ON SCHEMA north TO analyst; GRANT SELECT ON north.users TO analyst; "
	  . "CREATE VIEW public.active_users AS SELECT id, name FROM north.users WHERE workflow_state <> 'deleted'");
my $before = $node->safe_psql('postgres', "SELECT count(*) FROM north.users");

# upstream: 10 users deleted, 5 new; then a full resync whose download hangs 3 s
my $rows = $emu->state($north, 'users')->{rows};
my @new = map { my %v = %{ $rows->[0]{value} }; $v{name} = "new $_"; { key => { id => 10000000008000 + $_ }, value => \%v } } 1 .. 5;
$emu->epoch({ client_id => $north, table => 'users', delete => [ map { { key => $_->{key} } } @$rows[ 1 .. 10 ] ], upsert => \@new });
my $after = $before - 10 + 5;
$emu->faults({ endpoint => 'download', kind => 'hang', seconds => 3, times => 1 });
$node->safe_psql('postgres', "SELECT cd2_sync_start('north', \"full\" => true)");

# a reader counts the table in a loop while the resync runs
my %seen;
my $t0 = time;
while (time - $t0 < 8)
{
	my $n = $node->safe_psql('postgres', "SELECT count(*) FROM north.users");
	$seen{$n}++;
	last if $n == $after && $seen{$before};
	usleep(100_000);
}
is(join(',', sort { $a <=> $b } keys %seen), join(',', sort { $a <=> $b } ($before, $after)),
	"the reader saw only the complete old table ($before rows) and the complete new one ($after rows)");
ok($seen{$before} >= 5, 'it read the old table while the resync was loading');
ok($node->poll_query_until('postgres', "SELECT status = 'done' FROM cd2sync.runs ORDER BY run_id DESC LIMIT 1"), 'the resync finished');
is($node->safe_psql('postgres', "SELECT mode FROM cd2sync.sync_log ORDER BY run_id DESC LIMIT 1"), 'snapshot', 'it was a snapshot');
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'the table equals the new snapshot');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_indexes WHERE indexname = 'users_name_idx'"), '1', 'the user\'s index survived');
is($node->safe_psql('postgres', "SELECT has_table_privilege('analyst', 'north.users', 'SELECT')"), 't', 'the grant survived');
is($node->safe_psql('postgres', "SELECT count(*) > 0 FROM public.active_users"), 't', 'the dependent view works');

# periodic full resyncs (full_resync_every): a table whose last snapshot is
# older than that takes a snapshot at its next sync, then incrementals again
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', full_resync_every => interval '7 days')");
is($node->safe_psql('postgres', "SELECT full_resync_every || ' ' || (next_full_resync_at > now() + interval '6 days') FROM cd2sync.schedules"),
	'7 days true', 'cd2sync.schedules shows the next periodic resync, a week after the last snapshot');
my $r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'unchanged', 'a recent snapshot: an incremental');
$node->safe_psql('postgres', "UPDATE cd2sync.table_state SET snapshot_at = now() - interval '8 days'");
ok($node->safe_psql('postgres', "SELECT next_full_resync_at <= now() FROM cd2sync.schedules") eq 't', 'a resync is due');
# a configured table with no snapshot recorded is due too (the worker takes one)
$node->safe_psql('postgres', "INSERT INTO cd2sync.table_state (instance, table_name) VALUES ('north', 'courses')");
$node->safe_psql('postgres', "UPDATE cd2sync.table_state SET snapshot_at = now() WHERE table_name = 'users'");
is($node->safe_psql('postgres', "SELECT next_full_resync_at <= now() FROM cd2sync.schedules"), 'f',
	'a table the instance does not sync does not count');
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', tables => ARRAY['users', 'courses'])");
is($node->safe_psql('postgres', "SELECT next_full_resync_at <= now() FROM cd2sync.schedules"), 't',
	'a configured table with no snapshot yet is due now');
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', tables => ARRAY['users']); "
	  . "DELETE FROM cd2sync.table_state WHERE table_name = 'courses'; "
	  . "UPDATE cd2sync.table_state SET snapshot_at = now() - interval '8 days'");
$emu->epoch({ client_id => $north, table => 'users', delete => [ { key => $rows->[11]{key} } ] });
$r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'snapshot', 'a snapshot older than full_resync_every: the next sync takes a snapshot');
is($r->{users}{deleted}, '1', 'the row deleted upstream is gone');
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'the table equals the snapshot');
ok($node->safe_psql('postgres', "SELECT snapshot_at > now() - interval '1 minute' FROM cd2sync.table_state") eq 't',
	'the snapshot time is recorded');
$r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'unchanged', 'and then incrementals again');
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', full_resync_every => NULL)");
$node->safe_psql('postgres', "UPDATE cd2sync.table_state SET snapshot_at = now() - interval '80 days'");
$r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'unchanged', 'without full_resync_every, no periodic snapshot');

$node->stop;
$emu->stop;
done_testing();
