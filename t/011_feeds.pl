# Change feeds end to end, with the sync worker: a feed replays to the
# reconciled views after every sync; a failed table and a killed worker
# publish nothing of their transaction; two instances syncing at once never
# make a reader skip a change; NOTIFY at commit; and the changes stream into
# a second cluster through PostgreSQL's own logical replication. A read
# fails if its feed is dropped or marked stale while it reads. Writers,
# consumers and sweepers all at once: every change received exactly once.
# A feed created while a sync loads a table new gives the table its capture
# triggers, whichever of the two takes the lock on the changes first; a drop
# never deadlocks with a sync.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $emu = Cd2Test::start_emulator(generate => 'demo');
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('feeds', conf => "wal_level = logical\nmax_wal_senders = 4\nmax_replication_slots = 4\nrestart_after_crash = on");
my ($north, $south) = ('us-east-1#demo-north', 'us-east-1#demo-south');
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', shard_id => 1,"
	  . "                        tables => ARRAY['users', 'pseudonyms', 'enrollments', 'courses']);\n"
	  . "SELECT cd2_add_instance('south', '$south', 'south-secret', api_url => '$emu->{url}', shard_id => 2,"
	  . "                        tables => ARRAY['users', 'pseudonyms', 'enrollments']);");
$node->safe_psql('postgres', "SELECT cd2_create_feed('dl', tables => ARRAY['users', 'enrollments'])");

# the changes leave through a publication, into a subscriber's copy
$node->safe_psql('postgres', "CREATE PUBLICATION cd2_changes FOR TABLE cd2sync.changes WITH (publish = 'insert')");
my $sub = PostgreSQL::Test::Cluster->new('subscriber');
$sub->init;
$sub->start;
$sub->safe_psql('postgres', q{
	CREATE SCHEMA cd2sync;
	CREATE TABLE cd2sync.changes (position bigint PRIMARY KEY, feed text, table_name text NOT NULL, op text NOT NULL,
	    key jsonb NOT NULL, instance text NOT NULL, "row" jsonb, changed text[], cause text NOT NULL,
	    watermark timestamptz, committed_at timestamptz NOT NULL)});
my $connstr = $node->connstr('postgres');
$sub->safe_psql('postgres', "CREATE SUBSCRIPTION cd2_changes CONNECTION \$\$$connstr\$\$ PUBLICATION cd2_changes");

# a listener, told at each commit of changes
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN cd2sync_feed');

sub feed_is_exact
{
	my ($label) = @_;
	is($node->safe_psql('postgres', q{
		WITH c AS (SELECT * FROM cd2_feed_read('dl', 100000000)),
		     last AS (SELECT DISTINCT ON (table_name, instance, key) * FROM c
		               ORDER BY table_name, instance, key, position DESC),
		     replayed AS (SELECT table_name, "row" AS r FROM last WHERE op <> 'delete'),
		     actual AS (SELECT 'users'::text, to_jsonb(v) FROM cd2.users v
		                UNION ALL SELECT 'enrollments', to_jsonb(v) FROM cd2.enrollments v)
		SELECT (SELECT count(*) FROM (SELECT * FROM actual EXCEPT ALL SELECT * FROM replayed) x) || ' missing, '
		    || (SELECT count(*) FROM (SELECT * FROM replayed EXCEPT ALL SELECT * FROM actual) y) || ' extra'}),
		'0 missing, 0 extra', "$label: the feed replays to cd2.users and cd2.enrollments");
}
sub last_position { return $node->safe_psql('postgres', "SELECT coalesce(max(position), 0) FROM cd2sync.changes"); }

# 1. first syncs: every row arrives as an insert
for my $i ('north', 'south')
{
	my $r = Cd2Test::sync($node, $i);
	is(join(',', map { $r->{$_}{error} } sort keys %$r), join(',', map { '' } keys %$r), "$i: first sync");
}
feed_is_exact('snapshots');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('dl', 100000000) WHERE table_name = 'courses'"), '0',
	'a table the feed does not follow has no changes');
like($listener->query_safe('SELECT 1'), qr/Asynchronous notification "cd2sync_feed" with payload "dl" received/,
	'NOTIFY cd2sync_feed, payload the feed, when changes commit');

# 2. a failed table publishes nothing; the next run converges
my $users = $emu->state($north, 'users')->{rows};
my $enr = $emu->state($north, 'enrollments')->{rows};
$users->[0]{value}{name} = 'Renamed';
$enr->[0]{value}{workflow_state} = 'completed';
$emu->epoch({ client_id => $north, table => 'users', upsert => [ $users->[0] ] },
	{ client_id => $north, table => 'enrollments', upsert => [ $enr->[0] ], delete => [ { key => $enr->[1]{key} } ] });
$emu->faults({ endpoint => 'download', kind => 'corrupt_gzip', table => 'enrollments', times => 10 });
my $before = last_position();
my $r = Cd2Test::sync($node, 'north');
like($r->{enrollments}{error}, qr/.+/, 'enrollments failed');
is($node->safe_psql('postgres', "SELECT string_agg(table_name || ' ' || op, ',') FROM cd2sync.changes WHERE position > $before"),
	'users update', 'only the table that succeeded published its change');
