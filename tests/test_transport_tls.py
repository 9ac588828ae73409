"""RPC over mutual TLS (``tls+tcp://``, transport/tls.py): a throwaway CA and its
certificates are made with the ``openssl`` command line for this module's tests."""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import trio

from transport.errors import TimeoutError_, Unreachable
from transport.rpc import RpcClient, RpcServer, Stream
from transport.tls import TlsConfig, TlsConfigError, TlsHandshakeError

pytestmark = pytest.mark.e2e

LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_leaf(d: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    (d / "leaf.ext").write_text(LEAF_EXTENSIONS)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1],
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "leaf.ext", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


class Pki:
    def __init__(self, d: Path) -> None:
        ca, other_ca = make_ca(d, "ca"), make_ca(d, "other-ca")
        self.ca, self.other_ca = ca[0], other_ca[0]
        self.server = TlsConfig(*make_leaf(d, "server", ca), ca=self.ca)
        self.client = TlsConfig(*make_leaf(d, "client", ca), ca=self.ca)
        # A client whose certificate another CA signed (it trusts the right CA itself).
        self.rogue = TlsConfig(*make_leaf(d, "rogue", other_ca), ca=self.ca)
        # A client that does not trust the server's CA.
        self.doubting = TlsConfig(self.client.cert, self.client.key, ca=self.other_ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def handler(req):
    if req.event == "echo":
        return req.payload
    if req.event == "count":
        async def items():
            for i in range(req.payload):
                yield {"i": i}
        return Stream(items())
    if req.event == "sum":  # a chunked request: its chunks come after it
        total = 0
        async for chunk in req.chunks:
            total += chunk
        return total
    raise KeyError(req.event)


@pytest.fixture
async def tls_server(nursery, pki):
    srv = RpcServer("tls+tcp://127.0.0.1:0", handler, ssl_context=pki.server.server_context())
    with trio.fail_after(10):
        await nursery.start(srv.run)
    return srv


def plain(address: str) -> str:
    return address.removeprefix("tls+")


async def test_calls_over_mutual_tls_both_ways_with_a_streamed_reply(tls_server, pki):
    assert tls_server.address.startswith("tls+tcp://127.0.0.1:")
    with trio.fail_after(10):
        async with RpcClient(tls_server.address, ssl_context=pki.client.client_context()) as c:
            assert await c.call("app", "echo", {"a": [1, b"x"]}) == {"a": [1, b"x"]}
            assert await c.call("app", "count", 3) == [{"i": 0}, {"i": 1}, {"i": 2}]
            got = [item async for item in c.stream("app", "count", 200)]
            assert got == [{"i": i} for i in range(200)]
            assert await c.call("app", "sum", None, chunks=range(1000)) == sum(range(1000))
            big = b"z" * 1_000_000  # many TLS records, one frame
            assert await c.call("app", "echo", big) == big
    assert tls_server.tls_failures == 0


async def test_a_tls_server_on_an_empty_host_reports_a_dialable_address(nursery, pki):
    srv = RpcServer("tls+tcp://:0", handler, ssl_context=pki.server.server_context())
    with trio.fail_after(10):
        address = await nursery.start(srv.run)
        assert address.startswith("tls+tcp://127.0.0.1:")
        assert srv.listen_address == address.replace("127.0.0.1", "0.0.0.0")
        async with RpcClient(address, ssl_context=pki.client.client_context()) as c:
            assert await c.call("app", "echo", 1) == 1


async def test_a_client_certificate_of_another_ca_is_refused(tls_server, pki, caplog):
    caplog.set_level(logging.WARNING)
    with trio.fail_after(10):
        async with RpcClient(tls_server.address, ssl_context=pki.rogue.client_context()) as c:
            with pytest.raises(TlsHandshakeError) as info:
                await c.call("app", "echo", 1, timeout=8)  # refused, long before the timeout
            assert isinstance(info.value, Unreachable)
            assert c.tls_failures >= 1
        assert tls_server.tls_failures >= 1
        assert any("refused a connection" in r.getMessage() and "TLS handshake from" in
                   r.getMessage() for r in caplog.records if r.name == "transport.rpc.server")
        # ... and the server serves the others.
        async with RpcClient(tls_server.address, ssl_context=pki.client.client_context()) as c:
            assert await c.call("app", "echo", "still here") == "still here"


async def test_a_server_certificate_the_client_does_not_trust_is_refused(tls_server, pki,
                                                                           caplog):
    caplog.set_level(logging.WARNING)
    with trio.fail_after(10):
        async with RpcClient(tls_server.address,
                             ssl_context=pki.doubting.client_context()) as c:
            with pytest.raises(TlsHandshakeError, match="certificate verify failed"):
                await c.call("app", "echo", 1, timeout=8)
    warned = [r.getMessage() for r in caplog.records if r.name == "transport.rpc.client"]
    assert len(warned) == 1 and "TLS handshake with" in warned[0]


async def test_a_plain_client_against_a_tls_server_fails_and_others_are_served(tls_server,
                                                                                  pki):
    with trio.fail_after(10):
        silent = await trio.open_tcp_stream("127.0.0.1", int(tls_server.address.rpartition(":")[2]))
        try:  # (one that connects and says nothing holds nobody up either)
            async with RpcClient(plain(tls_server.address)) as c:
                with pytest.raises(Unreachable) as info:
                    await c.call("app", "echo", 1, timeout=8)
                assert not isinstance(info.value, TimeoutError_)
            await _wait(lambda: tls_server.tls_failures >= 1)
            async with RpcClient(tls_server.address,
                                 ssl_context=pki.client.client_context()) as c:
                assert await c.call("app", "echo", "served") == "served"
        finally:
            await silent.aclose()


async def test_a_tls_client_against_a_plain_server_fails_cleanly(nursery, pki):
    srv = RpcServer("tcp://127.0.0.1:0", handler)
    with trio.fail_after(10):
        address = await nursery.start(srv.run)
        async with RpcClient("tls+" + address, ssl_context=pki.client.client_context()) as c:
            with pytest.raises(TlsHandshakeError):
                await c.call("app", "echo", 1, timeout=8)
        async with RpcClient(address) as c:
            assert await c.call("app", "echo", 2) == 2


def test_a_tls_endpoint_needs_a_context_of_its_side_and_only_it_takes_one(pki):
    server_ctx, client_ctx = pki.server.server_context(), pki.client.client_context()
    with pytest.raises(TlsConfigError, match="needs ssl_context"):
        RpcServer("tls+tcp://127.0.0.1:0", handler)
    with pytest.raises(TlsConfigError, match="needs ssl_context"):
        RpcClient("tls+tcp://127.0.0.1:1")
    with pytest.raises(TlsConfigError, match="would be plain"):
        RpcServer("tcp://127.0.0.1:0", handler, ssl_context=server_ctx)
    with pytest.raises(TlsConfigError, match="would be plain"):
        RpcClient("nng+tcp://127.0.0.1:1", ssl_context=client_ctx)
    with pytest.raises(TlsConfigError, match="server-side"):
        RpcServer("tls+tcp://127.0.0.1:0", handler, ssl_context=client_ctx)
    with pytest.raises(TlsConfigError, match="client-side"):
        RpcClient("tls+tcp://127.0.0.1:1", ssl_context=server_ctx)


def test_tls_config_errors_name_the_file(pki, tmp_path):
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(TlsConfigError, match=f"certificate file {missing}"):
        TlsConfig(missing, pki.client.key, pki.ca).client_context()
    with pytest.raises(TlsConfigError, match=f"CA file {missing}"):
        TlsConfig(pki.client.cert, pki.client.key, str(missing)).server_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match=f"CA file {garbage}"):
        TlsConfig(pki.client.cert, pki.client.key, garbage).client_context()
    with pytest.raises(TlsConfigError, match=f"with key {pki.server.key}"):
        TlsConfig(pki.client.cert, pki.server.key, pki.ca).client_context()  # not its key
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.key"
        locked.write_bytes(pki.client.key.read_bytes())
        locked.chmod(0)
        with pytest.raises(TlsConfigError, match=f"key file {locked}"):
            TlsConfig(pki.client.cert, locked, pki.ca).client_context()


async def _wait(predicate, step: float = 0.01) -> None:
    while not predicate():
        await trio.sleep(step)
