# Security holes that a test must keep closed (issue 13).
#
# 1. A stored secret is only ever sent to the api_url and client_id it was
#    given for: a cd2sync_admin who points an instance at a listener of their
#    own, without giving the secret again, gets 42501 and the listener
#    receives nothing.
# 6. An error as long as the API likes, in 4-byte characters, reaches the
#    sync log and a NOTIFY payload cut to fit (a payload cut by characters
#    raised inside the error handler and left the run 'running').
# 7. A token lifetime no C integer holds (undefined behaviour in a cast,
#    caught by scripts/sanitize.sh's UBSan) is clamped: syncs work. Object
#    URLs of an https API must be https: t/006_tls.pl.
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
my $r = Cd2Test::sync($node, 'north');
is($r->{users}{mode}, 'snapshot', 'hole 6: the next run converges');

# hole 7: expires_in of 1e300 (and a JWT exp to match)
$emu->config(token_lifetime => 1e300);
$r = Cd2Test::sync($node, 'north', full => 1);
is($r->{users}{error}, '', 'hole 7: a token lifetime of 1e300 s is clamped, and the sync works');
$emu->config(token_lifetime => 3600);

done_testing();
