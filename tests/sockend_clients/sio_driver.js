// The official socket.io-client, driven by a test (tests/test_sockend_socketio_clients.py).
//
//   NODE_PATH=examples/sockend/node_modules node tests/sockend_clients/sio_driver.js
//
// Reads one JSON command a line on stdin and reports what happens as one JSON object a
// line on stdout.  Bytes travel as {"$bytes": "<base64>"} both ways: a command's
// {"$bytes"} becomes a Buffer (a socket.io binary attachment), and a Buffer the client
// receives is reported as {"$bytes"}.
//
// Commands:
//   {"op": "open", "id": "a", "url": "http://127.0.0.1:PORT/rnd", "opts": {...}}
//        io(url, opts); the socket is named "id" in later commands and reports
//   {"op": "emit", "id": "a", "req": 1, "event": "randomRequest", "args": [...],
//    "ack": "promise" | "callback" | null, "timeout": 5000}
//        "promise": socket.timeout(t).emitWithAck(...): reports {"ev": "ack", "req",
//                   "args": [value]} or {"ev": "ack", "req", "error": message}
//        "callback": socket.timeout(t).emit(..., (err, ...args) => ...): every argument
//                   of the server's ack, as {"ev": "ack", "req", "error", "args"}
//        null: a plain emit, no ack: reports {"ev": "emitted", "req"}
//   {"op": "close", "id": "a"}       socket.disconnect()
//   {"op": "exit"}                   closes every socket and exits (so does EOF)
//
// Reports: {"ev": "ready"} once, then per socket "connect" (with the engine's transport),
// "connect_error" (message, data), "disconnect" (reason), "event" (name, args: every event
// the server emits, through onAny), and per manager "open" (transport), "upgrade"
// (transport), "reconnect" (attempt).
"use strict";

const { io } = require("socket.io-client");
const readline = require("readline");

function encode(value) {
  if (Buffer.isBuffer(value)) return { $bytes: value.toString("base64") };
  if (value instanceof ArrayBuffer) return { $bytes: Buffer.from(value).toString("base64") };
  if (ArrayBuffer.isView(value)) {
    return { $bytes: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("base64") };
  }
  if (Array.isArray(value)) return value.map(encode);
  if (value instanceof Error) return { $error: value.message, data: encode(value.data ?? null) };
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = encode(v);
    return out;
  }
  return value === undefined ? null : value;
}

function decode(value) {
  if (Array.isArray(value)) return value.map(decode);
  if (value && typeof value === "object") {
    if (typeof value.$bytes === "string" && Object.keys(value).length === 1) {
      return Buffer.from(value.$bytes, "base64");
    }
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = decode(v);
    return out;
  }
  return value;
}

function report(obj) {
  process.stdout.write(JSON.stringify(encode(obj)) + "\n");
}

const sockets = new Map();
const watched = new WeakSet();   // managers whose engine events are reported

function watchManager(id, manager) {
  if (watched.has(manager)) return;
  watched.add(manager);
  const watchEngine = () => {
    const engine = manager.engine;
    report({ ev: "open", id, transport: engine.transport.name });
    engine.on("upgrade", (transport) => report({ ev: "upgrade", id, transport: transport.name }));
  };
  if (manager.engine && manager._readyState === "open") watchEngine();
  manager.on("open", watchEngine);
  manager.on("reconnect", (attempt) => report({ ev: "reconnect", id, attempt }));
}

function open({ id, url, opts }) {
  const socket = io(url, opts || {});
  sockets.set(id, socket);
  watchManager(id, socket.io);
  socket.on("connect", () => report({
    ev: "connect", id, sid: socket.id, transport: socket.io.engine.transport.name }));
  socket.on("connect_error", (err) => report({
    ev: "connect_error", id, message: err.message, data: err.data ?? null }));
  socket.on("disconnect", (reason) => report({ ev: "disconnect", id, reason }));
  socket.onAny((name, ...args) => report({ ev: "event", id, name, args }));
}

function emit({ id, req, event, args, ack, timeout }) {
  const socket = sockets.get(id);
  const values = decode(args || []);
  const t = timeout ?? 5000;
  if (ack === "promise") {
    socket.timeout(t).emitWithAck(event, ...values).then(
      (value) => report({ ev: "ack", id, req, args: [value] }),
      (err) => report({ ev: "ack", id, req, error: err instanceof Error ? err.message : err }));
  } else if (ack === "callback") {
    socket.timeout(t).emit(event, ...values, (err, ...answer) => report({
      ev: "ack", id, req, error: err ? err.message : null, args: answer }));
  } else {
    socket.emit(event, ...values);
    report({ ev: "emitted", id, req });
  }
}

function exit() {
  for (const socket of sockets.values()) socket.disconnect();
  process.exit(0);
}

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
    if (cmd.op === "open") open(cmd);
    else if (cmd.op === "emit") emit(cmd);
    else if (cmd.op === "close") sockets.get(cmd.id).disconnect();
    else if (cmd.op === "exit") exit();
    else throw new Error(`unknown op ${cmd.op}`);
  } catch (err) {
    report({ ev: "driver_error", line, message: String(err && err.stack || err) });
  }
});
lines.on("close", exit);
report({ ev: "ready" });