$emu->clear_faults;
$r = Cd2Test::sync($node, 'north');
is($r->{enrollments}{error}, '', 'the next run succeeds');
is($node->safe_psql('postgres', "SELECT string_agg(op || ' ' || coalesce(changed::text, ''), ',' ORDER BY op) FROM cd2sync.changes "
	  . "WHERE position > $before AND table_name = 'enrollments'"),
	'delete ,update {workflow_state}', 'and publishes the enrolment changes, once');
feed_is_exact('after a failed table');

# 3. a worker killed in the middle of a load publishes nothing
$enr = $emu->state($north, 'enrollments')->{rows};
$enr->[0]{value}{workflow_state} = 'active';
$emu->epoch({ client_id => $north, table => 'enrollments', upsert => [ $enr->[0] ] });
$emu->faults({ endpoint => 'download', kind => 'hang', seconds => 20, table => 'enrollments', times => 1 });
$before = last_position();
$node->safe_psql('postgres', "SELECT cd2_sync_start('north')");
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM cd2sync.progress WHERE table_name = 'enrollments' AND phase ~ '^(downloading|loading)'"),
	'the worker is inside the enrollments load');
kill 'KILL', $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'cd2sync sync worker'");
ok($node->poll_query_until('postgres', "SELECT true"), 'the server recovered from the killed worker');
$listener = $node->background_psql('postgres');    # (the crash ended the old session)
$listener->query_safe('LISTEN cd2sync_feed');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes WHERE position > $before AND table_name = 'enrollments'"),
	'0', 'the killed transaction published nothing');
$emu->clear_faults;
Cd2Test::sync($node, 'north');
feed_is_exact('after a killed worker');

# 4. two instances syncing at once: a reader polling the feed never finds a
# position below one it already saw, that it had not seen
my @changes;
for my $i (['north', $north], ['south', $south])
{
	my $rows = $emu->state($i->[1], 'enrollments')->{rows};
	$_->{value}{workflow_state} = $_->{value}{workflow_state} eq 'active' ? 'inactive' : 'active' for @$rows;
	push @changes, { client_id => $i->[1], table => 'enrollments', upsert => $rows };
}
$emu->epoch(@changes);
$node->safe_psql('postgres', "SELECT cd2_sync_start('north'), cd2_sync_start('south')");
my (%seen, $max, @late) = ((), 0);
for (1 .. 400)
{
	my @pos = split /\n/, $node->safe_psql('postgres', "SELECT position FROM cd2sync.changes WHERE position > 0 ORDER BY 1");
	for my $p (@pos)
	{
		push @late, $p if !$seen{$p} && $p < $max;
		$seen{$p} = 1;
	}
	$max = $pos[-1] if @pos && $pos[-1] > $max;
	last if $node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.runs WHERE status = 'running'") == 0 && $_ > 5;
}
is(join(',', @late), '', 'no change became visible below a position already seen');
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM cd2sync.runs WHERE status = 'running'"), 'both runs ended');
feed_is_exact('after two instances synced at once');
is($node->safe_psql('postgres', "SELECT count(DISTINCT instance) FROM cd2sync.changes WHERE position > $max - 1000"), '2',
	'both instances published');

# 5. the subscriber has every change, in the same positions
$node->wait_for_catchup('cd2_changes');
is($sub->safe_psql('postgres', "SELECT count(*), max(position), md5(string_agg(position || op || key::text || coalesce(\"row\"::text, ''), ',' ORDER BY position)) FROM cd2sync.changes"),
	$node->safe_psql('postgres', "SELECT count(*), max(position), md5(string_agg(position || op || key::text || coalesce(\"row\"::text, ''), ',' ORDER BY position)) FROM cd2sync.changes"),
	'logical replication streamed every change to the subscriber');

# acknowledged changes are forgotten here, by the end of the next sync (an
# acknowledgement deletes nothing itself); the subscriber keeps its copy
my $last = last_position();
my $before_ack = $node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes");
$node->safe_psql('postgres', "SELECT cd2_feed_ack('dl', $last)");
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), $before_ack, 'an acknowledgement deletes nothing');
$r = Cd2Test::sync($node, 'north', tables => ['courses']);
is($r->{courses}{mode} . $r->{courses}{error}, 'unchanged', 'a sync of a table no feed follows');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), '0', 'forgets the acknowledged changes at its end');
$node->wait_for_catchup('cd2_changes');
ok($sub->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes") > 0, 'the subscriber keeps what it received');

# 6. a feed created while a write waits to publish (the creation holds the
# lock on the changes): the write's changes are the new feed's, and so is
# its notification
my $creator = $node->background_psql('postgres');
$creator->query_safe("BEGIN; SELECT cd2_create_feed('late', tables => ARRAY['users'])");
$listener->query_safe('SELECT 1');    # (what earlier steps notified)
my $writer = $node->background_psql('postgres');
$writer->query_until(qr/writing/,
	"\\echo writing\nUPDATE north.users SET name = name || '!' WHERE id = (SELECT min(id) FROM north.users);\n");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND relation = 'cd2sync.changes'::regclass"),
	'the write waits for the lock the creation holds');
