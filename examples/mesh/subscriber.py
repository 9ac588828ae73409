"""cote's Subscriber example: prints every randomUpdate."""
import trio

from _common import args
from transport import Subscriber


async def main():
    opts = args(__doc__, 0)
    subscriber = Subscriber(name="randomSub", namespace=opts.namespace, secret=opts.secret,
                            subscribes_to=["randomUpdate"], discovery=opts.discovery)
    async with subscriber:
        print("subscriber ready", flush=True)
        seen = 0
        async for event in subscriber:
            print("notified of", event.data, flush=True)
            seen += 1
            if opts.count and seen >= opts.count:
                break


trio.run(main)
