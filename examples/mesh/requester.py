"""cote's Requester example: a randomRequest every --interval seconds."""
import random

import trio

from _common import args
from transport import Requester


async def main():
    opts = args(__doc__, 5.0)
    async with Requester(name="randomReq", namespace=opts.namespace, secret=opts.secret,
                         requests=["randomRequest"], discovery=opts.discovery) as requester:
        sent = 0
        while not opts.count or sent < opts.count:
            req = {"type": "randomRequest", "val": random.randrange(10)}
            res = await requester.send(req, timeout=10)
            print("request", req, "answer", res, flush=True)
            sent += 1
            await trio.sleep(opts.interval)


trio.run(main)
