# TLS: certificates and host names are always verified; cd2sync.ca_file names
# a private CA. The emulator serves HTTPS with a certificate of a test CA:
# refused without the CA, accepted with it; a certificate of that CA for
# another host name is refused. Plain http to a host other than
# loopback is refused before any connection is attempted; an https API's
# object URLs must be https too.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use IO::Socket::INET;
use PostgreSQL::Test::Utils;
use Test::More;

# a test CA and a server certificate for 127.0.0.1
my $dir = "$PostgreSQL::Test::Utils::tmp_check/tls_$$";
mkdir $dir;
sub ossl { system('openssl', @_) == 0 or die "openssl @_ failed"; }
ossl(qw(req -x509 -newkey rsa:2048 -nodes -days 2 -subj), '/CN=cd2sync test CA',
	'-keyout', "$dir/ca.key", '-out', "$dir/ca.pem");
ossl(qw(req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1), '-keyout', "$dir/server.key", '-out', "$dir/server.csr");
open(my $ext, '>', "$dir/ext.cnf") or die;
print $ext "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n";
close $ext;
ossl(qw(x509 -req -days 2 -CAcreateserial), '-in', "$dir/server.csr", '-CA', "$dir/ca.pem",
	'-CAkey', "$dir/ca.key", '-out', "$dir/server.pem", '-extfile', "$dir/ext.cnf");

my $emu = Cd2Test::start_emulator(generate => 'demo', tls_cert => "$dir/server.pem", tls_key => "$dir/server.key");
my $url = "https://127.0.0.1:$emu->{port}";
my $node = Cd2Test::new_node('tls');
my $north = 'us-east-1#demo-north';
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('north', '$north', 'north-secret', api_url => '$url', tables => ARRAY['users'])");

# the emulator's control API is on the same HTTPS port: the test talks to it
# with curl, without checking the certificate (Perl's HTTPS needs modules
# this machine may not have)
$emu->{url} = $url;
{
	no warnings 'redefine';
	*Cd2Test::Emulator::call = sub {
		my ($self, $method, $path, $body) = @_;
		my @cmd = ('curl', '-sSk', '--fail', '-X', $method, $self->{url} . $path);
		push @cmd, '-H', 'Content-Type: application/json', '--data-binary',
		  JSON::PP->new->utf8->encode($body) if defined $body;
		my $content;
		IPC::Run::run(\@cmd, '>', \$content) or die "emulator $method $path failed";
		return length($content) ? JSON::PP->new->utf8->decode($content) : undef;
	};
}

my $r = Cd2Test::sync($node, 'north', pre => "SET cd2sync.http_retries = 1; SET cd2sync.retry_base_delay = 10;");
is($r->{users}{mode}, 'failed', 'a certificate from an unknown CA is refused');
like($r->{users}{error}, qr/certificate/i, 'the error says why');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.watermarks WHERE watermark IS NOT NULL"), '0',
	'nothing was synced');

$node->safe_psql('postgres', "LOAD 'cd2sync'; ALTER SYSTEM SET cd2sync.ca_file = '$dir/ca.pem'; SELECT pg_reload_conf()");
$r = Cd2Test::sync($node, 'north');
is($r->{users}{error}, '', 'with cd2sync.ca_file naming the CA, the sync succeeds');
is($r->{users}{mode}, 'snapshot', 'snapshot over https');
Cd2Test::table_is($node, $emu, $north, 'north', 'users', 'rows equal the expected state');

# host names are verified: a server with a certificate of the same CA for
# another name is refused
ossl(qw(req -newkey rsa:2048 -nodes -subj /CN=other.example), '-keyout', "$dir/other.key", '-out', "$dir/other.csr");
open($ext, '>', "$dir/other.cnf") or die;
print $ext "subjectAltName=DNS:other.example\nbasicConstraints=CA:FALSE\n";
close $ext;
ossl(qw(x509 -req -days 2 -CAcreateserial), '-in', "$dir/other.csr", '-CA', "$dir/ca.pem",
	'-CAkey', "$dir/ca.key", '-out', "$dir/other.pem", '-extfile', "$dir/other.cnf");
my $other = Cd2Test::start_emulator(generate => 'demo', tls_cert => "$dir/other.pem", tls_key => "$dir/other.key");
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('misnamed', '$north', 'north-secret', api_url => 'https://127.0.0.1:$other->{port}', "
	  . "tables => ARRAY['users'])");
$r = Cd2Test::sync($node, 'misnamed', pre => "SET cd2sync.http_retries = 1; SET cd2sync.retry_base_delay = 10;");
is($r->{users}{mode}, 'failed', 'a certificate of the trusted CA for another host name is refused');
like($r->{users}{error}, qr/subject name|host ?name|does not match/i, 'the error says the name does not match');
$other->stop;

# plain http: loopback only (checked before any connection: no traffic leaves)
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('far', '$north', 'north-secret', api_url => 'http://192.0.2.1:9', tables => ARRAY['users'])");
$r = Cd2Test::sync($node, 'far');
like($r->{users}{error}, qr/plain http is allowed only to this machine/, 'plain http to another host is refused');

# an https API may not send this server to plain http, even on this machine
# (presigned URLs come from the API: a request to a local service it chose)
my $listener = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 4, ReuseAddr => 1)
  or die "listen: $!";
$emu->config(object_base_url => 'http://127.0.0.1:' . $listener->sockport);
$r = Cd2Test::sync($node, 'north', full => 1);
like($r->{users}{error}, qr/gave a URL for object .* that is not https/, 'a plain-http object URL from an https API is refused');
$listener->blocking(0);
ok(!defined $listener->accept, 'and nothing connected to it');
$emu->config(object_base_url => undef);
is(Cd2Test::sync($node, 'north', full => 1)->{users}{error}, '', 'the next run converges');

$node->stop;
$emu->stop;
done_testing();
