// cote Requester: sequential round trips (p50/p99) and throughput with N in flight.
// argv: payloadBytes seqCount durationSeconds inflight[,inflight...]
'use strict'
const { cote, discoveryOptions, key, report, rssMB } = require('./cote_common')

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

requester.on('cote:added', async () => {
  try {
    await sequential(1000) // warm-up: let V8 optimise the hot path first
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
