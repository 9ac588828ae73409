"""A cluster is secure by default (#13, "Security by default"): it refuses to start
without a secret unless its operator says ``--insecure``, and then warns at every start;
a secret file readable by others, or a short secret, is refused with a message naming
what to do.  The CLI turns each refusal into ``error: ...`` and exit status 2."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import trio

from engine.cluster.secret import ClusterConfigError, read_secret_file, secret_from
from engine.cluster.service import ClusterOptions
from engine.cluster.verbs import in_cluster
from engine.node.node import Node
from transport.mesh.discovery import DiscoveryConfig

from support import free_udp_port

GOOD = "a secret of thirty-two characters"


def test_a_cluster_without_a_secret_is_refused_unless_insecure(tmp_path):
    with pytest.raises(ClusterConfigError, match="needs a secret.*--insecure"):
        ClusterOptions(name="prod", state_dir=tmp_path)
    assert ClusterOptions(name="prod", insecure=True, state_dir=tmp_path).secret is None


def test_a_short_secret_and_a_bad_registry_are_refused(tmp_path):
    with pytest.raises(ClusterConfigError, match="at least 16 characters"):
        ClusterOptions(name="prod", secret="short")
    with pytest.raises(ClusterConfigError, match="expected etcd://HOST:PORT"):
        ClusterOptions(name="prod", secret=GOOD, registry="http://127.0.0.1:2379")


def test_a_secret_file_is_read_only_when_only_its_owner_can(tmp_path):
    path = tmp_path / "cluster.secret"
    path.write_text(GOOD + "\n")
    path.chmod(0o600)
    assert read_secret_file(path) == GOOD
    assert secret_from({"ENGINE_CLUSTER_SECRET_FILE": str(path)}) == GOOD
    path.chmod(0o640)
    with pytest.raises(ClusterConfigError, match="may be read by others: chmod 600"):
        read_secret_file(path)
    with pytest.raises(ClusterConfigError, match="missing"):
        read_secret_file(tmp_path / "missing")


@pytest.mark.e2e
async def test_an_insecure_node_warns_at_start(tmp_path, caplog):
    options = ClusterOptions(name="lab", insecure=True, state_dir=tmp_path,
                             discovery=DiscoveryConfig(interface="127.0.0.1", port=free_udp_port()))
    node = Node(control="tcp://127.0.0.1:0", cluster=in_cluster(options))
    with caplog.at_level(logging.WARNING, logger="engine.cluster"), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            nursery.cancel_scope.cancel()
    assert any("WITHOUT a secret (--insecure)" in r.getMessage() for r in caplog.records)


@pytest.mark.e2e
@pytest.mark.parametrize("argv, expected", [
    ([], "a cluster needs a secret"),
    (["--cluster-secret", "short"], "at least 16 characters"),
    (["--cluster-secret-file", "{open_file}"], "may be read by others"),
    (["--cluster-secret", GOOD, "--cluster-registry", "redis://x"], "expected etcd://"),
], ids=["no-secret", "short", "open-file", "registry"])
async def test_engine_run_refuses_a_cluster_it_must_not_start(tmp_path, argv, expected):
    open_file = tmp_path / "open.secret"
    open_file.write_text(GOOD)
    open_file.chmod(0o644)
    argv = [a.replace("{open_file}", str(open_file)) for a in argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_", "MESH_"))}
    with trio.fail_after(30):
        out = await trio.run_process(
            [sys.executable, "-m", "engine", "run", "--cluster", "prod", "--control",
             "tcp://127.0.0.1:0", "--state-dir", str(tmp_path / "state"), *argv],
            capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr.decode())
    assert expected in out.stderr.decode() and "Traceback" not in out.stderr.decode()


@pytest.mark.e2e
async def test_engine_run_with_an_etcd_it_cannot_reach_says_so_and_exits(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_", "MESH_"))}
    with trio.fail_after(30):
        out = await trio.run_process(
            [sys.executable, "-m", "engine", "run", "--cluster", "prod", "--cluster-secret", GOOD,
             "--cluster-registry", "etcd://127.0.0.1:1", "--control", "tcp://127.0.0.1:0",
             "--state-dir", str(tmp_path / "state")],
            capture_stdout=True, capture_stderr=True, check=False, env=env)
    err = out.stderr.decode()
    assert out.returncode == 1 and "error: cluster registry etcd://127.0.0.1:1" in err, err
    assert "unreachable" in err and "Traceback" not in err, err
