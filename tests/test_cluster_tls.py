"""A cluster whose nodes speak mutual TLS (#13, "Node-to-node links can use TLS"): real
``engine run --control tls+tcp://... --tls-cert/--tls-key/--tls-ca`` processes on
loopback, certificates made by ``openssl`` for the test (tests/test_transport_tls.py).

Two nodes with certificates of the cluster's CA link, share an app and answer over TLS;
the CLI reaches them with ``ENGINE_TLS_*``; a third node with the cluster's secret but a
certificate of another CA is never linked to and gets nothing; a plain client is
refused."""
from __future__ import annotations

import os
import sys
import uuid

import pytest
import trio

from engine.client import connect
from transport.errors import TransportError
from transport.tls import TlsConfig

from support import NodeProcess, free_udp_port, start_node_process, stop_node, wait_until
from test_cluster import CLUSTER_SECRET, apps_of, echo_app, node_ids
from test_transport_tls import Pki, make_leaf

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_args(tls: TlsConfig) -> list[str]:
    return ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]


async def test_nodes_link_and_share_apps_over_mutual_tls_and_strangers_stay_out(
        tmp_path, monkeypatch, pki):
    monkeypatch.setenv("ENGINE_CLUSTER_SECRET", CLUSTER_SECRET)
    port, name = free_udp_port(), f"tls-{uuid.uuid4().hex[:8]}"
    node_b_cert = TlsConfig(*make_leaf(pki.ca.parent, "node-b", (pki.ca, pki.ca.with_suffix(".key"))),
                            ca=pki.ca)
    started: list[NodeProcess] = []

    async def start(i: int, tls: TlsConfig, *paths) -> NodeProcess:
        node = await start_node_process(
            paths, tmp_path / f"node{i}.log", tmp_path, "--control", "tls+tcp://127.0.0.1:0",
            "--cluster", name, "--state-dir", str(tmp_path / f"state{i}"),
            "--discovery-port", str(port), "--discovery-interface", "127.0.0.1", *tls_args(tls))
        started.append(node)
        return node

    try:
        with trio.fail_after(60):
            a = await start(0, pki.server, echo_app(tmp_path / "apps", "echo"))
            b = await start(1, node_b_cert)
            assert a.address.startswith("tls+tcp://127.0.0.1:")
            async with connect(a.address, timeout=20, tls=pki.client) as ca, \
                    connect(b.address, timeout=20, tls=pki.client) as cb:
                await wait_until(lambda: _has(cb, "echo"), "B synced echo over TLS", timeout=15,
                                 interval=0.1)
                assert await cb.call("echo", "echo", "over tls") == "over tls"

                # A node of the same cluster (it has the secret) whose certificate
                # another CA signed: its beacons are heard, its links never come up.
                rogue = await start(2, pki.rogue)
                # (it trusts the cluster's CA; to reach it, trust its own)
                async with connect(rogue.address, timeout=20, tls=pki.doubting) as cr:
                    await wait_until(lambda: _sees(ca, 3), "A hears of the rogue node",
                                     timeout=15, interval=0.1)
                    view = await ca.verb("nodes")
                    assert sum(1 for n in view["nodes"] if n["connected"]) == 2, view["nodes"]
                    await wait_until(lambda: _tls_refusals(tmp_path / "node2.log"),
                                     "the rogue's links fail their handshakes", timeout=15,
                                     interval=0.1)
                    assert "echo" not in await apps_of(cr)
                    rogue_view = await cr.verb("nodes")
                    assert [n["id"] for n in rogue_view["nodes"] if n["connected"]] \
                        == [rogue_view["self"]], rogue_view["nodes"]

            # The CLI, with the certificate in the environment.
            env = {**os.environ, "ENGINE_TLS_CERT": str(pki.client.cert),
                   "ENGINE_TLS_KEY": str(pki.client.key), "ENGINE_TLS_CA": str(pki.client.ca)}
            out = await trio.run_process(
                [sys.executable, "-m", "engine", "call", "echo", "echo", '"cli"', "--node", b.address],
                capture_stdout=True, capture_stderr=True, check=False, env=env)
            assert out.returncode == 0 and out.stdout.decode().strip() == '"cli"', out.stderr.decode()

            # Plain TCP to a TLS endpoint: refused, not served.
            with pytest.raises(TransportError):
                async with connect(a.address.replace("tls+tcp://", "tcp://"), timeout=5,
                                   connect_timeout=3) as plain:
                    await plain.call("echo", "echo", 1)
    finally:
        left = [p for node in started for p in stop_node(node)]
        assert not left, left


async def _has(client, app: str) -> bool:
    return app in await apps_of(client)


async def _sees(client, n: int) -> bool:
    return len((await client.verb("nodes"))["nodes"]) >= n or len(await node_ids(client)) >= n


def _tls_refusals(log) -> bool:
    text = log.read_text(errors="replace")
    return "WARNING refused a connection" in text and "TLS" in text
