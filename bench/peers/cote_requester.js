// cote Requester: sequential round trips (p50/p99) and throughput with N in flight.
// argv: payloadBytes seqCount durationSeconds inflight[,inflight...] [--rounds]
// With --rounds it warms up, prints READY, then runs one round per stdin line,
// "k seconds" (k in flight) or "seq n" (n sequential), and answers each with a line
// "ROUND {json}" (the Python side interleaves these with its own rounds); it exits
// when stdin closes.
'use strict'
const readline = require('readline')
const { cote, discoveryOptions, key, ready, report, rssMB } = require('./cote_common')

const [payloadBytes, seqCount, duration, inflightList] = [
  Number(process.argv[2] || 32),
  Number(process.argv[3] || 2000),
  Number(process.argv[4] || 1.5),
  (process.argv[5] || '1,16,256').split(',').map(Number),
]
const payload = 'x'.repeat(payloadBytes)
const requester = new cote.Requester({ name: 'bench-req', key, requests: ['echo'] }, discoveryOptions())

function send() {
  return requester.send({ type: 'echo', p: payload })
}

async function sequential(n) {
  const lat = new Array(n)
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < n; i++) {
    const s = process.hrtime.bigint()
    await send()
    lat[i] = Number(process.hrtime.bigint() - s) / 1e3 // us
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9
  lat.sort((a, b) => a - b)
  return { rate: n / secs, p50_us: lat[Math.floor(n * 0.5)], p99_us: lat[Math.floor(n * 0.99)] }
}

async function inflight(k, secs) {
  let done = 0
  const deadline = Date.now() + secs * 1000
  const t0 = process.hrtime.bigint()
  async function worker() {
    while (Date.now() < deadline) {
      await send()
      done++
    }
  }
  await Promise.all(Array.from({ length: k }, worker))
  return done / (Number(process.hrtime.bigint() - t0) / 1e9)
}

function serveRounds() {
  ready({ rss_mb: rssMB() })
  const lines = readline.createInterface({ input: process.stdin })
  let queue = Promise.resolve()
  lines.on('line', line => {
    const words = line.trim().split(/\s+/)
    queue = queue.then(async () => {
      let out
      if (words[0] === 'seq') {
        out = await sequential(Number(words[1]))
      } else {
        const [k, secs] = words.map(Number)
        out = { k, rate: await inflight(k, secs) }
      }
      process.stdout.write('ROUND ' + JSON.stringify(out) + '\n')
    })
  })
  lines.on('close', () => queue.then(() => process.exit(0)))
}

let started = false
requester.on('cote:added', async () => {
  if (started) return
  started = true
  try {
    // Warm-up: V8 optimises the hot path over the first few thousand calls (measured:
    // 8,700 -> 15,000 sequential round trips/s, p99 870 -> 190 us, over 4 x 1,000).
    await sequential(5000)
    await inflight(Math.max(...inflightList), 0.3)
    if (process.argv.includes('--rounds')) return serveRounds()
    const seq = await sequential(seqCount)
    const tput = {}
    for (const k of inflightList) tput[k] = await inflight(k, duration)
    report({ seq, inflight: tput, rss_mb: rssMB() })
    process.exit(0)
  } catch (err) {
    report({ error: String(err) })
    process.exit(1)
  }
})
