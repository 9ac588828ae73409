"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const { encode } = require("@msgpack/msgpack");
const C = require("../lib/codec");
const { errorToBody, BadMessage } = require("../lib/errors");

function frameBytes(envelopes) {
  return C.framesOf(envelopes.map(([k, s, b]) => C.encodeEnvelope(k, s, b)));
}

test("frames survive fragmentation and coalescing", () => {
  const frames = frameBytes([[3, 1, ["echo", "x".repeat(70000)]]]).concat(frameBytes([[11, 1, null]]));
  const all = Buffer.concat(frames);
  for (const step of [1, 3, 7, 4096, all.length]) {
    const reader = new C.FrameReader();
    const got = [];
    for (let i = 0; i < all.length; i += step) got.push(...reader.push(all.subarray(i, i + step)));
    assert.equal(got.length, 2);
    assert.deepEqual(C.decodeFrame(got[0]), [[3, 1, ["echo", "x".repeat(70000)]]]);
    assert.deepEqual(C.decodeFrame(got[1]), [[11, 1, null]]);
  }
});

test("a length over the limit is fatal", () => {
  const reader = new C.FrameReader();
  assert.throws(() => reader.push(Buffer.from([0x01, 0x00, 0x00, 0x01])), C.FrameTooLarge);
  assert.deepEqual(new C.FrameReader().push(Buffer.from([0x01, 0x00, 0x00, 0x00])), []);  // exactly 16 MiB: waits
});

test("values keep their msgpack types", () => {
  const [env] = C.decodeFrame(C.encodeEnvelope(8, 1, null).length && Buffer.from(encode([[8, 1,
    { s: "str", b: new Uint8Array([1, 2]), i: 2 ** 40, n: -5, f: 1.5, z: null, t: true, a: [1] }]])));
  assert.ok(Buffer.isBuffer(env[2].b));  // bin arrives as a Buffer (a view of the frame)
  assert.deepEqual(env[2], { s: "str", b: Buffer.from([1, 2]), i: 2 ** 40, n: -5, f: 1.5, z: null, t: true, a: [1] });
  const packed = C.encodeEnvelope(8, 1, 2 ** 40);
  assert.equal(packed[3], 0xcf);  // uint64, not a float
  assert.equal(C.encodeEnvelope(8, 1, Buffer.from("ab"))[3], 0xc4);  // bin
  assert.equal(C.encodeEnvelope(8, 1, "ab")[3], 0xa2);  // str
  assert.throws(() => C.encodeEnvelope(8, 1, 10n), C.EncodeError);
  assert.throws(() => C.encodeEnvelope(8, 1, () => 1), C.EncodeError);
});

test("a frame that is not envelopes is refused; an undecodable body costs only its envelope", () => {
  assert.equal(C.decodeFrame(Buffer.from([0xc1])), null);
  assert.equal(C.decodeFrame(Buffer.from(encode([1, 2, 3]))), null);
  assert.equal(C.decodeFrame(Buffer.from(encode([["a", 1, 2]]))), null);
  // {"__proto__": 1} by hand: the decoder refuses that key
  const proto = Buffer.from([0x81, 0xa9, ...Buffer.from("__proto__"), 0x01]);
  const frame = Buffer.concat([Buffer.from([0x92]), Buffer.from(encode([3, 1, "ok"])),
    Buffer.from([0x93, 0x03, 0x02]), proto]);
  const envs = C.decodeFrame(frame);
  assert.deepEqual(envs[0], [3, 1, "ok"]);
  assert.equal(envs[1][1], 2);
  assert.ok(envs[1][2] instanceof C.Undecodable);
  assert.equal(C.skip(frame, 0), frame.length);
});

test("frames are cut to fit the limit", () => {
  const big = new Uint8Array(6 * 1024 * 1024);
  const frames = frameBytes([[4, 1, big], [4, 1, big], [4, 1, big]]);
  assert.equal(frames.length, 2);
  for (const f of frames) assert.ok(f.length - 4 <= C.MAX_FRAME);
});

test("error bodies", () => {
  assert.deepEqual(errorToBody(new TypeError("nope")), { code: "handler", type: "TypeError", message: "nope", retryable: false });
  class Mine extends Error {}
  assert.equal(errorToBody(new Mine("m")).type, "Mine");
  assert.deepEqual(errorToBody("s"), { code: "handler", type: "Error", message: "s", retryable: false });
  assert.deepEqual(errorToBody(undefined), { code: "handler", type: "Error", message: "undefined", retryable: false });
  assert.deepEqual(errorToBody(new BadMessage("b")), { code: "bad-message", type: "BadMessage", message: "b", retryable: false });
});

test("text always goes as valid UTF-8: a lone surrogate becomes U+FFFD", () => {
  for (const [value, hex] of [["\ud800x", "a4efbfbd78"], ["a\udc00", "a461efbfbd"], ["\ud83d\ude00", "a4f09f9880"],
    [{ "\ud800": 1 }, "81a3efbfbd01"]]) {
    assert.equal(Buffer.from(C.encodeEnvelope(8, 1, value)).subarray(3).toString("hex"), hex);
  }
  const long = "\udfff" + "x".repeat(100);
  assert.equal(C.decodeFrame(Buffer.concat([Buffer.from([0x91]), C.encodeEnvelope(8, 1, long)]))[0][2],
    "\ufffd" + "x".repeat(100));
});
