"""The conformance app in Python (tests/conformance/EVENTS.md)."""
import os
import signal
import sys

import trio

from engine import on


@on("echo")
def echo(data):
    return data


@on("count")
def count(data):
    for i in range(data["n"]):
        yield {"i": i}


@on("fail")
def fail(data):
    raise TypeError("nope")


@on("sum")
async def total(start, chunks):
    s = start
    async for c in chunks:
        s += c
    return s


@on("ticks")
async def ticks(data):
    i = 0
    while True:
        yield i
        i += 1
        await trio.sleep(0.01)


@on("nap")
async def nap(seconds):
    await trio.sleep(seconds)
    return "rested"


@on("hang")
def hang(data):
    os.kill(os.getpid(), signal.SIGSTOP)


@on("crash")
def crash(words):
    print(f"last words: {words}", file=sys.stderr, flush=True)
    os._exit(3)


@on("pid")
def pid(data):
    return os.getpid()
