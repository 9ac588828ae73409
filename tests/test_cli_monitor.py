"""`python -m engine monitor` is the mesh Monitor, reachable from the engine's CLI."""
import json
import sys

import pytest
import trio

from support import free_udp_port
from transport import DiscoveryConfig, Responder


@pytest.mark.e2e
async def test_engine_monitor_lists_a_live_responder():
    port = free_udp_port()
    cfg = DiscoveryConfig(port=port, interface="127.0.0.1", hello_interval=0.3, expiry=2.0)
    rep = Responder("seen-by-monitor", namespace="ops", responds_to=["ping"], discovery=cfg)

    @rep.on("ping")
    async def ping(req):
        return "pong"

    with trio.fail_after(20):
        async with rep:
            done = await trio.run_process(
                [sys.executable, "-m", "engine", "monitor", "--json", "--wait", "1.5",
                 "--port", str(port), "--interface", "127.0.0.1"],
                capture_stdout=True, capture_stderr=True)
    rows = json.loads(done.stdout)
    names = {(row["name"], row["namespace"]) for row in rows}
    assert ("seen-by-monitor", "ops") in names, done.stdout
