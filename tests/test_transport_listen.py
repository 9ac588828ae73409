"""``tcp://:PORT`` listens on every interface (docs/drivers.md: "an empty host means
every interface"), and what a server reports as its address stays dialable.

Only loopback is dialled; that the listener covers every interface is read off the
socket itself (its local address is 0.0.0.0).
"""
from __future__ import annotations

import psutil
import pynng
import pytest
import trio

from transport._links import _split_host_port, listen_host_port
from transport.rpc import RpcClient, RpcServer
from transport.sockets import bound_address


def test_an_empty_listen_host_is_every_interface_and_an_empty_dial_host_this_one():
    assert listen_host_port("tcp://:0") == ("0.0.0.0", 0)
    assert listen_host_port("tcp://*:9300") == ("0.0.0.0", 9300)
    assert listen_host_port("tcp://127.0.0.1:9300") == ("127.0.0.1", 9300)
    assert listen_host_port("tls+tcp://:9300", "tls+tcp://") == ("0.0.0.0", 9300)
    assert _split_host_port("tcp://:9300", "tcp://") == ("127.0.0.1", 9300)


def listening_ip(port: int) -> set[str]:
    """The local addresses this process listens on at ``port`` (TCP)."""
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


async def echo(req):
    return req.payload


@pytest.mark.e2e
async def test_an_rpc_server_on_an_empty_host_listens_everywhere_and_reports_loopback(nursery):
    srv = RpcServer("tcp://:0", echo)
    with trio.fail_after(10):
        address = await nursery.start(srv.run)
        port = port_of(address)
        assert address == srv.address == f"tcp://127.0.0.1:{port}"  # dialable as reported
        assert srv.listen_address == f"tcp://0.0.0.0:{port}"
        assert listening_ip(port) == {"0.0.0.0"}
        async with RpcClient(address) as client:
            assert await client.call("app", "echo", "over loopback") == "over loopback"
        async with RpcClient(f"tcp://:{port}") as client:  # an empty dial host: this host
            assert await client.call("app", "echo", 2) == 2


@pytest.mark.e2e
async def test_a_loopback_or_wildcard_host_is_reported_as_given(nursery):
    """127.0.0.1 stays loopback only; an explicit 0.0.0.0 is reported as it is, for the
    mesh rewrites that one to the address a beacon came from (docs/mesh.md)."""
    loop, wild = RpcServer("tcp://127.0.0.1:0", echo), RpcServer("tcp://0.0.0.0:0", echo)
    with trio.fail_after(10):
        loop_address = await nursery.start(loop.run)
        wild_address = await nursery.start(wild.run)
    assert listening_ip(port_of(loop_address)) == {"127.0.0.1"}
    assert loop.listen_address == loop_address
    assert wild_address.startswith("tcp://0.0.0.0:") and wild.listen_address == wild_address
    assert listening_ip(port_of(wild_address)) == {"0.0.0.0"}


@pytest.mark.e2e
async def test_an_nng_listener_on_an_empty_host_reports_a_dialable_address(nursery):
    with pynng.Pair0(listen="tcp://:0") as server:
        address = bound_address(server)
        port = port_of(address)
        assert address == f"tcp://127.0.0.1:{port}"
        assert bound_address(server, dialable=False) == f"tcp://0.0.0.0:{port}"
        assert listening_ip(port) == {"0.0.0.0"}
        with pynng.Pair0(recv_timeout=5000, send_timeout=5000) as client:
            client.dial(address, block=True)
            client.send(b"ping")
            assert server.recv() == b"ping"

    srv = RpcServer("nng+tcp://:0", echo)
    with trio.fail_after(10):
        address = await nursery.start(srv.run)
        assert address.startswith("nng+tcp://127.0.0.1:")
        assert srv.listen_address == address.replace("127.0.0.1", "0.0.0.0")
        async with RpcClient(address) as client:
            assert await client.call("app", "echo", "nng") == "nng"
