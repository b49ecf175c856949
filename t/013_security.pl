# Security holes that a test must keep closed (issue 13).
#
# 1. A stored secret is only ever sent to the api_url and client_id it was
#    given for: a cd2sync_admin who points an instance at a listener of their
#    own, without giving the secret again, gets 42501 and the listener
#    receives nothing.
# 2. cd2sync writes and reads only schemas and tables it (or a superuser)
#    owns: another role's schema is refused as a target, her table planted
#    in an instance schema fails its sync, her look-alike view is never read.
# 3. The documented way to give a secret (a temporary table filled by
#    \copy from a file) keeps it out of the server log, whatever fails.
# 4. An instance dropped while a sync of it checks its tables: an error,
#    not a crash of the server.
# 5. A CSV record is measured whole: a quoted field may hold newlines; so
#    is a JSON line with a raw 0x02 (the quote of its COPY).
# 6. An error as long as the API likes, in 4-byte characters, reaches the
#    sync log and a NOTIFY payload cut to fit (a payload cut by characters
#    raised inside the error handler and left the run 'running').
# 7. A token lifetime no C integer holds (undefined behaviour in a cast,
#    caught by scripts/sanitize.sh's UBSan) is clamped: syncs work. The
#    server's *_proxy environment is never used; cd2sync.proxy is. Object
#    URLs of an https API must be https: t/006_tls.pl.
# 9. An instance moved to another API (api_url and its client_secret) while
#    a run waits for the instance's lock: the run asks the new API with the
#    new secret, never with the old secret or the old API's token.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use IO::Socket::INET;
use MIME::Base64;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $emu = Cd2Test::start_emulator(generate => 'demo');
my $node = Cd2Test::new_node('security');
my $north = 'us-east-1#demo-north';
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$emu->{url}', "
	  . "tables => ARRAY['users'])");
$node->safe_psql('postgres',
	"CREATE ROLE admin LOGIN; GRANT cd2sync_admin TO admin");

# A listener that records every request's head to a file and answers 503:
# what a host of the admin's choosing would see.
my $heard = "$PostgreSQL::Test::Utils::tmp_check/listener.log";
my $listener = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 16,
	ReuseAddr => 1) or die "listen: $!";
my $port = $listener->sockport;
my $child = fork() // die "fork: $!";
if ($child == 0)
{
	while (my $c = $listener->accept)
	{
		my $head = '';
		while (my $line = <$c>)
		{
			$head .= $line;
			last if $line eq "\r\n";
		}
		open(my $fh, '>>', $heard) or die;
		print $fh "CONNECTION\n$head";
		close $fh;
		print $c "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
		close $c;
	}
	exit 0;
}
close $listener;
END { kill 'TERM', $child if $child; }

sub heard { return -e $heard ? slurp_file($heard) : ''; }

sub as_admin
{
	my ($sql) = @_;
	my ($rc, $out, $err) = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql",
		extra_params => [ '-U', 'admin' ]);
	return ($rc, $err);
}

my $url = "http://127.0.0.1:$port/";
my ($rc, $err) = as_admin("SELECT cd2_alter_instance('north', api_url => '$url')");
isnt($rc, 0, 'hole 1: an admin cannot move an instance to another URL without its secret');
like($err, qr/42501/, 'hole 1: ... with insufficient_privilege');
($rc, $err) = as_admin("SELECT cd2_alter_instance('north', client_id => 'someone-else')");
like($err, qr/42501/, 'hole 1: nor change its client_id without it');
usleep(300_000);
is(heard(), '', 'hole 1: the listener on the new URL received nothing');
is($node->safe_psql('postgres', "SELECT api_url || ' ' || client_id FROM cd2sync.instances"),
	"$emu->{url} $north", 'hole 1: the instance still points where it did');

# with the secret given again, the new URL is called, with the given secret
# only: the listener above would have seen the stored one
($rc, $err) = as_admin(
	"SELECT cd2_alter_instance('north', api_url => '$url', client_secret => 'admins-own')");
