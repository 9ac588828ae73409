package EngineWorker;
# A worker for the engine's slave protocol, version 1 (docs/protocol.md), in Perl.
#
#   use EngineWorker;
#   on echo  => sub { my ($data) = @_; return $data };
#   on count => sub { my ($data, $ctx) = @_; $ctx->stream; $ctx->chunk({i => $_}) for 0 .. $data->{n} - 1; return };
#   on fail  => sub { die EngineWorker::Error->new(type => "TypeError", message => "nope") };
#   on sum   => sub { my ($s, $ctx) = @_; while (my ($c) = $ctx->next_chunk) { $s += $c } return $s };
#   run();
#
# One job at a time (the HANDSHAKE offers concurrency 1); a handler runs inline in the
# process.  While it runs, a forked helper process writes the heartbeats on the link
# (whole frames, under an flock shared with this process), and every call the handler
# makes into the library reads the link (CANCEL, CREDIT...) and beats when one is due.
# See workers/perl/README.md.
use strict;
use warnings;

use B ();
use Fcntl qw(:flock);
use Carp ();
use Encode ();
use IO::Handle ();
use POSIX ();
use Scalar::Util ();
use Time::HiRes ();

our $VERSION = '1.0';

use constant {
    PROTOCOL_VERSION => 1,
    WINDOW           => 64,        # the stream window, both ways (§7, §8)
    CREDIT_BATCH     => 16,        # request chunks granted at a time (§8)
    MAX_FRAME        => 16 * 1024 * 1024,          # a frame body's largest length (§2.2)
    MAX_ENVELOPE     => 16 * 1024 * 1024 - 5,      # the largest answer envelope (§6.4)
    K_HANDSHAKE => 1, K_HEARTBEAT => 2, K_INVOKE => 3, K_CHUNK => 4, K_ERROR => 5,
    K_CHOKE     => 6, K_TERMINATE => 7, K_RESULT => 8, K_CANCEL => 11, K_CREDIT => 30,
};

my $HAVE_XS = eval { require Data::MessagePack; 1 } ? 1 : 0;
my $XS = $HAVE_XS ? Data::MessagePack->new : undef;   # no ->utf8: str decoded, bin kept as bytes
my $HAVE_IS_BOOL = defined &builtin::is_bool ? 1 : 0;
my $CLOCK = eval { Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()); 1 } ? 1 : 0;

# ---------------------------------------------------------------------------------------
# state of the process (one worker per process)

our %HANDLERS;                  # event (a character string) -> code ref
my $MAIN_PID;                   # the pid that owns the link (a forked child never writes)
my ($IN, $OUT);                 # the link: read and write handles (the same socket)
my $LINK_ERROR;                 # why the link could not be opened
my $RBUF = '';                  # bytes read and not yet framed
my $HEARTBEAT = 10;             # seconds between two heartbeats (ENGINE_HEARTBEAT)
my $NEXT_BEAT = 0;              # when the next heartbeat is due (monotonic seconds)
my ($HELPER_PID, $HELPER_CTL, $LOCK);  # the heartbeat helper, its control pipe, the write lock
my ($RUN_CALLED, $HANDSHAKEN, $DONE) = (0, 0, 0);
my ($EOF, $TERMINATING) = (0, 0);
my $STARTUP_ERROR;              # the last die outside an eval before run()
our $BINARY_OBJECTS = 0;        # bin arrives as EngineWorker::Bytes objects (':binary_objects')
my %JOBS;                       # sid -> job, queued or running
my @QUEUE;                      # jobs queued (prefetched), first in first out
my $RUNNING;                    # the job whose handler runs, or undef

sub _now { $CLOCK ? Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()) : Time::HiRes::time() }

sub _stderr {
    my ($msg) = @_;
    $msg = "$msg";
    utf8::encode($msg) if utf8::is_utf8($msg);
    $msg .= "\n" unless $msg =~ /\n\z/;
    syswrite(STDERR, "EngineWorker: $msg");
}

# ---------------------------------------------------------------------------------------
# the public interface

sub import {
    my $class = shift;
    my $caller = caller;
    my %want = map { $_ => 1 } @_;
    $BINARY_OBJECTS = 1 if $want{':binary_objects'};
    no strict 'refs';
    for my $name (qw(on run)) {
        *{"${caller}::$name"} = \&{"EngineWorker::$name"};
    }
    for my $name (grep { $want{$_} } qw(bytes text true false log_line)) {
        *{"${caller}::$name"} = \&{"EngineWorker::$name"};
    }
    _setup() unless defined $MAIN_PID;
}

# on(event => sub { ... }, ...): registers handlers; a later one for the same event wins.
sub on {
    Carp::croak("on: expected pairs of event => code ref") if !@_ || @_ % 2;
    while (my ($event, $code) = splice(@_, 0, 2)) {
        Carp::croak("on: the handler of '$event' is not a code ref") if ref $code ne 'CODE';
        $HANDLERS{_text_of($event)} = $code;
    }
    return;
}

# bytes($string): sends it as msgpack bin, whatever it holds.
sub bytes { my ($s) = @_; return bless \(my $copy = defined $s ? "$s" : ''), 'EngineWorker::Bytes' }

# text($string): sends it as msgpack str (bytes that are not UTF-8 are read as Latin-1).
sub text { my ($s) = @_; return bless \(my $copy = _text_of($s)), 'EngineWorker::Text' }

sub true  { $HAVE_XS ? Data::MessagePack::true()  : EngineWorker::Boolean::true() }
sub false { $HAVE_XS ? Data::MessagePack::false() : EngineWorker::Boolean::false() }

