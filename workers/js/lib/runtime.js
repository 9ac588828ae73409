"use strict";
/**
 * The runtime around WorkerSession (the port of src/engine/worker/runtime.py): it owns
 * the link, runs the handlers, and sends what the session says.
 *
 * - A handler returning a plain value is answered at once (inline, as the Python
 *   worker runs a sync handler); one returning a promise (an async function) is
 *   answered when it settles; a generator or async generator (or any iterator / async
 *   iterable) streams: a CHUNK per item, then CHOKE, never more than STREAM_WINDOW
 *   chunks beyond the node's CREDIT.
 * - Cancellation (CANCEL of a running job): the job's AbortSignal (`this.signal`, or
 *   `ctx.signal` of the third argument) is aborted.  A stream stops at its next item:
 *   its iterator's return() runs (the generator's finally blocks), then the job is
 *   answered ERROR `cancelled`.  A promise cannot be stopped from outside, so a
 *   promise-returning handler is answered ERROR `cancelled` at once and its slot is
 *   free at once; whatever the promise settles to later is dropped (a handler that
 *   ignores its signal runs on in the background).
 * - A chunked request's chunks are the handler's second argument, an async iterable
 *   that grants the node CREDIT as it is read.
 */
const net = require("node:net");
const { Kind, KIND_NAMES, MAX_ENVELOPE, encodeEnvelope, framesOf, decodeFrame, Undecodable,
  FrameReader, FrameTooLarge } = require("./codec");
const S = require("./session");
const { InputStream } = require("./input");
const { BadMessage, JobCancelled, errorToBody } = require("./errors");

const EXIT_STARTUP_FAILED = 3;
const EXIT_LINK_BROKEN = 4;     // the node's link carried something that is not a frame
const EXIT_FLUSH_TIMEOUT_MS = 5000;

function warn(message) {
  try { process.stderr.write(`engine-worker: ${message}\n`); } catch { /* nowhere to say it */ }
}

// -- the link ----------------------------------------------------------------------------

/**
 * Where the protocol runs (ENGINE_LINK): `fd:N`, an inherited end of a Unix stream
 * socketpair, or `stdio` (frames in on stdin, out on stdout).
 */
class Link {
  constructor(spec) {
    this.spec = spec;
    const m = /^fd:(\d+)$/.exec(spec || "");
    if (m) {
      const sock = new net.Socket({ fd: Number(m[1]), readable: true, writable: true });
      this.input = sock;
      this.output = sock;
      this._write = (buf, cb) => sock.write(buf, cb);
      this._end = (cb) => sock.end(cb);
    } else if (spec === "stdio") {
      const out = process.stdout;
      const write = stdoutWrite || out.write;  // the protocol's own, from before the redirect
      this.input = process.stdin;
      this.output = out;
      this._write = (buf, cb) => write.call(out, buf, cb);
      this._end = (cb) => write.call(out, Buffer.alloc(0), cb);
    } else {
      throw new Error(`ENGINE_LINK must be fd:N or stdio, got ${JSON.stringify(spec)}`);
    }
  }

  write(buf, cb) { return this._write(buf, cb); }

  /** Flush what was written, then call cb. */
  end(cb) { this._end(cb); }

  get needDrain() { return Boolean(this.output.writableNeedDrain); }
}

let stdoutWrite = null;

/** With ENGINE_LINK=stdio, stdout is the protocol's: whatever else writes to it goes
 * to stderr instead.  console.log / console.info / console.debug / console.table ...
 * write through process.stdout.write, which is what is replaced. */
function redirectStdout() {
  if (stdoutWrite !== null) return;
  const out = process.stdout;
  const err = process.stderr;
  stdoutWrite = out.write;
  out.write = function writeToStderr(...args) { return err.write(...args); };
}

// -- the writer: every envelope queued in one turn of the event loop shares a frame ----

class Outbox {
  constructor(link) {
    this.link = link;
    this.packed = [];
    this.scheduled = false;
    this.closed = false;
    this._flush = () => this.flush();
  }

  /** Queue a reply; one that cannot go (msgpack cannot carry it, or it is over the
   * link's limit) is replaced by an ERROR bad-message on the same sid. */
  send(kind, sid, body) {
    if (this.closed) return;
    let packed;
    try {
      packed = encodeEnvelope(kind, sid, body);
    } catch (err) {
      packed = encodeEnvelope(Kind.ERROR, sid, errorToBody(
        new BadMessage(`message could not be encoded: ${err.message}`)));
    }
    if (packed.length > MAX_ENVELOPE) {
      packed = encodeEnvelope(Kind.ERROR, sid, errorToBody(new BadMessage(tooLarge(kind, packed.length))));
    }
    this._queue(packed);
  }

