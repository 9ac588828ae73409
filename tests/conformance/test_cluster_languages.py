"""A cluster shares an app of any language like a Python one (issue #14): deployed on
one node, its bundle (the conformance app's files) is installed and run by the other,
whose own slaves answer; an ``exec`` program stays executable where it lands."""
from __future__ import annotations

import json
import shutil
import uuid

import pytest
import trio

from engine.client import connect

from cluster_support import lan_member, sees_all
from support import free_udp_port, wait_until

from .test_conformance import APPS, PERL_LIB, why_not

pytestmark = pytest.mark.e2e

SECRET = "the language tests' cluster secret"


@pytest.mark.parametrize("language", ["nodejs", "perl"])
async def test_a_cluster_runs_an_app_of_another_language_on_every_node(
        tmp_path, language, monkeypatch):
    missing = why_not(language)
    if missing:
        pytest.skip(f"{language}: {missing}")
    monkeypatch.setenv("ENGINE_PERL_LIB", str(PERL_LIB))
    folder = tmp_path / "apps" / "shared"
    shutil.copytree(APPS / language, folder, symlinks=True)
    name, port = f"t-{uuid.uuid4().hex[:8]}", free_udp_port()

    def member(i: int):
        return lan_member(tmp_path / f"state{i}", name, port, SECRET)

    async def sees_both(client) -> bool:
        return await sees_all(client, 2)

    async def runs_it(client):
        return "shared" in (await client.list())["apps"] or None

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a, b = member(0), member(1)
            await nursery.start(a.run)
            await nursery.start(b.run)
            async with connect(a.control_address, timeout=20) as ca, \
                    connect(b.control_address, timeout=20) as cb:
                await wait_until(lambda: sees_both(ca), "A sees B", timeout=15, interval=0.05)
                await wait_until(lambda: sees_both(cb), "B sees A", timeout=15, interval=0.05)
                result = await ca.deploy(folder / "manifest.json", cluster_secret=SECRET)
                assert result["app"] == "shared", result
                await wait_until(lambda: runs_it(cb), "B installs and runs the bundle",
                                 timeout=20, interval=0.1)
                info_b = await cb.info("shared")
                assert json.loads((folder / "manifest.json").read_text())["type"] in (
                    "nodejs", "exec")
                assert info_b["manifest"] != str(folder / "manifest.json")   # B's own copy
                assert await cb.call("shared", "echo", {"from": "B"}) == {"from": "B"}
                assert await ca.call("shared", "echo", "A") == "A"
                pids = {s["pid"] for s in (await cb.info("shared"))["pool"]["slaves"]}
                assert await cb.call("shared", "pid") in pids       # B's own slave answered
            nursery.cancel_scope.cancel()
