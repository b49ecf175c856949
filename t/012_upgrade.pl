# Upgrades. ALTER EXTENSION cd2sync UPDATE from 1.0, 1.1, 1.2 or 1.3 gives the same objects
# as a fresh install of this version (pg_dump --binary-upgrade lists every
# object of the extension).
# Then a cluster of the released 1.0 (built by scripts/test.sh from git, in
# a private PostgreSQL root) syncs two instances, and this build takes over
# its data directory (the release calls itself 0.1: the update goes through
# 1.0): before the update the library refuses to sync
# (55000); after it, instances, secrets, watermarks, sync history and merge
# evidence are kept, the next sync is incremental, and the views and a new
# change feed work.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# 1. the same objects, fresh or updated
my $node = Cd2Test::new_node('catalog');
# every released version's install script is frozen beside its upgrade
for my $v ('1.0', '1.1', '1.2', '1.3')
{
	my $db = 'from_' . ($v =~ s/\./_/r);
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION cd2sync VERSION '$v'");
}
# a 1.3 database whose feed follows an instance table: its capture triggers
# (statement triggers over transition tables) are replaced by the update
$node->safe_psql('postgres', 'CREATE DATABASE feeds_1_3');
$node->safe_psql('feeds_1_3', q{
CREATE EXTENSION cd2sync VERSION '1.3';
SET client_min_messages = warning;
SELECT cd2_add_instance('east', 'id-e', 'x', api_url => 'http://127.0.0.1:9', shard_id => 7);
CREATE SCHEMA east;
CREATE TABLE east.enrollments (id bigint PRIMARY KEY, user_id bigint, course_id bigint, state text);
INSERT INTO east.enrollments VALUES (10, 1, 100, 'active');
INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('east', 'enrollments', 'ok');
SELECT cd2sync.refresh_views();
SELECT cd2_create_feed('sis', tables => ARRAY['enrollments']);
SELECT cd2_create_feed('lag', tables => ARRAY['users']);
});
my $triggers = q{SELECT string_agg(tgname || ' ' || tgfoid::regproc, ', ' ORDER BY tgname)
                   FROM pg_trigger WHERE tgrelid = 'east.enrollments'::regclass};
like($node->safe_psql('feeds_1_3', $triggers), qr/^cd2_feed_delete _feed_capture, .*cd2_feed_update _feed_capture$/,
	'1.3: statement triggers capture');
$node->safe_psql('feeds_1_3', 'ALTER EXTENSION cd2sync UPDATE');
is($node->safe_psql('feeds_1_3', $triggers),
	'cd2_feed_delete _feed_capture_row, cd2_feed_insert _feed_capture_row, '
	  . 'cd2_feed_truncate _feed_capture, cd2_feed_update _feed_capture_row',
	'updated: a row trigger captures each row (TRUNCATE: a statement trigger)');
$node->safe_psql('feeds_1_3', "UPDATE east.enrollments SET state = 'completed' WHERE id = 10");
is($node->safe_psql('feeds_1_3', q{SELECT op, key, "row"->>'state', changed FROM cd2_feed_read('sis')}),
	'update|{"id": 70000000000010}|completed|{state}', 'updated: the feed has the row\'s change');
# (a sweep deletes it once acknowledged, from where 1.3's acknowledgements
# left the feed: another feed, behind it, keeps it from deleting every
# change below)
$node->safe_psql('feeds_1_3', "SELECT cd2_feed_ack('sis', (SELECT max(position) FROM cd2_feed_read('sis')))");
is($node->safe_psql('feeds_1_3', "SELECT cd2sync._feed_sweep(); SELECT count(*) FROM cd2sync.changes"), "1\n0",
	'updated: a sweep deletes what the feed acknowledged');

for my $db ('from_1_0', 'from_1_1', 'from_1_2', 'from_1_3')
{
	$node->safe_psql($db, 'ALTER EXTENSION cd2sync UPDATE');
	is($node->safe_psql($db, "SELECT extversion FROM pg_extension WHERE extname = 'cd2sync'"),
		$node->safe_psql('postgres', "SELECT extversion FROM pg_extension WHERE extname = 'cd2sync'"),
		"$db: updated to the default version");
}
my $fresh = extension_objects($node, 'postgres');
ok(scalar(() = $fresh =~ /ALTER EXTENSION cd2sync ADD/g) > 50, 'the dump lists the extension\'s objects');
for my $db ('from_1_0', 'from_1_1', 'from_1_2', 'from_1_3')
{
	my $up = extension_objects($node, $db);
	is($up, $fresh, "$db: the updated extension has exactly the objects of a fresh install");
}
$node->stop;

# The extension's objects as pg_dump --binary-upgrade writes them (it writes
# every member, where a plain dump writes CREATE EXTENSION), without what
# differs between any two databases (oids, xids)
sub extension_objects
{
	my ($n, $db) = @_;
	my $pg_dump = $n->installed_command('pg_dump');
	my $out = `$pg_dump --schema-only --binary-upgrade -d "${\ $n->connstr($db) }"`;
	die "pg_dump failed" if $?;
	return join("\n", map { s/binary_upgrade_create_empty_extension\('cd2sync', 'public', false, '([^']*)', '[^']*'/EXT($1)/r }
		grep { !/binary_upgrade_set_next|^--|^\s*$|relfrozenxid|WHERE oid = |^\\(un)?restrict/ } split /\n/, $out);
}

