#!/usr/bin/env perl
# An echo app on the Perl worker (workers/perl/README.md).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../../lib";   # the fallback...
BEGIN { unshift @INC, $ENV{ENGINE_PERL_LIB} if $ENV{ENGINE_PERL_LIB} }   # ...after ENGINE_PERL_LIB
use EngineWorker;

on echo => sub { my ($data) = @_; return $data };

on upper => sub { my ($text) = @_; return uc $text };

# a streamed reply: {"i": 0} .. {"i": n-1}
on count => sub {
    my ($data, $ctx) = @_;
    $ctx->stream;
    $ctx->chunk({ i => $_ }) for 0 .. ($data->{n} // 0) - 1;
    return;
};

# a chunked request: start + every chunk
on sum => sub {
    my ($start, $ctx) = @_;
    my $sum = $start // 0;
    while (my ($chunk) = $ctx->next_chunk) { $sum += $chunk }
    return $sum;
};

on fail => sub { die EngineWorker::Error->new(type => 'TypeError', message => 'nope') };

run();