is($rc, 0, 'hole 1: with its secret given again, the URL changes');
like(heard(), qr/CONNECTION/, 'hole 1: the listener is reached once the secret is given');
my $stored = encode_base64("$north:north-secret", '');
my $given = encode_base64("$north:admins-own", '');
like(heard(), qr/\Q$given\E/, 'hole 1: the listener receives the secret given with the URL');
unlike(heard(), qr/\Q$stored\E|north-secret/, 'hole 1: and never the stored one');

# hole 3: the documented way to give a secret (docs/security.md) keeps it out
# of statement text, so out of the server log (every statement logged, and
# failing ones with log_min_error_statement) and pg_stat_activity
$node->safe_psql('postgres', "ALTER SYSTEM SET log_statement = 'all'; SELECT pg_reload_conf()");
my $secret_file = "$PostgreSQL::Test::Utils::tmp_check/north.secret";
PostgreSQL::Test::Utils::append_to_file($secret_file, "north-secret\n");
my $log_at = -s $node->logfile;
sub with_secret
{
	my ($call) = @_;
	return as_admin("BEGIN;\nCREATE TEMP TABLE cd2_secret (v text) ON COMMIT DROP;\n"
		  . "\\copy cd2_secret FROM '$secret_file'\n$call;\nCOMMIT;");
}
my $add = "SELECT cd2_add_instance('%s', '$north', (SELECT v FROM cd2_secret), api_url => '$emu->{url}', tables => %s)";
($rc, $err) = with_secret(sprintf($add, 'south', "ARRAY['users']"));
is($rc, 0, 'hole 3: an admin registers an instance with a secret read from a file');
($rc, $err) = with_secret(sprintf($add, 'south', "ARRAY['users']"));
like($err, qr/23505|42710/, 'hole 3: a duplicate name fails');
($rc, $err) = with_secret(sprintf($add, 'west', "ARRAY['no_such_table']"));
like($err, qr/42P01/, 'hole 3: an unknown table fails');
($rc, $err) = with_secret("SELECT cd2_alter_instance('south', client_secret => (SELECT v FROM cd2_secret), tables => ARRAY['nope'])");
isnt($rc, 0, 'hole 3: a failed rotation');
($rc, $err) = with_secret("SELECT cd2_alter_instance('south', client_secret => (SELECT v FROM cd2_secret))");
is($rc, 0, 'hole 3: a rotation');
my ($prc, $pout, $perr) = $node->psql('postgres', "CREATE ROLE outsider LOGIN;\nSET ROLE outsider;\n"
	  . "SELECT cd2_add_instance('east', '$north', 'north-secret-guess', api_url => '$emu->{url}')");
like($perr, qr/permission denied/, 'hole 3: a role without cd2sync_admin is refused');
my $r = Cd2Test::sync($node, 'south');
is($r->{users}{error}, '', 'hole 3: the secret from the file is the one the API accepts');
$node->safe_psql('postgres', "ALTER SYSTEM RESET log_statement; SELECT pg_reload_conf()");
my $log = substr(slurp_file($node->logfile), $log_at);
like($log, qr/cd2_alter_instance.*\n(.*\n)*.*(ERROR|STATEMENT)/, 'hole 3: the server logged the statements and errors');
unlike($log, qr/north-secret(?!-guess)/, 'hole 3: the log holds no secret given the documented way');

