# The consortium layer end to end: three instances with shard ids, synced
# through epochs that hold a cross-instance home-account merge whose
# references move one epoch later on another instance, a chain A->B->C, a
# split, a failed merge, a conflicting enrolment left on the old user, a
# reference to a user whose row has not arrived yet, and a merge seen only
# through an enrolment's SIS login. After each epoch, cd2.user_merges,
# cd2_resolve_user and every row of cd2.enrollments and cd2.submissions are
# checked against values this test computes on its own from the emulator's
# data and the merges it made.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;

my $G = 10_000_000_000_000;
my %shard = (c1 => 1, c2 => 2, c3 => 3);
sub gid { my ($inst, $id) = @_; return undef unless defined $id; return $id >= $G ? $id : $shard{$inst} * $G + $id; }

sub int64 { return { type => 'integer', format => 'int64' }; }
sub str { return { type => 'string' }; }
sub schema
{
	my (%value) = @_;
	return { version => 1, schema => { type => 'object', properties => {
		key => { type => 'object', properties => { id => int64() }, required => ['id'] },
		value => { type => 'object', properties => \%value },
		meta => { type => 'object', properties => { ts => { type => 'string', format => 'date-time' } } } } } };
}
my %schemas = (
	users => schema(name => str(), workflow_state => { type => 'string', enum => [qw(pre_registered registered deleted)] },
		deleted_at => { type => 'string', format => 'date-time' }, merged_into_user_id => int64()),
	pseudonyms => schema(user_id => int64(), unique_id => str(), workflow_state => str()),
	enrollments => schema(user_id => int64(), course_section_id => int64(), role_id => int64(), type => str(),
		workflow_state => str(), sis_pseudonym_id => int64()),
	submissions => schema(assignment_id => int64(), user_id => int64(), grader_id => int64(),
		score => { type => 'number' }, workflow_state => str()));

sub user { my ($id, $name, %o) = @_; return { key => { id => $id }, value => { name => $name, workflow_state => 'registered', %o } }; }
sub login { my ($id, $user) = @_; return { key => { id => $id }, value => { user_id => $user, unique_id => "login$id", workflow_state => 'active' } }; }
sub enr
{
	my ($id, $user, $section, %o) = @_;
	return { key => { id => $id }, value => { user_id => $user, course_section_id => $section, role_id => 1,
		type => 'StudentEnrollment', workflow_state => 'active', %o } };
}
sub sub_ { my ($id, $user, $asg, %o) = @_; return { key => { id => $id }, value => { user_id => $user, assignment_id => $asg, workflow_state => 'submitted', score => 1.5, %o } }; }

my %data = (
	c1 => {
		users => [ map { user(@$_) } [ 1, 'Ann' ], [ 2, 'Bob' ], [ 3, 'Cat' ], [ 5, 'Eve' ], [ 6, 'Fay' ], [ 7, 'Gus' ] ],
		pseudonyms => [ map { login($_, $_) } 1, 2, 3, 6, 7 ],
		enrollments => [ map { enr($_, $_, 100) } 1, 2, 3, 5, 6, 7 ],
		submissions => [ sub_(1, 1, 500, grader_id => 3), sub_(2, 2, 500), sub_(3, 3, 501) ],
	},
	c2 => {
		users => [ user(20, 'Zed') ], pseudonyms => [ login(20, 20) ],
		enrollments => [ enr(20, 20, 200) ], submissions => [ sub_(20, 20, 600) ],
	},
	c3 => {
		users => [ user(30, 'Quinn') ], pseudonyms => [ login(30, 30) ],
		enrollments => [ enr(31, 1 * $G + 1, 300), enr(30, 30, 300) ],
		submissions => [ sub_(31, 1 * $G + 1, 700, grader_id => 30), sub_(32, 1 * $G + 1, 701, grader_id => 1 * $G + 1) ],
	},
);
my %scenario = (start => '2026-11-01T00:00:00Z', instances => {});
for my $i (sort keys %data)
{
	$scenario{instances}{"us-east-1#$i"} = { secret => "$i-secret",
		tables => { map { $_ => { %{ $schemas{$_} }, rows => $data{$i}{$_} } } keys %schemas } };
}

