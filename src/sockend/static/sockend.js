/* sockend.js: the browser client of Sockend (engine-trio's bridge to the mesh).
 *
 *   <script src="/sockend.js"></script>
 *   const s = Sockend.connect("ws://localhost:5555/rnd");   // or "/rnd": same host as the page
 *   (a page of another origin than Sockend's needs `--allow-origin` there: docs/sockend.md)
 *   s.emit("randomRequest", {val: 3}).then(answer => ..., err => err.code);
 *   s.emit("randomRequest", {val: 3}, (err, answer) => ...); // node-style callback
 *   s.on("randomUpdate", data => ...);                      // events of the namespace's Publishers
 *   s.on("connect", fn); s.on("disconnect", fn); s.on("$skipped", ({count}) => ...);
 *   s.upload("upload", {name: "a"}, chunks).then(answer => ...);  // chunks: any (async) iterable
 *
 * Wire format (docs/sockend.md): JSON text frames, {"id","type","data","timeout"} up,
 * {"id","ok","data"} | {"id","ok":false,"error":{code,type,message,retryable}} and
 * {"event","data"} down; an upload adds "chunked": true, then {"id","chunk"}... and
 * {"id","end": true} up, keeping to the {"id","credit"} frames that come down.
 * No build step: a plain script (UMD), also usable from CommonJS.
 */
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory();
  else root.Sockend = factory();
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  class SockendError extends Error {
    constructor(body) {
      super((body && body.message) || (body && body.type) || "sockend error");
      this.name = "SockendError";
      this.code = (body && body.code) || "error";
      this.type = (body && body.type) || "RemoteError";
      this.retryable = !!(body && body.retryable);
    }
  }

  function resolveUrl(url) {
    if (/^wss?:\/\//.test(url)) return url;
    const loc = root.location;
    if (!loc) throw new Error("a relative Sockend url needs a page location: " + url);
    const scheme = loc.protocol === "https:" ? "wss://" : "ws://";
    const path = !url ? "/" : url.charAt(0) === "/" ? url : "/" + url;
    return scheme + loc.host + path;
  }

  const root = typeof self !== "undefined" ? self : globalThis;
  const UPLOAD_WINDOW = 64;   // chunks an upload may run ahead of the credit granted
  const DEFAULTS = { reconnect: true, minDelay: 250, maxDelay: 5000, maxQueued: 1000, timeout: undefined };

  class Socket {
    constructor(url, options) {
      this.url = resolveUrl(url);
      this.options = Object.assign({}, DEFAULTS, options || {});
      this.connected = false;
      this._nextId = 1;
      this._pending = new Map();   // id -> {resolve, reject, frame, sent}
      this._queue = [];            // frames waiting for the connection
      this._listeners = new Map();
      this._closed = false;
      this._delay = this.options.minDelay;
      this._open();
    }

    _open() {
      const ws = new WebSocket(this.url);
      this._ws = ws;
      ws.onopen = () => {
        this.connected = true;
        this._delay = this.options.minDelay;
        const queued = this._queue.splice(0);
        for (const frame of queued) this._sendNow(frame);
        this._fire("connect");
      };
      ws.onmessage = (msg) => this._receive(msg.data);
      ws.onclose = (ev) => {
        const was = this.connected;
        this.connected = false;
        this._ws = null;
        // Requests already on the wire may or may not have run: fail them, retryable.
        for (const [id, p] of this._pending) {
          if (p.upload) p.upload.wake();
          if (p.sent) {
            this._pending.delete(id);
            p.reject(new SockendError({ code: "unreachable", type: "Disconnected", retryable: true,
              message: "connection closed before the answer (" + ev.code + ")" }));
          }
        }
        if (was) this._fire("disconnect", { code: ev.code, reason: ev.reason });
        if (this._closed || !this.options.reconnect) return this._failQueued("closed");
        setTimeout(() => { if (!this._closed) this._open(); }, this._delay);
        this._delay = Math.min(this._delay * 2, this.options.maxDelay);
      };
      ws.onerror = () => this._fire("error", new Error("websocket error on " + this.url));
    }

    _receive(text) {
      let msg;
      try { msg = JSON.parse(text); } catch (e) { return this._fire("error", e); }
      if (msg && typeof msg.event === "string") return this._fire(msg.event, msg.data);
      const p = msg && this._pending.get(msg.id);
      if (!p) return;
      if (typeof msg.credit === "number") {   // an upload may send more chunks
        if (p.upload) { p.upload.window += msg.credit; p.upload.wake(); }
        return;
      }
      this._pending.delete(msg.id);
      if (p.upload) { p.upload.done = true; p.upload.wake(); }
      if (msg.ok) p.resolve(msg.data);
      else p.reject(new SockendError(msg.error));
    }

    _sendNow(frame) {
      const p = this._pending.get(frame.id);
      if (!p) return;
      p.sent = true;
      this._ws.send(JSON.stringify(frame));
    }

    _failQueued(why) {
      const queued = this._queue.splice(0);
      for (const frame of queued) {
        const p = this._pending.get(frame.id);
        if (!p) continue;
        this._pending.delete(frame.id);
        p.reject(new SockendError({ code: "unreachable", type: "Closed", message: "sockend " + why }));
      }
    }

    /** Send a request to the namespace's Responders; returns a Promise of the answer. */
    emit(type, data, optionsOrCb, maybeCb) {
      const cb = typeof optionsOrCb === "function" ? optionsOrCb : maybeCb;
      const opts = typeof optionsOrCb === "object" && optionsOrCb ? optionsOrCb : {};
      const frame = { id: this._nextId++, type: type, data: data === undefined ? {} : data };
      const timeout = opts.timeout !== undefined ? opts.timeout : this.options.timeout;
      if (timeout !== undefined) frame.timeout = timeout;
      const promise = new Promise((resolve, reject) => {
        if (this._closed) return reject(new SockendError({ code: "unreachable", type: "Closed", message: "sockend closed" }));
        this._pending.set(frame.id, { resolve, reject, sent: false });
        if (this.connected) this._sendNow(frame);
        else if (this._queue.length < this.options.maxQueued) this._queue.push(frame);
        else {
          this._pending.delete(frame.id);
          reject(new SockendError({ code: "queue-full", type: "QueueFull", retryable: true,
            message: "too many requests waiting for the connection" }));
        }
      });
      if (cb) {
        promise.then((answer) => cb(null, answer), (err) => cb(err));
        return undefined;
      }
      return promise;
    }

    /** An upload: a request whose chunks (an array, or any iterable or async iterable of
     *  JSON values) follow it, never more than 64 beyond what the Responder's handler has
     *  taken; the handler reads them as `async def handler(req, chunks)`.  Returns a
     *  Promise of the answer.  Needs a connected socket (not queued while away). */
    async upload(type, data, chunks, options) {
      const opts = options || {};
      if (!this.connected || this._closed) {
        throw new SockendError({ code: "unreachable", type: "Disconnected", retryable: true,
          message: "an upload needs a connected socket" });
      }
      const frame = { id: this._nextId++, type: type, data: data === undefined ? {} : data,
                      chunked: true };
      const timeout = opts.timeout !== undefined ? opts.timeout : this.options.timeout;
      if (timeout !== undefined) frame.timeout = timeout;
      const upload = { window: UPLOAD_WINDOW, done: false, waiter: null,
                       wake() { const w = this.waiter; this.waiter = null; if (w) w(); } };
      const answer = new Promise((resolve, reject) => {
        this._pending.set(frame.id, { resolve, reject, sent: false, upload: upload });
      });
      this._sendNow(frame);
      for await (const chunk of chunks) {
        while (upload.window <= 0 && !upload.done && this._ws) {
          await new Promise((resolve) => { upload.waiter = resolve; });
        }
        if (upload.done || !this._ws) break;   // answered (or failed) early, or disconnected
        this._ws.send(JSON.stringify({ id: frame.id, chunk: chunk }));
        upload.window -= 1;
      }
      if (!upload.done && this._ws) this._ws.send(JSON.stringify({ id: frame.id, end: true }));
      return answer;
    }

    /** The event types the namespace's Responders advertise right now. */
    types() { return this.emit("$types", {}); }

    on(event, fn) {
      if (!this._listeners.has(event)) this._listeners.set(event, new Set());
      this._listeners.get(event).add(fn);
      return this;
    }

    off(event, fn) {
      const set = this._listeners.get(event);
      if (set) set.delete(fn);
      return this;
    }

    _fire(event, data) {
      const set = this._listeners.get(event);
      if (!set) return;
      for (const fn of Array.from(set)) {
        try { fn(data); } catch (e) { setTimeout(() => { throw e; }); }
      }
    }

    close() {
      this._closed = true;
      if (this._ws) this._ws.close(1000);
      else this._failQueued("closed");
    }
  }

  return {
    connect: (url, options) => new Socket(url, options),
    Socket: Socket,
    SockendError: SockendError,
  };
});
