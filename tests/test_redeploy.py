"""Zero-downtime redeploys (#17): ``deploy`` of a running app's name, or ``engine
reload APP``, starts the new version beside the old one, switches new requests to it
once its first slave runs, and drains the old one: four clients calling throughout
get every answer, and each sees v1 then v2, never back.  A new version that cannot
start leaves the old one serving.  Real node, real slaves, real clients."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import trio

from engine.client import connect
from engine.errors import RedeployFailed

from support import free_tcp_port, start_node_process, stop_node, wait_until, write_app

pytestmark = pytest.mark.e2e

APP = textwrap.dedent('''\
    import os
    import time
    import trio
    from engine import on

    VERSION = {version!r}


    @on("version")
    def version(data):
        time.sleep(0.002)
        return VERSION


    @on("slow")
    async def slow(seconds):
        await trio.sleep(seconds)
        return VERSION


    @on("pid")
    def pid(data):
        return os.getpid()
    ''')


def app_folder(where: Path, version: str, *, broken: bool = False) -> Path:
    code = APP.format(version=version)
    if broken:
        code += "\nimport a_module_that_is_not_there\n"
    return write_app(where, code, {"pool-limit": 2, "termination-timeout": 5})


def slave_pids(info: dict) -> set[int]:
    return {s["pid"] for s in info["pool"]["slaves"] if s["pid"]}


async def test_four_clients_lose_nothing_and_switch_once_through_a_redeploy(tmp_path):
    v1 = app_folder(tmp_path / "v1", "v1")
    v2 = app_folder(tmp_path / "v2", "v2")
    node = await start_node_process([v1], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            seen: list[list[str]] = [[] for _ in range(4)]
            deployed = trio.Event()
            after: list[int] = [0] * 4

            async def caller(i: int) -> None:
                # calls until well after the redeploy returned
                while after[i] < 50:
                    seen[i].append(await client.call("worker", "version"))
                    if deployed.is_set():
                        after[i] += 1

            with trio.fail_after(90):
                assert await client.call("worker", "version") == "v1"
                old_pids = slave_pids(await client.info("worker"))
                async with trio.open_nursery() as nursery:
                    for i in range(4):
                        nursery.start_soon(caller, i)
                    await wait_until(lambda: all(len(s) >= 20 for s in seen), "clients run")
                    in_flight = []

                    async def slow_call() -> None:
                        in_flight.append(await client.call("worker", "slow", 1.5))
                    nursery.start_soon(slow_call)
                    await wait_until(lambda: any(len(s) >= 40 for s in seen), "more calls")
                    reply = await client.deploy(v2 / "manifest.json")
                    assert reply["redeployed"] is True and reply["state"] == "running"
                    deployed.set()
            assert in_flight == ["v1"]        # the job the old version held was finished
            for answers in seen:
                assert set(answers) <= {"v1", "v2"}
                switch = answers.index("v2")   # one point in time per client
                assert answers[:switch] == ["v1"] * switch and switch >= 20
                assert answers[switch:] == ["v2"] * (len(answers) - switch)
            info = await client.info("worker")
            assert info["redeploys"] == 1 and info["pool"]["failed"] == 0
            assert info["manifest"] == str(v2 / "manifest.json")
            assert not slave_pids(info) & old_pids
            assert not [p for p in old_pids if psutil.pid_exists(p)
                        and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    finally:
        assert not stop_node(node)


async def test_a_new_version_that_cannot_start_leaves_the_old_one_serving(tmp_path):
    v1 = app_folder(tmp_path / "v1", "v1")
    bad = app_folder(tmp_path / "bad", "v2", broken=True)
    node = await start_node_process([v1], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            answers: list[str] = []
            done = trio.Event()

            async def caller() -> None:
                while not done.is_set():
                    answers.append(await client.call("worker", "version"))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(caller)
                    with pytest.raises(RedeployFailed) as err:
                        await client.deploy(bad / "manifest.json")
                    done.set()
            assert "a_module_that_is_not_there" in str(err.value)
            assert "keeps serving" in str(err.value)
            assert answers and set(answers) == {"v1"}     # served throughout, nothing failed
            assert await client.call("worker", "version") == "v1"
            info = await client.info("worker")
            assert info["redeploys"] == 0 and info["manifest"] == str(v1 / "manifest.json")
    finally:
        assert not stop_node(node)


async def test_reload_picks_up_code_edited_in_place_from_the_command_line(tmp_path):
    v1 = app_folder(tmp_path / "app", "v1")
    node = await start_node_process([v1], tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(60):
                assert await client.call("worker", "version") == "v1"
                app_folder(tmp_path / "app", "v2")           # the code changes on disk
                assert await client.call("worker", "version") == "v1"   # not yet
                cli = await trio.run_process(
                    [sys.executable, "-m", "engine", "reload", "worker", "--node", node.address],
                    capture_stdout=True, capture_stderr=True, check=False)
                assert cli.returncode == 0, cli.stderr.decode()
                assert json.loads(cli.stdout)["redeployed"] is True
                assert await client.call("worker", "version") == "v2"
    finally:
        assert not stop_node(node)


def with_server(folder: Path, port: int) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["drivers"] = {"api": {"type": "native-server", "emit": "version",
                                   "endpoint": f"tcp://127.0.0.1:{port}"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


async def test_unchanged_drivers_keep_serving_and_a_driver_that_cannot_start_is_rolled_back(
        tmp_path):
    """The native-server's clients stay connected through a redeploy that keeps the
    driver (their calls switch to v2); a version whose new driver cannot bind is
    refused, and the old driver serves again."""
    import socket

    from transport.rpc import RpcClient

    port = free_tcp_port()
    v1 = with_server(app_folder(tmp_path / "v1", "v1"), port)
    v2 = with_server(app_folder(tmp_path / "v2", "v2"), port)
    node = await start_node_process([v1], tmp_path / "node.log", tmp_path)
    taken = socket.socket()
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(60):
                async with RpcClient(f"tcp://127.0.0.1:{port}", timeout=20) as direct:
                    assert await direct.call("worker", "version") == "v1"
                    await client.deploy(v2 / "manifest.json")
                    assert await direct.call("worker", "version") == "v2"  # same connection

                taken.bind(("127.0.0.1", 0))
                taken.listen()
                v3 = with_server(app_folder(tmp_path / "v3", "v3"), taken.getsockname()[1])
                with pytest.raises(RedeployFailed) as err:
                    await client.deploy(v3 / "manifest.json")
                assert "api" in str(err.value) and "keeps serving" in str(err.value)
                async with RpcClient(f"tcp://127.0.0.1:{port}", timeout=20) as direct:
                    assert await direct.call("worker", "version") == "v2"
                info = await client.info("worker")
                assert info["redeploys"] == 1 and info["manifest"] == str(v2 / "manifest.json")
    finally:
        taken.close()
        assert not stop_node(node)
