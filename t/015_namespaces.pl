# Every CD2 namespace: canvas_logs (web_logs), new_quizzes and catalog next
# to canvas. Tables are named "ns.table" wherever cd2sync takes or shows a
# table, "ns.*" stands for every table the API lists in ns; their data lands
# in <target_schema>_<ns>, their reconciled views in cd2_<ns>, with global ids
# and users resolved as in cd2. A namespace the credential may not read
# fails its own tables and leaves the others alone.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;
use List::Util qw(uniq);

my $emu = Cd2Test::start_emulator(generate => 'demo');
$emu->config(job_latency => 0.05, dedupe_jobs => JSON::PP::false);
my $node = Cd2Test::new_node('namespaces');
my ($north, $south) = ('us-east-1#demo-north', 'us-east-1#demo-south');
my %ns_tables = (
	'canvas_logs.web_logs' => [ 'north_canvas_logs', 'web_logs' ],
	'new_quizzes.quizzes' => [ 'north_new_quizzes', 'quizzes' ],
	'new_quizzes.quiz_sessions' => [ 'north_new_quizzes', 'quiz_sessions' ],
	'catalog.products' => [ 'north_catalog', 'products' ],
	'catalog.enrollments' => [ 'north_catalog', 'enrollments' ]);

sub sq { return $node->safe_psql('postgres', $_[0]); }

# 1. names: checked, stored as given ("canvas." dropped), unknown namespaces refused
my ($rc, $out, $err) = $node->psql('postgres',
	"SELECT cd2_add_instance('x', 'id', 's', api_url => 'http://127.0.0.1:9', tables => ARRAY['nope.users'])");
like($err, qr/invalid table name 'nope\.users'/, 'an unknown namespace is refused');
($rc, $out, $err) = $node->psql('postgres',
	"SELECT cd2_add_instance('x', 'id', 's', api_url => 'http://127.0.0.1:9', tables => ARRAY['canvas_logs.web logs'])");
like($err, qr/invalid table name/, 'a bad table name in a namespace is refused');
sq("SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', shard_id => 1, "
	  . "tables => ARRAY['canvas.users', 'courses', 'enrollments', 'canvas_logs.web_logs', 'new_quizzes.*', "
	  . "'catalog.products', 'catalog.enrollments'], keep_logs => interval '90 days');\n"
	  . "SELECT cd2_add_instance('south', '$south', 'south-secret', api_url => '$emu->{url}', shard_id => 2)");
is(sq("SELECT array_to_string(tables, ' '), keep_logs FROM cd2sync.instances WHERE name = 'north'"),
	'canvas_logs.web_logs catalog.enrollments catalog.products courses enrollments new_quizzes.* users|90 days',
	'tables stored once each, sorted, canvas tables by their bare name; keep_logs kept');
($rc, $out, $err) = $node->psql('postgres',
	"SELECT cd2_add_instance('nc', 'id', 's', api_url => 'http://127.0.0.1:9', target_schema => 'north_catalog')");
like($err, qr/schema "north_catalog" is already the target of another instance/,
	'a target schema that is another instance\'s namespace schema is refused');
($rc, $out, $err) = $node->psql('postgres',
	"SELECT cd2_add_instance('v', 'id', 's', api_url => 'http://127.0.0.1:9', target_schema => 'cd2_catalog')");
like($err, qr/target_schema "cd2_catalog" cannot be used/, 'the schema of a namespace\'s views is refused');
# south syncs every canvas table: another namespace is not configured for it
($rc, $out, $err) = $node->psql('postgres',
	"SELECT * FROM cd2_sync_now('south', tables => ARRAY['canvas_logs.web_logs'])");
like($err, qr/table "canvas_logs\.web_logs" is not configured for cd2sync instance "south"/,
	'tables => NULL means the canvas tables only');

# 2. a sync of every namespace
my $r = Cd2Test::sync($node, 'north');
is(join(' ', sort keys %$r),
	'canvas_logs.web_logs catalog.enrollments catalog.products courses enrollments new_quizzes.quiz_sessions '
	  . 'new_quizzes.quizzes users',
	'the run syncs each table under its name, "new_quizzes.*" as the tables the API lists');
