"""Shared fixtures, and the rule that keeps the e2e label true.

**The e2e rule.**  A test that starts a process or gives a socket an address is an
end-to-end test and carries ``@pytest.mark.e2e`` (``pytestmark = pytest.mark.e2e`` when
the whole module is).  The marker labels, it never skips: ``make test`` runs everything,
``pytest -m "not e2e"`` is the quick in-process run.  So that the label cannot drift, a
test *without* the marker fails when it

- starts a process: ``subprocess.Popen`` (so also ``subprocess.run``,
  ``trio.run_process``, ``trio.lowlevel.open_process``), ``os.fork``, ``os.forkpty``,
  ``os.posix_spawn``/``posix_spawnp``;
- gives a socket an address: ``bind``, ``connect``/``connect_ex``, ``sendto``/``sendmsg``
  on any stdlib socket (so also trio's sockets, ``serve_tcp``, ``open_tcp_stream``), or an
  nng ``listen``/``dial`` to anything but ``inproc://``.

Still fine in a unit test: ``socket.socketpair()`` (in-process, no address), nng's
``inproc://``, memory channels, threads, files.  The forbidden call raises
:class:`support.E2EOnly` at once, and the test fails again at teardown in case the code under
test caught that error.  The guard patches a handful of Python-level entry points for
the duration of an unmarked test, so it costs nothing measurable.

**An e2e test ends every process it starts.**  A process descended from this pytest
process that was not there before the test and still runs a few seconds after it is
killed, and the test errors.  (Only descendants are seen: ``start_node`` checks a
node's own children itself.)
"""
from __future__ import annotations

import pytest
import trio.testing

from support import (NodeProcess, descendant_pids, end_leftover_processes, free_udp_port,
                     processes_and_sockets_forbidden, start_node_process, stop_node)
from transport.mesh.discovery import DiscoveryConfig


@pytest.fixture(autouse=True)
def _e2e_rule(request):
    """Enforce the e2e rule above on every test."""
    nodeid = request.node.nodeid
    if request.node.get_closest_marker("e2e") is not None:
        before = descendant_pids()
        yield
        if left := end_leftover_processes(before):
            pytest.fail(f"{nodeid} left processes running (now killed): {left}")
        return
    with processes_and_sockets_forbidden(nodeid) as violations:
        yield
    if violations:
        pytest.fail(f"{nodeid} is not marked e2e but {violations[0]} "
                    f"({len(violations)} such call(s)): mark it @pytest.mark.e2e")


@pytest.fixture
def autojump_clock():
    """trio's MockClock, jumping ahead whenever every task is blocked: timer logic runs
    in virtual time (pytest-trio uses any fixture that returns a Clock)."""
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def start_node(tmp_path):
    """``node = await start_node(*paths)``: a real node on loopback, stopped after the test."""
    started: list[NodeProcess] = []

    async def start(*paths, extra: tuple[str, ...] = ()) -> NodeProcess:
        node = await start_node_process(paths, tmp_path / f"node{len(started)}.log", tmp_path, *extra)
        started.append(node)
        return node

    yield start
    left = [p for node in started for p in stop_node(node)]
    assert not left, f"processes left behind after the node stopped: {left}"


@pytest.fixture
def disco():
    """Mesh discovery confined to loopback on a port of this test's own, so tests
    running side by side never see each other's components."""
    return DiscoveryConfig(port=free_udp_port(), interface="127.0.0.1",
                           hello_interval=0.5, expiry=2.0)
