"""cote's Responder example: answers randomRequest with a random number.  On SIGTERM
(or ^C) it drains: says bye, answers what is in flight, then exits."""
import random
import signal

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
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal():
                    async for _ in signals:
                        answered.set()
                        return
                nursery.start_soon(stop_on_signal)
                await answered.wait()
                nursery.cancel_scope.cancel()
        await responder.drain()   # bye; requests in flight are answered; then closed


trio.run(main)