is(join(' ', map { "$_:$r->{$_}{mode}$r->{$_}{error}" } grep { $r->{$_}{mode} ne 'snapshot' || $r->{$_}{error} } sort keys %$r),
	'', 'every table took a snapshot without error');
for my $t (sort keys %ns_tables)
{
	my ($schema, $rel) = @{ $ns_tables{$t} };
	Cd2Test::table_is($node, $emu, $north, $schema, $rel, "$t lands in $schema.$rel",
		cd2 => $t, window => $t =~ /^canvas_logs/);
}
Cd2Test::table_is($node, $emu, $north, 'north', 'enrollments', 'canvas enrollments stay in the target schema');
ok(sq("SELECT count(*) FROM north_catalog.enrollments") > 0
	  && sq("SELECT count(*) FROM north_catalog.enrollments") ne sq("SELECT count(*) FROM north.enrollments"),
	'catalog.enrollments and enrollments are different tables');
is(sq("SELECT string_agg(table_name || '=' || (watermark IS NOT NULL)::text, ' ' ORDER BY table_name) "
	  . "FROM cd2sync.watermarks WHERE instance = 'north' AND table_name LIKE '%.%'"),
	'canvas_logs.web_logs=true catalog.enrollments=true catalog.products=true new_quizzes.quiz_sessions=true '
	  . 'new_quizzes.quizzes=true',
	'cd2sync.watermarks names them ns.table');
is(sq("SELECT cd2_watermark('north', 'canvas_logs.web_logs') = watermark FROM cd2sync.table_state "
	  . "WHERE instance = 'north' AND table_name = 'canvas_logs.web_logs'"), 't', 'cd2_watermark takes ns.table');
is(sq("SELECT count(*) FROM cd2sync.sync_log WHERE table_name = 'canvas_logs.web_logs' AND status = 'ok'"), '1',
	'cd2sync.sync_log names them ns.table');
