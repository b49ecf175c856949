# Pipelining within the API's limits: a sync keeps several query jobs in
# flight upstream and loads whichever finishes, instead of waiting for each
# in turn; it never starts more jobs a minute than cd2sync.job_rate, so the
# API's rate limit (here the emulator's) is never hit.
# Bound from the issue: at most 1.2 x max(tables / rate, T) plus loading,
# where T is how long one job takes upstream. A table whose job must be
# started again does not hold the others up.
use strict;
use warnings;
use utf8;

use FindBin;
use lib $FindBin::RealBin;
use Cd2Test;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $cid = 'us-east-1#many';
sub scenario
{
	my ($n) = @_;
	my %tables;
	for my $i (1 .. $n)
	{
		$tables{ sprintf('t%02d', $i) } = {
			version => 1,
			schema => { type => 'object', properties => {
				key => { type => 'object', properties => { id => { type => 'integer', format => 'int64' } } },
				value => { type => 'object', properties => { name => { type => 'string' } } } } },
			rows => [ map { { key => { id => $_ }, value => { name => "row $_ of table $i" } } } 1 .. 3 ] };
	}
	return { start => '2026-11-01T00:00:00Z', instances => { $cid => { secret => 's', tables => \%tables } } };
}

my $emu = Cd2Test::start_emulator();
my $node = Cd2Test::new_node('pipeline');
$node->safe_psql('postgres', "SET log_statement = 'none';\n"
	  . "SELECT cd2_add_instance('many', '$cid', 's', api_url => '$emu->{url}')");

sub timed_sync
{
	my ($rate) = @_;
	$emu->delete('/_emu/requests');
	my $t0 = time;
	my $r = Cd2Test::sync($node, 'many', pre => "SET cd2sync.job_rate = $rate;");
	my $took = time - $t0;
	my @reqs = @{ $emu->get('/_emu/requests') };
	return ($r, $took, \@reqs);
}

# 1. twelve tables, jobs of 6 s upstream, 60 jobs a minute allowed
my ($n, $T, $rate) = (12, 6, 60);
$emu->post('/_emu/load', scenario($n));
$emu->config(job_latency => $T, dedupe_jobs => JSON::PP::false, rate_limits => { create_job => $rate });
my ($r, $took, $reqs) = timed_sync($rate);
is(scalar(grep { $r->{$_}{mode} eq 'snapshot' && $r->{$_}{error} eq '' } keys %$r), $n, "all $n tables synced");
my $bound = 1.2 * (($n / $rate * 60) > $T ? $n / $rate * 60 : $T) + 5;
ok($took < $bound, sprintf('took %.1f s, within the bound of %.1f s (one after the other: %d s)', $took, $bound, $n * $T));
is(scalar(grep { $_->{status} == 429 } @$reqs), 0, 'no request was rate-limited');
my @creates = sort { $a <=> $b } map { $_->{t} } grep { $_->{endpoint} eq 'create_job' } @$reqs;
my ($first_done) = sort { $a <=> $b } map { $_->{t} } grep { $_->{endpoint} eq 'object_urls' } @$reqs;
is(scalar(grep { $_ < $first_done } @creates), $n, 'every job was started before the first one was loaded');
diag(sprintf('pipelining: %d tables, jobs of %d s upstream, %d jobs/min: %.1f s (sequential: at least %d s)',
	$n, $T, $rate, $took, $n * $T));

# 2. the rate limit binds: 8 tables at 6 jobs a minute. The API allows 7: the
# client's and the emulator's minutes start a few milliseconds apart, so an
# API limit equal to the client's would make a 429 a matter of timing; the
# check that the client keeps its own rate is the seventh job's start
($n, $T, $rate) = (8, 1, 6);
$emu->post('/_emu/load', scenario($n));
$emu->config(job_latency => $T, rate_limits => { create_job => $rate + 1 });
($r, $took, $reqs) = timed_sync($rate);
is(scalar(grep { $r->{$_}{error} eq '' } keys %$r), $n, "all $n tables synced");
is(scalar(grep { $_->{status} == 429 } @$reqs), 0, 'the client stayed under the API\'s limit: no 429');
@creates = sort { $a <=> $b } map { $_->{t} } grep { $_->{endpoint} eq 'create_job' } @$reqs;
ok($creates[$rate] - $creates[0] >= 59.5, sprintf('job %d started a minute after the first (%.1f s)', $rate + 1, $creates[$rate] - $creates[0]));
$bound = 1.2 * ($n / $rate * 60) + 5;
ok($took < $bound, sprintf('took %.1f s, within the bound of %.1f s', $took, $bound));
diag(sprintf('rate-bound: %d tables at %d jobs/min, jobs of %d s: %.1f s (bound %.1f s)', $n, $rate, $T, $took, $bound));

# 3. no table waits for another's job: a job gone upstream (404 on its object
# URLs) is started again as a state of its table sync, and the pipeline
# loads the other table meanwhile. t01 comes first and its job is gone when
# it has finished: started again, it finishes T later; t02, whose job
# finished with t01's first one, is loaded meanwhile, so it ends first.
$T = 3;
$emu->config(job_latency => $T, rate_limits => {});
$emu->faults({ endpoint => 'object_urls', kind => 'expire_job', table => 't01' });
$r = Cd2Test::sync($node, 'many', tables => [ 't01', 't02' ], pre => 'SET cd2sync.job_rate = 0;');
is(join(',', map { "$_:$r->{$_}{mode}:$r->{$_}{error}" } sort keys %$r), 't01:unchanged:,t02:unchanged:',
	'a job gone upstream is started again');
is($node->safe_psql('postgres', "SELECT string_agg(table_name, ',' ORDER BY finished_at) FROM cd2sync.sync_log "
	  . "WHERE run_id = (SELECT max(run_id) FROM cd2sync.runs)"), 't02,t01',
	'the other table was loaded while the restarted job ran upstream');
is($node->safe_psql('postgres', "SELECT count(*) FROM cd2sync.sync_log "
	  . "WHERE run_id = (SELECT max(run_id) FROM cd2sync.runs) AND job_seconds >= $T * 2 - 0.5"), '1',
	'only the restarted table waited for two jobs');

$node->stop;
$emu->stop;
done_testing();
