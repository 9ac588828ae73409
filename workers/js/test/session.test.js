"use strict";
// The session's rules, as tests/test_protocol.py checks the Python WorkerSession.
const test = require("node:test");
const assert = require("node:assert/strict");
const S = require("../lib/session");
const { Kind, Undecodable } = require("../lib/codec");

const worker = (concurrency = 1) => new S.WorkerSession({ concurrency, events: ["echo", "digest", "count"] });
const invoke = (w, sid, event = "echo", payload = null, chunked = false) =>
  w.receive(Kind.INVOKE, sid, chunked ? [event, payload, true] : [event, payload]);
const send = (kind, sid, body) => ({ a: S.SEND, kind, sid, body });
const start = (sid, event = "echo", payload = null) => ({ a: S.START, sid, event, payload });
const isError = (x, code, sid) => x.a === S.SEND && x.kind === Kind.ERROR && x.sid === sid && x.body.code === code;

test("handshake and heartbeat", () => {
  const w = worker(3);
  assert.deepEqual(w.hello({ pid: 42, app: "a" }), send(Kind.HANDSHAKE, 0, {
    version: 1, pid: 42, app: "a", concurrency: 3, events: ["count", "digest", "echo"], window: 64 }));
  assert.deepEqual(w.heartbeat(), send(Kind.HEARTBEAT, 0, { jobs: 0 }));
});

test("an INVOKE starts and is answered exactly once", () => {
  const w = worker();
  assert.deepEqual(invoke(w, 7, "echo", { x: 1 }), [start(7, "echo", { x: 1 })]);
  assert.deepEqual(w.heartbeat().body, { jobs: 1 });
  assert.deepEqual(w.result(7, "v"), [send(Kind.RESULT, 7, "v")]);
  assert.throws(() => w.result(7, "again"), /answered twice/);
  assert.throws(() => w.failed(7, new Error("late")), S.ProtocolError);
});

test("a bad INVOKE is answered bad-message", () => {
  const w = worker();
  for (const body of [null, "echo", [], ["echo"], [1, 2], ["echo", 1, true, 4], { event: "echo" },
    new Undecodable("x")]) {
    const [err] = w.receive(Kind.INVOKE, 3, body);
    assert.ok(isError(err, "bad-message", 3), JSON.stringify(err));
    assert.equal(err.body.type, "BadMessage");
  }
  assert.equal(w.running.size + w.waiting.size, 0);
  invoke(w, 4);
  const [err] = invoke(w, 4);
  assert.ok(isError(err, "bad-message", 4) && err.body.message.includes("already in use"));
  assert.deepEqual([...w.running.keys()], [4]);
});

test("an unknown event is answered when it would start, taking no slot", () => {
  const w = worker(1);
  invoke(w, 1);
  assert.deepEqual(invoke(w, 2, "nope"), []);
  assert.deepEqual(invoke(w, 3), []);
  const [reply, unknown, st] = w.result(1, null);
  assert.deepEqual(reply, send(Kind.RESULT, 1, null));
  assert.ok(isError(unknown, "unknown-event", 2));
  assert.equal(unknown.body.message, "no handler for event 'nope'; the app handles ['count', 'digest', 'echo']");
  assert.deepEqual(st, start(3));
});

test("at most concurrency jobs run; prefetched ones start in order", () => {
  const w = worker(2);
  assert.deepEqual([...invoke(w, 1), ...invoke(w, 2)].map((a) => a.a), [S.START, S.START]);
  assert.deepEqual(invoke(w, 3), []);
  assert.deepEqual(invoke(w, 4), []);
  assert.deepEqual([...w.waiting.keys()], [3, 4]);
  assert.deepEqual(w.result(2, "b"), [send(Kind.RESULT, 2, "b"), start(3)]);
  assert.deepEqual(invoke(w, 5), []);  // a free slot would not jump the queue
  assert.deepEqual(w.streamEnded(1), [send(Kind.CHOKE, 1, null), start(4)]);
});

