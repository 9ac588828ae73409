"use strict";
/**
 * Errors that cross the wire, as the Python side has them (src/transport/errors.py,
 * src/engine/errors.py): an ERROR body is {"code", "type", "message", "retryable"}.
 *
 * A handler's exception becomes code "handler" with type = its class name and its
 * message; the errors below are the protocol's own, with a stable code.
 */
const util = require("node:util");

class RemoteError extends Error {
  constructor(message = "", { code = "error", retryable = false, type } = {}) {
    super(message);
    this.code = code;
    this.retryable = retryable;
    this.name = type || new.target.name;
  }
}
// The protocol's errors (type = the Python class name, so both workers agree).
class BadMessage extends RemoteError {
  constructor(message) { super(message, { code: "bad-message" }); }
}
class UnknownEvent extends RemoteError {
  constructor(message) { super(message, { code: "unknown-event" }); }
}
class JobCancelled extends RemoteError {
  constructor(message) { super(message, { code: "cancelled" }); }
}
class ShuttingDown extends RemoteError {
  constructor(message) { super(message, { code: "shutting-down", retryable: true }); }
}

function isError(value) {
  return value instanceof Error || util.types.isNativeError(value);
}

/** The class name of a thrown Error: its `name` (TypeError, or what the app set), or
 * its constructor's name for a subclass that left `name` at "Error". */
function typeName(err) {
  let name;
  try { name = err.name; } catch { name = undefined; }
  if (typeof name === "string" && name && name !== "Error") return name;
  let ctor;
  try { ctor = err.constructor && err.constructor.name; } catch { ctor = undefined; }
  return typeof ctor === "string" && ctor ? ctor : "Error";
}

function safeString(value) {
  try {
    return String(value);
  } catch {
    try { return util.inspect(value); } catch { return "<unprintable value>"; }
  }
}

/** The ERROR body of anything thrown: a protocol error keeps its code; an Error is
 * code "handler" with its type and message; any other thrown value is type "Error"
 * with message String(value). */
function errorToBody(err) {
  if (err instanceof RemoteError) {
    return { code: err.code, type: err.name, message: safeString(err.message), retryable: err.retryable };
  }
  if (isError(err)) {
    let message;
    try { message = err.message; } catch { message = ""; }
    return { code: "handler", type: typeName(err), message: message === undefined ? "" : safeString(message),
      retryable: false };
  }
  return { code: "handler", type: "Error", message: safeString(err), retryable: false };
}

module.exports = { RemoteError, BadMessage, UnknownEvent, JobCancelled, ShuttingDown, errorToBody, typeName };
