# Helpers for cd2sync's TAP tests: the DAP emulator, a cluster with the
# extension, syncs, and comparisons of synced tables with the emulator's
# expected state.
package Cd2Test;

use strict;
use warnings;

use Carp;
use HTTP::Tiny;
use JSON::PP;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# Perl strings here are characters; JSON goes over HTTP and into SQL as UTF-8
my $json = JSON::PP->new->utf8(1)->canonical(1)->allow_nonref(1);
my $http = HTTP::Tiny->new(timeout => 60);

# Starts the emulator; returns {url, port, handle}. Stopped at exit.
sub start_emulator
{
	my (%opts) = @_;
	my $portfile = "$PostgreSQL::Test::Utils::tmp_check/emu_" . $$ . '_' . int(rand(1e9)) . '.port';
	my @cmd = ('python3', 'test/emulator/cd2emu.py', '--port', '0', '--port-file', $portfile, '--quiet');
	push @cmd, '--generate', $opts{generate} if $opts{generate};
	push @cmd, '--scenario', $opts{scenario} if $opts{scenario};
	push @cmd, '--tls-cert', $opts{tls_cert}, '--tls-key', $opts{tls_key} if $opts{tls_cert};
	# objects from a host of their own, as real presigned URLs name a storage host
	push @cmd, '--objects-host' unless $opts{same_host};
	my $log = "$PostgreSQL::Test::Utils::log_path/emulator_$$.log";
	my $h = IPC::Run::start(\@cmd, '<', \undef, '>>', $log, '2>>', $log);
	for (1 .. 200)
	{
		last if -s $portfile;
		usleep(50_000);
	}
	croak "emulator did not start (see $log)" unless -s $portfile;
	my $port = slurp_file($portfile);
	chomp $port;
	my $emu = { port => $port, url => "http://127.0.0.1:$port", handle => $h };
	return bless $emu, 'Cd2Test::Emulator';
}

package Cd2Test::Emulator;