$creator->query_safe('COMMIT');
$writer->query_safe('SELECT 1');      # (the update is done)
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('late')"), '1', 'the new feed has the write');
like($listener->query_safe('SELECT 1'), qr/Asynchronous notification "cd2sync_feed" with payload "late" received/,
	'and is notified of it');
$writer->quit;
$creator->quit;

# 7. a table's last feed dropped while another is created on it: whichever
# commits last, the table keeps its capture triggers and the new feed its
# changes
$node->safe_psql('postgres', "SELECT cd2_create_feed('c1', tables => ARRAY['courses'])");
my $dropper = $node->background_psql('postgres');
$dropper->query_safe("BEGIN; SELECT cd2_drop_feed('c1')");
$creator = $node->background_psql('postgres');
$creator->query_until(qr/creating/, "\\echo creating\nSELECT cd2_create_feed('c2', tables => ARRAY['courses']);\n");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%c2%'"),
	'the creation waits for the drop');
$dropper->query_safe('COMMIT');
$creator->query_safe('SELECT 1');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'north.courses'::regclass AND tgname LIKE 'cd2_feed%'"),
	'4', 'the table has its capture triggers');
$node->safe_psql('postgres', "UPDATE north.courses SET name = name || '!' WHERE id = (SELECT min(id) FROM north.courses)");
is($node->safe_psql('postgres', "SELECT string_agg(op, ',') FROM cd2_feed_read('c2')"), 'update', 'and the new feed its change');
$dropper->quit;
$creator->quit;

# 8. a table's first load after a merge: each row once, as an insert showing
# the replacement user and the duplicate flag (the load sets both after the
# rows are in)
my %subs_of;
$subs_of{ $_->{value}{user_id} }++ for @{ $emu->state($north, 'submissions')->{rows} };
my ($gone) = sort { $subs_of{$b} <=> $subs_of{$a} || $a <=> $b } keys %subs_of;
my ($keeper) = grep { $_ != $gone } map { $_->{key}{id} } @{ $emu->state($north, 'users')->{rows} };
my ($gone_row) = grep { $_->{key}{id} == $gone } @{ $emu->state($north, 'users')->{rows} };
$gone_row->{value}{workflow_state} = 'deleted';
$gone_row->{value}{merged_into_user_id} = $keeper;
$emu->epoch({ client_id => $north, table => 'users', upsert => [ $gone_row ] });
Cd2Test::sync($node, 'north');
is($node->safe_psql('postgres', "SELECT replacement_user_id = cd2_global_id('north', $keeper) FROM cd2.user_merges "
	  . "WHERE superseded_user_id = cd2_global_id('north', $gone)"), 't', 'the merge is in the map');
$node->safe_psql('postgres', "SELECT cd2_create_feed('subs', tables => ARRAY['submissions'])");
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', tables => ARRAY['users', 'pseudonyms', 'enrollments', 'courses', 'submissions'])");
$r = Cd2Test::sync($node, 'north');
is($r->{submissions}{error}, '', 'submissions: first load');
is($node->safe_psql('postgres', "SELECT count(*) FILTER (WHERE op = 'insert') || ' inserts, ' || count(*) FILTER (WHERE op <> 'insert') || ' other' "
	  . "FROM cd2_feed_read('subs', 100000)"),
	$node->safe_psql('postgres', "SELECT count(*) FROM north.submissions") . ' inserts, 0 other', 'one insert per row, nothing else');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('subs', 100000) "
	  . "WHERE (\"row\"->>'user_id')::bigint = cd2_global_id('north', $keeper) "
	  . "AND (\"row\"->>'original_user_id')::bigint = cd2_global_id('north', $gone)"),
	$node->safe_psql('postgres', "SELECT count(*) FROM north.submissions WHERE user_id = $gone"),
	'the merged user\'s rows show the replacement');

# 8b. a feed of every table created while a sync loads a table new, which
# the creation cannot see before the load commits: whichever takes the lock
# on the changes first, the table gets its capture triggers, and a later
# write to it (another instance's merge, say) reaches the feed. (The load
# is a sync's steps, by hand: a table no feed follows yet.)
my $load = sub {    # (the steps up to the load's end, which takes the lock)
	my ($session, $tab) = @_;
	$session->query_safe("BEGIN;
		CREATE TABLE south.$tab (id bigint PRIMARY KEY, name text);
		INSERT INTO cd2sync.table_state (instance, table_name, status) VALUES ('south', '$tab', 'ok');
		SELECT cd2sync.refresh_view('$tab');
		SELECT cd2sync._before_apply('south', '$tab', now());
		SELECT cd2sync._feed_load_begin('south.$tab');
		INSERT INTO south.$tab VALUES (1, 'a'), (2, 'b'), (3, 'c');");
	$session->query_until(qr/ending/, "\\echo ending\nSELECT cd2sync._after_apply('south', '$tab', 'snapshot', 3);\n");
};
my $triggers = sub {
	return $node->safe_psql('postgres', "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'south.$_[0]'::regclass AND tgname LIKE 'cd2_feed%'");
};
# the load takes the lock first: the creation waits for it, then looks again
my $loader = $node->background_psql('postgres');
$load->($loader, 'accounts');
ok($node->poll_query_until('postgres', "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
	  . "WHERE l.granted AND l.relation = 'cd2sync.changes'::regclass AND a.query LIKE '%_after_apply%'"),
	'the load holds the lock on the changes');
$creator = $node->background_psql('postgres');
$creator->query_until(qr/creating/, "\\echo creating\nSELECT cd2_create_feed('every1');\n");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%every1%'"),
	'the creation waits for it');
