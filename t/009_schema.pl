# Schema evolution end to end: upstream bumps a table's schema version with a
# new column, a new enum value and a removed column, while a user's view
# depends on the table (and on the removed column). The table is altered in
# place, the view keeps working, the new column and enum value are filled,
# and the removed column is kept and no longer filled.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $cid = 'us-east-1#evolve';
sub schema
{
	my ($version, %value) = @_;
	return { version => $version, schema => { type => 'object', properties => {
		key => { type => 'object', properties => { id => { type => 'integer', format => 'int64' } } },
		value => { type => 'object', properties => \%value } } } };
}
my %v1 = (name => { type => 'string' }, state => { type => 'string', enum => [qw(active deleted)] },
	legacy => { type => 'string' });
my %v2 = (name => { type => 'string' }, state => { type => 'string', enum => [qw(active deleted archived)] },
	score => { type => 'number' }, rank => { type => 'integer', format => 'int32' });
# version 3: score becomes a string (no in-place conversion: a fresh
# snapshot), rank an int64 (a widening, in place)
my %v3 = (%v2, score => { type => 'string' }, rank => { type => 'integer', format => 'int64' });
my $s1 = schema(1, %v1);
my @rows = map { { key => { id => $_ }, value => { name => "n$_", state => 'active', legacy => "old$_" } } } 1 .. 4;

my $emu = Cd2Test::start_emulator();
$emu->post('/_emu/load', { start => '2026-11-01T00:00:00Z',
	instances => { $cid => { secret => 's', tables => { things => { %$s1, rows => \@rows } } } } });
$emu->config(job_latency => 0.05);
my $node = Cd2Test::new_node('schema');
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('evo', '$cid', 's', api_url => '$emu->{url}')");
my $r = Cd2Test::sync($node, 'evo');
is($r->{things}{mode}, 'snapshot', 'version 1 synced');
$node->safe_psql('postgres', "CREATE VIEW public.my_things AS SELECT id, name, state, legacy FROM evo.things");

# the same snapshot through the staging table (cd2sync.direct_load = off) gives the same rows
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('evo_staged', '$cid', 's', api_url => '$emu->{url}')");
$r = Cd2Test::sync($node, 'evo_staged', pre => "SET cd2sync.direct_load = off;");
is($r->{things}{mode}, 'snapshot', 'snapshot through the staging table');
is($node->safe_psql('postgres', "SELECT count(*) FROM ("
	  . "(SELECT row_to_json(t)::text FROM evo.things t EXCEPT ALL SELECT row_to_json(t)::text FROM evo_staged.things t) UNION ALL "
	  . "(SELECT row_to_json(t)::text FROM evo_staged.things t EXCEPT ALL SELECT row_to_json(t)::text FROM evo.things t)) d"), '0',
	'direct and staged loads give the same rows');
$node->safe_psql('postgres', "SELECT cd2_drop_instance('evo_staged', drop_data => true)");

# version 2: score added, archived added to the enum, legacy removed
$emu->epoch({ client_id => $cid, table => 'things', schema => schema(2, %v2),
	upsert => [ { key => { id => 1 }, value => { name => 'n1', state => 'archived', score => 2.5, rank => 7 } },
		{ key => { id => 5 }, value => { name => 'n5', state => 'active', score => 1 } } ] });
$r = Cd2Test::sync($node, 'evo');
is($r->{things}{error}, '', 'version 2 synced without error');
is($r->{things}{mode}, 'incremental', 'in place, incrementally');
is($node->safe_psql('postgres', "SELECT schema_version FROM cd2sync.watermarks WHERE table_name = 'things'"), '2',
	'the schema version is recorded');
is($node->safe_psql('postgres', "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'evo.things'::regclass AND attnum > 0 AND NOT attisdropped"),
	'id,legacy,name,state,rank,score', 'rank and score added at the end; legacy kept');
is($node->safe_psql('postgres', "SELECT enum_range(NULL::evo.things__state)::text"), '{active,deleted,archived}',
	'the enum has the new value');
is($node->safe_psql('postgres', "SELECT string_agg(format('%s:%s:%s:%s:%s', id, name, state, coalesce(legacy, '-'), coalesce(score::text, '-')), ' ' ORDER BY id) FROM evo.things"),
	'1:n1:archived:old1:2.5 2:n2:active:old2:- 3:n3:active:old3:- 4:n4:active:old4:- 5:n5:active:-:1',
	'new values arrive; the removed column keeps its old values and is not filled');
is($node->safe_psql('postgres', "SELECT count(*) FROM public.my_things"), '5', 'the user\'s view still works');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2.things WHERE score IS NOT NULL"), '2',
	'the reconciled view has the new column');


# version 3, while views of the user (one on another, with a grant and
# comments) use the columns whose types change
$node->safe_psql('postgres', q{
	CREATE ROLE analyst;
	CREATE VIEW public.scores WITH (security_barrier) AS SELECT id, score, rank FROM evo.things;
	CREATE VIEW public.top_scores AS SELECT id, score FROM public.scores WHERE rank IS NOT NULL;
	GRANT SELECT ON public.top_scores TO analyst;
	GRANT SELECT (id, score) ON public.scores TO analyst;
	COMMENT ON VIEW public.top_scores IS 'ranked things';
	COMMENT ON COLUMN public.top_scores.score IS 'the score';
	CREATE INDEX things_rank ON evo.things (rank);
});
# a change feed follows the table through it
$node->safe_psql('postgres', "SELECT cd2_create_feed('evo_feed', tables => ARRAY['things'])");
$emu->epoch({ client_id => $cid, table => 'things', schema => schema(3, %v3),
	upsert => [ { key => { id => 2 }, value => { name => 'n2', state => 'active', score => 'high', rank => 3000000000 } } ] });