  /** Queue a chunk, or throw BadMessage (nothing queued) when it cannot go. */
  sendOrRefuse(kind, sid, body) {
    if (this.closed) return;
    let packed;
    try {
      packed = encodeEnvelope(kind, sid, body);
    } catch (err) {
      throw new BadMessage(`message could not be encoded: ${err.message}`);
    }
    if (packed.length > MAX_ENVELOPE) throw new BadMessage(tooLarge(kind, packed.length));
    this._queue(packed);
  }

  _queue(packed) {
    this.packed.push(packed);
    if (!this.scheduled) {
      this.scheduled = true;
      queueMicrotask(this._flush);
    }
  }

  /** Write what is queued; cb (if any) once the link took it. */
  flush(cb) {
    this.scheduled = false;
    const packed = this.packed;
    this.packed = [];
    if (this.closed) {
      if (cb) cb();
      return;
    }
    const frames = packed.length ? framesOf(packed) : [];
    for (let i = 0; i < frames.length; i++) {
      if (cb && i === frames.length - 1) this.link.write(frames[i], cb);
      else this.link.write(frames[i]);
    }
    if (cb && frames.length === 0) this.link.end(cb);
  }
}

function tooLarge(kind, size) {
  const what = KIND_NAMES[kind] || `kind ${kind}`;
  return `${what} message of ${size} bytes is over this link's limit of ${MAX_ENVELOPE} bytes ` +
    "(send large data as a stream of chunks)";
}

// -- jobs --------------------------------------------------------------------------------

/** What a handler gets as `this` and as its third argument. */
class JobContext {
  constructor(sid, event) {
    this.sid = sid;
    this.event = event;
    this._controller = null;   // made on first use of .signal: most handlers never look
    this._cancelled = false;
  }

  /** An AbortSignal, aborted when the node cancels the job. */
  get signal() {
    if (this._controller === null) {
      this._controller = new AbortController();
      if (this._cancelled) this._controller.abort();
    }
    return this._controller.signal;
  }

  /** True once the node cancelled the job. */
  get cancelled() {
    return this._cancelled;
  }

  _abort() {
    if (this._cancelled) return;
    this._cancelled = true;
    if (this._controller !== null) this._controller.abort();
  }
}

const PROMISE = 1, STREAM = 2;

class Job {
  constructor(sid, ctx, type) {
    this.sid = sid;
    this.ctx = ctx;
    this.type = type;
    this.done = false;        // answered (a promise job cancelled is answered at once)
    this.cancelled = false;   // a stream job: stop at the next item
    this._wakeup = null;
  }

  /** Park until wake() (credit came, the link drained, or the job was cancelled). */
  wait() {
    return new Promise((resolve) => { this._wakeup = resolve; });
  }

  wake() {
    const w = this._wakeup;
    this._wakeup = null;
    if (w !== null) w();
  }
}

function handlerName(fn, event) {
  return (typeof fn.name === "string" && fn.name) || event;
}

/** Why fn cannot read a chunked request (null if it can): it takes the chunks as its
 * second parameter (fn.length >= 2), and is not a sync generator (which cannot wait
 * for chunks). */
function chunksRefused(fn, event) {
  const name = handlerName(fn, event);
  const kind = fn.constructor && fn.constructor.name;
  if (kind === "GeneratorFunction") {
    return `${name} cannot read a chunked request: define it as async function ${name}(payload, chunks) ` +
      `or async function* ${name}(payload, chunks)`;
  }
  if (fn.length < 2) {
    return `${name} takes no chunks: define it as async function ${name}(payload, chunks) ` +
      "to read a chunked request";
  }
  return null;
}

// -- the runtime -------------------------------------------------------------------------

class Runtime {
  constructor({ link, handlers, concurrency = 1, heartbeat = 10, app = "" }) {
    this.link = link;
    this.handlers = handlers;                       // Map event -> fn
    this.session = new S.WorkerSession({ concurrency, events: handlers.keys() });
    this.outbox = new Outbox(link);
    this.reader = new FrameReader();
    this.heartbeatSeconds = heartbeat;
    this.app = app;
    this.jobs = new Map();                          // sid -> Job (handlers still running)
    this.inputs = new Map();                        // sid -> InputStream of a chunked request
    this.drainWaiters = new Set();                  // stream jobs waiting for the link to drain
    this.exiting = false;
    this.badFrames = 0;
    this._beat = null;
  }