# the API's names in the API's paths
my @paths = map { $_->{path} } grep { ($_->{namespace} // '') eq 'canvas_logs' && $_->{endpoint} eq 'create_job' }
  @{ $emu->get('/_emu/requests') };
is(join(' ', sort(uniq(@paths))), '/dap/query/canvas_logs/table/web_logs/data',
	'web_logs is asked for at /dap/query/canvas_logs/table/web_logs/data');

# 3. reconciled views of each namespace, with global ids and users resolved
is(sq("SELECT string_agg(n.nspname || '.' || c.relname, ' ' ORDER BY n.nspname || '.' || c.relname COLLATE \"C\") FROM pg_class c "
	  . "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'v' AND n.nspname LIKE 'cd2\\_%'"),
	'cd2_canvas_logs.web_logs cd2_catalog.enrollments cd2_catalog.products cd2_new_quizzes.quiz_sessions '
	  . 'cd2_new_quizzes.quizzes', 'a view per table of each namespace, in cd2_<ns>');
is(sq("SELECT count(*) FROM cd2_canvas_logs.web_logs v JOIN north_canvas_logs.web_logs t ON t.id = v.id "
	  . "WHERE v.instance = 'north' AND v.user_id IS NOT DISTINCT FROM cd2_resolve_user(cd2_global_id('north', t.user_id)) "
	  . "AND v.original_user_id IS NOT DISTINCT FROM cd2_global_id('north', t.user_id) "
	  . "AND v.real_user_id IS NOT DISTINCT FROM cd2_resolve_user(cd2_global_id('north', t.real_user_id)) "
	  . "AND v.course_id IS NOT DISTINCT FROM cd2_global_id('north', t.course_id)"),
	sq("SELECT count(*) FROM north_canvas_logs.web_logs"),
	'cd2_canvas_logs.web_logs: global ids, user_id and real_user_id resolved, the stored value beside them');
is(sq("SELECT count(*) FROM cd2_catalog.enrollments"), sq("SELECT count(*) FROM north_catalog.enrollments"),
	'cd2_catalog.enrollments is catalog\'s');
($rc, $out, $err) = $node->psql('postgres', "SET ROLE cd2sync_reader; SELECT count(*) FROM cd2_new_quizzes.quizzes");
is($rc, 0, 'cd2sync_reader reads the views of a namespace');
sq("CREATE ROLE nobody");
($rc, $out, $err) = $node->psql('postgres', "SET ROLE nobody; SELECT count(*) FROM cd2_new_quizzes.quizzes");
like($err, qr/permission denied/, 'PUBLIC does not');

# 4. incrementals in every namespace
my @wl = @{ $emu->state($north, 'canvas_logs.web_logs')->{rows} };
my %new_log = %{ $wl[-1]{value} };
$new_log{url} = '/courses/1/pages/new?x=1';
$new_log{timestamp} = $emu->clock;
my @qs = @{ $emu->state($north, 'new_quizzes.quizzes')->{rows} };
my %q0 = %{ $qs[0]{value} };
$q0{title} = 'Retitled ✓';
$emu->epoch(
	{ client_id => $north, table => 'canvas_logs.web_logs',
	  upsert => [ { key => { id => '00000000-0000-4000-8000-000000000001' }, value => \%new_log } ] },
	{ client_id => $north, table => 'new_quizzes.quizzes', upsert => [ { key => $qs[0]{key}, value => \%q0 } ] });
$r = Cd2Test::sync($node, 'north');
is(join(' ', map { "$_=$r->{$_}{mode}/$r->{$_}{upserted}" } grep { /\./ } sort keys %$r),
	'canvas_logs.web_logs=incremental/1 catalog.enrollments=unchanged/0 catalog.products=unchanged/0 '
	  . 'new_quizzes.quiz_sessions=unchanged/0 new_quizzes.quizzes=incremental/1',
	'incrementals of each namespace');
Cd2Test::table_is($node, $emu, $north, 'north_new_quizzes', 'quizzes', 'new_quizzes.quizzes converged',
	cd2 => 'new_quizzes.quizzes');
is(sq("SELECT url FROM cd2_canvas_logs.web_logs WHERE id = '00000000-0000-4000-8000-000000000001'"),
	'/courses/1/pages/new?x=1', 'the new web_logs row is in the view');

# 5. a namespace the credential may not read fails its own tables, the others go on
$emu->faults(
	map { { endpoint => $_, namespace => 'catalog', kind => 'status', status => 403, times => -1 } }
	  qw(list_tables schema create_job));
$emu->faults({ endpoint => 'list_tables', namespace => 'new_quizzes', kind => 'status', status => 404, times => -1 });
my $wm_products = sq("SELECT watermark FROM cd2sync.table_state WHERE instance = 'north' AND table_name = 'catalog.products'");
$r = Cd2Test::sync($node, 'north');
is(join(' ', map { "$_=$r->{$_}{mode}" } sort keys %$r),
	'canvas_logs.web_logs=unchanged catalog.enrollments=failed catalog.products=failed courses=unchanged '
	  . 'enrollments=unchanged new_quizzes.*=failed users=unchanged',
	'403 on catalog and 404 on the listing of new_quizzes fail those alone');
like($r->{'catalog.products'}{error}, qr{/dap/query/catalog/table/products/data failed: HTTP 403},
	'the error says which call the API refused');
like($r->{'new_quizzes.*'}{error}, qr{/dap/query/new_quizzes/table failed: HTTP 404},
	'a namespace that cannot be listed fails as "ns.*"');
is(sq("SELECT string_agg(table_name || ':' || error_code, ' ' ORDER BY table_name) FROM cd2sync.sync_log "
	  . "WHERE run_id = (SELECT max(run_id) FROM cd2sync.runs) AND status = 'failed'"),
	'catalog.enrollments:28000 catalog.products:28000 new_quizzes.*:38000', 'with their SQLSTATEs');
is(sq("SELECT watermark FROM cd2sync.table_state WHERE instance = 'north' AND table_name = 'catalog.products'"),
	$wm_products, 'the failed table keeps its watermark');
is(sq("SELECT count(*) FROM cd2sync.table_state WHERE table_name LIKE '%*'"), '0',
	'"ns.*" is no table: it has no watermark');
is(sq("SELECT status FROM cd2sync.runs WHERE run_id = (SELECT max(run_id) FROM cd2sync.runs)"), 'done',
	'the run itself is done');
$emu->clear_faults;
$r = Cd2Test::sync($node, 'north');
is(join(' ', map { "$_=$r->{$_}{error}" } grep { $r->{$_}{error} } sort keys %$r), '', 'the next run converges');

# 6. a change feed follows a namespace's table
sq("SELECT cd2_create_feed('logs', tables => ARRAY['canvas_logs.web_logs', 'new_quizzes.*'], from_start => true)");
is(sq("SELECT string_agg(DISTINCT table_name, ' ' ORDER BY table_name) FROM cd2_feed_read('logs', 100000)"),
	'canvas_logs.web_logs new_quizzes.quiz_sessions new_quizzes.quizzes',
	'a feed of "ns.table" and "ns.*" starts with those tables\' rows, named ns.table');
is(sq("SELECT count(*) FROM cd2_feed_read('logs', 100000) WHERE table_name = 'canvas_logs.web_logs'"),
	sq("SELECT count(*) FROM cd2_canvas_logs.web_logs"), 'one insert per row of the view');
my $pos = sq("SELECT max(position) FROM cd2_feed_read('logs', 100000)");
sq("SELECT cd2_feed_ack('logs', $pos)");
$q0{title} = 'Retitled again';
$emu->epoch({ client_id => $north, table => 'new_quizzes.quizzes', upsert => [ { key => $qs[0]{key}, value => \%q0 } ] });
Cd2Test::sync($node, 'north', tables => [ 'new_quizzes.*' ]);
is(sq("SELECT table_name || ' ' || op || ' ' || array_to_string(changed, ',') || ' ' || (\"row\"->>'title') "
	  . "FROM cd2_feed_read('logs')"), 'new_quizzes.quizzes update title Retitled again',
	'the update of a new_quizzes row reaches the feed');

# 7. the data of every namespace goes with the instance
sq("SELECT cd2_alter_instance('north', target_schema => 'n2')");
is(sq("SELECT string_agg(nspname, ' ' ORDER BY nspname) FROM pg_namespace WHERE nspname LIKE 'n2%' OR nspname LIKE 'north%'"),
	'n2 n2_canvas_logs n2_catalog n2_new_quizzes', 'a new target schema renames the namespaces\' schemas too');
is(sq("SELECT count(*) FROM cd2_canvas_logs.web_logs"), sq("SELECT count(*) FROM n2_canvas_logs.web_logs"),
	'and the views follow');
sq("SELECT cd2_drop_instance('north', drop_data => true)");
is(sq("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'n2%'"), '0', 'drop_data drops them all');

# 8. two instances of 1.2, where one's target schema is where the other
# would keep a namespace's tables: that namespace fails, alone
sq("SELECT cd2_add_instance('sc', 'id', 's', api_url => 'http://127.0.0.1:9', target_schema => 'sc_data')");
sq("UPDATE cd2sync.instances SET target_schema = 'south_catalog' WHERE name = 'sc'");   # (as 1.2 allowed)
sq("SELECT cd2_alter_instance('south', tables => ARRAY['users', 'catalog.*'])");
$r = Cd2Test::sync($node, 'south');
my @cat = grep { /^catalog\./ } sort keys %$r;
ok(@cat > 0, 'south lists its catalog tables');
is(join(' ', map { "$r->{$_}{mode}:" . ($r->{$_}{error} =~ /schema "south_catalog" for the tables of namespace catalog is the target schema of instance "sc"/ ? 'refused' : $r->{$_}{error}) } @cat),
	join(' ', map { 'failed:refused' } @cat), 'its catalog tables fail, saying why');
like("$r->{users}{mode}:$r->{users}{error}", qr/^(snapshot|incremental):$/, 'its canvas tables sync');
is(sq("SELECT count(*) FROM pg_namespace WHERE nspname = 'south_catalog'"), '0', 'the schema is not shared');

$node->stop;
$emu->stop;
done_testing();
