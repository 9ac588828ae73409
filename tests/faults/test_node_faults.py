"""Faults through a real node (issue 12): slaves SIGKILLed under several clients,
SIGTERM to the node under load, clients that vanish mid-stream and mid-upload.  Each
test asserts that every accepted request got exactly one answer (a value or a typed
error; never a timeout, never a dropped app) and, through the ``start_node`` fixture,
that the node leaves no process behind."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from engine.client import connect
from engine.errors import ShuttingDown, SlaveDied
from support import slave_pids, wait_until
from transport.errors import QueueFull, RemoteError

pytestmark = pytest.mark.e2e

APP = '''
import os, time
import trio
from engine import on

@on("work")
async def work(data):
    await trio.sleep(data["sleep"])
    return [os.getpid(), len(data.get("blob", b""))]

@on("pid")
def pid(_):
    return os.getpid()

@on("endless")
async def endless(_):
    i = 0
    while True:
        await trio.sleep(0.01)
        yield i
        i += 1

@on("upload")
async def upload(_, chunks):
    total = 0
    async for chunk in chunks:
        total += len(chunk)
    return total
'''


def write_app(root: Path, **engine: Any) -> Path:
    folder = root / "apps" / "faulty"
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(APP)
    engine.setdefault("termination-timeout", 5)
    (folder / "manifest.json").write_text(json.dumps({"type": "python", "engine": engine}))
    return folder.parent


class Tally:
    """Each call's one outcome, by kind."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}

    def add(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    async def call(self, client: Any, *args: Any, **kw: Any) -> Any:
        try:
            value = await client.call(*args, **kw)
        except RemoteError as exc:
            self.add(type(exc).__name__)
            return exc
        self.add("value")
        return value


async def test_slaves_killed_again_and_again_under_four_clients_lose_nothing(tmp_path, start_node):
    node = await start_node(write_app(tmp_path, **{"pool-limit": 3, "queue-limit": 200}))
    tally = Tally()
    blob = b"b" * (1 << 20)   # more than the socket takes at once: the writer is often mid-frame
    kills = 0
    with trio.fail_after(50):
        stop = trio.Event()

        async def client() -> None:
            async with connect(node.address, timeout=20) as c:
                while not stop.is_set():
                    await tally.call(c, "faulty", "work", {"sleep": 0.002, "blob": blob})

        async def killer() -> None:
            nonlocal kills
            rng = random.Random(4)
            for _ in range(10):
                pids = await wait_until(lambda: sorted(slave_pids(node)), "slaves run", timeout=20)
                await trio.sleep(rng.uniform(0.1, 0.2))
                try:
                    psutil.Process(rng.choice(pids)).send_signal(signal.SIGKILL)
                    kills += 1
                except psutil.NoSuchProcess:
                    pass
            stop.set()

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(client)
            n.start_soon(killer)

        async with connect(node.address, timeout=20) as c:
            assert "faulty" in (await c.list())["apps"]          # still deployed
            assert (await c.call("faulty", "work", {"sleep": 0}))[1] == 0  # and serving
            info = await c.info("faulty")
    assert kills >= 8
    assert set(tally.outcomes) <= {"value", "SlaveDied", "QueueFull"}, tally.outcomes
    assert tally.outcomes.get("value", 0) > 50, tally.outcomes
    assert info["state"] == "running" and info["pool"]["crashes"] >= 1


async def test_sigterm_under_load_answers_every_accepted_request_then_exits_clean(tmp_path, start_node):
    node = await start_node(write_app(tmp_path, **{"pool-limit": 3, "queue-limit": 50}))
    tally = Tally()
    with trio.fail_after(40):
        async with connect(node.address, timeout=30) as c:
            async with trio.open_nursery() as n:
                for _ in range(9):
                    n.start_soon(tally.call, c, "faulty", "work", {"sleep": 0.4})

                async def accepted() -> bool:
                    async with connect(node.address, timeout=10) as probe:
                        pool = (await probe.info("faulty"))["pool"]
                    return pool["queue"] + pool["running"] == 9

                await wait_until(accepted, "the node holds all nine jobs", timeout=20)
                node.proc.send_signal(signal.SIGTERM)
        assert tally.outcomes == {"value": 9}, tally.outcomes   # drained, not dropped
        assert await node.wait_exit(20) == 0
    assert not node.descendants()


CLIENT = '''
import sys, trio
from engine.client import connect

async def main(address, how):
    async with connect(address, timeout=60) as c:
        if how == "stream":
            async with c.stream("faulty", "endless") as chunks:
                async for i in chunks:
                    if i == 3:
                        print("streaming", flush=True)
        else:
            async def chunks():
                for i in range(3):
                    yield b"x" * 1000
                print("uploading", flush=True)
                await trio.sleep_forever()
            await c.rpc.call("faulty", "upload", None, chunks=chunks())

trio.run(main, sys.argv[1], sys.argv[2])
'''


@pytest.mark.parametrize("how", ["stream", "upload"])
async def test_a_client_that_vanishes_mid_call_frees_its_slot(tmp_path, start_node, how):
    """The client is SIGKILLed while its slave streams to it / reads its upload: the
    node cancels the job, the slave acknowledges (it is not killed), the one slot is
    free again and the app serves on."""
    node = await start_node(write_app(tmp_path, **{"pool-limit": 1, "concurrency": 1}))
    with trio.fail_after(40):
        async with connect(node.address, timeout=20) as c:
            pid = await c.call("faulty", "pid")
            client = subprocess.Popen([sys.executable, "-c", CLIENT, node.address, how],
                                      stdout=subprocess.PIPE, text=True)
            try:
                line = await trio.to_thread.run_sync(client.stdout.readline, abandon_on_cancel=True)
                assert line.strip() in ("streaming", "uploading"), line
                await wait_until(lambda: _running(c), "the job runs on the slave")
                client.kill()
                client.wait()
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
                client.stdout.close()

            async def freed() -> bool:
                pool = (await c.info("faulty"))["pool"]
                return pool["running"] == 0 and pool["cancelled"] == 1

            await wait_until(freed, "the job is cancelled and its slot freed", timeout=15)
            assert await c.call("faulty", "pid") == pid          # the same slave serves on
            info = await c.info("faulty")
            assert info["pool"]["crashes"] == 0 and info["state"] == "running"


async def _running(c: Any) -> bool:
    return (await c.info("faulty"))["pool"]["running"] == 1
