"""The echo example: `python -m engine call echo echo '{"hello": 1}'`,
`python -m engine call echo count '{"n": 3}'` (one JSON line per chunk)."""
import time

import trio  # the slave runtime runs async handlers on trio

from engine import on


@on("echo")
def echo(data):
    return data


@on("count")
async def count(data):
    n = int((data or {}).get("n", 3))
    delay = float((data or {}).get("delay", 0))
    for i in range(n):
        if delay:
            await trio.sleep(delay)
        yield {"i": i}


@on("sleep")
def sleep(data):
    """Hold a slave for a while (shows pool growth under a burst)."""
    time.sleep(float(data or 0.5))
    return {"slept": data}
