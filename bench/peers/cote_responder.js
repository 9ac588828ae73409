// cote Responder echo: answers every 'echo' request with its payload.
'use strict'
const { cote, discoveryOptions, key, ready, report, rssMB } = require('./cote_common')

const responder = new cote.Responder(
  { name: 'bench-rep', key, respondsTo: ['echo'] },
  discoveryOptions()
)
responder.on('echo', req => Promise.resolve(req.p))
responder.sock.on('bind', () => ready({ rss_mb: rssMB() }))
setInterval(() => {}, 1 << 30) // stay alive until the bench kills us