$loader->query_safe('COMMIT');
$creator->query_safe('SELECT 1');
is($triggers->('accounts'), '4', 'load first: the new table has its capture triggers');
$node->safe_psql('postgres', "UPDATE south.accounts SET name = 'x' WHERE id = 1");
is($node->safe_psql('postgres', "SELECT string_agg(table_name || ' ' || op, ',' ORDER BY position) FROM cd2_feed_read('every1')"),
	'accounts update', 'and a later write to it reaches the feed');
$node->safe_psql('postgres', "SELECT cd2_drop_feed('every1')");
# the creation takes the lock first: the load's end waits, then gives them
$creator->query_safe("BEGIN; SELECT cd2_create_feed('every2')");
$load->($loader, 'terms');
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%_after_apply%'"),
	'the load\'s end waits for the creation');
$creator->query_safe('COMMIT');
$loader->query_safe('COMMIT');
is($triggers->('terms'), '4', 'creation first: the new table has its capture triggers');
$node->safe_psql('postgres', "UPDATE south.terms SET name = 'y' WHERE id = 2");
is($node->safe_psql('postgres', "SELECT string_agg(op || ' ' || (key->>'id'), ',' ORDER BY position) FROM cd2_feed_read('every2')"),
	join(',', (map { 'insert ' . (2 * 10_000_000_000_000 + $_) } 1 .. 3), 'update ' . (2 * 10_000_000_000_000 + 2)),
	'and the feed the rows of the load, then the later write');
$node->safe_psql('postgres', "SELECT cd2_drop_feed('every2');
	DROP TABLE south.accounts, south.terms CASCADE; DELETE FROM cd2sync.table_state WHERE table_name IN ('accounts', 'terms');
	SELECT cd2sync.refresh_view('accounts'); SELECT cd2sync.refresh_view('terms')");
$loader->quit;
$creator->quit;

# 8c. a feed dropped while a sync holds the lock on the changes and is to
# write, next, the table the drop takes triggers from: neither waits for the
# other in a cycle (a deadlock failed one of them). The drop takes the
# triggers and forgets its changes only if it can at once; the sweeps
# forget them later.
$node->safe_psql('postgres', "SELECT cd2_create_feed('solo', tables => ARRAY['pseudonyms'])");
my $sync8 = $node->background_psql('postgres', on_error_stop => 0);
# (its capture takes the lock on the changes: feed dl follows users)
$sync8->query_safe("BEGIN; UPDATE north.users SET name = name || '~' WHERE id = (SELECT min(id) FROM north.users)");
my $dropper8 = $node->background_psql('postgres', on_error_stop => 0);
$dropper8->query_until(qr/dropping/, "\\echo dropping\nSELECT cd2_drop_feed('solo');\n");
ok($node->poll_query_until('postgres', "SELECT NOT EXISTS (SELECT 1 FROM cd2sync.feed WHERE name = 'solo') "
	  . "OR EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%cd2_drop_feed%')"),
	'the drop is done, or waits');
$sync8->query("UPDATE north.pseudonyms SET id = id WHERE false");
$sync8->query("COMMIT");
$dropper8->query('SELECT 1');
is($sync8->{stderr}, '', 'the sync commits');
is($dropper8->{stderr}, '', 'and so does the drop');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.feed WHERE name = 'solo'"), '0', 'the feed is gone');
$sync8->quit;
$dropper8->quit;

# 9. a sync finds a feed over its limits while the feed is being dropped
# (the drop's open transaction holds the feed's row; the drop itself waits
# for no sync, 8c): the sync leaves the mark to a later check instead of
# waiting, and commits; then the drop commits (waiting for the row made a
# deadlock, and one of them failed)
$node->safe_psql('postgres', "SELECT cd2_create_feed('over', tables => ARRAY['users'])");
my $syncing = $node->background_psql('postgres', on_error_stop => 0);
$syncing->query_safe("SET cd2sync.feed_max_pending = 1; BEGIN; SELECT cd2sync._before_apply('north', 'users', now())");
$syncing->query_safe("UPDATE north.users SET name = name || '?' WHERE id IN (SELECT id FROM north.users ORDER BY id LIMIT 3)");
$dropper = $node->background_psql('postgres');
$dropper->query_safe("BEGIN; SELECT cd2_drop_feed('over')");
$syncing->query("SELECT cd2sync._after_apply('north', 'users', 'incremental', 3)");
$syncing->query("COMMIT");
$dropper->query_safe('COMMIT');
is($node->safe_psql('postgres', "SELECT count(*) FROM north.users WHERE name LIKE '%?'"), '3', 'the sync committed');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.feed WHERE name = 'over'"), '0', 'and the drop');
$syncing->quit;
$dropper->quit;

# 10. what a check learns of a feed (its hints) never makes a consumer wait
# or fail: a consumer in REPEATABLE READ acknowledges after another
# session's check wrote its feed's hints (an update of the feed's row made
# that a serialization failure), and a feed is acknowledged while another
# transaction holds its hints (it waited). And a feed acknowledged while a
# check counts it is not found stale for changes the acknowledgement took.
$node->safe_psql('postgres', "SELECT cd2_drop_feed(name) FROM cd2sync.feed");
$node->safe_psql('postgres', "SELECT cd2_create_feed('rr', tables => ARRAY['pseudonyms']), cd2_create_feed('g', tables => ARRAY['courses'])");
my $put = sub {    # (changes written as a capture writes them, under its lock)
	my ($feed, $table, $n) = @_;
	$node->safe_psql('postgres', qq{
		BEGIN;
		SELECT FROM cd2sync._feed_lock();
		INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, "row", cause)
		SELECT nextval('cd2sync.change_position_seq'), '$feed', '$table', 'insert', jsonb_build_object('id', i),
		       'north', jsonb_build_object('id', i), 'sync'
		  FROM generate_series(1, $n) i;
		COMMIT});
	return $node->safe_psql('postgres', "SELECT max(position) FROM cd2sync.changes");
};
$put->('nobody', 'users', 1500);
my $pos_rr = $put->('rr', 'pseudonyms', 1);
my $pos_g = $put->('g', 'courses', 1);
my $rr = $node->background_psql('postgres', on_error_stop => 0);
$rr->query_safe("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM cd2_feed_read('rr')");
my $holder = $node->background_psql('postgres');
# (its check, over a limit of 10 positions, counts the feed's changes)
$holder->query_safe("SET cd2sync.feed_max_pending = 10; BEGIN; SELECT count(*) FROM cd2_feed_read('g')");
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_locks WHERE relation = 'cd2sync.feed'::regclass AND mode = 'RowExclusiveLock'"),
	'0', "a reader's check writes nothing of the feeds' rows");
