"""The app every engine benchmark hosts: an echo, and a handler that holds its slave."""
import time

from engine import on


@on("echo")
def echo(data):
    return data


@on("sleep")
def sleep(seconds):
    """Keep this slave busy (bursts make the pool grow)."""
    time.sleep(float(seconds or 0.1))
    return seconds


@on("chunks")
def chunks(spec):
    """A streamed reply: ``n`` chunks of ``size`` bytes (the streaming benchmark)."""
    block = b"x" * int(spec["size"])
    for _ in range(int(spec["n"])):
        yield block


@on("sink")
async def sink(_, chunks):
    """A chunked request: count its bytes (the upload benchmark)."""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
    return received