test("CANCEL: a waiting job at once, a running one through its handler", () => {
  const w = worker(1);
  invoke(w, 1);
  invoke(w, 2);
  const [ack] = w.receive(Kind.CANCEL, 2, null);
  assert.ok(isError(ack, "cancelled", 2) && ack.body.type === "JobCancelled");
  assert.deepEqual(w.receive(Kind.CANCEL, 1, null), [{ a: S.CANCEL_HANDLER, sid: 1 }]);
  assert.deepEqual(w.receive(Kind.CANCEL, 1, null), []);
  const [ack1] = w.cancelled(1);
  assert.ok(isError(ack1, "cancelled", 1));
  assert.deepEqual(w.receive(Kind.CANCEL, 1, null), []);
  invoke(w, 3);
  w.receive(Kind.CANCEL, 3, null);
  assert.deepEqual(w.result(3, "done anyway"), [send(Kind.RESULT, 3, "done anyway")]);
  assert.equal(w.cancelling.size, 0);
});

test("a stream stays within its window of credit", () => {
  const w = worker();
  invoke(w, 1, "count");
  for (let i = 0; i < S.STREAM_WINDOW; i++) {
    assert.equal(w.sendWindow(1), S.STREAM_WINDOW - i);
    assert.deepEqual(w.chunk(1, i), send(Kind.CHUNK, 1, i));
  }
  assert.equal(w.sendWindow(1), 0);
  assert.throws(() => w.chunk(1, "one too many"), /window/);
  for (const nonsense of [0, -3, "16", 2.5, null, true]) assert.deepEqual(w.receive(Kind.CREDIT, 1, nonsense), []);
  assert.deepEqual(w.receive(Kind.CREDIT, 1, 16), [{ a: S.RESUME, sid: 1 }]);
  assert.deepEqual(w.receive(Kind.CREDIT, 1, 16), []);
  assert.equal(w.sendWindow(1), 32);
  assert.deepEqual(w.receive(Kind.CREDIT, 9, 16), []);
});

test("TERMINATE answers waiting jobs, says so and exits", () => {
  const w = worker(1);
  invoke(w, 1);
  invoke(w, 2);
  invoke(w, 3, "digest", null, true);
  const out = w.receive(Kind.TERMINATE, 0, null);
  assert.equal(out.length, 5);
  assert.ok(isError(out[0], "shutting-down", 2) && out[0].body.retryable === true);
  assert.ok(isError(out[1], "shutting-down", 3));
  assert.deepEqual(out.slice(2), [{ a: S.CLOSE_INPUT, sid: 3 }, send(Kind.TERMINATE, 0, null), { a: S.EXIT }]);
  assert.deepEqual(invoke(w, 4), []);
  assert.deepEqual(w.result(1, "x"), [send(Kind.RESULT, 1, "x")]);
});

test("a chunked request's input is held until the job is answered", () => {
  const w = worker(1);
  invoke(w, 1);
  assert.deepEqual(invoke(w, 2, "digest", "f", true), [{ a: S.OPEN_INPUT, sid: 2 }]);
  assert.deepEqual(w.receive(Kind.CHUNK, 2, "a"), [{ a: S.FEED, sid: 2, item: "a" }]);
  assert.deepEqual(w.receive(Kind.CHUNK, 9, "?"), []);
  assert.deepEqual(w.result(1, null)[1], start(2, "digest", "f"));
  assert.deepEqual(w.grantInput(2, 16), [send(Kind.CREDIT, 2, 16)]);
  assert.deepEqual(w.receive(Kind.CHOKE, 2, null), [{ a: S.END_INPUT, sid: 2 }]);
  assert.deepEqual(w.result(2, "sha"), [send(Kind.RESULT, 2, "sha"), { a: S.CLOSE_INPUT, sid: 2 }]);
  assert.deepEqual(w.grantInput(2, 16), []);
  assert.deepEqual(w.receive(Kind.CHUNK, 2, "late"), []);
});

test("cancelling a waiting chunked job drops its input", () => {
  const w = worker(1);
  invoke(w, 1);
  invoke(w, 2, "digest", null, true);
  const [ack, close] = w.receive(Kind.CANCEL, 2, null);
  assert.ok(isError(ack, "cancelled", 2));
  assert.deepEqual(close, { a: S.CLOSE_INPUT, sid: 2 });
});

test("nothing is sent or started once the link is gone", () => {
  const w = worker(1);
  invoke(w, 1, "count");
  invoke(w, 2);
  w.connectionLost();
  assert.equal(w.chunk(1, "x"), null);
  assert.deepEqual(w.result(1, "x"), []);
  assert.equal(w.running.size + w.waiting.size, 0);
  assert.deepEqual(invoke(w, 3), []);
});
