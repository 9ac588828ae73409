"""A cote-style Requester placing an order every --interval seconds with the orders app."""
import argparse
import random

import trio

from transport import DiscoveryConfig, Requester


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=0, help="stop after this many (0: run forever)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between orders")
    opts = ap.parse_args()
    async with Requester("shopper", namespace="shop", requests=["order.place"],
                         discovery=DiscoveryConfig.from_env()) as requester:
        sent = 0
        while not opts.count or sent < opts.count:
            request = {"type": "order.place", "item": random.choice(["tea", "cake", "jam"]),
                       "qty": random.randint(1, 3)}
            print("placed", await requester.send(request, timeout=10), flush=True)
            sent += 1
            await trio.sleep(opts.interval)


trio.run(main)
