"use strict";
/**
 * The chunks of a chunked request as they arrive (a port of InputStream,
 * src/transport/inbound.py): the runtime feeds / ends / fails it, the handler reads it
 * with `for await (const chunk of chunks)`, and every CREDIT_BATCH chunks taken it
 * grants the node that many more (CREDIT).  The node may run STREAM_WINDOW chunks
 * ahead of what was granted; beyond that the stream fails with bad-message.
 */
const { BadMessage } = require("./errors");

const WINDOW = 64;
const CREDIT_BATCH = 16;

class InputStream {
  constructor(grant) {
    this._items = [];
    this._head = 0;           // index of the next item in _items
    this._ended = false;
    this._error = null;
    this._closed = false;     // the reader stopped (break out of for await)
    this._waiters = [];       // pending next() calls: [resolve, reject]
    this._grant = grant;
    this._taken = 0;          // taken and not yet granted back
    this._allowed = WINDOW;   // chunks the node may still send
  }

  get finished() {
    return this._ended || this._error !== null;
  }

  feed(item) {
    if (this.finished) return;
    if (this._allowed <= 0) { // the sender ignored the window: memory is not unbounded
      this.fail(new BadMessage(`more than ${WINDOW} chunks beyond the credit granted`));
      return;
    }
    this._allowed -= 1;
    this._items.push(item);
    this._wake();
  }

  end() {
    this._ended = true;
    this._wake();
  }

  fail(err) {
    if (!this.finished) {
      this._error = err;
      this._items = [];
      this._head = 0;
      this._wake();
    }
  }

  _wake() {
    while (this._waiters.length && (this._head < this._items.length || this.finished || this._closed)) {
      const [resolve, reject] = this._waiters.shift();
      this._settle(resolve, reject);
    }
  }

  _settle(resolve, reject) {
    if (this._closed) return resolve({ value: undefined, done: true });
    if (this._head < this._items.length) return resolve({ value: this._take(), done: false });
    if (this._error !== null) return reject(this._error);
    return resolve({ value: undefined, done: true });
  }

  _take() {
    const item = this._items[this._head];
    this._items[this._head] = undefined;
    this._head += 1;
    if (this._head > 1024 && this._head * 2 > this._items.length) {
      this._items = this._items.slice(this._head);
      this._head = 0;
    }
    this._taken += 1;
    if (this._taken >= CREDIT_BATCH && !this.finished) {
      this._allowed += this._taken;
      const n = this._taken;
      this._taken = 0;
      this._grant(n);
    }
    return item;
  }

  next() {
    if (this._waiters.length === 0
        && (this._closed || this._head < this._items.length || this.finished)) {
      return new Promise((resolve, reject) => this._settle(resolve, reject));
    }
    return new Promise((resolve, reject) => this._waiters.push([resolve, reject]));
  }

  /** The reader stops early (`break` in `for await`): later reads end at once.  The
   * chunks still coming are dropped by the runtime once the job is answered. */
  return(value) {
    this._closed = true;
    this._wake();
    return Promise.resolve({ value, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

module.exports = { InputStream, WINDOW, CREDIT_BATCH };
