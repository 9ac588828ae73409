"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const { InputStream } = require("../lib/input");

test("chunks are read in order and credit is granted in batches of 16", async () => {
  const grants = [];
  const input = new InputStream((n) => grants.push(n));
  for (let i = 0; i < 40; i++) input.feed(i);
  const got = [];
  for (let i = 0; i < 40; i++) got.push((await input.next()).value);
  assert.deepEqual(got, [...Array(40).keys()]);
  assert.deepEqual(grants, [16, 16]);
  input.end();
  assert.deepEqual(await input.next(), { value: undefined, done: true });
  assert.deepEqual(grants, [16, 16]);  // no credit once the request ended
});

test("a reader waits for chunks; more than the window fails the stream", async () => {
  const input = new InputStream(() => {});
  const first = input.next();
  input.feed("a");
  assert.deepEqual(await first, { value: "a", done: false });
  for (let i = 0; i < 64; i++) input.feed(i);   // 65 without credit
  await assert.rejects(input.next(), /more than 64 chunks/);
});

test("failing wakes the reader; break stops reading", async () => {
  const input = new InputStream(() => {});
  const pending = input.next();
  input.fail(new Error("cancelled"));
  await assert.rejects(pending, /cancelled/);
  const other = new InputStream(() => {});
  other.feed(1);
  other.feed(2);
  for await (const c of other) { assert.equal(c, 1); break; }
  assert.deepEqual(await other.next(), { value: undefined, done: true });
});