# hole 2: cd2sync writes and reads only what it owns. mallory owns a schema
# with a table whose trigger records who fires it, and (with CREATE on an
# instance schema, as a careless grant would give) plants a table and a
# look-alike view of her own there: none of her code ever runs.
$node->safe_psql('postgres', q{
	CREATE ROLE mallory LOGIN;
	GRANT CREATE ON DATABASE postgres TO mallory;
	SET ROLE mallory;
	CREATE SCHEMA planted;
	CREATE TABLE planted.fired (who text, what text);
	CREATE FUNCTION planted.fire() RETURNS trigger LANGUAGE plpgsql AS $f$
	BEGIN INSERT INTO planted.fired VALUES (current_user, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME); RETURN NULL; END $f$;
	CREATE FUNCTION planted.peek() RETURNS bigint LANGUAGE sql AS $f$
	    INSERT INTO planted.fired VALUES (current_user, 'view') RETURNING 1::bigint $f$;
	CREATE TABLE planted.users (id bigint PRIMARY KEY);
	CREATE TRIGGER fire AFTER INSERT OR UPDATE OR DELETE ON planted.users
	    FOR EACH STATEMENT EXECUTE FUNCTION planted.fire();
	RESET ROLE;
	GRANT USAGE, CREATE ON SCHEMA south TO mallory;
	SET ROLE mallory;
	CREATE TABLE south.courses (id bigint PRIMARY KEY);
	CREATE TRIGGER fire AFTER INSERT OR UPDATE OR DELETE ON south.courses
	    FOR EACH STATEMENT EXECUTE FUNCTION planted.fire();
	CREATE VIEW south.pseudonyms AS
	    SELECT planted.peek() AS id, planted.peek() AS user_id, 'active'::text AS workflow_state;
	RESET ROLE;
});
($rc, $err) = with_secret("SELECT cd2_add_instance('evil', '$north', (SELECT v FROM cd2_secret), "
	  . "api_url => '$emu->{url}', tables => ARRAY['users'], target_schema => 'planted')");
like($err, qr/42501.*schema "planted" belongs to role mallory/s,
	'hole 2: an instance cannot target a schema another role owns (42501)');
$node->safe_psql('postgres', "SELECT cd2_alter_instance('south', tables => ARRAY['users', 'courses'])");
$r = Cd2Test::sync($node, 'south');
like($r->{courses}{error}, qr/relation south\.courses is not a table of cd2sync's/,
	'hole 2: a table another role planted in an instance schema fails its sync');
is($r->{users}{error}, '', 'hole 2: ... and only its own');
$node->safe_psql('postgres', "SELECT cd2sync.refresh_user_merges(); SELECT count(*) FROM cd2.reconciliation_health;\n"
	  . "SELECT cd2_create_feed('watch', from_start => true); SELECT cd2_drop_feed('watch');");
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_views WHERE viewname = 'pseudonyms' AND schemaname = 'cd2'"),
	'0', 'hole 2: the look-alike view makes no reconciled view');
is($node->safe_psql('postgres', 'SELECT coalesce(string_agg(who || \' \' || what, \', \'), \'none\') FROM planted.fired'),
	'none', 'hole 2: no trigger or view of hers ran: not in a sync, a refresh, the health view or a feed');
$node->safe_psql('postgres', "DROP SCHEMA planted CASCADE; DROP TABLE south.courses;\n"
	  . "REVOKE USAGE, CREATE ON SCHEMA south FROM mallory; REVOKE CREATE ON DATABASE postgres FROM mallory;\n"
	  . "SELECT cd2_alter_instance('south', tables => ARRAY['users'])");

# hole 6: the API's error message is 2,500 emoji (10,000 bytes)
$node->safe_psql('postgres', "SELECT cd2_alter_instance('north', api_url => '$emu->{url}', "
	  . "client_secret => 'north-secret')");
my $long = "\x{1F600}" x 2500;
$emu->faults({ endpoint => 'create_job', kind => 'status', status => 400,
	error_type => 'ValidationError', message => $long, table => 'users', times => 100 });
($rc, my $out, $err) = $node->psql('postgres',
	"LISTEN cd2sync; SELECT mode FROM cd2_sync_now('north');");
$emu->clear_faults;
my ($mode, $note) = split /\n/, $out, 2;
is($mode, 'failed', 'hole 6: the table with the long error failed');
# (ok, not like: a failure would print 10 KB)
ok(($note // '') =~ /^Asynchronous notification "cd2sync" with payload "\{.*"status" : "failed"/,
	'hole 6: its NOTIFY was sent, cut to fit');
is($node->safe_psql('postgres', "SELECT status FROM cd2sync.runs ORDER BY run_id DESC LIMIT 1"),
	'done', 'hole 6: the run ended');
is($node->safe_psql('postgres', "SELECT position(repeat(U&'\\+01F600', 2500) IN error) > 0 "
	  . "FROM cd2sync.sync_log ORDER BY run_id DESC LIMIT 1"),
	't', 'hole 6: the sync log keeps the whole error');
$r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'snapshot', 'hole 6: the next run converges');

