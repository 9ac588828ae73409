// The load client of the Sockend comparison (bench/sockend_sio.py): socket.io-client
// 4.8 (bench/.peers, installed with cote), the same script and the same transport
// (websocket only) against cote's Sockend and against ours, so that the only thing
// that differs between the two columns is the server side.
//
//   node sio_load.js URL MODE [name=value ...]
//
// MODE seq       one client: emit('echo', {p}, ack), await the ack, repeat
//      inflight  `conns` clients keeping `window` emits outstanding in all
//      rr        seq then inflight in one process (what the bench runs)
//      fanout    `clients` clients on '/', READY once all are connected; then per
//                stdin line "burst E" (E more 'tick' events expected by every client):
//                "ARMED" at once, "BURST {json}" once every client has them all, or
//                after a quiet spell (what is missing then is lost)
//
// Acks: cote passes its responder's callback arguments through, `(null, value)` for a
// promise responder, `(err)` on failure; our Sockend acks `(value)`, or
// `({error: {...}})` on failure.  The answer is the last argument either way.
//
// Every wait is bounded: an ack that does not come within STALL_MS, a connection that
// fails or is not up within CONNECT_MS, end the process with a RESULT {"error": ...}.
'use strict'
const path = require('path')
const readline = require('readline')

const peers = process.env.COTE_PEERS_DIR || path.join(__dirname, '..', '.peers')
const { io } = require(path.join(peers, 'node_modules', 'socket.io-client'))

const url = process.argv[2]
const mode = process.argv[3]
const opt = Object.fromEntries(process.argv.slice(4).map(a => a.split('=')).map(([k, v]) => [k, Number(v)]))
const PAYLOAD = 'x'.repeat(opt.payload || 32)
const SEQ = opt.seq || 2000
const WARMUP = opt.warmup ?? 2000            // sequential warm-up calls (V8 on both sides)
const SECS = opt.secs || 1.0
const WINDOW = opt.window || 100
const CONNS = opt.conns || 4
const CLIENTS = opt.clients || 100
const STALL_MS = opt.stall_ms || 5000
const CONNECT_MS = opt.connect_ms || 30000
const QUIET_MS = opt.quiet_ms || 2000
const CLIENT_OPTS = { transports: ['websocket'], forceNew: true, reconnection: false }

const now = () => process.hrtime.bigint()
const secsSince = t => Number(now() - t) / 1e9
const line = (tag, obj) => process.stdout.write(tag + ' ' + JSON.stringify(obj) + '\n')

let lastProgress = Date.now()
let busy = false                 // an ack is awaited: the stall watchdog is armed
let phase = 'start'
const stats = { requests: 0, errors: 0, wrong: 0, first_error: null, ack_args: null }

function fail(error) {
  line('RESULT', { error: `${phase}: ${error}`, ...stats })
  process.exit(1)
}

setInterval(() => {
  if (busy && Date.now() - lastProgress > STALL_MS) fail(`no ack within ${STALL_MS} ms`)
}, 250).unref()

function connect(timeoutMs = CONNECT_MS) {
  return new Promise((resolve, reject) => {
    const socket = io(url, CLIENT_OPTS)
    const timer = setTimeout(() => { socket.close(); reject(new Error(`not connected within ${timeoutMs} ms`)) }, timeoutMs)
    socket.once('connect', () => { clearTimeout(timer); resolve(socket) })
    socket.once('connect_error', err => {
      clearTimeout(timer)
      socket.close()
      const detail = err.description && (err.description.message || err.description.error?.message || String(err.description))
      reject(new Error(`connect_error: ${err.message}${detail ? ' (' + detail + ')' : ''}${err.context ? ' ' + JSON.stringify(err.context).slice(0, 200) : ''}`))
    })
  })
}

// The answer of one ack, or throws what the server said instead.
function answerOf(args) {
  if (stats.ack_args === null) stats.ack_args = args.length
  if (args.length === 0) throw new Error('empty ack')
  if (args.length >= 2 && args[0] != null) throw new Error('ack error ' + JSON.stringify(args[0]).slice(0, 300))
  const last = args[args.length - 1]
  if (last && typeof last === 'object' && 'error' in last) throw new Error('ack error ' + JSON.stringify(last.error).slice(0, 300))
  return last
}

function check(args) {
  lastProgress = Date.now()
  stats.requests++
  let answer
  try {
    answer = answerOf(args)
  } catch (err) {
    stats.errors++
    stats.first_error = stats.first_error || err.message
    return
  }
  if (answer !== PAYLOAD) {
    stats.wrong++
    stats.first_error = stats.first_error || 'wrong answer ' + JSON.stringify(answer).slice(0, 200)
  }
}

function call(socket) {
  return new Promise(resolve => socket.emit('echo', { p: PAYLOAD }, (...args) => { check(args); resolve() }))
}

