// cote Subscriber: counts 'tick' messages; reports the delivered rate (first to
// last message) and how many arrived, after `count` or a quiet second.
// argv: count
'use strict'
const { cote, discoveryOptions, key, report, rssMB } = require('./cote_common')

const count = Number(process.argv[2] || 50000)
const subscriber = new cote.Subscriber({ name: 'bench-sub', key, subscribesTo: ['tick'] }, discoveryOptions())

let received = 0
let first = null
let last = null
let quiet = null

function finish() {
  const secs = first === null ? 0 : Number(last - first) / 1e9
  report({ received, expected: count, rate: secs > 0 ? (received - 1) / secs : 0, rss_mb: rssMB() })
  process.exit(0)
}

subscriber.on('tick', () => {
  const now = process.hrtime.bigint()
  if (first === null) first = now
  last = now
  received++
  if (received >= count) return finish()
  clearTimeout(quiet)
  quiet = setTimeout(finish, 1000)
})