my ($ret, $out, $err) = $node->psql('postgres', "SET lock_timeout = '5s'; SELECT cd2_feed_ack('g', $pos_g)");
is($ret . $err, '0', 'a feed whose hints another transaction holds is acknowledged without waiting');
$holder->query_safe('COMMIT');
# (a sync's end checks every feed)
$node->safe_psql('postgres', "SET cd2sync.feed_max_pending = 10; SELECT cd2sync._feed_check_limits()");
is($node->safe_psql('postgres', "SELECT string_agg(name || ' ' || (scanned_to > 1000) || ' ' || counted_pending, ', ' ORDER BY name) FROM cd2sync.feed_hint"),
	'g true 1, rr true 1', "the checks wrote both feeds' hints");
is($node->safe_psql('postgres', "SELECT h.counted_from = f.acknowledged FROM cd2sync.feed f JOIN cd2sync.feed_hint h USING (name, created_at) "
	  . "WHERE name = 'g'"), 'f', "the count the acknowledgement could not take with it is no longer valid");
# (the acknowledgement of g passed over the changes of no feed before rr's
# change and left them, as it forgets only g's: had it deleted them, rr's
# REPEATABLE READ acknowledgement, deleting them too, would fail)
$rr->query("SELECT cd2_feed_ack('rr', $pos_rr); COMMIT");
is($rr->{stderr}, '', 'a consumer in REPEATABLE READ acknowledges after another session wrote its hints');
is($node->safe_psql('postgres', "SELECT string_agg(name || ' ' || acknowledged, ', ' ORDER BY name) FROM cd2sync.feed"),
	"g $pos_g, rr $pos_rr", 'both acknowledgements are in');
$rr->quit;
$holder->quit;
$node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('rr')");
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), '1502',
	'the acknowledged changes, and those of no feed, are left to a sweep');
is($node->safe_psql('postgres', "SELECT cd2sync._feed_sweep()"), '1502', 'which deletes them');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), '0', 'all');