my $emu = Cd2Test::start_emulator();
$emu->post('/_emu/load', \%scenario);
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('consortium', conf => "track_functions = 'pl'");
for my $i (sort keys %shard)
{
	$node->safe_psql('postgres', "SET log_statement = 'none';\n"
		  . "SELECT cd2_add_instance('$i', 'us-east-1#$i', '$i-secret', api_url => '$emu->{url}', shard_id => $shard{$i})");
}

# A change feed follows both reconciled tables from before the first sync
$node->safe_psql('postgres', "SELECT cd2_create_feed('sis', tables => ARRAY['enrollments', 'submissions'])");

# Replaying a feed from its start gives exactly the rows of the views
sub feed_is_exact
{
	my ($feed, $label, @tables) = @_;
	my $views = join(' UNION ALL ', map { "SELECT '$_'::text AS table_name, to_jsonb(v) AS r FROM cd2.$_ v" } @tables);
	is($node->safe_psql('postgres', qq{
		WITH c AS (SELECT * FROM cd2_feed_read('$feed', 100000000)),
		     last AS (SELECT DISTINCT ON (table_name, instance, key) * FROM c
		               ORDER BY table_name, instance, key, position DESC),
		     replayed AS (SELECT table_name, "row" AS r FROM last WHERE op <> 'delete'),
		     actual AS ($views)
		SELECT (SELECT count(*) FROM (SELECT * FROM actual EXCEPT ALL SELECT * FROM replayed) x) || ' missing, '
		    || (SELECT count(*) FROM (SELECT * FROM replayed EXCEPT ALL SELECT * FROM actual) y) || ' extra'}),
		'0 missing, 0 extra', "$label: feed $feed replays to the views");
}

# The changes of feed sis since the last call: "table|op|instance|id|changed|cause" lines
my $feed_seen = 0;
sub new_changes
{
	my $out = $node->safe_psql('postgres',
		"SELECT position, table_name, op, instance, key->>'id', coalesce(changed::text, ''), cause "
		  . "FROM cd2_feed_read('sis', 100000000) WHERE position > $feed_seen ORDER BY position");
	my @lines;
	for (split /\n/, $out)
	{
		my ($pos, @rest) = split /\|/, $_, -1;
		$feed_seen = $pos;
		push @lines, join('|', @rest);
	}
	return \@lines;
}
sub changes_of { my ($changes, $table, $id) = @_; return [ grep { (split /\|/)[0] eq $table && (split /\|/)[3] == $id } @$changes ]; }

# Changes, as the emulator's epochs; %data follows them for the expected values
sub change
{
	my (@changes) = @_;
	my @epoch;
	for my $c (@changes)
	{
		my ($inst, $table, @rows) = @$c;
		for my $row (@rows)
		{
			my ($old) = grep { $_->{key}{id} == $row->{key}{id} } @{ $data{$inst}{$table} };
			if ($old) { $old->{value} = $row->{value}; } else { push @{ $data{$inst}{$table} }, $row; }
		}
		push @epoch, { client_id => "us-east-1#$inst", table => $table, upsert => \@rows };
	}
	$emu->epoch(@epoch);
}
sub row_of { my ($inst, $table, $id) = @_; my ($r) = grep { $_->{key}{id} == $id } @{ $data{$inst}{$table} }; return { key => { id => $id }, value => { %{ $r->{value} } } }; }
sub with { my ($row, %set) = @_; $row->{value}{$_} = $set{$_} for keys %set; return $row; }

sub sync_all
{
	for my $i (sort keys %shard)
	{
		my $r = Cd2Test::sync($node, $i);
		is(join(',', map { $r->{$_}{error} } sort keys %$r), ',,,', "$i synced without error");
	}
}