// Until the server knows a Responder for 'echo' (cote's Sockend only listens for the
// topics of the responders it has discovered: an emit before that is never acked).
async function probe(socket) {
  phase = 'probe'
  const deadline = Date.now() + 15000
  let seen = 'no ack'
  while (Date.now() < deadline) {
    const args = await new Promise(resolve => {
      socket.timeout(500).emit('echo', { p: PAYLOAD }, (err, ...rest) => resolve(err ? null : rest))
    })
    if (args) {
      try { if (answerOf(args) === PAYLOAD) return } catch (err) { seen = err.message }
    }
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  fail(`no echo answer within 15 s (last: ${seen})`)
}

async function sequential(socket, n) {
  const lat = new Float64Array(n)
  busy = true
  const t0 = now()
  for (let i = 0; i < n; i++) {
    const s = now()
    await call(socket)
    lat[i] = Number(now() - s) / 1e3
  }
  const secs = secsSince(t0)
  busy = false
  lat.sort()
  return { n, rate: n / secs, p50_us: lat[Math.floor(n * 0.5)], p99_us: lat[Math.floor(n * 0.99)] }
}

// `window` emits outstanding, spread over the sockets; each ack sends the next one
// until `secs` are over, then the outstanding ones are waited for.
function inflight(sockets, window, secs) {
  return new Promise(resolve => {
    let done = 0
    let active = window
    const t0 = now()
    const deadline = t0 + BigInt(Math.round(secs * 1e9))
    busy = true
    const fire = socket => socket.emit('echo', { p: PAYLOAD }, (...args) => {
      check(args)
      done++
      if (now() < deadline) return fire(socket)
      if (--active === 0) {
        busy = false
        resolve({ window, conns: sockets.length, rate: done / secsSince(t0), requests: done })
      }
    })
    for (let i = 0; i < window; i++) fire(sockets[i % sockets.length])
  })
}

async function requests() {
  phase = 'connect'
  const sockets = []
  for (let i = 0; i < (mode === 'seq' ? 1 : CONNS); i++) sockets.push(await connect())
  await probe(sockets[0])
  const cpu0 = process.cpuUsage()
  const t0 = now()
  const out = {}
  if (mode !== 'inflight') {
    phase = 'warm-up'
    await sequential(sockets[0], WARMUP)
    phase = 'seq'
    out.seq = await sequential(sockets[0], SEQ)
  }
  if (mode !== 'seq') {
    phase = 'warm-up in flight'
    await inflight(sockets, WINDOW, 0.3)
    phase = 'inflight'
    out.inflight = await inflight(sockets, WINDOW, SECS)
  }
  const cpu = process.cpuUsage(cpu0)
  out.client_cpu_s = (cpu.user + cpu.system) / 1e6
  out.secs = secsSince(t0)
  for (const s of sockets) s.close()
  line('RESULT', { ...out, ...stats })
  process.exit(stats.errors || stats.wrong ? 1 : 0)
}

async function fanout() {
  phase = 'connect'
  const counts = new Int32Array(CLIENTS)
  const disconnects = {}
  let total = 0
  let skipped = 0
  let burst = null
  const t0 = now()
  const sockets = []
  for (let i = 0; i < CLIENTS; i += 50) {   // 50 handshakes at a time: no accept-queue overflow
    const batch = []
    for (let j = i; j < Math.min(CLIENTS, i + 50); j++) batch.push(connect())
    try {
      sockets.push(...await Promise.all(batch))
    } catch (err) {
      return fail(`${sockets.length} of ${CLIENTS} connected, then ${err.message}`)
    }
  }
  sockets.forEach((socket, i) => {
    socket.on('tick', () => {
      counts[i]++
      total++
      if (burst === null) return
      const t = now()
      if (burst.first === null) burst.first = t
      burst.last = t
      if (total - burst.base >= burst.expected) finish()
    })
    socket.on('$skipped', data => { skipped += Number((data && data.count) || 0) })
    socket.on('disconnect', reason => { disconnects[reason] = (disconnects[reason] || 0) + 1 })
  })
  const connectSecs = secsSince(t0)
  let target = 0
  const cpu = () => { const c = process.cpuUsage(); return (c.user + c.system) / 1e6 }

  function finish() {
    const b = burst
    burst = null
    clearInterval(b.timer)
    const received = total - b.base
    const secs = b.first === null ? 0 : Number(b.last - b.first) / 1e9
    let short = 0
    let lost = 0
    for (let i = 0; i < CLIENTS; i++) {
      if (counts[i] < target) { short++; lost += target - counts[i] }
    }
    line('BURST', {
      clients: CLIENTS, events: b.events, expected: b.expected, received, lost, clients_short: short,
      secs, rate: secs > 0 ? (received - 1) / secs : 0,
      first_after_ms: b.first === null ? null : Number(b.first - b.start) / 1e6,
      // the monotonic clock (ns), the same in every process: the bench merges the
      // bursts of several load processes with these
      first_ns: b.first === null ? null : Number(b.first), last_ns: b.last === null ? null : Number(b.last),
      client_cpu_s: cpu() - b.cpu0, skipped, disconnects,
    })
  }

  line('READY', { clients: CLIENTS, connect_secs: connectSecs })
  phase = 'fanout'
  const lines = readline.createInterface({ input: process.stdin })
  lines.on('line', text => {
    const words = text.trim().split(/\s+/)
    if (words[0] !== 'burst' || burst !== null) return
    const events = Number(words[1])
    target += events
    const start = now()
    burst = { events, expected: events * CLIENTS, base: total, start, first: null, last: null, cpu0: cpu() }
    // a quiet spell once started (or no event at all for 5 quiet spells): whatever
    // is missing then is lost
    burst.timer = setInterval(() => {
      const idle = Number(now() - (burst.last ?? burst.start)) / 1e6
      if (idle > (burst.first === null ? 5 * QUIET_MS : QUIET_MS)) finish()
    }, 50)
    line('ARMED', { target })
  })
  lines.on('close', () => { sockets.forEach(s => s.close()); process.exit(0) })
}

const run = { seq: requests, inflight: requests, rr: requests, fanout }[mode]
if (!url || !run) {
  process.stderr.write('usage: node sio_load.js URL seq|inflight|rr|fanout [name=value ...]\n')
  process.exit(2)
}
run().catch(err => fail(err.message))
