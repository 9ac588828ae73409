"""cote's Responder example: answers randomRequest with a random number."""
import random

import trio

from _common import args
from transport import Responder


async def main():
    opts = args(__doc__, 0)
    answered = trio.Event()
    count = 0
    responder = Responder(name="randomRep", namespace=opts.namespace, secret=opts.secret,
                          responds_to=["randomRequest"], discovery=opts.discovery)

    @responder.on("randomRequest")
    async def answer(req):
        nonlocal count
        value = random.randrange(10)
        print("request", req["val"], "answering with", value, flush=True)
        count += 1
        if opts.count and count >= opts.count:
            answered.set()
        return value

    async with responder:
        print("responder ready at", responder.address, flush=True)
        await answered.wait()
        await trio.sleep(0.2)  # let the last answer leave before saying bye


trio.run(main)