# Checks the map, the resolver function and both reconciled views
sub check
{
	my ($label, %merges) = @_;    # superseded => [replacement, chain, evidence]
	my $got = $node->safe_psql('postgres',
		"SELECT superseded_user_id, replacement_user_id, chain_length, evidence FROM cd2.user_merges ORDER BY 1");
	my $want = join("\n", map { join('|', $_, @{ $merges{$_} }) } sort { $a <=> $b } keys %merges);
	is($got, $want, "$label: cd2.user_merges");
	my $resolve = sub { my ($u) = @_; return undef unless defined $u; return exists $merges{$u} ? $merges{$u}[0] : $u; };

	for my $u (keys %merges, 1 * $G + 6, 30 * $G)
	{
		is($node->safe_psql('postgres', "SELECT cd2_resolve_user($u)"), $resolve->($u), "$label: cd2_resolve_user($u)");
	}

	# enrollments: every row of every instance, global ids, resolved users, duplicates flagged
	my @exp;
	for my $i (sort keys %data)
	{
		for my $e (@{ $data{$i}{enrollments} })
		{
			my $orig = gid($i, $e->{value}{user_id});
			my $res = $resolve->($orig);
			my $dup = ($res != $orig && grep {
				$_ != $e && gid($i, $_->{value}{user_id}) == $res
				  && $_->{value}{course_section_id} == $e->{value}{course_section_id}
			} @{ $data{$i}{enrollments} }) ? 't' : 'f';
			push @exp, join('|', $i, gid($i, $e->{key}{id}), $res, $orig, gid($i, $e->{value}{course_section_id}), $dup);
		}
	}
	is($node->safe_psql('postgres',
		"SELECT instance, id, user_id, original_user_id, course_section_id, cd2_merge_duplicate FROM cd2.enrollments ORDER BY instance, id"),
		join("\n", sort @exp), "$label: every row of cd2.enrollments");

	@exp = ();
	for my $i (sort keys %data)
	{
		for my $s (@{ $data{$i}{submissions} })
		{
			my ($u, $gr) = (gid($i, $s->{value}{user_id}), gid($i, $s->{value}{grader_id}));
			push @exp, join('|', $i, gid($i, $s->{key}{id}), $resolve->($u), $u, $resolve->($gr) // '', $gr // '');
		}
	}
	is($node->safe_psql('postgres',
		"SELECT instance, id, user_id, original_user_id, grader_id, original_grader_id FROM cd2.submissions ORDER BY instance, id"),
		join("\n", sort @exp), "$label: every row of cd2.submissions");
	feed_is_exact('sis', $label, 'enrollments', 'submissions');
}

sync_all();
check('epoch 0');
my $ch = new_changes();
is(scalar(grep { /\|insert\|/ && /\|sync$/ } @$ch), scalar(@$ch), 'epoch 0: the first syncs are inserts, cause sync');

# epoch 1: Ann (c1 user 1) moves home to c2 as user 10; her login and a
# submission move with her; her conflicting enrolment stays, soft-deleted, on
# the old user; c3's references to her move only in epoch 2
my $ann = 2 * $G + 10;
change([ 'c2', 'users', user(10, 'Ann') ],
	[ 'c1', 'users', with(row_of('c1', 'users', 1), workflow_state => 'deleted', deleted_at => '2026-11-01T00:30:00Z', merged_into_user_id => $ann) ],
	[ 'c1', 'pseudonyms', with(row_of('c1', 'pseudonyms', 1), user_id => $ann) ],
	[ 'c1', 'enrollments', enr(8, $ann, 100), with(row_of('c1', 'enrollments', 1), workflow_state => 'deleted') ],
	[ 'c1', 'submissions', with(row_of('c1', 'submissions', 1), user_id => $ann) ]);
# while c1's sync refreshes the map, a sync of c3 runs (its lock is held):
# c1 leaves c3's rows to c3 (waiting on its row locks could deadlock)
my $c3_sync = $node->background_psql('postgres');
$c3_sync->query_safe("SELECT pg_advisory_lock(52517, hashtext('c3'))");
my $r1 = Cd2Test::sync($node, 'c1');
is(join(',', map { $r1->{$_}{error} } sort keys %$r1), ',,,', 'c1 synced without error while c3 is locked');
is($node->safe_psql('postgres', "SELECT instance FROM cd2sync.resolve_due"), 'c3', 'c3 is due for the new map');
is($node->safe_psql('postgres', "SELECT user_id FROM cd2.enrollments WHERE id = @{[3 * $G + 31]}"), 1 * $G + 1,
	'and its rows wait for it');
# (nor can its shard change under its sync: the ids its capture writes)
my ($rc, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\nSELECT cd2_alter_instance('c3', shard_id => 4)");
like($err, qr/ERROR:  55006: a sync of cd2sync instance "c3" is running/, 'a shard change is refused while the instance syncs');
$c3_sync->quit;
# c3's own run brings them up to date, as it begins (before another
# instance's sync could, in its refresh of the map)
my $r3 = Cd2Test::sync($node, 'c3');
is(join(',', map { $r3->{$_}{error} } sort keys %$r3), ',,,', 'c3 synced without error');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.resolve_due"), '0', 'c3\'s run did what was due');
sync_all();
my %m = ((1 * $G + 1) => [ $ann, 1, 'users.merged_into_user_id' ]);
check('epoch 1 (cross-instance merge, references lag on c3)', %m);
$ch = new_changes();
is_deeply(changes_of($ch, 'enrollments', 3 * $G + 31), [ "enrollments|update|c3|@{[3 * $G + 31]}|{user_id}|merge" ],
	'epoch 1: the lagging enrolment on c3 gets one update, cause merge, user_id changed');
is_deeply(changes_of($ch, 'submissions', 3 * $G + 31), [ "submissions|update|c3|@{[3 * $G + 31]}|{user_id}|merge" ],
	'epoch 1: the lagging submission on c3 too');
# (the run that brings c3 up to the map writes each user column by a
# statement of its own: still one update per row)
is_deeply(changes_of($ch, 'submissions', 3 * $G + 32),
	[ "submissions|update|c3|@{[3 * $G + 32]}|{grader_id,user_id}|merge" ],
	'epoch 1: a lagging submission whose user and grader both merged gets one update, both columns changed');

# two refreshes of the duplicates at once (two instances' syncs ending
# together): the second waits for the first, and both succeed (the second
# inserted the set the first had just inserted: a key violation)
my $dups = $node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.merge_duplicates WHERE table_name = 'enrollments'");
ok($dups > 0, 'epoch 1: a duplicate is recorded');
my $refresh1 = $node->background_psql('postgres');
$refresh1->query_safe("BEGIN; SELECT cd2sync._refresh_merge_duplicates('enrollments')");
my $refresh2 = $node->background_psql('postgres', on_error_stop => 0);
$refresh2->query_until(qr/refreshing/, "\\echo refreshing\nSELECT cd2sync._refresh_merge_duplicates('enrollments');\n");
ok($node->poll_query_until('postgres', "SELECT count(*) > 0 FROM pg_stat_activity "
	  . "WHERE wait_event_type = 'Lock' AND query LIKE '%_refresh_merge_duplicates%'"),
	'a second refresh of the duplicates waits for the first');
$refresh1->query_safe('COMMIT');
$refresh2->query('SELECT 1');
is($refresh2->{stderr}, '', 'and then succeeds');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.merge_duplicates WHERE table_name = 'enrollments'"), $dups,
	'with the same set');
$refresh1->quit;
$refresh2->quit;

# epoch 2: c3's references catch up; Bob merged into Cat (chain, first step);
# Fay's enrolment moves to a new user but Fay stays active (a failed merge);
# Gus merged into a new user 4 (split next epoch); a reference to a user
# whose row has not arrived anywhere yet
change([ 'c3', 'enrollments', with(row_of('c3', 'enrollments', 31), user_id => $ann), enr(32, 3 * $G + 99, 300) ],
	[ 'c3', 'submissions', with(row_of('c3', 'submissions', 31), user_id => $ann) ],
	[ 'c1', 'users', with(row_of('c1', 'users', 2), workflow_state => 'deleted', deleted_at => '2026-11-01T01:30:00Z', merged_into_user_id => 3),
		user(4, 'Gus2'), with(row_of('c1', 'users', 7), workflow_state => 'deleted', deleted_at => '2026-11-01T01:40:00Z', merged_into_user_id => 4) ],
	[ 'c1', 'pseudonyms', with(row_of('c1', 'pseudonyms', 2), user_id => 3), login(4, 4), with(row_of('c1', 'pseudonyms', 7), user_id => 4) ],
	[ 'c1', 'enrollments', with(row_of('c1', 'enrollments', 2), user_id => 3), with(row_of('c1', 'enrollments', 6), user_id => 2 * $G + 12) ],
	[ 'c2', 'users', user(12, 'Fay2') ]);
sync_all();
$m{ 1 * $G + 2 } = [ 1 * $G + 3, 1, 'users.merged_into_user_id' ];
$m{ 1 * $G + 7 } = [ 1 * $G + 4, 1, 'users.merged_into_user_id' ];
check('epoch 2 (chain step, failed merge, merge to be split)', %m);
$ch = new_changes();
is_deeply(changes_of($ch, 'enrollments', 3 * $G + 31), [ "enrollments|update|c3|@{[3 * $G + 31]}|{original_user_id}|sync" ],
	'epoch 2: the enrolment moved upstream to the user the view showed: only original_user_id changes, no merge update');
is($node->safe_psql('postgres', "SELECT unknown_users FROM cd2.reconciliation_health WHERE instance = 'c3' AND table_name = 'enrollments' AND column_name = 'user_id'"),
	'1', 'health: the reference to a user not arrived yet is counted');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2.enrollments WHERE user_id = " . (3 * $G + 99)), '1',
	'the row referencing an unknown user is kept');

