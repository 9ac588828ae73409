"""The mesh side of the Sockend example: a Responder for ``randomRequest`` and a
Publisher of ``randomUpdate`` in the default namespace and in ``rnd``.

    python examples/sockend/services.py &
    python -m sockend --port 5555 --static examples/sockend
    # open http://localhost:5555

Discovery follows the MESH_* environment (docs/mesh.md), like every mesh component.
"""
import argparse
import random

import trio

from transport import DiscoveryConfig, Publisher, Responder


def responder(namespace: str, discovery: DiscoveryConfig) -> Responder:
    rep = Responder("randomRep", namespace=namespace, responds_to=["randomRequest"],
                    discovery=discovery)

    @rep.on("randomRequest")
    async def answer(req):
        val = req.get("val")
        if not isinstance(val, int):
            raise ValueError("val must be an integer")
        return {"namespace": namespace or "default", "val": val, "answer": random.randrange(100)}
    return rep


async def publish(publisher: Publisher, interval: float) -> None:
    while True:
        publisher.publish("randomUpdate", {"val": random.randrange(1000)})
        await trio.sleep(interval)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    opts = ap.parse_args()
    disco = DiscoveryConfig.from_env()
    async with responder("", disco), responder("rnd", disco), \
            Publisher("randomPub", broadcasts=["randomUpdate"], discovery=disco) as pub, \
            Publisher("randomPub", namespace="rnd", broadcasts=["randomUpdate"],
                      discovery=disco) as pub_rnd, trio.open_nursery() as nursery:
        print("services ready", flush=True)
        nursery.start_soon(publish, pub, opts.interval)
        nursery.start_soon(publish, pub_rnd, opts.interval)


if __name__ == "__main__":
    try:
        trio.run(main)
    except* KeyboardInterrupt:   # Ctrl-C, bare or inside the nurseries' exception groups
        pass
