#!/usr/bin/env perl
# Drives the worker over a socketpair as a node would (docs/protocol.md), without a node.
#   prove -v workers/perl/t/          (or: perl workers/perl/t/protocol.t)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/../lib";
use Test::More;
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);
use Fcntl qw(F_GETFD F_SETFD FD_CLOEXEC);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
require EngineWorker;                       # no import: this process is not a worker

my $APP = "$FindBin::RealBin/apps/session.pl";

# --- a fake node ---------------------------------------------------------------------

sub spawn {
    my (%env) = @_;
    socketpair(my $node, my $worker, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        close $node;
        my $stdio = delete $env{STDIO};
        if ($stdio) {
            open(STDIN, '<&', $worker) or die;
            open(STDOUT, '>&', $worker) or die;
            $ENV{ENGINE_LINK} = 'stdio';
        } else {
            fcntl($worker, F_SETFD, fcntl($worker, F_GETFD, 0) & ~FD_CLOEXEC);
            $ENV{ENGINE_LINK} = 'fd:' . fileno($worker);
        }
        $ENV{ENGINE_PROTOCOL} = 1;
        $ENV{ENGINE_HEARTBEAT} = '10.000';
        $ENV{ENGINE_CONCURRENCY} = 1;
        $ENV{ENGINE_APP} = 'echo';
        $ENV{ENGINE_PARENT_PID} = getppid();
        @ENV{ keys %env } = values %env;
        open(STDERR, '>>', '/tmp/engineworker-test.stderr');
        exec($^X, $APP) or die "exec: $!";
    }
    close $worker;
    return { sock => $node, pid => $pid, buf => '' };
}

sub frame_of { my $body = join('', @_); return pack('N', length $body) . $body }

sub send_raw { my ($w, $bytes) = @_; syswrite($w->{sock}, $bytes) == length $bytes or die "write: $!" }

sub send_env {          # send_env($w, [kind, sid, body], ...): one frame
    my ($w, @envs) = @_;
    send_raw($w, frame_of(EngineWorker::_array_header(scalar @envs),
                          map { EngineWorker::_envelope(@$_) } @envs));
}