# epoch 3: Cat merged into a new c2 user 11 (the chain Bob -> Cat -> 11);
# Gus's merge is split (Gus active again, the pointer left set); the unknown
# user arrives
my $cat2 = 2 * $G + 11;
change([ 'c2', 'users', user(11, 'Cat2') ],
	[ 'c1', 'users', with(row_of('c1', 'users', 3), workflow_state => 'deleted', deleted_at => '2026-11-01T02:30:00Z', merged_into_user_id => $cat2),
		with(row_of('c1', 'users', 7), workflow_state => 'registered', deleted_at => undef) ],
	[ 'c1', 'pseudonyms', with(row_of('c1', 'pseudonyms', 2), user_id => $cat2), with(row_of('c1', 'pseudonyms', 3), user_id => $cat2),
		with(row_of('c1', 'pseudonyms', 7), user_id => 7) ],
	[ 'c3', 'users', user(99, 'Newbie') ]);
sync_all();
$m{ 1 * $G + 2 } = [ $cat2, 2, 'users.merged_into_user_id' ];
$m{ 1 * $G + 3 } = [ $cat2, 1, 'users.merged_into_user_id' ];
delete $m{ 1 * $G + 7 };
check('epoch 3 (chain of two, split, late user)', %m);
is($node->safe_psql('postgres', "SELECT instance, table_name, column_name, unknown_users FROM cd2.reconciliation_health WHERE unknown_users > 0"),
	'', 'health: no unknown user left');
