"use strict";
/**
 * The wire format (src/transport/codec.py, src/transport/streams.py): a frame is a
 * 4-byte big-endian length, then a msgpack array of envelopes [kind, sid, body].
 *
 * msgpack <-> JavaScript:
 * - str <-> string; bin <-> Uint8Array (a Buffer is a Uint8Array: it goes as bin; what
 *   arrives is a plain Uint8Array);
 * - int <-> number: a number that is a safe integer goes as an int, any other as a
 *   float64; an int arriving beyond 2^53 (int64/uint64) becomes the nearest number
 *   (precision is lost: no BigInt either way).  A BigInt cannot be sent (bad-message):
 *   convert it to a number or a string;
 * - float <-> number (a float with an integral value, such as 2.0, comes back as the
 *   int 2: JavaScript has one number type);
 * - map <-> plain object (keys that are not strings become strings); array <-> Array;
 *   nil <-> null (undefined goes as nil); true/false; a Date <-> the timestamp ext.
 */
const { Encoder, Decoder } = require("@msgpack/msgpack");

const Kind = Object.freeze({
  HANDSHAKE: 1, HEARTBEAT: 2, INVOKE: 3, CHUNK: 4, ERROR: 5, CHOKE: 6, TERMINATE: 7, RESULT: 8,
  REQUEST: 10, CANCEL: 11, PUBLISH: 20, CREDIT: 30,
});
const KIND_NAMES = Object.fromEntries(Object.entries(Kind).map(([k, v]) => [v, k]));

const MAX_FRAME = 16 * 1024 * 1024;   // transport.codec.DEFAULT_MAX_MESSAGE
const FRAME_OVERHEAD = 5;             // the frame's msgpack array header, at most
const MAX_ENVELOPE = MAX_FRAME - FRAME_OVERHEAD;

function mapKey(key) {
  if (typeof key === "string" || typeof key === "number") return key;
  if (key instanceof Uint8Array) return Buffer.from(key.buffer, key.byteOffset, key.byteLength).toString("utf8");
  try { return JSON.stringify(key) ?? String(key); } catch { return String(key); }
}

// No BigInt either way: with useBigInt64 the encoder would send safe integers of
// 2^32 and up as floats, and the decoder would hand out BigInts for every int64.  So
// an int beyond 2^53 arrives as the nearest number.  Maps decode to plain objects and
// any key type is taken (the default refuses non-string keys, which would lose the
// whole frame).
const encoder = new Encoder({ useBigInt64: false });
const decoder = new Decoder({ useBigInt64: false, mapKeyConverter: mapKey });

// Text must go as valid UTF-8 (the node kills a slave whose frame it cannot decode), but
// a JavaScript string may hold a lone surrogate ("\ud800"), which the encoder packs as
// invalid UTF-8 when the string is short.  Such a string goes with each lone surrogate
// replaced by U+FFFD, as TextEncoder (and Buffer) would.
const wellFormed = typeof String.prototype.isWellFormed === "function"
  ? (s) => (s.isWellFormed() ? s : s.toWellFormed())
  : (s) => (/[\ud800-\udfff]/.test(s) ? Buffer.from(s, "utf8").toString("utf8") : s);
const packString = encoder.encodeString;
if (typeof packString === "function") {
  encoder.encodeString = function encodeWellFormed(s) { return packString.call(this, wellFormed(s)); };
}
// Checked once: should a version of the encoder no longer take the hook above, every
// value sent is cleaned first instead (slower, but never a frame the node refuses).
const hooked = Buffer.from(encoder.encode("\ud800")).equals(Buffer.from([0xa3, 0xef, 0xbf, 0xbd]));

function cleanStrings(value, depth = 0) {
  if (typeof value === "string") return wellFormed(value);
  if (value === null || typeof value !== "object" || depth > 100 || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) return value.map((v) => cleanStrings(v, depth + 1));
  if (value instanceof Date) return value;
  const out = {};
  for (const k of Object.keys(value)) out[wellFormed(k)] = cleanStrings(value[k], depth + 1);
  return out;
}

class EncodeError extends Error {}

