// Shared discovery options for the cote baseline: loopback only, fast hellos, a
// per-run key so stray cote processes on this machine never join the benchmark.
'use strict'
const path = require('path')

const peers = process.env.COTE_PEERS_DIR || path.join(__dirname, '..', '.peers')
const cote = require(path.join(peers, 'node_modules', 'cote'))
const axonSock = require(path.join(peers, 'node_modules', '@dashersw', 'axon', 'lib', 'sockets', 'sock'))

// Our own address on loopback. Each cote process gets its own 127.0.0.x so that
// unicast discovery (a list of every peer's address, same UDP port) reaches all of
// them without broadcast, and nothing listens beyond loopback.
const ownAddress = process.env.BENCH_COTE_ADDR || '127.0.0.1'

// axon binds its TCP servers on 0.0.0.0; keep the benchmark on loopback.
const originalBind = axonSock.prototype.bind
axonSock.prototype.bind = function (port, host, fn) {
  if (typeof port === 'number' && (host === undefined || typeof host === 'function')) {
    return originalBind.call(this, port, ownAddress, host)
  }
  return originalBind.call(this, port, host, fn)
}

function discoveryOptions() {
  return {
    address: ownAddress,
    unicast: process.env.BENCH_COTE_UNICAST || ownAddress,
    port: Number(process.env.BENCH_COTE_DISCOVERY_PORT || 12345),
    helloInterval: 100,
    checkInterval: 400,
    nodeTimeout: 1000,
    masterTimeout: 1200,
    log: false,
  }
}

const key = process.env.BENCH_COTE_KEY || 'bench'

function rssMB() {
  return process.memoryUsage().rss / (1024 * 1024)
}

// Lines the Python side (bench/harness.py) reads: READY once serving, RESULT at the end.
function ready(obj) {
  process.stdout.write('READY ' + JSON.stringify(obj) + '\n')
}

function report(obj) {
  process.stdout.write('RESULT ' + JSON.stringify(obj) + '\n')
}

module.exports = { cote, discoveryOptions, key, rssMB, ready, report }