ok($node->safe_psql('postgres', "SELECT sum(waiting_merges) FROM cd2.reconciliation_health WHERE instance = 'c1'") > 0,
	'health: references still on superseded users are counted');

# epoch 4: Eve's merge is seen before her user row changes: her enrolment's
# SIS login belongs to a new c2 user, and Eve has no active login
change([ 'c2', 'users', user(13, 'Eve2') ],
	[ 'c1', 'pseudonyms', login(5, 2 * $G + 13) ],
	[ 'c1', 'enrollments', with(row_of('c1', 'enrollments', 5), sis_pseudonym_id => 5) ]);
sync_all();
$m{ 1 * $G + 5 } = [ 2 * $G + 13, 1, 'enrollments.sis_pseudonym_id' ];
check('epoch 4 (merge seen through the SIS login)', %m);

# epoch 5: two deleted users pointing at each other (a cycle): no mapping,
# no hang, their rows stay on the users as stored
change([ 'c2', 'users', user(21, 'Yan', workflow_state => 'deleted', merged_into_user_id => 20),
	with(row_of('c2', 'users', 20), workflow_state => 'deleted', merged_into_user_id => 21) ]);
sync_all();
check('epoch 5 (a cycle)', %m);

# epoch 6: the login Gus took back at his split is deleted. With no active
# login he is still himself: his login's move to Gus2 was undone by its
# move back, and is no evidence of a merge any more
change([ 'c1', 'pseudonyms', with(row_of('c1', 'pseudonyms', 7), workflow_state => 'deleted') ]);
sync_all();
check('epoch 6 (a split user\'s login deleted)', %m);

