"""Apps calling apps on one node (engine.call/stream/acall/astream): a two-stage
pipeline through real slaves, with errors and early exits crossing both stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from engine.client import connect
from engine.errors import AppNotFound
from transport.errors import HandlerError, TimeoutError_

pytestmark = pytest.mark.e2e

SOURCE = '''
import time
from engine import on

@on("chunks")
def chunks(spec):
    for i in range(spec["n"]):
        yield bytes([97 + i % 26]) * spec["size"]

@on("double")
def double(x):
    return 2 * x

@on("boom")
def boom(x):
    raise ValueError(f"source broke on {x}")

@on("slow")
def slow(seconds):
    time.sleep(seconds)
    return "late"
'''

RELAY = '''
from engine import on, call, stream, acall, astream

@on("double_plus_one")
def double_plus_one(x):
    return call("source", "double", x) + 1

@on("upper")
def upper(spec):
    for chunk in stream("source", "chunks", spec):
        yield chunk.upper()

@on("aupper")
async def aupper(spec):
    async for chunk in astream("source", "chunks", spec):
        yield chunk.upper()

@on("adouble")
async def adouble(x):
    return await acall("source", "double", x) + await acall("source", "double", x)

@on("first_two")
def first_two(spec):
    out = []
    for chunk in stream("source", "chunks", spec):   # left early: the rest is cancelled
        out.append(chunk)
        if len(out) == 2:
            break
    return [len(c) for c in out] + [call("source", "double", 21)]

@on("relay")
def relay(args):
    return call(args["app"], args["event"], args.get("payload"), timeout=args.get("timeout", 10))
'''


def write_app(root: Path, name: str, code: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(code)
    (folder / "manifest.json").write_text(json.dumps({
        "name": name, "args": "app.py",
        "engine": {"pool-limit": 2, "queue-limit": 50, "heartbeat-timeout": 20}}))


async def test_two_stage_pipeline_through_real_slaves(tmp_path, start_node):
    write_app(tmp_path / "apps", "source", SOURCE)
    write_app(tmp_path / "apps", "relay", RELAY)
    node = await start_node(tmp_path / "apps" / "source", tmp_path / "apps" / "relay")
    spec = {"n": 30, "size": 1000}
    expected = [bytes([65 + i % 26]) * 1000 for i in range(30)]
    async with connect(node.address, timeout=30) as client:
        with trio.fail_after(60):
            assert await client.call("relay", "double_plus_one", 20) == 41
            assert await client.call("relay", "adouble", 5) == 20
            assert [c async for c in client.stream("relay", "upper", spec)] == expected
            assert [c async for c in client.stream("relay", "aupper", spec)] == expected
            assert await client.call("relay", "first_two", {"n": 1000, "size": 10}) == [10, 10, 42]

            # The inner stage's errors reach the outer caller, typed.
            with pytest.raises(HandlerError) as err:
                await client.call("relay", "relay", {"app": "source", "event": "boom", "payload": 3})
            assert err.value.type == "ValueError" and "source broke on 3" in str(err.value)
            with pytest.raises(AppNotFound):
                await client.call("relay", "relay", {"app": "nowhere", "event": "x"})
            with pytest.raises(TimeoutError_):
                await client.call("relay", "relay", {"app": "source", "event": "slow",
                                                     "payload": 3, "timeout": 0.3})
            # Both apps are still healthy afterwards.
            assert await client.call("relay", "double_plus_one", 1) == 3
            info = await client.info("relay")
            assert info["pool"]["crashes"] == 0
