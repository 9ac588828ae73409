"""bench/soak.py's app: one handler per kind of job, each answer checkable by the caller."""
import hashlib
import time

from engine import on


@on("echo")
def echo(data):
    return data


@on("count")
def count(n):
    """A streamed reply: 0, 1, ... n-1."""
    for i in range(int(n)):
        yield i


@on("digest")
async def digest(_, chunks):
    """A chunked request (an upload): the SHA-256 of its chunks, joined."""
    h = hashlib.sha256()
    async for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@on("slow")
def slow(seconds):
    """Holds its slave a moment, so that a kill finds jobs in flight."""
    time.sleep(float(seconds))
    return seconds


@on("tick")
def tick(payload):
    """The recurring timer's event."""
    return payload.get("tick") if isinstance(payload, dict) else None
