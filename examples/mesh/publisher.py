"""cote's Publisher example: a randomUpdate every --interval seconds."""
import random

import trio

from _common import args
from transport import Publisher


async def main():
    opts = args(__doc__, 3.0)
    async with Publisher(name="randomPub", namespace=opts.namespace, secret=opts.secret,
                         broadcasts=["randomUpdate"], discovery=opts.discovery) as publisher:
        sent = 0
        while not opts.count or sent < opts.count:
            val = {"val": random.randrange(1000)}
            print("emitting", val, flush=True)
            publisher.publish("randomUpdate", val)
            sent += 1
            await trio.sleep(opts.interval)


trio.run(main)
