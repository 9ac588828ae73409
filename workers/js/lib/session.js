"use strict";
/**
 * The slave's side of its session with the node, as a pure state machine (no I/O): a
 * port of src/engine/protocol/slave_session.py (WorkerSession), rule for rule.
 *
 * It is fed what the node sent (receive) and what the handlers did (result, chunk,
 * streamEnded, failed, cancelled), and answers with actions for the runtime:
 *   {a: SEND, kind, sid, body}      send this envelope
 *   {a: START, sid, event, payload} run the handler of event
 *   {a: CANCEL_HANDLER, sid}        the node cancelled running job sid
 *   {a: RESUME, sid}                job sid's stream got credit after its window ran out
 *   {a: OPEN_INPUT, sid}            job sid is a chunked request: hold its chunks
 *   {a: FEED, sid, item}            the next chunk of job sid's request
 *   {a: END_INPUT, sid}             job sid's request has no more chunks
 *   {a: CLOSE_INPUT, sid}           job sid is answered: drop its input
 *   {a: EXIT}                       stop serving: flush and exit
 *
 * - INVOKE validation: a body that is not [event, payload(, true)], or a sid already
 *   held, is answered bad-message; an unknown event unknown-event (when the job would
 *   start).
 * - Slots and prefetch: at most `concurrency` jobs run; INVOKEs beyond wait in arrival
 *   order and start as slots free.
 * - CANCEL of a waiting job answers it `cancelled` at once; of a running one asks the
 *   runtime to cancel its handler, which reports back with cancelled(sid) (unless it
 *   answered otherwise first).  CANCEL or CREDIT for a sid not held is ignored.
 * - Exactly once: every INVOKE is ended by one RESULT / CHOKE / ERROR; a second end
 *   reported for a job throws ProtocolError (a bug in the runtime).
 * - Stream credit: STREAM_WINDOW chunks beyond the node's CREDITs.
 * - TERMINATE: jobs not started are answered shutting-down, TERMINATE goes back, EXIT.
 */
const util = require("node:util");
const { Kind, Undecodable } = require("./codec");
const { BadMessage, UnknownEvent, JobCancelled, ShuttingDown, errorToBody } = require("./errors");

const PROTOCOL_VERSION = 1;
const STREAM_WINDOW = 64;   // chunks one side may send of one job beyond the other's CREDITs
const CREDIT_BATCH = 16;    // the receiver grants credit in steps of this many consumed chunks

const SEND = 0, START = 1, CANCEL_HANDLER = 2, RESUME = 3, OPEN_INPUT = 4, FEED = 5, END_INPUT = 6,
  CLOSE_INPUT = 7, EXIT = 8;

class ProtocolError extends Error {}

function send(kind, sid, body) { return { a: SEND, kind, sid, body }; }
function errorEnvelope(sid, err) { return send(Kind.ERROR, sid, errorToBody(err)); }

/** Python's repr of a string, for messages that match the Python worker's. */
function pyRepr(value) {
  if (typeof value === "string") return `'${value.replace(/\\/g, "\\\\").replace(/'/g, "\\'")}'`;
  if (Array.isArray(value)) return `[${value.map(pyRepr).join(", ")}]`;
  return util.inspect(value, { depth: 2, breakLength: Infinity });
}

/** [event, payload, chunked] from an INVOKE body, or null if it has not that shape. */
function parseInvoke(body) {
  if (Array.isArray(body) && body.length >= 2 && body.length <= 3 && typeof body[0] === "string") {
    return [body[0], body[1], body.length === 3 && body[2] === true];
  }
  return null;
}

function isCredit(body) {
  return Number.isInteger(body) && body > 0;
}

const SERVING = "serving", EXITING = "exiting", CLOSED = "closed";

class WorkerSession {
  constructor({ concurrency, events }) {
    this.concurrency = Math.max(1, concurrency | 0);
    this.events = [...events].sort();
    this.known = new Set(this.events);
    this.state = SERVING;
    this.running = new Map();     // sid -> chunks it may send now (window)
    this.waiting = new Map();     // prefetched: sid -> [event, payload], in arrival order
    this.inputs = new Set();      // chunked jobs whose input the runtime holds
    this.cancelling = new Set();  // running jobs whose handler was cancelled
  }

  // -- messages of the slave's own ------------------------------------------------------
  hello({ pid, app }) {
    return send(Kind.HANDSHAKE, 0, {
      version: PROTOCOL_VERSION, pid, app, concurrency: this.concurrency, events: this.events,
      window: STREAM_WINDOW,
    });
  }

  heartbeat() {
    return send(Kind.HEARTBEAT, 0, { jobs: this.running.size });
  }

  /** Chunks running job sid may send now (0: wait for a RESUME). */
  sendWindow(sid) {
    return this.running.get(sid) || 0;
  }

  // -- what the node sent ---------------------------------------------------------------
  receive(kind, sid, body) {
    if (this.state !== SERVING) return [];
    switch (kind) {
      case Kind.INVOKE: return this._invoke(sid, body);
      case Kind.CHUNK: return this.inputs.has(sid) ? [{ a: FEED, sid, item: body }] : [];
      case Kind.CHOKE: return this.inputs.has(sid) ? [{ a: END_INPUT, sid }] : [];
      case Kind.CREDIT: {
        const left = this.running.get(sid);
        if (left === undefined || !isCredit(body)) return [];
        this.running.set(sid, left + body);
        return left <= 0 ? [{ a: RESUME, sid }] : [];
      }
      case Kind.CANCEL: return this._cancel(sid);
      case Kind.TERMINATE: return this._terminate();
      default: return []; // unknown kinds are ignored: newer nodes may say more
    }
  }

