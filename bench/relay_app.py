"""The second stage of the pipeline benchmark: relays the echo app's streamed chunks."""
from engine import astream, on


@on("relay")
async def relay(spec):
    async for chunk in astream("bench-echo", "chunks", spec):
        yield chunk