# hole 7: expires_in of 1e300 (and a JWT exp to match)
$emu->config(token_lifetime => 1e300);
$r = Cd2Test::sync($node, 'north', full => 1);
is($r->{users}{error}, '', 'hole 7: a token lifetime of 1e300 s is clamped, and the sync works');
$emu->config(token_lifetime => 3600);

# hole 7: a server started with proxy variables in its environment (set for
# some other program) sends nothing to that proxy; cd2sync.proxy alone
# names one
my $heard_before = length(heard());
{
	local $ENV{http_proxy} = $url;
	local $ENV{HTTPS_PROXY} = $url;
	local $ENV{ALL_PROXY} = $url;
	$node->restart;
}
$emu->epoch({ client_id => $north, table => 'users', upsert => [ $emu->state($north, 'users')->{rows}[2] ] });
$r = Cd2Test::sync($node, 'north');
is($r->{users}{error}, '', 'hole 7: with *_proxy in the server\'s environment the sync goes straight to the API');
usleep(300_000);
is(length(heard()), $heard_before, 'hole 7: and the proxy of the environment received nothing');
$node->safe_psql('postgres', "LOAD 'cd2sync'; ALTER SYSTEM SET cd2sync.proxy = '$url'; SELECT pg_reload_conf()");
# plain http (this emulator) would show the login to the proxy: refused
$r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.http_retries = 0;");
like($r->{users}{error}, qr/plain http through cd2sync.proxy/, 'hole 7: plain http through a proxy is refused');
usleep(300_000);
is(length(heard()), $heard_before, 'hole 7: ... before the proxy hears anything');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_settings WHERE name = 'cd2sync.proxy'",
	extra_params => [ '-U', 'admin' ]), '0', 'hole 7: cd2sync.proxy (which may hold a password) is for superusers');
$node->safe_psql('postgres', "LOAD 'cd2sync'; ALTER SYSTEM SET cd2sync.allow_insecure_http = on; SELECT pg_reload_conf()");
$r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.http_retries = 0;");
like($r->{users}{error}, qr/HTTP 503/, 'hole 7: cd2sync.proxy names the proxy (this one answers 503)');
like(substr(heard(), $heard_before), qr/CONNECTION\n(POST|GET) http:\/\/127\.0\.0\.1:$emu->{port}\//,
	'hole 7: ... which received the request');
$node->safe_psql('postgres', "LOAD 'cd2sync'; ALTER SYSTEM RESET cd2sync.proxy;\n"
	  . "ALTER SYSTEM RESET cd2sync.allow_insecure_http; SELECT pg_reload_conf()");

# hole 5: a CSV record whose quoted field holds 5,000 bytes in lines of 100
my $urows = $emu->state($north, 'users')->{rows};
my %tall = %{ $urows->[1]{value} };
$tall{name} = join("\n", ('y' x 99) x 50);
$emu->epoch({ client_id => $north, table => 'users', upsert => [ { key => $urows->[1]{key}, value => \%tall } ] });
$r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.format = 'csv'; SET cd2sync.max_line_length = '2kB';");
like($r->{users}{error}, qr/a record is longer than cd2sync.max_line_length \(2048 bytes\)/,
	'hole 5: a CSV record is measured whole, not by its lines');
$r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.format = 'csv';");
is($r->{users}{error}, '', 'hole 5: within the limit it syncs');
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'hole 5: and converges');
# ... and a JSON line with a raw 0x02, the quote of the COPY a JSON line goes
# through: the newlines after it are the record's, which is measured whole
# too (not one line at a time while COPY took in the rest of the file)
$emu->epoch({ client_id => $north, table => 'users', upsert => [ { key => $urows->[2]{key}, value => $urows->[2]{value} } ] });
$emu->faults({ endpoint => 'create_job', kind => 'malformed_record', shape => 'control_quote', table => 'users' });
$r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.format = 'jsonl'; SET cd2sync.max_line_length = '2kB';");
like($r->{users}{error}, qr/a record is longer than cd2sync.max_line_length \(2048 bytes\)/,
	'hole 5: a JSON line whose 0x02 opens a quote is measured to its end');
$emu->clear_faults;
$r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.format = 'jsonl';");
is($r->{users}{error}, '', 'hole 5: the next run syncs');