# (an acknowledgement while a check waits for the changes: the check read
# the feed and what an earlier check counted before, and counts what came
# after with the acknowledgement's changes gone)
$node->safe_psql('postgres', "SELECT cd2_create_feed('st', tables => ARRAY['pseudonyms'])");
my $acked = $put->('st', 'pseudonyms', 9);
$put->('nobody', 'users', 1500);
$node->safe_psql('postgres', "SET cd2sync.feed_max_pending = 10; SELECT cd2sync._feed_check_limits()");
is($node->safe_psql('postgres', "SELECT counted_pending FROM cd2sync.feed_hint WHERE name = 'st'"), '9', 'a check counted 9 changes');
my $acker = $node->background_psql('postgres');
$acker->query_safe("BEGIN; SELECT cd2_feed_ack('st', $acked)");
$acker->query_safe("SELECT cd2sync._feed_lock();
	INSERT INTO cd2sync.changes (position, feed, table_name, op, key, instance, \"row\", cause)
	SELECT nextval('cd2sync.change_position_seq'), 'st', 'pseudonyms', 'insert', jsonb_build_object('id', i), 'north',
	       jsonb_build_object('id', i), 'sync' FROM generate_series(100, 101) i;
	LOCK TABLE cd2sync.changes IN ACCESS EXCLUSIVE MODE");
my $checker = $node->background_psql('postgres', on_error_stop => 0);
$checker->query_until(qr/checking/, "SET cd2sync.feed_max_pending = 10;\n\\echo checking\nSELECT cd2sync._feed_check_limits();\n");
ok($node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND relation = 'cd2sync.changes'::regclass"),
	'the check waits for the changes, the feed read');
$acker->query_safe('COMMIT');
$checker->query('SELECT 1');
is($checker->{stderr}, '', 'the check ends without a warning');
is($node->safe_psql('postgres', "SELECT status || ' ' || pending FROM cd2sync.feeds WHERE name = 'st'"), 'ok 2',
	'the feed is not stale: 2 changes wait');
$acker->quit;
$checker->quit;

# 11. two feeds acknowledge the same change at once, each in a transaction
# held open: a sync's write waits for neither, nor an acknowledgement for a
# sync's transaction that holds the changes' lock (each did when an
# acknowledgement deleted what it covered); the sweep after deletes the
# change, since every feed has acknowledged it, and the changes of no feed
# before it (a quiet feed too is known by its check to have no change up
# to it). A reader's transaction, held open meanwhile, holds nothing a sync
# waits for either.
$node->safe_psql('postgres', "SELECT cd2_drop_feed(name) FROM cd2sync.feed");
$node->safe_psql('postgres', "SELECT cd2_create_feed('q1', tables => ARRAY['courses']), "
	  . "cd2_create_feed('a1', tables => ARRAY['users']), cd2_create_feed('b1', tables => ARRAY['users'])");
$put->('nobody', 'users', 1100);
my $bump = "UPDATE north.users SET name = name || '+' WHERE id = (SELECT min(id) FROM north.users)";
$node->safe_psql('postgres', $bump);
my $p = last_position();
my $ack_a = $node->background_psql('postgres');
my $ack_b = $node->background_psql('postgres');
my $capturing = $node->background_psql('postgres');
$capturing->query_safe("BEGIN; SELECT cd2sync._feed_lock()");   # (as a sync's capture, until it commits)
($ret, $out, $err) = $node->psql('postgres', "SET lock_timeout = '5s'; SELECT cd2_feed_ack('b1', $p - 1)");
is($ret . $err, '0', "an acknowledgement does not wait for a sync's transaction");
$capturing->query_safe('COMMIT');
$ack_a->query_safe("BEGIN; SELECT cd2_feed_ack('a1', $p)");
$ack_b->query_safe("BEGIN; SELECT cd2_feed_ack('b1', $p)");
($ret, $out, $err) = $node->psql('postgres', "SET lock_timeout = '5s'; $bump");
is($ret . $err, '0', "a sync's write does not wait for consumers' open transactions that acknowledged");
$ack_a->query_safe('COMMIT');
$ack_b->query_safe('COMMIT');
$capturing->quit;
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes WHERE position = $p"), '1', 'both acknowledgements left the change');
# (the reader's limit, 1 change, puts the other feeds over it: its read
# checks its own feed only, and marks none, which would forget their
# changes and hold the lock on them that the write waits for)
$node->safe_psql('postgres', "SELECT cd2_create_feed('ov', tables => ARRAY['users'])");
$node->safe_psql('postgres', "$bump; $bump");
my $reader = $node->background_psql('postgres', on_error_stop => 0);
$reader->query_safe("SET cd2sync.feed_max_pending = 1; BEGIN; SELECT count(*) FROM cd2_feed_read('q1')");
($ret, $out, $err) = $node->psql('postgres', "SET lock_timeout = '5s'; $bump");
is($ret . $err, '0', "a sync's write does not wait for a reader's open transaction");
$reader->query_safe('COMMIT');
$reader->query('SELECT count(*) FROM cd2_feed_read(\'ov\')');
like($reader->{stderr}, qr/feed "ov" is stale: more than 1 changes wait/, 'a read of a feed over its limits fails');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.feed WHERE stale_since IS NOT NULL"), '0', 'and no read marked a feed');
is($node->safe_psql('postgres', "SELECT scanned_to >= $p FROM cd2sync.feed_hint WHERE name = 'q1'"), 't',
	'the quiet feed has no change up to it');
$node->safe_psql('postgres', "SELECT cd2_feed_ack('a1', " . last_position() . "); SELECT cd2sync._feed_sweep()");
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes WHERE position <= $p"), '0',
	'the next sweep deleted it, and the changes of no feed before it');
$ack_a->quit;
$ack_b->quit;
$reader->quit;

# 12. a feed over its limits is marked stale by the end of the next sync,
# one that changes nothing too, with the database's default isolation
# REPEATABLE READ (the sync worker writes in READ COMMITTED: a mark, and
# forgetting, are skipped where they could fail)
$node->safe_psql('postgres', "SELECT cd2_drop_feed(name) FROM cd2sync.feed");
$node->safe_psql('postgres', "SELECT cd2_create_feed('lim', tables => ARRAY['users'])");
$node->safe_psql('postgres', "$bump; $bump");
$node->safe_psql('postgres', "ALTER DATABASE postgres SET default_transaction_isolation = 'repeatable read'");
$node->safe_psql('postgres', "ALTER DATABASE postgres SET cd2sync.feed_max_pending = 1");
# (while another transaction holds the lock on the changes, as a feed being
# made from its start does, the sync leaves the mark, and its forgetting,
# to a later one, instead of waiting)
my $locker = $node->background_psql('postgres');
$locker->query_safe("BEGIN; LOCK TABLE cd2sync.changes IN EXCLUSIVE MODE");
$r = Cd2Test::sync($node, 'north', tables => ['courses'], pre => "SET statement_timeout = '30s';");
is($r->{courses}{mode} . $r->{courses}{error}, 'unchanged', 'a sync while the changes are locked does not wait');
is($node->safe_psql('postgres', "SELECT stale_since IS NULL FROM cd2sync.feed WHERE name = 'lim'"), 't', 'nor mark');
$locker->query_safe('COMMIT');
$locker->quit;
$r = Cd2Test::sync($node, 'north', tables => ['courses']);
is($r->{courses}{mode} . $r->{courses}{error}, 'unchanged', 'a sync that changes nothing');
is($node->safe_psql('postgres', "SELECT stale_reason FROM cd2sync.feed WHERE name = 'lim'"),
	'more than 1 changes wait, over cd2sync.feed_max_pending', 'marks the feed over its limits');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), '0', 'and its changes are forgotten');
