"""Chunked requests: a request's payload followed by a stream of chunks, flow-controlled
from the client to the handler (transport/inbound.py), through an RpcServer and through
a node to a slave."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import trio

from engine.client import connect
from support import wait_until
from transport.errors import BadMessage, HandlerError, TimeoutError_
from transport.inbound import WINDOW, InputStream
from transport.rpc import RpcClient, RpcServer
from transport.sync_client import SyncRpcClient


@pytest.mark.e2e
async def test_an_rpc_handler_reads_the_chunks_at_its_own_pace(nursery):
    buffered: list[int] = []

    async def handler(req):
        if req.event == "sum":
            total = 0
            async for chunk in req.chunks:
                buffered.append(len(req.chunks._items))
                total += len(chunk)
                await trio.sleep(0.001 if req.payload == "slow" else 0)
            return total
        if req.event == "first":   # answers before reading everything
            async for chunk in req.chunks:
                return chunk
        raise ValueError("no such event")

    server = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(20):
        async with RpcClient(server.address, timeout=10) as client:
            assert await client.call("t", "sum", None, chunks=[b"x" * 1000] * 500) == 500_000

            async def produce():
                for i in range(300):
                    yield b"y" * 10
            assert await client.call("t", "sum", "slow", chunks=produce()) == 3000
            assert max(buffered) <= WINDOW   # the client never ran past the window

            assert await client.call("t", "first", None, chunks=(b"%d" % i for i in range(10**6))) == b"0"
            with pytest.raises(HandlerError, match="no such event"):
                await client.call("t", "nope", None, chunks=[b"a"])
            with pytest.raises(BadMessage):
                await client.call("t", "sum", None, chunks=[object()])
            assert await client.call("t", "sum", None, chunks=[]) == 0
    await wait_until(lambda: server.inflight == 0, "every handler has ended")


async def test_an_input_stream_refuses_a_sender_that_ignores_the_window():
    granted = []
    stream = InputStream(granted.append)
    for i in range(WINDOW):
        stream.feed(i)
    stream.feed("one too many")
    with pytest.raises(BadMessage):
        async for _ in stream:
            pass


APP = """
import hashlib
import trio
from engine import on

@on("digest")
async def digest(name, chunks):
    h = hashlib.sha256()
    n = 0
    async for chunk in chunks:
        h.update(chunk)
        n += 1
    return {"name": name, "chunks": n, "sha256": h.hexdigest()}

@on("upper")
async def upper(_, chunks):
    async for chunk in chunks:
        yield chunk.upper()

@on("slow_sum")
async def slow_sum(_, chunks):
    total = 0
    async for chunk in chunks:
        await trio.sleep(0.002)
        total += len(chunk)
    return total

@on("plain")
def plain(payload, chunks):
    return "never"

@on("one_arg")
async def one_arg(payload):
    return "never"
"""


@pytest.mark.e2e
async def test_chunked_requests_through_a_node_to_a_slave(tmp_path, start_node):
    import hashlib

    folder = tmp_path / "apps" / "upload"
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(textwrap.dedent(APP))
    (folder / "manifest.json").write_text(json.dumps({
        "args": "app.py", "engine": {"pool-limit": 1},
        "drivers": {"rpc": {"type": "native-server", "emit": "digest",
                            "endpoint": "tcp://127.0.0.1:0"}}}))
    node = await start_node(folder)
    blocks = [bytes([i % 251]) * 4096 for i in range(400)]   # 1.6 MB in 400 chunks
    expected = hashlib.sha256(b"".join(blocks)).hexdigest()
    async with connect(node.address, timeout=30) as client:
        with trio.fail_after(60):
            reply = await client.call("upload", "digest", "f.bin", chunks=blocks)
            assert reply == {"name": "f.bin", "chunks": 400, "sha256": expected}
            assert await client.rpc.call("upload", "upper", None, chunks=[b"ab", b"cd"]) == [b"AB", b"CD"]
            assert await client.rpc.call("upload", "slow_sum", None, chunks=[b"z" * 10] * 200) == 2000
            with pytest.raises(BadMessage, match="async"):
                await client.rpc.call("upload", "plain", None, chunks=[b"a"])
            with pytest.raises(BadMessage, match="chunks"):
                await client.rpc.call("upload", "one_arg", None, chunks=[b"a"])
            with pytest.raises(TimeoutError_):   # a caller giving up frees the slave
                await client.rpc.call("upload", "slow_sum", None, chunks=[b"z"] * 10_000,
                                      timeout=0.3)
            assert await client.rpc.call("upload", "slow_sum", None, chunks=[b"q"]) == 1
            info = await client.info("upload")
            endpoint = info["drivers"]["rpc"]["endpoint"]
            assert info["pool"]["crashes"] == 0
        # The blocking client and the native-server driver speak it too.
        def sync_upload():
            with SyncRpcClient(endpoint, timeout=30) as sync:
                return sync.call("", "", "s.bin", chunks=iter(blocks))
        reply = await trio.to_thread.run_sync(sync_upload)
        assert reply == {"name": "s.bin", "chunks": 400, "sha256": expected}
        # And the CLI: `engine call APP EVENT JSON --upload FILE`, in 64 KiB chunks.
        upload = tmp_path / "upload.bin"
        upload.write_bytes(b"".join(blocks))
        done = await trio.run_process(
            [sys.executable, "-m", "engine", "call", "upload", "digest", '"cli.bin"',
             "--upload", str(upload), "--node", node.address], capture_stdout=True,
            capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"name": "cli.bin", "chunks": 25, "sha256": expected}