# log_line(LEVEL, message): a line of stderr the node logs at that level (§1).
sub log_line {
    my ($level, @msg) = @_;
    $level = uc($level // 'INFO');
    $level = 'INFO' unless $level =~ /\A(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\z/;
    my $app = $ENV{ENGINE_APP} // 'app';
    my $text = join('', @msg);
    utf8::encode($text) if utf8::is_utf8($text);
    my $out = join('', map { "\x1elog $level $app: $_\n" } split /\n/, ($text eq '' ? ' ' : $text));
    syswrite(STDERR, $out);
    return;
}

# ---------------------------------------------------------------------------------------
# start-up: the link, stdout, the capture of start-up errors

sub _setup {
    $MAIN_PID = $$;
    return if $^C;                              # perl -c: nothing to serve
    $SIG{PIPE} = 'IGNORE';                      # a write to a gone node must not kill us (§2.1)
    STDERR->autoflush(1);
    my $link = $ENV{ENGINE_LINK};
    $link = 'stdio' if !defined $link || $link eq '';
    if ($link eq 'stdio') {
        STDOUT->flush;
        # the link gets private descriptors; stdout goes to stderr, stdin to /dev/null,
        # so that an app's print cannot break the framing
        if (open(my $in, '<&', \*STDIN) and open(my $out, '>&', \*STDOUT)) {
            ($IN, $OUT) = ($in, $out);
            open(STDOUT, '>&', \*STDERR) or _stderr("cannot point stdout at stderr: $!");
            open(STDIN, '<', '/dev/null') or _stderr("cannot point stdin at /dev/null: $!");
        } else {
            $LINK_ERROR = "cannot take stdin/stdout as the link: $!";
        }
    } elsif ($link =~ /\Afd:(\d+)\z/) {
        my $fd = $1;
        if (open(my $sock, '+<&=', $fd)) {
            ($IN, $OUT) = ($sock, $sock);
            fcntl($sock, POSIX::F_SETFD(), POSIX::FD_CLOEXEC());  # not for the app's children
        } else {
            $LINK_ERROR = "cannot open descriptor $fd (ENGINE_LINK=$link): $!";
        }
    } else {
        $LINK_ERROR = "ENGINE_LINK must be 'stdio' or 'fd:N', not '$link'";
    }
    STDOUT->autoflush(1);
    if ($LINK_ERROR) {
        _stderr($LINK_ERROR);
        POSIX::_exit(3);                        # nothing can be said on a link we lack
    }
    binmode($IN, ':raw');
    binmode($OUT, ':raw');
    my $protocol = $ENV{ENGINE_PROTOCOL};
    if (defined $protocol && $protocol ne '' && $protocol ne PROTOCOL_VERSION) {
        my $msg = "the node speaks protocol version $protocol; this worker (EngineWorker.pm "
            . "$VERSION) speaks version " . PROTOCOL_VERSION;
        _stderr($msg);
        _startup_failure('UnsupportedProtocol', $msg);
        $DONE = 1;
        POSIX::_exit(3);
    }
    my $hb = $ENV{ENGINE_HEARTBEAT};
    $HEARTBEAT = $hb if defined $hb && $hb =~ /\A\s*(?:\d+\.?\d*|\.\d+)\s*\z/ && $hb > 0;
    $HEARTBEAT = 0.01 if $HEARTBEAT < 0.01;
    # a die outside any eval before run(): the reason of a failed start (sent from END)
    $SIG{__DIE__} = \&_capture_startup_error;
}

sub _capture_startup_error {
    $STARTUP_ERROR = $_[0] unless $^S || $RUN_CALLED;
}

sub _startup_failure {
    my ($type, $message) = @_;
    return unless $OUT;
    eval { _write_envelopes(_envelope(K_ERROR, 0, _error_body('handler', $type, $message))) };
}

END {
    if (defined $MAIN_PID && $$ == $MAIN_PID && $OUT && !$HANDSHAKEN && !$DONE && !$^C) {
        # the app did not get as far as its HANDSHAKE: a failed start (§4.4)
        my ($type, $message);
        if ($? == 0 && !$RUN_CALLED) {
            ($type, $message) = ('NoRun', 'the app ended without calling EngineWorker::run()');
            _stderr($message);
        } else {
            ($type, $message) = _describe_error(defined $STARTUP_ERROR ? $STARTUP_ERROR
                                                : "the app exited with status $? before its handshake");
            $type = 'CompileError' if $type eq 'Error' && $message =~ /compilation (?:aborted|errors)/;
            $type = 'ModuleNotFound' if $type eq 'Error' || $type eq 'CompileError'
                and $message =~ /\ACan't locate \S+\.pm in \@INC/;
            $message =~ s/ \(\@INC contains: [^)]*\)//;       # long, and on stderr already
        }
        _startup_failure($type, $message);
        $? = 3;
    } elsif (defined $MAIN_PID && $$ == $MAIN_PID && $HANDSHAKEN && !$DONE && !$EOF && $? == 0) {
        # the app exits on its own with status 0 (exit in a handler): say so (§10.2)
        _stop_helper();
        local $?;
        for my $job (@QUEUE) {
            _answer($job, K_ERROR, _error_body('shutting-down', 'ShuttingDown',
                    'the slave is exiting; the job never started', 1));
        }
        @QUEUE = ();
        _write_envelopes(_envelope(K_TERMINATE, 0, undef));
    }
    _stop_helper();
}

# ---------------------------------------------------------------------------------------
# run(): the handshake, then the frame loop (never returns)

sub run {
    Carp::croak("EngineWorker::run() called twice") if $RUN_CALLED;
    $RUN_CALLED = 1;
    $SIG{__DIE__} = 'DEFAULT' if ref $SIG{__DIE__} && $SIG{__DIE__} == \&_capture_startup_error;
    _start_helper();
    _write_envelopes(_envelope(K_HANDSHAKE, 0, _omap(
        version     => PROTOCOL_VERSION,
        pid         => $$ + 0,
        app         => _text_of($ENV{ENGINE_APP} // ''),
        concurrency => 1,                       # one job at a time: a handler blocks (§4.3)
        events      => [sort keys %HANDLERS],
        window      => WINDOW,
    )));
    $HANDSHAKEN = 1;
    _beat();                                    # the first heartbeat right away (§5)
    while (1) {
        _finish() if $EOF || $TERMINATING;
        if (!$RUNNING && @QUEUE) {
            _start(shift @QUEUE);
            next;
        }
        _pump(_until_beat());
    }
}

sub _until_beat { my $t = $NEXT_BEAT - _now(); return $t > 0 ? $t : 0 }

# the end: end-of-file (exit 0, answering nothing, §10.3) or TERMINATE (§10.1)
sub _finish {
    _stop_helper();
    if ($TERMINATING && !$EOF) {
        for my $job (@QUEUE) {
            _answer($job, K_ERROR, _error_body('shutting-down', 'ShuttingDown',
                    'the slave is exiting; the job never started', 1));
        }
        @QUEUE = ();
        _write_envelopes(_envelope(K_TERMINATE, 0, undef)) unless $EOF;
    }
    $DONE = 1;
    exit 0;
}

# ---------------------------------------------------------------------------------------
# heartbeats: this process beats from its loop (idle, or in a call the handler makes into
# the library); while a handler runs, the helper process beats too (§5)

sub _beat {
    return if $DONE || $EOF || !$HANDSHAKEN;
    $NEXT_BEAT = _now() + $HEARTBEAT;
    _write_envelopes(_envelope(K_HEARTBEAT, 0, _omap(jobs => $RUNNING ? 1 : 0)));
}

sub _beat_if_due { _beat() if _now() >= $NEXT_BEAT }

# The helper: a child forked once the app is loaded.  It learns from a pipe when a handler
# starts ("B") and ends ("I"); while one runs it writes a HEARTBEAT frame every
# ENGINE_HEARTBEAT seconds (the first after half of one), taking the write lock without
# waiting (or skipping that beat), and never while this process is stopped (SIGSTOP: a
# stopped slave must fall silent) or gone.  It ends at end-of-file on the pipe (this
# process exited), when its parent changes, or when it is killed with the group.
sub _start_helper {
    return if $ENV{ENGINE_PERL_NO_HELPER};
    my $lock;
    unless (open($lock, '+>', undef)) {         # an anonymous (unlinked) file: the lock
        _stderr("no heartbeat helper (cannot make its lock file: $!): heartbeats only "
                . 'when a handler calls into the library');
        return;
    }
    my ($ctl_r, $ctl_w);
    unless (pipe($ctl_r, $ctl_w)) {
        _stderr("no heartbeat helper (pipe: $!): heartbeats only when a handler calls into the library");
        return;
    }
    my $parent = $$;
    my $pid = fork;
    if (!defined $pid) {
        _stderr("no heartbeat helper (fork: $!): heartbeats only when a handler calls into the library");
        return;
    }
    if ($pid == 0) {
        my $status = eval { _helper_main($parent, $ctl_r, $ctl_w, $lock); 0 } // 1;
        POSIX::_exit($status);                  # no END blocks, no destructors of the app's
    }
    close $ctl_r;
    $ctl_w->blocking(0);
    ($HELPER_PID, $HELPER_CTL, $LOCK) = ($pid, $ctl_w, $lock);
}

sub _helper_main {
    my ($parent, $ctl, $ctl_w, $lock) = @_;
    close $ctl_w;
    close $IN if fileno($IN) != fileno($OUT);
    $0 = "$0 [heartbeat helper of $parent]";
    $SIG{$_} = 'DEFAULT' for qw(TERM INT HUP ALRM CHLD);
    # a lock of its own: flock excludes another open file description, not a shared one
    open(my $mine, '+<', '/proc/self/fd/' . fileno($lock)) or die "cannot reopen the lock: $!";
    close $lock;
    my $frame = do {
        my $body = _array_header(1) . _envelope(K_HEARTBEAT, 0, _omap(jobs => 1));
        pack('N', length $body) . $body;
    };
    my ($busy, $next) = (0, 0);
    while (1) {
        my $wait = 1;
        if ($busy) { my $t = $next - _now(); $wait = $t < 0 ? 0 : $t < 1 ? $t : 1 }
        my $rin = '';
        vec($rin, fileno($ctl), 1) = 1;
        if ((select(my $rout = $rin, undef, undef, $wait) // 0) > 0) {
            my $n = sysread($ctl, my $buf, 4096);
            if (defined $n) {
                return if $n == 0;              # the worker is gone
                for my $c (split //, $buf) {
                    if ($c eq 'B') { $busy = 1; $next = _now() + $HEARTBEAT / 2 }
                    elsif ($c eq 'I') { $busy = 0 }
                }
            }
        }
        return if getppid() != $parent;
        next unless $busy && _now() >= $next;
        $next = _now() + $HEARTBEAT;
        next if _stopped($parent);
        next unless flock($mine, LOCK_EX | LOCK_NB);   # the worker is writing: skip this beat
        my ($off, $len) = (0, length $frame);
        while ($off < $len) {
            my $w = syswrite($OUT, $frame, $len - $off, $off);
            if (!defined $w) { next if $!{EINTR} || $!{EAGAIN}; return }
            $off += $w;
        }
        flock($mine, LOCK_UN);
    }
}

sub _stopped {                                  # is that process stopped (or traced)?
    my ($pid) = @_;
    open(my $fh, '<', "/proc/$pid/stat") or return 0;
    my $stat = do { local $/; <$fh> } // '';
    return $stat =~ /\)\s+([Tt])\s/ ? 1 : 0;
}

sub _tell_helper {
    my ($what) = @_;
    return unless $HELPER_CTL;
    my $n = syswrite($HELPER_CTL, $what);
    return if defined $n || $!{EAGAIN} || $!{EINTR};
    _helper_lost();                             # EPIPE: the helper is gone
}

sub _helper_lost {
    _stderr('the heartbeat helper is gone: heartbeats only when a handler calls into the library');
    local ($?, $!);
    close $HELPER_CTL if $HELPER_CTL;
    ($HELPER_CTL, $LOCK) = (undef, undef);
    waitpid($HELPER_PID, POSIX::WNOHANG()) if $HELPER_PID;
    $HELPER_PID = undef;
}

sub _stop_helper {
    return unless $HELPER_PID && defined $MAIN_PID && $$ == $MAIN_PID;
    local ($?, $!);                             # in END, $? is the exit status: keep it
    close $HELPER_CTL if $HELPER_CTL;
    kill 'KILL', $HELPER_PID;
    waitpid($HELPER_PID, 0);
    ($HELPER_PID, $HELPER_CTL, $LOCK) = (undef, undef, undef);
}

# ---------------------------------------------------------------------------------------
# writing: whole frames only, the rest of a partial write written, EINTR retried

sub _write_envelopes {
    my $body = _array_header(scalar @_) . join('', @_);
    my $frame = pack('N', length $body) . $body;
    _write_frame($frame);
}

sub _write_frame {
    return if $EOF || !defined $MAIN_PID || $$ != $MAIN_PID;
    if ($LOCK) {                                # whole frames: the helper writes too
        until (flock($LOCK, LOCK_EX)) {
            next if $!{EINTR};
            _stderr("cannot lock the link: $!");
            last;
        }
    }
    my ($off, $len) = (0, length $_[0]);
    while ($off < $len) {
        my $n = syswrite($OUT, $_[0], $len - $off, $off);
        if (!defined $n) {
            next if $!{EINTR} || $!{EAGAIN};
            $EOF = 1;                           # EPIPE and the like: the node is gone
            last;
        }
        $off += $n;
    }
    flock($LOCK, LOCK_UN) if $LOCK;
}

# ---------------------------------------------------------------------------------------
# reading: frames from partial reads; several envelopes per frame, acted on in order

sub _pump {
    my ($timeout) = @_;
    return if $EOF || $TERMINATING;
    my $rin = '';
    vec($rin, fileno($IN), 1) = 1;
    my $n = select(my $rout = $rin, undef, undef, $timeout);
    _read_some() if defined $n && $n > 0;
    _beat_if_due();
}

sub _read_some {
    my $n = sysread($IN, $RBUF, 1 << 20, length $RBUF);
    if (!defined $n) {
        return if $!{EINTR} || $!{EAGAIN} || $!{EWOULDBLOCK};
        $EOF = 1;
        return;
    }
    if ($n == 0) { $EOF = 1; return }
    while (length($RBUF) >= 4 && !$TERMINATING) {
        my $len = unpack('N', $RBUF);
        if ($len > MAX_FRAME) {                 # checked before buffering the body (§2.4)
            _stderr("the node sent a frame of $len bytes, over the limit of " . MAX_FRAME
                    . " bytes: the link is broken, exiting");
            $DONE = 1;
            POSIX::_exit(4);
        }
        last if length($RBUF) < 4 + $len;
        my $body = substr($RBUF, 0, 4 + $len, '');
        substr($body, 0, 4, '');
        _handle_frame($body);
    }
}

sub _handle_frame {
    my ($body) = @_;
    my $why;
    my $frame = length($body) ? _decode($body, \$why) : undef;
    $why //= 'an empty body' unless length $body;
    if (!$why) {
        if (ref $frame ne 'ARRAY') {
            $why = 'the body is not an array';
        } else {
            for my $env (@$frame) {
                next if ref $env eq 'ARRAY' && @$env == 3 && _is_int($env->[0]) && _is_int($env->[1]);
                $why = 'an envelope is not [int, int, body]';
                last;
            }
        }
    }
    if ($why) {                                 # drop the frame and go on (§2.4)
        _stderr("dropped a malformed frame of " . length($body) . " bytes from the node: $why");
        return;
    }
    for my $env (@$frame) {
        last if $TERMINATING;                   # reads nothing more after TERMINATE (§10.1)
        _dispatch(@$env);
    }
}

sub _dispatch {
    my ($kind, $sid, $body) = @_;
    if ($kind == K_INVOKE) {
        if ($sid <= 0) {
            _stderr("ignored an INVOKE on sid $sid (a job's sid is positive)");
            return;
        }
        if (!(ref $body eq 'ARRAY' && (@$body == 2 || @$body == 3) && _is_str($body->[0]))) {
            _send_error($sid, 'bad-message', 'BadMessage',
                        'INVOKE body must be [event, payload(, chunked)], not ' . _describe($body));
            return;
        }
        if (exists $JOBS{$sid}) {
            _send_error($sid, 'bad-message', 'BadMessage', "sid $sid is already in use");
            return;
        }
        my $event = $body->[0];
        if (!exists $HANDLERS{$event}) {        # answered on arrival, taking no slot (§6.3)
            _send_error($sid, 'unknown-event', 'UnknownEvent',
                        "no handler for event '$event'; the app handles ["
                        . join(', ', map { "'$_'" } sort keys %HANDLERS) . ']');
            return;
        }
        my $chunked = @$body == 3 && _is_true($body->[2]);
        my $job = {
            sid => $sid, event => $event, payload => $body->[1], state => 'queued',
            input => $chunked ? { buf => [], ended => 0, received => 0, taken => 0,
                                  granted => 0, overflow => 0 } : undef,
        };
        $JOBS{$sid} = $job;
        push @QUEUE, $job;
    } elsif ($kind == K_CHUNK || $kind == K_CHOKE) {
        my $job = $JOBS{$sid} or return;
        my $in = $job->{input} or return;
        return if $in->{ended} || $in->{overflow};
        if ($kind == K_CHOKE) { $in->{ended} = 1; return }
        $in->{received}++;
        if ($in->{received} > WINDOW + $in->{granted}) {
            $in->{overflow} = 1;                # more than 64 beyond the credit (§8)
            $in->{buf} = [];
            return;
        }
        push @{ $in->{buf} }, $body;
    } elsif ($kind == K_CREDIT) {
        my $job = $JOBS{$sid} or return;
        return unless $job->{state} eq 'running' && _is_int($body) && $body > 0;
        $job->{allowance} += $body;
    } elsif ($kind == K_CANCEL) {
        my $job = $JOBS{$sid} or return;        # not held: its answer is on its way
        if ($job->{state} eq 'queued') {
            @QUEUE = grep { $_ != $job } @QUEUE;
            _answer($job, K_ERROR, _error_body('cancelled', 'JobCancelled',
                                               'cancelled by the node before it started'));
        } else {
            $job->{cancelled} = 1;              # the handler stops at its next call into us
        }
    } elsif ($kind == K_TERMINATE) {
        $TERMINATING = 1;
    }
    # any other kind (unknown, or one only a worker sends): ignored (§3)
}

# ---------------------------------------------------------------------------------------
# running a job

sub _start {
    my ($job) = @_;
    my $code = $HANDLERS{ $job->{event} };
    $job->{state} = 'running';
    $job->{allowance} = WINDOW;
    $RUNNING = $job;
    my $ctx = bless { job => $job }, 'EngineWorker::Context';
    _tell_helper('B');
    my ($ok, $ret, $err);
    {
        local $@;
        $ok = eval { $ret = $code->($job->{payload}, $ctx); 1 };
        $err = $@ unless $ok;
    }
    _tell_helper('I');
    $RUNNING = undef;
    $job->{state} = 'done';
    if ($job->{failed}) {                       # an answer or CHUNK that could not go
        _answer($job, K_ERROR, _error_body('bad-message', 'BadMessage', $job->{failed}));
    } elsif ($ok) {                             # it answered: that acknowledges a CANCEL too
        if ($job->{streaming}) { _answer($job, K_CHOKE, undef) }
        else                   { _answer($job, K_RESULT, $ret) }
    } elsif (ref $err eq 'EngineWorker::_Stop' && $err->{why} eq 'gone') {
        delete $JOBS{ $job->{sid} };            # abandoned: TERMINATE or end-of-file
    } elsif ($job->{cancelled}) {
        _answer($job, K_ERROR, _error_body('cancelled', 'JobCancelled', 'cancelled by the node'));
    } elsif (ref $err eq 'EngineWorker::_Stop' && $err->{why} eq 'input') {
        _answer($job, K_ERROR, _error_body('bad-message', 'BadMessage',
                'more than 64 chunks beyond the credit granted'));
    } else {
        my ($type, $message, $retryable) = _describe_error($err);
        _answer($job, K_ERROR, _error_body('handler', $type, $message, $retryable));
    }
}

# sends a job's one answer, or bad-message when it cannot go (§6.4)
sub _answer {
    my ($job, $kind, $body) = @_;
    my $sid = $job->{sid};
    my ($env, $why);
    {
        local $@;
        $env = eval { _envelope($kind, $sid, $body) };
        $why = $@ unless defined $env;
    }
    if (defined $why) {
        $env = _envelope(K_ERROR, $sid, _error_body('bad-message', 'BadMessage',
                         'the answer cannot be sent as msgpack: ' . _clean_croak($why)));
    } elsif (length($env) > MAX_ENVELOPE) {
        $env = _envelope(K_ERROR, $sid, _error_body('bad-message', 'BadMessage',
                         'the answer takes ' . length($env) . ' bytes, over this link\'s limit of '
                         . MAX_ENVELOPE . ' bytes: send large data as a stream of chunks'));
    }
    delete $JOBS{$sid};
    _write_envelopes($env);
}

sub _send_error {
    my ($sid, $code, $type, $message) = @_;
    _write_envelopes(_envelope(K_ERROR, $sid, _error_body($code, $type, $message)));
}

sub _error_body {
    my ($code, $type, $message, $retryable) = @_;
    return _omap(code => $code, type => _text_of($type), message => _text_of($message),
                 retryable => ($retryable ? true() : false()));
}

# (type, message, retryable) of whatever a handler died with
sub _describe_error {
    my ($err) = @_;
    if (ref $err && Scalar::Util::blessed($err)) {
        if ($err->isa('EngineWorker::Error')) {
            return ($err->type, $err->message, $err->retryable);
        }
        my $message = $err->can('message') ? $err->message
                    : $err->can('msg')     ? $err->msg
                    : "$err";
        $message = "$err" unless defined $message;
        return (ref $err, _chomp($message), 0);
    }
    if (ref $err eq 'HASH') {                   # die { type => ..., message => ... }
        return (defined $err->{type} ? "$err->{type}" : 'Error',
                defined $err->{message} ? "$err->{message}" : _describe($err),
                $err->{retryable} ? 1 : 0);
    }
    my $message = defined $err ? "$err" : '';
    $message = _chomp($message);
    $message = 'Died' if $message eq '';
    return ('Error', $message, 0);
}

sub _chomp { my ($s) = @_; $s =~ s/\s+\z//; return $s }

sub _clean_croak { my ($s) = @_; $s =~ s/ at \S+ line \d+\.?\s*\z//; return _chomp($s) }

sub _describe {
    my ($v) = @_;
    return 'nil' unless defined $v;
    return ref($v) eq 'ARRAY' ? 'an array of ' . @$v : ref($v) eq 'HASH' ? 'a map' : 'a ' . ref($v) if ref $v;
    return _is_int($v) ? 'an integer' : 'a scalar';
}

# the running job's calls into the library: stop it if it must stop
sub _check {
    my ($job) = @_;
    Carp::croak('this job has ended: its context cannot be used any more')
        unless $RUNNING && $RUNNING == $job;
    die EngineWorker::_Stop->new('gone')   if $EOF || $TERMINATING;
    die EngineWorker::_Stop->new('cancel') if $job->{cancelled};
    die EngineWorker::_Stop->new('failed') if $job->{failed};
}

# whether the running job may go on (for cancelled())
sub _may_go_on {
    my ($job) = @_;
    return 0 unless $RUNNING && $RUNNING == $job;
    return !($EOF || $TERMINATING || $job->{cancelled} || $job->{failed});
}

# ---------------------------------------------------------------------------------------
# msgpack: a decoder (Data::MessagePack, or the pure-Perl one below for ext values and
# when the module is missing) and a pure-Perl encoder that knows str from bin

sub _decode {
    my ($bytes, $why) = @_;
    if ($HAVE_XS && !$BINARY_OBJECTS) {
        my $v = eval { $XS->unpack($bytes) };
        return $v unless $@;
        # Data::MessagePack refuses ext values: the pure-Perl decoder takes them
    }
    my $v = eval { _pp_decode($bytes) };
    if ($@) { $$why = 'not msgpack (' . _clean_croak($@) . ')'; return undef }
    return $v;
}

our ($D, $P);                                   # the pure-Perl decoder's input and position

sub _pp_decode {
    local $D = \$_[0];
    local $P = 0;
    my $v = _pp_value(0);
    die "extra bytes\n" if $P != length $$D;
    return $v;
}

sub _take {
    my ($n) = @_;
    die "insufficient bytes\n" if $P + $n > length $$D;
    my $s = substr($$D, $P, $n);
    $P += $n;
    return $s;
}

sub _pp_str {
    my ($n) = @_;
    my $s = _take($n);
    utf8::decode($s);
    return $s;
}

sub _pp_value {
    my ($depth) = @_;
    die "nested too deep\n" if $depth > 512;
    my $b = ord(_take(1));
    return $b                                   if $b <= 0x7f;
    return $b - 256                             if $b >= 0xe0;
    return _pp_map($b & 0x0f, $depth)           if $b <= 0x8f;
    return _pp_array($b & 0x0f, $depth)         if $b <= 0x9f;
    return _pp_str($b & 0x1f)                   if $b <= 0xbf;
    return undef                                if $b == 0xc0;
    return false()                              if $b == 0xc2;
    return true()                               if $b == 0xc3;
    if ($b >= 0xc4 && $b <= 0xc6) {
        my $n = $b == 0xc4 ? unpack('C', _take(1)) : $b == 0xc5 ? unpack('n', _take(2)) : unpack('N', _take(4));
        my $data = _take($n);
        return $BINARY_OBJECTS ? bless(\$data, 'EngineWorker::Bytes') : $data;
    }
    if ($b >= 0xc7 && $b <= 0xc9) {
        my $n = unpack($b == 0xc7 ? 'C' : $b == 0xc8 ? 'n' : 'N', _take($b == 0xc7 ? 1 : $b == 0xc8 ? 2 : 4));
        my $type = unpack('c', _take(1));
        return EngineWorker::Ext->new($type, _take($n));
    }
    return unpack('f>', _take(4))               if $b == 0xca;
    return unpack('d>', _take(8))               if $b == 0xcb;
    return unpack('C', _take(1))                if $b == 0xcc;
    return unpack('n', _take(2))                if $b == 0xcd;
    return unpack('N', _take(4))                if $b == 0xce;
    return unpack('Q>', _take(8))               if $b == 0xcf;
    return unpack('c', _take(1))                if $b == 0xd0;
    return unpack('s>', _take(2))               if $b == 0xd1;
    return unpack('l>', _take(4))               if $b == 0xd2;
    return unpack('q>', _take(8))               if $b == 0xd3;
    if ($b >= 0xd4 && $b <= 0xd8) {
        my $type = unpack('c', _take(1));
        return EngineWorker::Ext->new($type, _take(1 << ($b - 0xd4)));
    }
    return _pp_str(unpack('C', _take(1)))       if $b == 0xd9;
    return _pp_str(unpack('n', _take(2)))       if $b == 0xda;
    return _pp_str(unpack('N', _take(4)))       if $b == 0xdb;
    return _pp_array(unpack('n', _take(2)), $depth) if $b == 0xdc;
    return _pp_array(unpack('N', _take(4)), $depth) if $b == 0xdd;
    return _pp_map(unpack('n', _take(2)), $depth)   if $b == 0xde;
    return _pp_map(unpack('N', _take(4)), $depth)   if $b == 0xdf;
    die sprintf("byte 0x%02x is not msgpack\n", $b);   # 0xc1
}

sub _pp_array {
    my ($n, $depth) = @_;
    die "insufficient bytes\n" if $P + $n > length $$D;   # each value takes a byte at least
    my @a;
    push @a, _pp_value($depth + 1) for 1 .. $n;
    return \@a;
}

sub _pp_map {
    my ($n, $depth) = @_;
    die "insufficient bytes\n" if $P + 2 * $n > length $$D;
    my %h;
    for (1 .. $n) {
        my $k = _pp_value($depth + 1);
        my $v = _pp_value($depth + 1);
        $h{ defined $k ? "$k" : '' } = $v;
    }
    return \%h;
}

# --- the encoder

sub _envelope {
    my ($kind, $sid, $body) = @_;
    return "\x93" . _enc_int($kind) . _enc_int($sid) . _enc($body, 0);
}

sub _omap { return bless [@_], 'EngineWorker::_OMap' }

sub _array_header {
    my ($n) = @_;
    return $n < 16 ? chr(0x90 | $n) : $n < 0x10000 ? pack('Cn', 0xdc, $n) : pack('CN', 0xdd, $n);
}

sub _map_header {
    my ($n) = @_;
    return $n < 16 ? chr(0x80 | $n) : $n < 0x10000 ? pack('Cn', 0xde, $n) : pack('CN', 0xdf, $n);
}

sub _enc_int {
    my ($v, $unsigned) = @_;
    if ($unsigned || $v >= 0) {
        return chr($v)                 if $v < 0x80;
        return pack('CC', 0xcc, $v)    if $v < 0x100;
        return pack('Cn', 0xcd, $v)    if $v < 0x10000;
        return pack('CN', 0xce, $v)    if $v <= 4294967295;
        return pack('CQ>', 0xcf, $v);
    }
    return pack('c', $v)               if $v >= -32;
    return pack('Cc', 0xd0, $v)        if $v >= -128;
    return pack('Cs>', 0xd1, $v)       if $v >= -32768;
    return pack('Cl>', 0xd2, $v)       if $v >= -2147483648;
    return pack('Cq>', 0xd3, $v);
}

sub _enc_str_bytes {                            # UTF-8 bytes, as str
    my $n = length $_[0];
    return ($n < 32 ? chr(0xa0 | $n) : $n < 0x100 ? pack('CC', 0xd9, $n)
            : $n < 0x10000 ? pack('Cn', 0xda, $n) : pack('CN', 0xdb, $n)) . $_[0];
}

sub _enc_bin {
    my $n = length $_[0];
    return ($n < 0x100 ? pack('CC', 0xc4, $n) : $n < 0x10000 ? pack('Cn', 0xc5, $n)
            : pack('CN', 0xc6, $n)) . $_[0];
}

# a Perl string: text (a character string, or bytes that are valid UTF-8) goes as str,
# other bytes as bin (Perl does not tell text from bytes: see the README)
sub _enc_string {
    my ($s) = @_;
    if (utf8::is_utf8($s)) {
        my $bytes = eval { Encode::encode('UTF-8', $s, Encode::FB_CROAK | Encode::LEAVE_SRC) };
        Carp::croak('a string holds a character UTF-8 cannot carry (a surrogate or beyond U+10FFFF)')
            unless defined $bytes;
        return _enc_str_bytes($bytes);
    }
    return _enc_str_bytes($s) if $s !~ /[\x80-\xff]/;
    return _enc_str_bytes($s) if eval { Encode::decode('UTF-8', $s, Encode::FB_CROAK | Encode::LEAVE_SRC); 1 };
    return _enc_bin($s);
}

sub _enc {
    my ($v, $depth) = @_;
    Carp::croak('the value is nested more than 512 deep (a cycle?)') if $depth > 512;
    return "\xc0" unless defined $v;
    if (my $r = ref $v) {
        if ($r eq 'HASH') {
            return _map_header(scalar keys %$v)
                . join('', map { _enc_string($_) . _enc($v->{$_}, $depth + 1) } keys %$v);
        }
        if ($r eq 'ARRAY') {
            return _array_header(scalar @$v) . join('', map { _enc($_, $depth + 1) } @$v);
        }
        if ($r eq 'EngineWorker::_OMap') {
            my @kv = @$v;
            my $out = _map_header(@kv / 2);
            while (my ($k, $x) = splice(@kv, 0, 2)) { $out .= _enc_string($k) . _enc($x, $depth + 1) }
            return $out;
        }
        if ($r eq 'Data::MessagePack::Boolean' || $r eq 'EngineWorker::Boolean'
            || $r eq 'JSON::PP::Boolean' || $r eq 'Types::Serialiser::Boolean') {
            return $$v ? "\xc3" : "\xc2";
        }
        if ($r eq 'SCALAR' && defined $$v && !ref $$v && ($$v eq '1' || $$v eq '0')) {
            return $$v ? "\xc3" : "\xc2";       # \1 and \0, as Data::MessagePack reads them
        }
        return _enc_bin($$v) if $r eq 'EngineWorker::Bytes';
        if ($r eq 'EngineWorker::Text') {
            my $s = $$v;
            utf8::upgrade($s);
            return _enc_string($s);
        }
        if ($r eq 'EngineWorker::Ext') {
            my ($type, $data) = @$v;
            my $n = length $data;
            my %fix = (1 => 0xd4, 2 => 0xd5, 4 => 0xd6, 8 => 0xd7, 16 => 0xd8);
            my $head = $fix{$n} ? chr($fix{$n})
                     : $n < 0x100 ? pack('CC', 0xc7, $n) : $n < 0x10000 ? pack('Cn', 0xc8, $n)
                     : pack('CN', 0xc9, $n);
            return $head . pack('c', $type) . $data;
        }
        Carp::croak("msgpack cannot carry a $r reference");
    }
    if ($HAVE_IS_BOOL) {
        no warnings;
        return $v ? "\xc3" : "\xc2" if builtin::is_bool($v);
    }
    my $f = B::svref_2object(\$v)->FLAGS;
    # a string that was used as a number keeps its public POK flag and stays a string;
    # a number that was printed gets only the private one (perl 5.36+) and stays a number
    return _enc_string($v) if $f & B::SVf_POK;
    return _enc_int($v, $f & B::SVf_IVisUV) if $f & B::SVf_IOK;
    return "\xcb" . pack('d>', $v) if $f & B::SVf_NOK;
    return _enc_string($v) if $f & B::SVp_POK;
    return _enc_int($v, $f & B::SVf_IVisUV) if $f & B::SVp_IOK;
    return "\xcb" . pack('d>', $v) if $f & B::SVp_NOK;
    return _enc_string("$v");
}

# the value checks on what the node sent
sub _is_int {
    my ($v) = @_;
    return 0 if !defined $v || ref $v;
    my $f = B::svref_2object(\$v)->FLAGS;
    return ($f & B::SVf_IOK) && !($f & B::SVf_POK) ? 1 : 0;
}

sub _is_str {
    my ($v) = @_;
    return 0 if !defined $v || ref $v;
    my $f = B::svref_2object(\$v)->FLAGS;
    return ($f & B::SVf_POK) && !($f & (B::SVf_IOK | B::SVf_NOK)) ? 1 : 0;
}

sub _is_true {
    my ($v) = @_;
    my $r = ref $v or return 0;
    return ($r eq 'Data::MessagePack::Boolean' || $r eq 'EngineWorker::Boolean') && $$v ? 1 : 0;
}

# a string as characters: bytes that are valid UTF-8 are decoded, others read as Latin-1;
# characters UTF-8 cannot carry become U+FFFD
sub _text_of {
    my ($s) = @_;
    $s = defined $s ? "$s" : '';
    if (!utf8::is_utf8($s) && $s =~ /[\x80-\xff]/) {
        my $d = eval { Encode::decode('UTF-8', $s, Encode::FB_CROAK | Encode::LEAVE_SRC) };
        if (defined $d) { $s = $d } else { utf8::upgrade($s) }
    }
    $s =~ s/[\x{D800}-\x{DFFF}]|[^\x{0}-\x{10FFFF}]/\x{FFFD}/g if utf8::is_utf8($s);
    return $s;
}

# =======================================================================================
package EngineWorker::Context;
# What a handler gets as its second argument: the job's calls into the library.

use strict;
use warnings;

sub sid     { $_[0]{job}{sid} }
sub event   { $_[0]{job}{event} }
sub chunked { $_[0]{job}{input} ? 1 : 0 }

# stream(): the reply is a stream (CHUNKs then CHOKE) even if no chunk is ever sent
sub stream {
    my ($self) = @_;
    EngineWorker::_check($self->{job});
    $self->{job}{streaming} = 1;
    return $self;
}

# chunk($item, ...): sends each item as a CHUNK of a streamed reply, waiting while the
# window is used up (reading the link for CREDIT, heartbeats going on)
sub chunk {
    my ($self, @items) = @_;
    my $job = $self->{job};
    EngineWorker::_check($job);
    EngineWorker::_pump(0);
    for my $item (@items) {
        EngineWorker::_check($job);
        while ($job->{allowance} <= 0) {        # wait for CREDIT (§7)
            EngineWorker::_pump(EngineWorker::_until_beat());
            EngineWorker::_check($job);
        }
        my ($env, $why);
        {
            local $@;
            $env = eval { EngineWorker::_envelope(EngineWorker::K_CHUNK, $job->{sid}, $item) };
            $why = $@ unless defined $env;
        }
        if (defined $why) {
            $job->{failed} = 'a CHUNK cannot be sent as msgpack: ' . EngineWorker::_clean_croak($why);
        } elsif (length($env) > EngineWorker::MAX_ENVELOPE) {
            $job->{failed} = 'a CHUNK takes ' . length($env) . " bytes, over this link's limit of "
                . EngineWorker::MAX_ENVELOPE . ' bytes: send large data as smaller chunks';
        }
        die EngineWorker::_Stop->new('failed') if $job->{failed};
        $job->{streaming} = 1;
        $job->{allowance}--;
        EngineWorker::_write_envelopes($env);
    }
    return $self;
}

# next_chunk(): the chunked request's next chunk; at its end, undef in scalar context and
# the empty list in list context (so `while (my ($c) = $ctx->next_chunk)` sees nil chunks)
sub next_chunk {
    my ($self) = @_;
    my $job = $self->{job};
    EngineWorker::_check($job);
    my $in = $job->{input} or return wantarray ? () : undef;
    EngineWorker::_pump(0);
    while (1) {
        EngineWorker::_check($job);
        die EngineWorker::_Stop->new('input') if $in->{overflow};
        if (@{ $in->{buf} }) {
            my $chunk = shift @{ $in->{buf} };
            $in->{taken}++;
            _grant($job) if $in->{taken} - $in->{granted} >= EngineWorker::CREDIT_BATCH;
            return wantarray ? ($chunk) : $chunk;
        }
        return wantarray ? () : undef if $in->{ended};
        _grant($job) if $in->{taken} > $in->{granted};   # all taken: ask for more now
        EngineWorker::_pump(EngineWorker::_until_beat());
    }
}

# chunks(): every remaining chunk of the request, as a list
sub chunks {
    my ($self) = @_;
    my @all;
    while (my ($c) = $self->next_chunk) { push @all, $c }
    return @all;
}

sub _grant {
    my ($job) = @_;
    my $in = $job->{input};
    my $n = $in->{taken} - $in->{granted};
    return if $n <= 0;
    $in->{granted} += $n;
    EngineWorker::_write_envelopes(EngineWorker::_envelope(EngineWorker::K_CREDIT, $job->{sid}, $n));
}

# alive(): a heartbeat if one is due, what the node sent is read; dies (stopping the
# handler) if the job was cancelled, the node said TERMINATE or is gone
sub alive {
    my ($self) = @_;
    EngineWorker::_check($self->{job});
    EngineWorker::_pump(0);
    EngineWorker::_check($self->{job});
    return 1;
}

# cancelled(): like alive(), but says (true) instead of dying
sub cancelled {
    my ($self) = @_;
    my $job = $self->{job};
    return 1 unless EngineWorker::_may_go_on($job);
    EngineWorker::_pump(0);
    return EngineWorker::_may_go_on($job) ? 0 : 1;
}

# sleep($seconds): sleeps that long, reading the link and beating; a CANCEL stops it
sub sleep {
    my ($self, $seconds) = @_;
    my $job = $self->{job};
    EngineWorker::_check($job);
    my $end = EngineWorker::_now() + ($seconds // 0);
    while (1) {
        my $left = $end - EngineWorker::_now();
        last if $left <= 0;
        my $beat = EngineWorker::_until_beat();
        EngineWorker::_pump($beat < $left ? $beat : $left);
        EngineWorker::_check($job);
    }
    return $seconds;
}

sub log { my ($self, $level, @msg) = @_; EngineWorker::log_line($level, @msg) }

# =======================================================================================
package EngineWorker::Error;
# die EngineWorker::Error->new(type => "TypeError", message => "nope"): the job's ERROR
# (code "handler") carries this type and message.

use strict;
use warnings;
use overload '""' => sub { $_[0]->{type} . ': ' . $_[0]->{message} }, fallback => 1;

sub new {
    my ($class, %args) = @_;
    return bless {
        type      => defined $args{type} ? "$args{type}" : 'Error',
        message   => defined $args{message} ? "$args{message}" : '',
        retryable => $args{retryable} ? 1 : 0,
    }, $class;
}

sub throw     { my $class = shift; die $class->new(@_) }
sub type      { $_[0]{type} }
sub message   { $_[0]{message} }
sub retryable { $_[0]{retryable} }

# =======================================================================================
package EngineWorker::_Stop;
# what a handler dies with when it must stop (CANCEL, TERMINATE, end-of-file, a bad
# chunk): not an error of the app's.  A handler that catches it should rethrow it.

use overload '""' => sub { "EngineWorker: the job is stopped ($_[0]{why})\n" }, fallback => 1;

sub new { my ($class, $why) = @_; return bless { why => $why }, $class }

# =======================================================================================
package EngineWorker::Ext;
# a msgpack ext value (a type -128..127 and its bytes), sent back as it came

sub new  { my ($class, $type, $data) = @_; return bless [$type, $data], $class }
sub type { $_[0][0] }
sub data { $_[0][1] }

package EngineWorker::Bytes;
# bytes sent as bin (EngineWorker::bytes), and bin as it arrives with ':binary_objects':
# it stringifies to its bytes, so length, eq, substr, regexes and digests work on it
use overload '""' => sub { ${ $_[0] } }, fallback => 1;
sub bytes  { ${ $_[0] } }
sub length { CORE::length(${ $_[0] }) }

package EngineWorker::Text;
use overload '""' => sub { ${ $_[0] } }, fallback => 1;

# =======================================================================================
package EngineWorker::Boolean;
# booleans when Data::MessagePack is missing (else its own are used)

use overload 'bool' => sub { ${ $_[0] } }, '0+' => sub { ${ $_[0] } },
             '""' => sub { ${ $_[0] } ? 'true' : 'false' }, fallback => 1;

my ($T, $F) = (bless(\(my $t = 1), __PACKAGE__), bless(\(my $f = 0), __PACKAGE__));
sub true  { $T }
sub false { $F }

1;