  /** The node's end closed: nothing more can be sent, nothing more starts. */
  connectionLost() {
    this.state = CLOSED;
    this.waiting.clear();
  }

  // -- what the handlers did ------------------------------------------------------------
  result(sid, value) { return this._end(sid, Kind.RESULT, value); }

  streamEnded(sid) { return this._end(sid, Kind.CHOKE, null); }

  failed(sid, err) { return this._end(sid, Kind.ERROR, errorToBody(err)); }

  cancelled(sid) { return this._end(sid, Kind.ERROR, errorToBody(new JobCancelled("cancelled by the node"))); }

  /** Job sid's generator yielded value; its sendWindow must be > 0.  The CHUNK to send
   * (null: the link is gone). */
  chunk(sid, value) {
    const left = this.running.get(sid);
    if (left === undefined) throw new ProtocolError(`chunk of job ${sid}, which is not running`);
    if (left <= 0) throw new ProtocolError(`chunk of job ${sid} beyond its stream window: wait for Resume`);
    this.running.set(sid, left - 1);
    return this.state !== CLOSED ? send(Kind.CHUNK, sid, value) : null;
  }

  /** Job sid's handler took `chunks` more chunks of its request: let the node send as many more. */
  grantInput(sid, chunks) {
    if (!this.inputs.has(sid) || chunks <= 0 || this.state === CLOSED) return [];
    return [send(Kind.CREDIT, sid, chunks)];
  }

  // -- internals ------------------------------------------------------------------------
  _invoke(sid, body) {
    const request = body instanceof Undecodable ? null : parseInvoke(body);
    if (request === null || this.running.has(sid) || this.waiting.has(sid)) {
      let why;
      if (request !== null) why = `sid ${sid} is already in use`;
      else if (body instanceof Undecodable) why = `INVOKE body could not be decoded: ${body.reason}`;
      else why = `INVOKE body must be [event, payload(, chunked)], got ${pyRepr(body).slice(0, 80)}`;
      return [errorEnvelope(sid, new BadMessage(why))];
    }
    const [event, payload, chunked] = request;
    const actions = [];
    if (chunked) {
      this.inputs.add(sid);
      actions.push({ a: OPEN_INPUT, sid });
    }
    if (this.waiting.size || this.running.size >= this.concurrency) {
      this.waiting.set(sid, [event, payload]); // prefetched: waits for a slot
      return actions;
    }
    for (const a of this._start(sid, event, payload)) actions.push(a);
    return actions;
  }

  _start(sid, event, payload) {
    if (this.known.has(event)) {
      this.running.set(sid, STREAM_WINDOW);
      return [{ a: START, sid, event, payload }];
    }
    // answered at once, taking no slot
    return this._answered(sid, errorEnvelope(sid, new UnknownEvent(
      `no handler for event ${pyRepr(event)}; the app handles ${pyRepr(this.events)}`)));
  }

  _startWaiting() {
    const actions = [];
    while (this.waiting.size && this.running.size < this.concurrency) {
      const [sid, [event, payload]] = this.waiting.entries().next().value;
      this.waiting.delete(sid);
      for (const a of this._start(sid, event, payload)) actions.push(a);
    }
    return actions;
  }

  _end(sid, kind, body) {
    if (!this.running.delete(sid)) {
      throw new ProtocolError(`job ${sid} ended, but it is not running (answered twice?)`);
    }
    this.cancelling.delete(sid);
    if (this.state === CLOSED) {
      this.inputs.delete(sid);
      return [];
    }
    const actions = this._answered(sid, send(kind, sid, body));
    if (this.waiting.size && this.state === SERVING) {
      for (const a of this._startWaiting()) actions.push(a); // the freed slot: the next prefetched job
    }
    return actions;
  }

  _answered(sid, reply) {
    if (this.inputs.delete(sid)) return [reply, { a: CLOSE_INPUT, sid }];
    return [reply];
  }

  _cancel(sid) {
    if (this.running.has(sid)) {
      if (this.cancelling.has(sid)) return [];
      this.cancelling.add(sid);
      return [{ a: CANCEL_HANDLER, sid }];
    }
    if (this.waiting.delete(sid)) { // prefetched, never started
      return this._answered(sid, errorEnvelope(sid, new JobCancelled("cancelled by the node before it started")));
    }
    return []; // it has finished: its reply is on its way
  }

  _terminate() {
    this.state = EXITING;
    const actions = [];
    for (const sid of this.waiting.keys()) { // prefetched jobs: answered, not dropped
      for (const a of this._answered(sid, errorEnvelope(sid,
        new ShuttingDown("the slave is exiting; the job never started")))) actions.push(a);
    }
    this.waiting.clear();
    actions.push(send(Kind.TERMINATE, 0, null));
    actions.push({ a: EXIT });
    return actions;
  }
}

module.exports = {
  WorkerSession, ProtocolError, parseInvoke, isCredit, PROTOCOL_VERSION, STREAM_WINDOW, CREDIT_BATCH,
  SEND, START, CANCEL_HANDLER, RESUME, OPEN_INPUT, FEED, END_INPUT, CLOSE_INPUT, EXIT,
  SERVING, EXITING, CLOSED,
};
