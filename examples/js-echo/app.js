// A Node.js app: `python -m engine call js-echo echo '"hi"'` (workers/js/README.md).
const { on } = require("engine-worker");

on("echo", (data) => data);                                   // one reply

on("count", async function* (data) {                          // a streamed reply
  for (let i = 0; i < (data && data.n || 3); i++) yield { i };
});

on("fail", () => { throw new TypeError("nope"); });           // an error with type and message

on("sum", async (start, chunks) => {                          // a chunked request
  let s = start || 0;
  for await (const c of chunks) s += c;
  return s;
});
