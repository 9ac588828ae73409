"""The two example manifests of Cocaine's READMEs (tests/seeds/, copied verbatim from the
seeds this project rewrites) start unchanged on a real node (#17, "The seed's manifests,
verbatim").

What the test changes is what cannot be the same on this machine: the filesystem
monitor's path (``/var/spool/my-app-data``) and the second's ``args``, a placeholder
(``local:///path/to/application/__init__.py``), both pointed into the test's folder.
Everything else is read from the README text as it is: ZeroMQ's interface-name endpoints
(``tcp://lo:9100``, ``tcp://lo:9200``), the older ``tasks`` and top-level ``pubsub``, the
first one's ``resource-limits`` and its trailing comma.

The node runs in a network namespace of its own (tests/netns_support.py), so the fixed
ports 9100 and 9200 are free whatever runs on this machine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netns_support import lone_host, why_skip
from support import stop_node, NodeProcess

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

SEEDS = Path(__file__).resolve().parent / "seeds"
CODE = '''\
from engine import on


@on("event")
def event(data):
    return {"got": data}


@on("aggregate")
@on("aggregte")
def aggregate(data):
    return None


@on("spool")
@on("on_spool_changed")
def spool(data):
    return None
'''
CALL_NATIVE = '''\
import sys, trio
from transport.rpc import RpcClient

async def main():
    async with RpcClient("tcp://127.0.0.1:9100", timeout=10) as rpc:
        print(await rpc.call("any", "event", "hello"))

trio.run(main)
'''


def seed_manifest(readme: str) -> str:
    """The manifest example of a README: the fenced block after "example"."""
    text = (SEEDS / readme).read_text()
    return re.search(r"example\s*=+\s*```python\n(.*?)```", text, re.S | re.I).group(1)


def in_ns(ns: str, *argv: str, env: dict[str, str], timeout: float = 30
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_both_seed_manifests_start_unchanged(tmp_path):
    reason = why_skip()
    if reason:
        pytest.skip(reason)
    apps = {}
    for name, readme in (("core", "cocaine-core-README.txt"), ("classic", "cocaine-README.txt")):
        folder = tmp_path / name
        folder.mkdir()
        (tmp_path / f"spool-{name}").mkdir()
        text = seed_manifest(readme)
        assert "/var/spool/my-app-data" in text
        text = text.replace("/var/spool/my-app-data", str(tmp_path / f"spool-{name}"))
        if "local:///path/to/application/__init__.py" in text:
            (folder / "application").mkdir()
            (folder / "application" / "__init__.py").write_text(CODE)
            text = text.replace("/path/to/application/__init__.py",
                                str(folder / "application" / "__init__.py"))
        else:
            (folder / "app.py").write_text(CODE)
        (folder / "manifest.json").write_text(text)
        apps[name] = folder
    assert "tcp://lo:9100" in (apps["classic"] / "manifest.json").read_text()
    assert '"1",\n' in (apps["core"] / "manifest.json").read_text()     # the trailing comma

    # The node's token goes under the test's folder, not this user's (port 9300 here is
    # the namespace's, not the host's).
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    with lone_host() as ns:
        log = tmp_path / "node.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "engine",
                                     "run", str(apps["core"]), str(apps["classic"]),
                                     "--control", "tcp://127.0.0.1:9300"],
                                    stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=env)
        node = NodeProcess(proc, log)
        try:
            deadline = time.monotonic() + 40
            while "serving" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            text = log.read_text()
            assert "serving 2 app(s): core, classic" in text, text[-3000:]
            assert "not hosting" not in text, text[-3000:]

            listed = in_ns(ns, sys.executable, "-m", "engine", "list", "--json",
                           "--node", "tcp://127.0.0.1:9300", env=env)
            assert listed.returncode == 0, listed.stderr
            states = {n: a["state"] for n, a in json.loads(listed.stdout)["apps"].items()}
            assert states == {"classic": "running", "core": "running"}, states

            # tcp://lo:9100 is bound on lo's address: a native-server request answers.
            called = in_ns(ns, sys.executable, "-c", textwrap.dedent(CALL_NATIVE), env=env)
            assert called.returncode == 0, called.stderr[-2000:]
            assert called.stdout.strip() == "{'got': 'hello'}", called.stdout
            info = in_ns(ns, sys.executable, "-m", "engine", "info", "classic", "--json",
                         "--node", "tcp://127.0.0.1:9300", env=env)
            assert info.returncode == 0, info.stderr
            assert "tcp://127.0.0.1:9200" in info.stdout, info.stdout
        finally:
            left = stop_node(node)
            assert not left, left