  /** Say HANDSHAKE, start the heartbeats and read the link. */
  serve() {
    const { link, session } = this;
    this._sendAction(session.hello({ pid: process.pid, app: this.app }));
    this._sendAction(session.heartbeat());
    const ms = Math.max(1, Math.round(this.heartbeatSeconds * 1000));
    this._beat = setInterval(() => this._sendAction(session.heartbeat()), ms);
    this._beat.unref();  // the link keeps the process alive, not the heartbeats
    link.output.on("drain", () => {
      for (const job of this.drainWaiters) job.wake();
    });
    link.output.on("error", (err) => this._linkGone(err));
    if (link.input !== link.output) link.input.on("error", (err) => this._linkGone(err));
    link.input.on("end", () => this._linkGone(null));
    link.input.on("close", () => this._linkGone(null));
    link.input.on("data", (chunk) => this._onData(chunk));
  }

  _sendAction(x) {
    this.outbox.send(x.kind, x.sid, x.body);
  }

  _onData(chunk) {
    if (this.exiting) return;
    let frames;
    try {
      frames = this.reader.push(chunk);
    } catch (err) {
      if (!(err instanceof FrameTooLarge)) throw err;
      warn(`the node's link carried garbage, exiting: ${err.message}`);
      this.exit(EXIT_LINK_BROKEN);
      return;
    }
    const session = this.session;
    for (const frame of frames) {
      const envelopes = decodeFrame(frame);
      if (envelopes === null) {
        if (this.badFrames++ === 0) warn(`skipped a frame that is not msgpack envelopes (${frame.length} bytes)`);
        continue;
      }
      for (const env of envelopes) {
        this._act(session.receive(env[0], env[1], env[2]));
        if (this.exiting) return;
      }
    }
  }

  /** Carry out the session's actions.  A job answered inline appends what its end
   * brings (its reply, the next prefetched job) to `actions`, which this loop reaches. */
  _act(actions) {
    for (let i = 0; i < actions.length; i++) {
      const x = actions[i];
      switch (x.a) {
        case S.SEND:
          this.outbox.send(x.kind, x.sid, x.body);
          break;
        case S.START:
          for (const more of this._start(x)) actions.push(more);
          break;
        case S.CANCEL_HANDLER:
          for (const more of this._cancel(x.sid)) actions.push(more);
          break;
        case S.RESUME: {
          const job = this.jobs.get(x.sid);
          if (job !== undefined) job.wake();
          break;
        }
        case S.OPEN_INPUT: {
          const sid = x.sid;
          this.inputs.set(sid, new InputStream((n) => this._act(this.session.grantInput(sid, n))));
          break;
        }
        case S.FEED: {
          const input = this.inputs.get(x.sid);
          if (x.item instanceof Undecodable) input.fail(new BadMessage(`a chunk could not be decoded: ${x.item.reason}`));
          else input.feed(x.item);
          break;
        }
        case S.END_INPUT:
          this.inputs.get(x.sid).end();
          break;
        case S.CLOSE_INPUT:
          this.inputs.delete(x.sid);
          break;
        case S.EXIT:
          this.exit(0);
          return;
        default:
          throw new S.ProtocolError(`unknown action ${JSON.stringify(x)}`);
      }
    }
  }

  /** Run one job: answered here (a plain value, or the handler threw), or on its own
   * (a promise, a stream).  Returns what its end brings if it ended here. */
  _start(x) {
    const { sid, event, payload } = x;
    const fn = this.handlers.get(event);  // the session starts only known events
    const input = this.inputs.get(sid);
    const ctx = new JobContext(sid, event);
    let out;
    try {
      if (input === undefined) {
        out = fn.call(ctx, payload, undefined, ctx);
      } else {
        const refused = chunksRefused(fn, event);
        if (refused !== null) throw new BadMessage(refused);
        out = fn.call(ctx, payload, input, ctx);
      }
    } catch (err) { // the caller gets type + message; the slave lives on
      return this.session.failed(sid, err);
    }
    if (out === null || (typeof out !== "object")) return this.session.result(sid, out);
    let then;
    try { then = out.then; } catch { then = undefined; }
    if (typeof then === "function") {
      const job = new Job(sid, ctx, PROMISE);
      this.jobs.set(sid, job);
      Promise.resolve(out).then((value) => this._settled(job, true, value),
        (err) => this._settled(job, false, err));
      return [];
    }
    let stream = 0;
    try {
      if (typeof out[Symbol.asyncIterator] === "function") stream = 2;
      else if (typeof out.next === "function" && typeof out[Symbol.iterator] === "function") stream = 1;
    } catch { stream = 0; }
    if (stream === 0) return this.session.result(sid, out);
    const job = new Job(sid, ctx, STREAM);
    this.jobs.set(sid, job);
    this._stream(job, out, stream === 2).catch((err) => {
      process.nextTick(() => { throw err; }); // a bug of this library: crash loudly
    });
    return [];
  }

