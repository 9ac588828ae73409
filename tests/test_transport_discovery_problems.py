"""Discovery does not fail silently (transport/mesh/discovery.py, beacon_health.py).

A host whose routes do not cover multicast makes the group join fail (ENODEV) and the
broadcast fallback's sends fail (ENETUNREACH).  Neither can be produced on loopback
deterministically (a join on an address the host lacks fails, but so does binding the
sender to it), so a fake socket layer stands in for the kernel here: real descriptors
(a socketpair, which a unit test may use) for trio to wait on, and scripted errors.
Timer logic runs on trio's MockClock.
"""
from __future__ import annotations

import errno
import logging
import socket

import pytest
import trio

from transport.mesh import discovery as discovery_module
from transport.mesh.beacon_health import BeaconHealth
from transport.mesh.discovery import Discovery, DiscoveryConfig, interface_for_endpoint
from transport.mesh.peers import Beacon

LOGGER = "transport.mesh.discovery"
PORT = 47999


class Kernel:
    """What the fake sockets do: the errno of a failing join / send (None: works)."""

    def __init__(self) -> None:
        self.join_error: int | None = None
        self.send_error: int | None = None
        self.sent: list[tuple[str, int]] = []
        self.sockets: list[FakeSocket] = []

    def socket(self) -> "FakeSocket":
        sock = FakeSocket(self)
        self.sockets.append(sock)
        return sock


class FakeSocket:
    """The part of a UDP socket discovery uses; never readable."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._pair = socket.socketpair()  # a real descriptor for trio.lowlevel.wait_readable

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def setsockopt(self, level: int, option: int, value: object) -> None:
        if option == socket.IP_ADD_MEMBERSHIP and self.kernel.join_error is not None:
            raise OSError(self.kernel.join_error, "scripted")

    def bind(self, address: object) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        pass

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        if self.kernel.send_error is not None:
            raise OSError(self.kernel.send_error, "scripted")
        self.kernel.sent.append(address)
        return len(data)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        raise BlockingIOError

    def close(self) -> None:
        for s in self._pair:
            s.close()


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(discovery_module, "_udp_socket", k.socket)
    yield k
    for sock in k.sockets:
        sock.close()


def me() -> Beacon:
    return Beacon(id="me-1", name="me", role="responder", endpoint="tcp://10.0.0.4:5000")


def warnings_of(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def test_a_failed_multicast_join_is_a_warning_and_a_problem(kernel, caplog,
                                                                   autojump_clock):
    caplog.set_level(logging.INFO, logger=LOGGER)
    kernel.join_error = errno.ENODEV
    disco = Discovery(me(), DiscoveryConfig(port=PORT, interface="10.0.0.4"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await trio.sleep(1.5)
            nursery.cancel_scope.cancel()

    [warning] = warnings_of(caplog)
    assert "10.0.0.4" in warning and f"239.255.74.74:{PORT}" in warning and "ENODEV" in warning
    assert disco.multicast_ok is False
    assert disco.stats["multicast_errors"] == 1
    assert disco.problems() == [
        "multicast join on 10.0.0.4 failed: ENODEV (no interface has the address 10.0.0.4); "
        f"using broadcast 255.255.255.255:{PORT}"]
    assert ("255.255.255.255", PORT) in kernel.sent  # the fallback is used


async def test_the_default_interface_names_the_group_without_a_route(kernel, autojump_clock):
    kernel.join_error = errno.ENODEV
    disco = Discovery(me(), DiscoveryConfig(port=PORT))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            nursery.cancel_scope.cancel()
    [problem] = disco.problems()
    assert problem.startswith("multicast join on the default interface (0.0.0.0) failed: "
                              "ENODEV (no route for 239.255.74.74)")


async def test_failing_beacons_warn_once_then_note_recovery(kernel, caplog, autojump_clock):
    caplog.set_level(logging.INFO, logger=LOGGER)
    kernel.join_error = errno.ENODEV  # so beacons go to the broadcast address only
    kernel.send_error = errno.ENETUNREACH
    cfg = DiscoveryConfig(port=PORT, interface="10.0.0.4", hello_interval=1.0, expiry=4.0)
    disco = Discovery(me(), cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await trio.sleep(12.3)  # the 3 asking hellos, then one a second
            failed = disco.stats["send_errors"]
            assert failed >= 12
            beacon_warnings = [w for w in warnings_of(caplog) if "beacons to" in w]
            assert len(beacon_warnings) == 1, beacon_warnings  # once, not per beacon
            assert "255.255.255.255" in beacon_warnings[0]
            assert "ENETUNREACH" in beacon_warnings[0]
            problems = disco.problems()
            assert problems[0].startswith("multicast join on 10.0.0.4 failed: ENODEV")
            assert problems[1] == (f"beacons to 255.255.255.255:{PORT} not sent: ENETUNREACH "
                                   f"since 12 s ({failed} failed)")

            kernel.send_error = None  # the route comes back
            await trio.sleep(1.0)
            assert disco.problems() == problems[:1]
            [note] = [m for m in warnings_of(caplog, logging.INFO) if "sent again" in m]
            assert "255.255.255.255" in note and "ENETUNREACH" in note
            assert disco.stats["send_errors"] == failed

            kernel.send_error = errno.EHOSTUNREACH  # failing again, differently: warned again
            await trio.sleep(1.0)
            assert len([w for w in warnings_of(caplog) if "beacons to" in w]) == 2
            nursery.cancel_scope.cancel()


async def test_a_healthy_discovery_has_no_problems(kernel, caplog, autojump_clock):
    caplog.set_level(logging.INFO, logger=LOGGER)
    disco = Discovery(me(), DiscoveryConfig(port=PORT, interface="127.0.0.1"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(disco.run)
            await trio.sleep(3)
            assert disco.multicast_ok
            assert disco.problems() == []
            nursery.cancel_scope.cancel()
    assert warnings_of(caplog) == []
    assert disco.stats["multicast_errors"] == disco.stats["send_errors"] == 0


def test_a_departed_destination_is_no_longer_a_problem():
    health = BeaconHealth()
    assert health.failed(("10.0.0.9", PORT), errno.EHOSTUNREACH, now=1.0)
    assert not health.failed(("10.0.0.9", PORT), errno.EHOSTUNREACH, now=2.0)
    assert health.problems(now=5.0) == [
        f"beacons to 10.0.0.9:{PORT} not sent: EHOSTUNREACH since 4 s (2 failed)"]
    health.keep({("255.255.255.255", PORT)})
    assert health.problems(now=6.0) == []


@pytest.mark.parametrize("endpoint, interface", [
    ("tcp://10.0.0.4:5000", "10.0.0.4"),
    ("tls+tcp://10.0.0.4:5000", "10.0.0.4"),
    ("nng+tcp://192.168.1.7:0", "192.168.1.7"),
    ("tcp://127.0.0.1:9300", "127.0.0.1"),
    ("tcp://0.0.0.0:5000", None),
    ("tcp://:5000", None),
    ("tcp://*:5000", None),
    ("", None),
    ("tcp://node-a.lan:5000", None),
    ("tcp://localhost:5000", None),
    ("tcp://[::1]:5000", None),
    ("tcp://239.255.74.74:5000", None),
    ("tcp://255.255.255.255:5000", None),
    ("tcp://10.0.0.4", None),
    ("ipc:///tmp/engine.sock", None),
    ("unix:///tmp/engine.sock", None),
    ("10.0.0.4:5000", None),
])
def test_interface_for_endpoint(endpoint, interface):
    assert interface_for_endpoint(endpoint) == interface