# 2. data synced by the released 1.0, taken over by this build
SKIP:
{
	skip 'cd2sync 1.0 is not built here (scripts/test.sh builds it from the git history)', 1
	  unless $ENV{CD2_OLD_BINDIR};
	my $old_install = $ENV{CD2_OLD_BINDIR} =~ s{/bin/?$}{}r;
	my $emu = Cd2Test::start_emulator(generate => 'demo');
	$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
	my $old = PostgreSQL::Test::Cluster->new('release_1_0', install_path => $old_install);
	$old->init;
	$old->append_conf('postgresql.conf', "max_worker_processes = 16\ncd2sync.retry_base_delay = 20ms\n"
		  . "cd2sync.poll_interval = 100ms\ncd2sync.job_rate = 0\n");
	$old->start;
	$old->safe_psql('postgres', 'CREATE EXTENSION cd2sync');
	is($old->safe_psql('postgres', "SELECT extversion FROM pg_extension WHERE extname = 'cd2sync'"), '0.1',
		'the 1.0 release (then named 0.1) is installed');
	$old->safe_psql('postgres', "SET log_statement = 'none';\n"
		  . "SELECT cd2_add_instance('north', 'us-east-1#demo-north', 'north-secret', api_url => '$emu->{url}', shard_id => 1);\n"
		  . "SELECT cd2_add_instance('south', 'us-east-1#demo-south', 'south-secret', api_url => '$emu->{url}', shard_id => 2,"
		  . "                        tables => ARRAY['users', 'pseudonyms', 'enrollments'])");
	for my $i ('north', 'south')
	{
		my $r = Cd2Test::sync($old, $i);
		is(join('', map { $r->{$_}{mode} } sort keys %$r), 'snapshot' x scalar(keys %$r), "1.0: $i synced");
	}
	my $state_sql = "SELECT i.name, i.shard_id, s.client_secret, t.table_name, t.watermark_raw, t.schema_version "
	  . "FROM cd2sync.instances i JOIN cd2sync.instance_secrets s ON s.instance = i.name "
	  . "JOIN cd2sync.table_state t ON t.instance = i.name ORDER BY 1, 4";
	my %before = (
		state => $old->safe_psql('postgres', $state_sql),
		log => $old->safe_psql('postgres', "SELECT count(*) FROM cd2sync.sync_log"),
		moves => $old->safe_psql('postgres', "SELECT count(*) FROM cd2sync.user_moves"),
		merges => $old->safe_psql('postgres', "SELECT * FROM cd2.user_merges ORDER BY 1"),
		enrollments => $old->safe_psql('postgres',
			"SELECT md5(string_agg(v::text, ',' ORDER BY instance, id)) FROM cd2.enrollments v"));
	ok($before{merges} ne '', '1.0 found merges');
	$old->stop;

	# this build on the same data directory
	$old->{_install_path} = undef;
	$old->start;
	my ($ret, $stdout, $stderr) = $old->psql('postgres', "SELECT * FROM cd2_sync_now('north')", extra_params => ['-v', 'VERBOSITY=verbose']);
	like($stderr, qr/55000.*SQL objects are at version 0\.1, its library at .*ALTER EXTENSION cd2sync UPDATE/s,
		'before the update the library refuses to sync, saying what to do (55000)');
	$old->safe_psql('postgres', 'ALTER EXTENSION cd2sync UPDATE');
	is($old->safe_psql('postgres', $state_sql), $before{state}, 'instances, secrets and watermarks are kept');
	is($old->safe_psql('postgres', "SELECT count(*) FROM cd2sync.sync_log"), $before{log}, 'the sync history is kept');
	is($old->safe_psql('postgres', "SELECT count(*) FROM cd2sync.user_moves"), $before{moves}, 'merge evidence is kept');
	is($old->safe_psql('postgres', "SELECT * FROM cd2.user_merges ORDER BY 1"), $before{merges}, 'cd2.user_merges is equal');
	is($old->safe_psql('postgres', "SELECT md5(string_agg(v::text, ',' ORDER BY instance, id)) FROM cd2.enrollments v"),
		$before{enrollments}, 'the 1.0 views still read the same rows before any sync');

	my $enr = $emu->state('us-east-1#demo-north', 'enrollments')->{rows};
	$enr->[0]{value}{workflow_state} = 'completed';
	$emu->epoch({ client_id => 'us-east-1#demo-north', table => 'enrollments', upsert => [ $enr->[0] ] });
	my $r = Cd2Test::sync($old, 'north');
	is($r->{enrollments}{mode} . ' ' . $r->{enrollments}{upserted}, 'incremental 1', 'the next sync is incremental');
	is($r->{users}{mode}, 'unchanged', 'and changes nothing else');
	Cd2Test::table_is($old, $emu, 'us-east-1#demo-north', 'north', 'enrollments', 'north.enrollments converges');
	is($old->safe_psql('postgres', "SELECT count(*) FROM pg_attribute WHERE attrelid = 'north.enrollments'::regclass AND attname = 'cd2_user_id'"),
		'1', 'the first run gave the 1.0 tables their new bookkeeping');
	is($old->safe_psql('postgres', "SELECT * FROM cd2.user_merges ORDER BY 1"), $before{merges}, 'cd2.user_merges is still equal');
	is($old->safe_psql('postgres', "SELECT count(*) FROM cd2.enrollments WHERE user_id <> original_user_id"),
		$old->safe_psql('postgres', "SELECT count(*) FROM cd2.enrollments e JOIN cd2.user_merges m ON m.superseded_user_id = e.original_user_id"),
		'the views resolve the users the map has');
	$old->safe_psql('postgres', "SELECT cd2_create_feed('after_upgrade', tables => ARRAY['enrollments'], from_start => true)");
	is($old->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('after_upgrade', 1000000)"),
		$old->safe_psql('postgres', "SELECT count(*) FROM cd2.enrollments"), 'a feed from the start on the updated database');
	$old->stop;
	$emu->stop;
}

done_testing();