# the snapshot's download hangs 10 s: readers are not locked out meanwhile
# (the types change only once everything is downloaded); they read for 6 s
# of it, a margin for a loaded machine
$emu->faults({ endpoint => 'download', kind => 'hang', seconds => 10, times => 1 });
my $rows_before = $node->safe_psql('postgres', "SELECT count(*) FROM evo.things");
my $run = $node->safe_psql('postgres', "SELECT cd2_sync_start('evo')");
my ($reads, $blocked) = (0, 0);
my $t0 = time;
while (time - $t0 < 6)
{
	my ($rc, $out, $err) = $node->psql('postgres', "SET lock_timeout = '500ms'; SELECT count(*) FROM evo.things");
	if ($rc == 0) { $reads++ } else { $blocked++ }
	select(undef, undef, undef, 0.1);
}
ok($reads >= 3 && $blocked == 0, "readers read the table during the snapshot's download ($reads reads, $blocked blocked)");
ok($node->poll_query_until('postgres', "SELECT status <> 'running' FROM cd2sync.runs WHERE run_id = $run"), 'the run ended');
$emu->clear_faults;
$r = { things => { map { my @f = split /\|/; (mode => $f[0], error => $f[1] // '') }
	$node->safe_psql('postgres', "SELECT mode, coalesce(error, '') FROM cd2sync.sync_log WHERE run_id = $run") } };
is($r->{things}{error}, '', 'version 3 synced without error');
is($r->{things}{mode}, 'snapshot', 'a type that cannot change in place: a fresh snapshot');
is($node->safe_psql('postgres', "SELECT rows_deleted FROM cd2sync.sync_log WHERE run_id = $run"),
	$rows_before, "the log counts the $rows_before rows the type change emptied");
is($node->safe_psql('postgres', "SELECT count(*) FILTER (WHERE op = 'delete') || ' ' || string_agg(DISTINCT cause, ',') "
	  . "FROM cd2_feed_read('evo_feed', 1000)"),
	"$rows_before resync", 'a feed has the reload as a resync: every row deleted, then written again');
is($node->safe_psql('postgres', q{
	WITH c AS (SELECT * FROM cd2_feed_read('evo_feed', 1000)),
	     last AS (SELECT DISTINCT ON (key) * FROM c ORDER BY key, position DESC)
	SELECT string_agg(format('%s:%s:%s', "row"->>'id', coalesce("row"->>'score', '-'), coalesce("row"->>'rank', '-')), ' '
	                  ORDER BY ("row"->>'id')::int) FROM last WHERE op <> 'delete'}),
	'1:2.5:7 2:high:3000000000 3:-:- 4:-:- 5:1:-', 'and replayed it gives the reloaded rows');
$node->safe_psql('postgres', "SELECT cd2_drop_feed('evo_feed')");
is($node->safe_psql('postgres', "SELECT has_column_privilege('analyst', 'public.scores', 'score', 'SELECT')::text || has_column_privilege('analyst', 'public.scores', 'rank', 'SELECT')::text"),
	'truefalse', 'column privileges on a view created again survive');
is($node->safe_psql('postgres', "SELECT string_agg(format('%s %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'evo.things'::regclass AND attnum > 4 AND NOT attisdropped"),
	'rank bigint, score text', 'score is text now, rank bigint');
is($node->safe_psql('postgres', "SELECT string_agg(format('%s:%s:%s', id, coalesce(score, '-'), coalesce(rank::text, '-')), ' ' ORDER BY id) FROM evo.things"),
	'1:2.5:7 2:high:3000000000 3:-:- 4:-:- 5:1:-', 'the rows are those of the fresh snapshot, with the new types');
is($node->safe_psql('postgres', "SELECT string_agg(format('%s:%s', id, score), ' ' ORDER BY id) FROM public.top_scores"),
	'1:2.5 2:high', 'the user\'s views on the changed columns were created again and work');
is($node->safe_psql('postgres', "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'public.top_scores'::regclass AND attname = 'score'"),
	'text', 'they follow the new type');
is($node->safe_psql('postgres', "SELECT has_table_privilege('analyst', 'public.top_scores', 'SELECT')::text || ' ' || obj_description('public.top_scores'::regclass, 'pg_class') || ' ' || col_description('public.top_scores'::regclass, 2) || ' ' || array_to_string((SELECT reloptions FROM pg_class WHERE oid = 'public.scores'::regclass), ',')"),
	'true ranked things the score security_barrier=true', 'their grants, comments and options survive');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_indexes WHERE indexname = 'things_rank'"), '1', 'the user\'s index survives');
is($node->safe_psql('postgres', "SELECT count(*) FROM public.my_things"), '5', 'the older view still works');
is($node->safe_psql('postgres', "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'cd2.things'::regclass AND attname = 'score'"),
	'text', 'the reconciled view follows');
is($node->safe_psql('postgres', "SELECT coalesce(pending_types::text, 'none') FROM cd2sync.table_state WHERE table_name = 'things'"),
	'none', 'no type change is left pending');
$r = Cd2Test::sync($node, 'evo');
is($r->{things}{mode}, 'unchanged', 'the next sync is an incremental again');

$node->stop;
$emu->stop;
done_testing();