sub read_frame {        # the next frame's body (raw bytes), or undef at end-of-file/timeout
    my ($w, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (1) {
        if (length($w->{buf}) >= 4) {
            my $len = unpack('N', $w->{buf});
            if (length($w->{buf}) >= 4 + $len) {
                my $f = substr($w->{buf}, 0, 4 + $len, '');
                return substr($f, 4);
            }
        }
        my $left = $end - time;
        return undef if $left <= 0;
        my $rin = '';
        vec($rin, fileno($w->{sock}), 1) = 1;
        next unless select(my $r = $rin, undef, undef, $left) > 0;
        my $n = sysread($w->{sock}, $w->{buf}, 65536, length $w->{buf});
        return undef unless $n;
    }
}

sub envs {              # the next frame's envelopes, decoded, without heartbeats
    my ($w, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (1) {
        my $left = $end - time;
        return if $left <= 0;
        my $body = read_frame($w, $left) // return;
        my @e = grep { $_->[0] != 2 } @{ EngineWorker::_pp_decode($body) };
        return @e if @e;
    }
}

sub next_env { my @e = envs(@_); return $e[0] }

sub handshake {
    my ($w) = @_;
    my $hs = next_env($w);
    is($hs->[0], 1, 'HANDSHAKE first') or diag explain $hs;
    return $hs;
}

sub finish {            # exit status of the worker (waits up to 5 s)
    my ($w, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (time < $end) {
        my $r = waitpid($w->{pid}, WNOHANG);
        return $? >> 8 if $r == $w->{pid};
        sleep 0.02;
    }
    kill 'KILL', $w->{pid};
    waitpid($w->{pid}, 0);
    return 'killed';
}

sub hex_of { my $h = shift; $h =~ s/\s+//g; return pack('H*', $h) }

# --- §12, byte by byte ----------------------------------------------------------------

subtest 'the session of §12, byte by byte' => sub {
    my $w = spawn();
    my $hs = read_frame($w);
    my $pid = pack('n', $w->{pid});
    my $expect = hex_of('91 93 01 00 86 a7 76 65 72 73 69 6f 6e 01 a3 70 69 64 cd')
        . $pid . hex_of('a3 61 70 70 a4 65 63 68 6f ab 63 6f 6e 63 75 72 72 65 6e 63 79 01
        a6 65 76 65 6e 74 73 95 a5 63 6f 75 6e 74 a4 65 63 68 6f a4 66 61 69 6c a3 6e 61 70
        a3 73 75 6d a6 77 69 6e 64 6f 77 40');
    SKIP: {
        skip 'the pid needs 2 bytes for this comparison', 1 unless $w->{pid} >= 256 && $w->{pid} < 65536;
        is(unpack('H*', $hs), unpack('H*', $expect), '#1 HANDSHAKE');
    }
    is(unpack('H*', read_frame($w)), '9193020081a4' . unpack('H*', 'jobs') . '00', '#2 HEARTBEAT {"jobs": 0}');
    my @steps = (
        ['0000000d 91 93 03 01 92 a4 65 63 68 6f a2 68 69', ['91 93 08 01 a2 68 69'], '#3-#4 echo'],
        ['0000000f 91 93 03 02 92 a5 63 6f 75 6e 74 81 a1 6e 02',
         ['91 93 04 02 81 a1 69 00', '91 93 04 02 81 a1 69 01', '91 93 06 02 c0'], '#5-#8 count'],
        ['0000000d 91 93 03 03 92 a6 6e 6f 73 75 63 68 c0',
         ['91 93 05 03 84 a4 63 6f 64 65 ad 75 6e 6b 6e 6f 77 6e 2d 65 76 65 6e 74 a4 74 79 70 65 ac 55 6e
           6b 6e 6f 77 6e 45 76 65 6e 74 a7 6d 65 73 73 61 67 65 d9 56 6e 6f 20 68 61 6e 64 6c 65 72 20 66
           6f 72 20 65 76 65 6e 74 20 27 6e 6f 73 75 63 68 27 3b 20 74 68 65 20 61 70 70 20 68 61 6e 64 6c
           65 73 20 5b 27 63 6f 75 6e 74 27 2c 20 27 65 63 68 6f 27 2c 20 27 66 61 69 6c 27 2c 20 27 6e 61
           70 27 2c 20 27 73 75 6d 27 5d a9 72 65 74 72 79 61 62 6c 65 c2'], '#9-#10 unknown event'],
        ['0000000b 91 93 03 04 92 a4 66 61 69 6c c0',
         ['91 93 05 04 84 a4 63 6f 64 65 a7 68 61 6e 64 6c 65 72 a4 74 79 70 65 a9 54 79 70 65 45 72 72 6f
           72 a7 6d 65 73 73 61 67 65 a4 6e 6f 70 65 a9 72 65 74 72 79 61 62 6c 65 c2'], '#11-#12 fail'],
        ['0000000b 91 93 03 05 93 a3 73 75 6d 00 c3  00000005 91 93 04 05 01  00000005 91 93 04 05 02
          00000005 91 93 06 05 c0', ['91 93 08 05 03'], '#13-#18 sum (no CREDIT for 2 chunks)'],
        ['0000000a 91 93 03 06 92 a3 6e 61 70 1e', [], '#19 nap'],
        ['00000005 91 93 0b 06 c0',
         ['91 93 05 06 84 a4 63 6f 64 65 a9 63 61 6e 63 65 6c 6c 65 64 a4 74 79 70 65 ac 4a 6f 62 43 61 6e
           63 65 6c 6c 65 64 a7 6d 65 73 73 61 67 65 b5 63 61 6e 63 65 6c 6c 65 64 20 62 79 20 74 68 65 20
           6e 6f 64 65 a9 72 65 74 72 79 61 62 6c 65 c2'], '#20-#21 nap cancelled'],
        ['00000015 92 93 03 07 92 a4 65 63 68 6f 01 93 03 08 92 a4 65 63 68 6f 02',
         ['91 93 08 07 01', '91 93 08 08 02'], 'two envelopes in one frame'],
        ['00000005 91 93 07 00 c0', ['91 93 07 00 c0'], '#22-#23 TERMINATE'],
    );
    for my $step (@steps) {
        my ($in, $outs, $name) = @$step;
        send_raw($w, hex_of($in));
        sleep 0.2 unless @$outs;
        my @got;
        while (@got < @$outs) {
            my $f = read_frame($w) // last;
            next if substr($f, 0, 3) eq "\x91\x93\x02";     # heartbeats
            push @got, unpack('H*', $f);
        }
        is_deeply(\@got, [map { my $h = $_; $h =~ s/\s+//g; $h } @$outs], $name);
    }
    is(finish($w), 0, 'exit status 0 after TERMINATE');
};

# --- framing ----------------------------------------------------------------------------

subtest 'frames split across reads, one byte at a time' => sub {
    my $w = spawn();
    handshake($w);
    my $bytes = hex_of('0000000d 91 93 03 01 92 a4 65 63 68 6f a2 68 69 00000015 92 93 03 07 92 a4 65 63 68 6f 01 93 03 08 92 a4 65 63 68 6f 02');
    for my $b (split //, $bytes) { send_raw($w, $b); sleep 0.001 }
    is_deeply([map { [@$_] } envs($w), envs($w), envs($w)], [[8, 1, 'hi'], [8, 7, 1], [8, 8, 2]], 'all answered in order');
    send_raw($w, hex_of('00000001 90') . hex_of('00000000'));     # an empty body is dropped
    send_raw($w, hex_of('00000003 92 01 02'));                      # not envelopes: dropped
    send_raw($w, hex_of('00000002 91 c1'));                         # not msgpack: dropped
    send_env($w, [99, 1, 'x'], [8, 2, 'a result?'], [2, 0, {}]);    # unknown / worker-only kinds
    send_env($w, [3, 9, 'not an array'], [3, 10, [1, 2]], [3, 11, ['echo']]);
    my @bad = map { next_env($w) } 1 .. 3;
    is_deeply([map { [$_->[1], $_->[2]{code}] } @bad], [[9, 'bad-message'], [10, 'bad-message'], [11, 'bad-message']], 'bad INVOKEs answered bad-message');
    send_env($w, [3, 12, ['echo', 'x', 'not true']]);
    is_deeply(next_env($w), [8, 12, 'x'], 'a third item but true makes a plain request');
    send_env($w, [3, 13, ['echo', 'still here']]);
    is_deeply(next_env($w), [8, 13, 'still here'], 'serves on');
    close $w->{sock};
    is(finish($w), 0, 'end-of-file: exit 0');
};

subtest 'a length over 16 MiB: exit 4' => sub {
    my $w = spawn();
    handshake($w);
    send_raw($w, pack('N', 16 * 1024 * 1024 + 1));
    is(finish($w), 4, 'exit status 4');
};

# --- types --------------------------------------------------------------------------------

subtest 'msgpack types' => sub {
    my $w = spawn(TEST_EXTRA => 1);
    handshake($w);
    my @cases = (
        ['bin stays bin',          'c4 03 00 ff 01',        'c4 03 00 ff 01'],
        ['bin of UTF-8 bytes',     'c4 02 c3 a9',           'a2 c3 a9'],     # Perl cannot tell: see README
        ['str stays str',          'a2 c3 a9',              'a2 c3 a9'],
        ['ascii str',              'a2 68 69',              'a2 68 69'],
        ['ints',                   '94 05 cc c8 cd 01 2c ce 00 01 11 70', '94 05 cc c8 cd 01 2c ce 00 01 11 70'],
        ['negative ints',          '94 ff e0 d0 df d1 ff 7f', '94 ff e0 d0 df d1 ff 7f'],
        ['uint64',                 'cf ff ff ff ff ff ff ff ff', 'cf ff ff ff ff ff ff ff ff'],
        ['int64',                  'd3 80 00 00 00 00 00 00 00', 'd3 80 00 00 00 00 00 00 00'],
        ['float',                  'cb 3f f8 00 00 00 00 00 00', 'cb 3f f8 00 00 00 00 00 00'],
        ['float32 comes back as 64', 'ca 3f c0 00 00',      'cb 3f f8 00 00 00 00 00 00'],
        ['booleans and nil',       '93 c3 c2 c0',           '93 c3 c2 c0'],
        ['ext (timestamp)',        'd6 ff 00 00 00 01',     'd6 ff 00 00 00 01'],
        ['ext8',                   'c7 03 05 61 62 63',     'c7 03 05 61 62 63'],
    );
    my $sid = 100;
    for my $c (@cases) {
        my ($name, $in, $out) = @$c;
        $sid++;
        my $body = hex_of(sprintf("91 93 03 %02x 92", $sid) . " a4 65 63 68 6f $in");
        send_raw($w, frame_of($body));
        my $f;
        do { $f = read_frame($w) } while defined $f && substr($f, 0, 3) eq "\x91\x93\x02";
        (my $o = $out) =~ s/\s+//g;
        is(unpack('H*', $f // ''), '919308' . sprintf('%02x', $sid) . $o, "echo: $name");
    }
    my %m = (hi => 1);
    send_env($w, [3, 1, ['nums', undef]]);
    is(unpack('H*', substr(read_frame($w), 4)), '97' . '05' . 'a23432' . 'cb4004000000000000' . 'd0df' . 'cf0000010000000000' . 'c3c2',
       'numbers stay numbers, strings strings (even printed or used as numbers), !!1 is true');
    send_env($w, [3, 2, ['bin', undef]]);
    is(unpack('H*', substr(read_frame($w), 4)), 'c4026162', 'bytes() forces bin');
    send_env($w, [3, 3, ['big', undef]]);
    my $e = next_env($w);
    is_deeply([$e->[1], $e->[2]{code}], [3, 'bad-message'], 'an answer over 16 MiB: bad-message');
    like($e->[2]{message}, qr/stream of chunks/, '...saying to stream it');
    send_env($w, [3, 4, ['code', undef]]);
    $e = next_env($w);
    is_deeply([$e->[1], $e->[2]{code}], [4, 'bad-message'], 'a value msgpack cannot carry: bad-message');
    send_env($w, [3, 5, ['dies', undef]]);
    $e = next_env($w);
    is_deeply($e->[2], { code => 'handler', type => 'Error', message => 'plain death', retryable => EngineWorker::false() }, 'die "string"');
    send_env($w, [3, 6, ['hash', undef]]);
    $e = next_env($w);
    is_deeply([@{ $e->[2] }{qw(type message)}], ['KeyError', 'no such key'], 'die {type, message}');
    send_env($w, [3, 7, ['print', undef]]);
    is_deeply(next_env($w), [8, 7, 'printed'], 'print goes to stderr (fd link)');
    send_env($w, [7, 0, undef]);
    is_deeply(next_env($w), [7, 0, undef], 'TERMINATE');
    is(finish($w), 0, 'exit 0');
};

subtest 'the stdio link' => sub {
    my $w = spawn(TEST_EXTRA => 1, STDIO => 1);
    handshake($w);
    send_env($w, [3, 1, ['print', undef]]);
    is_deeply(next_env($w), [8, 1, 'printed'], 'a print does not break the framing');
    send_env($w, [3, 2, ['count', { n => 3 }]]);
    is_deeply([map { next_env($w) } 1 .. 4], [[4, 2, { i => 0 }], [4, 2, { i => 1 }], [4, 2, { i => 2 }], [6, 2, undef]], 'a stream');
    close $w->{sock};
    is(finish($w), 0, 'end-of-file: exit 0');
};

# --- windows -----------------------------------------------------------------------------

subtest 'the stream window and CREDIT' => sub {
    my $w = spawn(TEST_EXTRA => 1, ENGINE_HEARTBEAT => '0.2');
    handshake($w);
    send_env($w, [3, 1, ['slow', 200]]);
    my @got;
    while (my $e = next_env($w, 1)) { push @got, $e }
    is(scalar @got, 64, 'stops at 64 chunks without credit');
    my $beats = 0;
    my $end = time + 0.7;
    while (time < $end) { my $f = read_frame($w, $end - time) // last; $beats++ if substr($f, 0, 3) eq "\x91\x93\x02" }
    cmp_ok($beats, '>=', 2, "heartbeats while waiting for CREDIT ($beats in 0.7 s)");
    send_env($w, [30, 1, 16]);
    @got = ();
    while (my $e = next_env($w, 0.5)) { push @got, $e }
    is(scalar @got, 16, 'CREDIT 16: 16 more');
    send_env($w, [30, 1, '16'], [30, 1, 0], [30, 1, -5], [30, 1, 1.5]);
    ok(!defined next_env($w, 0.5), 'CREDIT that is not an integer > 0 is ignored');
    send_env($w, [30, 1, 200]);
    @got = ();
    while (my $e = next_env($w, 1)) { push @got, $e; last if $e->[0] == 6 }
    is(scalar @got, 121, 'the rest, then CHOKE');
    is($got[-1][0], 6, 'CHOKE last');
    send_env($w, [3, 2, ['slow', 100]], [11, 2, undef]);
    @got = ();
    while (my $e = next_env($w, 1)) { push @got, $e; last if $e->[0] == 5 }
    is_deeply([$got[-1][1], $got[-1][2]{code}], [2, 'cancelled'], 'a CANCEL stops a stream');
    send_env($w, [3, 3, ['slow', 100]]);
    @got = ();
    while (my $e = next_env($w, 0.5)) { push @got, $e }
    is(scalar @got, 64, 'a stream waiting for credit...');
    send_env($w, [11, 3, undef]);
    is_deeply([@{ next_env($w) }[0, 1]], [5, 3], '...is cancelled too');
    close $w->{sock};
    is(finish($w), 0, 'exit 0');
};

subtest 'a chunked request: CREDIT as the handler takes chunks' => sub {
    my $w = spawn(TEST_EXTRA => 1);
    handshake($w);
    send_env($w, [3, 1, ['sum', 0, EngineWorker::true()]]);
    my ($sent, $granted, $sum) = (0, 0, 0);
    while ($sent < 300) {
        while ($sent < 300 && $sent < 64 + $granted) { send_env($w, [4, 1, $sent]); $sum += $sent; $sent++ }
        last if $sent == 300;
        my $e = next_env($w, 2) or last;
        is($e->[0], 30, 'CREDIT') or last;
        $granted += $e->[2];
    }
    send_env($w, [6, 1, undef]);
    my $e;
    do { $e = next_env($w) } while $e && $e->[0] == 30;
    is_deeply($e, [8, 1, $sum], "300 chunks summed ($granted granted)");
    # more than 64 beyond the credit: bad-message
    send_env($w, [3, 2, ['take', 1, EngineWorker::true()]], map { [4, 2, $_] } 1 .. 65);
    $e = next_env($w);
    is_deeply([$e->[1], $e->[2]{code}], [2, 'bad-message'], '65 chunks without credit: bad-message');
    # answered before the CHOKE: what follows is ignored
    send_env($w, [3, 3, ['take', 2, EngineWorker::true()]], [4, 3, 'a'], [4, 3, 'b']);
    is_deeply(next_env($w), [8, 3, ['a', 'b']], 'answered before its CHOKE');
    send_env($w, [4, 3, 'c'], [6, 3, undef], [3, 4, ['echo', 'ok']]);
    is_deeply(next_env($w), [8, 4, 'ok'], 'later chunks ignored');
    # a nil chunk is a chunk
    send_env($w, [3, 5, ['take', 5, EngineWorker::true()]], [4, 5, undef], [4, 5, 1], [6, 5, undef]);
    is_deeply(next_env($w), [8, 5, [undef, 1]], 'nil chunks are chunks');
    # a plain request to a chunk reader: no chunks
    send_env($w, [3, 6, ['sum', 7]]);
    is_deeply(next_env($w), [8, 6, 7], 'plain request: no chunks');
    close $w->{sock};
    is(finish($w), 0, 'exit 0');
};

# --- queue, cancel, terminate ----------------------------------------------------------

subtest 'prefetched jobs, CANCEL, TERMINATE' => sub {
    my $w = spawn(TEST_EXTRA => 1);
    handshake($w);
    send_env($w, [3, 1, ['nap', 0.5]], [3, 2, ['echo', 'second']], [3, 3, ['echo', 'third']],
             [3, 4, ['sum', 1, EngineWorker::true()]], [4, 4, 2]);
    send_env($w, [11, 3, undef]);
    my $e = next_env($w);
    is_deeply([$e->[1], $e->[2]{code}, $e->[2]{message}], [3, 'cancelled', 'cancelled by the node before it started'], 'a queued job cancelled at once');
    send_env($w, [3, 2, ['echo', 'dup']]);
    $e = next_env($w);
    is_deeply([$e->[1], $e->[2]{code}], [2, 'bad-message'], 'a sid in use: bad-message');
    like($e->[2]{message}, qr/sid 2 is already in use/, '...saying so');
    send_env($w, [6, 4, undef]);
    is_deeply(next_env($w), [8, 1, 'rested'], 'the nap');
    is_deeply(next_env($w), [8, 2, 'second'], 'then the queue, in order');
    is_deeply(next_env($w), [8, 4, 3], 'chunks held while queued');
    send_env($w, [11, 2, undef], [30, 2, 5]);                       # answered already: ignored
    send_env($w, [3, 5, ['nap', 5]], [3, 6, ['echo', 'x']], [3, 7, ['echo', 'y']]);
    sleep 0.2;
    send_env($w, [7, 0, undef], [3, 8, ['echo', 'after terminate']]);
    my @e = map { next_env($w) } 1 .. 3;
    is_deeply([map { [$_->[0], $_->[1], ref $_->[2] ? $_->[2]{code} : undef] } @e],
              [[5, 6, 'shutting-down'], [5, 7, 'shutting-down'], [7, 0, undef]], 'TERMINATE: the queue answered shutting-down, then TERMINATE');
    ok($e[0][2]{retryable}, 'shutting-down is retryable');
    is(finish($w), 0, 'exit 0, the running nap abandoned');
};

subtest 'heartbeats while a handler computes' => sub {
    my $w = spawn(TEST_EXTRA => 1, ENGINE_HEARTBEAT => '0.2');
    handshake($w);
    send_env($w, [3, 1, ['spin', 1.5]]);
    my ($beats, @other) = (0);
    my $t0 = time;
    while (1) {
        my $f = read_frame($w, 3) // last;
        my $e = EngineWorker::_pp_decode($f)->[0];
        if ($e->[0] == 2) { $beats++; is($e->[2]{jobs}, 1, 'jobs: 1') if $beats == 3 } else { push @other, $e; last }
    }
    cmp_ok($beats, '>=', 5, "$beats heartbeats in a 1.5 s computation (every 0.2 s)");
    is_deeply($other[0], [8, 1, 'spun'], 'then its answer');
    send_env($w, [3, 2, ['ask', undef]]);
    sleep 0.1;
    send_env($w, [11, 2, undef]);
    is_deeply(next_env($w), [8, 2, 'noticed'], '$ctx->cancelled sees the CANCEL');
    close $w->{sock};
    is(finish($w), 0, 'exit 0');
};

subtest 'a plain sleep sleeps its whole time, with heartbeats; a stopped worker is silent' => sub {
    my $w = spawn(TEST_EXTRA => 1, ENGINE_HEARTBEAT => '0.2');
    handshake($w);
    send_env($w, [3, 1, ['sleepy', 1.2]]);
    my ($beats, $answer) = (0);
    while (my $f = read_frame($w, 3)) {
        my $e = EngineWorker::_pp_decode($f)->[0];
        if ($e->[0] == 2) { $beats++ } else { $answer = $e; last }
    }
    cmp_ok($answer->[2], '>=', 1.19, "Time::HiRes::sleep(1.2) slept $answer->[2] s");
    cmp_ok($beats, '>=', 4, "$beats heartbeats meanwhile");
    send_env($w, [3, 2, ['stop', undef]]);
    my $end = time + 0.5;                                           # drain what came before
    while (time < $end) { read_frame($w, $end - time) }
    $end = time + 1;
    my $silent = 1;
    while (time < $end) { if (defined read_frame($w, $end - time)) { $silent = 0; last } }
    ok($silent, 'nothing (no heartbeat) for 1 s while stopped');
    kill 'CONT', $w->{pid};
    is_deeply(next_env($w), [8, 2, 'continued'], 'SIGCONT: it goes on');
    send_env($w, [3, 3, ['quit', undef]]);
    is(finish($w), 3, 'exit 3 from a handler keeps its status');
    my @left = grep { /heartbeat helper of $w->{pid}/ } `ps -eo args`;
    is(scalar @left, 0, 'the heartbeat helper is gone');
};

subtest 'exit 0 from a handler: the queue answered, TERMINATE (§10.2)' => sub {
    my $w = spawn(TEST_EXTRA => 1);
    handshake($w);
    send_env($w, [3, 1, ['leave', undef]], [3, 2, ['echo', 'queued']]);
    my @e = (next_env($w), next_env($w));
    is_deeply([map { [$_->[0], $_->[1]] } @e], [[5, 2], [7, 0]], 'shutting-down for the queued job, then TERMINATE');
    is(finish($w), 0, 'exit 0');
};

subtest "':binary_objects': bin round-trips exactly" => sub {
    my $w = spawn(TEST_EXTRA => 1, TEST_BINARY_OBJECTS => 1);
    handshake($w);
    for my $hex ('c4 02 61 62', 'c4 02 c3 a9', 'a2 61 62', '81 a1 6b c4 00') {
        send_raw($w, frame_of(hex_of("91 93 03 01 92 a4 65 63 68 6f $hex")));
        (my $h = $hex) =~ s/\s+//g;
        my $f;
        do { $f = read_frame($w) } while defined $f && substr($f, 0, 3) eq "\x91\x93\x02";
        is(unpack('H*', substr($f // '', 4)), $h, "echo $hex");
    }
    send_raw($w, frame_of(hex_of('91 93 03 02 92 a4 77 68 61 74 c4 02 61 62')));
    is_deeply(next_env($w), [8, 2, ['EngineWorker::Bytes', 2, 1]], 'an object that acts as its bytes');
    close $w->{sock};
    is(finish($w), 0, 'exit 0');
};

# --- start-up -----------------------------------------------------------------------------

subtest 'start-up failures' => sub {
    my $w = spawn(TEST_DIE_AT_START => 1);
    my $e = next_env($w);
    is_deeply([@$e[0, 1]], [5, 0], 'ERROR on sid 0');
    is_deeply([@{ $e->[2] }{qw(code type message)}], ['handler', 'Error', 'boom at start-up'], '...with the reason');
    is(finish($w), 3, 'exit 3');
    $w = spawn(ENGINE_PROTOCOL => 2);
    $e = next_env($w);
    is_deeply([@$e[0, 1], $e->[2]{type}], [5, 0, 'UnsupportedProtocol'], 'another protocol: ERROR on sid 0');
    is(finish($w), 3, 'exit 3');
};

done_testing;
