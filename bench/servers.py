"""Echo servers the benchmark runs in child processes.

``python -m bench.servers KIND ADDRESS`` binds, prints ``READY <bound address>`` and
serves until terminated.  Kinds:

- ``pynng-rep``: the pynng baseline, a blocking Rep0 loop (the simplest fast server a
  pynng user would write);
- ``rpc-echo``: :class:`transport.rpc.RpcServer` whose handler returns the payload;
- ``node``: an :class:`engine.node.Node` with its control endpoint on ADDRESS, hosting
  the apps under the further arguments (``READY <control address>``);
- ``mesh-responder``: a mesh Responder answering ``echo`` with the request's ``p``
  (ADDRESS is the discovery UDP port; discovery stays on loopback);
- ``mesh-publisher``: a mesh Publisher that, once a subscriber is discovered, publishes
  COUNT ``tick`` events as fast as it can and prints ``RESULT {json}``;
- ``sockend``: a Sockend on an ephemeral loopback port bridging to the mesh
  (``READY <port>``);
- ``tcp-copy``: the streaming baseline: a trio TCP listener on an ephemeral loopback
  port (``READY <port>``) that, for each connection, waits for one byte, then writes
  ADDRESS (a byte count) in 64 KiB ``send_all`` calls and closes.
"""
from __future__ import annotations

import signal
import sys


def serve_pynng_rep(address: str) -> None:
    import pynng

    from transport.sockets import bound_address

    with pynng.Rep0(listen=address) as sock:
        print("READY", bound_address(sock), flush=True)
        while True:
            sock.send(sock.recv())


def serve_rpc_echo(address: str) -> None:
    import trio

    from transport.rpc import RpcServer

    async def echo(req):
        return req.payload

    async def main() -> None:
        server = RpcServer(address, echo)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.run)
            print("READY", bound, flush=True)

    trio.run(main)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_node(address: str, *app_dirs: str) -> None:
    import trio

    from engine.node.node import Node

    async def main() -> None:
        node = Node(control=address)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            started = await node.load_apps(app_dirs)
            if len(started) != len(app_dirs):
                print("FAILED", node.rejected, flush=True)
                nursery.cancel_scope.cancel()
                return
            print("READY", node.control_address, flush=True)

    trio.run(main)


def _mesh_discovery(port: str):
    from transport.mesh.discovery import DiscoveryConfig

    return DiscoveryConfig(port=int(port), interface="127.0.0.1", hello_interval=0.2,
                           expiry=1.0)


def serve_mesh_responder(port: str, key: str) -> None:
    import trio

    from transport.mesh.responder import Responder

    async def main() -> None:
        responder = Responder("bench-rep", responds_to=["echo"], key=key,
                              discovery=_mesh_discovery(port))

        # A plain function, like cote's `req => Promise.resolve(req.p)`: it answers
        # where the request arrives, with no task (transport/responder.py).
        @responder.on("echo")
        def echo(req):
            return req["p"]

        async with responder:
            print("READY", responder.name, flush=True)
            await trio.sleep_forever()

    trio.run(main)


def serve_mesh_publisher(port: str, key: str, count: str) -> None:
    import json
    import time

    import trio

    from transport.mesh.pubsub import Publisher

    async def main() -> None:
        n = int(count)
        payload = "x" * 32  # a str, like cote's: Sockend forwards events as JSON
        async with Publisher("bench-pub", broadcasts=["tick"], key=key,
                             discovery=_mesh_discovery(port)) as publisher:
            print("READY", publisher.address, flush=True)
            with trio.fail_after(20):
                while not any(p.role == "subscriber" for p in publisher.peers()):
                    await trio.sleep(0.01)
            await trio.sleep(0.5)  # the subscriber dials once it has seen us
            t0 = time.perf_counter()
            for seq in range(n):
                publisher.publish("tick", {"seq": seq, "p": payload})
                if seq % 1000 == 999:
                    await publisher.flush()
            await publisher.flush()
            elapsed = time.perf_counter() - t0
            print("RESULT", json.dumps({"published": n, "secs": elapsed,
                                        "stats": publisher.stats}), flush=True)
            await trio.sleep_forever()

    trio.run(main)


def serve_sockend(port: str, key: str) -> None:
    import trio

    from sockend.bridge import TransportMesh
    from sockend.server import Sockend, SockendConfig

    async def main() -> None:
        mesh = TransportMesh(name="bench-sockend", key=key, discovery=_mesh_discovery(port))
        sockend = Sockend(mesh, SockendConfig(host="127.0.0.1", port=0, linger=60))
        async with trio.open_nursery() as nursery:
            await nursery.start(sockend.run)
            print("READY", sockend.port, flush=True)

    trio.run(main)


def serve_tcp_copy(total: str) -> None:
    from functools import partial

    import trio

    size = int(total)
    chunk = b"x" * 64 * 1024

    async def copy(stream: trio.SocketStream) -> None:
        async with stream:
            if not await stream.receive_some(1):
                return
            for _ in range(size // len(chunk)):
                await stream.send_all(chunk)
            if size % len(chunk):
                await stream.send_all(chunk[:size % len(chunk)])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, copy, 0, host="127.0.0.1"))
            print("READY", listeners[0].socket.getsockname()[1], flush=True)

    trio.run(main)


KINDS = {"pynng-rep": serve_pynng_rep, "rpc-echo": serve_rpc_echo, "node": serve_node,
         "mesh-responder": serve_mesh_responder, "mesh-publisher": serve_mesh_publisher,
         "sockend": serve_sockend, "tcp-copy": serve_tcp_copy}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in KINDS:
        print(f"usage: python -m bench.servers {{{','.join(KINDS)}}} ADDRESS [APP_DIR...]",
              file=sys.stderr)
        return 2
    # SIGTERM from the bench ends us quietly (KeyboardInterrupt unwinds trio cleanly).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        KINDS[argv[0]](*argv[1:])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