$node->safe_psql('postgres', "ALTER DATABASE postgres RESET default_transaction_isolation");
$node->safe_psql('postgres', "ALTER DATABASE postgres RESET cd2sync.feed_max_pending");

# 13. a read that waits for the changes (held here by another transaction)
# while its feed is dropped, or marked stale by a sync's check: the changes
# it then reads lack what the drop or the mark forgot, so the read fails
# instead of returning them
# (each the only feed of its changes, which the drop or mark deletes)
$node->safe_psql('postgres', "SELECT cd2_drop_feed(name) FROM cd2sync.feed");
for my $case (
	[ 'dr', "SELECT cd2_drop_feed('dr')", qr/42704: cd2sync feed "dr" was dropped/, 'dropped' ],
	[ 'mk', "SET LOCAL cd2sync.feed_max_pending = 1; SELECT cd2sync._feed_check_limits()",
		qr/55000: cd2sync feed "mk" is stale: more than 1 changes wait/, 'marked stale' ])
{
	my ($feed, $act, $expect, $what) = @$case;
	$node->safe_psql('postgres', "SELECT cd2_create_feed('$feed', tables => ARRAY['users'])");
	$node->safe_psql('postgres', "$bump; $bump");
	is($node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('$feed')"), '2', "$feed: 2 changes to read");
	my $blocker = $node->background_psql('postgres');
	$blocker->query_safe("BEGIN; LOCK TABLE cd2sync.changes IN ACCESS EXCLUSIVE MODE");
	my $rd = $node->background_psql('postgres', on_error_stop => 0);
	$rd->query_until(qr/reading/, "\\set VERBOSITY verbose\n\\echo reading\nSELECT count(*) FROM cd2_feed_read('$feed');\n");
	ok($node->poll_query_until('postgres',
		"SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND relation = 'cd2sync.changes'::regclass"),
		"$feed: the read waits for the changes");
	$blocker->query("$act; COMMIT");
	unlike($blocker->{stderr}, qr/ERROR/, "$feed: $what, and committed");
	$rd->query('SELECT 1');
	like($rd->{stderr}, $expect, "$feed: a read of a feed $what while it read fails");
	$blocker->quit;
	$rd->quit;
}
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), '0', 'what both feeds had is forgotten');