  _settled(job, ok, value) {
    if (job.done) return;  // cancelled: answered already
    job.done = true;
    this.jobs.delete(job.sid);
    if (this.exiting) return;
    this._act(ok ? this.session.result(job.sid, value) : this.session.failed(job.sid, value));
  }

  _cancel(sid) {
    const job = this.jobs.get(sid);
    if (job === undefined) return [];
    job.ctx._abort();
    const input = this.inputs.get(sid);
    if (input !== undefined) input.fail(new JobCancelled("cancelled by the node"));
    if (job.type === PROMISE) { // cannot be stopped: answered now, its outcome dropped
      job.done = true;
      this.jobs.delete(sid);
      return this.session.cancelled(sid);
    }
    job.cancelled = true;       // a stream: stops at its next item
    job.wake();
    return [];
  }

  /** Send a stream's items as the window allows, then say how it ended. */
  async _stream(job, out, isAsync) {
    const sid = job.sid;
    const session = this.session;
    let it = null;
    let error = null;
    let done = false;  // the iterator finished by itself: no return() to call
    try {
      it = isAsync ? out[Symbol.asyncIterator]() : out;
      for (;;) {
        let step;
        try {
          step = isAsync ? await it.next() : it.next();
          if (step === null || typeof step !== "object") {
            throw new TypeError(`iterator result ${String(step)} is not an object`);
          }
        } catch (err) {
          done = true;
          throw err;
        }
        if (job.cancelled || this.exiting) break;
        if (step.done) {
          done = true;
          break;
        }
        while (session.sendWindow(sid) <= 0 && !job.cancelled && !this.exiting) {
          await job.wait();   // a RESUME (credit) or the CANCEL wakes it
        }
        if (job.cancelled || this.exiting) break;
        if (session.chunk(sid, step.value) !== null) this.outbox.sendOrRefuse(Kind.CHUNK, sid, step.value);
        if (this.link.needDrain) {
          this.drainWaiters.add(job);
          while (this.link.needDrain && !job.cancelled && !this.exiting) await job.wait();
          this.drainWaiters.delete(job);
        }
      }
    } catch (err) {
      error = err;
    }
    if (!done && it !== null) {  // stopped early: run the iterator's own cleanup
      try {
        if (typeof it.return === "function") {
          const r = it.return();
          if (isAsync) await r;
        }
      } catch (err) {
        if (error === null) error = err;
      }
    }
    this.jobs.delete(sid);
    if (this.exiting) return;
    if (job.cancelled) this._act(session.cancelled(sid));
    else if (error !== null) this._act(session.failed(sid, error));
    else this._act(session.streamEnded(sid));
  }

  /** The node's end is gone (end-of-file, or the link broke): nobody to answer. */
  _linkGone(err) {
    if (this.exiting) return;
    if (err && err.code !== "EPIPE" && err.code !== "ECONNRESET") warn(`the link to the node failed: ${err.message}`);
    this.session.connectionLost();
    this.outbox.closed = true;
    this.exit(0);
  }

  /** Stop serving: abort the handlers still running, flush what was sent, exit. */
  exit(code) {
    if (this.exiting) return;
    this.exiting = true;
    if (this._beat !== null) clearInterval(this._beat);
    for (const job of this.jobs.values()) {
      job.ctx._abort();
      job.wake();
    }
    try { this.link.input.pause(); } catch { /* already gone */ }
    if (this.outbox.closed) {
      process.exit(code);
    }
    process.exitCode = code;
    const timer = setTimeout(() => process.exit(code), EXIT_FLUSH_TIMEOUT_MS);
    timer.unref();
    try {
      this.outbox.flush(() => process.exit(code));
    } catch {
      process.exit(code);
    }
  }
}

/** Before the HANDSHAKE: the app module failed to load.  Say so on sid 0 (ERROR), and
 * exit EXIT_STARTUP_FAILED once it is written. */
function failStartup(link, err) {
  const exit = () => process.exit(EXIT_STARTUP_FAILED);
  if (link === null) exit();
  const timer = setTimeout(exit, EXIT_FLUSH_TIMEOUT_MS);
  timer.unref();
  try {
    link.output.on("error", exit);
    let packed;
    try {
      packed = encodeEnvelope(Kind.ERROR, 0, errorToBody(err));
    } catch {
      packed = encodeEnvelope(Kind.ERROR, 0, errorToBody(new Error("the app failed to load")));
    }
    link.write(framesOf([packed])[0], exit);
  } catch {
    exit();
  }
}

module.exports = {
  Runtime, Link, JobContext, failStartup, redirectStdout, chunksRefused, warn,
  EXIT_STARTUP_FAILED, EXIT_LINK_BROKEN,
};