/** One envelope packed on its own, or throws EncodeError (a value msgpack cannot carry). */
function encodeEnvelope(kind, sid, body) {
  try {
    return encoder.encode([kind, sid, hooked ? body : cleanStrings(body)]);
  } catch (err) {
    throw new EncodeError(`cannot encode: ${err && err.message ? err.message : String(err)}`);
  }
}

/** A framed buffer (length prefix + msgpack array header + envelopes) of packed envelopes. */
function frameOf(packed) {
  const n = packed.length;
  let header;
  if (n < 16) header = Buffer.from([0x90 | n]);
  else if (n < 0x10000) { header = Buffer.alloc(3); header[0] = 0xdc; header.writeUInt16BE(n, 1); }
  else { header = Buffer.alloc(5); header[0] = 0xdd; header.writeUInt32BE(n, 1); }
  let size = header.length;
  for (const p of packed) size += p.length;
  const out = Buffer.allocUnsafe(4 + size);
  out.writeUInt32BE(size, 0);
  header.copy(out, 4);
  let pos = 4 + header.length;
  for (const p of packed) { out.set(p, pos); pos += p.length; }
  return out;
}

/** Envelopes packed in turn, cut into frames that fit MAX_FRAME. */
function framesOf(packedList) {
  const frames = [];
  let batch = [];
  let size = FRAME_OVERHEAD;
  for (const p of packedList) {
    if (batch.length && size + p.length > MAX_FRAME) {
      frames.push(frameOf(batch));
      batch = [];
      size = FRAME_OVERHEAD;
    }
    batch.push(p);
    size += p.length;
  }
  if (batch.length) frames.push(frameOf(batch));
  return frames;
}

/** A body that could not be decoded (the rest of its frame could): an INVOKE with one
 * is answered bad-message instead of being lost with its frame. */
class Undecodable {
  constructor(reason) { this.reason = reason; }
}

function validEnvelope(env) {
  return Array.isArray(env) && env.length === 3 && Number.isInteger(env[0]) && Number.isInteger(env[1]);
}

/** The envelopes of a frame, or null when it is not a frame of envelopes (the caller
 * skips it, as the Python channel does). */
function decodeFrame(frame) {
  let items;
  try {
    items = decoder.decode(frame);
  } catch {
    return salvage(frame);
  }
  if (!Array.isArray(items)) return null;
  for (const env of items) if (!validEnvelope(env)) return null;
  return items;
}

// -- salvage: a frame msgpack decodes but this decoder refuses (a "__proto__" key, ...) --
// Walks the frame without building values and decodes each envelope's parts alone,
// so one undecodable body costs its own job, not its frame's neighbours.

function u16(b, p) { if (p + 2 > b.length) throw new RangeError("truncated"); return b.readUInt16BE(p); }
function u32(b, p) { if (p + 4 > b.length) throw new RangeError("truncated"); return b.readUInt32BE(p); }

/** [count, position after the header] of the array at p, or throws. */
function arrayHeader(b, p) {
  const t = b[p];
  if (t >= 0x90 && t <= 0x9f) return [t & 0x0f, p + 1];
  if (t === 0xdc) return [u16(b, p + 1), p + 3];
  if (t === 0xdd) return [u32(b, p + 1), p + 5];
  throw new RangeError("not an array");
}

