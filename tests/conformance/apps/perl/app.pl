#!/usr/bin/env perl
# The conformance app (tests/conformance/EVENTS.md) on the Perl worker.
# EngineWorker.pm is found through ENGINE_PERL_LIB, else four folders up from here
# (tests/conformance/apps/perl -> workers/perl/lib).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../../../../workers/perl/lib";   # the fallback...
BEGIN { unshift @INC, $ENV{ENGINE_PERL_LIB} if $ENV{ENGINE_PERL_LIB} }   # ...after ENGINE_PERL_LIB
use EngineWorker;

# any value, unchanged: a single reply
on echo => sub { my ($data) = @_; return $data };

# {"n": N}: {"i": 0} ... {"i": N-1}, then the end of the stream
on count => sub {
    my ($data, $ctx) = @_;
    $ctx->stream;
    $ctx->chunk({ i => $_ }) for 0 .. $data->{n} - 1;
    return;
};

# an error of type TypeError, message "nope"
on fail => sub { die EngineWorker::Error->new(type => 'TypeError', message => 'nope') };

# a chunked request: start plus every chunk
on sum => sub {
    my ($start, $ctx) = @_;
    my $sum = $start;
    while (my ($chunk) = $ctx->next_chunk) { $sum += $chunk }
    return $sum;
};

# 0, 1, 2, ... one about every 10 ms, until cancelled
on ticks => sub {
    my (undef, $ctx) = @_;
    my $i = 0;
    while (1) {
        $ctx->chunk($i++);
        $ctx->sleep(0.01);
    }
};

# "rested" after that many seconds (a CANCEL stops the nap)
on nap => sub {
    my ($seconds, $ctx) = @_;
    $ctx->sleep($seconds);
    return 'rested';
};

# stops itself: nothing more is sent, heartbeats included
on hang => sub { kill 'STOP', $$; return };

# its last words on stderr, then exit status 3
on crash => sub {
    my ($s) = @_;
    print STDERR "last words: $s\n";
    STDERR->flush;
    exit 3;
};

on pid => sub { return $$ + 0 };

run();