# 14. all at once: two writers changing rows of two tables (each change
# written by the capture, as a sync's are), three consumers, each reading
# its feed in batches of random sizes, keeping what it read and
# acknowledging it in one transaction, and two sweepers deleting what was
# acknowledged in batches of random sizes. Each feed receives every change
# of its tables exactly once, in position order, and once everyone is done
# a sweep leaves nothing.
$node->safe_psql('postgres', q{
	SELECT cd2_drop_feed(name) FROM cd2sync.feed;
	SELECT cd2_create_feed('sa', tables => ARRAY['users']), cd2_create_feed('sb', tables => ARRAY['users', 'courses']),
	       cd2_create_feed('sc', tables => ARRAY['courses']);
	CREATE TABLE stress_written (writer int, table_name text, n int);
	CREATE TABLE stress_got (feed text, seq bigserial, position bigint, table_name text, key jsonb);
	CREATE TABLE stress_done (who text);
	CREATE TABLE stress_swept (n bigint);
	CREATE PROCEDURE stress_write(w int, rounds int) LANGUAGE plpgsql AS $$
	DECLARE n int;
	BEGIN
	    FOR i IN 1 .. rounds LOOP
	        IF i % 2 = 0 THEN
	            UPDATE north.users SET name = format('w%s-%s %s', w, i, id)   -- (the writers' rows apart: no deadlock)
	             WHERE id IN (SELECT id FROM north.users WHERE id % 2 = w - 1 ORDER BY random() LIMIT 1 + (random() * 4)::int);
	            GET DIAGNOSTICS n = ROW_COUNT;
	            INSERT INTO stress_written VALUES (w, 'users', n);
	        ELSE
	            UPDATE north.courses SET name = format('w%s-%s %s', w, i, id)
	             WHERE id IN (SELECT id FROM north.courses WHERE id % 2 = w - 1 ORDER BY random() LIMIT 1 + (random() * 2)::int);
	            GET DIAGNOSTICS n = ROW_COUNT;
	            INSERT INTO stress_written VALUES (w, 'courses', n);
	        END IF;
	        PERFORM pg_sleep(random() * 0.005);   -- (committing late: its positions before a later writer's)
	        COMMIT;
	    END LOOP;
	    INSERT INTO stress_done VALUES ('writer');
	END $$;
	CREATE PROCEDURE stress_consume(f text) LANGUAGE plpgsql AS $$
	DECLARE last bigint; idle int := 0;
	BEGIN
	    LOOP
	        INSERT INTO stress_got (feed, position, table_name, key)
	        SELECT f, c.position, c.table_name, c.key FROM cd2_feed_read(f, 1 + (random() * 40)::int) c ORDER BY c.position;
	        SELECT max(g.position) INTO last FROM stress_got g WHERE g.feed = f;
	        IF last > (SELECT x.acknowledged FROM cd2sync.feed x WHERE x.name = f) THEN
	            PERFORM cd2_feed_ack(f, last);
	            idle := 0;
	        ELSIF (SELECT count(*) FROM stress_done WHERE who = 'writer') = 2 THEN
	            idle := idle + 1;
	            EXIT WHEN idle > 3;
	        END IF;
	        COMMIT;
	        PERFORM pg_sleep(random() * 0.01);
	    END LOOP;
	    INSERT INTO stress_done VALUES ('consumer');
	    COMMIT;
	END $$;
	CREATE PROCEDURE stress_sweep() LANGUAGE plpgsql AS $$
	BEGIN
	    WHILE (SELECT count(*) FROM stress_done WHERE who = 'consumer') < 3 LOOP
	        INSERT INTO stress_swept SELECT cd2sync._feed_sweep(1 + (random() * 60)::int);
	        COMMIT;
	        PERFORM pg_sleep(random() * 0.02);
	    END LOOP;
	END $$;
});
my @stress;
for my $call ('stress_write(1, 300)', 'stress_write(2, 300)', "stress_consume('sa')", "stress_consume('sb')",
	"stress_consume('sc')", 'stress_sweep()', 'stress_sweep()')
{
	my ($out, $err) = ('', '');
	push @stress, [ $call, \$err,
		IPC::Run::start([ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-c', "CALL $call" ],
			'<', \undef, '>', \$out, '2>', \$err, IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default)) ];
}
for my $s (@stress)
{
	my ($call, $err, $h) = @$s;
	ok(eval { $h->finish }, "stress: $call ran to its end") or diag($@ . $$err);
}
note('stress: ' . $node->safe_psql('postgres', q{
	SELECT format('%s changes written, %s deleted by the sweepers while the consumers read',
	              (SELECT sum(n) FROM stress_written), (SELECT sum(n) FROM stress_swept))}));
is($node->safe_psql('postgres', q{SELECT sum(n) > 300 FROM stress_written}), 't', 'stress: the writers changed rows');
is($node->safe_psql('postgres', q{SELECT sum(n) > 0 FROM stress_swept}), 't',
	'stress: the sweepers deleted changes while the consumers read');
for my $feed ([ 'sa', "'users'" ], [ 'sb', "'users', 'courses'" ], [ 'sc', "'courses'" ])
{
	my ($f, $tables) = @$feed;
	my ($got, $written, $twice, $disorder) = split /\|/, $node->safe_psql('postgres', qq{
		SELECT (SELECT count(*) FROM stress_got WHERE feed = '$f'),
		       (SELECT sum(n) FROM stress_written WHERE table_name IN ($tables)),
		       (SELECT count(*) - count(DISTINCT position) FROM stress_got WHERE feed = '$f'),
		       (SELECT count(*) FROM (SELECT position < lag(position) OVER (ORDER BY seq) AS back
		                                FROM stress_got WHERE feed = '$f') x WHERE back)});
	is("$got got, $twice twice, $disorder out of order", "$written got, 0 twice, 0 out of order",
		"stress: $f received every change of its tables ($tables) once, in position order");
}
is($node->safe_psql('postgres', q{
	SELECT count(*) FROM stress_got g
	 WHERE NOT EXISTS (SELECT 1 FROM stress_got h WHERE h.position = g.position AND h.feed <> g.feed)
	   AND g.table_name = 'users' AND g.feed IN ('sa', 'sb')}), '0',
	'stress: both feeds of users received the same changes');
$node->safe_psql('postgres', "SELECT cd2sync._feed_sweep(100000)");
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes"), '0',
	'stress: a last sweep leaves no change (every feed acknowledged everything)');
$node->safe_psql('postgres', q{
	DROP TABLE stress_written, stress_got, stress_done, stress_swept;
	DROP PROCEDURE stress_write, stress_consume, stress_sweep});

$listener->quit;
$sub->stop;
$node->stop;
$emu->stop;
done_testing();
