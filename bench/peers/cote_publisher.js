// cote Publisher: once `subscribers` peers are connected, publishes `count`
// messages on topic 'tick' as fast as node will take them, a batch per tick of
// the event loop so the sockets get to drain.
// argv: count payloadBytes subscribers
'use strict'
const { cote, discoveryOptions, key, ready, report, rssMB } = require('./cote_common')

const count = Number(process.argv[2] || 50000)
const payload = 'x'.repeat(Number(process.argv[3] || 32))
const subscribers = Number(process.argv[4] || 1)
const publisher = new cote.Publisher({ name: 'bench-pub', key, broadcasts: ['tick'] }, discoveryOptions())

let started = false
function maybeStart() {
  if (started || publisher.sock.sock.socks.length < subscribers) return
  started = true
  setTimeout(publishAll, 300) // let the subscribers' sockets settle
}

function publishAll() {
  let seq = 0
  const t0 = process.hrtime.bigint()
  function batch() {
    const end = Math.min(count, seq + 500)
    for (; seq < end; seq++) publisher.publish('tick', { seq, p: payload })
    if (seq < count) return setImmediate(batch)
    report({ published: count, secs: Number(process.hrtime.bigint() - t0) / 1e9, rss_mb: rssMB() })
  }
  batch()
}

publisher.sock.sock.on('bind', () => ready({ rss_mb: rssMB() }))
setInterval(maybeStart, 20)
