#!/usr/bin/env perl
# The app of docs/protocol.md §12 (echo, count, fail, nap, sum) plus a few test events.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../../lib";
use EngineWorker qw(bytes);
use Time::HiRes ();
BEGIN { $EngineWorker::BINARY_OBJECTS = 1 if $ENV{TEST_BINARY_OBJECTS} }   # as use EngineWorker ':binary_objects'

on echo  => sub { my ($data) = @_; return $data };
on count => sub { my ($data, $ctx) = @_; $ctx->stream; $ctx->chunk({ i => $_ }) for 0 .. $data->{n} - 1; return };
on fail  => sub { die EngineWorker::Error->new(type => 'TypeError', message => 'nope') };
on nap   => sub { my ($s, $ctx) = @_; $ctx->sleep($s); return 'rested' };
on sum   => sub { my ($s, $ctx) = @_; while (my ($c) = $ctx->next_chunk) { $s += $c } return $s };

if ($ENV{TEST_EXTRA}) {
    # computes for that many seconds without calling into the library
    on spin  => sub { my ($s) = @_; my $end = Time::HiRes::time() + $s; my $x = 0; $x++ while Time::HiRes::time() < $end; return $x > 0 ? 'spun' : 'no' };
    on print => sub { print "this goes to stderr, not the link\n"; return 'printed' };
    on bin   => sub { return bytes('ab') };
    on big   => sub { return 'x' x (17 * 1024 * 1024) };
    on code  => sub { return sub { 1 } };
    on dies  => sub { die "plain death\n" };
    on hash  => sub { die { type => 'KeyError', message => 'no such key' } };
    on nums  => sub { my $n = 5; my $s = "n=$n"; my $str = "42"; my $x = $str + 0; return [$n, $str, 2.5, -33, 1 << 40, !!1, !!0] };
    on slow  => sub { my ($n, $ctx) = @_; $ctx->stream; for my $i (1 .. $n) { $ctx->chunk($i) } return };
    on take  => sub { my ($n, $ctx) = @_; my @got; while (@got < $n and my ($c) = $ctx->next_chunk) { push @got, $c } return \@got };
    on sleepy => sub { my ($s) = @_; my $t0 = Time::HiRes::time(); Time::HiRes::sleep($s); return Time::HiRes::time() - $t0 };
    on stop  => sub { kill 'STOP', $$; return 'continued' };
    on quit  => sub { exit 3 };
    on leave => sub { exit 0 };
    on what  => sub { my ($b) = @_; return [ref($b), length($b), "$b" eq 'ab' ? 1 : 0] };
    on ask   => sub { my (undef, $ctx) = @_; my $i = 0; while (!$ctx->cancelled) { $i++ } return "noticed" };
}
die "boom at start-up\n" if $ENV{TEST_DIE_AT_START};
run();
