"""What both ends of a zygote's control socket agree on: the node's
(:mod:`engine.pool.zygote_client`) and the zygote's (:mod:`engine.worker.zygote`).

It lives on the worker's side because the node may import the worker's modules but
the worker never imports the node's (docs/architecture.md)."""
from __future__ import annotations

# Bytes of one control message: a spawn request carries the slave's whole
# environment, and a SOCK_SEQPACKET message must fit the socket buffer (~200 KB).
MAX_MESSAGE = 1 << 17
