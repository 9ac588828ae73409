// cote's side of the Sockend comparison (bench/sockend_sio.py), one role per process,
// like ours (a Sockend process, a Responder process, a Publisher process):
//
//   node cote_sockend.js sockend PORT   an http server + socket.io 4 server (cote's own
//                                        socket.io dependency) + new cote.Sockend(io, ...)
//                                        on 127.0.0.1:PORT (0: any free port);
//                                        prints READY {"port": ...}
//   node cote_sockend.js publisher      a cote Publisher of 'tick' in the default
//                                        namespace, driven by stdin lines:
//                                        "subscribers N SECS" -> "SUBS {json}" once N
//                                          subscribers are connected (or SECS passed),
//                                        "publish N" -> publishes N events {seq, p} as fast
//                                          as node takes them -> "PUBLISHED {json}".
//
// The Responder is bench/peers/cote_responder.js, unchanged (promise-style echo).
//
// Discovery: cote_common.js gives each process its own 127.0.0.x and unicast discovery
// to the list of those addresses.  A Sockend process holds three discovery instances
// (the Sockend's own, then the Requester and the Subscriber it creates once it has
// seen a Responder / a Publisher), and unicast UDP to one address:port reaches only
// one of the sockets bound there; so this process takes its addresses from
// BENCH_COTE_ADDRS, one per instance, in creation order.
'use strict'
const path = require('path')
const readline = require('readline')
const { cote, discoveryOptions, key, ready, rssMB } = require('./cote_common')

const peers = process.env.COTE_PEERS_DIR || path.join(__dirname, '..', '.peers')
const role = process.argv[2]

function serveSockend(port) {
  const pool = (process.env.BENCH_COTE_ADDRS || '').split(',').filter(Boolean)
  const Network = require(path.join(peers, 'node_modules', '@dashersw', 'node-discover', 'lib', 'network'))
  const start = Network.prototype.start
  let next = 0
  Network.prototype.start = function (callback) {
    if (pool.length) this.address = pool[Math.min(next++, pool.length - 1)]
    return start.call(this, callback)
  }

  const http = require('http')
  const { Server } = require(path.join(peers, 'node_modules', 'socket.io'))
  const server = http.createServer()
  // socket.io's defaults, as a cote user would have them (polling and websocket
  // allowed; the load client asks for websocket only); no client bundle served.
  const io = new Server(server, { serveClient: false })
  new cote.Sockend(io, { name: 'sockend', key }, discoveryOptions())
  server.listen(port, '127.0.0.1', () => ready({ port: server.address().port, rss_mb: rssMB() }))
}

function servePublisher() {
  const payload = 'x'.repeat(32)
  const publisher = new cote.Publisher({ name: 'bench-pub', key, broadcasts: ['tick'] }, discoveryOptions())
  let seq = 0
  const subscribers = () => publisher.sock.sock.socks.length

  function waitSubscribers(n, secs) {
    const deadline = Date.now() + secs * 1000
    return new Promise(resolve => {
      const check = () => {
        if (subscribers() >= n || Date.now() > deadline) {
          // the subscriber's socket is up; give it a moment to settle, as
          // cote_publisher.js does
          return setTimeout(() => resolve({ subscribers: subscribers() }), 300)
        }
        setTimeout(check, 20)
      }
      check()
    })
  }

  function publish(n) {
    return new Promise(resolve => {
      const end = seq + n
      const t0 = process.hrtime.bigint()
      function batch() {
        const stop = Math.min(end, seq + 500)
        for (; seq < stop; seq++) publisher.publish('tick', { seq, p: payload })
        if (seq < end) return setImmediate(batch)
        resolve({ published: n, secs: Number(process.hrtime.bigint() - t0) / 1e9 })
      }
      batch()
    })
  }

  publisher.sock.sock.on('bind', () => {
    ready({ rss_mb: rssMB() })
    const lines = readline.createInterface({ input: process.stdin })
    let queue = Promise.resolve()
    lines.on('line', line => {
      const words = line.trim().split(/\s+/)
      queue = queue.then(async () => {
        if (words[0] === 'subscribers') {
          const out = await waitSubscribers(Number(words[1] || 1), Number(words[2] || 10))
          process.stdout.write('SUBS ' + JSON.stringify(out) + '\n')
        } else if (words[0] === 'publish') {
          const out = await publish(Number(words[1]))
          process.stdout.write('PUBLISHED ' + JSON.stringify(out) + '\n')
        }
      })
    })
    lines.on('close', () => queue.then(() => process.exit(0)))
  })
}

if (role === 'sockend') serveSockend(Number(process.argv[3] || 0))
else if (role === 'publisher') servePublisher()
else {
  process.stderr.write('usage: node cote_sockend.js sockend PORT | publisher\n')
  process.exit(2)
}