/** The position after the msgpack value at p (throws if truncated or invalid). */
function skip(b, p, depth = 0) {
  if (depth > 1000) throw new RangeError("too deep");
  if (p >= b.length) throw new RangeError("truncated");
  const t = b[p];
  let end;
  let items = 0;
  if (t <= 0x7f || t >= 0xe0) end = p + 1;
  else if (t <= 0x8f) { items = (t & 0x0f) * 2; end = p + 1; }
  else if (t <= 0x9f) { items = t & 0x0f; end = p + 1; }
  else if (t <= 0xbf) end = p + 1 + (t & 0x1f);
  else {
    switch (t) {
      case 0xc0: case 0xc2: case 0xc3: end = p + 1; break;
      case 0xc4: case 0xd9: if (p + 2 > b.length) throw new RangeError("truncated"); end = p + 2 + b[p + 1]; break;
      case 0xc5: case 0xda: end = p + 3 + u16(b, p + 1); break;
      case 0xc6: case 0xdb: end = p + 5 + u32(b, p + 1); break;
      case 0xc7: if (p + 2 > b.length) throw new RangeError("truncated"); end = p + 3 + b[p + 1]; break;
      case 0xc8: end = p + 4 + u16(b, p + 1); break;
      case 0xc9: end = p + 6 + u32(b, p + 1); break;
      case 0xca: case 0xce: case 0xd2: end = p + 5; break;
      case 0xcb: case 0xcf: case 0xd3: end = p + 9; break;
      case 0xcc: case 0xd0: end = p + 2; break;
      case 0xcd: case 0xd1: end = p + 3; break;
      case 0xd4: end = p + 3; break;
      case 0xd5: end = p + 4; break;
      case 0xd6: end = p + 6; break;
      case 0xd7: end = p + 10; break;
      case 0xd8: end = p + 18; break;
      case 0xdc: items = u16(b, p + 1); end = p + 3; break;
      case 0xdd: items = u32(b, p + 1); end = p + 5; break;
      case 0xde: items = u16(b, p + 1) * 2; end = p + 3; break;
      case 0xdf: items = u32(b, p + 1) * 2; end = p + 5; break;
      default: throw new RangeError("invalid msgpack byte"); // 0xc1
    }
  }
  for (let i = 0; i < items; i++) end = skip(b, end, depth + 1);
  if (end > b.length) throw new RangeError("truncated");
  return end;
}

function salvage(frame) {
  try {
    let [n, p] = arrayHeader(frame, 0);
    const out = [];
    for (let i = 0; i < n; i++) {
      const [m, q] = arrayHeader(frame, p);
      if (m !== 3) return null;
      const kindEnd = skip(frame, q);
      const sidEnd = skip(frame, kindEnd);
      const bodyEnd = skip(frame, sidEnd);
      const kind = decoder.decode(frame.subarray(q, kindEnd));
      const sid = decoder.decode(frame.subarray(kindEnd, sidEnd));
      if (!Number.isInteger(kind) || !Number.isInteger(sid)) return null;
      let body;
      try {
        body = decoder.decode(frame.subarray(sidEnd, bodyEnd));
      } catch (err) {
        body = new Undecodable(err && err.message ? err.message : String(err));
      }
      out.push([kind, sid, body]);
      p = bodyEnd;
    }
    return p === frame.length ? out : null;
  } catch {
    return null;
  }
}

class FrameTooLarge extends Error {}

/**
 * Cuts a byte stream into frames.  push(chunk) returns the complete frames it
 * brought (a frame may span many chunks: its pieces are joined once, when complete);
 * a length over MAX_FRAME throws FrameTooLarge: the framing is lost.
 */
class FrameReader {
  constructor(maxFrame = MAX_FRAME) {
    this.maxFrame = maxFrame;
    this.chunks = [];
    this.size = 0;
    this.need = -1;   // the length of the frame being read, -1: reading its header
  }

  push(chunk) {
    const frames = [];
    if (chunk.length) {
      this.chunks.push(chunk);
      this.size += chunk.length;
    }
    for (;;) {
      if (this.need < 0) {
        if (this.size < 4) break;
        const length = this._take(4).readUInt32BE(0);
        if (length > this.maxFrame) {
          throw new FrameTooLarge(`frame of ${length} bytes exceeds the ${this.maxFrame} limit`);
        }
        this.need = length;
      }
      if (this.size < this.need) break;
      frames.push(this._take(this.need));
      this.need = -1;
    }
    return frames;
  }

  _take(n) {
    this.size -= n;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let pos = 0;
    while (pos < n) {
      const c = this.chunks[0];
      const want = n - pos;
      if (c.length <= want) {
        out.set(c, pos);
        pos += c.length;
        this.chunks.shift();
      } else {
        out.set(c.subarray(0, want), pos);
        this.chunks[0] = c.subarray(want);
        pos += want;
      }
    }
    return out;
  }
}

module.exports = {
  Kind, KIND_NAMES, MAX_FRAME, MAX_ENVELOPE, EncodeError, encodeEnvelope, frameOf, framesOf,
  decodeFrame, Undecodable, FrameReader, FrameTooLarge, skip,
};
