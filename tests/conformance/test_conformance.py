"""One suite, every language: the conformance app (EVENTS.md) in Python, Node.js and Perl
runs behind a real node, and each scenario below is the same for all of them (issue #14).
A language whose runtime is missing here is skipped with what to install (`.ci/run`
installs them all)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import trio

from engine import languages
from engine.client import connect
from engine.errors import SlaveDied, SlaveHung
from transport.errors import HandlerError, UnknownEvent

from support import start_node_process, stop_node, wait_until

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
PERL_LIB = Path(__file__).parents[2] / "workers" / "perl" / "lib"
LANGUAGES = ["python", "nodejs", "perl"]


def why_not(language: str) -> str | None:
    """Why this machine cannot run ``language``'s conformance app (None: it can)."""
    if language == "perl":
        if shutil.which("perl") is None:
            return "perl is not installed"
        probe = subprocess.run(["perl", "-MData::MessagePack", "-e", "1"], capture_output=True)
        if probe.returncode:
            return "Data::MessagePack is not installed (apt install libdata-messagepack-perl)"
        return None
    manifest = json.loads((APPS / language / "manifest.json").read_text())
    return languages.get(manifest["type"]).missing()


@pytest.fixture(params=LANGUAGES)
def language(request, monkeypatch) -> str:
    missing = why_not(request.param)
    if missing:
        pytest.skip(f"{request.param}: {missing}")
    if request.param == "perl":   # where the copied app finds EngineWorker.pm
        monkeypatch.setenv("ENGINE_PERL_LIB", str(PERL_LIB))
    return request.param


def app(tmp_path: Path, language: str, **engine) -> Path:
    """The language's conformance app as app ``conf``, with these engine options."""
    folder = tmp_path / "conf"
    shutil.copytree(APPS / language, folder, symlinks=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"] = {"termination-timeout": 5, **manifest.get("engine", {}), **engine}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


async def running(tmp_path: Path, language: str, **engine):
    return await start_node_process([app(tmp_path, language, **engine)], tmp_path / "node.log",
                                    tmp_path)


async def test_echo_streamed_reply_chunked_request_errors(tmp_path, language):
    node = await running(tmp_path, language)
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(30):
                value = {"list": [1, -2, "x", None, 2.5, True, False], "nested": {"k": "v"}}
                assert await client.call("conf", "echo", value) == value
                assert await client.call("conf", "echo", "hi") == "hi"
                chunks = [c async for c in client.stream("conf", "count", {"n": 5})]
                assert chunks == [{"i": i} for i in range(5)]
                assert await client.call("conf", "count", {"n": 200}) == [
                    {"i": i} for i in range(200)]            # past one stream window
                assert await client.call("conf", "sum", 10, chunks=[1, 2, 3]) == 16
                assert await client.call("conf", "sum", 0, chunks=range(300)) == sum(range(300))
                with pytest.raises(HandlerError) as err:
                    await client.call("conf", "fail", None)
                assert (err.value.type, err.value.message) == ("TypeError", "nope")
                with pytest.raises(UnknownEvent):
                    await client.call("conf", "no-such-event", None)
                assert await client.call("conf", "echo", "still here") == "still here"
                info = await client.info("conf")
                assert info["pool"]["crashes"] == 0
    finally:
        assert not stop_node(node)


async def test_a_hung_slave_is_killed_after_heartbeat_timeout_and_its_caller_told(
        tmp_path, language):
    node = await running(tmp_path, language, **{"heartbeat-timeout": 1.5, "pool-limit": 1})
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(40):
                first = await client.call("conf", "pid")
                t0 = trio.current_time()
                with pytest.raises(SlaveHung):
                    await client.call("conf", "hang")
                assert trio.current_time() - t0 < 10
                assert await client.call("conf", "pid") != first   # replaced
    finally:
        assert not stop_node(node)


async def test_a_crashed_slave_is_replaced_and_the_crashlog_has_its_last_lines(
        tmp_path, language):
    node = await running(tmp_path, language, **{"pool-limit": 1})
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(40):
                first = await client.call("conf", "pid")
                with pytest.raises(SlaveDied) as err:
                    await client.call("conf", "crash", "goodbye")
                assert "status 3" in str(err.value)
                assert await client.call("conf", "pid") != first
                crashlog = await client.crashlog("conf")
                assert any("last words: goodbye" in line for line in crashlog), crashlog
    finally:
        assert not stop_node(node)


async def test_cancelling_mid_stream_stops_the_handler_and_keeps_the_slave(tmp_path, language):
    node = await running(tmp_path, language, **{"pool-limit": 1})
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(30):
                first = await client.call("conf", "pid")
                seen = []
                async with client.stream("conf", "ticks", None) as ticks:
                    async for i in ticks:
                        seen.append(i)
                        if len(seen) == 5:
                            break
                assert seen == [0, 1, 2, 3, 4]
                pool = await wait_until(
                    lambda: _pool_when(client, lambda p: p["running"] == 0 and p["cancelled"] == 1),
                    "the slave acknowledges the CANCEL")
                assert pool["crashes"] == 0
                assert await client.call("conf", "pid") == first   # the same slave serves on
    finally:
        assert not stop_node(node)


async def _pool_when(client, ok):
    pool = (await client.info("conf"))["pool"]
    return pool if ok(pool) else None


async def test_sigterm_drains_a_running_job_and_leaves_no_process(tmp_path, language):
    node = await running(tmp_path, language, **{"pool-limit": 2})
    slaves: set[int] = set()
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(40):
                slaves.add(await client.call("conf", "pid"))
                answers = []

                async def napper():
                    answers.append(await client.call("conf", "nap", 1.0))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(napper)
                    await wait_until(lambda: _pool_when(client, lambda p: p["running"] == 1),
                                     "the nap runs")
                    slaves |= {s["pid"] for s in (await client.info("conf"))["pool"]["slaves"]}
                    node.proc.send_signal(signal.SIGTERM)
                assert answers == ["rested"]              # drained, not failed
        await trio.to_thread.run_sync(node.proc.wait, 20)
        assert node.proc.returncode == 0
    finally:
        assert not stop_node(node)
    alive = [p for p in slaves if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"slaves outlived their node: {alive}"