# hole 4: an instance dropped while cd2_sync_now checks its tables. The
# check of the instance is made to pause (for this session only) after it
# found the row; meanwhile the instance goes. The next look must raise, not
# crash the server (a NULL compared with strcmp restarted it).
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('racer', '$north', 'north-secret', api_url => '$emu->{url}', tables => ARRAY['users'])");
$node->safe_psql('postgres', q{
	CREATE OR REPLACE FUNCTION cd2sync._check_instance(instance text)
	RETURNS cd2sync.instances LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $f$
	DECLARE
	    r cd2sync.instances;
	BEGIN
	    SELECT * INTO r FROM cd2sync.instances i WHERE i.name = instance;
	    IF NOT FOUND THEN
	        RAISE EXCEPTION 'cd2sync instance "%" does not exist', instance USING ERRCODE = 'undefined_object';
	    END IF;
	    IF current_setting('application_name') = 'racer' THEN
	        PERFORM pg_sleep(2);
	    END IF;
	    RETURN r;
	END $f$;
});
my $log_before = -s $node->logfile;
my ($race_out, $race_err) = ('', '');
my $race = IPC::Run::start(
	[ 'psql', '-XAtq', '-v', 'VERBOSITY=verbose', '-d', $node->connstr('postgres') . ' application_name=racer',
	  '-c', "SELECT * FROM cd2_sync_now('racer', tables => ARRAY['users'])" ],
	'>', \$race_out, '2>', \$race_err);
# (the drop comes once the sync is inside the pause, after its first check)
ok($node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'racer' AND wait_event = 'PgSleep'"),
	'hole 4: the sync paused after checking the instance');
$node->safe_psql('postgres', "SELECT cd2_drop_instance('racer')");
$race->finish;
like($race_err, qr/42704.*cd2sync instance "racer" does not exist/s,
	'hole 4: a sync of an instance dropped meanwhile fails with 42704');
unlike(substr(slurp_file($node->logfile), $log_before), qr/terminated by signal|server process .* was terminated/,
	'hole 4: no backend crashed (a crash restarts every session of the server)');

# hole 9: an instance moved to another API (api_url with its client_secret)
# while a run waits for the instance's lock: the run asks the new API with
# the new secret, and sends it neither the old secret nor a token of the old
# API (it kept both, and changed only the URL)
my $emu2 = Cd2Test::start_emulator();
my $ust = $emu->state($north, 'users');
$emu2->post('/_emu/load', { start => $emu->get('/_emu/health')->{clock}, instances => { $north => { secret => 'moved-secret',
	tables => { users => { version => $ust->{version}, schema => $ust->{schema}, rows => $ust->{rows} } } } } });
my $holder = $node->background_psql('postgres');
$holder->query_safe("SELECT pg_advisory_lock(52517, hashtext('north'))");
my ($run_out, $run_err) = ('', '');
my $run = IPC::Run::start(
	[ 'psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
	  "SELECT table_name, coalesce(error, '') FROM cd2_sync_now('north')" ],
	'>', \$run_out, '2>', \$run_err);
ok($node->poll_query_until('postgres', "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'advisory' "
	  . "AND backend_type = 'cd2sync sync worker'"),
	'hole 9: the run waits for the instance\'s lock');
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_alter_instance('north', api_url => '$emu2->{url}', client_secret => 'moved-secret')");
$holder->query_safe("SELECT pg_advisory_unlock(52517, hashtext('north'))");
$run->finish;
is($run_out =~ s/\n\z//r, "users|", 'hole 9: then syncs from the new API');
my $old_basic = MIME::Base64::encode_base64("$north:north-secret", '');
my @asked = @{ $emu2->get('/_emu/requests') };
ok(scalar(@asked) > 0, 'hole 9: which it asked');
is(join(',', map { "$_->{endpoint} $_->{status}" } grep { $_->{status} >= 400 } @asked), '',
	'hole 9: with no request refused (an old token, an old secret)');
is(scalar(grep { ($_->{headers}{Authorization} // '') =~ /\Q$old_basic\E/ } @asked), 0,
	'hole 9: and never with the old secret');
$holder->quit;

done_testing();