# the map is recomputed only by a sync that changed one of its inputs
my $refreshes = sub {
	$node->safe_psql('postgres', "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions "
		  . "WHERE schemaname = 'cd2sync' AND funcname = '_refresh_user_merges'");
};
my $before = $refreshes->();
new_changes();
sync_all();
is($refreshes->() - $before, 0, 'runs that change no user, login or enrolment leave the map alone');
is_deeply(new_changes(), [], 'runs that change nothing publish no change');
$node->safe_psql('postgres', "SELECT * FROM cd2_sync_now('$_', \"full\" => true)") for sort keys %shard;
is_deeply(new_changes(), [], 'a full resync of unchanged data publishes no change');
change([ 'c3', 'users', user(30, 'Quinn Q') ]);
sync_all();
is($refreshes->() - $before, 1, 'a run that changes users recomputes it once');
check('after a rename', %m);

# the moves seen at apply time are kept
ok($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.user_moves WHERE table_name = 'pseudonyms'") >= 4,
	'login moves are recorded when they are applied');

# A feed's whole history: no key was ever deleted, or inserted twice
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('sis', 100000000) WHERE op = 'delete'"), '0',
	'no enrolment or submission disappeared from the feed on the way');
is($node->safe_psql('postgres', "SELECT count(*) FROM (SELECT 1 FROM cd2_feed_read('sis', 100000000) WHERE op = 'insert' "
	  . "GROUP BY table_name, instance, key HAVING count(*) > 1) x"), '0', 'no key inserted twice');

# A feed created from the start begins with the current rows; both go on
$node->safe_psql('postgres', "SELECT cd2_create_feed('late', tables => ARRAY['enrollments'], from_start => true)");
is($node->safe_psql('postgres', "SELECT count(*) FILTER (WHERE op = 'insert' AND cause = 'start' AND watermark IS NULL), count(*) "
	  . "FROM cd2_feed_read('late')"),
	$node->safe_psql('postgres', "SELECT count(*), count(*) FROM cd2.enrollments"), 'from_start: one start insert per row');
feed_is_exact('late', 'from_start', 'enrollments');
change([ 'c2', 'users', with(row_of('c2', 'users', 11), workflow_state => 'deleted', merged_into_user_id => 2 * $G + 13) ],
	[ 'c1', 'enrollments', enr(9, 1, 101) ]);
sync_all();
feed_is_exact('late', 'after a merge of Cat2 into Eve2', 'enrollments');
feed_is_exact('sis', 'after a merge of Cat2 into Eve2', 'enrollments', 'submissions');
$ch = new_changes();
ok(scalar(grep { /\|merge$/ } @$ch) >= 2, 'the rows of the merged user get merge updates');

# Acknowledging: everything up to a position is processed; less is a no-op
my ($last) = $node->safe_psql('postgres', "SELECT max(position) FROM cd2_feed_read('sis', 100000000)");
$node->safe_psql('postgres', "SELECT cd2_feed_ack('sis', $last)");
$node->safe_psql('postgres', "SELECT cd2_feed_ack('sis', 1)");
is($node->safe_psql('postgres', "SELECT acknowledged, pending, status FROM cd2sync.feeds WHERE name = 'sis'"),
	"$last|0|ok", 'acknowledged: nothing pending, and acknowledging less changes nothing');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2_feed_read('sis')"), '0', 'read after the acknowledged position');
# (by the next sweep: a sync's end, the scheduler's look)
$node->safe_psql('postgres', "SELECT cd2sync._feed_sweep()");
ok($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.changes WHERE feed IS NULL AND table_name = 'submissions'") == 0,
	'changes every feed acknowledged are forgotten');

$node->stop;
$emu->stop;
done_testing();
