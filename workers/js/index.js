"use strict";
/**
 * engine-worker: write engine apps in Node.js.
 *
 *   const { on } = require("engine-worker");
 *   on("echo", (data) => data);
 *
 * Requiring this module and registering handlers is all an app does.  When the node
 * started the process (ENGINE_LINK is set: docs/languages.md), the worker starts
 * serving on setImmediate after the app module has loaded: it sends the HANDSHAKE with
 * the events registered by then.  Without ENGINE_LINK nothing starts (tests, tools).
 *
 * README.md has the API and the semantics.
 */
const KEY = Symbol.for("engine-worker.instance");

function create() {
  const handlers = new Map();   // event -> handler
  let sealed = false;           // the HANDSHAKE went: no more handlers

  /** Handle `event` with `fn`; returns fn.  A handler takes (payload, chunks, ctx),
   * `this` being ctx too: see README.md. */
  function on(event, fn) {
    if (typeof event !== "string" || !event) {
      throw new TypeError(`on(event, fn): event must be a non-empty string, got ${String(event)}`);
    }
    if (typeof fn !== "function") {
      throw new TypeError(`on(${JSON.stringify(event)}, fn): fn must be a function, got ${typeof fn}`);
    }
    if (handlers.has(event) && handlers.get(event) !== fn) {
      throw new Error(`two handlers for event ${JSON.stringify(event)}`);
    }
    if (sealed && !handlers.has(event)) {
      throw new Error(`on(${JSON.stringify(event)}): register handlers while the app module loads; ` +
        "the worker has told the node its events already");
    }
    handlers.set(event, fn);
    return fn;
  }

  /** The handlers registered so far, as {event: fn}. */
  function registered() {
    return Object.fromEntries(handlers);
  }

  function start() {
    const runtime = require("./lib/runtime");
    const env = process.env;
    let link = null;
    let started = false;

    const openLink = () => {
      if (link === null) link = new runtime.Link(env.ENGINE_LINK);
      return link;
    };

    // The app module is the main module, which requires this one: an exception at its
    // top level (or one thrown by a timer or promise during loading) arrives here
    // before the HANDSHAKE.  Answer it as the Python worker answers an import error.
    const onStartupError = (err) => {
      if (started) return;
      started = true;
      process.removeListener("uncaughtException", onStartupError);
      try {
        process.stderr.write(`${err && err.stack ? err.stack : String(err)}\n`);
      } catch { /* stderr is gone */ }
      let l = null;
      try { l = openLink(); } catch (e) { runtime.warn(e.message); }
      runtime.failStartup(l, err);
    };

    if (env.ENGINE_LINK === "stdio") runtime.redirectStdout();  // before the app prints anything
    process.on("uncaughtException", onStartupError);

    setImmediate(() => {
      if (started) return;
      started = true;
      sealed = true;
      process.removeListener("uncaughtException", onStartupError);
      let l;
      try {
        l = openLink();
      } catch (err) {
        runtime.warn(err.message);
        process.exit(runtime.EXIT_STARTUP_FAILED);
      }
      if (env.ENGINE_PROTOCOL && env.ENGINE_PROTOCOL.trim() !== "1") {
        // docs/protocol.md §4.2: no HANDSHAKE; say why (stderr, ERROR on sid 0), exit 3
        const err = new Error(`the node speaks protocol ${env.ENGINE_PROTOCOL}; this worker speaks 1`);
        err.name = "ProtocolVersionError";
        runtime.warn(err.message);
        runtime.failStartup(l, err);
        return;
      }
      const concurrency = Number.parseInt(env.ENGINE_CONCURRENCY || "1", 10);
      const heartbeat = Number.parseFloat(env.ENGINE_HEARTBEAT || "10");
      const rt = new runtime.Runtime({
        link: l,
        handlers: new Map(handlers),
        concurrency: Number.isFinite(concurrency) && concurrency >= 1 ? concurrency : 1,
        heartbeat: Number.isFinite(heartbeat) && heartbeat > 0 ? heartbeat : 10,
        app: env.ENGINE_APP || "",
      });
      rt.serve();
    });
  }

  if (process.env.ENGINE_LINK) start();
  return { on, handlers: registered };
}

// One registry per process, even if two copies of this package are loaded (the app's
// own node_modules and NODE_PATH): the first one serves, the others register with it.
const instance = globalThis[KEY] || (globalThis[KEY] = create());

module.exports.on = instance.on;
module.exports.handlers = instance.handlers;
module.exports.PROTOCOL_VERSION = 1;
module.exports.STREAM_WINDOW = 64;
module.exports.CREDIT_BATCH = 16;
