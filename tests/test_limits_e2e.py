"""Resource limits from the manifest reach the slaves, and a dead slave's last words
reach `python -m engine crashlog`, through a real node."""
from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = pytest.mark.e2e

APP = textwrap.dedent('''
    import os, resource, sys
    from engine import on

    @on("limits")
    def limits(_):
        return {
            "cpus": sorted(os.sched_getaffinity(0)),
            "as": resource.getrlimit(resource.RLIMIT_AS)[0],
            "cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }

    @on("hog")
    def hog(mb):
        block = bytearray(mb * 1024 * 1024)   # beyond RLIMIT_AS: MemoryError, caught below
        return len(block)

    @on("die")
    def die(_):
        print("last words before the crash", flush=True)
        os._exit(9)
''')


@pytest.fixture
def limited_app(tmp_path):
    app = tmp_path / "apps" / "limited"
    app.mkdir(parents=True)
    (app / "app.py").write_text(APP)
    (app / "manifest.json").write_text(json.dumps({
        "type": "python",
        "engine": {
            "pool-limit": 1,
            "resource-limits": {
                "cpuset": {"cpuset.cpus": "0"},
                "memory": "1G",
                "cpu-time": 3600,
                "open-files": 256,
            },
        },
    }))
    return app.parent


async def test_limits_apply_in_the_slave_and_crashlog_keeps_its_last_output(limited_app, start_node):
    node = await start_node(limited_app)

    done = await node.cli("call", "limited", "limits")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got == {"cpus": [0], "as": 1 << 30, "cpu": 3600, "nofile": 256}

    done = await node.cli("call", "limited", "hog", "2048")
    assert done.returncode != 0 and b"MemoryError" in done.stderr, done

    done = await node.cli("call", "limited", "die")
    assert done.returncode != 0 and b"SlaveDied" in done.stderr, done.stderr
    # the pool replaced it: the next call is served
    assert (await node.cli("call", "limited", "limits")).returncode == 0

    crashlog = await node.cli("crashlog", "limited")
    assert crashlog.returncode == 0
    assert b"last words before the crash" in crashlog.stdout, crashlog.stdout
