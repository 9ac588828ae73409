// The conformance app in Node.js: tests/conformance/EVENTS.md, event for event.
"use strict";
const { setTimeout: sleep } = require("node:timers/promises");
const { on } = require("engine-worker");

on("echo", (data) => data);

on("count", async function* count(data) {
  for (let i = 0; i < data.n; i++) yield { i };
});

on("fail", () => {
  throw new TypeError("nope");
});

on("sum", async (start, chunks) => {
  let total = start;
  for await (const chunk of chunks) total += chunk;
  return total;
});

// Never ends by itself: stops when the node cancels the job (this.signal aborts the
// sleep; the worker also stops the generator at its next item).
on("ticks", async function* ticks() {
  for (let i = 0; ; i++) {
    yield i;
    await sleep(10, undefined, { signal: this.signal });
  }
});

on("nap", async function nap(seconds) {
  await sleep(seconds * 1000, undefined, { signal: this.signal });
  return "rested";
});

// These two never answer: the process stops or ends first.
on("hang", () => {
  process.kill(process.pid, "SIGSTOP");
  return new Promise(() => {});
});

on("crash", (s) => new Promise(() => {
  process.stderr.write(`last words: ${s}\n`, () => process.exit(3));
}));

on("pid", () => process.pid);