sub call
{
	my ($self, $method, $path, $body) = @_;
	my $resp = $http->request($method, $self->{url} . $path,
		defined $body ? { content => $json->encode($body),
			headers => { 'Content-Type' => 'application/json' } } : {});
	Carp::croak("emulator $method $path: $resp->{status} $resp->{content}")
	  unless $resp->{success};
	return length($resp->{content}) ? $json->decode($resp->{content}) : undef;
}
sub get    { my ($s, $p) = @_; return $s->call('GET', $p); }
sub post   { my ($s, $p, $b) = @_; return $s->call('POST', $p, $b // {}); }
sub delete { my ($s, $p) = @_; return $s->call('DELETE', $p); }

sub config { my ($s, %c) = @_; return $s->post('/_emu/config', \%c); }
sub faults { my ($s, @f) = @_; return $s->post('/_emu/faults', { faults => \@f }); }
sub clear_faults { my ($s) = @_; return $s->delete('/_emu/faults'); }
sub epoch  { my ($s, @changes) = @_; return $s->post('/_emu/epoch', { changes => \@changes })->{at}; }
sub clock  { my ($s) = @_; return $s->get('/_emu/health')->{clock}; }

sub state
{
	my ($s, $client_id, $table, $fresh, $window) = @_;
	my $cid = $client_id;
	$cid =~ s/([^A-Za-z0-9_.-])/sprintf('%%%02X', ord($1))/ge;
	return $s->get("/_emu/state?client_id=$cid&table=$table" . ($fresh ? '&fresh=1' : '')
		  . ($window ? '&window=1' : ''));
}

sub stop
{
	my ($s) = @_;
	return unless $s->{handle};
	$s->{handle}->signal('TERM');
	$s->{handle}->finish;
	delete $s->{handle};
}

sub DESTROY { my ($s) = @_; eval { $s->stop }; }

package Cd2Test;

# A started cluster with cd2sync created in database postgres. Settings
# make retries and polls fast, so tests run quickly.
sub new_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%{ $opts{init} // {} });
	$node->append_conf('postgresql.conf', join("\n",
		"max_worker_processes = 16",
		"cd2sync.retry_base_delay = 20ms",
		"cd2sync.retry_max_delay = 2s",
		"cd2sync.poll_interval = 100ms",
		"cd2sync.job_rate = 0",    # the emulator has no rate limit unless a test sets one
		"log_min_messages = info",
		$opts{conf} // ''));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION cd2sync') unless $opts{no_extension};
	return $node;
}

# Runs cd2_sync_now; returns {table => {mode, upserted, deleted, watermark, error}}
sub sync
{
	my ($node, $instance, %opts) = @_;
	my $args = "'$instance'";
	$args .= ", tables => ARRAY[" . join(',', map { "'$_'" } @{ $opts{tables} }) . "]" if $opts{tables};
	$args .= ", \"full\" => true" if $opts{full};
	my $pre = $opts{pre} // '';
	my $out = $node->safe_psql('postgres',
		"SET timezone = 'UTC'; $pre SELECT table_name, mode, rows_upserted, rows_deleted, "
		  . "to_char(watermark, 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), coalesce(error, '') "
		  . "FROM cd2_sync_now($args)");
	my %r;
	for my $line (split /\n/, $out)
	{
		my ($t, $mode, $up, $del, $wm, $err) = split /\|/, $line, 6;
		$r{$t} = { mode => $mode, upserted => $up, deleted => $del, watermark => $wm, error => $err };
	}
	return \%r;
}

# ISO time as the watermark reads back (no fractional seconds in our tests)
sub iso { my ($t) = @_; $t =~ s/\.\d+Z$/Z/; return $t; }

# Rows that differ between a synced table and the emulator's expected state
# (both directions), as text; empty when they are equal. opts: cd2 => the
# CD2 name when it is not the table's (canvas_logs.web_logs), window => only
# the rows the API still serves, fresh => as a fresh snapshot has them.
sub table_diff
{
	my ($node, $emu, $client_id, $schema, $table, %opts) = @_;
	my $state = $emu->state($client_id, $opts{cd2} // $table, $opts{fresh}, $opts{window});
	my $doc = $json->encode($state->{rows});
	my $rel = qq{"$schema"."$table"};
	# the CD2 columns: cd2sync's own bookkeeping (cd2_*) is not upstream's
	my $cols = $node->safe_psql('postgres', qq{
		SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
		 WHERE attrelid = '$rel'::regclass AND attnum > 0 AND NOT attisdropped AND attname NOT LIKE 'cd2\\_%'});
	my $sql = qq{
		WITH exp AS (
			SELECT $cols FROM (SELECT (jsonb_populate_record(NULL::$rel, (r->'key') || coalesce(r->'value', '{}'))).*
			  FROM jsonb_array_elements(\$cd2state\$$doc\$cd2state\$::jsonb) r) e),
		     act AS (SELECT $cols FROM $rel),
		     missing AS (SELECT * FROM exp EXCEPT ALL SELECT * FROM act),
		     extra AS (SELECT * FROM act EXCEPT ALL SELECT * FROM exp)
		SELECT 'missing ' || row_to_json(m)::text FROM missing m
		UNION ALL
		SELECT 'extra   ' || row_to_json(e)::text FROM extra e
		UNION ALL
		-- (jsonb_populate_record drops what the table has no column for)
		SELECT DISTINCT 'no column ' || k
		  FROM jsonb_array_elements(\$cd2state\$$doc\$cd2state\$::jsonb) r,
		       jsonb_object_keys((r->'key') || coalesce(r->'value', '{}')) k
		 WHERE NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '$rel'::regclass AND attname = k
		                      AND attnum > 0 AND NOT attisdropped)};
	return $node->safe_psql('postgres', $sql);
}

# Checks a synced table equals the emulator's state, with a readable diff
sub table_is
{
	my ($node, $emu, $client_id, $schema, $table, $name, %opts) = @_;
	my $diff = table_diff($node, $emu, $client_id, $schema, $table, %opts);
	is($diff, '', $name);
}

1;
